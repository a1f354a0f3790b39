import net from 'node:net';
import { closeFd, setBlocking, setWinsize, socketpair } from '../system/fdpass.js';
import { readPtyMaster } from '../system/pty-reader.js';
import { ptyWriter } from '../system/pty-writer.js';
import type { CastWriter } from './recording-files.js';

/**
 * The broker's tap on a recorded terminal session. Unrecorded, the worker
 * gets the pty master itself and the broker never sees a byte; recorded,
 * the broker keeps the master and gives the worker one end of a stream
 * socketpair, and copies both ways, writing each chunk to the cast as it
 * passes: what the recording holds is what the VE's terminal really wrote
 * and was really sent, whatever the worker does. Window sizes reach the
 * master only through the broker (`session.resize`), which records them.
 *
 * Bounded both ways: output is read from the master only while the worker
 * takes it (a worker that never reads stalls its own session, as it would
 * with the master), input is queued up to INPUT_QUEUE_MAX and the worker's
 * socket is paused past it; the cast stops growing at recording.maxBytes
 * (recording-files.ts) while the copy goes on.
 */

const INPUT_QUEUE_MAX = 256 * 1024;
/**
 * After the process's end, how long the terminal may stay silent before the
 * tap lets go (a background job in the VE holds it open and writes nothing).
 * Not a cap on the drain: while output still comes, or waits for the worker
 * to take it (the client's window), the tail is copied first. A worker that
 * never takes it holds up only its own session's end, as it would by not
 * reading a master it held; its end closing lets go of it.
 */
const DRAIN_MS = 2_000;

export interface Tap {
  /** The worker's end, to be sent and closed by the caller. */
  readonly workerFd: number;
  resize(cols: number, rows: number): void;
  /** The process ended: copy what the terminal still holds, then let go of both ends. Resolves when done. */
  finish(): Promise<void>;
  /** Let go at once (the session never got going). */
  destroy(): void;
}

export function startTap(master: number, cast: CastWriter): Tap {
  const [ours, theirs] = socketpair('stream');
  setBlocking(master, false);
  const worker = new net.Socket({ fd: ours, readable: true, writable: true, allowHalfOpen: true });
  let masterDone = false;
  let closed = false;
  let onDrained: (() => void) | null = null;
  const masterEnded = () => {
    if (masterDone) return;
    masterDone = true;
    onDrained?.();
  };

  // VE terminal → recording → worker, to EIO: the slave side is closed (the
  // process and everything holding its terminal ended) and all it wrote was read.
  const reader = readPtyMaster(master, (d) => {
    cast.output(d);
    if (!worker.destroyed && !worker.write(d)) {
      reader.pause();
      worker.once('drain', () => reader.resume());
    }
  }, masterEnded);
  worker.on('error', () => undefined);
  // A worker that closed its end stops taking output: the rest is still read and recorded.
  worker.on('close', () => reader.resume());

  // Worker → recording → VE terminal: written as the master takes it.
  const input = ptyWriter(master, worker, INPUT_QUEUE_MAX, (chunk) => cast.input(chunk));
  worker.on('data', (d: Buffer) => {
    if (closed) return;
    input.push(d);
  });

  const closeMaster = () => {
    reader.stop();
    input.close();
  };
  const destroy = () => {
    if (closed) return;
    closed = true;
    closeMaster();
    worker.destroy();
  };

  return {
    workerFd: theirs,
    resize: (cols, rows) => {
      if (closed) return;
      try {
        setWinsize(master, cols, rows);
        cast.resize(cols, rows);
      } catch { /* the terminal is gone */ }
    },
    finish: () => new Promise<void>((resolve) => {
      /** What moves while the tail is copied: bytes read from the master, bytes the worker has yet to take. */
      const progress = () => `${reader.bytesRead}/${worker.writableLength}/${worker.destroyed}`;
      /** Output waits for the worker: the tail is on its way, not gone quiet. */
      const heldBack = () => !worker.destroyed && (reader.paused || worker.writableLength > 0);
      let seen = progress();
      let timer: NodeJS.Timeout | null = null;
      let resolved = false;
      const settle = () => {
        if (resolved) return;
        resolved = true;
        if (timer) clearTimeout(timer);
        resolve();
      };
      /** `then` once the terminal stood silent for DRAIN_MS (checked again while output moves or waits). */
      const watchdog = (then: () => void) => {
        timer = setTimeout(() => {
          const now = progress();
          if (now !== seen || heldBack()) {
            seen = now;
            watchdog(then);
          } else then();
        }, DRAIN_MS);
        timer.unref();
      };
      const letGo = () => {
        if (timer) clearTimeout(timer);
        if (closed) return settle();
        closed = true;
        closeMaster();
        // The last output goes to the worker before its end closes.
        if (worker.destroyed) return settle();
        worker.end(() => {
          worker.destroy();
          settle();
        });
        seen = progress();
        watchdog(() => {
          worker.destroy();
          settle();
        });
      };
      if (masterDone) letGo();
      else {
        onDrained = letGo;
        watchdog(letGo);
      }
    }),
    destroy: () => {
      destroy();
      closeFd(theirs);
    },
  };
}
