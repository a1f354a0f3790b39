import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, fstatSync, openSync } from 'node:fs';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import type { HostCommand } from '../runtime/types.js';
import { isValidHost, isValidPort, isValidSocketPath, parseFromHelper, type FromHelper, type ToHelper } from '../ssh/forward-protocol.js';
import { closeFd, socketpair } from '../system/fdpass.js';
import { FrameChannel } from '../system/frame-channel.js';

const READY_TIMEOUT_MS = 15_000;
const REQUEST_TIMEOUT_MS = 20_000;
/** After stop(), how long the relay has to see its channel closed and exit before it is killed. */
const STOP_GRACE_MS = 2_000;
/** The relay's frames are a few hundred bytes; its longest ('failed', escaped message) stays under 1.5 KiB. */
const MAX_FRAME_BYTES = 4096;
/** What we read of the relay's stderr (it writes only when a start fails, and little). */
const STDERR_READ_MAX = 8192;
const STDERR_TAIL = 500;

const UNAVAILABLE = 'Port forwarding is not available right now.';

/** What an error name from the VE side must look like to be passed on (ECONNREFUSED, ENOTFOUND, ETIMEDOUT…). */
const ERRNO_NAME = /^[A-Z][A-Z0-9_]{0,31}$/;

/**
 * A connect or listen the helper in the VE could not do. `errno` is the
 * name the helper reported (ECONNREFUSED, EADDRINUSE, ENOTFOUND…) or one
 * the relay or this client chose (EMFILE, EAGAIN, EPROTO, ETIMEDOUT). The
 * helper is the tenant's to tamper with, so a name that does not look like
 * one becomes EPROTO: `errno` and the user message stay safe to show.
 */
export class ForwardRequestError extends VeshError {
  readonly errno: string;

  constructor(errno: string, message: string) {
    const name = ERRNO_NAME.test(errno) ? errno : 'EPROTO';
    super(ErrorCodes.NETWORK_FAILED, message, { userMessage: `The connection could not be made inside the VE (${name}).`, details: { errno: name } });
    this.name = 'ForwardRequestError';
    this.errno = name;
  }
}

type Answer = { fd?: number; port?: number; path?: string };
type Pending = { what: string; resolve: (a: Answer) => void; reject: (e: Error) => void; timer: NodeJS.Timeout };

/** What the relay reports besides answers to requests. */
export interface ForwardRelayEvents {
  /** A connection arrived on a listener in the VE. The callee owns `fd` (one end of a Unix stream socketpair) and must close it. */
  accepted(listenerId: number, fd: number, remoteAddress: string, remotePort: number): void;
  /** The relay dropped `count` malformed or unasked-for frames from the VE (a tenant tampering with its helper). */
  rejected(count: number, reason: string): void;
  /**
   * The client ended on its own, not through stop(): the relay sent a frame
   * the channel could not take, went away, or could not be read. Every
   * request in flight has failed with `err`. Worth an admin's look.
   */
  ended(err: VeshError): void;
}

/**
 * The broker's side of port forwarding in one VE, for one SSH connection:
 * it starts the host-side relay (src/native/vesh-forward-relay.c), which
 * starts the helper inside the VE (src/native/vesh-forward.c) and checks
 * everything that comes from it; src/ssh/forward-protocol.ts has the
 * messages. Closing the channel ends the relay, and so the helper.
 *
 * The channel is a SOCK_SEQPACKET socketpair carrying one JSON object a
 * frame (src/system/frame-channel.ts), never Node's IPC: a socket the relay
 * passes arrives here as a raw fd that nothing in this process reads, so the
 * first bytes a VE service sends (an SSH or SMTP banner) are still there for
 * whoever the fd is handed to (an SSH worker).
 */
export class ForwardRelayClient {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private dead: VeshError | null = null;
  private stderrTail = '';
  private exited = false;
  /** Set while start() waits for the relay's 'ready'. */
  private starting: { ready: () => void; fail: (err: VeshError) => void } | null = null;

