import { readSync } from 'node:fs';
import { watch, type FdWatch } from './fdpass.js';

/**
 * Reads a pseudo-terminal's master to its very end: every byte the VE side
 * wrote before it closed, then the end (EIO).
 *
 * Not tty.ReadStream: libuv 1.46 (Node 20's) takes POLLHUP after a read
 * shorter than its buffer as EOF without reading again (libuv issue #4992,
 * fixed upstream by PRs #4997 and #5165, in no Node 20 release). A pty
 * master hands out at most ~4 KiB per read however much is queued, so when
 * the VE side closes with more queued (always so after a pause for a
 * client's window) the rest was dropped: 0.6-15 KB of `seq 1 400000` in 8
 * of 12 `ssh -tt` sessions here. Delete this module and go back to
 * tty.ReadStream once the Node in use ships a libuv with both PRs
 * (test/integration/ssh-terminal-tail.test.ts tells).
 *
 * Backpressure: pause() stops watching the descriptor (the terminal's buffer
 * fills and its writer blocks, as with any terminal); resume() starts again.
 */
export interface PtyMasterReader {
  pause(): void;
  resume(): void;
  /** Paused by the caller (held back by whoever takes the output). */
  readonly paused: boolean;
  /** Bytes read so far. */
  readonly bytesRead: number;
  /** Stop for good; the caller closes the descriptor. */
  stop(): void;
}

/** A master's read returns far less; the scratch is reused, each chunk copied out. */
const CHUNK = 64 * 1024;
/** Reads per readiness event: a terminal that never stops writing must not hold up the event loop (the poll is level-triggered: the rest comes next turn). */
const READS_PER_EVENT = 16;

/**
 * Watch `fd` (a non-blocking pty master) and hand each chunk to `onData` as
 * it is read; `onEnd` once the VE side is closed and everything was read
 * (EIO), or the descriptor failed. Neither is called after stop().
 */
export function readPtyMaster(fd: number, onData: (chunk: Buffer) => void, onEnd: () => void): PtyMasterReader {
  const scratch = Buffer.allocUnsafe(CHUNK);
  let w: FdWatch | null = null;
  let paused = false;
  let done = false;
  let bytesRead = 0;
  const unwatch = () => {
    w?.close();
    w = null;
  };
  const end = () => {
    if (done) return;
    done = true;
    unwatch();
    onEnd();
  };
  const drain = (failed: boolean) => {
    // After a failed poll no event comes again (libuv stopped it): read on to the end.
    for (let i = 0; (failed || i < READS_PER_EVENT) && !paused && !done; i++) {
      let n: number;
      try {
        n = readSync(fd, scratch, 0, CHUNK, null);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'EINTR') continue;
        // Nothing queued and the VE side still open: the next event brings more
        // (a failed poll brings none: libuv stopped it, so that is the end).
        if (code === 'EAGAIN' && !failed) return;
        // EIO: no slave descriptor is left open and nothing is queued.
        end();
        return;
      }
      if (n === 0) {
        end();
        return;
      }
      bytesRead += n;
      onData(Buffer.from(scratch.subarray(0, n)));
    }
  };
  const start = () => {
    if (!w && !paused && !done) w = watch(fd, (_readable, _writable, failed) => drain(failed));
  };
  start();
  return {
    pause: () => {
      paused = true;
      unwatch();
    },
    resume: () => {
      if (!paused) return;
      paused = false;
      start();
    },
    get paused() {
      return paused;
    },
    get bytesRead() {
      return bytesRead;
    },
    stop: () => {
      done = true;
      unwatch();
    },
  };
}
