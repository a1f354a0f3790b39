import type net from 'node:net';
import type { ClientInfo, Connection, ServerChannel, Session, TcpipBindInfo, TcpipRequestInfo } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import type { AuthGrant } from '../broker/request-table.js';
import { errorMessage } from '../errors.js';
import type { ConnectionBroker } from '../worker/broker-client.js';
import { ConnectionAuthentication } from './authentication.js';
import { CappedLog } from './capped-log.js';
import type { ExitReport } from './exit-status.js';
import { AgentForwarding } from './agent-forwarding.js';
import { ConnectionForwarding } from './forwarding.js';
import { RemoteNodeLink } from './remote-link.js';
import {
  MAX_CHANNELS_PER_CONNECTION, MAX_REFUSAL_LOGS_PER_CONNECTION, MAX_REFUSED_CHANNEL_OPENS, MAX_SESSIONS_PER_CONNECTION,
} from './limits.js';
import { SessionChannel } from './session.js';
import { installProtocolGuards } from './ssh2-guards.js';
import { ConnectionTimeouts, NO_TIMEOUTS, type ConnectionExpiry } from './timeouts.js';
import { correctKexGuessHandling } from './kex-guess.js';
import { rawX25519KeyExchange } from './kex-x25519.js';

/** How long a connection refused by a cap stays open for its first session to be told why. */
const CAP_REFUSAL_LINGER_MS = 5_000;

