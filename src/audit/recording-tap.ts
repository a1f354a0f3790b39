import { write as fsWrite } from 'node:fs';
import net from 'node:net';
import tty from 'node:tty';
import { closeFd, setBlocking, setWinsize, socketpair } from '../system/fdpass.js';
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
/** How long after the process's end the terminal's last output is waited for. */
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
  const reader = new tty.ReadStream(master);
  const worker = new net.Socket({ fd: ours, readable: true, writable: true, allowHalfOpen: true });
  let masterDone = false;
  let closed = false;
  let onDrained: (() => void) | null = null;
  const masterEnded = () => {
    if (masterDone) return;
    masterDone = true;
    onDrained?.();
  };

  // VE terminal → recording → worker.
  reader.on('data', (d: Buffer) => {
    cast.output(d);
    if (!worker.destroyed && !worker.write(d)) {
      reader.pause();
      worker.once('drain', () => reader.resume());
    }
  });
  // EIO: the slave side is closed (the process and everything holding its terminal ended).
  reader.on('error', masterEnded);
  reader.on('end', masterEnded);
  worker.on('error', () => undefined);
  // A worker that closed its end stops taking output: the rest is still read and recorded.
  worker.on('close', () => {
    if (reader.isPaused()) reader.resume();
  });

  // Worker → recording → VE terminal: written as the master takes it.
  const queue: Buffer[] = [];
  let queued = 0;
  let writing = false;
  const pump = () => {
    if (writing || closed) return;
    const chunk = queue[0];
    if (!chunk) {
      if (worker.isPaused()) worker.resume();
      return;
    }
    writing = true;
    fsWrite(master, chunk, 0, chunk.length, null, (err, n) => {
      writing = false;
      if (closed) return;
      if (err) {
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN') {
          setTimeout(pump, 5);
          return;
        }
        queue.length = 0;
        queued = 0;
        return;
      }
      cast.input(chunk.subarray(0, n));
      queued -= n;
      if (n < chunk.length) queue[0] = chunk.subarray(n);
      else queue.shift();
      pump();
    });
  };
  worker.on('data', (d: Buffer) => {
    if (closed) return;
    queue.push(d);
    queued += d.length;
    if (queued > INPUT_QUEUE_MAX) worker.pause();
    pump();
  });

  const destroy = () => {
    if (closed) return;
    closed = true;
    // Destroying the stream closes the master.
    reader.destroy();
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
      const done = () => {
        clearTimeout(timer);
        if (closed) return resolve();
        closed = true;
        reader.destroy();
        // The last output goes to the worker before its end closes.
        if (worker.destroyed) return resolve();
        worker.end(() => {
          worker.destroy();
          resolve();
        });
        setTimeout(() => {
          worker.destroy();
          resolve();
        }, DRAIN_MS).unref();
      };
      const timer = setTimeout(done, DRAIN_MS);
      timer.unref();
      if (masterDone) done();
      else onDrained = done;
    }),
    destroy: () => {
      destroy();
      closeFd(theirs);
    },
  };
}
