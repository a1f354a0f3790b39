/**
 * A compromised SSH worker, for test/adversarial/compromised-worker.test.ts
 * and test/integration/worker-crash.test.ts. `vesh serve` runs it in place
 * of dist/worker/main.js (VESH_WORKER_SCRIPT), through the same sandbox
 * launcher, with the same fd 3 (request channel) and fd 4 (sign socket).
 *
 * It serves like the real worker (the real WorkerServer and ssh2 code), so
 * OpenSSH logins work through it, and it remembers what an attacker in its
 * place would see: the signed publickey requests and each connection's first
 * exchange hash. A client connecting from 127.0.0.2 is not served: its
 * first line, `ATTACK <name> <json args>`, names an attack this process
 * makes on the broker over its real descriptors. It reports on that socket,
 * one JSON line per step ({step, ...}), what it sent and what came back,
 * before the broker ends it (when the broker does: the test tells by the
 * `broker.worker_killed` record). Why a steered worker and not a script of
 * frames: the broker must be met with the descriptors, ids and state a
 * worker really holds.
 */
import { randomBytes } from 'node:crypto';
import { openSync } from 'node:fs';
import net from 'node:net';
import { pino } from 'pino';
import ssh2 from 'ssh2';
import { MAX_FRAME_BYTES } from '../../dist/broker/request-table.js';
import { BrokerClient } from '../../dist/worker/broker-client.js';
import { WorkerServer } from '../../dist/worker/worker-server.js';
import { callSync, closeFd, lockdown, sendFrame, socketpair } from '../../dist/system/fdpass.js';
import { FrameChannel } from '../../dist/system/frame-channel.js';

const CONTROL_FD = 3;
const SIGN_FD = 4;
const ATTACKER_SOURCE = '127.0.0.2';

const channel = new FrameChannel(CONTROL_FD, { maxFrameBytes: MAX_FRAME_BYTES, name: 'broker' });
const client = new BrokerClient(channel);
let server = null;
let hostKeyType = 'ssh-ed25519';
let workerIndex = -1;

const log = (rec) => process.stdout.write(`${JSON.stringify({ level: 30, time: Date.now(), component: 'hostile-worker', pid: process.pid, worker: workerIndex, ...rec })}\n`);

/** What a compromised worker learns from the connections it serves honestly. */
const seen = { publickey: [], firstHash: new Map() };

// Every publickey request the honest code makes, with its answer.
const request = client.request.bind(client);
client.request = (req, conn, fields = {}) => {
  const p = request(req, conn, fields);
  if (req === 'auth.publickey') p.then((r) => { if (r.body.success === true) seen.publickey.push({ conn, fields }); }, () => undefined);
  return p;
};

/** After a request the broker must end us for: stay long enough that a "done" means it did not. */
const linger = () => new Promise((r) => setTimeout(r, 10_000));

/** One sign request, raw: the broker's JSON answer, or an error text. */
function signRaw(conn, data, keyType = hostKeyType) {
  try {
    const answer = callSync(SIGN_FD, Buffer.from(JSON.stringify({ conn, keyType, data: data.toString('base64') })), 5_000, 4096);
    return JSON.parse(answer.toString('utf8'));
  } catch (err) {
    return { failed: String(err && err.message) };
  }
}

function sign(conn, keyType, data, hashAlgo) {
  if (!seen.firstHash.has(conn)) seen.firstHash.set(conn, Buffer.from(data));
  const answer = callSync(SIGN_FD, Buffer.from(JSON.stringify({ conn, keyType, data: data.toString('base64'), ...(hashAlgo ? { hashAlgo } : {}) })), 5_000, 4096);
  const parsed = JSON.parse(answer.toString('utf8'));
  if (!parsed.sig) throw new Error(`the broker did not sign: ${parsed.error ?? 'no answer'}`);
  return Buffer.from(parsed.sig, 'base64');
}

