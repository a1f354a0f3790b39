import { randomBytes } from 'node:crypto';
import net from 'node:net';
import ssh2, { type ClientInfo, type Connection } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import type { ServerConfig, SessionLimits } from '../config/server-config.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import type { VeAccess } from '../ve/access.js';
import { SERVER_ALGORITHMS } from './algorithms.js';
import { SshConnection } from './connection.js';
import type { HostKey } from './host-keys.js';
import { sourceBlock } from '../auth/source-match.js';
import type { SshAuthenticator } from './ports.js';
import { DEFAULT_SESSION_LIMITS, UsageCaps } from './usage-caps.js';

// ssh2 is CommonJS without static named exports: Node's ESM loader only offers its default export.
const Ssh2Server = ssh2.Server;

/** The auth settings the server reads (the rest of vesh.yaml `auth:` belongs to the authenticator). */
export type ServerAuthSettings = Pick<ServerConfig['auth'], 'maxAuthTries' | 'loginGraceTimeMs' | 'maxStartups' | 'maxStartupsPerSource'> & {
  /** New connections per second one source may open (default DEFAULT_CONNECTION_RATE_PER_SOURCE). */
  maxConnectionRatePerSource?: number;
  penalties?: unknown;
};

/** vesh.yaml's default for auth.maxConnectionRatePerSource. */
export const DEFAULT_CONNECTION_RATE_PER_SOURCE = 20;

/** A source's allowance of new connections is this many seconds' worth of its rate. */
const CONNECTION_BURST_SECONDS = 5;

/** Sources whose connection rate is tracked; past this, the one seen longest ago is forgotten. */
const MAX_RATE_SOURCES = 10_000;

/** A refusal of one kind for one source is logged at most this often; the rest are counted into the next line. */
const REFUSAL_LOG_INTERVAL_MS = 10_000;

export interface SshServerDeps {
  /** listen address, the auth limits and the caps of `sessions:` (defaults when absent) are read from here. */
  config: { listen: ServerConfig['listen']; auth: ServerAuthSettings; sessions?: SessionLimits };
  authenticator: SshAuthenticator;
  ves: VeAccess;
  hostKeys: HostKey[];
  logger: Logger;
}

/** Our bookkeeping for one accepted TCP connection. */
interface Admission {
  id: string;
  socket: net.Socket;
  source: string;
  /** What per-source caps count it under (sourceBlock: the address, or its IPv6 /64). */
  block: string;
  acceptedAt: number;
  /** Still counted against MaxStartups and the grace timer. */
  unauthenticated: boolean;
  graceTimer: NodeJS.Timeout | null;
  connection: SshConnection | null;
  /** The first bytes received, kept until the SSH identification line is seen, for the log. */
  firstBytes: Buffer | null;
  /** Already counted as a failure of its source (at most once per connection). */
  struck: boolean;
}

/** Why a connection that never logged in counts against its source. */
type PreAuthFailure = 'grace_timeout' | 'garbage' | 'protocol_error' | 'key_exchange_incomplete' | 'noauth';

/** "::ffff:127.0.0.1" → "127.0.0.1", so penalties and logs see one address per IPv4 client. */
function normalizeAddress(a: string | undefined): string {
  if (!a) return 'unknown';
  return a.startsWith('::ffff:') && a.includes('.') ? a.slice(7) : a;
}

/**
 * The SSH server. We accept TCP connections on our own net.Server and only
 * then hand them to ssh2 (injectSocket), because ssh2 has no login grace
 * timer, no cap on unauthenticated connections and no per-source penalty:
 * those are decided here, before a single byte is parsed. Nagle is switched
 * off on every socket (interactive echo and request/response latency).
 */
export class SshServer {
  private readonly tcp: net.Server;
  private readonly ssh: InstanceType<typeof ssh2.Server>;
  private readonly log: Logger;
  private readonly admissions = new Map<net.Socket, Admission>();
  private unauthenticated = 0;
  /** Unauthenticated connections per source block, for maxStartupsPerSource. */
  private readonly unauthenticatedBySource = new Map<string, number>();
  /** Token buckets for maxConnectionRatePerSource, by source block, least recently used first. */
  private readonly connectionTokens = new Map<string, { tokens: number; at: number }>();
  /** When each (source block, reason) refusal was last logged, and how many were not since. */
  private readonly refusalLogged = new Map<string, { at: number; unlogged: number }>();
  /** Per-account and server-wide caps on what logged-in users hold open. */
  readonly caps: UsageCaps;
  private closing = false;

