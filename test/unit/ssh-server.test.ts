import { createRequire } from 'node:module';
import { pino } from 'pino';
import net from 'node:net';
import path from 'node:path';
import { mkdirSync, writeFileSync } from 'node:fs';
import { Client } from 'ssh2';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { VeshError, ErrorCodes } from '../../src/errors.js';
import { parseServerConfig } from '../../src/config/server-config.js';
import { CappedLog } from '../../src/ssh/capped-log.js';
import { DEFAULT_SESSION_LIMITS, UsageCaps } from '../../src/ssh/usage-caps.js';
import {
  Cleanup, FakeAuthenticator, HostFakeVes, makeClientKey, runProgram, serverBugRecords, sshBaseArgs, sshWithKey, sshWithPassword, startInProcessServer, tempDir,
  type ClientKey, type FakeAccount, type InProcessServer,
} from '../helpers/ssh-harness.js';

const requireCjs = createRequire(import.meta.url);

/** Send SSH_MSG_CHANNEL_REQUEST with any type name (ssh2's client only sends the known ones). */
function sendRawChannelRequest(c: Client, remoteChannel: number, type: string): void {
  const { sendPacket } = requireCjs('ssh2/lib/protocol/utils.js') as { sendPacket(p: unknown, b: Buffer): void };
  const proto = (c as unknown as { _protocol: { _packetRW: { write: { allocStart: number; alloc(n: number): Buffer; finalize(b: Buffer): Buffer } } } })._protocol;
  const w = proto._packetRW.write;
  let p = w.allocStart;
  const packet = w.alloc(1 + 4 + 4 + type.length + 1);
  packet[p] = 98; // CHANNEL_REQUEST
  packet.writeUInt32BE(remoteChannel, ++p);
  packet.writeUInt32BE(type.length, (p += 4));
  packet.write(type, (p += 4), 'utf8');
  packet[p + type.length] = 1; // want reply
  sendPacket(proto, w.finalize(packet));
}

/**
 * The SSH layer against the real OpenSSH client, with a fake VeAccess that
 * runs commands on the host in a scratch directory. What is proven here is
 * SSH parsing, authentication, relaying and the guards; that everything runs
 * inside a VE is proven by the integration tests against real VEs.
 */
