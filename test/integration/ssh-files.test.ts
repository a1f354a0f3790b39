import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { vePaths } from '../../src/ve/storage.js';
import { makeVeTestEnv, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import {
  Cleanup, keyAuthArgs, makeClientKey, runProgram, sshBaseArgs, sshWithKey, startVeshServe, tempDir, writeAccounts,
  type ClientKey, type ServeProcess,
} from '../helpers/ssh-harness.js';

/**
 * File transfer into real VEs: sftp, scp (SFTP and -O), rsync and git over
 * ssh all read and write the VE's own filesystem, through programs running
 * inside the VE — never the host's files.
 */
describe('vesh serve: file transfer reads and writes only the VE', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let serve: ServeProcess;
  let key: ClientKey;
  let bobKey: ClientKey;
  let work: string;
  const marker = `vesh-test-${randomBytes(4).toString('hex')}`;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'debian' });
    cleanup.add(() => env.cleanup());
    work = tempDir(cleanup);
    key = makeClientKey(work, 'ed25519', 'alice');
    bobKey = makeClientKey(work, 'ed25519', 'bob');
    writeAccounts(env.config.accountsFile, `alice:\n  keys:\n    - ${key.publicLine}\nbob:\n  keys:\n    - ${bobKey.publicLine}\n`);
    serve = await startVeshServe(cleanup, env.configFile);
    // A host file the VE must never reach.
    writeFileSync(`/tmp/${marker}`, 'host-only\n');
    cleanup.add(() => runProgram('rm', ['-f', `/tmp/${marker}`, `/etc/${marker}`]).then(() => undefined));
    const r = await ssh(['true']);
    expect(r.code).toBe(0);
  });

  afterAll(() => cleanup.run());

  const ssh = (cmd: string[], input?: string, k: ClientKey = key, user = 'alice') => sshWithKey(serve.port, user, k, cmd, { input, timeoutMs: 120_000 });
  const sftp = (batch: string, k: ClientKey = key, user = 'alice') => {
    const f = path.join(work, `batch-${randomBytes(3).toString('hex')}`);
    writeFileSync(f, batch);
    return runProgram('sftp', [...sshBaseArgs(serve.port).map((a) => (a === '-p' ? '-P' : a)), ...keyAuthArgs(k), '-b', f, `${user}@127.0.0.1`], { cwd: work, timeoutMs: 120_000 });
  };

  it('sftp put/rename/get/remove work in the VE and land in its private layer only', async () => {
    const content = randomBytes(200_000);
    writeFileSync(path.join(work, 'up.bin'), content);
    const r = await sftp(['put up.bin /root/up.bin', 'rename /root/up.bin /root/moved.bin', 'get /root/moved.bin back.bin', 'mkdir /root/dir', 'put up.bin /root/dir/keep.bin', 'rm /root/moved.bin', 'bye', ''].join('\n'));
    expect(r.stderr).not.toMatch(/error|denied/i);
    expect(r.code).toBe(0);
    expect(readFileSync(path.join(work, 'back.bin')).equals(content)).toBe(true);
    const inside = await ssh(['ls /root/dir; test -e /root/moved.bin && echo STILL || echo GONE']);
    expect(inside.stdout).toBe('keep.bin\nGONE\n');
    // In alice's private upper layer, not in the shared template, not in bob's VE.
    expect(existsSync(path.join(vePaths(env.layout.veDir('alice')).upper, 'root', 'dir', 'keep.bin'))).toBe(true);
    expect(existsSync(path.join(env.layout.templateRootfs('debian'), 'root', 'dir'))).toBe(false);
    const bob = await ssh(['ls /root/dir 2>&1'], undefined, bobKey, 'bob');
    expect(bob.stdout).toContain('No such file');
    // Audited with paths.
    await serve.waitForLog((e) => e.event === 'sftp.write' && e.path === '/root/up.bin');
    await serve.waitForLog((e) => e.event === 'sftp.rename' && e.from === '/root/up.bin' && e.to === '/root/moved.bin');
    await serve.waitForLog((e) => e.event === 'sftp.remove' && e.path === '/root/moved.bin');
  });

  it('resolves .. and symlinks inside the VE: host files stay out of reach', async () => {
    writeFileSync(path.join(work, 'evil.txt'), 'traversal\n');
    const put = await sftp(`put evil.txt ../../../../../../etc/${marker}\nbye\n`);
    expect(put.code).toBe(0);
    expect(existsSync(`/etc/${marker}`)).toBe(false);
    const inside = await ssh([`cat /etc/${marker}`]);
    expect(inside.stdout).toBe('traversal\n');
    // The host's /tmp marker is not the VE's /tmp.
    const get = await sftp(`get /tmp/${marker} stolen.txt\nbye\n`);
    expect(get.code).not.toBe(0);
    expect(existsSync(path.join(work, 'stolen.txt'))).toBe(false);
    // A symlink made inside the VE points into the VE.
    await ssh(['ln -sf /etc/hostname /root/link-to-hostname; ln -sf ../../../../../../etc/hostname /root/deep-link']);
    const viaLink = await sftp('get /root/link-to-hostname l1.txt\nget /root/deep-link l2.txt\nbye\n');
    expect(viaLink.code).toBe(0);
    expect(readFileSync(path.join(work, 'l1.txt'), 'utf8')).toBe('alice\n');
    expect(readFileSync(path.join(work, 'l2.txt'), 'utf8')).toBe('alice\n');
    // And one made over SFTP cannot reach out either.
    const mk = await sftp(`symlink /tmp/${marker} /root/sftp-link\nget /root/sftp-link l3.txt\nbye\n`);
    expect(mk.code).not.toBe(0);
    expect(existsSync(path.join(work, 'l3.txt'))).toBe(false);
  });

  it('scp works in SFTP mode and in legacy mode (-O)', async () => {
    const data = randomBytes(100_000);
    writeFileSync(path.join(work, 'scp.bin'), data);
    const scpArgs = (legacy: boolean) => [...(legacy ? ['-O'] : []), ...sshBaseArgs(serve.port).map((a) => (a === '-p' ? '-P' : a)), ...keyAuthArgs(key)];
    const up = await runProgram('scp', [...scpArgs(false), 'scp.bin', 'alice@127.0.0.1:/root/scp-sftp.bin'], { cwd: work });
    expect(up.stderr).toBe('');
    expect(up.code).toBe(0);
    const upO = await runProgram('scp', [...scpArgs(true), 'scp.bin', 'alice@127.0.0.1:/root/scp-legacy.bin'], { cwd: work });
    expect(upO.stderr).toBe('');
    expect(upO.code).toBe(0);
    const down = await runProgram('scp', [...scpArgs(true), 'alice@127.0.0.1:/root/scp-sftp.bin', 'scp-down.bin'], { cwd: work });
    expect(down.code).toBe(0);
    expect(readFileSync(path.join(work, 'scp-down.bin')).equals(data)).toBe(true);
    const sums = await ssh(['sha256sum /root/scp-sftp.bin /root/scp-legacy.bin | cut -d" " -f1 | uniq | wc -l']);
    expect(sums.stdout.trim()).toBe('1');
    await serve.waitForLog((e) => e.event === 'ssh.session_start' && typeof e.command === 'string' && e.command.startsWith('scp -t'));
  });

  it('rsync -e ssh copies a tree into the VE', async () => {
    const has = await ssh(['command -v rsync']);
    expect(has.code, 'the Debian template must carry rsync (the contract lists rsync -e ssh)').toBe(0);
    await runProgram('mkdir', ['-p', path.join(work, 'tree', 'sub')]);
    writeFileSync(path.join(work, 'tree', 'a.txt'), 'A\n');
    writeFileSync(path.join(work, 'tree', 'sub', 'b.txt'), 'B\n');
    const e = ['ssh', ...sshBaseArgs(serve.port), ...keyAuthArgs(key)].join(' ');
    const r = await runProgram('rsync', ['-a', '-e', e, 'tree/', 'alice@127.0.0.1:/root/tree/'], { cwd: work, timeoutMs: 120_000 });
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const inside = await ssh(['cat /root/tree/a.txt /root/tree/sub/b.txt']);
    expect(inside.stdout).toBe('A\nB\n');
  });

  it('git clone and push over ssh to a repository in the VE', async () => {
    const has = await ssh(['command -v git']);
    expect(has.code, 'the Debian template must carry git (the contract lists git over ssh)').toBe(0);
    await ssh(['git init -q --bare /root/repo.git']);
    const gitSsh = ['ssh', ...sshBaseArgs(serve.port), ...keyAuthArgs(key)].join(' ');
    const gitEnv = { PATH: process.env.PATH!, HOME: work, GIT_SSH_COMMAND: gitSsh, GIT_AUTHOR_NAME: 't', GIT_AUTHOR_EMAIL: 't@t', GIT_COMMITTER_NAME: 't', GIT_COMMITTER_EMAIL: 't@t' };
    const clone = await runProgram('git', ['clone', '-q', 'alice@127.0.0.1:/root/repo.git', 'clone'], { cwd: work, env: gitEnv, timeoutMs: 120_000 });
    expect(clone.code).toBe(0);
    writeFileSync(path.join(work, 'clone', 'README'), 'hello from git\n');
    const commit = await runProgram('sh', ['-c', 'git add README && git commit -q -m first && git push -q origin HEAD:main'], { cwd: path.join(work, 'clone'), env: gitEnv, timeoutMs: 120_000 });
    expect(commit.stderr).not.toMatch(/fatal|error/);
    expect(commit.code).toBe(0);
    const log = await ssh(['git --git-dir=/root/repo.git log --format=%s main']);
    expect(log.stdout).toBe('first\n');
  });

  it('an upload cut off midway damages no other file', async () => {
    await ssh(['echo precious > /root/precious.txt']);
    const before = (await ssh(['sha256sum /root/precious.txt'])).stdout;
    const big = path.join(work, 'big.bin');
    writeFileSync(big, randomBytes(16 * 1024 * 1024));
    const f = path.join(work, 'cut-batch');
    writeFileSync(f, 'put big.bin /root/big.bin\n');
    const { spawn } = await import('node:child_process');
    // -l: 16 Mbit/s, so the 16 MiB upload takes ~8 s and is surely cut off midway.
    const child = spawn('sftp', [...sshBaseArgs(serve.port).map((a) => (a === '-p' ? '-P' : a)), ...keyAuthArgs(key), '-l', '16000', '-b', f, 'alice@127.0.0.1'], { cwd: work, stdio: 'ignore' });
    const closed = new Promise((r) => child.on('close', r));
    await waitFor('the upload to begin', async () => Number((await ssh(['stat -c %s /root/big.bin 2>/dev/null || echo 0'])).stdout.trim()) > 0, 60_000);
    child.kill('SIGKILL');
    await closed;
    const size = Number((await ssh(['stat -c %s /root/big.bin'])).stdout.trim());
    expect(size).toBeGreaterThan(0);
    expect(size).toBeLessThan(16 * 1024 * 1024);
    expect((await ssh(['sha256sum /root/precious.txt'])).stdout).toBe(before);
    const digest = createHash('sha256').update('precious\n').digest('hex');
    expect(before.startsWith(digest)).toBe(true);
  });
});
