import { z } from 'zod';
import { parseCpus, parseDuration, parsePids, parseSize } from './units.js';
import { clusterSchema } from './cluster.js';

/** A zod refinement that runs one of our unit parsers and reports its message. */
function parsed<T>(parse: (v: string | number) => T) {
  return z.union([z.string(), z.number()]).transform((v, ctx) => {
    try {
      return parse(v);
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: (err as Error).message });
      return z.NEVER;
    }
  });
}

export const limitsInputSchema = z.strictObject({
  memory: parsed((v) => parseSize(v, 'memory limit')).optional(),
  pids: parsed(parsePids).optional(),
  cpus: parsed(parseCpus).optional(),
  disk: parsed((v) => parseSize(v, 'disk limit')).optional(),
});

/** Longest timer Node keeps (2^31-1 ms, about 24.8 days); a longer one would fire at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** A duration that is 0 (off) or between `minMs` and ~24 days. */
function timeoutSetting(what: string, minMs = 1000) {
  return parsed((v) => parseDuration(v, what)).refine((ms) => ms === 0 || (ms >= minMs && ms <= MAX_TIMER_MS), {
    message: `${what} must be 0 (off) or between ${minMs / 1000}s and 596h`,
  });
}

/**
 * Idle times per channel type, as OpenSSH's ChannelTimeout (9.2+): a channel
 * of that type with no data either way for that long is closed. `global`
 * takes all channels of a connection together: data on any keeps them all.
 */
export const channelTimeoutSchema = z.strictObject({
  session: timeoutSetting('channelTimeout.session').optional(),
  'direct-tcpip': timeoutSetting('channelTimeout.direct-tcpip').optional(),
  'forwarded-tcpip': timeoutSetting('channelTimeout.forwarded-tcpip').optional(),
  'direct-streamlocal@openssh.com': timeoutSetting('channelTimeout.direct-streamlocal@openssh.com').optional(),
  'forwarded-streamlocal@openssh.com': timeoutSetting('channelTimeout.forwarded-streamlocal@openssh.com').optional(),
  'auth-agent@openssh.com': timeoutSetting('channelTimeout.auth-agent@openssh.com').optional(),
  global: timeoutSetting('channelTimeout.global').optional(),
});

/** The timeouts of one account (accounts.yaml `timeouts:`): each overrides vesh.yaml's. */
export const accountTimeoutsSchema = z.strictObject({
  clientAliveInterval: timeoutSetting('clientAliveInterval').optional(),
  clientAliveCountMax: z.number().int().min(1, 'clientAliveCountMax must be at least 1').max(100).optional(),
  channelTimeout: channelTimeoutSchema.optional(),
  unusedConnectionTimeout: timeoutSetting('unusedConnectionTimeout').optional(),
  maxSessionTime: timeoutSetting('maxSessionTime').optional(),
});

const listenSchema = z.string().regex(/^(\[[0-9a-fA-F:.]+\]|[^:\s]+):\d{1,5}$/, 'listen must be "ADDRESS:PORT", for example "0.0.0.0:2222"');

const cidrSchema = z.string().regex(/^\d{1,3}(\.\d{1,3}){3}\/\d{1,2}$/, 'subnet must be an IPv4 CIDR such as 10.88.0.0/16');

