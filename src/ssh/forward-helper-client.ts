import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import type net from 'node:net';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import type { VeAccess, VeUserInfo } from '../ve/access.js';
import { parseFromHelper, type FromHelper, type ToHelper } from './forward-protocol.js';

const READY_TIMEOUT_MS = 15_000;
const REQUEST_TIMEOUT_MS = 20_000;

type Pending = { resolve: (v: { socket?: net.Socket; port?: number }) => void; reject: (e: Error) => void; timer: NodeJS.Timeout };

/**
 * Talks to one forward helper running inside a VE (src/native/vesh-forward.c;
 * forward-protocol.ts has the messages). One per SSH connection, started on
 * the first forwarding request and stopped with the connection. The helper is
 * started detached (the engine's process exits once it runs), so its end is
 * the end of the IPC channel, not a process exit.
 */
export class ForwardHelperClient {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private dead: Error | null = null;
  private stderrTail = '';

  private constructor(private readonly child: ChildProcess, private readonly onAccepted: (listenerId: number, socket: net.Socket, remoteAddress: string, remotePort: number) => void) {}

  static async start(
    ves: VeAccess,
    ve: string,
    user: VeUserInfo,
    onAccepted: (listenerId: number, socket: net.Socket, remoteAddress: string, remotePort: number) => void,
  ): Promise<ForwardHelperClient> {
    const unavailable = 'Port forwarding is not available right now.';
    const cmd = await ves.forwardCommand(ve, user);
    let programFd: number;
    try {
      programFd = openSync(cmd.program, 'r');
    } catch (err) {
      throw new VeshError(ErrorCodes.INTERNAL, `cannot open the port-forward helper ${cmd.program}: ${errorMessage(err)} (run "npm run build")`, { cause: err, userMessage: unavailable });
    }
    let child: ChildProcess;
    try {
      // fd 3: the IPC channel; fd 4: the helper program, which the engine execs inside the VE.
      child = spawn(cmd.file, cmd.args, { stdio: ['ignore', 'ignore', 'pipe', 'ipc', programFd], env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin' }, cwd: '/' });
    } finally {
      closeSync(programFd);
    }
    const client = new ForwardHelperClient(child, onAccepted);
    child.stderr!.on('data', (d: Buffer) => {
      client.stderrTail = (client.stderrTail + d.toString()).slice(-500);
    });
    child.on('message', (m: unknown, handle: unknown) => client.onMessage(m, handle as net.Socket | undefined));
    await new Promise<void>((resolve, reject) => {
      let settled = false;
      const fail = (why: string, cause?: Error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        client.stop();
        reject(new VeshError(ErrorCodes.COMMAND_FAILED, `port-forward helper in VE "${ve}" ${why}: ${client.stderrTail.trim() || 'no output'}`, { cause, userMessage: unavailable }));
      };
      const timer = setTimeout(() => fail(`did not start within ${READY_TIMEOUT_MS / 1000}s`), READY_TIMEOUT_MS);
      // The engine exits 0 once the helper runs; anything else means it never did.
      child.once('exit', (code, signal) => {
        if (code !== 0) fail(`could not be started (engine exit ${signal ?? code})`);
      });
      child.once('error', (err) => fail('could not be started', err));
      child.once('disconnect', () => fail('closed its channel before it was ready'));
      child.once('message', (m: unknown) => {
        if (!settled && parseFromHelper(m)?.t === 'ready') {
          settled = true;
          clearTimeout(timer);
          resolve();
        }
      });
    });
    child.on('disconnect', () => client.failAll(new Error('the port-forward helper went away')));
    child.on('error', (err) => client.failAll(err));
    return client;
  }

  /** Connect from inside the VE; resolves with the connected socket. */
  async connect(host: string, port: number): Promise<net.Socket> {
    const r = await this.request((id) => ({ t: 'connect', id, host, port }));
    if (!r.socket) throw new Error('helper answered without a socket');
    return r.socket;
  }

  /** Listen inside the VE; resolves with the listener's id and bound port. */
  async listen(host: string, port: number): Promise<{ id: number; port: number }> {
    let id = 0;
    const r = await this.request((i) => {
      id = i;
      return { t: 'listen', id: i, host, port };
    });
    return { id, port: r.port ?? port };
  }

  async unlisten(id: number): Promise<void> {
    if (this.dead) return;
    this.send({ t: 'unlisten', id });
  }

  /** Close the channel: the helper sees its end and exits, closing its listeners. */
  stop(): void {
    this.failAll(new Error('port forwarding stopped'));
    try {
      if (this.child.connected) this.child.disconnect();
    } catch { /* already gone */ }
    this.child.stderr?.destroy();
  }

  private request(make: (id: number) => ToHelper): Promise<{ socket?: net.Socket; port?: number }> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error('the port-forward helper did not answer in time'));
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(id, { resolve, reject, timer });
      this.send(make(id));
    });
  }

  private send(m: ToHelper): void {
    if (this.child.connected) this.child.send(m, undefined, {}, () => undefined);
  }

  private settle(id: number): Pending | undefined {
    const p = this.pending.get(id);
    if (p) {
      clearTimeout(p.timer);
      this.pending.delete(id);
    }
    return p;
  }

  private onMessage(raw: unknown, handle: net.Socket | undefined): void {
    const m: FromHelper | null = parseFromHelper(raw);
    if (!m || m.t === 'ready') {
      handle?.destroy();
      return;
    }
    switch (m.t) {
      case 'connected': {
        const p = this.settle(m.id);
        if (p && handle) p.resolve({ socket: handle });
        else handle?.destroy();
        break;
      }
      case 'failed': {
        const err = Object.assign(new Error(m.message || m.code), { code: m.code });
        this.settle(m.id)?.reject(err);
        break;
      }
      case 'listening':
        this.settle(m.id)?.resolve({ port: m.port });
        break;
      case 'accepted':
        if (handle) this.onAccepted(m.id, handle, m.remoteAddress, m.remotePort);
        break;
      case 'closed':
        break;
    }
  }

  private failAll(err: Error): void {
    if (!this.dead) this.dead = err;
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(err);
    }
  }
}
