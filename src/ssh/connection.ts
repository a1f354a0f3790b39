import type net from 'node:net';
import type { ClientInfo, Connection, ServerChannel, Session, TcpipBindInfo, TcpipRequestInfo } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import type { VeAccess } from '../ve/access.js';
import { ConnectionAuthentication, type AuthResult } from './authentication.js';
import { CappedLog } from './capped-log.js';
import { ConnectionForwarding } from './forwarding.js';
import {
  MAX_CHANNELS_PER_CONNECTION, MAX_REFUSAL_LOGS_PER_CONNECTION, MAX_REFUSED_CHANNEL_OPENS, MAX_SESSIONS_PER_CONNECTION,
} from './limits.js';
import { prepareLogin, type LoginContext } from './login.js';
import type { SshAuthenticator } from './ports.js';
import { SessionChannel } from './session.js';
import { installProtocolGuards } from './ssh2-guards.js';
import type { CapRefusal, UsageCaps } from './usage-caps.js';

/** How long a connection whose VE failed may stay open for the user to read why, when no session asks. */
const LOGIN_FAILURE_LINGER_MS = 10_000;

/** How long a connection refused by a cap stays open for its first session to be told why. */
const CAP_REFUSAL_LINGER_MS = 5_000;

export interface ConnectionDeps {
  authenticator: SshAuthenticator;
  ves: VeAccess;
  maxAuthTries: number;
  /** Per-account and server-wide caps on connections, sessions and forward helpers. */
  caps: UsageCaps;
  /** Session channels per connection (sessions.maxSessions); MAX_SESSIONS_PER_CONNECTION when not given. */
  maxSessions?: number;
}

export interface ConnectionHooks {
  /** Authentication succeeded: the connection no longer counts against MaxStartups or the grace timer. */
  onAuthenticated(): void;
}

/**
 * One SSH connection after its identification line arrived: authentication,
 * then the channels it opens (sessions, -L) and its global requests (-R).
 * The limits per connection (sessions, channels, refused opens) live here.
 */
export class SshConnection {
  private readonly startedAt = Date.now();
  private log: Logger;
  private readonly auth: ConnectionAuthentication;
  private result: AuthResult | null = null;
  private loginPromise: Promise<LoginContext> | null = null;
  private readonly sessions = new Set<SessionChannel>();
  private sessionCount = 0;
  private channelCount = 0;
  private refusedOpens = 0;
  /** Client-caused log lines (refusals, clamps, signals), capped per connection. */
  private readonly noisy: CappedLog;
  /** Set when a cap refused this connection after it authenticated: it runs nothing and ends soon. */
  private capRefusal: CapRefusal | null = null;
  /** This connection is counted in the caps (as a connection; and with a forward helper). */
  private countedAccount: string | null = null;
  private helperCounted = false;
  private forwarding: ConnectionForwarding | null = null;
  private closed = false;
  /** The first key exchange completed (ssh2's 'handshake'). */
  keyExchangeDone = false;
  /** What ssh2 reported when it gave up on the client's bytes (a bad packet, a failed key exchange); null = none. */
  protocolError: string | null = null;

  constructor(
    readonly id: string,
    private readonly conn: Connection,
    private readonly info: ClientInfo,
    private readonly socket: net.Socket,
    private readonly deps: ConnectionDeps,
    baseLog: Logger,
    private readonly hooks: ConnectionHooks,
  ) {
    this.log = baseLog;
    this.noisy = new CappedLog(() => this.log, MAX_REFUSAL_LOGS_PER_CONNECTION);
    installProtocolGuards(conn, {
      onViolation: (what, details, fatal) => this.log.warn({ event: 'ssh.protocol_violation', what, fatal, ...details }),
      onUnknownRequest: (kind, type) => this.noisy.info({ event: 'ssh.request_refused', kind, type: type.slice(0, 64) }),
    });
    this.auth = new ConnectionAuthentication(deps.authenticator, deps.maxAuthTries, info.ip, this.log, () => this.drop('too many authentication failures'));
    conn.on('handshake', () => {
      this.keyExchangeDone = true;
    });
    conn.on('error', (err: Error & { level?: string; code?: unknown }) => this.onError(err));
    conn.on('authentication', (ctx) => this.auth.handle(ctx));
    conn.on('ready', () => this.onReady());
    conn.on('session', (accept, reject) => this.onSession(accept, reject));
    conn.on('tcpip', (accept, reject, i) => this.onTcpip(accept, reject, i));
    conn.on('request', (accept, reject, name, i) => this.onRequest(accept, reject, name, i as TcpipBindInfo));
    conn.on('close', () => this.onClose());
  }