  constructor(private readonly deps: SshServerDeps) {
    this.log = deps.logger.child({ component: 'ssh' });
    this.caps = new UsageCaps(deps.config.sessions ?? DEFAULT_SESSION_LIMITS, this.log);
    if (deps.hostKeys.length === 0) {
      throw new VeshError(ErrorCodes.CONFIG_INVALID, 'no host keys: the server cannot identify itself; check hostKeysDir');
    }
    this.ssh = new Ssh2Server({
      hostKeys: deps.hostKeys.map((k) => k.privateKey),
      algorithms: SERVER_ALGORITHMS,
      ident: 'vesh',
    });
    // ssh2's internal server never listens (we inject sockets), but be safe.
    this.ssh.on('error', (err: Error) => this.log.error({ event: 'ssh.server_error', err: errorMessage(err) }));
    this.ssh.on('connection', (conn: Connection, info: ClientInfo) => this.onSshConnection(conn, info));
    this.tcp = net.createServer({ noDelay: true }, (socket) => this.onSocket(socket));
    this.tcp.on('error', (err) => this.log.error({ event: 'ssh.listen_error', err: errorMessage(err) }));
  }

  /** Start listening; resolves with the bound address (port 0 in the config picks a free port). */
  listen(): Promise<{ host: string; port: number }> {
    const { host, port } = this.deps.config.listen;
    return new Promise((resolve, reject) => {
      const onError = (err: NodeJS.ErrnoException) => {
        const hint = err.code === 'EADDRINUSE' ? 'another program (or another vesh) uses it: stop it or change "listen" in vesh.yaml'
          : err.code === 'EACCES' ? 'ports below 1024 need root' : 'check "listen" in vesh.yaml';
        reject(new VeshError(ErrorCodes.CONFIG_INVALID, `cannot listen on ${host}:${port}: ${err.message}; ${hint}`, { cause: err }));
      };
      this.tcp.once('error', onError);
      this.tcp.listen({ host, port }, () => {
        this.tcp.removeListener('error', onError);
        const a = this.address();
        this.log.info({ event: 'ssh.listening', host: a.host, port: a.port });
        resolve(a);
      });
    });
  }

  address(): { host: string; port: number } {
    const a = this.tcp.address();
    if (!a || typeof a === 'string') return { host: this.deps.config.listen.host, port: this.deps.config.listen.port };
    return { host: a.address, port: a.port };
  }

  /** Connections now open, and how many of them have not authenticated yet. */
  stats(): { connections: number; unauthenticated: number } {
    return { connections: this.admissions.size, unauthenticated: this.unauthenticated };
  }

