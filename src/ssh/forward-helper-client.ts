import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import net from 'node:net';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import type { VeAccess, VeUserInfo } from '../ve/access.js';
import { parseFromHelper, type FromHelper, type ToHelper } from './forward-protocol.js';

const READY_TIMEOUT_MS = 15_000;
const REQUEST_TIMEOUT_MS = 20_000;
/** What we read of the relay's stderr (it writes only when a start fails, and little). */
const STDERR_READ_MAX = 8192;
const STDERR_TAIL = 500;

type Pending = { resolve: (v: { socket?: net.Socket; port?: number }) => void; reject: (e: Error) => void; timer: NodeJS.Timeout };

/** What the relay reports besides answers to requests. */
export interface ForwardHelperEvents {
  /** A connection arrived on a -R listener in the VE. */
  accepted(listenerId: number, socket: net.Socket, remoteAddress: string, remotePort: number): void;
  /** The relay dropped `count` malformed or unasked-for frames from the VE (a tenant tampering with its helper). */
  rejected(count: number, reason: string): void;
}

/**
 * Talks to port forwarding in one VE through its host-side relay
 * (src/native/vesh-forward-relay.c), which starts the helper inside the VE
 * (src/native/vesh-forward.c) and checks everything that comes from it;
 * forward-protocol.ts has the messages. One per SSH connection, started on
 * the first forwarding request and stopped with the connection: closing the
 * channel ends the relay, and so the helper.
 */
export class ForwardHelperClient {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private dead: Error | null = null;
  private stderrTail = '';

  private constructor(private readonly child: ChildProcess, private readonly events: ForwardHelperEvents) {}

  static async start(ves: VeAccess, ve: string, user: VeUserInfo, events: ForwardHelperEvents): Promise<ForwardHelperClient> {
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
      // fd 3: the IPC channel to the relay (a host process; never to the helper in
      // the VE); fd 4: the helper program, which the engine execs inside the VE.
      child = spawn(cmd.file, cmd.args, { stdio: ['ignore', 'ignore', 'pipe', 'ipc', programFd], env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', ...cmd.env }, cwd: '/' });
    } finally {
      closeSync(programFd);
    }
    const client = new ForwardHelperClient(child, events);
    // The relay's own complaints, when a start fails. Read with a cap, and not
    // at all once the helper runs: the VE's stderr never reaches us (the relay
    // reads and caps that), and ours stops costing anything.
    let stderrRead = 0;
    const stderr = child.stderr!;
    stderr.on('error', () => undefined);
    stderr.on('data', (d: Buffer) => {
      stderrRead += d.length;
      client.stderrTail = (client.stderrTail + d.toString()).slice(-STDERR_TAIL);
      if (stderrRead >= STDERR_READ_MAX) stderr.destroy();
    });
    child.on('message', (m: unknown, handle: unknown) => client.onMessage(m, handle));
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
      // The relay lives as long as the helper; ending before 'ready' means the helper never ran.
      // 'close', not 'exit': by then its stderr, which says why, has been read.
      child.once('close', (code, signal) => fail(`could not be started (relay exit ${signal ?? code})`));
      child.once('error', (err) => fail('could not be started', err));
      child.once('message', (m: unknown) => {
        if (!settled && parseFromHelper(m)?.t === 'ready') {
          settled = true;
          clearTimeout(timer);
          stderr.destroy();
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

  private onMessage(raw: unknown, received: unknown): void {
    // The relay passes only sockets it checked; anything else Node might hand us is closed.
    const handle = received instanceof net.Socket ? received : undefined;
    if (received !== undefined && !handle) closeHandle(received);
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
        if (handle) this.events.accepted(m.id, handle, m.remoteAddress, m.remotePort);
        break;
      case 'rejected':
        handle?.destroy();
        this.events.rejected(m.count, m.reason);
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

/** Close a handle Node passed that is not a socket (a server, a datagram socket): never keep it open. */
function closeHandle(h: unknown): void {
  const o = h as { destroy?: () => void; close?: () => void } | null;
  try {
    if (typeof o?.destroy === 'function') o.destroy();
    else if (typeof o?.close === 'function') o.close();
  } catch { /* already closed */ }
}