  /**
   * ssh2 reports a client it cannot parse (a packet over its 35000-byte
   * limit, a broken MAC, a key exchange with nothing in common) with an
   * 'error' and only half-closes the socket (end()), so a client that never
   * closes its side would keep the descriptor and go on being parsed. Such a
   * client is cut here. A peer's own DISCONNECT also arrives as an 'error'
   * (with a numeric reason code): that is a goodbye, not a protocol fault.
   */
  private onError(err: Error & { level?: string; code?: unknown }): void {
    const peerDisconnect = typeof err.code === 'number';
    const message = errorMessage(err);
    if (peerDisconnect || err.level === 'socket') {
      this.log.info({ event: 'ssh.connection_error', err: message, level: err.level, peerDisconnect });
      return;
    }
    this.protocolError ??= message;
    if (message.startsWith('Bad packet length')) {
      this.log.warn({ event: 'ssh.protocol_violation', what: 'bad_packet_length', fatal: true, authenticated: this.authenticated }, 'packet length over the limit (or malformed): dropping the connection');
    } else {
      this.log.info({ event: 'ssh.connection_error', err: message, level: err.level, keyExchangeDone: this.keyExchangeDone });
    }
    setImmediate(() => this.socket.destroy());
  }

  get authenticated(): boolean {
    return this.result !== null;
  }

  /** The account logged in on this connection, or null before login. */
  get account(): string | null {
    return this.result?.account.name ?? null;
  }

  /** Failures of this connection's login attempts already held against its source. */
  get authFailuresRecorded(): number {
    return this.auth.recordedFailures;
  }

  private onReady(): void {
    const result = this.auth.result;
    if (!result) {
      // ssh2 said "ready" without our accept: cannot happen, but never run a session for nobody.
      this.drop('ready without an accepted authentication');
      return;
    }
    this.result = result;
    this.hooks.onAuthenticated();
    this.log = this.log.child({ account: result.account.name, ve: result.account.ve });
    const key = result.key;
    const refused = this.deps.caps.admit('connection', result.account.name);
    if (refused) {
      // Logged in, but over a cap: nothing is prepared or started for it.
      // Its first session is told why (the client shows that text), then it ends.
      this.capRefusal = refused;
      this.log.info({ event: 'ssh.login', method: result.method, fingerprint: key?.fingerprint, source: this.info.ip, refused: refused.setting });
      setTimeout(() => this.end(), CAP_REFUSAL_LINGER_MS).unref();
      return;
    }
    this.countedAccount = result.account.name;
    const refusal = !result.account.forwarding ? 'forwarding is off for this account' : key?.options.noPortForwarding ? 'no-port-forwarding key option' : null;
    const connection = { clientIp: this.info.ip, clientPort: this.info.port, serverIp: this.socket.localAddress ?? '', serverPort: this.socket.localPort ?? 0 };
    const login = prepareLogin(this.deps.ves, result.account, connection, this.log);
    this.loginPromise = login;
    login.catch(() => {
      setTimeout(() => this.end(), LOGIN_FAILURE_LINGER_MS).unref();
    });
    this.forwarding = new ConnectionForwarding({
      conn: this.conn,
      ves: this.vesWithHelperCap(result.account.name),
      login: () => login,
      log: this.log,
      refusal,
      reserveChannel: () => this.reserveChannel(false),
      releaseChannel: () => this.releaseChannel(false),
    });
    this.log.info({ event: 'ssh.login', method: result.method, fingerprint: key?.fingerprint, source: this.info.ip });
  }

