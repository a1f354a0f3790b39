import { fstatSync, readSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import type { ExitReport } from '../ssh/exit-status.js';
import { HANGUP_GRACE_MS, clampPtySize } from '../ssh/limits.js';
import { closeFd, connectUnix, isPtyMaster, recvFrame, sendFrame, setBlocking, socketpair, watch } from '../system/fdpass.js';
import type { AgentRoute } from '../ve/access.js';
import type { SpawnedSession } from './session-spawn.js';

/**
 * A session started by asking the VE's session agent ourselves: no host
 * process per session. The relay path (session-spawn.ts: `vesh-session join
 * … attach`) starts a host process, moves it into the VE's relay cgroup and
 * execs the relay; on this host's cgroup v1 the move alone waits for an RCU
 * grace period (cgroup_threadgroup_rwsem), 10–15 ms of a warm login's ~35.
 * Here the broker sends the agent the request and, without a terminal, the
 * process's stdio (two socketpair ends, the other ends go to the worker);
 * with one, the agent opens it in the VE's devpts and hands back the master,
 * which goes to the worker as it is. The broker keeps one socket per session
 * to the agent: signals go down it, the exit status comes up it.
 *
 * The agent runs inside the VE, so VE root can replace it: nothing it sends
 * is trusted. Every message is one fixed-size datagram (a bigger one fails
 * the session), a terminal must be a pty master (fstat + TIOCGPTN, checked
 * here before a worker sees it), other descriptors are closed, the start has
 * a deadline, and an exit status is read only as a wait status. What a
 * session holds on the host is that one socket in the broker, bounded by the
 * session caps (sessions.maxSessionsPerAccount), and the terminal is charged
 * to the VE's own devpts (its max=), not to the host's.
 *
 * The wire format mirrors src/native/vesh-session.c (struct req_head and
 * struct msg); the session tests run it against the real agent.
 */

/** The agent did not take the request (gone, no socket, request too big): the caller falls back to the relay path. */
export class AgentUnavailable extends Error {}

const MAGIC = 0x76657368; /* "vesh" */
/** REQ_MAX in vesh-session.c: the agent's receive buffer. */
const REQ_MAX = 60 * 1024;
/** MAX_GROUPS in vesh-session.c. */
const MAX_GROUPS = 256;
/** struct req_head: magic, tty, uid, gid (u32), rows, cols (u16), ngroups, nenv, nargv (u32). */
const HEAD_BYTES = 32;
/** struct msg: type (u32), value (i32), text[200]. */
const MSG_BYTES = 208;
const MSG_STARTED = 1;
const MSG_EXIT = 2;
const MSG_ERROR = 3;
const MSG_SIGNAL = 4;
const MSG_DETACH = 5;
const MSG_ATTACH = 6;
const MSG_ATTACHED = 7;
/** TTY_HOLD in vesh-session.c: the agent keeps a copy of the terminal's master, so a dropped connection is no hang-up. */
const TTY_HOLD = 2;

/** How long the agent may take to hand a held terminal back (no fork: a pipe and two ioctls). */
const ATTACH_DEADLINE_MS = 10_000;

/** How long the agent may take to answer a request (a fork in the VE; the VE may be loaded). */
const START_DEADLINE_MS = 30_000;

/** The agent's request for `p`: struct req_head, the groups, then cwd, env and argv, each ended by a NUL; null when it cannot carry it. */
export function encodeAgentRequest(p: AgentRoute['process'], hold = false): Buffer | null {
  const env = Object.entries(p.env).map(([k, v]) => `${k}=${v}`);
  const strings = [p.cwd ?? '', ...env, ...p.argv];
  if (p.argv.length < 1 || p.groups.length > MAX_GROUPS || strings.some((s) => s.includes('\0'))) return null;
  const body = Buffer.from(`${strings.join('\0')}\0`, 'utf8');
  const size = HEAD_BYTES + p.groups.length * 4 + body.length;
  if (size > REQ_MAX) return null;
  const buf = Buffer.alloc(size);
  buf.writeUInt32LE(MAGIC, 0);
  buf.writeUInt32LE(p.tty ? (hold ? 1 | TTY_HOLD : 1) : 0, 4);
  buf.writeUInt32LE(p.uid >>> 0, 8);
  buf.writeUInt32LE(p.gid >>> 0, 12);
  buf.writeUInt16LE(p.consoleSize?.rows ?? 0, 16);
  buf.writeUInt16LE(p.consoleSize?.cols ?? 0, 18);
  buf.writeUInt32LE(p.groups.length, 20);
  buf.writeUInt32LE(env.length, 24);
  buf.writeUInt32LE(p.argv.length, 28);
  p.groups.forEach((g, i) => buf.writeUInt32LE(g >>> 0, HEAD_BYTES + i * 4));
  body.copy(buf, HEAD_BYTES + p.groups.length * 4);
  return buf;
}

function message(type: number, value: number): Buffer {
  const m = Buffer.alloc(MSG_BYTES);
  m.writeUInt32LE(type, 0);
  m.writeInt32LE(value, 4);
  return m;
}

const SIGNAL_NAMES = new Map<number, string>(Object.entries(osConstants.signals).map(([name, num]) => [num, name.replace(/^SIG/, '')]));
/** Signals whose default action is not to end a process (and glibc's two reserved ones). */
const NOT_ENDING = new Set(['CHLD', 'CONT', 'STOP', 'TSTP', 'TTIN', 'TTOU', 'URG', 'WINCH']);

/**
 * What the client is told for a wait status from the agent, as the relay's
 * exit_like() did: an exit code, a signal that ends a process, and anything
 * else (a "stopped" or a signal that does not end one: only a lying agent
 * sends these) as the exit status 128+N.
 */
export function exitFromWaitStatus(status: number): ExitReport {
  const low = status & 0x7f;
  if (low === 0) return { kind: 'status', code: (status >> 8) & 0xff };
  if (low === 0x7f) return { kind: 'status', code: 255 };
  const name = SIGNAL_NAMES.get(low);
  if (name && !NOT_ENDING.has(name)) return { kind: 'signal', signal: name };
  return { kind: 'status', code: 128 + low };
}

/** The agent's own words (an error's text), made safe for a log line and a client's terminal. */
function agentText(m: Buffer): string {
  const raw = m.subarray(8, MSG_BYTES);
  const end = raw.indexOf(0);
  return raw.subarray(0, end < 0 ? raw.length : end).toString('latin1').replace(/[^\x20-\x7e]/g, '?').slice(0, 160);
}

/** A terminal's master as the agent handed it over first: the devpts it came from (its ptmx inode). */
interface PtyOrigin {
  dev: number;
  ino: number;
}

function ptyOrigin(fd: number): PtyOrigin {
  const st = fstatSync(fd);
  return { dev: st.dev, ino: st.ino };
}

/**
 * The held output the agent wrote into `fd` (a pipe) before it answered:
 * only what is there now (a lying agent that keeps writing is not waited
 * for), at most `max` bytes. Closes `fd`.
 */
function readHeldOutput(fd: number, max: number): Buffer {
  const parts: Buffer[] = [];
  let total = 0;
  try {
    setBlocking(fd, false);
    const chunk = Buffer.alloc(64 * 1024);
    while (total < max) {
      let n: number;
      try {
        n = readSync(fd, chunk, 0, Math.min(chunk.length, max - total), null);
      } catch {
        break; // EAGAIN: all the agent wrote is read
      }
      if (n <= 0) break;
      parts.push(Buffer.from(chunk.subarray(0, n)));
      total += n;
    }
  } finally {
    closeFd(fd);
  }
  return Buffer.concat(parts, total);
}

/**
 * A terminal session the agent can hold when its connection drops (the
 * account's persistentShells). Only the broker's socket to the agent names
 * the held terminal: there is nothing a worker or a client could point at.
 */
export interface HoldableTerminal {
  /** Who hears of the process's end from now on (the connection holding it, or the held-shell registry). */
  onExit: (report: ExitReport) => void;
  /** Nobody reads the terminal now: the agent keeps the newest `bufferBytes` of its output. */
  detach(bufferBytes: number): void;
  /**
   * Hand it to a new client of window `cols` x `rows`: resolves with the
   * terminal's master (checked: a pty master of the devpts the session
   * started on) and the output held meanwhile (at most `bufferBytes`).
   */
  attach(cols: number, rows: number, bufferBytes: number): Promise<{ fd: number; replay: Buffer }>;
}

/**
 * Ask the agent at `route.socket` for the process; resolves once it started
 * (with the worker's descriptors: [pty master] or [stdio, stderr]), rejects
 * with AgentUnavailable when the agent could not be asked (then nothing was
 * started), or with an Error carrying the agent's reason when it refused.
 * With `hold` (a terminal only) the session gets a HoldableTerminal.
 */
export function startAgentSession(route: AgentRoute, onExit: (report: ExitReport) => void, hold = false): Promise<SpawnedSession> {
  hold = hold && route.process.tty;
  const request = encodeAgentRequest(route.process, hold);
  if (!request) return Promise.reject(new AgentUnavailable('the request does not fit the session agent'));
  let sock: number;
  try {
    sock = connectUnix(route.socket);
  } catch (err) {
    return Promise.reject(new AgentUnavailable(`no session agent answers: ${(err as Error).message}`));
  }
  const tty = route.process.tty;
  let workerFds: number[] = [];
  try {
    if (tty) {
      if (!sendFrame(sock, request)) throw new Error('the agent\'s socket is full');
    } else {
      const io = socketpair('stream');
      const err = socketpair('stream');
      workerFds = [io[0], err[0]];
      try {
        // The process's ends block, as stdio does everywhere (a shell's `read` would see EOF).
        setBlocking(io[1], true);
        setBlocking(err[1], true);
        if (!sendFrame(sock, request, [io[1], io[1], err[1]])) throw new Error('the agent\'s socket is full');
      } finally {
        closeFd(io[1]);
        closeFd(err[1]);
      }
    }
  } catch (err) {
    for (const fd of workerFds) closeFd(fd);
    closeFd(sock);
    return Promise.reject(new AgentUnavailable(`the session agent did not take the request: ${(err as Error).message}`));
  }

  return new Promise<SpawnedSession>((resolve, reject) => {
    let state: 'starting' | 'running' | 'ended' = 'starting';
    let vePid = 0;
    let graceTimer: NodeJS.Timeout | null = null;
    let origin: PtyOrigin | null = null;
    /** A re-attach waiting for the agent's answer. */
    let attaching: { resolve: (v: { fd: number; replay: Buffer }) => void; reject: (e: Error) => void; max: number; timer: NodeJS.Timeout } | null = null;
    let exitTo = onExit;
    const end = () => {
      state = 'ended';
      clearTimeout(deadline);
      if (graceTimer) clearTimeout(graceTimer);
      if (attaching) {
        clearTimeout(attaching.timer);
        attaching.reject(new Error('the held shell ended'));
        attaching = null;
      }
      w.close();
      closeFd(sock);
    };
    const failStart = (err: Error) => {
      end();
      for (const fd of workerFds) closeFd(fd);
      reject(err);
    };
    const finish = (report: ExitReport) => {
      if (state !== 'running') return;
      end();
      // Not before the code that awaits the start has run (it may arrive in
      // the same read as "started"): the caller records the session and sends
      // its descriptors first, as with a relay, whose end comes later anyway.
      setImmediate(() => exitTo(report));
    };
    const deadline = setTimeout(() => failStart(new Error(`the session agent in the VE did not answer in ${START_DEADLINE_MS / 1000} s`)), START_DEADLINE_MS);
    deadline.unref();
    const send = (sig: number) => {
      if (state !== 'running') return;
      try {
        sendFrame(sock, message(MSG_SIGNAL, sig));
      } catch { /* the agent is gone: its exit (or our hang-up timer) ends the session */ }
    };
    const session: SpawnedSession = {
      get pid() {
        return vePid;
      },
      get fds() {
        return workerFds;
      },
      signal: (sig) => {
        const n = osConstants.signals[sig];
        if (n) send(n);
      },
      hangup: () => {
        if (state !== 'running') return;
        send(osConstants.signals.SIGHUP);
        // A process that ignores the hang-up goes on in the VE, as under sshd
        // (nohup); we stop waiting for it and free its place.
        graceTimer ??= setTimeout(() => finish({ kind: 'signal', signal: 'HUP' }), HANGUP_GRACE_MS);
        graceTimer.unref();
      },
    };
    if (hold) {
      session.holdable = {
        get onExit() {
          return exitTo;
        },
        set onExit(f) {
          exitTo = f;
        },
        detach: (bufferBytes) => {
          if (state !== 'running') return;
          try {
            sendFrame(sock, message(MSG_DETACH, bufferBytes));
          } catch { /* the agent is gone: its end reaches the holder */ }
        },
        attach: (cols, rows, bufferBytes) => new Promise((res, rej) => {
          if (state !== 'running' || attaching) return rej(new Error('the held shell is not there to attach'));
          const size = clampPtySize(cols, rows);
          try {
            if (!sendFrame(sock, message(MSG_ATTACH, ((size.rows & 0xffff) << 16) | (size.cols & 0xffff)))) throw new Error('the agent\'s socket is full');
          } catch (err) {
            return rej(err as Error);
          }
          const timer = setTimeout(() => {
            attaching = null;
            rej(new Error(`the session agent in the VE did not hand the held shell back in ${ATTACH_DEADLINE_MS / 1000} s`));
            session.hangup();
          }, ATTACH_DEADLINE_MS);
          timer.unref();
          attaching = { resolve: res, reject: rej, max: bufferBytes, timer };
        }),
      };
    }
    /**
     * The agent's answer to MSG_ATTACH: [master, pipe of held output]. The
     * master must be a pty master of the same devpts as at the start (an
     * agent VE root replaced could hand over anything); otherwise the held
     * shell is hung up and the client told.
     */
    const onAttached = (type: number, fds: number[], text: string) => {
      const a = attaching!;
      attaching = null;
      clearTimeout(a.timer);
      let why: string | null = null;
      if (type === MSG_ERROR) why = `the session agent in the VE could not hand the held shell back: ${text}`;
      else if (type !== MSG_ATTACHED || fds.length !== 2) why = 'the session agent in the VE answered the re-attach out of turn';
      else if (!isPtyMaster(fds[0]!)) why = 'the session agent in the VE answered the re-attach without a terminal';
      else {
        const o = ptyOrigin(fds[0]!);
        if (!origin || o.dev !== origin.dev || o.ino !== origin.ino) why = 'the session agent in the VE answered the re-attach with a terminal of another devpts';
        else if (!fstatSync(fds[1]!).isFIFO()) why = 'the session agent in the VE answered the re-attach without its held output';
      }
      if (why) {
        for (const fd of fds) closeFd(fd);
        a.reject(new Error(why));
        session.hangup();
        return;
      }
      setBlocking(fds[0]!, false);
      a.resolve({ fd: fds[0]!, replay: readHeldOutput(fds[1]!, a.max) });
    };
    const onMessage = (data: Buffer, fds: number[]) => {
      const type = data.length === MSG_BYTES ? data.readUInt32LE(0) : 0;
      const value = data.length === MSG_BYTES ? data.readInt32LE(4) : 0;
      if (state === 'starting') {
        if (type === MSG_STARTED && (tty ? fds.length === 1 && isPtyMaster(fds[0]!) : fds.length === 0)) {
          vePid = value;
          if (tty) {
            setBlocking(fds[0]!, false);
            workerFds = [fds[0]!];
            origin = ptyOrigin(fds[0]!);
          }
          state = 'running';
          clearTimeout(deadline);
          resolve(session);
          return;
        }
        for (const fd of fds) closeFd(fd);
        if (type === MSG_ERROR) failStart(new Error(`the session agent in the VE could not start it: ${agentText(data)}`));
        else failStart(new Error(tty ? 'the session agent in the VE answered without a terminal' : 'the session agent in the VE answered out of turn'));
        return;
      }
      if (attaching && type !== MSG_EXIT) {
        onAttached(type, fds, agentText(data));
        return;
      }
      for (const fd of fds) closeFd(fd);
      if (type === MSG_EXIT) finish(exitFromWaitStatus(value));
      else finish({ kind: 'status', code: 255 });
    };
    const w = watch(sock, (readable, _writable, error) => {
      while (state !== 'ended') {
        let frame;
        try {
          frame = recvFrame(sock, MSG_BYTES);
        } catch {
          frame = false as const;
        }
        if (frame === null) break;
        if (frame === false) {
          // The agent went away (VE stopped, VE root killed it) or sent what no agent sends.
          if (state === 'starting') failStart(new Error('the session agent in the VE went away'));
          else finish({ kind: 'status', code: 255 });
          return;
        }
        onMessage(frame.data, frame.fds);
      }
      if (error && !readable && state !== 'ended') {
        if (state === 'starting') failStart(new Error('the session agent in the VE went away'));
        else finish({ kind: 'status', code: 255 });
      }
    });
  });
}
