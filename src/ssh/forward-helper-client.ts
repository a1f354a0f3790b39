import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import type net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCodes, VeshError } from '../errors.js';
import type { VeAccess, VeUserInfo } from '../ve/access.js';
import { parseFromHelper, type FromHelper, type ToHelper } from './forward-protocol.js';

const READY_TIMEOUT_MS = 15_000;
const REQUEST_TIMEOUT_MS = 20_000;

/**
 * The compiled helper program. When the server itself runs from TypeScript
 * sources (vitest), the helper still has to be plain JavaScript that `node`
 * can start as an unprivileged uid, so point at the build in dist/.
 */
export function defaultForwardHelperPath(): string {
  const here = fileURLToPath(import.meta.url);
  if (here.endsWith('.js')) return path.join(path.dirname(here), 'forward-helper.js');
  const root = path.resolve(path.dirname(here), '..', '..');
  return path.join(root, 'dist', 'ssh', 'forward-helper.js');
}

type Pending = { resolve: (v: { socket?: net.Socket; port?: number }) => void; reject: (e: Error) => void; timer: NodeJS.Timeout };

/**
 * Talks to one forward helper running inside a VE's network namespace (see
 * forward-protocol.ts for the messages). One per SSH connection, started on
 * the first forwarding request and stopped with the connection.
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
    helperPath: string,
    onAccepted: (listenerId: number, socket: net.Socket, remoteAddress: string, remotePort: number) => void,
  ): Promise<ForwardHelperClient> {
    if (!existsSync(helperPath)) {
      throw new VeshError(ErrorCodes.INTERNAL, `port-forward helper ${helperPath} is missing: run "npm run build"`, { userMessage: 'Port forwarding is not available right now.' });
    }
    const cmd = await ves.netCommand(ve, user, [process.execPath, helperPath]);
    // The helper's environment: PATH only (Node adds its IPC descriptor number).
    const child = spawn(cmd.file, cmd.args, { stdio: ['ignore', 'ignore', 'pipe', 'ipc'], env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin' }, cwd: '/' });
    const client = new ForwardHelperClient(child, onAccepted);
    child.stderr!.on('data', (d: Buffer) => {
      client.stderrTail = (client.stderrTail + d.toString()).slice(-500);
    });
    child.on('message', (m: unknown, handle: unknown) => client.onMessage(m, handle as net.Socket | undefined));
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        client.stop();
        reject(new VeshError(ErrorCodes.COMMAND_FAILED, `port-forward helper in VE "${ve}" did not start within ${READY_TIMEOUT_MS / 1000}s: ${client.stderrTail.trim() || 'no output'}`, { userMessage: 'Port forwarding is not available right now.' }));
      }, READY_TIMEOUT_MS);
      const onExit = (code: number | null) => {
        clearTimeout(timer);
        reject(new VeshError(ErrorCodes.COMMAND_FAILED, `port-forward helper in VE "${ve}" exited (${code}) before it was ready: ${client.stderrTail.trim() || 'no output'}`, { userMessage: 'Port forwarding is not available right now.' }));
      };
      child.once('error', (err) => {
        clearTimeout(timer);
        reject(new VeshError(ErrorCodes.COMMAND_FAILED, `cannot start the port-forward helper: ${err.message}`, { cause: err, userMessage: 'Port forwarding is not available right now.' }));
      });
      child.once('exit', onExit);
      child.once('message', (m: unknown) => {
        if (parseFromHelper(m)?.t === 'ready') {
          clearTimeout(timer);
          child.removeListener('exit', onExit);
          resolve();
        }
      });
    });
    child.on('exit', (code, signal) => client.failAll(new Error(`port-forward helper exited (${signal ?? code})`)));
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

  stop(): void {
    this.failAll(new Error('port forwarding stopped'));
    try {
      if (this.child.connected) this.child.disconnect();
    } catch { /* already gone */ }
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGTERM');
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