  private onSession(accept: () => Session, reject: () => void): void {
    if (!this.result || this.closed) {
      reject();
      return;
    }
    if (this.capRefusal) {
      this.refuseSession(accept, reject, this.capRefusal);
      return;
    }
    if (!this.loginPromise || !this.reserveChannel(true)) {
      reject();
      return;
    }
    const account = this.result.account.name;
    const refused = this.deps.caps.admit('session', account);
    if (refused) {
      this.releaseChannel(true);
      this.refuseSession(accept, reject, refused);
      return;
    }
    const login = this.loginPromise;
    let session: SessionChannel | null = null;
    const s = accept();
    session = new SessionChannel(s, {
      ves: this.deps.ves,
      login: () => login,
      key: this.result.key,
      log: this.log,
      noisy: this.noisy,
      onLoginFailed: () => setTimeout(() => this.end(), 200).unref(),
    }, () => {
      if (session && this.sessions.delete(session)) {
        this.releaseChannel(true);
        this.deps.caps.release('session', account);
      }
    });
    this.sessions.add(session);
  }

  /**
   * A session refused by a cap: the channel is opened only to tell the
   * client why (an SSH channel-open failure carries no text OpenSSH shows),
   * then it exits 1. Nothing runs; it holds a channel slot until it closes,
   * so refusals count against the per-connection channel caps too.
   */
  private refuseSession(accept: () => Session, reject: () => void, refusal: CapRefusal): void {
    if (!this.reserveChannel(false)) {
      reject();
      return;
    }
    this.refusedOpens += 1;
    if (this.refusedOpens > MAX_REFUSED_CHANNEL_OPENS) {
      this.releaseChannel(false);
      reject();
      this.drop('channel-open flood');
      return;
    }
    const s = accept();
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      this.releaseChannel(false);
    };
    const tell = (start: () => ServerChannel) => {
      const channel = start();
      channel.on('error', () => undefined);
      channel.stderr.on('error', () => undefined);
      channel.stderr.write(`vesh: ${refusal.userMessage}\r\n`);
      channel.exit(1);
      channel.end();
    };
    s.on('error', () => undefined);
    s.on('close', release);
    // Accepted so the client gets as far as the request that starts something, and reads the reason there.
    s.on('pty', (ok) => ok?.());
    s.on('env', (ok) => ok?.());
    s.on('window-change', (ok) => ok?.());
    s.on('shell', (start) => tell(start));
    s.on('exec', (start) => tell(start));
    s.on('subsystem', (start) => tell(start));
  }

  /**
   * The VE access that forwarding uses, with the per-account cap on forward
   * helpers applied where a helper is asked for: a connection counts once,
   * from its first helper until it closes (it has at most one at a time).
   */
  private vesWithHelperCap(account: string): VeAccess {
    const ves = this.deps.ves;
    return {
      ensureRunning: (ve, opts) => ves.ensureRunning(ve, opts),
      lookupUser: (ve, user) => ves.lookupUser(ve, user),
      processCommand: (ve, spec) => ves.processCommand(ve, spec),
      forwardCommand: async (ve, user) => {
        if (!this.helperCounted) {
          if (this.closed) throw new VeshError(ErrorCodes.INTERNAL, 'connection closed before its forward helper started', { userMessage: 'The connection is closing.' });
          const refused = this.deps.caps.admit('forwardHelper', account);
          if (refused) {
            throw new VeshError(ErrorCodes.LIMIT_REACHED, `${refused.setting} (${refused.limit}) reached for account ${account}: no forward helper for this connection`, { userMessage: refused.userMessage });
          }
          this.helperCounted = true;
        }
        return ves.forwardCommand(ve, user);
      },
    };
  }

  /**
   * An admin locked or deleted the account (accounts.yaml reload): end this
   * connection and everything it runs. Logged once.
   */
  endByAdmin(reason: string): void {
    if (this.closed) return;
    this.log.warn({ event: 'ssh.connection_ended', reason }, `ending the connection of account ${this.account ?? '?'}: ${reason}`);
    for (const s of this.sessions) s.close();
    this.forwarding?.close();
    this.end();
    // A client that does not answer the disconnect is cut.
    setTimeout(() => this.socket.destroy(), 1_000).unref();
  }

  private onTcpip(accept: () => ServerChannel, reject: () => void, info: TcpipRequestInfo): void {
    if (!this.forwarding || this.closed) {
      reject();
      return;
    }
    this.forwarding.onDirectTcpip(accept, reject, info);
  }

  private onRequest(accept: ((port?: number) => void) | undefined, reject: (() => void) | undefined, name: string, info: TcpipBindInfo): void {
    if (!this.forwarding || this.closed || (name !== 'tcpip-forward' && name !== 'cancel-tcpip-forward')) {
      reject?.();
      return;
    }
    this.forwarding.onGlobalRequest(accept, reject, name, info);
  }

  /** Count a channel against the per-connection caps; false = refuse it. */
  private reserveChannel(session: boolean): boolean {
    const maxSessions = this.deps.maxSessions ?? MAX_SESSIONS_PER_CONNECTION;
    if (this.channelCount >= MAX_CHANNELS_PER_CONNECTION || (session && this.sessionCount >= maxSessions)) {
      this.refusedOpens += 1;
      this.noisy.info({ event: 'ssh.channel_refused', reason: session ? `too many sessions on this connection (sessions.maxSessions ${maxSessions})` : 'too many channels', sessions: this.sessionCount, channels: this.channelCount });
      if (this.refusedOpens > MAX_REFUSED_CHANNEL_OPENS) this.drop('channel-open flood');
      return false;
    }
    this.channelCount += 1;
    if (session) this.sessionCount += 1;
    return true;
  }

  private releaseChannel(session: boolean): void {
    this.channelCount = Math.max(0, this.channelCount - 1);
    if (session) this.sessionCount = Math.max(0, this.sessionCount - 1);
  }

  /** Close the connection politely (SSH disconnect message, then the socket). */
  end(): void {
    try {
      this.conn.end();
    } catch { /* socket already gone */ }
  }

  /** Cut a misbehaving connection. */
  drop(reason: string): void {
    this.log.warn({ event: 'ssh.connection_dropped', reason });
    this.end();
    this.socket.destroy();
  }

  /**
   * Server shutdown: hang up every session (processes inside the VE get
   * SIGHUP, as when a terminal closes), let each tell its client how its
   * process ended, then say goodbye. The VE keeps running.
   */
  async shutdown(timeoutMs: number): Promise<void> {
    const done = [...this.sessions].map((s) => s.done);
    for (const s of this.sessions) s.close();
    this.forwarding?.close();
    await Promise.race([Promise.all(done), new Promise((r) => setTimeout(r, timeoutMs).unref())]);
    this.end();
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    for (const s of this.sessions) s.close();
    this.sessions.clear();
    this.forwarding?.close();
    if (this.countedAccount !== null) {
      this.deps.caps.release('connection', this.countedAccount);
      if (this.helperCounted) this.deps.caps.release('forwardHelper', this.countedAccount);
    }
    this.log.info({ event: 'ssh.connection_closed', durationMs: Date.now() - this.startedAt, authenticated: this.result !== null, ...(this.noisy.suppressed > 0 ? { logLinesSuppressed: this.noisy.suppressed } : {}) });
  }
}