/** A request through the real client: {ok, body?, error?, fds}. */
async function ask(req, conn, fields) {
  try {
    const r = await request(req, conn, fields);
    return { ok: true, body: r.body, fds: r.fds };
  } catch (err) {
    return { ok: false, error: String(err && err.message), fds: [] };
  }
}

function sshString(b) {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(b.length);
  return Buffer.concat([len, b]);
}

/** The data a client signs for publickey authentication (RFC 4252 7). */
function userauthBlob(sessionId, user, algo, key) {
  return Buffer.concat([
    sshString(sessionId), Buffer.from([50]), sshString(Buffer.from(user)), sshString(Buffer.from('ssh-connection')),
    sshString(Buffer.from('publickey')), Buffer.from([1]), sshString(Buffer.from(algo)), sshString(key),
  ]);
}

/**
 * Log `args.user` in on `conn` with the private key the test (the tenant,
 * colluding with its compromised worker) handed over: the session id is
 * whatever this worker asks the broker to sign first.
 */
async function loginWithKey(conn, args, opts = {}) {
  const sessionId = opts.sessionId ?? randomBytes(32);
  const signed = signRaw(conn, sessionId);
  const parsed = ssh2.utils.parseKey(args.privateKey);
  const key = Array.isArray(parsed) ? parsed[0] : parsed;
  const pub = key.getPublicSSH();
  const blob = userauthBlob(opts.blobSessionId ?? sessionId, args.user, key.type, pub);
  const signature = opts.signature ?? key.sign(blob);
  const r = await ask('auth.publickey', conn, { user: args.user, algo: key.type, key: pub.toString('base64'), blob: blob.toString('base64'), signature: signature.toString('base64') });
  return { signed: !!signed.sig, answer: r };
}

/** Read a socket the broker handed over until EOF (at most `ms`), then close it. */
function readAll(fd, ms = 30_000) {
  return new Promise((resolve) => {
    const s = new net.Socket({ fd, readable: true, writable: true });
    let out = '';
    const done = () => { clearTimeout(t); s.destroy(); resolve(out); };
    const t = setTimeout(done, ms);
    s.on('data', (d) => { out += d.toString(); });
    s.on('error', done);
    s.on('end', done);
    s.end();
  });
}

