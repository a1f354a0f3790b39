import { spawn, type ChildProcess } from 'node:child_process';
import * as pty from 'node-pty';
import type { ServerChannel } from 'ssh2';
import type { HostCommand } from '../runtime/types.js';
import { exitReport, relaySignal, type ExitReport } from './exit-status.js';
import { HANGUP_GRACE_MS, PTY_INPUT_QUEUE_MAX, clampPtySize } from './limits.js';

/**
 * The host-side process of a session: `runc exec` or our session relay
 * (from VeAccess, already charged to the VE's relay cgroup), which
 * runs the real program inside the VE and relays its stdio, exit status,
 * window size and signals. We start it in one of two ways:
 *
 * - with a terminal: under node-pty; runc exec -t then takes a terminal from
 *   the VE's own devpts and copies between it and ours.
 * - without: with three pipes, so stdout and stderr stay apart.
 *
 * Signals go to the relay (runc, or our session relay), which forwards them
 * to the process in the VE; SIGKILL, which no relay can catch, is sent as
 * KILL_RELAY_SIGNAL (see exit-status.ts).
 */
export interface SessionProcess {
  readonly pid: number;
  signal(sig: NodeJS.Signals): void;
  resize(cols: number, rows: number): void;
  /**
   * The session is closing: SIGHUP, as a terminal hang-up does, and if the
   * relay is still there after a grace period, SIGKILL it.
   */
  hangup(): void;
}

/**
 * The environment of the relay itself (not of the VE process, whose env
 * travels in its request): a fixed allow-list, plus what the command asks
 * for (the session request, kept off the command line that ps shows).
 */
function relayEnv(cmd: HostCommand, term?: string): Record<string, string> {
  const env: Record<string, string> = { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', LANG: 'C.UTF-8' };
  if (term) env.TERM = term;
  return { ...cmd.env, ...env };
}

function scheduleKill(kill: () => void, isDone: () => boolean): void {
  const t = setTimeout(() => {
    if (!isDone()) kill();
  }, HANGUP_GRACE_MS);
  t.unref();
}

/**
 * Start `cmd` under a pseudo-terminal and relay it to `channel`. `onExit` is
 * called once, after the last output byte was handed to the channel.
 */
export function startPtyProcess(
  cmd: HostCommand,
  opts: { term: string; cols: number; rows: number },
  channel: ServerChannel,
  onExit: (report: ExitReport) => void,
  onError: (err: Error) => void,
): SessionProcess {
  const size = clampPtySize(opts.cols, opts.rows);
  const term = pty.spawn(cmd.file, cmd.args, {
    name: opts.term,
    cols: size.cols,
    rows: size.rows,
    cwd: '/',
    // Never node-pty's default (our own process.env).
    env: relayEnv(cmd, opts.term),
    // Raw bytes both ways: the channel carries bytes, not text.
    encoding: null,
  });
  let exited = false;
  // node-pty rethrows socket errors other than EIO unless someone else listens.
  (term as unknown as { on(e: 'error', l: (err: Error) => void): void }).on('error', (err) => onError(err));

  term.onData((data: string | Buffer) => {
    if (!channel.write(data)) {
      term.pause();
      channel.once('drain', () => term.resume());
    }
  });
  // node-pty queues writes the terminal cannot take yet without limit; a
  // client pasting into a program that does not read would grow our memory.
  // Stop reading the channel (so its SSH window closes) while the queue is
  // long. The queue is node-pty internal; without it we only lose this guard.
  const queue = (term as unknown as { _writeStream?: { _writeQueue?: unknown[] } })._writeStream;
  let polling: NodeJS.Timeout | null = null;
  channel.on('data', (d: Buffer) => {
    if (exited) return;
    term.write(d);
    if (!polling && (queue?._writeQueue?.length ?? 0) > PTY_INPUT_QUEUE_MAX) {
      channel.pause();
      polling = setInterval(() => {
        if (exited || (queue?._writeQueue?.length ?? 0) <= PTY_INPUT_QUEUE_MAX / 2) {
          clearInterval(polling!);
          polling = null;
          channel.resume();
        }
      }, 20);
    }
  });
  term.onExit(({ exitCode, signal }) => {
    exited = true;
    if (polling) clearInterval(polling);
    onExit(exitReport(exitCode, signal ?? null, cmd.exitReporting));
  });

  return {
    pid: term.pid,
    signal: (sig) => {
      // node-pty hands the signal to process.kill, which takes numbers too.
      if (!exited) term.kill(relaySignal(sig) as NodeJS.Signals);
    },
    resize: (cols, rows) => {
      if (exited) return;
      const s = clampPtySize(cols, rows);
      try {
        term.resize(s.cols, s.rows);
      } catch (err) {
        onError(err as Error);
      }
    },
    hangup: () => {
      if (exited) return;
      term.kill('SIGHUP');
      scheduleKill(() => term.kill('SIGKILL'), () => exited);
    },
  };
}

/**
 * Start `cmd` with pipes: stdin from the channel, stdout to it, stderr to its
 * extended-data stream (or to `onStderr`, for sftp-server's log). `onExit` is
 * called once, after stdout and stderr have both been read to their end.
 */
export function startPipeProcess(
  cmd: HostCommand,
  channel: ServerChannel,
  onExit: (report: ExitReport) => void,
  onError: (err: Error) => void,
  opts: { onStderr?: (chunk: Buffer) => void } = {},
): SessionProcess {
  const child: ChildProcess = spawn(cmd.file, cmd.args, { stdio: ['pipe', 'pipe', 'pipe'], env: relayEnv(cmd), cwd: '/' });
  let exited = false;
  child.on('error', (err) => {
    onError(err);
    if (!exited) {
      exited = true;
      onExit({ kind: 'status', code: 127 });
    }
  });
  // EPIPE when the program exits without reading all its input: normal.
  child.stdin!.on('error', () => undefined);
  child.stdout!.on('error', onError);
  child.stderr!.on('error', onError);

  channel.pipe(child.stdin!);
  child.stdout!.pipe(channel, { end: false });
  if (opts.onStderr) child.stderr!.on('data', opts.onStderr);
  else child.stderr!.pipe(channel.stderr, { end: false });

  child.on('close', (code, signal) => {
    if (exited) return;
    exited = true;
    onExit(exitReport(code, signal, cmd.exitReporting));
  });

  const kill = (sig: NodeJS.Signals) => {
    try {
      child.kill(sig);
    } catch { /* already gone */ }
  };
  return {
    pid: child.pid ?? -1,
    signal: (sig) => {
      if (exited || child.pid === undefined) return;
      try {
        // process.kill, not child.kill: only it takes a signal number Node has no name for.
        process.kill(child.pid, relaySignal(sig));
      } catch { /* already gone */ }
    },
    resize: () => undefined,
    hangup: () => {
      if (exited) return;
      child.stdin!.destroy();
      kill('SIGHUP');
      // The relay may be gone already while a process in the VE (a background
      // job, or one VE root handed the descriptors to) still holds our ends of
      // its stdout and stderr: the client has gone, so free them too, or a
      // tenant keeps server descriptors for as long as it likes.
      scheduleKill(() => {
        kill('SIGKILL');
        child.stdout!.destroy();
        child.stderr!.destroy();
      }, () => exited);
    },
  };
}
