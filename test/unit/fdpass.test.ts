import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tty from 'node:tty';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../src/errors.js';
import {
  callSync, closeFd, dupFd, fdpassAddonPath, openPty, peerCred, recvFrame, sendFrame, setBlocking, setWinsize, shutdownFd, socketFd, socketpair, watch,
  reap, spawn as addonSpawn,
} from '../../src/system/fdpass.js';
import { FrameChannel } from '../../src/system/frame-channel.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const WORKER = path.join(ROOT, 'test/helpers/fdpass-worker.mjs');
const MAX_FRAME = 256 * 1024;
const NOBODY = 65534;

/**
 * A peer in another process, on fd 3 (frames) and fd 4 (blocking
 * request/answer): echoes frames with their descriptors, makes a socket of
 * its own and sends it, talks over a TCP socket it was given, answers
 * callSync requests.
 */
const PEER_SRC = `
const fdp = require(${JSON.stringify(fdpassAddonPath())});
const fs = require('fs');
const net = require('net');
function send(fd, m, fds = []) { if (!fdp.sendFrame(fd, Buffer.from(JSON.stringify(m)), fds)) throw new Error('socket full'); }
function kind(fd) { return fs.readlinkSync('/proc/self/fd/' + fd).split(':')[0]; }
const ctrl = fdp.watch(3, () => {
  for (;;) {
    const f = fdp.recvFrame(3, ${MAX_FRAME});
    if (f === null) return;
    if (f === false) process.exit(0);
    const m = JSON.parse(f.data.toString());
    if (m.op === 'echo') {
      send(3, { op: 'echoed', n: m.n, kinds: f.fds.map(kind) }, f.fds);
      f.fds.forEach((fd) => fdp.closeFd(fd));
    } else if (m.op === 'make') {
      const [a, b] = fdp.socketpair('stream');
      fdp.setBlocking(b, true);
      fs.writeSync(b, 'made by child');
      fdp.closeFd(b);
      send(3, { op: 'made' }, [a]);
      fdp.closeFd(a);
    } else if (m.op === 'tcp') {
      const s = new net.Socket({ fd: f.fds[0], readable: true, writable: true });
      s.on('error', () => {});
      s.write('hello over tcp\\n');
      s.once('data', (d) => s.end(d.toString().toUpperCase()));
    }
  }
});
const sync = fdp.watch(4, () => {
  for (;;) {
    const f = fdp.recvFrame(4, 4096);
    if (f === null) return;
    if (f === false) { sync.close(); return; }
    const q = f.data.toString();
    if (q === 'silent') continue;
    if (q === 'with-fd') { const [a, b] = fdp.socketpair('stream'); fdp.sendFrame(4, Buffer.from('x'), [a]); fdp.closeFd(a); fdp.closeFd(b); continue; }
    if (q === 'hang-up') { sync.close(); fdp.closeFd(4); return; }
    fdp.sendFrame(4, Buffer.from('answer:' + q), []);
  }
});
`;