const attacks = {
  /** Sessions and forwards before any authentication. */
  async 'preauth-session-open'(conn, report) {
    const frame = { req: 'session.open', id: 900001, conn, session: 1, kind: 'exec', command: 'touch /tmp/pwned-preauth; sleep 300', env: {} };
    report({ step: 'send', frame });
    channel.send(frame);
    await linger();
  },
  async 'preauth-forward-connect'(conn, report) {
    const frame = { req: 'forward.connect', id: 900002, conn, host: '127.0.0.1', port: 22 };
    report({ step: 'send', frame });
    channel.send(frame);
    await linger();
  },
  /** A signature that is not alice's, over the right blob; then a session anyway. */
  async 'forged-signature'(conn, report, args) {
    const r = await loginWithKey(conn, args, { signature: randomBytes(64) });
    report({ step: 'auth.publickey', ...r.answer });
    await attacks['preauth-session-open'](conn, report);
  },
  /** alice's real signature, over a blob naming a session id the broker never signed for this connection. */
  async 'wrong-session-id'(conn, report, args) {
    const r = await loginWithKey(conn, args, { blobSessionId: randomBytes(32) });
    report({ step: 'auth.publickey', ...r.answer });
    await attacks['preauth-session-open'](conn, report);
  },
  /** The blob and signature of a real login this worker served, presented for this connection. */
  async replay(conn, report) {
    const captured = seen.publickey.at(-1);
    if (!captured) {
      report({ step: 'error', error: 'no publickey login seen by this worker' });
      return;
    }
    report({ step: 'captured', from: captured.conn, user: captured.fields.user });
    // This connection's own session id is signed first, as in a real key exchange.
    report({ step: 'sign', answered: !!signRaw(conn, randomBytes(32)).sig });
    const r = await ask('auth.publickey', conn, captured.fields);
    report({ step: 'auth.publickey', ...r });
    await attacks['preauth-session-open'](conn, report);
  },
  /** A session for alice that names bob's VE, a user, a uid and an argv. */
  async 'session-extra-fields'(conn, report, args) {
    const r = await loginWithKey(conn, args);
    report({ step: 'auth.publickey', ok: r.answer.ok, success: r.answer.body?.success === true });
    const frame = { req: 'session.open', id: 900003, conn, session: 1, kind: 'exec', command: 'id', env: {}, ve: 'bob', user: 'root', uid: 0, argv: ['/bin/sh', '-c', 'touch /tmp/pwned-extra; sleep 300'] };
    report({ step: 'send', frame });
    channel.send(frame);
    await linger();
  },
  /** A request for a connection this worker does not hold (another worker's, or made up). */
  async 'foreign-conn'(conn, report, args) {
    // A session number the target's own client is unlikely to have used.
    const frame = { req: 'session.open', id: 900004, conn: args.target, session: 77, kind: 'exec', command: 'touch /tmp/pwned-foreign; sleep 300', env: {} };
    report({ step: 'send', frame });
    channel.send(frame);
    await linger();
  },
  /** Another connection's session id as this connection's first exchange hash. */
  async 'session-id-reuse'(conn, report) {
    const other = [...seen.firstHash.entries()].filter(([c]) => c !== conn).at(-1);
    if (!other) {
      report({ step: 'error', error: 'no other connection\'s exchange hash seen by this worker' });
      return;
    }
    report({ step: 'sign', as: conn, hashOf: other[0] });
    const answer = signRaw(conn, other[1]);
    report({ step: 'answer', answer });
    await linger();
  },
  /** Many session.open at once on one authenticated connection: more than sessions.maxSessions. */
  async 'session-burst'(conn, report, args) {
    const r = await loginWithKey(conn, args);
    report({ step: 'auth.publickey', ok: r.answer.ok, success: r.answer.body?.success === true });
    const answers = await Promise.all(Array.from({ length: 16 }, (_, i) => ask('session.open', conn, { session: 100 + i, kind: 'exec', command: 'sleep 30', env: {} })));
    for (const a of answers) for (const fd of a.fds) closeFd(fd);
    report({ step: 'burst', ok: answers.filter((a) => a.ok).length, refused: answers.filter((a) => !a.ok).map((a) => a.error) });
  },
  /**
   * A terminal shell for the account it logged in as (args.user), asked as
   * a worker that wants someone else's held shell would: the request has no
   * field to name one, so it reports what the broker handed back (the pid,
   * any replayed "held output") for the test to compare with the victim's.
   */
  async 'shell-as'(conn, report, args) {
    const r = await loginWithKey(conn, args);
    report({ step: 'auth.publickey', ok: r.answer.ok, success: r.answer.body?.success === true });
    const a = await ask('session.open', conn, { session: 1, kind: 'shell', pty: { term: 'xterm', cols: 80, rows: 24 }, env: {} });
    for (const fd of a.fds) closeFd(fd);
    report({ step: 'shell', ok: a.ok, error: a.error, pid: a.body?.pid, replay: typeof a.body?.replay === 'string' ? Buffer.from(a.body.replay, 'base64').toString('latin1') : '' });
  },
  /**
   * A recorded account's terminal session that the worker leaves alone: it
   * asks for a pty exec (args.command), never reads or writes its end for
   * args.holdMs but to change its window size, and tries to write a
   * recording of its own into args.recDir (test/adversarial/recording-attacks.test.ts).
   */
  async 'recorded-silent'(conn, report, args) {
    const r = await loginWithKey(conn, args);
    report({ step: 'auth.publickey', ok: r.answer.ok, success: r.answer.body?.success === true });
    const a = await ask('session.open', conn, { session: 1, kind: 'exec', command: args.command, pty: { term: 'xterm', cols: 80, rows: 24 }, env: {} });
    report({ step: 'session', ok: a.ok, error: a.error, tapped: a.body?.tapped === true, fds: a.fds.length });
    const resized = await ask('session.resize', conn, { session: 1, cols: 120, rows: 40 });
    report({ step: 'resize', ok: resized.ok, error: resized.error });
    await new Promise((res) => setTimeout(res, args.holdMs ?? 3000));
    let forged;
    try {
      const fd = openSync(`${args.recDir}/forged.cast`, 'w');
      closeFd(fd);
      forged = 'written';
    } catch (err) {
      forged = String(err && err.code);
    }
    report({ step: 'forge', result: forged });
    for (const fd of a.fds) closeFd(fd);
  },
  /** A host-key signing service: sign many hashes for one connection that never logs in. */
  async 'sign-many'(conn, report) {
    const answers = [];
    for (let i = 0; i < 20; i++) {
      const a = signRaw(conn, randomBytes(32));
      answers.push(a.sig ? 'sig' : a.error ? 'error' : 'failed');
    }
    report({ step: 'signs', answers });
  },
  /** A request frame with descriptors attached: /dev/null and one end of a socketpair. */
  async 'fd-request'(conn, report) {
    const pair = socketpair('stream');
    const frame = { req: 'auth.key_query', id: 900005, conn, user: 'alice', algo: 'ssh-ed25519', key: 'AAAA' };
    report({ step: 'send', frame, fds: 2 });
    const devnull = openSync('/dev/null', 'r');
    channel.send(frame, [devnull, pair[0]]);
    closeFd(devnull);
    closeFd(pair[0]);
    closeFd(pair[1]);
    await linger();
  },
  /** Unix-socket forwards and the agent socket for an account whose forwarding and agent forwarding are off. */
  async 'streamlocal-refused'(conn, report, args) {
    const r = await loginWithKey(conn, args);
    report({ step: 'auth.publickey', ok: r.answer.ok, success: r.answer.body?.success === true });
    const tries = [['forward.connect_unix', { path: '/tmp/vesh-sl.sock' }], ['forward.listen_unix', { path: '/tmp/vesh-sl-pwned.sock' }], ['agent.listen', {}]];
    for (const [req, fields] of tries) {
      const a = await ask(req, conn, fields);
      for (const fd of a.fds) closeFd(fd);
      report({ step: req, ok: a.ok, error: a.error, body: a.body });
    }
  },
  /** A Unix-socket forward for alice that names bob's VE and a user. */
  async 'streamlocal-other-ve'(conn, report, args) {
    const r = await loginWithKey(conn, args);
    report({ step: 'auth.publickey', ok: r.answer.ok, success: r.answer.body?.success === true });
    const frame = { req: 'forward.listen_unix', id: 900010, conn, path: '/tmp/vesh-sl-pwned.sock', ve: 'bob', user: 'root' };
    report({ step: 'send', frame });
    channel.send(frame);
    await linger();
  },
  /** Subsystems and commands that name host files; env that must not reach the process. */
  async 'host-files-session'(conn, report, args) {
    const r = await loginWithKey(conn, args);
    report({ step: 'auth.publickey', ok: r.answer.ok, success: r.answer.body?.success === true });
    const base = { conn, env: {} };
    let a = await ask('session.open', conn, { ...base, session: 1, kind: 'subsystem', subsystem: '../../../etc/passwd' });
    report({ step: 'subsystem-traversal', ok: a.ok, error: a.error, fds: a.fds.length });
    for (const fd of a.fds) closeFd(fd);
    a = await ask('session.open', conn, { ...base, session: 2, kind: 'subsystem', subsystem: 'sftp', command: '/etc/shadow' });
    report({ step: 'sftp-with-command', ok: a.ok, error: a.error, fds: a.fds.length });
    for (const fd of a.fds) closeFd(fd);
    a = await ask('session.open', conn, {
      ...base, session: 3, kind: 'exec', command: 'env; echo END-OF-ENV',
      env: { LD_PRELOAD: '/tmp/evil.so', PATH: '/evil/bin', BASH_ENV: '/tmp/evil.sh', LANG: 'C.UTF-8', LC_EVIL: 'x' },
    });
    let output = '';
    if (a.ok && a.fds.length > 0) {
      const [stdio, ...rest] = a.fds;
      for (const fd of rest) closeFd(fd);
      output = await readAll(stdio);
    }
    report({ step: 'env-session', ok: a.ok, error: a.error, output });
    for (const host of ['/run/vesh/engine.sock', '../../etc/passwd']) {
      a = await ask('forward.connect', conn, { host, port: 80 });
      for (const fd of a.fds) closeFd(fd);
      report({ step: 'forward.connect', host, ok: a.ok, error: a.error });
    }
  },
  /**
   * A certificate login as the worker chooses to present it (args.cert: a
   * blob the test forged or altered, args.algo, args.user), signed for this
   * connection with the tenant's own key (args.privateKey, ed25519); then,
   * if it got in, the forward.connect targets in args.forwards.
   */
  async 'cert-login'(conn, report, args) {
    const sessionId = randomBytes(32);
    signRaw(conn, sessionId);
    const key = ssh2.utils.parseKey(args.privateKey);
    const cert = Buffer.from(args.cert, 'base64');
    const blob = userauthBlob(sessionId, args.user, args.algo, cert);
    const signature = Buffer.concat([sshString(Buffer.from('ssh-ed25519')), sshString(key.sign(blob))]);
    const r = await ask('auth.publickey', conn, { user: args.user, algo: args.algo, key: args.cert, blob: blob.toString('base64'), signature: signature.toString('base64') });
    report({ step: 'auth.publickey', ok: r.ok, success: r.body?.success === true, error: r.error });
    if (r.body?.success !== true) return;
    for (const f of args.forwards ?? []) {
      const a = await ask('forward.connect', conn, { host: f.host, port: f.port });
      for (const fd of a.fds) closeFd(fd);
      report({ step: 'forward.connect', host: f.host, port: f.port, ok: a.ok, error: a.error });
    }
  },
  /** A password check for a user name that is a host path (in bounds: the broker answers). */
  async 'password-path-user'(conn, report) {
    const a = await ask('auth.password', conn, { user: '../../etc/shadow', password: 'x'.repeat(1000), method: 'password' });
    report({ step: 'auth.password', ok: a.ok, body: a.body, error: a.error });
  },
  /** A frame no honest worker sends: more than the schema allows, or more than a frame may be. */
  async 'raw-frame'(conn, report, args) {
    const frame = args.size === 'huge-password'
      ? { req: 'auth.password', id: 900006, conn, user: '../../etc/shadow', password: 'p'.repeat(1024 * 1024), method: 'password' }
      : args.size === 'over-frame'
        ? { req: 'auth.failure', id: 900007, conn, user: 'alice', method: 'password', reason: 'r'.repeat(300 * 1024) }
        : { req: 'auth.password', id: 900008, conn, user: 'alice', password: 'x', method: 'password' };
    const text = args.size === 'proto'
      ? JSON.stringify(frame).replace(/^\{/, '{"__proto__":{"polluted":1},"constructor":{"prototype":{"polluted":1}},')
      : JSON.stringify(frame);
    report({ step: 'send', bytes: text.length, req: frame.req });
    const answered = rawAnswer(frame.id);
    let sent;
    try {
      // Raw, past our own FrameChannel's bound on what it sends.
      sent = sendFrame(CONTROL_FD, Buffer.from(text), []);
    } catch (err) {
      sent = `send failed: ${err.message}`;
    }
    report({ step: 'sent', sent });
    if (args.size !== 'proto') await linger();
    else report({ step: 'answer', answer: await answered });
  },
  /** Failures under method names of its choosing (metrics-labels.test.ts: each must not become a metrics label). */
  async 'auth-methods'(conn, report, args) {
    for (const method of args.methods) report({ step: 'auth.failure', method, ...(await ask('auth.failure', conn, { user: args.user, method, reason: 'made up' })) });
  },
  /** A worker that stops answering anything (a bug, or a stall on purpose). */
  async spin(conn, report) {
    report({ step: 'spinning' });
    await new Promise((r) => setTimeout(r, 100));
    for (;;) { /* never yields: every connection of this worker freezes */ }
  },
};

/** An attack connection: read the ATTACK line, run it, report on the socket. */
function attack(ev, fd) {
  const socket = new net.Socket({ fd, readable: true, writable: true });
  socket.on('error', () => undefined);
  let buf = '';
  const report = (rec) => socket.write(`${JSON.stringify(rec)}\n`);
  report({ step: 'conn', conn: ev.conn, worker: workerIndex });
  const onData = (d) => {
    buf += d.toString();
    const nl = buf.indexOf('\n');
    if (nl < 0) return;
    socket.removeListener('data', onData);
    const m = /^ATTACK (\S+)(?: (.*))?$/.exec(buf.slice(0, nl));
    const fn = m && attacks[m[1]];
    if (!fn) {
      report({ step: 'error', error: `no such attack: ${buf.slice(0, nl).slice(0, 80)}` });
      socket.end();
      return;
    }
    log({ event: 'hostile.attack', attack: m[1], conn: ev.conn });
    Promise.resolve()
      .then(() => fn(ev.conn, report, m[2] ? JSON.parse(m[2]) : {}))
      .then(
        () => report({ step: 'done', worker: workerIndex }),
        (err) => report({ step: 'error', error: String(err && err.stack) }),
      )
      .then(() => {
        // Still here: the broker let this worker live. Give the connection
        // back as a bare probe would (no strike against the test's source).
        client.tell('conn.closed', ev.conn, { stage: 'before identification', bytesRead: 0 });
        socket.end();
      });
  };
  socket.on('data', onData);
}

/** Answers to frames sent raw (past the client), by request id. */
const rawWaiters = new Map();
function rawAnswer(id, ms = 30_000) {
  return new Promise((resolve) => {
    const t = setTimeout(() => { rawWaiters.delete(id); resolve(null); }, ms);
    rawWaiters.set(id, (msg) => { clearTimeout(t); resolve(msg); });
  });
}

channel.on('frame', (msg, fds) => {
  if (typeof msg.re === 'number' && rawWaiters.has(msg.re)) {
    for (const fd of fds) closeFd(fd);
    const w = rawWaiters.get(msg.re);
    rawWaiters.delete(msg.re);
    w(msg);
    return;
  }
  if (msg.ev === 'ping') {
    // As the real worker: alive (a spinning one never gets here).
    channel.send({ req: 'worker.alive', id: 1, seq: msg.seq });
    return;
  }
  if (typeof msg.re === 'number') {
    client.settle(msg, fds);
    return;
  }
  if (msg.ev === 'hello') {
    workerIndex = msg.worker;
    hostKeyType = msg.hostKeys[0]?.type ?? hostKeyType;
    server = new WorkerServer(client, msg.hostKeys, sign, msg.settings, pino({ level: msg.settings.logLevel, base: { pid: process.pid, component: 'worker', worker: msg.worker, hostile: true } }));
    log({ event: 'worker.ready', worker: msg.worker, uid: process.getuid(), hostile: true });
    // As the real worker: say it serves, so the broker sends it connections.
    channel.send({ req: 'worker.alive', id: 1, seq: 0 });
    return;
  }
  if (!server) {
    for (const fd of fds) closeFd(fd);
    return;
  }
  if (msg.ev === 'conn.new' && msg.source === ATTACKER_SOURCE && fds.length === 1) {
    attack(msg, fds[0]);
    return;
  }
  server.onEvent(msg, fds);
});
channel.on('close', () => process.exit(0));
channel.on('malformed', () => process.exit(1));
process.on('SIGTERM', () => process.exit(0));

// As the real worker: from here on, no exec, no fork, no network sockets.
lockdown();
