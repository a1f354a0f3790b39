import { createRequire } from 'node:module';
import type { Socket } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCodes, VeshError } from '../errors.js';

/**
 * Typed access to dist/fdpass.node (src/native/vesh-fdpass.c): SEQPACKET
 * frames with SCM_RIGHTS between the broker and its workers, ptys, peer
 * credentials, and the worker's seccomp lockdown. Node offers SCM_RIGHTS only
 * through its IPC channel, which trusts its peer; these calls trust nothing
 * that arrives.
 *
 * Every failure throws an Error whose `code` is the errno name ('EAGAIN',
 * 'EPIPE', …), 'ETRUNC' for a truncated frame, and whose message names the call.
 */

export type SocketKind = 'seqpacket' | 'stream';

export interface ReceivedFrame {
  data: Buffer;
  /** Descriptors that came with the frame (close-on-exec); the caller owns them. */
  fds: number[];
}

export interface FdWatch {
  /** Also report writability (until called with false); readability is always reported. */
  setWritable(want: boolean): void;
  /** Stops watching (does not close the descriptor); safe twice and from inside the callback. */
  close(): void;
}

export interface Pty {
  /** Nonblocking, close-on-exec. */
  master: number;
  /** Blocking, close-on-exec, not this process's controlling terminal. */
  slave: number;
}

export interface PeerCred {
  pid: number;
  uid: number;
  gid: number;
}

interface FdpassAddon {
  socketpair(kind: SocketKind): [number, number];
  setBlocking(fd: number, blocking: boolean): void;
  sendFrame(fd: number, data: Buffer, fds: number[]): boolean;
  recvFrame(fd: number, maxBytes: number): ReceivedFrame | null | false;
  watch(fd: number, onEvent: (readable: boolean, writable: boolean, error: boolean) => void): FdWatch;
  callSync(fd: number, data: Buffer, timeoutMs: number, maxBytes: number): Buffer;
  closeFd(fd: number): void;
  dupFd(fd: number): number;
  shutdownFd(fd: number, how: 'read' | 'write' | 'both'): void;
  openPty(): Pty;
  setWinsize(fd: number, cols: number, rows: number): void;
  peerCred(fd: number): PeerCred;
  tcpIdle(fd: number): TcpIdle;
  quickAck(fd: number): void;
  lockdown(): void;
  spawn(file: string, argv: string[], env: string[], stdio: [number, number, number]): SpawnedChild;
  reap(pidfd: number): ProcessEnd | null;
  connectUnix(path: string): number;
  isPtyMaster(fd: number): boolean;
}

/** dist/fdpass.node, the same path from src/ (tests) and from dist/ (the installed command). */
export function fdpassAddonPath(): string {
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../dist/fdpass.node');
}

let loaded: FdpassAddon | undefined;

function addon(): FdpassAddon {
  if (loaded === undefined) {
    const file = fdpassAddonPath();
    try {
      loaded = createRequire(import.meta.url)(file) as FdpassAddon;
    } catch (err) {
      throw new VeshError(ErrorCodes.COMMAND_MISSING, `the native addon ${file} could not be loaded (${(err as Error).message}): run "npm run build" in the vesh directory (needs gcc and Node's headers)`, { cause: err });
    }
  }
  return loaded;
}

/** An AF_UNIX socketpair, both ends nonblocking and close-on-exec; a seqpacket pair fits a 256 KiB frame. */
export function socketpair(kind: SocketKind): [number, number] {
  return addon().socketpair(kind);
}

export function setBlocking(fd: number, blocking: boolean): void {
  addon().setBlocking(fd, blocking);
}

/**
 * Sends one frame (nonempty) with up to 16 descriptors: true when sent whole,
 * false when the socket is full (EAGAIN, nothing sent). The kernel takes its
 * own references to `fds` at this call; the caller still owns its copies.
 */
export function sendFrame(fd: number, data: Buffer, fds: number[] = []): boolean {
  return addon().sendFrame(fd, data, fds);
}

/**
 * Receives one frame of at most maxBytes: null when none is waiting, false
 * when the peer closed. A frame over maxBytes or 16 descriptors throws ETRUNC,
 * control data other than descriptors throws EBADMSG; what arrived is closed.
 */
export function recvFrame(fd: number, maxBytes: number): ReceivedFrame | null | false {
  return addon().recvFrame(fd, maxBytes);
}

/** Calls onEvent from the event loop when fd is readable (or hung up), or writable while asked for. */
export function watch(fd: number, onEvent: (readable: boolean, writable: boolean, error: boolean) => void): FdWatch {
  return addon().watch(fd, onEvent);
}

/**
 * One blocking request and answer on a dedicated SEQPACKET socket (no
 * descriptors either way): ETIMEDOUT after timeoutMs, EPIPE when the peer is gone.
 * After ETIMEDOUT (or ETRUNC/EBADMSG) the late answer may still come and would
 * be read as the answer to the next request: close that socket, never reuse it.
 */