/** config/vesh.yaml. Relative paths resolve against the file's own directory. */
export const serverConfigSchema = z.strictObject({
  listen: listenSchema.default('0.0.0.0:2222'),
  dataDir: z.string().min(1).default('/var/lib/vesh'),
  hostKeysDir: z.string().min(1).default('../keys'),
  accountsFile: z.string().min(1).default('accounts.yaml'),
  defaults: z.strictObject({
    template: z.string().min(1).default('debian'),
    limits: z.strictObject({
      memory: parsed((v) => parseSize(v, 'memory limit')).default(512 * 1024 ** 2),
      pids: parsed(parsePids).default(512),
      cpus: parsed(parseCpus).default(1),
      disk: parsed((v) => parseSize(v, 'disk limit')).default(2 * 1024 ** 3),
    }).prefault({}),
  }).prefault({}),
  network: z.strictObject({
    bridge: z.string().regex(/^[A-Za-z0-9_.-]{1,15}$/, 'bridge must be an interface name of 1-15 letters, digits, "_", "." or "-"').default('vesh0'),
    subnet: cidrSchema.default('10.88.0.0/16'),
    outbound: z.boolean().default(false),
    /**
     * With outbound on, VEs still cannot reach link-local (cloud metadata at
     * 169.254.169.254), private (RFC 1918, CGNAT 100.64/10) and other
     * non-internet ranges, which hold the host's LAN and other bridges.
     * CIDRs listed here are reachable anyway, e.g. [10.20.0.0/16] for a
     * company network VEs should use.
     */
    outboundAllow: z.array(z.string().refine(
      (v) => /^\d{1,3}(\.\d{1,3}){3}\/\d{1,2}$/.test(v) && v.split('/')[0]!.split('.').every((o) => Number(o) <= 255) && Number(v.split('/')[1]) <= 32,
      'each network.outboundAllow entry must be an IPv4 CIDR such as 10.20.0.0/16',
    )).max(1000).default([]),
    /**
     * Connections (conntrack entries: TCP connections, UDP flows) one VE may
     * hold through the host at once with outbound on; new ones beyond it are
     * dropped. Keeps one VE from filling the host's conntrack table
     * (net.netfilter.nf_conntrack_max), after which every new flow on the
     * host, SSH logins included, is dropped.
     */
    maxConnectionsPerVe: z.number().int().min(16).max(1_000_000).default(4096),
  }).prefault({}),
  auth: z.strictObject({
    maxAuthTries: z.number().int().min(1).max(100).default(6),
    loginGraceTime: parsed((v) => parseDuration(v, 'loginGraceTime')).default(30_000),
    /** Connections that have not logged in yet, at most, at any time (OpenSSH's MaxStartups). */
    maxStartups: z.number().int().min(1).max(100_000).default(100),
    /**
     * Of those, at most this many from one source: an IPv4 address, or an
     * IPv6 /64 (OpenSSH's PerSourceMaxStartups), so one source cannot hold
     * every slot through the login grace time.
     */
    maxStartupsPerSource: z.number().int().min(1).max(100_000).default(10),
    /**
     * New connections one source may open per second, on average (bursts of
     * five seconds' worth pass). Each handshake costs a host-key signature on
     * the shared event loop (RSA: ~1.5 ms), so a source that connects faster
     * is refused before a byte is parsed. Real clients stay far below it.
     */
    maxConnectionRatePerSource: z.number().int().min(1).max(100_000).default(20),
    /**
     * Password checks one source may have running or waiting at once; more
     * fail at once. The checks of all sources take turns, so one source
     * cannot fill the argon2 queue and starve another's login.
     */
    maxPasswordChecksPerSource: z.number().int().min(1).max(1000).default(2),
    /** Locking or deleting an account (accounts.yaml reload, vesh user lock|del) ends its open connections. */
    disconnectOnLock: z.boolean().default(true),
    /**
     * CAs whose user certificates log in to any account whose name the
     * certificate lists as a principal (OpenSSH's TrustedUserCAKeys): public
     * key lines, or the path of a file of them (read again when it changes).
     */
    trustedUserCAKeys: z.union([
      z.string().min(1).max(4096),
      z.array(z.string().max(16384)).max(1000),
    ]).optional(),
    /**
     * A file of revoked keys (OpenSSH's RevokedKeys, as a text list): public
     * key lines, "serial: N[-M]", "id: KEY-ID", "sha256: FINGERPRINT".
     * Read again when it changes; unreadable, it refuses every key login.
     */
    revokedKeys: z.string().min(1).max(4096).optional(),
    /**
     * Per-source penalties after repeated failures (OpenSSH PerSourcePenalties
     * style). A failure is a wrong password or signature, a connection cut at
     * the login grace time, garbage / a failed key exchange before login, or
     * a connection that left without logging in ("noauth").
     */
    penalties: z.strictObject({
      /** Failures from one source against one account before that source's attempts at it wait; a login to that account clears them. */
      failuresBeforePenalty: z.number().int().min(1).default(10),
      /** Failures from one source in all (any account, and connections that never logged in) before the whole source waits; logins do not clear them. */
      sourceFailuresBeforePenalty: z.number().int().min(1).default(20),
      penalty: parsed((v) => parseDuration(v, 'penalty')).default(30_000),
      maxPenalty: parsed((v) => parseDuration(v, 'maxPenalty')).default(600_000),
    }).prefault({}),
  }).prefault({}),
  /**
   * What authenticated users may hold open. Every session is a host process
   * (and a pty for a terminal), every forward helper a process in the VE
   * started by the engine: without caps one tenant could use up the host's
   * pids and ptys (review H4). Names follow OpenSSH where it has one.
   */
  sessions: z.strictObject({
    /** Session channels per connection (OpenSSH MaxSessions). */
    maxSessions: z.number().int().min(1).max(1000).default(10),
    /** Authenticated connections one account may hold open at once. */
    maxConnectionsPerAccount: z.number().int().min(1).max(100_000).default(500),
    /** Sessions (shells, commands, sftp) one account may run at once, over all its connections. */
    maxSessionsPerAccount: z.number().int().min(1).max(100_000).default(500),
    /** Connections of one account that may run a port-forward helper at once (one helper per connection that forwards). */
    maxForwardHelpersPerAccount: z.number().int().min(1).max(100_000).default(100),
    /** Authenticated connections, all accounts together. */
    maxConnections: z.number().int().min(1).max(1_000_000).default(4000),
    /** Sessions, all accounts together: kept below the host's pty pool (pty.max - pty.reserve = 3072 by default) and pid_max. */
    maxSessionsTotal: z.number().int().min(1).max(1_000_000).default(2000),
    /** ssh -A at all (OpenSSH AllowAgentForwarding); accounts (agentForwarding) and keys (no-agent-forwarding) can only turn it off. */
    agentForwarding: z.boolean().default(true),
    /** Remove an existing socket at the path before binding a -R Unix socket (OpenSSH StreamLocalBindUnlink); never a file of another type. */
    streamLocalBindUnlink: z.boolean().default(false),
    /** The umask -R Unix sockets are bound under, in octal (OpenSSH StreamLocalBindMask): "0177" makes them 0600. */
    streamLocalBindMask: z.string({ error: 'streamLocalBindMask must be an octal umask in quotes, such as "0177" (unquoted, YAML reads 0177 as a number)' }).regex(/^0?[0-7]{1,3}$/, 'streamLocalBindMask must be an octal umask such as "0177" (quoted, so YAML keeps it a string)').transform((v) => parseInt(v, 8)).default(0o177),
  }).prefault({}),
  runtime: z.strictObject({
    engine: z.enum(['runc']).default('runc'),
    binary: z.string().default('runc'),
    /**
     * VE ids: every VE gets a range of its own of idmapSize host uids and
     * gids (its root is the first), one of idRanges slots from idmapBase,
     * chosen at create and kept while the VE exists. The default span,
     * 100000 to 1073841823, leaves room below workers.firstUid.
     */
    idmapBase: z.number().int().min(1).default(100_000),
    idmapSize: z.number().int().min(65_536).default(65_536),
    idRanges: z.number().int().min(1).max(65_535).default(16_384),
    stopTimeout: parsed((v) => parseDuration(v, 'stopTimeout')).default(10_000),
    /** A session agent in each VE in use (one small process there) instead of one engine exec per session. */
    sessionAgents: z.boolean().default(true),
    /**
     * Host processes that serve one VE's sessions (session relays, runc exec,
     * the forward helper's start) are charged to a cgroup of that VE with
     * these limits, so a tenant who opens sessions without end exhausts his
     * own, not the host's pids and memory (review H4). relayPids counts
     * tasks: a relay is 1, a `runc exec` (the fallback when the VE's agent is
     * gone) about 10. The defaults hold 500 sessions of one VE with room.
     */
    relayPids: z.number().int().min(8).max(4_194_304).default(2048),
    relayMemory: parsed((v) => parseSize(v, 'relayMemory')).default(1024 ** 3),
    /**
     * Terminals one VE may have open at once (its devpts max=; review M1).
     * Every VE's terminals come from one host-wide pool (kernel.pty.max, which
     * vesh raises at start): without a cap one VE takes them all.
     */
    ptysPerVe: z.number().int().min(16).max(65_536).default(1024),
    /**
     * Whether VE root may configure netfilter (nft, iptables) in its own
     * network. Off by default: nf_tables and x_tables are the main source of
     * user-namespace-to-root kernel exploits, and the host's rules, not a
     * VE's, keep VEs apart (see SeccompOptions in runtime/seccomp.ts).
     * Applies to a VE at its next start.
     */
    veFirewall: z.boolean().default(false),
    /**
     * A VE's own view of its limits: LXCFS (one daemon per vesh instance,
     * started with the first VE) serves /proc/meminfo, cpuinfo, stat,
     * uptime, loadavg, diskstats, swaps and /sys/devices/system/cpu from
     * the VE's cgroups, bound read-only into each VE, so free, nproc, top
     * and uptime see the VE. Without lxcfs installed VEs start anyway,
     * seeing the host's. Applies to a VE at its next start.
     */
    lxcfs: z.boolean().default(true),
  }).prefault({}),
  /**
   * The SSH workers: processes that run the SSH protocol (every byte a client
   * sends is parsed there) with no privilege, each under its own uid, in its
   * own mount, network, IPC and UTS namespaces, under a seccomp filter. The
   * root process (the broker) hands them connections and answers a fixed set
   * of requests; see docs/architecture.md.
   */
  workers: z.strictObject({
    /** How many workers; 0 = one per CPU the server may use. Connections are spread over them. */
    count: z.number().int().min(0).max(256).default(0),
    /** Worker i runs as uid and gid firstUid + i: ids no user, file or VE on the host has. */
    firstUid: z.number().int().min(1000).max(4_000_000_000).default(2_147_000_000),
    /** Descriptors one worker may hold (each connection takes a few). */
    maxFiles: z.number().int().min(256).max(1_048_576).default(65_536),
    /** A worker that has not answered the broker's ping for this long is taken for stuck, ended and replaced. */
    stallTimeout: parsed((v) => parseDuration(v, 'stallTimeout')).default(30_000),
  }).prefault({}),
  /**
   * When the server ends connections and sessions by itself; see the
   * comments in config/vesh.example.yaml and src/ssh/timeouts.ts.
   */
  timeouts: z.strictObject({
    /** Keepalive probe after this long with nothing from the client (ClientAliveInterval); 0 = off. */
    clientAliveInterval: timeoutSetting('clientAliveInterval').default(60_000),
    /** Probes unanswered before the connection is ended (ClientAliveCountMax). */
    clientAliveCountMax: z.number().int().min(1, 'clientAliveCountMax must be at least 1').max(100).default(3),
    channelTimeout: channelTimeoutSchema.default({}),
    /** A connection with no open channel for this long is ended (UnusedConnectionTimeout); 0 = never. */
    unusedConnectionTimeout: timeoutSetting('unusedConnectionTimeout').default(0),
    /** A session running this long is hung up; 0 = no limit. */
    maxSessionTime: timeoutSetting('maxSessionTime').default(0),
  }).prefault({}),
  /**
   * The Prometheus endpoint (src/audit/metrics.ts): off unless listen is
   * set. Its figures name VEs and their usage: give an address only the
   * monitoring system reaches (127.0.0.1 or a management network).
   */
  // A `metrics:` line whose settings are all commented out (as in the example) reads as null: off.
  metrics: z.preprocess((v) => v ?? {}, z.strictObject({
    listen: z.string().regex(/^(\[[0-9a-fA-F:.]+\]|[^:\s]+):\d{1,5}$/, 'metrics.listen must be "ADDRESS:PORT", for example "127.0.0.1:9469"').optional(),
  })),
  /**
   * Session recording (src/audit/recording-*.ts): every account when
   * enabled, else only accounts with `record: true`. A `recording:` line
   * whose settings are all commented out reads as null: defaults.
   */
  recording: z.preprocess((v) => v ?? {}, z.strictObject({
    enabled: z.boolean().default(false),
    /** Where recordings live (relative to this file); default DATADIR/recordings. Checked at start: root-only, out of every VE's reach. */
    dir: z.string().min(1, 'recording.dir must be a directory path').optional(),
    /** Sealed recordings older than this many days are pruned (a chain entry says so); 0 keeps them forever. */
    retentionDays: z.number().int('recording.retentionDays must be a whole number of days')
      .min(0, 'recording.retentionDays must be 0 (keep forever) or a number of days').max(36_500, 'recording.retentionDays must be at most 36500 (100 years)').default(0),
    /** Most bytes one recording file may take; past it the session goes on and the recording says it was truncated. */
    maxBytes: parsed((v) => parseSize(v, 'recording.maxBytes')).refine((n) => n >= 4096 && n <= 2 ** 40, {
      message: 'recording.maxBytes must be between 4K and 1T',
    }).default(64 * 1024 * 1024),
    /** Chain entries carry an HMAC keyed by keys/recording-chain.key, not a bare SHA-256. */
    hmac: z.boolean().default(true),
  })),
  /** Cluster mode (src/config/cluster.ts): off by default; on, nodes share placement and membership through etcd. */
  cluster: clusterSchema,
  logging: z.strictObject({
    level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace']).default('info'),
    pretty: z.union([z.boolean(), z.literal('auto')]).default('auto'),
  }).prefault({}),
});

export type ServerConfigFile = z.infer<typeof serverConfigSchema>;
