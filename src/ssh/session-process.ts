import net from 'node:net';
import type { ServerChannel } from 'ssh2';
import { closeFd, setWinsize } from '../system/fdpass.js';
import { readPtyMaster } from '../system/pty-reader.js';
import { ptyWriter } from '../system/pty-writer.js';
import type { ExitReport } from './exit-status.js';
import { clampPtySize } from './limits.js';

/**
 * A session's process, as the worker holds it: only descriptors the broker
 * handed over (the process itself runs in the VE, its host-side relay is the
 * broker's child). We relay between them and the channel; the exit status
 * comes from the broker (`session.exit`), and the client is told it only
 * after the last output byte went to the channel.
 */
export interface SessionProcess {
  /** The broker reported how the process ended. */
  exited(report: ExitReport): void;
  resize(cols: number, rows: number): void;
  /** The session is closing: stop relaying and let go of the descriptors. */
  close(): void;
}

/**
 * How long a terminal may stay silent after the broker reported the exit
 * before the client is told anyway (something in the VE, a background job,
 * still holds the terminal open and writes nothing). Not a cap on the
 * drain: while output still comes, or waits for the client's window, the
 * tail is passed on first.
 */
const DRAIN_AFTER_EXIT_MS = 2_000;
/** Bytes of input queued for a terminal that does not read, before the channel is paused. */
const PTY_WRITE_QUEUE_MAX = 256 * 1024;

/**
 * After the exit report: call `finish` once the output has stood still for
 * DRAIN_AFTER_EXIT_MS. `progress` is a count that grows while output passes;
 * `heldBack` says the client's window holds it back (then it has not stood
 * still: it is on its way, and the client can close the channel itself).
 */
function whenOutputSettles(progress: () => number, heldBack: () => boolean, finish: () => void): () => void {
  let seen = progress();
  let timer: NodeJS.Timeout | null = null;
  const check = () => {
    const now = progress();
    if (now !== seen || heldBack()) {
      seen = now;
      timer = setTimeout(check, DRAIN_AFTER_EXIT_MS);
      return;
    }
    timer = null;
    finish();
  };
  timer = setTimeout(check, DRAIN_AFTER_EXIT_MS);
  return () => {
    if (timer) clearTimeout(timer);
    timer = null;
  };
}

/**
 * A terminal's exit, told to the client once both are in: the broker's
 * report, and the terminal's end (everything it wrote went to the channel)
 * or, without that end, output that has settled (whenOutputSettles).
 */
function exitAfterOutput(onExit: (report: ExitReport) => void, progress: () => number, heldBack: () => boolean) {
  let report: ExitReport | null = null;
  let eof = false;
  let finished = false;
  let stopWaiting: (() => void) | null = null;
  const finish = () => {
    if (finished || !report) return;
    finished = true;
    stopWaiting?.();
    onExit(report);
  };
  return {
    /** The broker reported the exit: input is no longer taken. */
    get reported(): boolean { return report !== null; },
    /** The terminal's end: all its output is out. */
    ended: () => {
      eof = true;
      finish();
    },
    exited: (r: ExitReport) => {
      report = r;
      if (eof) finish();
      else stopWaiting = whenOutputSettles(progress, heldBack, finish);
    },
    stop: () => stopWaiting?.(),
  };
}

/**
 * The terminal case: the broker made the pseudo-terminal and gave us the
 * master. Reading: readPtyMaster (to EIO, every byte: see pty-reader.ts
 * for why not tty.ReadStream), paused while the channel's window is full;
 * writing: ptyWriter (in order, the channel paused while input queues
 * up). Window sizes are set on the master here (TIOCSWINSZ), which the
 * kernel turns into SIGWINCH for the relay. The client hears of
 * the exit after the last byte the terminal held went to the channel.
 */
export function ptyProcess(master: number, channel: ServerChannel, onExit: (report: ExitReport) => void): SessionProcess {
  let closed = false;
  const exit = exitAfterOutput(onExit, () => reader.bytesRead, () => reader.paused);
  const reader = readPtyMaster(master, (d) => {
    if (!channel.write(d)) {
      reader.pause();
      channel.once('drain', () => reader.resume());
    }
  }, () => {
    // EIO: the VE side is closed and everything it wrote went to the channel.
    exit.ended();
  });

  const input = ptyWriter(master, channel, PTY_WRITE_QUEUE_MAX);
  channel.on('data', (d: Buffer) => {
    if (closed || exit.reported) return;
    input.push(d);
  });

  return {
    exited: exit.exited,
    resize: (cols, rows) => {
      if (closed) return;
      const s = clampPtySize(cols, rows);
      try {
        setWinsize(master, s.cols, s.rows);
      } catch { /* the terminal is gone */ }
    },
    close: () => {
      if (closed) return;
      closed = true;
      exit.stop();
      reader.stop();
      // Closing our master: the relay sees its terminal hang up.
      input.close();
    },
  };
}

