import argon2 from 'argon2';
import { createHash, randomBytes } from 'node:crypto';
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, type VeTestEnv } from '../helpers/ve-env.js';
import {
  Cleanup, makeClientKey, runProgram, sshWithKey, startVeshServe, tempDir, writeAccounts,
  type ClientKey, type RunResult, type ServeProcess,
} from '../helpers/ssh-harness.js';
import { DEBIAN_PYTHON, ProgramTerminal, knownHostsText, readHostKeys, versionOf, type HostKeyInfo } from './kit.js';

/**
 * Interoperability: SSH clients other than OpenSSH's, each an independent
 * implementation, against a real `vesh serve` and a real VE. Each does a
 * login (with the server's host key pinned, so the key exchange signature is
 * checked), an exec whose exit status and stderr come back apart, a terminal
 * session, and a file transfer both ways with the content checked on each
 * side. The clients come from Debian packages (scripts/ensure-system.sh).
 */

const HERE = path.dirname(new URL(import.meta.url).pathname);
const DROPBEAR = versionOf('dbclient', ['-V'], /(Dropbear v\S+)/);
const PUTTY = versionOf('plink', ['-V'], /plink: (Release \S+)/);
const PARAMIKO = versionOf(DEBIAN_PYTHON, ['-c', 'import paramiko; print("paramiko " + paramiko.__version__)'], /(paramiko \S+)/);
const ASYNCSSH = versionOf(DEBIAN_PYTHON, ['-W', 'ignore', '-c', 'import asyncssh; print("AsyncSSH " + asyncssh.__version__)'], /(AsyncSSH \S+)/);
const LIBSSH2 = versionOf('curl', ['-V'], /(libssh2\/\S+)/);
const LIBSSH = versionOf('dpkg-query', ['-W', '-f', 'libssh ${Version}\\n', 'libssh-dev'], /^(libssh \S+)/m);

const EXEC_CMD = 'echo to-out; echo to-err >&2; exit 7';

