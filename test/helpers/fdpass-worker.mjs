// A stand-in for the SSH worker, for test/unit/fdpass.test.ts and for
// measuring the worker's syscalls (strace): ssh2 serving connections whose TCP
// sockets arrive over a SEQPACKET socket (fd 3) from a broker, which also
// answers session requests with descriptors (socketpair ends for exec and
// sftp, a pty master for a shell). Plain JavaScript and the raw addon, so it
// runs as `node fdpass-worker.mjs MODE` without a build step of its own.
//
//   MODE = lockdown  calls lockdown() once every module is loaded
//   MODE = plain     does not (the control case)
//
// Frames to the broker: {op:'ready', seccomp, noNewPrivs}, {op:'start', id,
// kind, command}, {op:'winsize', id, cols, rows}, {op:'probed', results},
// {op:'tick'}. From the broker: {op:'serve', hostKey, clientKey} + [tcp fd],
// {op:'started', id} + [fd], {op:'exit', id, code}, {op:'probe', port}.
import { createRequire } from 'node:module';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
// The real worker's pty reader (tty.ReadStream drops a terminal's last output: see that module).
import { readPtyMaster } from '../../dist/system/pty-reader.js';

const require = createRequire(import.meta.url);
const here = path.dirname(fileURLToPath(import.meta.url));
const fdp = require(path.join(here, '../../dist/fdpass.node'));
const ssh2 = require('ssh2');
const { pino } = require('pino');

const CTRL = 3;
const MAX_FRAME = 256 * 1024;
const mode = process.argv[2];
const log = pino({ base: { worker: process.pid } });

if (mode === 'lockdown') fdp.lockdown();
// A mark in an strace log: what follows is what a locked-down worker does.
fs.writeSync(1, `${JSON.stringify({ mark: 'serving' })}\n`);

function send(msg, fds = []) {
  if (!fdp.sendFrame(CTRL, Buffer.from(JSON.stringify(msg)), fds)) throw new Error('control socket full');
}

function status(field) {
  const line = fs.readFileSync('/proc/self/status', 'utf8').split('\n').find((l) => l.startsWith(`${field}:`));
  return line === undefined ? '' : line.split(/\s+/)[1];
}

let server;
let allowedKey;
const sessions = new Map();
let nextId = 1;

function outcome(err) {
  return err === undefined ? 'ok' : String(err.code ?? err.message);
}

/** Each "cannot" of the lockdown test, tried for real; 'ok' when it worked. */
function probe(port, reply) {
  const results = {};
  const r = spawnSync('/bin/true');
  results.spawn = r.error === undefined && r.status === 0 ? 'ok' : outcome(r.error ?? new Error(`status ${r.status}`));
  try {
    const [a, b] = fdp.socketpair('stream');
    fdp.closeFd(a);
    fdp.closeFd(b);
    results.unixSocketpair = 'ok';
  } catch (err) {
    results.unixSocketpair = outcome(err);
  }
  const done = () => {
    if ('connect' in results && 'listen' in results && 'thread' in results) reply(results);
  };
  // A new thread after lockdown: glibc's clone3 gets ENOSYS and falls back to clone(CLONE_THREAD).
  const t = new Worker('require("node:worker_threads").parentPort.postMessage(6 * 7)', { eval: true });
  t.on('message', (m) => { results.thread = m === 42 ? 'ok' : `got ${m}`; void t.terminate(); done(); });
  t.on('error', (err) => { results.thread = outcome(err); done(); });
  const c = net.connect(port, '127.0.0.1');
  c.on('connect', () => { results.connect = 'ok'; c.destroy(); done(); });
  c.on('error', (err) => { results.connect = outcome(err); done(); });
  const l = net.createServer();
  l.on('error', (err) => { results.listen = outcome(err); done(); });
  l.listen(0, '127.0.0.1', () => { results.listen = 'ok'; l.close(); done(); });
}

function pipeSession(s, fd) {
  if (s.kind === 'shell') {
    // A pty master: read to its end (EIO once the last slave descriptor is
    // closed: the output is over), write with fs.write (the master is nonblocking).
    const over = () => { s.outputDone = true; finish(s); };
    const reader = readPtyMaster(fd, (d) => {
      if (!s.channel.write(d)) {
        reader.pause();
        s.channel.once('drain', () => reader.resume());
      }
    }, over);
    let pending = Promise.resolve();
    s.channel.on('data', (d) => {
      pending = pending.then(() => writeAll(fd, d)).catch(() => undefined);
    });
    s.readEnded = () => s.outputDone === true;
    return;
  }
  const sock = new net.Socket({ fd, readable: true, writable: true });
  sock.on('error', () => finish(s));
  sock.on('end', () => { s.outputDone = true; finish(s); });
  sock.pipe(s.channel, { end: false });
  s.channel.pipe(sock);
  s.readEnded = () => s.outputDone === true;
}