describe('SSH server (OpenSSH client, host-fake VEs)', () => {
  const cleanup = new Cleanup();
  let srv: InProcessServer;
  let key: ClientKey;
  let otherKey: ClientKey;
  let forcedKey: ClientKey;
  let ves: HostFakeVes;
  let auth: FakeAuthenticator;
  let home: string;

  beforeAll(async () => {
    const dir = tempDir(cleanup);
    home = path.join(dir, 'home');
    mkdirSync(home);
    key = makeClientKey(dir, 'ed25519');
    otherKey = makeClientKey(dir, 'ecdsa');
    forcedKey = makeClientKey(dir, 'rsa');
    const k = (c: ClientKey, options: Partial<FakeAccount['keys'][number]['options']> = {}) => ({
      algo: c.type, blob: c.blob, fingerprint: c.fingerprint, comment: '', options: { noPty: false, noPortForwarding: false, ...options },
    });
    const accounts = new Map<string, FakeAccount>([
      ['alice', { name: 'alice', ve: 'alice', user: 'root', forwarding: true, password: 'correct horse', keys: [k(key), k(forcedKey, { command: 'echo forced:$SSH_ORIGINAL_COMMAND', noPty: true, noPortForwarding: true })] }],
      ['locked', { name: 'locked', ve: 'locked', user: 'root', forwarding: true, password: 'pw', keys: [k(otherKey)], locked: true }],
      ['broken', { name: 'broken', ve: 'broken', user: 'root', forwarding: true, password: 'pw', keys: [] }],
    ]);
    auth = new FakeAuthenticator(accounts);
    ves = new HostFakeVes(home);
    srv = await startInProcessServer(cleanup, { authenticator: auth, ves, auth: { maxAuthTries: 3, loginGraceTimeMs: 1500, maxStartups: 5, maxStartupsPerSource: 3 } });
  });

  afterAll(() => cleanup.run());

  it('logs in with a key and runs a command: stdout and stderr apart, exit status passed', async () => {
    const r = await sshWithKey(srv.port, 'alice', key, ['echo out; echo err >&2; exit 3']);
    expect(r.stdout).toBe('out\n');
    expect(r.stderr).toBe('err\n');
    expect(r.code).toBe(3);
    const a = await srv.logs.waitFor((e) => e.event === 'ssh.auth' && e.result === 'success');
    expect(a).toMatchObject({ method: 'publickey', account: 'alice', fingerprint: key.fingerprint, source: '127.0.0.1' });
    await srv.logs.waitFor((e) => e.event === 'ssh.session_start' && e.command === 'echo out; echo err >&2; exit 3');
  });

  it('streams stdin to the command', async () => {
    const r = await sshWithKey(srv.port, 'alice', key, ['wc -c'], { input: 'x'.repeat(300_000) });
    expect(r.stdout.trim()).toBe('300000');
  });

  it('reports death by signal as exit-signal (ssh exits 255)', async () => {
    const r = await sshWithKey(srv.port, 'alice', key, ['kill -TERM $$']);
    expect(r.code).toBe(255);
    await srv.logs.waitFor((e) => e.event === 'ssh.session_end' && e.exitSignal === 'TERM');
  });

  it('builds the environment from the user entry and only TERM/LANG/LC_* from the client', async () => {
    const r = await runProgram('ssh', [...sshBaseArgs(srv.port), '-o', 'BatchMode=yes', '-o', 'IdentitiesOnly=yes', '-i', key.file, '-o', 'SendEnv=LANG LC_ALL SECRET', '-o', 'SetEnv=SECRET=leak LC_ALL=C', 'alice@127.0.0.1', 'env'], { env: { PATH: process.env.PATH!, LANG: 'C.UTF-8', HOME: '/tmp' } });
    expect(r.code).toBe(0);
    const env = Object.fromEntries(r.stdout.trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    expect(env.HOME).toBe(home);
    expect(env.USER).toBe('root');
    expect(env.LOGNAME).toBe('root');
    expect(env.SHELL).toBe('/bin/sh');
    expect(env.PATH).toContain('/usr/bin');
    expect(env.LC_ALL).toBe('C');
    expect(env.SECRET).toBeUndefined();
    expect(env.SSH_CONNECTION).toMatch(/^127\.0\.0\.1 \d+ 127\.0\.0\.1 \d+$/);
    expect(Object.keys(env).some((k) => k.startsWith('NODE') || k === 'VITEST')).toBe(false);
  });

  it('logs in with a password and with keyboard-interactive', async () => {
    const p = await sshWithPassword(srv.port, 'alice', 'correct horse', ['echo pw-ok']);
    expect(p.stdout).toBe('pw-ok\n');
    const k = await sshWithPassword(srv.port, 'alice', 'correct horse', ['echo kbd-ok'], { method: 'keyboard-interactive' });
    expect(k.stdout).toBe('kbd-ok\n');
    await srv.logs.waitFor((e) => e.event === 'ssh.auth' && e.method === 'keyboard-interactive' && e.result === 'success');
  });

  it('refuses a wrong password, a locked account and an unknown user alike, never logging the password', async () => {
    for (const [user, pw] of [['alice', 'wrong'], ['locked', 'pw'], ['nobody', 'pw']] as const) {
      const r = await sshWithPassword(srv.port, user, pw, ['true']);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/Permission denied/);
    }
    expect(JSON.stringify(srv.logs.records)).not.toContain('correct horse');
    expect(JSON.stringify(srv.logs.records)).not.toContain('"wrong"');
    expect(srv.logs.events('ssh.auth').filter((e) => e.result === 'failure' && e.method === 'password').length).toBeGreaterThanOrEqual(3);
  });

  it('runs the forced command of a command= key with SSH_ORIGINAL_COMMAND, and refuses a pty for no-pty', async () => {
    const r = await sshWithKey(srv.port, 'alice', forcedKey, ['what I asked']);
    expect(r.stdout).toBe('forced:what I asked\n');
    const t = await sshWithKey(srv.port, 'alice', forcedKey, ['true'], { extra: ['-tt'] });
    expect(t.stderr).toMatch(/PTY allocation request failed/);
  });

  it('gives a pty with TERM and the requested size, and a login shell for `ssh -T`', async () => {
    const r = await sshWithKey(srv.port, 'alice', key, ['tty; echo TERM=$TERM; stty size'], { extra: ['-tt', '-o', 'SetEnv=TERM=vt220'] });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/\/dev\/pts\/\d+/);
    expect(r.stdout).toMatch(/TERM=/);
    const shell = await sshWithKey(srv.port, 'alice', key, [], { extra: ['-T'], input: 'echo no-pty-shell; exit 4\n' });
    expect(shell.stdout).toContain('no-pty-shell');
    expect(shell.code).toBe(4);
  });

  it('tells the user a short message when the VE cannot start, logs the reason, and closes', async () => {
    ves.failEnsure = new VeshError(ErrorCodes.VE_START_FAILED, 'runc create failed: secret host detail', { userMessage: 'Your environment failed to start; the administrator has been told why.' });
    try {
      const r = await sshWithKey(srv.port, 'alice', key, ['true']);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain('Your environment failed to start');
      expect(r.stderr).not.toContain('secret host detail');
      await srv.logs.waitFor((e) => e.event === 'ssh.login_ve_failed' && String(e.err).includes('secret host detail'));
    } finally {
      ves.failEnsure = null;
    }
  });

  it('disconnects after MaxAuthTries failures', async () => {
    // OpenSSH's client gives up after its own prompt count; ssh2's lets us keep trying.
    const c = new Client();
    c.on('error', () => undefined);
    let tries = 0;
    await new Promise<void>((resolve) => {
      c.on('close', () => resolve());
      c.connect({
        host: '127.0.0.1', port: srv.port, username: 'alice',
        authHandler: (_left, _partial, next) => {
          tries += 1;
          if (tries > 10) return next(false as never);
          next({ type: 'password', username: 'alice', password: `guess-${tries}` });
        },
      });
    });
    // The third failure ends it (a fourth attempt may be under way when the disconnect arrives).
    expect(tries).toBeGreaterThanOrEqual(3);
    expect(tries).toBeLessThanOrEqual(4);
    await srv.logs.waitFor((e) => e.event === 'ssh.auth_too_many' && e.failures === 3);
  });

  /** A TCP connection to the server from `local` (any 127/8 address is this host's loopback). */
  function connectFrom(local: string): net.Socket {
    const s = net.connect({ port: srv.port, host: '127.0.0.1', localAddress: local });
    s.on('error', () => undefined);
    cleanup.add(() => { s.destroy(); });
    return s;
  }
  /** Waits until the server counts `n` unauthenticated connections (10 s: a loaded machine accepts slowly). */
  const unauthenticatedIs = (n: number) => vi.waitFor(() => expect(srv.server.stats().unauthenticated).toBe(n), { timeout: 10_000 });
  const closed = (s: net.Socket) => new Promise<void>((r) => (s.destroyed ? r() : s.once('close', () => r())));

  it('drops garbage instead of an identification line, with a log line, and holds it against the source', async () => {
    const s = connectFrom('127.0.0.3');
    s.on('connect', () => s.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    s.resume();
    await closed(s);
    await srv.logs.waitFor((e) => e.event === 'ssh.connection_closed' && e.stage === 'before identification' && String(e.firstBytes).includes('GET /'));
    await srv.logs.waitFor((e) => e.event === 'ssh.preauth_failure' && e.source === '127.0.0.3' && e.kind === 'garbage');
    expect(auth.failures.get('127.0.0.3')).toBe(1);
  });

  it('does not hold a bare TCP probe (connect, close, nothing sent) against the source', async () => {
    const s = connectFrom('127.0.0.5');
    await new Promise<void>((r) => s.once('connect', () => r()));
    s.resume();
    s.end();
    await closed(s);
    await srv.logs.waitFor((e) => e.event === 'ssh.connection_closed' && e.source === '127.0.0.5');
    expect(auth.failures.get('127.0.0.5')).toBeUndefined();
  });

  it('holds a failed key exchange against the source', async () => {
    const sock = connectFrom('127.0.0.6');
    await new Promise<void>((r) => sock.once('connect', () => r()));
    const c = new Client();
    const err = await new Promise<Error>((resolve) => {
      c.on('error', resolve);
      // A client with nothing in common with our key exchange offer.
      c.connect({ sock, username: 'alice', algorithms: { kex: ['diffie-hellman-group14-sha256'] } });
    });
    expect(err.message).toMatch(/key exchange|handshake/i);
    c.end();
    await srv.logs.waitFor((e) => e.event === 'ssh.preauth_failure' && e.source === '127.0.0.6' && e.kind === 'protocol_error');
    expect(auth.failures.get('127.0.0.6')).toBe(1);
  });

  it('cuts a client that never finishes key exchange at the login grace time, and holds it against the source', async () => {
    const s = connectFrom('127.0.0.4');
    let t0 = 0;
    s.on('connect', () => {
      t0 = Date.now();
      s.write('SSH-2.0-stall\r\n');
    });
    s.resume();
    await closed(s);
    // Timers never fire early, so this bound cannot fail on a slow machine.
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1000);
    await srv.logs.waitFor((e) => e.event === 'ssh.login_grace_timeout' && e.source === '127.0.0.4' && e.graceMs === 1500);
    await srv.logs.waitFor((e) => e.event === 'ssh.preauth_failure' && e.source === '127.0.0.4' && e.kind === 'grace_timeout');
    expect(auth.failures.get('127.0.0.4')).toBe(1);
  });

  it('refuses connections beyond maxStartups while others have not authenticated', async () => {
    // An earlier test's connection may still hold a slot for a moment after its client saw the close.
    await unauthenticatedIs(0);
    // Two sources, each under its own cap of 3, fill the 5 slots.
    const socks = ['127.0.0.1', '127.0.0.1', '127.0.0.1', '127.0.0.2', '127.0.0.2'].map(connectFrom);
    try {
      await unauthenticatedIs(5);
      const extra = connectFrom('127.0.0.9');
      await closed(extra);
      await srv.logs.waitFor((e) => e.event === 'ssh.connection_refused' && e.source === '127.0.0.9' && String(e.reason).includes('(maxStartups)'));
    } finally {
      for (const s of socks) s.destroy();
    }
    await unauthenticatedIs(0);
  });

  it('refuses a source beyond maxStartupsPerSource while other sources still get in', async () => {
    await unauthenticatedIs(0);
    const mine = [1, 2, 3].map(() => connectFrom('127.0.0.7'));
    try {
      await unauthenticatedIs(3);
      const fourth = connectFrom('127.0.0.7');
      await closed(fourth);
      await srv.logs.waitFor((e) => e.event === 'ssh.connection_refused' && e.source === '127.0.0.7' && String(e.reason).includes('maxStartupsPerSource'));
      // Another source is admitted: the server greets it.
      const other = connectFrom('127.0.0.8');
      const greeting = await new Promise<string>((resolve) => other.once('data', (d: Buffer) => resolve(d.toString())));
      expect(greeting).toMatch(/^SSH-2\.0-vesh/);
      other.destroy();
    } finally {
      for (const s of mine) s.destroy();
    }
    await unauthenticatedIs(0);
  });

  /** An ssh2 client logged in with the test key, for requests OpenSSH will not send. */
  async function rawClient(): Promise<Client> {
    const c = new Client();
    c.on('error', () => undefined);
    const { readFileSync } = await import('node:fs');
    await new Promise<void>((resolve, reject) => {
      c.once('ready', () => resolve());
      c.once('error', reject);
      c.connect({ host: '127.0.0.1', port: srv.port, username: 'alice', privateKey: readFileSync(key.file) });
    });
    return c;
  }

  it('serves 10 sessions at once on one connection and refuses the 11th', async () => {
    const c = await rawClient();
    try {
      const open = () => new Promise<import('ssh2').ClientChannel | Error>((resolve) => c.exec('read x; echo "got-$x"', (err, stream) => resolve(err ?? stream)));
      const streams = [];
      for (let i = 0; i < 10; i++) {
        const st = await open();
        if (st instanceof Error) throw new Error(`session ${i + 1} of 10 was refused: ${st.message}`);
        streams.push(st);
      }
      expect(await open()).toBeInstanceOf(Error);
      // All ten run at once: each answers only now.
      const outputs = await Promise.all(streams.map((st, i) => new Promise<string>((resolve) => {
        let out = '';
        st.on('data', (d: Buffer) => { out += d.toString(); });
        st.on('close', () => resolve(out));
        st.end(`${i}\n`);
      })));
      expect(outputs).toEqual(streams.map((_, i) => `got-${i}\n`));
      // Closed sessions free their slots.
      const again = await open();
      expect(again).not.toBeInstanceOf(Error);
      (again as import('ssh2').ClientChannel).end('x\n');
    } finally {
      c.end();
    }
  });

  it('caps sessions per connection and drops a channel-open flood', async () => {
    const c = await rawClient();
    try {
      const results = await Promise.all(Array.from({ length: 400 }, () => new Promise<boolean>((resolve) => {
        try {
          c.exec('sleep 5', (err) => resolve(!err));
        } catch {
          resolve(false);
        }
      })));
      expect(results.filter(Boolean).length).toBeLessThanOrEqual(10);
      await srv.logs.waitFor((e) => e.event === 'ssh.connection_dropped' && e.reason === 'channel-open flood');
    } finally {
      c.end();
    }
  });

  it('refuses a channel whose maximum packet size is 0 (ssh2 #1504) and keeps serving', async () => {
    const c = await rawClient();
    try {
      const internals = c as unknown as { _protocol: { session(chan: number, win: number, max: number): void } };
      internals._protocol.session(777, 2 * 1024 * 1024, 0);
      await srv.logs.waitFor((e) => e.event === 'ssh.protocol_violation' && e.what === 'channel_open_packet_size');
      const out = await new Promise<string>((resolve, reject) => {
        c.exec('echo still-alive', (err, stream) => {
          if (err) return reject(err);
          let s = '';
          stream.on('data', (d: Buffer) => { s += d.toString(); });
          stream.on('close', () => resolve(s));
        });
      });
      expect(out).toBe('still-alive\n');
    } finally {
      c.end();
    }
  });

  it('drops a client that sends beyond the receive window (ssh2 #1505)', async () => {
    const c = await rawClient();
    try {
      await new Promise<void>((resolve, reject) => {
        c.exec('sleep 10', (err, stream) => {
          if (err) return reject(err);
          // Lie to our own client about the server's window, then overrun it.
          (stream as unknown as { outgoing: { window: number; packetSize: number } }).outgoing.window = 64 * 1024 * 1024;
          stream.on('error', () => undefined);
          const chunk = Buffer.alloc(32 * 1024);
          for (let i = 0; i < 400; i++) stream.write(chunk);
          resolve();
        });
      });
      await srv.logs.waitFor((e) => e.event === 'ssh.protocol_violation' && e.what === 'channel_window_exceeded');
    } finally {
      c.end();
    }
  });

  it('clamps absurd pty sizes and refuses unknown requests without crashing', async () => {
    const c = await rawClient();
    try {
      await new Promise<void>((resolve, reject) => {
        c.shell({ rows: 0, cols: 100000, term: 'xterm' }, (err, stream) => {
          if (err) return reject(err);
          stream.on('error', () => undefined);
          stream.resume();
          stream.setWindow(0, 0, 0, 0);
          stream.setWindow(999999, 999999, 0, 0);
          stream.end('exit\n');
          stream.on('close', () => resolve());
        });
      });
      await srv.logs.waitFor((e) => e.event === 'ssh.pty_size_clamped' && (e.used as { cols: number }).cols === 1000);
      // A channel request type nobody knows: ssh2 refuses it, we log it, the connection lives on.
      const ch = await new Promise<{ outgoing: { id: number } }>((resolve, reject) => {
        c.exec('sleep 1', (err, stream) => {
          if (err) return reject(err);
          stream.resume();
          resolve(stream as never);
        });
      });
      sendRawChannelRequest(c, ch.outgoing.id, 'vesh-test-unknown@example.com');
      await srv.logs.waitFor((e) => e.event === 'ssh.request_refused' && e.type === 'vesh-test-unknown@example.com');
      c.exec('echo alive', () => undefined);
      await srv.logs.waitFor((e) => e.event === 'ssh.session_start' && e.command === 'echo alive');
    } finally {
      c.end();
    }
  });

  it('forwards -L through the helper and audits it', async () => {
    const target = net.createServer((s) => s.end('hello-from-target\n'));
    await new Promise<void>((r) => target.listen(0, '127.0.0.1', () => r()));
    const tport = (target.address() as net.AddressInfo).port;
    const c = await rawClient();
    try {
      const data = await new Promise<string>((resolve, reject) => {
        c.forwardOut('127.0.0.1', 1234, '127.0.0.1', tport, (err, stream) => {
          if (err) return reject(err);
          let s = '';
          stream.on('data', (d: Buffer) => { s += d.toString(); });
          stream.on('close', () => resolve(s));
          stream.end();
        });
      });
      expect(data).toBe('hello-from-target\n');
      await srv.logs.waitFor((e) => e.event === 'forward.close' && e.kind === 'local');
    } finally {
      c.end();
      target.close();
    }
  });

  it('refuses forwarding for a no-port-forwarding key', async () => {
    const r = await sshWithKey(srv.port, 'alice', forcedKey, ['true'], { extra: ['-o', 'ExitOnForwardFailure=yes', '-L', '0:127.0.0.1:9'] });
    void r;
    const c = new Client();
    c.on('error', () => undefined);
    const { readFileSync } = await import('node:fs');
    await new Promise<void>((resolve, reject) => {
      c.once('ready', () => resolve());
      c.once('error', reject);
      c.connect({ host: '127.0.0.1', port: srv.port, username: 'alice', privateKey: readFileSync(forcedKey.file) });
    });
    try {
      const err = await new Promise<Error | undefined>((resolve) => c.forwardOut('127.0.0.1', 1, '127.0.0.1', 9, (e) => resolve(e)));
      expect(err).toBeDefined();
      await srv.logs.waitFor((e) => e.event === 'forward.refused' && e.reason === 'no-port-forwarding key option');
    } finally {
      c.end();
    }
  });

  it('keeps host keys across restarts (never rewritten) with mode 0600', async () => {
    const { statSync, readFileSync } = await import('node:fs');
    const f = path.join(srv.hostKeysDir, 'ssh_host_ed25519_key');
    expect(statSync(f).mode & 0o777).toBe(0o600);
    expect(statSync(path.join(srv.hostKeysDir, 'ssh_host_rsa_key')).mode & 0o777).toBe(0o600);
    const before = readFileSync(f);
    const { loadOrCreateHostKeys } = await import('../../src/ssh/host-keys.js');
    const again = await loadOrCreateHostKeys(srv.hostKeysDir, srv.logs.logger);
    expect(readFileSync(f).equals(before)).toBe(true);
    expect(again.every((k) => !k.created)).toBe(true);
    const fp = (await runProgram('ssh-keygen', ['-lf', f])).stdout.split(' ')[1];
    expect(again.find((k) => k.type === 'ssh-ed25519')?.fingerprint).toBe(fp);
    writeFileSync(path.join(srv.hostKeysDir, 'unrelated'), '');
  });
});

