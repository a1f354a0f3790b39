import { closeFd } from '../system/fdpass.js';
import type { PseudoTtyInfo, ServerChannel, Session, WindowChangeInfo } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import { errorMessage, isVeshError } from '../errors.js';
import { BrokerRefusal, type ConnectionBroker } from '../worker/broker-client.js';
import type { AgentForwarding } from './agent-forwarding.js';
import type { CappedLog } from './capped-log.js';
import { acceptClientEnv, sanitizeTerm } from './environment.js';
import { CLIENT_SIGNALS, type ExitReport } from './exit-status.js';
import { ENV_LIMITS, MAX_COMMAND_LENGTH, clampPtySize } from './limits.js';
import { pipeProcess, ptyProcess, tappedTerminalProcess, type SessionProcess } from './session-process.js';
import { SFTP_SERVER_PATH, sftpStderrHandler } from './sftp.js';

/** What a session needs from its connection. */
export interface SessionContext {
  /** The broker, for this connection: it starts the process and hands back descriptors. */
  broker: ConnectionBroker;
  /** This session's number on its connection (the broker's key for it). */
  id: number;
  /** The key that logged in said no-pty. */
  noPty: boolean;
  /** The connection's agent forwarding (ssh -A); null before login. */
  agent?: AgentForwarding | null;
  /** Audit logger, already bound to the connection and account. */
  log: Logger;
  /** For lines a client can cause at will (refusals, clamps, signals): capped per connection. */
  noisy: Pick<CappedLog, 'info'>;
  /** Whether the connection's socket is gone: then a closing channel was dropped, not closed by the client. */
  transportGone?: () => boolean;
}

type StartKind = 'shell' | 'exec' | 'subsystem';

interface PtyRequest {
  term: string;
  cols: number;
  rows: number;
}

/**
 * One session channel: collects env and pty requests, then runs exactly one
 * shell, command or subsystem inside the account's VE, as the account's VE
 * user, and relays it until it ends or the client closes the channel.
 *
 * Requests served: env (TERM, LANG, LC_*), pty-req, window-change, shell,
 * exec, subsystem (sftp only), signal, auth-agent-req@openssh.com (the
 * broker decides; agent-forwarding.ts). ssh2 refuses everything else (x11)
 * on its own; ssh2-guards logs the unknown ones.
 */
export class SessionChannel {
  private readonly env = new Map<string, string>();
  private pty: PtyRequest | null = null;
  private proc: SessionProcess | null = null;
  private channel: ServerChannel | null = null;
  private closed = false;
  private startedAt = 0;
  private kind: StartKind | null = null;
  private ended = false;
  private resolveDone!: () => void;
  /** Resolves when the session's process has ended and the client was told (or nothing ever ran). */
  readonly done = new Promise<void>((r) => {
    this.resolveDone = r;
  });

  constructor(private readonly session: Session, private readonly ctx: SessionContext, private readonly onClosed: () => void) {
    session.on('error', (err: Error) => ctx.log.debug({ event: 'ssh.session_error', err: errorMessage(err) }));
    session.on('env', (accept, reject, info) => this.onEnv(accept, reject, info.key, info.val));
    session.on('pty', (accept, reject, info) => this.onPty(accept, reject, info));
    session.on('window-change', (accept, reject, info) => this.onWindowChange(accept, reject, info));
    session.on('signal', (accept, reject, info) => this.onSignal(accept, reject, info.name));
    session.on('auth-agent', (accept, reject) => this.onAuthAgent(accept, reject));
    session.on('shell', (accept, reject) => void this.start('shell', accept, reject));
    session.on('exec', (accept, reject, info) => void this.start('exec', accept, reject, info.command));
    session.on('subsystem', (accept, reject, info) => void this.start('subsystem', accept, reject, info.name));
    session.on('close', () => this.close());
  }

  /** Tell the session's user something on its stderr (the terminal, with a pty): e.g. why it is being hung up. */
  notify(text: string): void {
    if (this.channel && !this.ended && !this.closed) this.channel.stderr.write(text);
  }