  private constructor(
    private readonly child: ChildProcess,
    private readonly channel: FrameChannel,
    private readonly ve: string,
    private readonly events: ForwardRelayEvents,
  ) {}

  /**
   * Spawn the relay from `cmd` (VeManager.forwardCommand: already charged to
   * the VE's relay cgroup) and wait until the helper in VE `ve` runs.
   * Rejects with COMMAND_FAILED (carrying what the engine said) when it
   * cannot start; nothing is left running then.
   */
  static async start(cmd: HostCommand & { program: string }, ve: string, events: ForwardRelayEvents): Promise<ForwardRelayClient> {
    let programFd: number;
    try {
      programFd = openSync(cmd.program, 'r');
    } catch (err) {
      throw new VeshError(ErrorCodes.INTERNAL, `cannot open the port-forward helper ${cmd.program}: ${errorMessage(err)} (run "npm run build")`, { cause: err, userMessage: UNAVAILABLE });
    }
    let brokerEnd: number;
    let relayEnd: number;
    try {
      [brokerEnd, relayEnd] = socketpair('seqpacket');
    } catch (err) {
      closeSync(programFd);
      throw new VeshError(ErrorCodes.INTERNAL, `cannot make the channel to the port-forward relay: ${errorMessage(err)}`, { cause: err, userMessage: UNAVAILABLE });
    }
    let child: ChildProcess;
    try {
      // fd 3: the relay's end of the frame channel (a host process; never the
      // helper in the VE); fd 4: the helper program, which the engine execs
      // inside the VE. Our copies go once the child has its own.
      child = spawn(cmd.file, cmd.args, { stdio: ['ignore', 'ignore', 'pipe', relayEnd, programFd], env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', ...cmd.env }, cwd: '/' });
    } catch (err) {
      closeFd(brokerEnd);
      throw new VeshError(ErrorCodes.COMMAND_FAILED, `cannot start the port-forward relay ${cmd.file}: ${errorMessage(err)}`, { cause: err, userMessage: UNAVAILABLE });
    } finally {
      closeFd(relayEnd);
      closeSync(programFd);
    }
    const channel = new FrameChannel(brokerEnd, { maxFrameBytes: MAX_FRAME_BYTES, name: `forward relay of VE ${ve}` });
    const client = new ForwardRelayClient(child, channel, ve, events);
    client.readStderrUntilReady();
    channel.on('frame', (msg: unknown, fds: number[]) => client.onFrame(msg, fds));
    channel.on('malformed', (reason: string) => client.end(`sent a frame we could not take (${reason})`));
    channel.on('error', (err: unknown) => client.end(`channel failed: ${errorMessage(err)}`));
    // While starting, the channel closes only because the relay exited: its
    // 'close' below follows, once its stderr (which says why) has been read.
    channel.on('close', () => {
      if (!client.starting) client.end('closed its channel');
    });
    child.on('error', (err) => client.end(`could not be run: ${err.message}`));
    // 'close', not 'exit': by then its stderr, which says why a start failed, has been read.
    child.on('close', (code, signal) => {
      client.exited = true;
      client.end(`exited (${signal ?? `status ${code}`})`);
    });
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => client.end(`did not start within ${READY_TIMEOUT_MS / 1000}s`), READY_TIMEOUT_MS);
      client.starting = {
        ready: () => {
          clearTimeout(timer);
          client.starting = null;
          // From now on the relay's stderr is not read at all.
          client.child.stderr?.destroy();
          resolve();
        },
        fail: (err) => {
          clearTimeout(timer);
          client.starting = null;
          reject(new VeshError(ErrorCodes.COMMAND_FAILED, `${err.message}: ${client.stderrTail.trim() || 'no output'}`, { cause: err, userMessage: UNAVAILABLE }));
        },
      };
    });
    return client;
  }

  /** The relay's host pid (for logs; it exits by itself once stopped). */
  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Connect from inside the VE; resolves with a connected stream socket's fd, which the caller owns and must close. */
  async connect(host: string, port: number): Promise<number> {
    if (!isValidHost(host) || !isValidPort(port, false)) {
      throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `not a forwarding target: ${JSON.stringify(String(host).slice(0, 64))} port ${String(port)}`, { userMessage: 'Invalid forwarding target.' });
    }
    const a = await this.request(`connect to ${host}:${port}`, (id) => ({ t: 'connect', id, host, port }));
    if (a.fd === undefined) throw new ForwardRequestError('EPROTO', `connect to ${host}:${port} in VE "${this.ve}": the relay answered without a socket`);
    return a.fd;
  }

  /** Listen inside the VE (port 0: any); resolves with the listener's id (for 'accepted' and unlisten) and its bound port. */
  async listen(host: string, port: number): Promise<{ id: number; port: number }> {
    if (!isValidHost(host) || !isValidPort(port, true)) {
      throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `not a listening address: ${JSON.stringify(String(host).slice(0, 64))} port ${String(port)}`, { userMessage: 'Invalid forwarding address.' });
    }
    let id = 0;
    const a = await this.request(`listen on ${host}:${port}`, (i) => {
      id = i;
      return { t: 'listen', id: i, host, port };
    });
    return { id, port: a.port ?? port };
  }

  /**
   * Connect to the Unix socket at `path` from inside the VE (direct-streamlocal):
   * the helper connects in the VE's mount namespace as the account's user,
   * so the VE's files and the kernel's checks decide what is reached.
   */
  async connectUnix(path: string): Promise<number> {
    if (!isValidSocketPath(path)) throw invalidPath(path);
    const a = await this.request(`connect to ${path}`, (id) => ({ t: 'connect_unix', id, path }));
    if (a.fd === undefined) throw new ForwardRequestError('EPROTO', `connect to ${path} in VE "${this.ve}": the relay answered without a socket`);
    return a.fd;
  }

  /** Listen on the Unix socket `path` inside the VE (streamlocal-forward), bound under umask `mask`; `unlink` removes a socket already there. Resolves with the listener's id. */
  async listenUnix(path: string, mask: number, unlink: boolean): Promise<number> {
    if (!isValidSocketPath(path)) throw invalidPath(path);
    let id = 0;
    await this.request(`listen on ${path}`, (i) => {
      id = i;
      return { t: 'listen_unix', id: i, path, mask, unlink };
    });
    return id;
  }

  /** Listen on a fresh agent socket inside the VE (the helper names it; it goes with this client). Resolves with the listener's id and the socket's path. */
  async listenAgent(mask: number): Promise<{ id: number; path: string }> {
    let id = 0;
    const a = await this.request('listen on an agent socket', (i) => {
      id = i;
      return { t: 'listen_agent', id: i, mask };
    });
    if (a.path === undefined) throw new ForwardRequestError('EPROTO', `agent socket in VE "${this.ve}": the relay answered without a path`);
    return { id, path: a.path };
  }

  /** Close a listener. No answer: the relay forgets it at once, so nothing more is accepted for it. */
  unlisten(id: number): void {
    this.send({ t: 'unlisten', id });
  }

  /**
   * Close the channel: the relay sees it and exits, the helper sees the
   * relay's end and exits, closing its listeners. A relay still there after
   * STOP_GRACE_MS is killed. Idempotent.
   */
  stop(): void {
    this.failAll(new VeshError(ErrorCodes.INTERNAL, `port forwarding in VE "${this.ve}" stopped`, { userMessage: UNAVAILABLE }));
    this.shutDown();
  }

  private shutDown(): void {
    this.channel.close();
    this.child.stderr?.destroy();
    if (!this.exited) {
      const timer = setTimeout(() => {
        if (!this.exited) this.child.kill('SIGKILL');
      }, STOP_GRACE_MS);
      timer.unref();
      this.child.once('close', () => clearTimeout(timer));
    }
  }

  /** The relay's own complaints, when a start fails: read with a cap, and not at all once the helper runs. */
  private readStderrUntilReady(): void {
    const stderr = this.child.stderr;
    if (!stderr) return;
    let read = 0;
    stderr.on('error', () => undefined);
    stderr.on('data', (d: Buffer) => {
      read += d.length;
      this.stderrTail = (this.stderrTail + d.toString()).slice(-STDERR_TAIL);
      if (read >= STDERR_READ_MAX) stderr.destroy();
    });
  }

  private request(what: string, make: (id: number) => ToHelper): Promise<Answer> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new ForwardRequestError('ETIMEDOUT', `${what} in VE "${this.ve}": the port-forward helper did not answer within ${REQUEST_TIMEOUT_MS / 1000}s`));
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(id, { what, resolve, reject, timer });
      this.send(make(id));
    });
  }

  private send(m: ToHelper): void {
    if (this.dead) return;
    try {
      this.channel.send(m);
    } catch (err) {
      this.end(`could not be written to: ${errorMessage(err)}`);
    }
  }

  private settle(id: number): Pending | undefined {
    const p = this.pending.get(id);
    if (p) {
      clearTimeout(p.timer);
      this.pending.delete(id);
    }
    return p;
  }

  /**
   * One frame from the relay. It passes only sockets it made itself, one
   * with 'connected' and 'accepted' and none with anything else; a frame
   * that breaks that has its descriptors closed and is dropped (a request
   * it answers fails).
   */
  private onFrame(raw: unknown, fds: number[]): void {
    const m: FromHelper | null = this.dead ? null : parseFromHelper(raw);
    const carries = m?.t === 'connected' || m?.t === 'accepted';
    if (!m || fds.length !== (carries ? 1 : 0) || (carries && !isSocket(fds[0]!))) {
      closeAll(fds);
      if (m && 'id' in m && m.t !== 'accepted') {
        this.settle(m.id)?.reject(new ForwardRequestError('EPROTO', `VE "${this.ve}": the port-forward relay answered '${m.t}' with ${fds.length} descriptor(s) of the wrong kind or number`));
      }
      return;
    }
    switch (m.t) {
      case 'ready':
        this.starting?.ready();
        break;
      case 'connected': {
        const p = this.settle(m.id);
        if (p) p.resolve({ fd: fds[0]! });
        else closeAll(fds); // asked for and given up on (timed out)
        break;
      }
      case 'failed': {
        const p = this.settle(m.id);
        p?.reject(new ForwardRequestError(m.code, `${p.what} in VE "${this.ve}" failed: ${m.message || m.code} (${m.code})`));
        break;
      }
      case 'listening':
        this.settle(m.id)?.resolve({ port: m.port, ...(m.path !== undefined ? { path: m.path } : {}) });
        break;
      case 'accepted':
        this.events.accepted(m.id, fds[0]!, m.remoteAddress, m.remotePort);
        break;
      case 'rejected':
        this.events.rejected(m.count, m.reason);
        break;
    }
  }

  /** The relay or its channel went wrong: fail everything, close the channel (which ends the relay), and say so once. */
  private end(why: string): void {
    if (this.dead) return;
    // A failed start is reported by start() itself; only a running client's end is news.
    const running = this.starting === null;
    const err = new VeshError(ErrorCodes.COMMAND_FAILED, `port-forward relay of VE "${this.ve}" ${why}`, { userMessage: UNAVAILABLE });
    this.failAll(err);
    this.shutDown();
    if (running) this.events.ended(err);
  }

  /** From now on every request fails with `err`; those in flight (and a start) fail now. */
  private failAll(err: VeshError): void {
    if (!this.dead) this.dead = err;
    this.starting?.fail(err);
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(err);
    }
  }
}

function invalidPath(path: unknown): VeshError {
  return new VeshError(ErrorCodes.INVALID_ARGUMENT, `not a Unix socket path: ${JSON.stringify(String(path).slice(0, 64))} (an absolute path of printable ASCII, at most 107 bytes)`, { userMessage: 'Invalid socket path.' });
}

function closeAll(fds: number[]): void {
  for (const fd of fds) {
    try {
      closeFd(fd);
    } catch { /* already closed */ }
  }
}

/** Defence in depth: the relay hands over only Unix stream sockets it made; anything else is not taken. */
function isSocket(fd: number): boolean {
  try {
    return fstatSync(fd).isSocket();
  } catch {
    return false;
  }
}
