import { spawn, type ChildProcess } from 'node:child_process';
import type { HostCommand } from '../runtime/types.js';
import { exitReport, relaySignal, type ExitReport } from '../ssh/exit-status.js';
import { HANGUP_GRACE_MS, clampPtySize } from '../ssh/limits.js';
import { closeFd, openPty, setWinsize, socketpair } from '../system/fdpass.js';

/**
 * The broker's half of a session: start the host-side relay (`runc exec` or
 * our session relay, from VeAccess.processCommand, already charged to the
 * VE's relay cgroup) and give the worker only descriptors, so the session's
 * bytes never pass through the broker:
 *
 * - with a terminal: a pseudo-terminal the broker makes. The relay gets the
 *   slave as its stdin/stdout/stderr and controlling terminal (util-linux
 *   `setsid --ctty`), so a window size the worker sets on the master reaches
 *   it as SIGWINCH, as with any terminal; the worker gets the master.
 * - without: two Unix stream socketpairs, one for stdin+stdout (the worker
 *   half-closes it for EOF) and one for stderr, so the two stay apart.
 *
 * The broker keeps the process (signals, hang-up, exit status): the worker
 * cannot reach it, and asks.
 */
export interface SpawnedSession {
  readonly pid: number;
  /** The worker's descriptors, to be sent and then closed here: [master] or [stdio, stderr]. */
  readonly fds: number[];
  signal(sig: NodeJS.Signals): void;
  /** SIGHUP, as a terminal hang-up; SIGKILL to the relay if it is still there after a grace period. */
  hangup(): void;
}

/** The relay's own environment (the VE process's travels in its request): a fixed allow list. */
function relayEnv(cmd: HostCommand, term?: string): Record<string, string> {
  const env: Record<string, string> = { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', LANG: 'C.UTF-8' };
  if (term) env.TERM = term;
  return { ...cmd.env, ...env };
}

/** util-linux setsid: new session, and the inherited terminal (fd 0) made its controlling terminal. */
const SETSID = '/usr/bin/setsid';

export function spawnSession(
  cmd: HostCommand,
  pty: { term: string; cols: number; rows: number } | null,
  onExit: (report: ExitReport) => void,
): SpawnedSession {
  let child: ChildProcess;
  let workerFds: number[];
  if (pty) {
    const { master, slave } = openPty();
    try {
      const size = clampPtySize(pty.cols, pty.rows);
      setWinsize(master, size.cols, size.rows);
      child = spawn(SETSID, ['--ctty', cmd.file, ...cmd.args], { stdio: [slave, slave, slave], env: relayEnv(cmd, pty.term), cwd: '/' });
    } catch (err) {
      closeFd(master);
      throw err;
    } finally {
      closeFd(slave);
    }
    workerFds = [master];
  } else {
    const io = socketpair('stream');
    const err = socketpair('stream');
    try {
      child = spawn(cmd.file, cmd.args, { stdio: [io[1], io[1], err[1]], env: relayEnv(cmd), cwd: '/' });
    } catch (e) {
      closeFd(io[0]);
      closeFd(err[0]);
      throw e;
    } finally {
      closeFd(io[1]);
      closeFd(err[1]);
    }
    workerFds = [io[0], err[0]];
  }
  let exited = false;
  const finish = (report: ExitReport) => {
    if (exited) return;
    exited = true;
    onExit(report);
  };
  // A failed exec (the relay binary gone) is reported as the shell's "not found".
  child.on('error', () => finish({ kind: 'status', code: 127 }));
  child.on('exit', (code, signal) => finish(exitReport(code, signal, cmd.exitReporting)));
  const kill = (sig: NodeJS.Signals | number) => {
    if (exited || child.pid === undefined) return;
    try {
      process.kill(child.pid, sig);
    } catch { /* already gone */ }
  };
  return {
    pid: child.pid ?? -1,
    fds: workerFds,
    signal: (sig) => kill(relaySignal(sig)),
    hangup: () => {
      if (exited) return;
      kill('SIGHUP');
      const t = setTimeout(() => kill('SIGKILL'), HANGUP_GRACE_MS);
      t.unref();
    },
  };
}