function fdCount(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

function isOpen(fd: number): boolean {
  try {
    fs.fstatSync(fd);
    return true;
  } catch {
    return false;
  }
}

function closeQuietly(fds: number[]): void {
  for (const fd of fds) {
    try {
      closeFd(fd);
    } catch { /* closed already */ }
  }
}

function nextFrame(ch: FrameChannel): Promise<{ msg: Record<string, unknown>; fds: number[] }> {
  return new Promise((resolve, reject) => {
    const onFrame = (msg: Record<string, unknown>, fds: number[]) => {
      ch.off('close', onClose);
      resolve({ msg, fds });
    };
    const onClose = () => {
      ch.off('frame', onFrame);
      reject(new Error(`channel ${ch.name} closed while a frame was awaited`));
    };
    ch.once('frame', onFrame);
    ch.once('close', onClose);
  });
}

async function readAll(fd: number): Promise<string> {
  const s = new net.Socket({ fd, readable: true, writable: false });
  let out = '';
  s.on('data', (d: Buffer) => (out += d.toString()));
  await once(s, 'close');
  return out;
}

function killAndWait(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  const exited = once(child, 'exit').then(() => undefined);
  child.kill('SIGKILL');
  return exited;
}

describe('fdpass addon and FrameChannel', () => {
  const undo: Array<() => Promise<void> | void> = [];
  afterEach(async () => {
    while (undo.length > 0) {
      try {
        await undo.pop()!();
      } catch { /* keep cleaning */ }
    }
  });

  /** A peer process with its frame channel (fd 3) and its request/answer socket (fd 4). */
  function startPeer(): { child: ChildProcess; ch: FrameChannel; syncFd: number } {
    const [mine, theirs] = socketpair('seqpacket');
    const [syncMine, syncTheirs] = socketpair('seqpacket');
    const child = spawn(process.execPath, ['-e', PEER_SRC], { stdio: ['ignore', 'inherit', 'inherit', theirs, syncTheirs] });
    closeFd(theirs);
    closeFd(syncTheirs);
    const ch = new FrameChannel(mine, { maxFrameBytes: MAX_FRAME, name: 'peer' });
    ch.on('error', () => undefined);
    undo.push(() => killAndWait(child));
    undo.push(() => ch.close());
    undo.push(() => closeQuietly([syncMine]));
    return { child, ch, syncFd: syncMine };
  }

  it('carries frames with and without descriptors both ways between two processes', async () => {
    const { child, ch } = startPeer();

    ch.send({ op: 'echo', n: 1 });
    const plain = await nextFrame(ch);
    expect(plain).toEqual({ msg: { op: 'echoed', n: 1, kinds: [] }, fds: [] });

    // Our socket goes out, comes back as another descriptor of the same socket.
    const [a, b] = socketpair('stream');
    undo.push(() => closeQuietly([a, b]));
    ch.send({ op: 'echo', n: 2 }, [a]);
    closeFd(a);
    const back = await nextFrame(ch);
    expect(back.msg).toEqual({ op: 'echoed', n: 2, kinds: ['socket'] });
    expect(back.fds).toHaveLength(1);
    undo.push(() => closeQuietly(back.fds));
    setBlocking(b, true);
    fs.writeSync(b, 'through the child');
    shutdownFd(b, 'write');
    shutdownFd(b, 'write'); // twice: a socket already shut is not an error
    const got = await readAll(dupFd(back.fds[0]!));
    expect(got).toBe('through the child');

    // A socket the child made: its bytes arrive here.
    ch.send({ op: 'make' });
    const made = await nextFrame(ch);
    expect(made.msg).toEqual({ op: 'made' });
    expect(await readAll(made.fds[0]!)).toBe('made by child');
    expect(child.exitCode).toBeNull();
  });

  /** peerCred on the channel's socket, through a duplicate (the channel owns its fd). */
  function dupAndTrack(ch: FrameChannel): number {
    const fd = dupFd((ch as unknown as { fd: number }).fd);
    undo.push(() => closeQuietly([fd]));
    return fd;
  }

  it('hands a TCP connection to another process, which answers over it', async () => {
    const { ch } = startPeer();
    // SO_PEERCRED of a socketpair names the process that made the pair (us), not the one holding the other end.
    expect(peerCred(dupAndTrack(ch))).toEqual({ pid: process.pid, uid: process.getuid!(), gid: process.getgid!() });
    const server = net.createServer({ pauseOnConnect: true });
    undo.push(() => new Promise<void>((r) => server.close(() => r())));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    server.on('connection', (sock) => {
      const fd = dupFd(socketFd(sock)!);
      ch.send({ op: 'tcp' }, [fd]);
      closeFd(fd);
      sock.destroy(); // closes only our descriptor: the child holds the connection
    });
    const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
    undo.push(() => void client.destroy());
    let text = '';
    client.on('data', (d: Buffer) => {
      if (text === '') client.write('ping\n');
      text += d.toString();
    });
    await once(client, 'end');
    expect(text).toBe('hello over tcp\nPING\n');
  });

  it('opens a pty pair: slave output is read on the master, and setWinsize is what stty sees', async () => {
    const { master, slave } = openPty();
    undo.push(() => closeQuietly([master, slave]));
    setWinsize(master, 132, 43);
    const reader = new tty.ReadStream(master);
    undo.push(() => void reader.destroy());
    let out = '';
    reader.on('data', (d: Buffer) => (out += d.toString()));
    reader.on('error', () => undefined); // EIO once the last slave descriptor closed
    fs.writeSync(slave, 'written on the slave\n');
    const stty = spawn('stty', ['size'], { stdio: [slave, slave, slave] });
    undo.push(() => killAndWait(stty));
    const [code] = await once(stty, 'exit');
    expect(code).toBe(0);
    closeFd(slave);
    for (let i = 0; i < 200 && !out.includes('43 132'); i++) await new Promise((r) => setTimeout(r, 10));
    // The line discipline turns \n into \r\n on the way to the master.
    expect(out).toBe('written on the slave\r\n43 132\r\n');
  });

  it('a frame over maxBytes is malformed and every descriptor that came with it is closed', async () => {
    const [raw, chFd] = socketpair('seqpacket');
    undo.push(() => closeQuietly([raw]));
    const ch = new FrameChannel(chFd, { maxFrameBytes: 1024, name: 'small' });
    undo.push(() => ch.close());
    const events: string[] = [];
    ch.on('frame', () => events.push('frame'));
    ch.on('malformed', (why: string) => events.push(`malformed: ${why}`));
    const closed = once(ch, 'close').then(() => events.push('close'));
    const before = fdCount();
    const [x, y] = socketpair('stream');
    expect(sendFrame(raw, Buffer.alloc(2000, 0x41), [x, y, x])).toBe(true);
    closeFd(x);
    closeFd(y);
    await closed;
    expect(events).toEqual(['malformed: frame channel small: a frame over 1024 bytes or 16 descriptors', 'close']);
    // The channel closed its own socket too: one less than before.
    expect(fdCount()).toBe(before - 1);
    expect(isOpen(chFd)).toBe(false);
  });

  it('a frame with more than 16 descriptors (sent by a process not bound by our sendFrame) is malformed, and none of them stays open', async () => {
    const [mine, theirs] = socketpair('seqpacket');
    const ch = new FrameChannel(mine, { maxFrameBytes: 1024, name: 'many' });
    undo.push(() => ch.close());
    const reasons: string[] = [];
    ch.on('malformed', (why: string) => reasons.push(why));
    const closed = once(ch, 'close');
    const py = spawn('python3', ['-c', [
      'import os, socket',
      's = socket.socket(fileno=3)',
      'r, w = os.pipe()',
      'socket.send_fds(s, [b\'{"many":true}\'], [r] * 20)',
    ].join('\n')], { stdio: ['ignore', 'inherit', 'inherit', theirs] });
    undo.push(() => killAndWait(py));
    closeFd(theirs);
    // Nothing is read before the next await: the frame cannot have arrived here yet.
    const before = fdCount();
    const [code] = await once(py, 'exit');
    expect(code).toBe(0);
    await closed;
    expect(reasons).toEqual(['frame channel many: a frame over 1024 bytes or 16 descriptors']);
    // -1: the channel's own socket; the 16 that fit and the 4 the kernel dropped are all gone.
    expect(fdCount()).toBe(before - 1);
  });

  it('a frame that is not JSON is malformed with its descriptors closed; prototype keys never arrive', async () => {
    const [raw, chFd] = socketpair('seqpacket');
    undo.push(() => closeQuietly([raw]));
    const ch = new FrameChannel(chFd, { maxFrameBytes: 1024, name: 'json' });
    undo.push(() => ch.close());
    const frames: unknown[] = [];
    ch.on('frame', (msg: unknown) => frames.push(msg));
    expect(sendFrame(raw, Buffer.from('{"__proto__":{"polluted":1},"a":{"constructor":{"x":1},"prototype":2,"b":3},"ok":true}'), [])).toBe(true);
    await new Promise((r) => setImmediate(r));
    for (let i = 0; i < 100 && frames.length === 0; i++) await new Promise((r) => setTimeout(r, 5));
    expect(frames).toHaveLength(1);
    const msg = frames[0] as Record<string, unknown>;
    expect(Object.keys(msg)).toEqual(['a', 'ok']);
    expect(Object.keys(msg.a as object)).toEqual(['b']);
    expect(Object.getPrototypeOf(msg)).toBe(Object.prototype);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();

    const malformed = once(ch, 'malformed');
    const closed = once(ch, 'close');
    const before = fdCount();
    const [x, y] = socketpair('stream');
    expect(sendFrame(raw, Buffer.from('{"half":'), [x])).toBe(true);
    closeFd(x);
    closeFd(y);
    expect((await malformed)[0]).toBe('frame channel json: a frame that is not JSON');
    await closed;
    expect(fdCount()).toBe(before - 1);
  });

  it('queues frames while the peer does not read and delivers all 2000 in order, descriptors included', async () => {
    const [sendFd, recvFd] = socketpair('seqpacket');
    const tx = new FrameChannel(sendFd, { maxFrameBytes: MAX_FRAME, name: 'tx' });
    undo.push(() => tx.close());
    undo.push(() => closeQuietly([recvFd]));
    tx.on('error', (err: Error) => { throw err; });
    const pad = 'x'.repeat(2000);
    const [keepA, keepB] = socketpair('stream');
    undo.push(() => closeQuietly([keepA, keepB]));
    for (let seq = 0; seq < 2000; seq++) {
      if (seq % 100 === 0) {
        // The caller closes its copy at once: a queued frame must carry the channel's own.
        const d = dupFd(keepA);
        tx.send({ seq, pad }, [d]);
        closeFd(d);
      } else {
        tx.send({ seq, pad });
      }
    }
    // Nothing has run the loop yet: whatever the socket holds now went out at send(); the rest waits.
    const seqs: number[] = [];
    let withFd = 0;
    const take = (msg: { seq: number }, fds: number[]) => {
      seqs.push(msg.seq);
      if (fds.length > 0) {
        expect(fs.fstatSync(fds[0]!).isSocket()).toBe(true);
        withFd++;
        closeQuietly(fds);
      }
    };
    for (;;) {
      const f = recvFrame(recvFd, MAX_FRAME);
      if (f === null || f === false) break;
      take(JSON.parse(f.data.toString()) as { seq: number }, f.fds);
    }
    const sentAtOnce = seqs.length;
    expect(sentAtOnce).toBeGreaterThan(0);
    expect(sentAtOnce).toBeLessThan(2000);
    const rx = new FrameChannel(recvFd, { maxFrameBytes: MAX_FRAME, name: 'rx' });
    undo.push(() => rx.close());
    await new Promise<void>((resolve) => {
      rx.on('frame', (msg: { seq: number }, fds: number[]) => {
        take(msg, fds);
        if (seqs.length === 2000) resolve();
      });
    });
    expect(seqs).toEqual(Array.from({ length: 2000 }, (_, i) => i));
    expect(withFd).toBe(20);
  });

  it('gives up with LIMIT_REACHED when the peer leaves more than maxQueuedBytes unread', async () => {
    const [sendFd, recvFd] = socketpair('seqpacket');
    undo.push(() => closeQuietly([recvFd]));
    const tx = new FrameChannel(sendFd, { maxFrameBytes: MAX_FRAME, name: 'capped', maxQueuedBytes: 64 * 1024 });
    undo.push(() => tx.close());
    const events: string[] = [];
    tx.on('error', (err: { code?: string }) => events.push(`error ${err.code}`));
    // Not events.once: it rejects on 'error', which is what we wait to see first.
    const closed = new Promise<void>((r) => tx.once('close', () => { events.push('close'); r(); }));
    for (let i = 0; i < 4000 && !tx.isClosed; i++) tx.send({ i, pad: 'y'.repeat(1000) });
    expect(tx.isClosed).toBe(true);
    await closed;
    expect(events).toEqual([`error ${ErrorCodes.LIMIT_REACHED}`, 'close']);
    tx.send({ after: 'close' }); // dropped, no throw
  });

  it('emits close when the peer process goes away', async () => {
    const { child, ch } = startPeer();
    const closed = once(ch, 'close');
    let frames = 0;
    ch.on('frame', () => frames++);
    await killAndWait(child);
    await closed;
    expect(ch.isClosed).toBe(true);
    expect(frames).toBe(0);
  });

  it('callSync: an answer, ETIMEDOUT when none comes, EBADMSG for descriptors, EPIPE once the peer is gone', async () => {
    const { syncFd } = startPeer();
    expect(callSync(syncFd, Buffer.from('first'), 10_000, 4096).toString()).toBe('answer:first');
    expect(() => callSync(syncFd, Buffer.from('silent'), 100, 4096)).toThrow(expect.objectContaining({ code: 'ETIMEDOUT' }));
    const before = fdCount();
    expect(() => callSync(syncFd, Buffer.from('with-fd'), 10_000, 4096)).toThrow(expect.objectContaining({ code: 'EBADMSG' }));
    expect(fdCount()).toBe(before);
    expect(() => callSync(syncFd, Buffer.from('hang-up'), 10_000, 4096)).toThrow(expect.objectContaining({ code: 'EPIPE' }));
  });

  it('watch: close is safe twice and from inside the callback, and the fd stays open', async () => {
    const [a, b] = socketpair('seqpacket');
    undo.push(() => closeQuietly([a, b]));
    let calls = 0;
    const w = watch(b, (readable) => {
      calls++;
      expect(readable).toBe(true);
      w.close();
      w.close();
    });
    sendFrame(a, Buffer.from('one'), []);
    for (let i = 0; i < 200 && calls === 0; i++) await new Promise((r) => setTimeout(r, 5));
    sendFrame(a, Buffer.from('two'), []);
    await new Promise((r) => setTimeout(r, 50));
    expect(calls).toBe(1);
    w.setWritable(true); // after close: no effect, no throw
    expect(isOpen(b)).toBe(true);
    expect(recvFrame(b, 16)).toEqual({ data: Buffer.from('one'), fds: [] });
  });

  it('errors carry the errno name as code and name the call', () => {
    expect(() => closeFd(1_000_000)).toThrow(expect.objectContaining({ code: 'EBADF', message: expect.stringContaining('close') }));
    const [a, b] = socketpair('seqpacket');
    closeFd(b);
    try {
      expect(() => sendFrame(a, Buffer.from('x'), [])).toThrow(expect.objectContaining({ code: 'EPIPE', message: expect.stringContaining('sendmsg') }));
      expect(recvFrame(a, 16)).toBe(false);
      expect(() => sendFrame(a, Buffer.alloc(0), [])).toThrow(expect.objectContaining({ code: 'EINVAL' }));
    } finally {
      closeFd(a);
    }
  });
});

/**
 * The worker's seccomp filter, on a stand-in worker (test/helpers/fdpass-worker.mjs)
 * served the way the broker will: TCP sockets and session descriptors over a
 * SEQPACKET socket. The same worker without lockdown() is the control: each
 * "cannot" below works there.
 */
describe('lockdown(): the worker serves SSH and can do nothing else', () => {
  let dir: string;
  let clientKey: string;
  let hostKey: string;

  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vesh-fdpass-'));
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'host')]);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'client')]);
    clientKey = path.join(dir, 'client');
    hostKey = fs.readFileSync(path.join(dir, 'host'), 'utf8');
  });
  afterAll(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  interface Worker {
    pid: number;
    ready: Record<string, unknown>;
    port: number;
    probe(): Promise<Record<string, string>>;
    stop(): Promise<void>;
  }

  /** The worker and a broker for it: accepts TCP, starts exec (socketpair) and shell (pty) sessions on the host. */
  async function startWorker(mode: 'lockdown' | 'plain'): Promise<Worker> {
    const [mine, theirs] = socketpair('seqpacket');
    // Unprivileged, as the worker pool runs it (when the test can choose).
    const ids = process.getuid!() === 0 ? { uid: NOBODY, gid: NOBODY } : {};
    const child = spawn(process.execPath, [WORKER, mode], { stdio: ['ignore', 'ignore', 'inherit', theirs], ...ids });
    closeFd(theirs);
    const ch = new FrameChannel(mine, { maxFrameBytes: MAX_FRAME, name: `worker ${mode}` });
    ch.on('error', () => undefined);
    const procs = new Set<ChildProcess>();
    const tcp = net.createServer({ pauseOnConnect: true }, (sock) => {
      const fd = dupFd(socketFd(sock)!);
      ch.send({ op: 'serve', hostKey, clientKey: fs.readFileSync(`${clientKey}.pub`, 'utf8') }, [fd]);
      closeFd(fd);
      sock.destroy();
    });
    const stop = async () => {
      ch.close();
      await killAndWait(child);
      await Promise.all([...procs].map(killAndWait));
      await new Promise<void>((r) => tcp.close(() => r()));
    };
    let probed: ((r: Record<string, string>) => void) | undefined;
    const ready = new Promise<Record<string, unknown>>((resolve, reject) => {
      ch.on('close', () => reject(new Error(`the ${mode} worker closed its channel`)));
      ch.on('frame', (msg: Record<string, unknown>, fds: number[]) => {
        closeQuietly(fds);
        if (msg.op === 'ready') resolve(msg);
        if (msg.op === 'probed') probed?.(msg.results as Record<string, string>);
        if (msg.op === 'start') {
          let io: number;
          let theirEnd: number;
          let argv: string[];
          if (msg.kind === 'shell') {
            const pty = openPty();
            setWinsize(pty.master, 100, 30);
            [io, theirEnd, argv] = [pty.master, pty.slave, ['sh', '-c', 'stty size; read line; echo "shell got $line"']];
          } else {
            const [a, b] = socketpair('stream');
            setBlocking(b, true);
            [io, theirEnd, argv] = [a, b, ['sh', '-c', String(msg.command)]];
          }
          const p = spawn(argv[0]!, argv.slice(1), { stdio: [theirEnd, theirEnd, theirEnd] });
          procs.add(p);
          closeFd(theirEnd);
          ch.send({ op: 'started', id: msg.id }, [io]);
          closeFd(io);
          p.on('exit', (code) => {
            procs.delete(p);
            if (!ch.isClosed) ch.send({ op: 'exit', id: msg.id, code: code ?? 255 });
          });
        }
      });
    });
    try {
      await new Promise<void>((r) => tcp.listen(0, '127.0.0.1', r));
      const port = (tcp.address() as net.AddressInfo).port;
      return {
        pid: child.pid!,
        ready: await ready,
        port,
        probe: () => new Promise((resolve) => {
          probed = resolve;
          ch.send({ op: 'probe', port });
        }),
        stop,
      };
    } catch (err) {
      await stop();
      throw err;
    }
  }

  function ssh(port: number, args: string[], input: string): Promise<{ code: number | null; out: string; err: string }> {
    const c = spawn('ssh', [
      '-F', '/dev/null', '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR',
      '-o', 'BatchMode=yes', '-o', 'IdentitiesOnly=yes', '-o', 'IdentityAgent=none', '-o', 'ConnectTimeout=20', '-i', clientKey,
      '-p', String(port), ...args,
    ], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    c.stdout.on('data', (d: Buffer) => (out += d.toString()));
    c.stderr.on('data', (d: Buffer) => (err += d.toString()));
    c.stdin.end(input);
    return new Promise((resolve) => c.on('close', (code) => resolve({ code, out, err })));
  }

  for (const mode of ['plain', 'lockdown'] as const) {
    it(`${mode}: OpenSSH logs in, exec and a pty shell round-trip; spawn, connect and listen ${mode === 'plain' ? 'work (the control)' : 'fail'}`, async () => {
      const w = await startWorker(mode);
      try {
        expect(w.ready).toMatchObject(mode === 'lockdown' ? { seccomp: '2', noNewPrivs: '1' } : { seccomp: '0', noNewPrivs: '0' });
        if (process.getuid!() === 0) {
          // Non-dumpable after lockdown: its /proc entries turn root's, out of a sibling worker's reach.
          expect(fs.statSync(`/proc/${w.pid}/mem`).uid).toBe(mode === 'lockdown' ? 0 : NOBODY);
          const sibling = spawnSync('sh', ['-c', `exec 3< /proc/${w.pid}/mem && echo opened`], { uid: NOBODY, gid: NOBODY, encoding: 'utf8' });
          expect(sibling.stdout).toBe(mode === 'lockdown' ? '' : 'opened\n');
        }

        const exec = await ssh(w.port, ['u@127.0.0.1', 'echo hello; cat; exit 3'], 'round-trip\n');
        expect(exec).toEqual({ code: 3, out: 'hello\nround-trip\n', err: '' });

        const shell = await ssh(w.port, ['-tt', 'u@127.0.0.1'], 'typed\n');
        expect(shell.code).toBe(0);
        expect(shell.out).toContain('30 100\r\n');
        expect(shell.out).toContain('shell got typed\r\n');

        const results = await w.probe();
        if (mode === 'plain') {
          expect(results).toEqual({ spawn: 'ok', unixSocketpair: 'ok', connect: 'ok', listen: 'ok', thread: 'ok' });
        } else {
          // fork is clone without CLONE_THREAD (EPERM); a new thread still starts (clone3 ENOSYS, then clone).
          expect(results).toEqual({ spawn: 'EPERM', unixSocketpair: 'ok', connect: 'EPERM', listen: 'EPERM', thread: 'ok' });
        }
      } finally {
        await w.stop();
      }
    });
  }
});