/**
 * A recorded terminal: the broker keeps the pty master and taps it
 * (src/audit/recording-tap.ts); we get one end of a stream socket carrying
 * the terminal's bytes both ways, and window sizes go to the broker
 * (`resize`), which sets them on the master. EOF on the socket is the
 * terminal's end.
 */
export function tappedTerminalProcess(fd: number, channel: ServerChannel, onExit: (report: ExitReport) => void, resize: (cols: number, rows: number) => Promise<void>): SessionProcess {
  const sock = new net.Socket({ fd, readable: true, writable: true, allowHalfOpen: true });
  let closed = false;
  // The broker ends the socket once its tap read the terminal to its end;
  // the tail may still be in the socket, behind the client's window.
  const exit = exitAfterOutput(onExit, () => sock.bytesRead, () => channel.writableNeedDrain);
  sock.on('error', exit.ended);
  sock.on('end', exit.ended);
  sock.on('close', exit.ended);
  // Output to the channel with its window; input to the broker as the socket takes it.
  sock.pipe(channel, { end: false });
  // Input typed after a window change reaches the terminal after it (as
  // behind a TIOCSWINSZ on a master we held): held while a resize is asked.
  let resizing = 0;
  const held: Buffer[] = [];
  const send = (d: Buffer) => {
    if (closed || exit.reported || sock.destroyed) return;
    if (!sock.write(d)) {
      channel.pause();
      sock.once('drain', () => channel.resume());
    }
  };
  channel.on('data', (d: Buffer) => {
    if (resizing > 0) {
      held.push(d);
      if (held.length === 1) channel.pause();
      return;
    }
    send(d);
  });
  return {
    exited: exit.exited,
    resize: (cols, rows) => {
      if (closed) return;
      const s = clampPtySize(cols, rows);
      resizing += 1;
      void resize(s.cols, s.rows).then(() => {
        resizing -= 1;
        if (resizing > 0) return;
        for (const d of held.splice(0)) send(d);
        if (channel.isPaused()) channel.resume();
      });
    },
    close: () => {
      if (closed) return;
      closed = true;
      exit.stop();
      sock.destroy();
    },
  };
}

/**
 * The pipe case: [stdio, stderr] stream sockets. stdin and stdout share one
 * (our half-close is the process's EOF on stdin); stderr goes to the
 * channel's extended data, or to `onStderr` (sftp-server's log). The exit is
 * reported once stdout and stderr both reached their end and the broker
 * said the process ended.
 */
export function pipeProcess(
  fds: number[],
  channel: ServerChannel,
  onExit: (report: ExitReport) => void,
  opts: { onStderr?: (chunk: Buffer) => void } = {},
): SessionProcess {
  const io = new net.Socket({ fd: fds[0]!, readable: true, writable: true, allowHalfOpen: true });
  const err = new net.Socket({ fd: fds[1]!, readable: true, writable: false });
  for (const extra of fds.slice(2)) closeFd(extra);
  let report: ExitReport | null = null;
  let outEnded = false;
  let errEnded = false;
  let finished = false;
  // As sshd: the session ends when the process exited AND its output reached
  // EOF (a background job that keeps stdout open keeps the session, until
  // the client closes it).
  const finish = () => {
    if (finished || !report || !(outEnded && errEnded)) return;
    finished = true;
    onExit(report);
  };
  io.on('error', () => undefined);
  err.on('error', () => undefined);
  io.on('end', () => {
    outEnded = true;
    finish();
  });
  io.on('close', () => {
    outEnded = true;
    finish();
  });
  err.on('end', () => {
    errEnded = true;
    finish();
  });
  err.on('close', () => {
    errEnded = true;
    finish();
  });
  // client → process; the client's EOF becomes a half-close (EOF on stdin).
  channel.pipe(io);
  io.pipe(channel, { end: false });
  if (opts.onStderr) err.on('data', opts.onStderr);
  else err.pipe(channel.stderr, { end: false });
  return {
    exited: (r) => {
      report = r;
      finish();
    },
    resize: () => undefined,
    close: () => {
      io.destroy();
      err.destroy();
    },
  };
}