export interface ConnectionDeps {
  /** The broker, for this connection only. */
  broker: ConnectionBroker;
  /** Session channels per connection (sessions.maxSessions); MAX_SESSIONS_PER_CONNECTION when not given. */
  maxSessions?: number;
  /** How long a login carried to another cluster node may take (remote-link.ts's default when not given; tests). */
  remoteReadyTimeoutMs?: number;
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
  private result: AuthGrant | null = null;
  private readonly sessions = new Map<number, SessionChannel>();
  private nextSessionId = 1;
  private sessionCount = 0;
  private channelCount = 0;
  private refusedOpens = 0;
  /** Client-caused log lines (refusals, clamps, signals), capped per connection. */
  private readonly noisy: CappedLog;
  /** Set when a cap refused this connection after it authenticated: it runs nothing and ends soon. */
  private capRefusal: string | null = null;
  private forwarding: ConnectionForwarding | null = null;
  /** Keepalives, channel idle times, the unused-connection time (from the broker's grant). */
  private timeouts: ConnectionTimeouts | null = null;
  private agent: AgentForwarding | null = null;
  /** The account's VE lives on another cluster node (grant.remote): every channel and forward is carried there. */
  private link: RemoteNodeLink | null = null;
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
  ) {
    this.log = baseLog;
    this.noisy = new CappedLog(() => this.log, MAX_REFUSAL_LOGS_PER_CONNECTION);
    installProtocolGuards(conn, {
      onViolation: (what, details, fatal) => this.log.warn({ event: 'ssh.protocol_violation', what, fatal, ...details }),
      onUnknownRequest: (kind, type) => this.noisy.info({ event: 'ssh.request_refused', kind, type: type.slice(0, 64) }),
    });
    // Before the peer's KEXINIT is parsed: dropbear's guessed first kex packet (see kex-guess.ts).
    correctKexGuessHandling(conn);
    // curve25519-sha256 from raw keys: a third of ssh2's CPU for it (kex-x25519.ts).
    rawX25519KeyExchange(conn);
    this.auth = new ConnectionAuthentication(deps.broker, this.log, () => this.drop('too many authentication failures'));
    conn.on('handshake', () => {
      this.keyExchangeDone = true;
    });
    conn.on('error', (err: Error & { level?: string; code?: unknown }) => this.onError(err));
    conn.on('authentication', (ctx) => this.auth.handle(ctx));
    conn.on('ready', () => this.onReady());
    conn.on('session', (accept, reject) => this.onSession(accept, reject));
    conn.on('tcpip', (accept, reject, i) => this.onTcpip(accept, reject, i));
    conn.on('openssh.streamlocal', (accept, reject, i) => {
      if (this.link && !this.closed) this.link.onDirectStreamLocal(accept, reject, i);
      else if (!this.forwarding || this.closed) reject();
      else this.forwarding.onDirectStreamLocal(accept, reject, i);
    });
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
    return this.result?.account ?? null;
  }

  private onReady(): void {
    const grant = this.auth.grant;
    if (!grant) {
      // ssh2 said "ready" without the broker's yes: cannot happen, but never run a session for nobody.
      this.drop('ready without an accepted authentication');
      return;
    }
    this.result = grant;
    this.log = this.log.child({ account: grant.account, ve: grant.ve });
    if (grant.refusal) {
      // Logged in, but over a cap (the broker started nothing for it): its
      // first session is told why (the client shows that text), then it ends.
      this.capRefusal = grant.refusal;
      setTimeout(() => this.end(), CAP_REFUSAL_LINGER_MS).unref();
      return;
    }
    this.timeouts = new ConnectionTimeouts(this.conn, grant.timeouts ?? NO_TIMEOUTS, this.log, (why, message) => this.expired(why, message));
    this.timeouts.start();
    if (grant.remote) {
      this.link = new RemoteNodeLink({
        conn: this.conn,
        broker: this.deps.broker,
        log: this.log,
        noisy: this.noisy,
        node: grant.remote.node,
        noPty: grant.noPty,
        forwardingRefusal: grant.forwardingRefusal,
        agentForwardingRefusal: grant.agentForwardingRefusal === undefined ? 'the broker gave no answer on agent forwarding' : grant.agentForwardingRefusal,
        reserveChannel: (session) => this.reserveChannel(session),
        releaseChannel: (session) => this.releaseChannel(session),
        refuseSession: (accept, reject, text) => this.refuseSession(accept, reject, text),
        endClient: () => {
          this.end();
          setTimeout(() => this.socket.destroy(), 1_000).unref();
        },
        ...(this.deps.remoteReadyTimeoutMs ? { readyTimeoutMs: this.deps.remoteReadyTimeoutMs } : {}),
      });
      return;
    }
    this.forwarding = new ConnectionForwarding({
      conn: this.conn,
      broker: this.deps.broker,
      log: this.log,
      refusal: grant.forwardingRefusal,
      reserveChannel: () => this.reserveChannel(false),
      releaseChannel: () => this.releaseChannel(false),
    });
    const forwarding = this.forwarding;
    this.agent = new AgentForwarding({
      conn: this.conn,
      broker: this.deps.broker,
      log: this.log,
      reserveChannel: () => this.reserveChannel(false),
      releaseChannel: () => this.releaseChannel(false),
      relay: (channel, socket, what) => forwarding.relayChannel(channel, socket, what),
    });
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
    if (this.link) {
      this.link.onSession(accept, reject);
      return;
    }
    if (!this.reserveChannel(true)) {
      reject();
      return;
    }
    const id = this.nextSessionId++;
    const s = accept();
    const session = new SessionChannel(s, {
      broker: this.deps.broker,
      id,
      noPty: this.result.noPty,
      agent: this.agent,
      log: this.log,
      noisy: this.noisy,
      transportGone: () => this.socket.destroyed,
    }, () => {
      if (this.sessions.delete(id)) this.releaseChannel(true);
    });
    this.sessions.set(id, session);
  }

  /**
   * A timeout ended the connection. A client that stopped answering is cut
   * at once (it would not read a goodbye); an unused one is told, then cut.
   */
  private expired(why: ConnectionExpiry, message: string): void {
    if (this.closed) return;
    this.log.info({ event: 'ssh.connection_ended', reason: why }, message);
    this.end();
    if (why === 'client_alive') this.socket.destroy();
    else setTimeout(() => this.socket.destroy(), 1_000).unref();
  }

  /** The broker says something the user of a session should read (on its stderr), e.g. why it is being hung up. */
  sessionNotice(id: number, text: string): void {
    this.sessions.get(id)?.notify(text);
  }

  /** The broker says a session's process ended. */
  sessionExited(id: number, report: ExitReport): void {
    this.sessions.get(id)?.exited(report);
  }

  /** The broker passed a connection made to one of our -R listeners. */
  forwardAccepted(listener: number, fd: number, remoteAddress: string, remotePort: number): boolean {
    if (!this.forwarding || this.closed) return false;
    if (this.agent?.owns(listener)) this.agent.onAccepted(fd);
    else this.forwarding.onAccepted(listener, fd, remoteAddress, remotePort);
    return true;
  }

  /**
   * A session refused by a cap: the channel is opened only to tell the
   * client why (an SSH channel-open failure carries no text OpenSSH shows),
   * then it exits 1. Nothing runs; it holds a channel slot until it closes,
   * so refusals count against the per-connection channel caps too.
   */
  private refuseSession(accept: () => Session, reject: () => void, refusal: string): void {
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
      channel.stderr.write(`vesh: ${refusal}\r\n`);
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
   * An admin locked or deleted the account (accounts.yaml reload): end this
   * connection and everything it runs. Logged once.
   */
  endByAdmin(reason: string): void {
    if (this.closed) return;
    this.log.warn({ event: 'ssh.connection_ended', reason }, `ending the connection of account ${this.account ?? '?'}: ${reason}`);
    for (const s of this.sessions.values()) s.close();
    this.forwarding?.close();
    this.end();
    // A client that does not answer the disconnect is cut.
    setTimeout(() => this.socket.destroy(), 1_000).unref();
  }

  private onTcpip(accept: () => ServerChannel, reject: () => void, info: TcpipRequestInfo): void {
    if (this.link && !this.closed) {
      this.link.onDirectTcpip(accept, reject, info);
      return;
    }
    if (!this.forwarding || this.closed) {
      reject();
      return;
    }
    this.forwarding.onDirectTcpip(accept, reject, info);
  }

  private onRequest(accept: ((port?: number) => void) | undefined, reject: (() => void) | undefined, name: string, info: TcpipBindInfo): void {
    const forwards = ['tcpip-forward', 'cancel-tcpip-forward', 'streamlocal-forward@openssh.com', 'cancel-streamlocal-forward@openssh.com'];
    if (this.link && !this.closed && forwards.includes(name)) {
      this.link.onGlobalRequest(accept, reject, name, info);
      return;
    }
    if (!this.forwarding || this.closed || !forwards.includes(name)) {
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
    // The broker hangs up every process; each session tells its client how
    // its process ended as the exits come in.
    const done = [...this.sessions.values()].map((s) => s.done);
    this.forwarding?.close();
    await Promise.race([Promise.all(done), new Promise((r) => setTimeout(r, timeoutMs).unref())]);
    this.end();
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    this.timeouts?.stop();
    for (const s of this.sessions.values()) s.close();
    this.sessions.clear();
    this.forwarding?.close();
    this.agent?.close();
    this.link?.close();
    this.log.info({ event: 'ssh.connection_closed', durationMs: Date.now() - this.startedAt, authenticated: this.result !== null, ...(this.noisy.suppressed > 0 ? { logLinesSuppressed: this.noisy.suppressed } : {}) });
    this.onClosed?.();
  }

  /** Called once when the connection is gone (the worker tells the broker). */
  onClosed: (() => void) | null = null;
}
