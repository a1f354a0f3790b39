import { readFileSync } from 'node:fs';
import path from 'node:path';
import { ErrorCodes, VeshError } from '../errors.js';
import { parsePublicKeyLine } from './accounts.js';
import type { Limits } from './limits.js';
import { serverConfigSchema } from './schema.js';
import { resolveClusterConfig, type ClusterConfig } from './cluster.js';
import { parseYamlWithSchema } from './yaml-validate.js';

/** The server configuration with every path made absolute and every unit resolved. */
export interface ServerConfig {
  configFile: string;
  listen: { host: string; port: number };
  dataDir: string;
  hostKeysDir: string;
  accountsFile: string;
  defaults: { template: string; limits: Limits };
  network: { bridge: string; subnet: string; outbound: boolean; outboundAllow: string[]; maxConnectionsPerVe: number };
  auth: {
    maxAuthTries: number;
    loginGraceTimeMs: number;
    maxStartups: number;
    maxStartupsPerSource: number;
    maxConnectionRatePerSource: number;
    maxPasswordChecksPerSource: number;
    disconnectOnLock: boolean;
    /** TrustedUserCAKeys: key lines from vesh.yaml, or an absolute file path; null: none. */
    trustedUserCAKeys: { lines: string[] } | { file: string } | null;
    /** RevokedKeys file (absolute), or null. */
    revokedKeys: string | null;
    penalties: { failuresBeforePenalty: number; sourceFailuresBeforePenalty: number; penaltyMs: number; maxPenaltyMs: number };
  };
  sessions: SessionLimits;
  runtime: { engine: 'runc'; binary: string; idmapBase: number; idmapSize: number; idRanges: number; stopTimeoutMs: number; sessionAgents: boolean; relayPids: number; relayMemoryBytes: number; ptysPerVe: number; veFirewall: boolean; lxcfs: boolean };
  workers: { count: number; firstUid: number; maxFiles: number; stallTimeoutMs: number };
  logging: { level: string; pretty: boolean | 'auto' };
  timeouts: TimeoutSettings;
  /** The Prometheus endpoint's address; null or absent (configs built by hand in tests): off. */
  metrics?: { listen: { host: string; port: number } | null };
  /** Cluster mode (vesh.yaml `cluster:`); absent (configs built by hand in tests) or not enabled: one node, no etcd. */
  cluster?: ClusterConfig;
  /** Session recording (vesh.yaml `recording:`); absent (configs built by hand in tests): off. */
  recording?: RecordingConfig;
}

/** vesh.yaml `recording:`, resolved: `dir` absolute. */
export interface RecordingConfig {
  enabled: boolean;
  dir: string;
  retentionDays: number;
  maxBytes: number;
  hmac: boolean;
}

/** Channel types a channelTimeout can name, and `global` (all channels of a connection together). */
export type ChannelTimeoutType = 'session' | 'direct-tcpip' | 'forwarded-tcpip' | 'direct-streamlocal@openssh.com'
  | 'forwarded-streamlocal@openssh.com' | 'auth-agent@openssh.com' | 'global';

/** vesh.yaml `timeouts:` (and an account's overrides, resolved): milliseconds, 0 = off. */
export interface TimeoutSettings {
  clientAliveIntervalMs: number;
  clientAliveCountMax: number;
  channelTimeoutMs: Partial<Record<ChannelTimeoutType, number>>;
  unusedConnectionTimeoutMs: number;
  maxSessionTimeMs: number;
}

/** What authenticated users may hold open (vesh.yaml `sessions:`). */
export interface SessionLimits {
  maxSessions: number;
  maxConnectionsPerAccount: number;
  maxSessionsPerAccount: number;
  maxForwardHelpersPerAccount: number;
  maxConnections: number;
  maxSessionsTotal: number;
  /** ssh -A on this server at all (AllowAgentForwarding); absent: yes. */
  agentForwarding?: boolean;
  /** Remove an existing socket before binding a -R Unix socket (StreamLocalBindUnlink); absent: no. */
  streamLocalBindUnlink?: boolean;
  /** The umask -R Unix sockets are bound under (StreamLocalBindMask); absent: 0o177. */
  streamLocalBindMask?: number;
}

export const DEFAULT_CONFIG_PATH = 'config/vesh.yaml';

/** Ids run 0..2^32-2: (uid_t)-1 means "no change" to chown and is no one's. */
const MAX_ID = 4_294_967_295;

function splitListen(listen: string): { host: string; port: number } {
  const idx = listen.lastIndexOf(':');
  let host = listen.slice(0, idx);
  if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
  const port = Number(listen.slice(idx + 1));
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new VeshError(ErrorCodes.CONFIG_INVALID, `listen port ${port} is out of range: use 1-65535 (0 picks a free port, for tests)`);
  }
  return { host, port };
}

/** auth.trustedUserCAKeys: inline lines are checked here, a file when it is read (it may change). */
function trustedCaKeys(file: string, value: string | string[] | undefined, rel: (p: string) => string): ServerConfig['auth']['trustedUserCAKeys'] {
  if (value === undefined) return null;
  if (typeof value === 'string') return { file: rel(value) };
  const lines = value.map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'));
  lines.forEach((line, i) => {
    try {
      parsePublicKeyLine(line);
    } catch (err) {
      throw new VeshError(ErrorCodes.CONFIG_INVALID, `${file}: auth.trustedUserCAKeys[${i}]: ${(err as Error).message}`);
    }
  });
  return { lines };
}

