import { accessSync, constants as fsc } from 'node:fs';
import path from 'node:path';
import type { HostCommand } from '../runtime/types.js';
import { exitReport, relaySignal, type ExitReport } from '../ssh/exit-status.js';
import { HANGUP_GRACE_MS, clampPtySize } from '../ssh/limits.js';
import { closeFd, openPty, reap, setBlocking, setWinsize, socketpair, spawn, watch } from '../system/fdpass.js';
import type { HoldableTerminal } from './agent-session.js';

/**
 * The broker's half of a session when it cannot ask the VE's session agent
 * itself (agent-session.ts: no agent runs yet, or it does not answer): start
 * the host-side relay (`runc exec` or our session relay, from
 * VeAccess.processCommand, already charged to the VE's relay cgroup) and
 * give the worker only descriptors, so the session's bytes never pass
 * through the broker:
 *
 * - with a terminal: a pseudo-terminal the broker makes. The relay gets the
 *   slave as its stdin/stdout/stderr and controlling terminal (util-linux
 *   `setsid --ctty`), so a window size the worker sets on the master reaches
 *   it as SIGWINCH, as with any terminal; the worker gets the master.
 * - without: two Unix stream socketpairs, one for stdin+stdout (the worker
 *   half-closes it for EOF) and one for stderr, so the two stay apart.
 *
 * The broker keeps the process (signals, hang-up, exit status): the worker
 * cannot reach it, and asks. It is started with posix_spawn (fdpass spawn),
 * not Node's child_process, which forks the whole broker and stops its event
 * loop for milliseconds per session (5 ms at 100 MB here) while workers wait
 * on it for key-exchange signatures.
 */
export interface SpawnedSession {
  readonly pid: number;
  /** The worker's descriptors, to be sent and then closed here: [master] or [stdio, stderr]. */
  readonly fds: number[];
  signal(sig: NodeJS.Signals): void;
  /** SIGHUP, as a terminal hang-up; SIGKILL to the relay if it is still there after a grace period. */
  hangup(): void;
  /** Set for a terminal the VE's session agent holds when the connection drops (agent-session.ts); never on the relay path. */
  holdable?: HoldableTerminal;
}

/** The relay's own environment (the VE process's travels in its request): a fixed allow list. */
function relayEnv(cmd: HostCommand, term?: string): Record<string, string> {
  const env: Record<string, string> = { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', LANG: 'C.UTF-8' };
  if (term) env.TERM = term;
  return { ...cmd.env, ...env };
}

/** util-linux setsid: new session, and the inherited terminal (fd 0) made its controlling terminal. */
const SETSID = '/usr/bin/setsid';

const RELAY_PATH = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'];
const resolved = new Map<string, string>();

/** An absolute path for `file` (posix_spawn does no PATH search): as given, or found on the relay's PATH. */
function programPath(file: string): string {
  if (path.isAbsolute(file)) return file;
  const known = resolved.get(file);
  if (known) return known;
  for (const dir of RELAY_PATH) {
    const p = path.join(dir, file);
    try {
      accessSync(p, fsc.X_OK);
      resolved.set(file, p);
      return p;
    } catch { /* next */ }
  }
  return file;
}

export function spawnSession(
  cmd: HostCommand,
  pty: { term: string; cols: number; rows: number } | null,
  onExit: (report: ExitReport) => void,
): SpawnedSession {
  let child: { pid: number; pidfd: number };
  let workerFds: number[];
  if (pty) {
    const { master, slave } = openPty();
    try {
      const size = clampPtySize(pty.cols, pty.rows);
      setWinsize(master, size.cols, size.rows);
      child = spawn(SETSID, [SETSID, '--ctty', programPath(cmd.file), ...cmd.args], relayEnv(cmd, pty.term), [slave, slave, slave]);
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
      // The child's ends must block, as stdio does everywhere (socketpair()
      // makes both ends non-blocking; a shell's `read` would see EOF).
      setBlocking(io[1], true);
      setBlocking(err[1], true);
      const file = programPath(cmd.file);
      child = spawn(file, [cmd.file, ...cmd.args], relayEnv(cmd), [io[1], io[1], err[1]]);
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
  const w = watch(child.pidfd, () => {
    let end;
    try {
      end = reap(child.pidfd);
    } catch {
      end = { code: 255, signal: 0 };
    }
    if (!end || exited) return;
    exited = true;
    w.close();
    closeFd(child.pidfd);
    onExit(exitReport(end.signal ? null : end.code, end.signal || null, cmd.exitReporting));
  });
  const kill = (sig: NodeJS.Signals | number) => {
    // Never after the reap: the pid may belong to someone else by then.
    if (exited) return;
    try {
      process.kill(child.pid, sig);
    } catch { /* already gone */ }
  };
  return {
    pid: child.pid,
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
