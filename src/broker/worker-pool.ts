import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Logger } from '../audit/logger.js';
import { errorMessage } from '../errors.js';
import { closeFd, recvFrame, sendFrame, socketpair, watch } from '../system/fdpass.js';
import { FrameChannel } from '../system/frame-channel.js';
import { MAX_FRAME_BYTES } from './request-table.js';
import { appRoot, workerSandboxCommand } from './worker-sandbox.js';

/** One SSH worker as the broker sees it. */
export interface Worker {
  index: number;
  pid: number;
  uid: number;
  channel: FrameChannel;
  /** Connections it holds (broker ids). */
  conns: Set<string>;
  /** When it last answered a ping (or started). */
  lastAlive: number;
  /** It has said it serves (its first 'worker.alive', sent once it had the hello). */
  ready: boolean;
  /** Connections it held that are closed now, most recent last (bounded by the broker). */
  closedConns: Set<string>;
  alive: boolean;
  /** Answer one sign request: the reply frame's text, or null to end the worker (a malformed request). */
  startedAt: number;
}

export interface WorkerPoolOptions {
  count: number;
  firstUid: number;
  maxFiles: number;
  /** Directories the workers must not see even when they lie under the application root. */
  hide: string[];
  /** The worker program (tests put a hostile stand-in here); dist/worker/main.js by default. */
  script?: string;
  /** The workers' stdout and stderr, when not our own (in-process tests). */
  output?: (chunk: Buffer) => void;
  logger: Logger;
  /** A frame from a worker's control channel (fds: what it dared to attach; the handler closes them). */
  onFrame(w: Worker, msg: unknown, fds: number[]): void;
  /** A sign request from a worker: the answer, or null when the request was malformed (the worker is ended). */
  onSign(w: Worker, raw: Buffer): Buffer | null;
  /** The worker is gone (its connections with it); the pool starts another. */
  onExit(w: Worker): void;
  /** Called once the worker is up, to send it its hello. */
  onStart(w: Worker): void;
}

/** A worker that dies this soon after its start counts as a crash loop: the next start waits. */
/**
 * V8 flags for every worker. `--no-incremental-marking`: a worker relaying a
 * bulk transfer allocates a read buffer and an SSH packet per 32-64 KiB, and
 * with a live heap of ~10 MB V8 answered every scavenge those buffers caused
 * by starting an incremental mark-compact: 140 full collections per 2 GiB
 * downloaded by SFTP, 25-30% of the worker's CPU in `perf`. Without it, one
 * per 2 GiB, and the worker's CPU per GiB fell from 3.5 to 2.4 s down and
 * from 2.8 to 1.7 s up (same machine, same hour; a bare ssh2 server with a
 * 5 MB heap never showed the pattern). The cost: a full collection, when the
 * old generation does fill, is one pause instead of slices (35 ms for a
 * 12 MB heap on a loaded 2-core host; logins made none in 160).
 */
const WORKER_NODE_FLAGS = ['--no-incremental-marking'];

const CRASH_LOOP_MS = 2_000;
const RESTART_DELAY_MAX_MS = 10_000;

/** This process's hard limit on open files (a worker cannot be given more), from /proc/self/limits. */
function hardFileLimit(): number {
  try {
    const line = readFileSync('/proc/self/limits', 'utf8').split('\n').find((l) => l.startsWith('Max open files'));
    const hard = line?.trim().split(/\s+/)[4];
    if (hard && /^\d+$/.test(hard)) return Number(hard);
  } catch { /* no /proc: assume the setting fits */ }
  return Number.MAX_SAFE_INTEGER;
}

/** Workers to run for workers.count (0 = one per CPU this process may use). */
export function workerCount(configured: number): number {
  return configured > 0 ? configured : Math.max(1, os.availableParallelism());
}

/**
 * Starts, watches and restarts the SSH workers. Each gets two SEQPACKET
 * sockets: fd 3 for requests and events (FrameChannel), fd 4 for the
 * blocking sign requests of its key exchanges. The sandbox launcher
 * (src/native/vesh-worker-sandbox.c) gives it its own uid, namespaces and
 * root; the worker installs its seccomp filter itself once its modules are
 * loaded.
 */
export class WorkerPool {
  private readonly workers: Array<Worker | null>;
  private readonly children = new Map<number, ChildProcess>();
  private readonly restartDelay: number[];
  private stopping = false;
  private readonly log: Logger;

  constructor(private readonly opts: WorkerPoolOptions) {
    this.workers = new Array<Worker | null>(opts.count).fill(null);
    this.restartDelay = new Array<number>(opts.count).fill(0);
    this.log = opts.logger.child({ component: 'workers' });
  }

  start(): void {
    for (let i = 0; i < this.workers.length; i++) this.spawnWorker(i);
  }

  /**
   * The worker with the fewest connections among those that said they serve
   * (a replacement still starting Node would keep a new login waiting for a
   * second), else among those alive; null when none is up.
   */
  pick(): Worker | null {
    let best: Worker | null = null;
    for (const readyOnly of [true, false]) {
      for (const w of this.workers) {
        if (w && w.alive && (!readyOnly || w.ready) && (!best || w.conns.size < best.conns.size)) best = w;
      }
      if (best) return best;
    }
    return null;
  }

  list(): Worker[] {
    return this.workers.filter((w): w is Worker => w !== null);
  }