describe('spawn(): a process start that does not fork the broker', () => {
  /** Start `script` under /bin/sh with a socketpair as stdin+stdout; resolves with its output and how it ended. */
  async function runSpawned(script: string): Promise<{ out: string; end: { code: number; signal: number } }> {
    const io = socketpair('stream');
    setBlocking(io[1], true);
    const child = addonSpawn('/bin/sh', ['/bin/sh', '-c', script], { PATH: '/usr/bin:/bin' }, [io[1], io[1], io[1]]);
    closeFd(io[1]);
    const sock = new net.Socket({ fd: io[0], readable: true, writable: true, allowHalfOpen: true });
    let out = '';
    sock.on('error', () => undefined);
    sock.on('data', (d: Buffer) => { out += d.toString(); });
    const closed = new Promise<void>((r) => sock.once('close', () => r()));
    sock.end('line-in\n');
    const end = await new Promise<{ code: number; signal: number }>((resolve) => {
      const w = watch(child.pidfd, () => {
        const r = reap(child.pidfd);
        if (!r) return;
        w.close();
        closeFd(child.pidfd);
        resolve(r);
      });
    });
    await closed;
    return { out, end };
  }

  it('gives the child its stdio, blocking, and reports its exit code', async () => {
    const r = await runSpawned('read x; echo "got-$x"; exit 7');
    expect(r.out).toBe('got-line-in\n');
    expect(r.end).toEqual({ code: 7, signal: 0 });
  });

  it('reports death by a signal with its number', async () => {
    const r = await runSpawned('kill -TERM $$');
    expect(r.end).toEqual({ code: -1, signal: 15 });
  });

  it('resets every standard signal to its default action and blocks none (this Node process ignores SIGPIPE)', async () => {
    const r = await runSpawned('grep -E "^Sig(Ign|Blk)" /proc/self/status');
    const mask = (name: string) => BigInt(`0x${new RegExp(`${name}:\\s+([0-9a-f]+)`).exec(r.out)![1]}`);
    expect(mask('SigBlk')).toBe(0n);
    // Signals 1-31 (bit n-1); 32 and 33 belong to the C library, which keeps them for itself.
    expect(mask('SigIgn') & 0x7fffffffn).toBe(0n);
  });

  it('refuses a relative program and a missing one with errors', () => {
    expect(() => addonSpawn('sh', ['sh'], {}, [0, 1, 2])).toThrow(/absolute/);
    expect(() => addonSpawn('/nonexistent/prog', ['x'], {}, [0, 1, 2])).toThrow(expect.objectContaining({ code: 'ENOENT' }));
  });
});