  private onSocket(socket: net.Socket): void {
    socket.setNoDelay(true);
    socket.on('error', (err) => this.log.debug({ event: 'ssh.socket_error', err: errorMessage(err) }));
    const source = normalizeAddress(socket.remoteAddress);
    const block = sourceBlock(source);
    const refuse = (reason: string, extra: Record<string, unknown> = {}) => {
      this.logRefusal(block, reason, { source, port: socket.remotePort, reason, ...extra });
      socket.destroy();
    };
    if (this.closing) return refuse('server shutting down');
    const penalty = this.deps.authenticator.penaltyRemaining(source);
    if (penalty > 0) return refuse('source penalized after failed logins', { penaltyMs: penalty });
    const rate = this.deps.config.auth.maxConnectionRatePerSource ?? DEFAULT_CONNECTION_RATE_PER_SOURCE;
    if (!this.takeConnectionToken(block, rate)) return refuse('source connects too fast (maxConnectionRatePerSource)', { maxConnectionRatePerSource: rate });
    const max = this.deps.config.auth.maxStartups;
    if (this.unauthenticated >= max) return refuse('too many unauthenticated connections (maxStartups)', { maxStartups: max });
    const perSource = this.deps.config.auth.maxStartupsPerSource;
    const fromSource = this.unauthenticatedBySource.get(block) ?? 0;
    if (fromSource >= perSource) return refuse('too many unauthenticated connections from this source (maxStartupsPerSource)', { maxStartupsPerSource: perSource, block });

    const adm: Admission = {
      id: randomBytes(4).toString('hex'),
      socket,
      source,
      block,
      acceptedAt: Date.now(),
      unauthenticated: true,
      graceTimer: null,
      connection: null,
      firstBytes: null,
      struck: false,
    };
    this.unauthenticated += 1;
    this.unauthenticatedBySource.set(block, fromSource + 1);
    this.admissions.set(socket, adm);
    this.log.info({ event: 'ssh.connection', conn: adm.id, source, port: socket.remotePort });

    adm.graceTimer = setTimeout(() => {
      this.log.warn({ event: 'ssh.login_grace_timeout', conn: adm.id, source, graceMs: this.deps.config.auth.loginGraceTimeMs, stage: adm.connection ? 'authentication' : 'identification/key exchange' });
      this.strike(adm, 'grace_timeout');
      socket.destroy();
    }, this.deps.config.auth.loginGraceTimeMs);
    adm.graceTimer.unref();

    socket.once('close', () => {
      const wasUnauthenticated = adm.unauthenticated;
      this.leavePreAuth(adm);
      this.admissions.delete(socket);
      if (!adm.connection) {
        // ssh2 drops a connection whose first line is not an SSH
        // identification without telling anyone; say what we saw.
        const first = adm.firstBytes ? JSON.stringify(adm.firstBytes.subarray(0, 64).toString('latin1')) : null;
        this.log.info({ event: 'ssh.connection_closed', conn: adm.id, source, stage: 'before identification', bytesReceived: socket.bytesRead, firstBytes: first, durationMs: Date.now() - adm.acceptedAt });
        // A bare TCP probe (connect, close, nothing sent) is not held against
        // its source: load balancers and monitors do that.
        if (socket.bytesRead > 0) this.strike(adm, 'garbage');
      } else if (wasUnauthenticated) {
        if (adm.connection.protocolError) this.strike(adm, 'protocol_error');
        else if (!adm.connection.keyExchangeDone) this.strike(adm, 'key_exchange_incomplete');
        // Key exchange done (a host-key signature spent), then gone without
        // logging in and without a failed attempt already held against it:
        // what a scanner or a handshake flood does (OpenSSH 9.8's "noauth"
        // penalty; review M4).
        else if (adm.connection.authFailuresRecorded === 0) this.strike(adm, 'noauth');
      }
    });

    this.ssh.injectSocket(socket);
    // Registered after ssh2 paused the socket, so this does not start the flow
    // early; ssh2's own listener sees the same chunk.
    socket.once('data', (d: Buffer) => {
      if (!adm.connection) adm.firstBytes = Buffer.from(d.subarray(0, 64));
    });
  }

  /**
   * One token of `block`'s allowance of new connections: a token bucket of
   * CONNECTION_BURST_SECONDS × rate tokens refilled at `rate` per second.
   * Every handshake costs a host-key signature on the shared event loop, so
   * a source opening more is refused before a byte is parsed.
   */
  private takeConnectionToken(block: string, rate: number): boolean {
    const now = Date.now();
    const burst = rate * CONNECTION_BURST_SECONDS;
    const b = this.connectionTokens.get(block) ?? { tokens: burst, at: now };
    b.tokens = Math.min(burst, b.tokens + ((now - b.at) / 1000) * rate);
    b.at = now;
    const ok = b.tokens >= 1;
    if (ok) b.tokens -= 1;
    this.connectionTokens.delete(block);
    this.connectionTokens.set(block, b);
    if (this.connectionTokens.size > MAX_RATE_SOURCES) this.connectionTokens.delete(this.connectionTokens.keys().next().value as string);
    return ok;
  }