export function callSync(fd: number, data: Buffer, timeoutMs: number, maxBytes: number): Buffer {
  return addon().callSync(fd, data, timeoutMs, maxBytes);
}

export function closeFd(fd: number): void {
  addon().closeFd(fd);
}

/** A close-on-exec duplicate of fd. */
export function dupFd(fd: number): number {
  return addon().dupFd(fd);
}

/** shutdown(2); a socket that is not connected is not an error. */
export function shutdownFd(fd: number, how: 'read' | 'write' | 'both'): void {
  addon().shutdownFd(fd, how);
}

/** A new pty pair from /dev/ptmx (master nonblocking). */
export function openPty(): Pty {
  return addon().openPty();
}

/** TIOCSWINSZ on a pty (either end). */
export function setWinsize(fd: number, cols: number, rows: number): void {
  addon().setWinsize(fd, cols, rows);
}

/** The process that made the other end of a unix socket (SO_PEERCRED). */
export function peerCred(fd: number): PeerCred {
  return addon().peerCred(fd);
}

/** A TCP socket's recent traffic, as the kernel saw it (TCP_INFO). */
export interface TcpIdle {
  /** Milliseconds since data last arrived from the peer (acks alone do not count). */
  lastDataRecvMs: number;
  lastDataSentMs: number;
  /** The kernel's TCP state number (1 = established). */
  state: number;
}

/** TCP_INFO of a socket we hold (throws with code ENOTSOCK, EOPNOTSUPP… for anything else). */
export function tcpIdle(fd: number): TcpIdle {
  return addon().tcpIdle(fd);
}

/**
 * Reads shorter than this (every packet of a login, keystrokes, channel
 * requests) are ACKed at once: clients that leave Nagle on hold their next
 * small packet until the last is ACKed, and when the server has no reply to
 * send (their KEXINIT crossing ours, their NEWKEYS), Linux's delayed ACK made
 * that a ~40 ms stall in about half of OpenSSH's `ssh host cmd` logins. Bulk
 * reads (uploads) keep delayed ACKs: fewer packets, and nothing waits on them.
 */
const QUICK_ACK_BELOW = 8192;

/**
 * After a read of `bytes` from TCP socket fd: when it was short, ACK it now
 * and leave delayed-ACK mode for the next segments (TCP_QUICKACK). A socket
 * closing under us is left alone (nothing waits for an ACK then).
 */
export function ackShortRead(fd: number, bytes: number): void {
  if (bytes >= QUICK_ACK_BELOW) return;
  try {
    addon().quickAck(fd);
  } catch { /* closing */ }
}

/**
 * The descriptor under a connected net.Socket, or null when it has none (not
 * yet connected, already closed). Node keeps it in the socket's private
 * `_handle`; this is the one place we read it.
 */
export function socketFd(socket: Socket): number | null {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : null;
}

/**
 * Locks the worker down, irreversibly: non-dumpable (a sibling of the same
 * uid cannot open its /proc/PID/mem or fds), no_new_privs, and the seccomp
 * filter on every thread of the process: no new processes, no exec, no
 * network sockets (AF_UNIX only), no connect/bind/listen/accept, no mounts or
 * namespaces. Call once every module is loaded.
 */
export function lockdown(): void {
  addon().lockdown();
}

/** A process started by spawn(): its pid, and a pidfd that turns readable when it ends. */
export interface SpawnedChild {
  pid: number;
  pidfd: number;
}

/** How a process ended: its exit code (-1 when a signal ended it) and that signal's number (0 when none). */
export interface ProcessEnd {
  code: number;
  signal: number;
}

/**
 * Start `file` (absolute) with `argv` (argv[0] included) and `env` ("K=V"),
 * stdio[i] as its descriptor i, every signal at its default action, without
 * forking this process (posix_spawn): a fork of a large Node process stops
 * its event loop for milliseconds. Reap it with reap() once its pidfd is
 * readable (watch()), then close the pidfd.
 */
export function spawn(file: string, argv: string[], env: Record<string, string>, stdio: [number, number, number]): SpawnedChild {
  return addon().spawn(file, argv, Object.entries(env).map(([k, v]) => `${k}=${v}`), stdio);
}

/** How a spawn()ed process ended, or null while it runs (the pidfd stays open: close it). */
export function reap(pidfd: number): ProcessEnd | null {
  return addon().reap(pidfd);
}

/**
 * A SOCK_SEQPACKET connection to the unix socket listening at `path`
 * (nonblocking, close-on-exec); throws ECONNREFUSED, ENOENT, or EAGAIN when
 * its backlog is full (a unix connect never waits).
 */
export function connectUnix(path: string): number {
  return addon().connectUnix(path);
}

/** Whether fd is a pseudo-terminal's master (a character device that answers TIOCGPTN). */
export function isPtyMaster(fd: number): boolean {
  return addon().isPtyMaster(fd);
}