  /** Hang up whatever runs in this session (client closed it, or the connection went away). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    // The broker hangs the process up (SIGHUP, then SIGKILL); a process that
    // never started (VE still booting) will not start now.
    if (this.kind) this.ctx.broker.closeSession(this.ctx.id, this.ctx.transportGone?.() ?? false);
    if (this.proc) this.proc.close();
    this.resolveDone();
    this.onClosed();
  }

  /**
   * The broker says the process ended. That frame can be read in the same
   * batch as the answer that started it, before the code waiting for that
   * answer ran: then it is kept until the process is set up.
   */
  exited(report: ExitReport): void {
    if (this.proc) this.proc.exited(report);
    else this.earlyExit = report;
  }
  private earlyExit: ExitReport | null = null;

  private onEnv(accept: (() => void) | undefined, reject: (() => void) | undefined, name: string, value: string): void {
    if (this.kind || this.env.size >= ENV_LIMITS.maxVars || !acceptClientEnv(String(name), String(value))) {
      this.ctx.log.debug({ event: 'ssh.env_refused', name: String(name).slice(0, 64) });
      reject?.();
      return;
    }
    this.env.set(name, value);
    accept?.();
  }

  private onPty(accept: (() => void) | undefined, reject: (() => void) | undefined, info: PseudoTtyInfo): void {
    if (this.kind || this.pty) {
      reject?.();
      return;
    }
    // no-pty on the key that logged in (restrict implies it) refuses terminals.
    if (this.ctx.noPty) {
      this.ctx.noisy.info({ event: 'ssh.pty_refused', reason: 'no-pty key option' });
      reject?.();
      return;
    }
    const size = clampPtySize(info.cols, info.rows);
    if (size.clamped) this.ctx.noisy.info({ event: 'ssh.pty_size_clamped', asked: { cols: info.cols, rows: info.rows }, used: size });
    this.pty = { term: sanitizeTerm(info.term), cols: size.cols, rows: size.rows };
    accept?.();
  }

  private onWindowChange(accept: (() => void) | undefined, reject: (() => void) | undefined, info: WindowChangeInfo): void {
    if (!this.pty) {
      reject?.();
      return;
    }
    const size = clampPtySize(info.cols, info.rows);
    if (size.clamped) this.ctx.noisy.info({ event: 'ssh.pty_size_clamped', asked: { cols: info.cols, rows: info.rows }, used: size });
    this.pty.cols = size.cols;
    this.pty.rows = size.rows;
    this.proc?.resize(size.cols, size.rows);
    accept?.();
  }

  private onAuthAgent(accept: (() => void) | undefined, reject: (() => void) | undefined): void {
    const agent = this.ctx.agent;
    if (!agent || this.kind) {
      reject?.();
      return;
    }
    void agent.request().then((ok) => (ok ? accept?.() : reject?.()));
  }

  private onSignal(accept: (() => void) | undefined, reject: (() => void) | undefined, name: string): void {
    const sig = String(name).replace(/^SIG/, '');
    if (!this.proc || !CLIENT_SIGNALS.has(sig)) {
      this.ctx.noisy.info({ event: 'ssh.signal_refused', signal: String(name).slice(0, 16) });
      reject?.();
      return;
    }
    this.ctx.noisy.info({ event: 'ssh.signal', signal: sig });
    this.ctx.broker.signal(this.ctx.id, sig).catch(() => undefined);
    accept?.();
  }