/** Parse and validate vesh.yaml text. `file` is used to resolve relative paths and in messages. */
export function parseServerConfig(file: string, text: string): ServerConfig {
  const abs = path.resolve(file);
  const { value } = parseYamlWithSchema(abs, text, serverConfigSchema);
  const dir = path.dirname(abs);
  const rel = (p: string) => path.resolve(dir, p);
  const w = value.workers;
  // Every id any VE may be given, not only the first VE's.
  const veIds = { from: value.runtime.idmapBase, to: value.runtime.idmapBase + value.runtime.idRanges * value.runtime.idmapSize };
  if (veIds.to > MAX_ID) {
    throw new VeshError(ErrorCodes.CONFIG_INVALID, `${abs}: the VE ids (runtime.idmapBase ${veIds.from} + idRanges ${value.runtime.idRanges} x idmapSize ${value.runtime.idmapSize}) would end at ${veIds.to - 1}, past the largest uid ${MAX_ID - 1}: lower runtime.idRanges`);
  }
  if (w.firstUid < veIds.to && w.firstUid + Math.max(w.count, 256) > veIds.from) {
    throw new VeshError(ErrorCodes.CONFIG_INVALID, `${abs}: workers.firstUid ${w.firstUid} overlaps the VE ids (runtime.idmapBase ${veIds.from} to ${veIds.to - 1}, idRanges ${value.runtime.idRanges} of ${value.runtime.idmapSize}): a worker must not share a uid with VE files; pick a firstUid outside that span, or lower runtime.idRanges`);
  }
  return {
    configFile: abs,
    listen: splitListen(value.listen),
    dataDir: rel(value.dataDir),
    hostKeysDir: rel(value.hostKeysDir),
    accountsFile: rel(value.accountsFile),
    defaults: { template: value.defaults.template, limits: { ...value.defaults.limits } },
    network: { ...value.network },
    auth: {
      maxAuthTries: value.auth.maxAuthTries,
      loginGraceTimeMs: value.auth.loginGraceTime,
      maxStartups: value.auth.maxStartups,
      maxStartupsPerSource: value.auth.maxStartupsPerSource,
      maxConnectionRatePerSource: value.auth.maxConnectionRatePerSource,
      maxPasswordChecksPerSource: value.auth.maxPasswordChecksPerSource,
      disconnectOnLock: value.auth.disconnectOnLock,
      trustedUserCAKeys: trustedCaKeys(abs, value.auth.trustedUserCAKeys, rel),
      revokedKeys: value.auth.revokedKeys === undefined ? null : rel(value.auth.revokedKeys),
      penalties: {
        failuresBeforePenalty: value.auth.penalties.failuresBeforePenalty,
        sourceFailuresBeforePenalty: value.auth.penalties.sourceFailuresBeforePenalty,
        penaltyMs: value.auth.penalties.penalty,
        maxPenaltyMs: value.auth.penalties.maxPenalty,
      },
    },
    sessions: { ...value.sessions },
    runtime: {
      engine: value.runtime.engine,
      binary: value.runtime.binary,
      idmapBase: value.runtime.idmapBase,
      idmapSize: value.runtime.idmapSize,
      idRanges: value.runtime.idRanges,
      stopTimeoutMs: value.runtime.stopTimeout,
      sessionAgents: value.runtime.sessionAgents,
      relayPids: value.runtime.relayPids,
      relayMemoryBytes: value.runtime.relayMemory,
      ptysPerVe: value.runtime.ptysPerVe,
      veFirewall: value.runtime.veFirewall,
      lxcfs: value.runtime.lxcfs,
    },
    workers: { count: w.count, firstUid: w.firstUid, maxFiles: w.maxFiles, stallTimeoutMs: w.stallTimeout },
    logging: { ...value.logging },
    metrics: { listen: value.metrics.listen === undefined ? null : splitListen(value.metrics.listen) },
    cluster: resolveClusterConfig(value.cluster, dir, splitListen(value.listen)),
    recording: {
      enabled: value.recording.enabled,
      dir: value.recording.dir === undefined ? path.join(rel(value.dataDir), 'recordings') : rel(value.recording.dir),
      retentionDays: value.recording.retentionDays,
      maxBytes: value.recording.maxBytes,
      hmac: value.recording.hmac,
    },
    timeouts: {
      clientAliveIntervalMs: value.timeouts.clientAliveInterval,
      clientAliveCountMax: value.timeouts.clientAliveCountMax,
      channelTimeoutMs: { ...value.timeouts.channelTimeout },
      unusedConnectionTimeoutMs: value.timeouts.unusedConnectionTimeout,
      maxSessionTimeMs: value.timeouts.maxSessionTime,
    },
  };
}

export function loadServerConfig(file: string = DEFAULT_CONFIG_PATH): ServerConfig {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'ENOENT') {
      throw new VeshError(ErrorCodes.CONFIG_NOT_FOUND, `config file ${path.resolve(file)} does not exist: run "npm start" once to create it from config/vesh.example.yaml, or pass --config PATH`);
    }
    throw new VeshError(ErrorCodes.CONFIG_INVALID, `cannot read config file ${path.resolve(file)}: ${e.message}`);
  }
  return parseServerConfig(file, text);
}