describe('test harness: a server bug fails the test file', () => {
  it('runs every cleanup step, then rejects with what a check found', async () => {
    const c = new Cleanup();
    const done: string[] = [];
    c.add(() => { done.push('first'); });
    c.addCheck(() => {
      const bugs = serverBugRecords([{ event: 'ssh.connection' }, { event: 'serve.uncaught_exception', err: 'boom' }]);
      if (bugs.length > 0) throw new Error(`server bug: ${String(bugs[0]!.err)}`);
    });
    c.add(() => { throw new Error('a failing step does not stop the others'); });
    c.add(() => { done.push('last'); });
    await expect(c.run()).rejects.toThrow('server bug: boom');
    expect(done).toEqual(['last', 'first']);
    // Checks run once; a clean run resolves.
    await expect(c.run()).resolves.toBeUndefined();
    expect(serverBugRecords([{ event: 'serve.unhandled_rejection' }, { event: 'serve.sighup' }])).toHaveLength(1);
  });
});

describe('caps on what logged-in users hold (sessions: in vesh.yaml)', () => {
  const records: Array<Record<string, unknown>> = [];
  const logger = pino({ level: 'debug' }, { write: (l: string) => void records.push(JSON.parse(l) as Record<string, unknown>) });

  it('has OpenSSH-like defaults that hold 500 sessions of one account, and reads its settings', () => {
    const c = parseServerConfig('/tmp/vesh.yaml', 'listen: "127.0.0.1:0"\n');
    expect(c.sessions).toEqual(DEFAULT_SESSION_LIMITS);
    expect(c.sessions.maxSessionsPerAccount).toBe(500);
    expect(c.auth.disconnectOnLock).toBe(true);
    const d = parseServerConfig('/tmp/vesh.yaml', 'sessions: { maxSessions: 4, maxConnectionsPerAccount: 2 }\n');
    expect(d.sessions.maxSessions).toBe(4);
    expect(d.sessions.maxConnectionsPerAccount).toBe(2);
    expect(() => parseServerConfig('/tmp/vesh.yaml', 'sessions: { maxSesions: 4 }\n')).toThrow();
  });

  it('counts per account and in all, refuses with a message naming the account and cap, and logs refusals at a bounded rate', () => {
    let now = 0;
    records.length = 0;
    const caps = new UsageCaps({ ...DEFAULT_SESSION_LIMITS, maxSessionsPerAccount: 2, maxSessionsTotal: 3 }, logger, () => now);
    expect(caps.admit('session', 'alice')).toBeNull();
    expect(caps.admit('session', 'alice')).toBeNull();
    const refused = caps.admit('session', 'alice');
    expect(refused?.setting).toBe('sessions.maxSessionsPerAccount');
    expect(refused?.userMessage).toBe('too many sessions for account alice (2); close some and try again');
    expect(caps.admit('session', 'bob')).toBeNull();
    expect(caps.admit('session', 'carol')?.setting).toBe('sessions.maxSessionsTotal');
    for (let i = 0; i < 100; i++) caps.admit('session', 'alice');
    expect(records.filter((r) => r.event === 'ssh.limit_reached' && r.account === 'alice')).toHaveLength(1);
    now += 10_000;
    caps.admit('session', 'alice');
    const lines = records.filter((r) => r.event === 'ssh.limit_reached' && r.account === 'alice');
    expect(lines).toHaveLength(2);
    expect(lines[1]!.refusedSinceLastLine).toBe(100);
    caps.release('session', 'alice');
    expect(caps.admit('session', 'alice')).toBeNull();
    // A release that was never admitted changes nothing.
    caps.release('connection', 'nobody');
    expect(caps.usage('alice')).toEqual({ account: { connection: 0, session: 2, forwardHelper: 0 }, total: { connection: 0, session: 3, forwardHelper: 0 } });
  });

  it('logs client-caused lines up to a cap per connection and counts the rest', () => {
    records.length = 0;
    const capped = new CappedLog(() => logger, 3);
    for (let i = 0; i < 50; i++) capped.info({ event: 'ssh.signal_refused', i });
    expect(records.filter((r) => r.event === 'ssh.signal_refused')).toHaveLength(3);
    expect(records.filter((r) => r.event === 'ssh.log_lines_suppressed')).toHaveLength(1);
    expect(capped.suppressed).toBe(47);
  });
});