  private async start(kind: StartKind, accept: () => ServerChannel, reject: (() => void) | undefined, detail?: string): Promise<void> {
    if (this.kind || this.closed) {
      reject?.();
      return;
    }
    if (kind === 'subsystem' && detail !== 'sftp') {
      this.ctx.noisy.info({ event: 'ssh.subsystem_refused', subsystem: String(detail).slice(0, 64) });
      reject?.();
      return;
    }
    if (kind === 'exec' && (detail === undefined || detail.length > MAX_COMMAND_LENGTH || detail.includes('\0'))) {
      this.ctx.noisy.info({ event: 'ssh.exec_refused', reason: 'command empty, too long or with NUL', length: detail?.length ?? 0 });
      reject?.();
      return;
    }
    this.kind = kind;
    const channel = accept();
    this.channel = channel;
    channel.on('error', (err: Error) => this.ctx.log.debug({ event: 'ssh.channel_error', err: errorMessage(err) }));
    channel.stderr.on('error', () => undefined);
    channel.on('close', () => this.close());
    this.startedAt = Date.now();

    const env: Record<string, string> = {};
    for (const [k, v] of this.env) env[k] = v;
    const size = this.pty ? clampPtySize(this.pty.cols, this.pty.rows) : undefined;
    // An agent request still on its way: the broker gives the session SSH_AUTH_SOCK only once the socket is there.
    await this.ctx.agent?.pending;
    let fds: number[];
    let replay: Buffer | undefined;
    let tapped: boolean | undefined;
    try {
      ({ fds, replay, tapped } = await this.ctx.broker.openSession({
        session: this.ctx.id, kind, env,
        ...(kind === 'exec' ? { command: detail } : {}),
        ...(kind === 'subsystem' ? { subsystem: detail } : {}),
        ...(this.pty && size ? { pty: { term: this.pty.term, cols: size.cols, rows: size.rows } } : {}),
      }));
    } catch (err) {
      if (!(err instanceof BrokerRefusal)) this.ctx.log.error({ event: 'ssh.session_spawn_failed', err: errorMessage(err) });
      const msg = err instanceof BrokerRefusal ? err.message : isVeshError(err) ? err.userMessage : 'The server could not start your session.';
      await this.finish({ kind: 'status', code: 1 }, `vesh: ${msg}\r\n`);
      return;
    }
    if (this.closed) {
      for (const fd of fds) closeFd(fd);
      return;
    }
    const log = this.ctx.log;
    const onExit = (report: ExitReport) => void this.finish(report);
    if (this.pty) {
      // A re-attached held shell: what it wrote while nobody was there, before anything it writes now.
      if (replay?.length) channel.write(replay);
      // A recorded terminal: the broker holds the master and records what passes (session-recording.ts).
      this.proc = tapped
        ? tappedTerminalProcess(fds[0]!, channel, onExit, (cols, rows) => this.ctx.broker.resize(this.ctx.id, cols, rows))
        : ptyProcess(fds[0]!, channel, onExit);
    } else if (kind === 'subsystem') {
      this.proc = pipeProcess(fds, channel, (report) => {
        if (report.kind === 'status' && report.code === 127) {
          log.error({ event: 'sftp.server_missing', path: SFTP_SERVER_PATH }, `${SFTP_SERVER_PATH} is missing in the VE: install openssh-sftp-server in its template or inside the VE`);
          void this.finish(report, `vesh: SFTP is not available: ${SFTP_SERVER_PATH} is not installed in your environment (apt-get install openssh-sftp-server).\r\n`);
          return;
        }
        onExit(report);
      }, { onStderr: sftpStderrHandler(log) });
    } else {
      this.proc = pipeProcess(fds, channel, onExit);
    }
    if (this.earlyExit) this.proc.exited(this.earlyExit);
  }

  /**
   * End the channel as OpenSSH does: every byte of output delivered first,
   * then exit-status or exit-signal, then EOF and close.
   */
  private async finish(report: ExitReport, message?: string): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    const channel = this.channel;
    const durationMs = Date.now() - this.startedAt;
    // The broker logs ssh.session_end (it ran the process); this is the client's side of it.
    this.ctx.log.debug({ event: 'ssh.session_told', kind: this.kind, durationMs, ...(report.kind === 'status' ? { exitStatus: report.code } : { exitSignal: report.signal }) });
    if (!channel) {
      this.resolveDone();
      return;
    }
    try {
      if (message) channel.stderr.write(message);
      await flushed(channel);
      if (report.kind === 'status') channel.exit(report.code);
      else channel.exit(report.signal, false, '');
      channel.end();
    } catch (err) {
      this.ctx.log.debug({ event: 'ssh.session_finish_error', err: errorMessage(err) });
    }
    this.resolveDone();
  }
}

/**
 * Resolve once everything written so far to the channel and to its stderr
 * has gone out (a write's callback runs after all earlier writes completed).
 * Gives up after a while when the client stopped reading (window 0 forever).
 */
function flushed(channel: ServerChannel): Promise<void> {
  const one = (w: NodeJS.WritableStream) => new Promise<void>((resolve) => {
    if (!(w as unknown as { writable: boolean }).writable) return resolve();
    w.write(Buffer.alloc(0), () => resolve());
  });
  return Promise.race([
    Promise.all([one(channel), one(channel.stderr)]).then(() => undefined),
    new Promise<void>((r) => setTimeout(r, 30_000).unref()),
  ]);
}