  /** End a worker now (it broke the protocol, or it is stuck): its connections drop, a new one starts. */
  kill(w: Worker, reason: string, quiet = false): void {
    if (!w.alive) return;
    if (this.stopping) {
      this.markDead(w);
      return;
    }
    // quiet: the worker's channel closed, which is what a crash looks like
    // too; its exit is logged (broker.worker_exit) when it comes.
    if (!quiet) this.log.error({ event: 'broker.worker_killed', worker: w.index, pid: w.pid, reason }, `ending SSH worker ${w.index}: ${reason}`);
    try {
      process.kill(w.pid, 'SIGKILL');
    } catch { /* already gone */ }
    this.markDead(w);
  }

  private markDead(w: Worker): void {
    if (!w.alive) return;
    w.alive = false;
    w.channel.close();
    this.opts.onExit(w);
  }

  private spawnWorker(index: number): void {
    if (this.stopping) return;
    const ctrl = socketpair('seqpacket');
    const sign = socketpair('seqpacket');
    const uid = this.opts.firstUid + index;
    const root = appRoot();
    let child: ChildProcess;
    try {
      const cmd = workerSandboxCommand({
        uid, gid: uid, appRoot: root,
        script: this.opts.script ?? path.join(root, 'dist', 'worker', 'main.js'),
        nodeFlags: WORKER_NODE_FLAGS,
        keepFds: [3, 4], nofile: Math.min(this.opts.maxFiles, hardFileLimit()), hide: this.opts.hide,
      });
      // stdout/stderr: the broker's own, so the worker's log lines land where ours do.
      const out = this.opts.output ? 'pipe' : 'inherit';
      child = spawn(cmd.file, cmd.args, { stdio: ['ignore', out, out, ctrl[1], sign[1]], cwd: '/' });
      if (this.opts.output) {
        child.stdout?.on('data', this.opts.output);
        child.stderr?.on('data', this.opts.output);
      }
    } catch (err) {
      for (const fd of [...ctrl, ...sign]) closeFd(fd);
      this.log.error({ event: 'broker.worker_start_failed', worker: index, err: errorMessage(err) });
      this.restartDelay[index] = Math.min(RESTART_DELAY_MAX_MS, Math.max(500, this.restartDelay[index]! * 2));
      this.scheduleRestart(index);
      return;
    }
    closeFd(ctrl[1]);
    closeFd(sign[1]);
    const channel = new FrameChannel(ctrl[0], { maxFrameBytes: MAX_FRAME_BYTES, name: `worker ${index}` });
    const w: Worker = { index, pid: child.pid ?? -1, uid, channel, conns: new Set(), closedConns: new Set(), lastAlive: Date.now(), ready: false, alive: true, startedAt: Date.now() };
    this.workers[index] = w;
    this.children.set(index, child);
    this.log.info({ event: 'broker.worker_started', worker: index, pid: w.pid, uid });

    channel.on('frame', (msg: unknown, fds: number[]) => {
      if (w.alive) this.opts.onFrame(w, msg, fds);
      else for (const fd of fds) closeFd(fd);
    });
    channel.on('malformed', (why: string) => this.kill(w, `malformed frame: ${why}`));
    channel.on('error', (err: Error) => this.kill(w, `channel error: ${errorMessage(err)}`));
    channel.on('close', () => this.kill(w, 'closed its channel', true));

    // Sign requests: one frame in, one frame out, answered at once (the
    // worker waits for the answer, blocking its loop for that time).
    const signWatch = watch(sign[0], (readable, _writable, error) => {
      if (error && !readable) return;
      for (;;) {
        let got;
        try {
          got = recvFrame(sign[0], 4096);
        } catch (err) {
          this.kill(w, `bad sign frame: ${errorMessage(err)}`);
          return;
        }
        if (got === null) return;
        if (got === false) {
          signWatch.close();
          return;
        }
        if (got.fds.length > 0) {
          for (const fd of got.fds) closeFd(fd);
          this.kill(w, 'descriptors on a sign request');
          return;
        }
        const answer = w.alive ? this.opts.onSign(w, got.data) : null;
        if (!answer) {
          this.kill(w, 'malformed sign request');
          return;
        }
        try {
          sendFrame(sign[0], answer, []);
        } catch { /* the worker is gone; its exit is handled below */ }
      }
    });

    child.on('exit', (code, signal) => {
      signWatch.close();
      closeFd(sign[0]);
      this.children.delete(index);
      if (this.workers[index] === w) this.workers[index] = null;
      const lived = Date.now() - w.startedAt;
      if (!this.stopping) this.log.error({ event: 'broker.worker_exit', worker: index, pid: w.pid, code, signal, livedMs: lived }, `SSH worker ${index} ended (${signal ?? `exit ${code}`}): its connections were dropped; starting another`);
      this.markDead(w);
      this.restartDelay[index] = lived < CRASH_LOOP_MS ? Math.min(RESTART_DELAY_MAX_MS, Math.max(200, this.restartDelay[index]! * 2)) : 0;
      this.scheduleRestart(index);
    });
    this.opts.onStart(w);
  }

  private scheduleRestart(index: number): void {
    if (this.stopping) return;
    const delay = this.restartDelay[index] ?? 0;
    if (delay === 0) {
      setImmediate(() => this.spawnWorker(index));
      return;
    }
    setTimeout(() => this.spawnWorker(index), delay).unref();
  }

  /** Stop every worker (SIGTERM, SIGKILL after `graceMs`) and wait until they are gone. */
  async stop(graceMs: number): Promise<void> {
    this.stopping = true;
    const exits = [...this.children.values()].map((c) => new Promise<void>((r) => {
      if (c.exitCode !== null || c.signalCode !== null) return r();
      c.once('exit', () => r());
      c.kill('SIGTERM');
      setTimeout(() => c.kill('SIGKILL'), graceMs).unref();
    }));
    await Promise.all(exits);
  }
}
