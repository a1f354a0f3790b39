import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, symlinkSync } from 'node:fs';
import { createRequire } from 'node:module';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Client, type ClientChannel } from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import {
  Cleanup, ClientTerminal, keyAuthArgs, makeClientKey, runProgram, sshBaseArgs, sshWithKey, startVeshServe, tempDir, writeAccounts,
  type ClientKey, type ServeProcess,
} from '../helpers/ssh-harness.js';

const requireCjs = createRequire(import.meta.url);

interface PacketWriter {
  allocStart: number;
  alloc(n: number): Buffer;
  finalize(b: Buffer): Buffer;
}
type RawProtocol = { _packetRW: { write: PacketWriter } };

/** Send one packet of our own making on an ssh2 client's transport (encrypted as any other). */
function sendRawPacket(c: Client, body: (packet: Buffer, at: number) => void, length: number): void {
  const { sendPacket } = requireCjs('ssh2/lib/protocol/utils.js') as { sendPacket(p: unknown, b: Buffer): void };
  const proto = (c as unknown as { _protocol: RawProtocol })._protocol;
  const w = proto._packetRW.write;
  const at = w.allocStart;
  const packet = w.alloc(length);
  body(packet, at);
  sendPacket(proto, w.finalize(packet));
}

/**
 * Bad input and unusual situations against `vesh serve` with real VEs
 * (Debian template) and the real OpenSSH client (ssh2 as a client where
 * OpenSSH will not misbehave on request): boot on demand, oversized
 * packets, unknown global requests, hang-up without a pty, SIGHUP, the
 * `restrict` key option, a VE that fails to start, and the locale reaching
 * a command. The harness fails this file if the server logged a bug it
 * survived (an uncaught exception).
 */