  /**
   * A refused connection is logged, but a source that keeps knocking while
   * refused gets one line per reason per interval (with how many were
   * refused in between), so the refusals cannot flood the log either.
   */
  private logRefusal(block: string, reason: string, fields: Record<string, unknown>): void {
    const key = `${block} ${reason}`;
    const now = Date.now();
    const last = this.refusalLogged.get(key);
    if (last && now - last.at < REFUSAL_LOG_INTERVAL_MS) {
      last.unlogged += 1;
      return;
    }
    this.refusalLogged.delete(key);
    this.refusalLogged.set(key, { at: now, unlogged: 0 });
    if (this.refusalLogged.size > MAX_RATE_SOURCES) this.refusalLogged.delete(this.refusalLogged.keys().next().value as string);
    this.log.warn({ event: 'ssh.connection_refused', ...fields, ...(last ? { refusedSinceLastLine: last.unlogged } : {}) });
  }

  /**
   * End the open connections of accounts that `why` names a reason for
   * (serve calls it after accounts.yaml was reloaded: a locked or deleted
   * account loses its connections). Returns how many were ended.
   */
  endConnectionsOf(why: (account: string) => string | null): number {
    let n = 0;
    for (const a of this.admissions.values()) {
      const account = a.connection?.account;
      if (!account) continue;
      const reason = why(account);
      if (reason === null) continue;
      a.connection!.endByAdmin(reason);
      n += 1;
    }
    return n;
  }

  private leavePreAuth(adm: Admission): void {
    if (adm.graceTimer) clearTimeout(adm.graceTimer);
    adm.graceTimer = null;
    if (adm.unauthenticated) {
      adm.unauthenticated = false;
      this.unauthenticated -= 1;
      const n = (this.unauthenticatedBySource.get(adm.block) ?? 1) - 1;
      if (n > 0) this.unauthenticatedBySource.set(adm.block, n);
      else this.unauthenticatedBySource.delete(adm.block);
    }
  }

  /**
   * Count a connection that never logged in against its source, as
   * OpenSSH's PerSourcePenalties do for grace-exceeded and noauth: holding a
   * pre-auth slot to the end of the grace time, or feeding the parser
   * garbage, is what a scanner or a slot-squatter does. Failed passwords and
   * signatures are counted by the authentication phase itself.
   */
  private strike(adm: Admission, kind: PreAuthFailure): void {
    if (adm.struck) return;
    adm.struck = true;
    this.log.info({ event: 'ssh.preauth_failure', conn: adm.id, source: adm.source, kind });
    this.deps.authenticator.recordFailure(adm.source);
  }

  private onSshConnection(conn: Connection, info: ClientInfo): void {
    const socket = (conn as unknown as { _sock: net.Socket })._sock;
    const adm = this.admissions.get(socket);
    if (!adm) {
      // Not a socket we admitted (cannot happen: we are ssh2's only source).
      conn.on('error', () => undefined);
      conn.end();
      return;
    }
    adm.firstBytes = null;
    const source = normalizeAddress(info.ip);
    const log = this.log.child({ conn: adm.id });
    log.info({ event: 'ssh.identification', source, client: String(info.header?.identRaw ?? '').slice(0, 128) });
    adm.connection = new SshConnection(adm.id, conn, { ...info, ip: source }, socket, {
      authenticator: this.deps.authenticator,
      ves: this.deps.ves,
      maxAuthTries: this.deps.config.auth.maxAuthTries,
      caps: this.caps,
      maxSessions: this.deps.config.sessions?.maxSessions,
    }, log, {
      onAuthenticated: () => this.leavePreAuth(adm),
    });
  }

  /**
   * Stop: no new connections; every session is hung up and its client told
   * how it ended; connections get a disconnect message. VEs keep running.
   */
  async close(timeoutMs = 5000): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const stopped = new Promise<void>((r) => this.tcp.close(() => r()));
    const conns = [...this.admissions.values()];
    this.log.info({ event: 'ssh.shutdown', connections: conns.length });
    await Promise.all(conns.map(async (a) => {
      if (a.connection) await a.connection.shutdown(Math.max(500, timeoutMs - 1000));
      else a.socket.destroy();
    }));
    // Whatever did not close after the goodbye is cut.
    const deadline = Date.now() + 1000;
    while (this.admissions.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    for (const a of this.admissions.values()) a.socket.destroy();
    await stopped;
  }
}