describe('vesh serve: clients other than OpenSSH', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let serve: ServeProcess;
  let work: string;
  let home: string;
  let edKey: ClientKey;
  let rsaKey: ClientKey;
  let ecKey: ClientKey;
  let hostKeys: HostKeyInfo;
  let knownHosts: string;
  let payload: Buffer;
  let payloadFile: string;
  const password = `pw-${randomBytes(6).toString('hex')}`;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'debian' });
    cleanup.add(() => env.cleanup());
    work = tempDir(cleanup, 'vesh-interop-');
    edKey = makeClientKey(work, 'ed25519', 'ed');
    rsaKey = makeClientKey(work, 'rsa', 'rsa');
    ecKey = makeClientKey(work, 'ecdsa', 'ec');
    const hash = await argon2.hash(password, { type: argon2.argon2id });
    writeAccounts(env.config.accountsFile, [
      'alice:',
      `  password: "${hash}"`,
      '  keys:',
      ...[edKey, rsaKey, ecKey].map((k) => `    - ${k.publicLine}`),
      '',
    ].join('\n'));
    serve = await startVeshServe(cleanup, env.configFile);
    hostKeys = readHostKeys(env.config.hostKeysDir);
    knownHosts = path.join(work, 'known_hosts');
    writeFileSync(knownHosts, knownHostsText(serve.port, hostKeys));
    // dbclient reads only ~/.ssh/known_hosts (a HOME of its own for the
    // clients), and looks a host up by name alone, without the port.
    home = path.join(work, 'home');
    mkdirSync(path.join(home, '.ssh'), { recursive: true, mode: 0o700 });
    writeFileSync(path.join(home, '.ssh', 'known_hosts'), hostKeys.publicLines.map((l) => `127.0.0.1 ${l}\n`).join(''));
    payload = randomBytes(300_000);
    payloadFile = path.join(work, 'payload.bin');
    writeFileSync(payloadFile, payload);
    // The first login starts the VE; the clients below then meet a running one.
    const first = await sshWithKey(serve.port, 'alice', edKey, ['true'], { timeoutMs: 120_000 });
    expect(first.code, first.stderr).toBe(0);
  });

  afterAll(() => cleanup.run());

  const clientEnv = () => ({ PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: home, LANG: 'C.UTF-8' });
  const run = (file: string, args: string[], input?: string | Buffer): Promise<RunResult> =>
    runProgram(file, args, { env: clientEnv(), input, timeoutMs: 60_000, cwd: work });
  /** Like runProgram, but keeps stdout as bytes (a binary download through a command). */
  const runRaw = (file: string, args: string[]): Promise<{ code: number | null; stdout: Buffer; stderr: string }> => new Promise((resolve, reject) => {
    const child = spawn(file, args, { env: clientEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    const t = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(t);
      resolve({ code, stdout: Buffer.concat(out), stderr: err });
    });
  });
  const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
  /** The content of a file inside the VE, as OpenSSH's client reads it back. */
  const hashInVe = async (file: string) => {
    const r = await sshWithKey(serve.port, 'alice', edKey, [`sha256sum ${file}`], { timeoutMs: 60_000 });
    return r.stdout.split(' ')[0];
  };
  const expectExec = (r: RunResult) => {
    expect(r.stdout).toBe('to-out\n');
    expect(r.stderr).toContain('to-err\n');
    expect(r.code).toBe(7);
  };

  describe(`dropbear ${DROPBEAR}`, () => {
    let dbKey: string;
    const db = (args: string[]) => ['-p', String(serve.port), '-i', dbKey, ...args];
    beforeAll(() => {
      dbKey = path.join(work, 'ed.dropbear');
      execFileSync('dropbearconvert', ['openssh', 'dropbear', edKey.file, dbKey], { stdio: 'ignore' });
    });

    it('dbclient logs in with a key (host key checked against known_hosts) and runs a command: stdout, stderr, exit status', async () => {
      const r = await run('dbclient', db(['alice@127.0.0.1', EXEC_CMD]));
      expectExec(r);
      expect(r.stderr).not.toMatch(/host key|Caution/i);
    });

    it('dbclient logs in with a password (DROPBEAR_PASSWORD, its way for scripts)', async () => {
      const r = await runProgram('dbclient', ['-p', String(serve.port), 'alice@127.0.0.1', 'echo by-password'], {
        env: { ...clientEnv(), DROPBEAR_PASSWORD: password }, timeoutMs: 60_000, cwd: work,
      });
      expect(r.stdout, r.stderr).toBe('by-password\n');
      expect(r.code).toBe(0);
    });

    it('dbclient -t: a shell on the VE terminal, with window size, resize and exit status', async () => {
      const term = new ProgramTerminal('dbclient', ['-t', ...db(['alice@127.0.0.1'])], clientEnv());
      try {
        await term.expect(/root@alice:~# /);
        term.write('tty; stty size\r');
        await term.expect(/\/dev\/pts\/\d+\s+24 80/);
        term.resize(100, 30);
        term.write('stty size\r');
        await term.expect(/30 100/);
        term.write('exit 3\r');
        expect(await term.waitExit()).toBe(3);
      } finally {
        term.kill();
      }
    });

    it('dbclient moves a file both ways through cat, byte for byte', async () => {
      const up = await run('dbclient', db(['alice@127.0.0.1', 'cat > /root/dropbear.bin']), payload);
      expect(up.code, up.stderr).toBe(0);
      expect(await hashInVe('/root/dropbear.bin')).toBe(sha256(payload));
      const down = await runRaw('dbclient', db(['alice@127.0.0.1', 'cat /root/dropbear.bin']));
      expect(down.code).toBe(0);
      expect(sha256(down.stdout)).toBe(sha256(payload));
    });
  });

  describe(`PuTTY ${PUTTY} (plink, pscp, psftp)`, () => {
    let ppk: string;
    const pinned = () => [...hostKeys.fingerprints.flatMap((f) => ['-hostkey', f]), '-P', String(serve.port)];
    beforeAll(() => {
      ppk = path.join(work, 'rsa.ppk');
      execFileSync('puttygen', [rsaKey.file, '-O', 'private', '-o', ppk], { stdio: 'ignore' });
    });

    it('plink logs in with an RSA key (host key pinned) and runs a command: stdout, stderr, exit status', async () => {
      const r = await run('plink', ['-ssh', '-batch', '-no-antispoof', ...pinned(), '-i', ppk, 'alice@127.0.0.1', EXEC_CMD]);
      expectExec(r);
    });

    it('plink -t: a shell on the VE terminal, with window size, resize and exit status', async () => {
      const term = new ProgramTerminal('plink', ['-ssh', '-batch', '-no-antispoof', '-t', ...pinned(), '-i', ppk, 'alice@127.0.0.1'], clientEnv());
      try {
        await term.expect(/root@alice:~# /);
        term.write('tty; stty size\r');
        await term.expect(/\/dev\/pts\/\d+\s+24 80/);
        term.resize(100, 30);
        term.write('stty size\r');
        await term.expect(/30 100/);
        term.write('exit 3\r');
        expect(await term.waitExit()).toBe(3);
      } finally {
        term.kill();
      }
    });

    it('pscp (SFTP) copies a file up and back down with a key', async () => {
      const up = await run('pscp', ['-batch', '-sftp', ...pinned(), '-i', ppk, payloadFile, 'alice@127.0.0.1:/root/pscp.bin']);
      expect(up.code, up.stderr).toBe(0);
      expect(await hashInVe('/root/pscp.bin')).toBe(sha256(payload));
      const back = path.join(work, 'pscp.back');
      const down = await run('pscp', ['-batch', '-sftp', ...pinned(), '-i', ppk, 'alice@127.0.0.1:/root/pscp.bin', back]);
      expect(down.code, down.stderr).toBe(0);
      expect(sha256(readFileSync(back))).toBe(sha256(payload));
    });

    it('psftp logs in with a password and puts and gets a file', async () => {
      const batch = path.join(work, 'psftp.batch');
      const back = path.join(work, 'psftp.back');
      writeFileSync(batch, `put ${payloadFile} /root/psftp.bin\nget /root/psftp.bin ${back}\nquit\n`);
      const r = await run('psftp', ['-batch', ...pinned(), '-pw', password, '-b', batch, '-be', 'alice@127.0.0.1']);
      expect(r.code, r.stderr).toBe(0);
      expect(await hashInVe('/root/psftp.bin')).toBe(sha256(payload));
      expect(sha256(readFileSync(back))).toBe(sha256(payload));
    });
  });

  /**
   * Runs one of the library drivers in this directory (each logs in, runs
   * the exec and the terminal, and puts and gets /root/NAME.bin) and checks
   * what it printed and moved.
   */
  const driver = async (command: string[], key: ClientKey, name: string) => {
    const back = path.join(work, `${name}.back`);
    const r = await run(command[0]!, [...command.slice(1), String(serve.port), 'alice', key.file, knownHosts, payloadFile, back]);
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { exec: { stdout: string; stderr: string; status: number }; pty: { output: string; status: number } };
    expect(out.exec).toEqual({ stdout: 'to-out\n', stderr: 'to-err\n', status: 7 });
    expect(out.pty.output).toMatch(/TERM=xterm\r?\n\/dev\/pts\/\d+\r?\n30 100/);
    expect(out.pty.status).toBe(4);
    expect(await hashInVe(`/root/${name}.bin`)).toBe(sha256(payload));
    expect(sha256(readFileSync(back))).toBe(sha256(payload));
  };

  it(`${PARAMIKO}: ECDSA key login (host key checked), exec with exit status, terminal, SFTP both ways`, async () => {
    await driver([DEBIAN_PYTHON, '-W', 'ignore', path.join(HERE, 'paramiko-client.py')], ecKey, 'paramiko');
  });

  it(`${ASYNCSSH}: ed25519 key login (host key checked), exec with exit status, terminal, SFTP both ways`, async () => {
    await driver([DEBIAN_PYTHON, '-W', 'ignore', path.join(HERE, 'asyncssh-client.py')], edKey, 'asyncssh');
  });

  it(`${LIBSSH} (a small C client built against it here): ed25519 key login (host key checked), exec with exit status, terminal, SFTP both ways`, async () => {
    const bin = path.join(work, 'libssh-client');
    execFileSync('gcc', ['-O2', '-Wall', '-Wextra', '-Werror', '-o', bin, path.join(HERE, 'libssh-client.c'), '-lssh']);
    await driver([bin], edKey, 'libssh');
  });

  it(`curl with ${LIBSSH2}: key login (host key pinned by SHA256) and SFTP both ways`, async () => {
    const edBlob = Buffer.from(hostKeys.publicLines[0]!.split(' ')[1]!, 'base64');
    const pin = createHash('sha256').update(edBlob).digest('base64');
    const url = `sftp://alice@127.0.0.1:${serve.port}/root/libssh2.bin`;
    const common = ['-sS', '--key', edKey.file, '--pubkey', `${edKey.file}.pub`, '--hostpubsha256', pin];
    const up = await run('curl', [...common, '-T', payloadFile, url]);
    expect(up.code, up.stderr).toBe(0);
    expect(await hashInVe('/root/libssh2.bin')).toBe(sha256(payload));
    const back = path.join(work, 'libssh2.back');
    const down = await run('curl', [...common, '-o', back, url]);
    expect(down.code, down.stderr).toBe(0);
    expect(sha256(readFileSync(back))).toBe(sha256(payload));
  });
});
