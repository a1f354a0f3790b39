import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, type VeTestEnv } from '../helpers/ve-env.js';
import { Cleanup, makeClientKey, sshWithKey, startVeshServe, tempDir, writeAccounts, type ClientKey, type ServeProcess } from '../helpers/ssh-harness.js';
import { backupManifest, resealBackup } from '../helpers/backup-file.js';

/**
 * vesh ve backup / restore end to end: a file written over a real OpenSSH
 * session survives backup (VE running, and stopped), destroy and restore
 * (under its own name and a new one), read back over ssh; damaged files, a
 * different template and a taken name are refused and leave nothing behind.
 */
describe('vesh ve backup and restore (busybox template, real runc and OpenSSH)', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let serve: ServeProcess;
  let key: ClientKey;
  let work: string;
  const secret = `kept-${randomBytes(6).toString('hex')}`;
  const running = () => path.join(work, 'running.vbk');
  const stopped = () => path.join(work, 'stopped.vbk');

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'busybox' });
    cleanup.add(() => env.cleanup());
    work = tempDir(cleanup);
    key = makeClientKey(work, 'ed25519', 'alice');
    // carol logs into the copy restored under a new name.
    writeAccounts(env.config.accountsFile, `alice:\n  keys:\n    - ${key.publicLine}\ncarol:\n  ve: copy\n  keys:\n    - ${key.publicLine}\n`);
    serve = await startVeshServe(cleanup, env.configFile);
    const w = await ssh('alice', `echo ${secret} > /root/data.txt && sync && cat /root/data.txt`);
    expect(w.stdout).toBe(`${secret}\n`);
  });

  afterAll(() => cleanup.run());

  const ssh = (user: string, cmd: string) => sshWithKey(serve.port, user, key, [cmd], { timeoutMs: 120_000 });
  const veDirs = () => readdirSync(env.layout.vesDir).filter((e) => !e.startsWith('.')).sort();

  it('a backup interrupted (Ctrl-C) while the VE is frozen thaws it and leaves no file', async () => {
    // Enough data that the freeze lasts long enough to be caught.
    await ssh('alice', 'dd if=/dev/urandom of=/root/big bs=1M count=120 2>/dev/null; sync');
    const freezer = `/sys/fs/cgroup/freezer${env.layout.cgroupParent}/alice/freezer.state`;
    expect(readFileSync(freezer, 'utf8').trim()).toBe('THAWED');
    const file = path.join(work, 'interrupted.vbk');
    const child = spawn(process.execPath, [path.resolve('bin/vesh.js'), '--config', env.configFile, 've', 'backup', 'alice', file], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
    for (let i = 0; i < 6000 && readFileSync(freezer, 'utf8').trim() === 'THAWED' && child.exitCode === null; i++) await new Promise((r) => setTimeout(r, 2));
    child.kill('SIGINT');
    expect(await exited).not.toBe(0);
    expect(stderr).toMatch(/interrupted by SIGINT: the VE was thawed/);
    expect(readFileSync(freezer, 'utf8').trim()).toBe('THAWED');
    expect(existsSync(file)).toBe(false);
    expect(readdirSync(work).filter((e) => e.includes('vesh-tmp'))).toEqual([]);
    expect((await ssh('alice', 'rm /root/big && echo writable > /root/w && cat /root/w')).stdout).toBe('writable\n');
  });

  it('backs up a running VE (frozen for the copy) and a stopped one, each file sparse and written atomically', async () => {
    const r = env.cli(['ve', 'backup', 'alice', running()]);
    expect(r.stdout).toMatch(/backed up VE alice .*frozen [\d.]+ ms/);
    expect(backupManifest(running()).frozenMs).toBeGreaterThan(0);
    // Still running and usable after the thaw.
    expect((await ssh('alice', 'cat /root/data.txt')).stdout).toBe(`${secret}\n`);
    env.cli(['ve', 'stop', 'alice']);
    const s = env.cli(['ve', 'backup', 'alice', stopped()]);
    expect(s.stdout).not.toMatch(/frozen/);
    expect(backupManifest(stopped()).frozenMs).toBe(0);
    for (const f of [running(), stopped()]) {
      // Only the data blocks of the 256 MiB disk are in the file.
      expect(statSync(f).size).toBeLessThan(64 * 1024 * 1024);
      expect(backupManifest(f).image.size).toBe(256 * 1024 * 1024);
    }
    // No temp file left beside them.
    expect(readdirSync(work).filter((e) => e.includes('vesh-tmp'))).toEqual([]);
  });

  it('restores a destroyed VE that boots and holds the file written over ssh', async () => {
    env.cli(['ve', 'destroy', 'alice', '--force']);
    expect(veDirs()).toEqual([]);
    const r = env.cli(['ve', 'restore', running()]);
    expect(r.stdout).toMatch(/restored VE alice/);
    expect((await env.ves.status('alice')).state).toBe('stopped');
    expect((await ssh('alice', 'cat /root/data.txt; id -u')).stdout).toBe(`${secret}\n0\n`);
  });

  it('restores under a new name, with its own address and id range', async () => {
    env.cli(['ve', 'restore', stopped(), 'copy']);
    expect((await ssh('carol', 'cat /root/data.txt; hostname')).stdout).toBe(`${secret}\ncopy\n`);
    const a = await env.ves.status('alice');
    const c = await env.ves.status('copy');
    expect(c.address).not.toBe(a.address);
    expect(c.ids!.base).not.toBe(a.ids!.base);
    // The copy's files belong to its own range on the host.
    const upperRoot = path.join(env.layout.veDir('copy'), 'private', 'upper', 'root', 'data.txt');
    expect(existsSync(upperRoot)).toBe(true);
    expect(statSync(upperRoot).uid).toBe(c.ids!.base);
  });

  it('refuses a name that exists', () => {
    const r = env.cli(['ve', 'restore', running()], { allowFailure: true });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/VE "alice" already exists/);
  });

  it('refuses a damaged or truncated file and leaves nothing made', () => {
    const before = veDirs();
    const flipped = path.join(work, 'flipped.vbk');
    const buf = readFileSync(stopped());
    buf[Math.floor(buf.length / 2)] ^= 0x01;
    writeFileSync(flipped, buf);
    const f = env.cli(['ve', 'restore', flipped, 'broken'], { allowFailure: true });
    expect(f.code).not.toBe(0);
    expect(f.stderr).toMatch(/checksum does not match/);
    const cut = path.join(work, 'cut.vbk');
    writeFileSync(cut, readFileSync(stopped()).subarray(0, buf.length - 1000));
    const t = env.cli(['ve', 'restore', cut, 'broken'], { allowFailure: true });
    expect(t.code).not.toBe(0);
    expect(t.stderr).toMatch(/end mark is missing/);
    expect(veDirs()).toEqual(before);
  });

  it('refuses a backup made on a different template', () => {
    const other = path.join(work, 'other-template.vbk');
    resealBackup(stopped(), other, { manifest: (m) => ({ ...m, template: { ...m.template, fingerprint: 'ab'.repeat(32) } }) });
    const r = env.cli(['ve', 'restore', other, 'elsewhere'], { allowFailure: true });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/template "busybox" on this host is not the one the backup was made on/);
    expect(veDirs()).not.toContain('elsewhere');
  });
});
