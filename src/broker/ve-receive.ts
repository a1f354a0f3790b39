import { randomBytes } from 'node:crypto';
import { constants as fsc, promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { Logger } from '../audit/logger.js';
import type { ServerConfig } from '../config/server-config.js';
import { errorMessage } from '../errors.js';
import type { ExitReport } from '../ssh/exit-status.js';
import { closeFd, socketpair } from '../system/fdpass.js';
import { makeLayout } from '../system/layout.js';
import { VeBackups } from '../ve/backup.js';
import { createTemplateStore, createVeNetwork, type VeManager } from '../ve/index.js';
import type { MoveVouch } from './node-vouch.js';
import type { SpawnedSession } from './session-spawn.js';

/**
 * The receiving end of `vesh ve move` (src/cluster/ve-move.ts). Another
 * live node logs in here with its node key under a move vouch
 * (node-vouch.ts) naming one VE; that connection runs nothing in any VE.
 * Its only sessions are two fixed exec commands, answered by the broker
 * itself over the same descriptors a session gets (no process is started):
 *
 *   vesh-receive-ve BYTES DISK   the VE's backup (VeBackups' format) on
 *                                stdin, exactly BYTES long, from a VE whose
 *                                disk limit is DISK; restored here under the
 *                                vouch's VE name, NOT placed here: the
 *                                sender flips the placement once it hears
 *                                the exit status 0
 *   vesh-discard-ve NAME         remove the copy such a receive made, while
 *                                it is still not placed here (the sender's
 *                                flip failed, or it never heard the answer)
 *
 * Exit status 0 and a JSON line on stdout, or status 1 and the reason on
 * stderr. The sender is a live node of the cluster, but its stream is read
 * like any tenant's bytes: a length declared up front (a longer or shorter
 * stream fails), bounded by the declared disk limit plus the format's
 * overhead and by this node's free space, an idle deadline, and the file's
 * own checks (end mark, hashes, ownership) in the restore.
 */

/** The two commands, whole: anything else a move connection asks is refused. */
const RECEIVE = /^vesh-receive-ve ([1-9][0-9]{0,15}) ([1-9][0-9]{0,15})$/;
const DISCARD = /^vesh-discard-ve ([a-z0-9][a-z0-9-]{0,31})$/;

/** No byte of the stream for this long: the transfer is given up (the sender is gone or stuck). */
const IDLE_MS = 60_000;
/** Receives at once on this node (each holds a temp file as big as a VE's data, then a restore). */
const MAX_RECEIVES = 2;
/** Free space left over after the temp file and the restored image, for everyone else on this disk. */
const FREE_RESERVE_BYTES = 256 * 1024 * 1024;

/**
 * Most a backup of a VE with a `disk`-byte image can be: every data byte
 * once, a 16-byte header per 64 KiB run at worst, the 16-byte end of the
 * extents, magic, manifest (at most 64 KiB) and trailer.
 */
export function maxBackupBytes(disk: number): number {
  return disk + Math.ceil(disk / 65_536) * 16 + 128 * 1024;
}

export type MoveCommand =
  | { kind: 'receive'; bytes: number; disk: number }
  | { kind: 'discard'; ve: string }
  | { refusal: string };

/** What a move connection's session may be; anything else is refused with a reason. */
export function parseMoveCommand(move: MoveVouch, r: { kind: string; command?: string; pty?: unknown }): MoveCommand {
  if (r.kind !== 'exec' || r.command === undefined) return { refusal: `a connection moving VE ${move.ve} opens no ${r.kind === 'subsystem' ? 'subsystem' : 'shell'}: only vesh-receive-ve and vesh-discard-ve` };
  if (r.pty) return { refusal: 'a connection moving a VE takes no terminal' };
  const recv = RECEIVE.exec(r.command);
  if (recv) {
    const bytes = Number(recv[1]);
    const disk = Number(recv[2]);
    if (!Number.isSafeInteger(bytes) || !Number.isSafeInteger(disk)) return { refusal: 'sizes out of range' };
    if (bytes > maxBackupBytes(disk)) return { refusal: `a backup of ${bytes} bytes is more than a VE with a disk of ${disk} bytes can have (${maxBackupBytes(disk)})` };
    return { kind: 'receive', bytes, disk };
  }
  const discard = DISCARD.exec(r.command);
  if (discard) {
    if (discard[1] !== move.ve) return { refusal: `this connection moves VE ${move.ve}, not ${discard[1]}` };
    return { kind: 'discard', ve: discard[1]! };
  }
  return { refusal: `a connection moving VE ${move.ve} runs only vesh-receive-ve and vesh-discard-ve, not ${JSON.stringify(r.command.slice(0, 60))}` };
}

export interface VeReceiverDeps {
  config: ServerConfig;
  logger: Logger;
  ves: VeManager;
  /** This node's name in the cluster. */
  nodeName: string;
  /** The node `ve` is placed on, or null when it has none (a read: never places it). */
  placedOn(ve: string): Promise<string | null>;
}

/** How a command ended: its exit status and what it says. */
interface Outcome {
  code: number;
  stdout: string;
  stderr: string;
}

/** A session's answer: our halves of its stdio and stderr sockets, and how to end it. */
interface Answer {
  out: net.Socket;
  err: net.Socket;
  done: (code: number, stdout: string, stderr: string) => void;
}

export class VeReceiver {
  private readonly backups: VeBackups;
  private readonly log: Logger;
  private readonly dir: string;
  /** Work under way per VE name (a receive, or a discard): one at a time. */
  private readonly busy = new Map<string, Promise<void>>();
  /** VEs a receive restored here, which a discard may remove while they are not placed here. */
  private readonly received = new Set<string>();

  constructor(private readonly deps: VeReceiverDeps) {
    const layout = makeLayout(deps.config.dataDir);
    this.log = deps.logger.child({ component: 've-receive' });
    this.backups = new VeBackups({
      config: deps.config, layout, logger: deps.logger, ves: deps.ves,
      templates: createTemplateStore(deps.config, layout, deps.logger), network: createVeNetwork(deps.config, layout, deps.logger),
    });
    this.dir = path.join(deps.config.dataDir, 'moves');
  }

  /**
   * Start answering one checked command of a move connection: the worker
   * gets [stdio, stderr] as for any exec session; `onExit` reports the
   * status once the answer is written.
   */
  open(move: MoveVouch, cmd: Exclude<MoveCommand, { refusal: string }>, onExit: (report: ExitReport) => void): SpawnedSession {
    const io = socketpair('stream');
    const er = socketpair('stream');
    let out: net.Socket;
    let err: net.Socket;
    try {
      out = new net.Socket({ fd: io[1], readable: true, writable: true, allowHalfOpen: true });
      err = new net.Socket({ fd: er[1], readable: false, writable: true });
    } catch (e) {
      for (const fd of [...io, ...er]) closeFd(fd);
      throw e;
    }
    out.on('error', () => undefined);
    err.on('error', () => undefined);
    let ended = false;
    const answer: Answer = {
      out, err,
      done: (code, stdout, stderr) => {
        if (ended) return;
        ended = true;
        out.pause();
        err.end(stderr);
        // Our end of stdout closed after it is written: the sender's further bytes fail at once.
        out.end(stdout, () => out.destroy());
        onExit({ kind: 'status', code });
      },
    };
    const abort = new AbortController();
    const log = this.log.child({ ve: move.ve, from: move.from });
    const work = cmd.kind === 'receive' ? this.receive(move, cmd, answer, abort.signal, log) : this.discard(move, answer, log);
    work.catch((e: unknown) => {
      log.error({ event: 'cluster.move_receive_failed', err: errorMessage(e) });
      answer.done(1, '', `vesh-receive-ve: ${errorMessage(e)}\n`);
    });
    return {
      pid: process.pid,
      fds: [io[0], er[0]],
      signal: () => undefined,
      // The connection went: a transfer still streaming stops (its temp file goes); a restore under way finishes, and a discard can remove it.
      hangup: () => abort.abort(),
    };
  }

  /** A receive, answered once its temp file is gone and its VE free again: what the sender hears is final here. */
  private async receive(move: MoveVouch, cmd: { bytes: number; disk: number }, a: Answer, signal: AbortSignal, log: Logger): Promise<void> {
    const ve = move.ve;
    const fail = (why: string): Outcome => {
      log.warn({ event: 'cluster.move_receive_refused', reason: why, bytes: cmd.bytes }, `a move of VE ${ve} from node ${move.from} refused: ${why}`);
      return { code: 1, stdout: '', stderr: `vesh-receive-ve: ${why}\n` };
    };
    let outcome: Outcome;
    if (this.busy.has(ve)) outcome = fail(`VE ${ve} is being received or discarded here already`);
    else if (this.busy.size >= MAX_RECEIVES) outcome = fail(`this node already receives ${MAX_RECEIVES} VEs: try again when they are done`);
    else {
      let release!: () => void;
      this.busy.set(ve, new Promise<void>((r) => { release = r; }));
      const tmp = path.join(this.dir, `.in-${ve}-${randomBytes(6).toString('hex')}`);
      try {
        outcome = await this.receiveInto(move, cmd, a, tmp, signal, log, fail);
      } finally {
        await fs.rm(tmp, { force: true });
        this.busy.delete(ve);
        release();
      }
    }
    a.done(outcome.code, outcome.stdout, outcome.stderr);
  }

  private async receiveInto(move: MoveVouch, cmd: { bytes: number; disk: number }, a: Answer, tmp: string, signal: AbortSignal, log: Logger, fail: (why: string) => Outcome): Promise<Outcome> {
    const ve = move.ve;
    const owner = await this.deps.placedOn(ve);
    if (owner !== move.from) return fail(`VE ${ve} is placed on ${owner === null ? 'no node' : `node ${owner}`}, not on node ${move.from}, which sends it`);
    if (await this.deps.ves.exists(ve)) return fail(`a VE named ${ve} exists on node ${this.deps.nodeName}'s disk already (a copy left there?): remove it there ("vesh ve destroy ${ve}") if it is not needed, then move again`);
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
    const st = await fs.statfs(this.dir);
    const free = st.bavail * st.bsize;
    // The backup file, then the restored image holding the same data.
    if (2 * cmd.bytes + FREE_RESERVE_BYTES > free) return fail(`node ${this.deps.nodeName} has ${Math.floor(free / 1048576)} MiB free in its data directory, too little for a ${Math.ceil(cmd.bytes / 1048576)} MiB backup and its restore`);
    const started = Date.now();
    const got = await this.readStream(a.out, tmp, cmd.bytes, signal);
    if (got !== null) return fail(got);
    log.info({ event: 'cluster.move_received', bytes: cmd.bytes, ms: Date.now() - started });
    const rec = await this.backups.restore(tmp, ve).catch((e: unknown) => {
      throw new Error(`the restore on node ${this.deps.nodeName} failed: ${errorMessage(e)}`);
    });
    if (rec.limits.disk !== cmd.disk) {
      await this.deps.ves.destroy(ve, { force: true }).catch(() => undefined);
      return fail(`the backup's disk limit is ${rec.limits.disk} bytes, not the ${cmd.disk} declared`);
    }
    this.received.add(ve);
    log.info({ event: 'cluster.move_restored', address: rec.address, ms: Date.now() - started }, `restored VE ${ve} moved from node ${move.from} (not placed here until that node says so)`);
    return { code: 0, stdout: `${JSON.stringify({ ve, node: this.deps.nodeName, address: rec.address, ms: Date.now() - started })}\n`, stderr: '' };
  }

  /**
   * Stream exactly `bytes` from `sock` into a new file `tmp`: null when they
   * all came, else why not (more, fewer, idle, the connection went).
   */
  private readStream(sock: net.Socket, tmp: string, bytes: number, signal: AbortSignal): Promise<string | null> {
    return (async () => {
      const fh = await fs.open(tmp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
      try {
        const why = await new Promise<string | null>((resolve) => {
          let got = 0;
          let writing = Promise.resolve();
          let settled = false;
          const settle = (v: string | null) => {
            if (settled) return;
            settled = true;
            clearTimeout(idle);
            sock.off('data', onData);
            sock.off('end', onEnd);
            sock.off('close', onClose);
            signal.removeEventListener('abort', onAbort);
            // Whatever is still being written lands before the file is judged or removed.
            void writing.then(() => resolve(v), (e: unknown) => resolve(`writing the backup on this node failed: ${errorMessage(e)}`));
          };
          let idle = setTimeout(() => settle(`no data for ${IDLE_MS / 1000} s: the transfer was given up`), IDLE_MS);
          const onData = (d: Buffer) => {
            got += d.length;
            if (got > bytes) {
              settle(`the stream is longer than the ${bytes} bytes declared`);
              return;
            }
            clearTimeout(idle);
            idle = setTimeout(() => settle(`no data for ${IDLE_MS / 1000} s: the transfer was given up`), IDLE_MS);
            sock.pause();
            writing = writing.then(async () => {
              await fh.write(d);
              if (!settled) sock.resume();
            });
            writing.catch(() => settle('writing the backup on this node failed'));
          };
          const onEnd = () => settle(got === bytes ? null : `the stream ended after ${got} of the ${bytes} bytes declared (truncated)`);
          const onClose = () => settle(got === bytes ? null : `the connection went after ${got} of the ${bytes} bytes declared`);
          const onAbort = () => settle('the connection went during the transfer');
          sock.on('data', onData);
          sock.on('end', onEnd);
          sock.on('close', onClose);
          signal.addEventListener('abort', onAbort);
        });
        if (why === null) await fh.sync();
        return why;
      } finally {
        await fh.close();
      }
    })();
  }

  /** Remove a copy a receive made, while it is not placed here; answered once it is gone. */
  private async discard(move: MoveVouch, a: Answer, log: Logger): Promise<void> {
    const ve = move.ve;
    // A receive of it still under way (its connection dropped mid-restore) is waited for first.
    await this.busy.get(ve);
    if (!this.received.has(ve)) {
      a.done(0, `${JSON.stringify({ ve, discarded: false, why: 'no copy received here' })}\n`, '');
      return;
    }
    const owner = await this.deps.placedOn(ve);
    if (owner === this.deps.nodeName) {
      this.received.delete(ve);
      log.warn({ event: 'cluster.move_discard_refused', reason: 'placed here' });
      a.done(1, '', `vesh-discard-ve: VE ${ve} is placed on this node (${this.deps.nodeName}): it is this node's now and is not removed\n`);
      return;
    }
    let release!: () => void;
    this.busy.set(ve, new Promise<void>((r) => { release = r; }));
    try {
      await this.deps.ves.destroy(ve, { force: true });
      this.received.delete(ve);
    } finally {
      this.busy.delete(ve);
      release();
    }
    log.info({ event: 'cluster.move_discarded' }, `removed the copy of VE ${ve} received from node ${move.from} (the move did not complete)`);
    a.done(0, `${JSON.stringify({ ve, discarded: true })}\n`, '');
  }
}