describe('vesh serve: robustness with real VEs', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let serve: ServeProcess;
  let aliceKey: ClientKey;
  let ritaKey: ClientKey;
  let brokenKey: ClientKey;
  let daveKey: ClientKey;
  /** The accounts file the server reads is a symlink to this one, whose directory it does not watch. */
  let realAccounts: string;
  let baseAccounts: string;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'debian' });
    cleanup.add(() => env.cleanup());
    const dir = tempDir(cleanup);
    aliceKey = makeClientKey(dir, 'ed25519', 'alice');
    ritaKey = makeClientKey(dir, 'ed25519', 'rita');
    brokenKey = makeClientKey(dir, 'ed25519', 'broken');
    daveKey = makeClientKey(dir, 'ed25519', 'dave');
    baseAccounts = [
      'alice:',
      '  keys:',
      `    - ${aliceKey.publicLine} alice@test`,
      'rita:',
      '  ve: alice',
      '  keys:',
      `    - restrict ${ritaKey.publicLine} rita@test`,
      'broken:',
      '  keys:',
      `    - ${brokenKey.publicLine} broken@test`,
      '',
    ].join('\n');
    const realDir = path.join(env.dir, 'accounts-real');
    mkdirSync(realDir);
    realAccounts = path.join(realDir, 'accounts.yaml');
    writeAccounts(realAccounts, baseAccounts);
    symlinkSync(realAccounts, env.config.accountsFile);
    serve = await startVeshServe(cleanup, env.configFile);
  });

  afterAll(async () => {
    await cleanup.run();
  });

  const ssh = (key: ClientKey, user: string, cmd: string[], extra: string[] = [], input?: string) => sshWithKey(serve.port, user, key, cmd, { extra, input, timeoutMs: 120_000 });

  /** An ssh2 client logged in with `key`, for requests the OpenSSH client will not send. */
  async function ssh2Client(user: string, key: ClientKey): Promise<Client> {
    const c = new Client();
    c.on('error', () => undefined);
    cleanup.add(() => { c.end(); });
    await new Promise<void>((resolve, reject) => {
      c.once('ready', () => resolve());
      c.once('error', reject);
      c.connect({ host: '127.0.0.1', port: serve.port, username: user, privateKey: readFileSync(key.file), readyTimeout: 60_000 });
    });
    return c;
  }

  function execOn(c: Client, command: string): Promise<string> {
    return new Promise((resolve, reject) => {
      c.exec(command, (err, stream) => {
        if (err) return reject(err);
        let out = '';
        stream.on('data', (d: Buffer) => { out += d.toString(); });
        stream.stderr.resume();
        stream.on('close', () => resolve(out));
      });
    });
  }

  /** A root shell of alice's in a real terminal, waiting at its prompt. */
  async function aliceShell(): Promise<ClientTerminal> {
    const term = new ClientTerminal([...sshBaseArgs(serve.port), ...keyAuthArgs(aliceKey), '-tt', 'alice@127.0.0.1']);
    cleanup.add(() => term.kill());
    await term.expect(/root@alice:~# /, 120_000);
    return term;
  }

  async function expectShellWorks(term: ClientTerminal, tag: string): Promise<void> {
    term.write(`echo "${tag}-$((40+2))"\r`);
    await term.expect(new RegExp(`${tag}-42`));
  }

  const veProcesses = async (ve: 'alice') => (await shInVe(env, ve, 'ps -eo pid=,args=')).stdout;

  it('boots a stopped VE on demand when its account logs in', async () => {
    const first = await ssh(aliceKey, 'alice', ['echo first']);
    expect(first.stdout).toBe('first\n');
    await env.ves.stop('alice');
    expect((await env.ves.status('alice')).state).toBe('stopped');
    const startsBefore = serve.logs.filter((e) => e.event === 've.started' && e.ve === 'alice').length;
    const r = await ssh(aliceKey, 'alice', ['hostname; cat /proc/1/comm']);
    expect(r.stderr).toBe('');
    expect(r.stdout.split('\n')[0]).toBe('alice');
    expect(r.code).toBe(0);
    expect((await env.ves.status('alice')).state).toBe('running');
    expect(serve.logs.filter((e) => e.event === 've.started' && e.ve === 'alice')).toHaveLength(startsBefore + 1);
  });

  it('drops oversized packets (before and after login) with a log line; another user\'s session keeps working', async () => {
    const term = await aliceShell();
    try {
      // Before login: an identification line, then a packet length far over ssh2's 35000-byte limit.
      const raw = net.connect({ port: serve.port, host: '127.0.0.1', localAddress: '127.0.0.50' });
      raw.on('error', () => undefined);
      cleanup.add(() => { raw.destroy(); });
      raw.once('data', () => {
        const header = Buffer.alloc(8);
        header.writeUInt32BE(0x00100000, 0);
        raw.write(Buffer.concat([Buffer.from('SSH-2.0-oversized\r\n'), header]));
      });
      raw.resume();
      await new Promise<void>((r) => raw.once('close', () => r()));
      await serve.waitForLog((e) => e.event === 'ssh.protocol_violation' && e.what === 'bad_packet_length' && e.authenticated === false);
      await serve.waitForLog((e) => e.event === 'ssh.preauth_failure' && e.source === '127.0.0.50' && e.kind === 'protocol_error');

      // After login (another account, same VE): an SSH_MSG_IGNORE of 40000 bytes.
      const c = await ssh2Client('rita', ritaKey);
      expect(await execOn(c, 'echo rita-in')).toBe('rita-in\n');
      const gone = new Promise<void>((r) => c.once('close', () => r()));
      const size = 40_000;
      sendRawPacket(c, (p, at) => {
        p[at] = 2; // SSH_MSG_IGNORE
        p.writeUInt32BE(size, at + 1);
        p.fill(0x61, at + 5, at + 5 + size);
      }, 1 + 4 + size);
      await gone;
      await serve.waitForLog((e) => e.event === 'ssh.protocol_violation' && e.what === 'bad_packet_length' && e.authenticated === true && e.account === 'rita');
      await expectShellWorks(term, 'alice-after-oversized');
    } finally {
      term.kill();
    }
  });

  it('answers an unknown global request with a failure and keeps the connection', async () => {
    const c = await ssh2Client('alice', aliceKey);
    try {
      const name = 'vesh-test-unknown@example.com';
      const replied = new Promise<boolean>((resolve) => {
        // ssh2's client pops this on SSH_MSG_REQUEST_SUCCESS/FAILURE (true = failure).
        (c as unknown as { _callbacks: Array<(failed: boolean) => void> })._callbacks.push((failed) => resolve(failed));
      });
      sendRawPacket(c, (p, at) => {
        p[at] = 80; // SSH_MSG_GLOBAL_REQUEST
        p.writeUInt32BE(name.length, at + 1);
        p.write(name, at + 5, 'latin1');
        p[at + 5 + name.length] = 1; // want reply
      }, 1 + 4 + name.length + 1);
      expect(await replied).toBe(true);
      await serve.waitForLog((e) => e.event === 'ssh.request_refused' && e.kind === 'global' && e.type === name);
      expect(await execOn(c, 'echo still-connected')).toBe('still-connected\n');
    } finally {
      c.end();
    }
  });

  it('hangs up a session without a pty when its channel closes; nohup and setsid daemons keep running', async () => {
    const c = await ssh2Client('alice', aliceKey);
    try {
      const pid = await new Promise<{ pid: string; stream: ClientChannel }>((resolve, reject) => {
        c.exec('nohup sleep 3002 >/dev/null 2>&1 </dev/null & setsid sleep 3001 >/dev/null 2>&1 </dev/null & echo "PID=$$"; exec sleep 3003', (err, stream) => {
          if (err) return reject(err);
          let out = '';
          stream.stderr.resume();
          stream.on('data', (d: Buffer) => {
            out += d.toString();
            const m = /PID=(\d+)\n/.exec(out);
            if (m) resolve({ pid: m[1]!, stream });
          });
        });
      });
      expect(await veProcesses('alice')).toMatch(new RegExp(`^\\s*${pid.pid} sleep 3003$`, 'm'));
      // Close this one channel; the connection stays.
      pid.stream.close();
      await waitFor('the session process to end', async () => !(await veProcesses('alice')).includes('sleep 3003'));
      const ps = await execOn(c, 'ps -eo args');
      expect(ps).toContain('sleep 3001');
      expect(ps).toContain('sleep 3002');
    } finally {
      c.end();
    }
  });

  it('hangs up `ssh -T` when the client goes away; daemons it started keep running', async () => {
    const child = spawn('ssh', [...sshBaseArgs(serve.port), ...keyAuthArgs(aliceKey), '-T', 'alice@127.0.0.1'], {
      stdio: ['pipe', 'pipe', 'pipe'], env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir() },
    });
    cleanup.add(() => void child.kill('SIGKILL'));
    let out = '';
    child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    child.stderr.resume();
    child.stdin.write('nohup sleep 3012 >/dev/null 2>&1 </dev/null & setsid sleep 3011 >/dev/null 2>&1 </dev/null & echo "PID=$$ $(tty 2>&1)"; exec sleep 3013\n');
    await waitFor('the shell to start', async () => /PID=\d+ /.test(out), 60_000);
    expect(out).toContain('not a tty');
    const pid = /PID=(\d+)/.exec(out)![1]!;
    expect(await veProcesses('alice')).toMatch(new RegExp(`^\\s*${pid} sleep 3013$`, 'm'));
    child.kill('SIGKILL');
    await waitFor('the session process to end', async () => !(await veProcesses('alice')).includes('sleep 3013'));
    const ps = await veProcesses('alice');
    expect(ps).toContain('sleep 3011');
    expect(ps).toContain('sleep 3012');
  });

  it('applies accounts.yaml on SIGHUP, also a change the file watcher cannot see', async () => {
    writeAccounts(realAccounts, `${baseAccounts}dave:\n  ve: alice\n  keys:\n    - ${daveKey.publicLine} dave@test\n`);
    // The watched directory holds only the symlink: nothing has told the server yet.
    const before = await ssh(daveKey, 'dave', ['echo dave-in']);
    expect(before.code).toBe(255);
    expect(before.stderr).toMatch(/Permission denied/);
    const seen = serve.logs.length;
    serve.child.kill('SIGHUP');
    await serve.waitForLog((e) => e.event === 'serve.sighup' && serve.logs.indexOf(e) >= seen);
    await serve.waitForLog((e) => e.event === 'accounts.reloaded' && serve.logs.indexOf(e) >= seen);
    const after = await ssh(daveKey, 'dave', ['echo dave-in']);
    expect(after.stdout).toBe('dave-in\n');
    expect(after.code).toBe(0);
    writeAccounts(realAccounts, baseAccounts);
    serve.child.kill('SIGHUP');
  });

  it('honours `restrict` end to end: commands run, but no pty and no forwarding', async () => {
    const ok = await ssh(ritaKey, 'rita', ['echo restricted-ok']);
    expect(ok.stdout).toBe('restricted-ok\n');
    // No pty, though -tt insists (OpenSSH then gives up: a pty asked for explicitly is a must).
    const tty = await ssh(ritaKey, 'rita', ['tty'], ['-tt']);
    expect(tty.stderr).toMatch(/PTY allocation request failed/);
    expect(tty.stdout).toBe('');
    await serve.waitForLog((e) => e.event === 'ssh.pty_refused' && e.account === 'rita');
    // The same request with alice's unrestricted key does get one.
    const control = await ssh(aliceKey, 'alice', ['tty'], ['-tt']);
    expect(control.stdout).toMatch(/\/dev\/pts\/\d+/);
    // No -L (stdio forward to a port inside the VE).
    const local = await ssh(ritaKey, 'rita', [], ['-W', '127.0.0.1:9']);
    expect(local.code).toBe(255);
    expect(local.stderr).toMatch(/stdio forwarding failed/);
    // No -R.
    const remote = await ssh(ritaKey, 'rita', ['echo should-not-run'], ['-o', 'ExitOnForwardFailure=yes', '-R', '0:127.0.0.1:9']);
    expect(remote.code).toBe(255);
    expect(remote.stderr).toMatch(/remote port forwarding failed/);
    expect(remote.stdout).toBe('');
    // Refused for the key's option, not for some other reason.
    for (const kind of ['local', 'remote']) {
      await serve.waitForLog((e) => e.event === 'forward.refused' && e.kind === kind && e.account === 'rita' && e.reason === 'no-port-forwarding key option');
    }
  });

  it('refuses an account whose VE fails to start with a clear message; another account\'s session is undisturbed', async () => {
    // A VE whose init is gone cannot start again.
    await env.ves.ensureRunning('broken');
    await shInVe(env, 'broken', 'rm -f /sbin/init');
    await env.ves.stop('broken');
    const term = await aliceShell();
    try {
      const r = await ssh(brokenKey, 'broken', ['echo should-not-run']);
      expect(r.stdout).toBe('');
      expect(r.code).not.toBe(0);
      expect(r.stderr).toContain('Your environment failed to start');
      await serve.waitForLog((e) => e.event === 'ssh.login_ve_failed' && e.ve === 'broken');
      await expectShellWorks(term, 'alice-after-broken');
      // And a new login of alice's is not held up either.
      expect((await ssh(aliceKey, 'alice', ['echo alice-new'])).stdout).toBe('alice-new\n');
    } finally {
      term.kill();
    }
  });

  it('passes LANG and LC_* from the client (SendEnv and SetEnv) to a command in the VE, and nothing else', async () => {
    const r = await runProgram('ssh', [
      ...sshBaseArgs(serve.port), ...keyAuthArgs(aliceKey),
      '-o', 'SendEnv=LANG LC_MESSAGES SECRET_FROM_ENV', '-o', 'SetEnv=LC_TIME=en_GB.UTF-8 SECRET=leak',
      'alice@127.0.0.1', 'env',
    ], { env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir(), LANG: 'fr_FR.UTF-8', LC_MESSAGES: 'de_DE.UTF-8', SECRET_FROM_ENV: 'leak' }, timeoutMs: 120_000 });
    expect(r.code).toBe(0);
    const vars = new Map(r.stdout.trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)] as const));
    expect(vars.get('LANG')).toBe('fr_FR.UTF-8');
    expect(vars.get('LC_MESSAGES')).toBe('de_DE.UTF-8');
    expect(vars.get('LC_TIME')).toBe('en_GB.UTF-8');
    expect(vars.has('SECRET')).toBe(false);
    expect(vars.has('SECRET_FROM_ENV')).toBe(false);
    // It is the VE's shell that saw them.
    expect(vars.get('HOME')).toBe('/root');
    const inVe = await runProgram('ssh', [...sshBaseArgs(serve.port), ...keyAuthArgs(aliceKey), '-o', 'SendEnv=LC_ALL', 'alice@127.0.0.1', 'hostname; echo "$LC_ALL"'], {
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir(), LC_ALL: 'C' }, timeoutMs: 120_000,
    });
    expect(inVe.stdout).toBe('alice\nC\n');
  });
});
