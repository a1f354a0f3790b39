import type net from 'node:net';
import type { ClientInfo, Connection, ServerChannel, Session, TcpipBindInfo, TcpipRequestInfo } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import { errorMessage } from '../errors.js';
import type { VeAccess } from '../ve/access.js';
import { ConnectionAuthentication, type AuthResult } from './authentication.js';
import { ConnectionForwarding } from './forwarding.js';
import {
  MAX_CHANNELS_PER_CONNECTION, MAX_REFUSAL_LOGS_PER_CONNECTION, MAX_REFUSED_CHANNEL_OPENS, MAX_SESSIONS_PER_CONNECTION,
} from './limits.js';
import { prepareLogin, type LoginContext } from './login.js';
import type { SshAuthenticator } from './ports.js';
import { SessionChannel } from './session.js';
import { installProtocolGuards } from './ssh2-guards.js';

/** How long a connection whose VE failed may stay open for the user to read why, when no session asks. */
const LOGIN_FAILURE_LINGER_MS = 10_000;

export interface ConnectionDeps {
  authenticator: SshAuthenticator;
  ves: VeAccess;
  maxAuthTries: number;
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
  private refusalLogs = 0;
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
    installProtocolGuards(conn, {
      onViolation: (what, details, fatal) => this.log.warn({ event: 'ssh.protocol_violation', what, fatal, ...details }),
      onUnknownRequest: (kind, type) => this.logRefusal({ event: 'ssh.request_refused', kind, type: type.slice(0, 64) }),
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
    const refusal = !result.account.forwarding ? 'forwarding is off for this account' : key?.options.noPortForwarding ? 'no-port-forwarding key option' : null;
    const connection = { clientIp: this.info.ip, clientPort: this.info.port, serverIp: this.socket.localAddress ?? '', serverPort: this.socket.localPort ?? 0 };
    const login = prepareLogin(this.deps.ves, result.account, connection, this.log);
    this.loginPromise = login;
    login.catch(() => {
      setTimeout(() => this.end(), LOGIN_FAILURE_LINGER_MS).unref();
    });
    this.forwarding = new ConnectionForwarding({
      conn: this.conn,
      ves: this.deps.ves,
      login: () => login,
      log: this.log,
      refusal,
      reserveChannel: () => this.reserveChannel(false),
      releaseChannel: () => this.releaseChannel(false),
    });
    this.log.info({ event: 'ssh.login', method: result.method, fingerprint: key?.fingerprint, source: this.info.ip });
  }

  private onSession(accept: () => Session, reject: () => void): void {
    if (!this.result || !this.loginPromise || this.closed || !this.reserveChannel(true)) {
      reject();
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
      onLoginFailed: () => setTimeout(() => this.end(), 200).unref(),
    }, () => {
      if (session && this.sessions.delete(session)) this.releaseChannel(true);
    });
    this.sessions.add(session);
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
    if (this.channelCount >= MAX_CHANNELS_PER_CONNECTION || (session && this.sessionCount >= MAX_SESSIONS_PER_CONNECTION)) {
      this.refusedOpens += 1;
      this.logRefusal({ event: 'ssh.channel_refused', reason: session ? 'too many sessions' : 'too many channels', sessions: this.sessionCount, channels: this.channelCount });
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

  /** Refusals are logged up to a cap per connection, so a flood cannot flood the log too. */
  private logRefusal(fields: Record<string, unknown>): void {
    this.refusalLogs += 1;
    if (this.refusalLogs <= MAX_REFUSAL_LOGS_PER_CONNECTION) this.log.info(fields);
    else if (this.refusalLogs === MAX_REFUSAL_LOGS_PER_CONNECTION + 1) this.log.warn({ event: 'ssh.refusals_suppressed' }, 'further refusals on this connection are not logged');
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
    this.log.info({ event: 'ssh.connection_closed', durationMs: Date.now() - this.startedAt, authenticated: this.result !== null });
  }
}