async function writeAll(fd, buf) {
  let off = 0;
  while (off < buf.length) {
    try {
      off += await new Promise((resolve, reject) => fs.write(fd, buf, off, buf.length - off, null, (err, n) => (err ? reject(err) : resolve(n))));
    } catch (err) {
      if (err.code !== 'EAGAIN') throw err;
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }
}

function finish(s) {
  if (s.finished || s.code === undefined || !s.readEnded()) return;
  s.finished = true;
  s.channel.exit(s.code);
  s.channel.end();
  sessions.delete(s.id);
  log.info({ event: 'session.end', id: s.id, code: s.code });
}

function startSession(channel, kind, command, pty) {
  const s = { id: nextId++, channel, kind, code: undefined, finished: false, readEnded: () => false };
  sessions.set(s.id, s);
  channel.on('error', () => undefined);
  send({ op: 'start', id: s.id, kind, command, cols: pty?.cols, rows: pty?.rows });
  log.info({ event: 'session.start', id: s.id, kind });
  return s;
}

function makeServer(hostKey) {
  const srv = new ssh2.Server({ hostKeys: [hostKey], algorithms: { kex: ['curve25519-sha256', 'curve25519-sha256@libssh.org'], compress: ['none'] } });
  srv.on('connection', (client) => {
    client.on('error', (err) => log.info({ event: 'client.error', err: err.message }));
    client.on('authentication', (ctx) => {
      if (ctx.method === 'publickey' && ctx.key.algo === allowedKey.type && ctx.key.data.equals(allowedKey.getPublicSSH())) {
        if (ctx.signature === undefined || allowedKey.verify(ctx.blob, ctx.signature, ctx.hashAlgo) === true) {
          ctx.accept();
          return;
        }
      }
      ctx.reject(['publickey']);
    });
    client.on('ready', () => {
      log.info({ event: 'auth.success' });
      client.on('session', (accept) => {
        const session = accept();
        let pty;
        let s;
        session.on('pty', (acceptPty, _reject, info) => { pty = info; acceptPty?.(); });
        session.on('window-change', (acceptWc, _reject, info) => {
          acceptWc?.();
          if (s !== undefined) send({ op: 'winsize', id: s.id, cols: info.cols, rows: info.rows });
        });
        session.on('env', (acceptEnv) => acceptEnv?.());
        session.on('exec', (acceptExec, _reject, info) => { s = startSession(acceptExec(), 'exec', info.command); });
        session.on('shell', (acceptShell) => { s = startSession(acceptShell(), 'shell', '', pty); });
        session.on('subsystem', (acceptSub, rejectSub, info) => {
          if (info.name !== 'sftp') { rejectSub(); return; }
          s = startSession(acceptSub(), 'sftp', '');
        });
      });
    });
  });
  return srv;
}

function onFrame(msg, fds) {
  switch (msg.op) {
    case 'serve': {
      if (server === undefined) {
        server = makeServer(msg.hostKey);
        allowedKey = ssh2.utils.parseKey(msg.clientKey);
      }
      const sock = new net.Socket({ fd: fds[0], readable: true, writable: true });
      sock.setNoDelay(true);
      sock.on('error', () => undefined);
      server.injectSocket(sock);
      return;
    }
    case 'started': {
      const s = sessions.get(msg.id);
      if (s === undefined) { fds.forEach((fd) => fdp.closeFd(fd)); return; }
      pipeSession(s, fds[0]);
      return;
    }
    case 'exit': {
      const s = sessions.get(msg.id);
      if (s === undefined) return;
      s.code = msg.code;
      finish(s);
      return;
    }
    case 'probe':
      probe(msg.port, (results) => send({ op: 'probed', results }));
      return;
    case 'quit':
      process.exit(0);
  }
}

const w = fdp.watch(CTRL, (readable) => {
  if (!readable) return;
  for (;;) {
    const f = fdp.recvFrame(CTRL, MAX_FRAME);
    if (f === null) return;
    if (f === false) { w.close(); process.exit(0); }
    onFrame(JSON.parse(f.data.toString('utf8')), f.fds);
  }
});
setInterval(() => send({ op: 'tick', nonce: crypto.randomBytes(8).toString('hex') }), 500).unref();
send({ op: 'ready', seccomp: status('Seccomp'), noNewPrivs: status('NoNewPrivs') });
