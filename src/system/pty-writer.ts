import { write as fsWrite } from 'node:fs';
import { closeFd } from './fdpass.js';

/**
 * Writes input to a pseudo-terminal's master (non-blocking) in order: the
 * worker's copy of a client's keystrokes, or the broker's when it taps a
 * recorded terminal. A terminal whose reader is stuck takes no more input,
 * so chunks queue, and past `maxQueued` bytes the source (the SSH channel,
 * the worker's socket) is paused until the queue is empty again. EAGAIN is
 * retried after a short wait; any other error drops what is queued (the
 * terminal is gone). The master is closed only once no write is in flight
 * on the thread pool: closed earlier, its number could be reused by another
 * descriptor and the pending write land there.
 */
export interface PtyWriter {
  /** Queue `d` for the terminal; dropped once closed. */
  push(d: Buffer): void;
  /** Stop writing and close the master, now or when the write in flight returns. */
  close(): void;
}

/** What feeds the writer: paused while the queue is over its bound. */
export interface PausableSource {
  pause(): unknown;
  resume(): unknown;
  isPaused(): boolean;
}

const EAGAIN_RETRY_MS = 5;

export function ptyWriter(master: number, source: PausableSource, maxQueued: number, written?: (chunk: Buffer) => void): PtyWriter {
  const queue: Buffer[] = [];
  let queued = 0;
  let writing = false;
  let closed = false;
  let closeWhenIdle = false;
  const pump = () => {
    if (writing || closed) return;
    const chunk = queue[0];
    if (!chunk) {
      if (source.isPaused()) source.resume();
      return;
    }
    writing = true;
    fsWrite(master, chunk, 0, chunk.length, null, (err, n) => {
      writing = false;
      if (closeWhenIdle) {
        closeWhenIdle = false;
        closeFd(master);
      }
      if (closed) return;
      if (err) {
        if (err.code === 'EAGAIN') {
          setTimeout(pump, EAGAIN_RETRY_MS);
          return;
        }
        queue.length = 0;
        queued = 0;
        return;
      }
      written?.(chunk.subarray(0, n));
      queued -= n;
      if (n < chunk.length) queue[0] = chunk.subarray(n);
      else queue.shift();
      pump();
    });
  };
  return {
    push: (d) => {
      if (closed) return;
      queue.push(d);
      queued += d.length;
      if (queued > maxQueued) source.pause();
      pump();
    },
    close: () => {
      if (closed) return;
      closed = true;
      if (writing) closeWhenIdle = true;
      else closeFd(master);
    },
  };
}
