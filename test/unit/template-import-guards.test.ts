import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { RuncRuntime } from '../../src/runtime/runc.js';
import { readBeneathNoFollow, readCappedNoFollow, resolveInRoot } from '../../src/system/tree-read.js';
import { allowedMode, sanitizeTree } from '../../src/template/sanitize.js';
import { DEFAULT_REBOOT_POLICY, decideReboot } from '../../src/ve/reboot-policy.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'vesh-unit-tpl-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('template modes a shared template may keep', () => {
  it('drops world-write from files, and from directories without the sticky bit', () => {
    expect(allowedMode(0o666, false, 0)).toBe(0o664);
    expect(allowedMode(0o777, true, 0)).toBe(0o775);
    expect(allowedMode(0o1777, true, 0)).toBe(0o1777);
  });
  it('keeps setuid/setgid only on files owned by root, setgid on directories, never setuid on one', () => {
    expect(allowedMode(0o4755, false, 0)).toBe(0o4755);
    expect(allowedMode(0o2755, false, 0)).toBe(0o2755);
    expect(allowedMode(0o4755, false, 1000)).toBe(0o755);
    expect(allowedMode(0o6755, false, 33)).toBe(0o755);
    expect(allowedMode(0o2775, true, 0)).toBe(0o2775);
    expect(allowedMode(0o4755, true, 0)).toBe(0o755);
  });
  it('removes FIFOs and sockets, narrows modes, and leaves symlinks alone', async () => {
    const root = path.join(tmp, 'san');
    mkdirSync(path.join(root, 'etc'), { recursive: true });
    execFileSync('mkfifo', [path.join(root, 'etc', 'fifo')]);
    writeFileSync(path.join(root, 'etc', 'ww'), 'x', { mode: 0o666 });
    execFileSync('chmod', ['0666', path.join(root, 'etc', 'ww')]);
    symlinkSync('/etc/shadow', path.join(root, 'etc', 'link'));
    const r = await sanitizeTree(root);
    expect(r.removed).toEqual(['etc/fifo']);
    expect(r.clamped).toEqual(['etc/ww (666 -> 664)']);
  });
});

describe('reading files in trees the host does not control', () => {
  const root = path.join(tmp, 'root');
  mkdirSync(path.join(root, 'usr', 'sbin'), { recursive: true });
  mkdirSync(path.join(root, 'etc'), { recursive: true });
  writeFileSync(path.join(root, 'usr', 'sbin', 'init'), 'init');
  symlinkSync('/usr/sbin', path.join(root, 'sbin'));
  symlinkSync('../../../../../../etc/hostname', path.join(root, 'etc', 'climb'));
  symlinkSync('/etc/passwd', path.join(root, 'etc', 'abs'));
  execFileSync('mkfifo', [path.join(root, 'etc', 'fifo')]);
  writeFileSync(path.join(root, 'etc', 'big'), 'a'.repeat(1000));

  it('resolves absolute and climbing links inside the root', async () => {
    expect(await resolveInRoot(root, 'sbin/init')).toBe('usr/sbin/init');
    expect(await resolveInRoot(root, 'sbin/init', { keepLast: true })).toBe('usr/sbin/init');
    // "/etc/passwd" and "../../etc/hostname" mean the root's own, which do not exist.
    expect(await resolveInRoot(root, 'etc/abs')).toBeNull();
    expect(await resolveInRoot(root, 'etc/climb')).toBeNull();
  });
  it('gives up on symlink loops', async () => {
    symlinkSync('loop-b', path.join(root, 'loop-a'));
    symlinkSync('loop-a', path.join(root, 'loop-b'));
    expect(await resolveInRoot(root, 'loop-a/x')).toBeNull();
  });
  it('never follows a symlink, never blocks on a FIFO, and caps what it reads', async () => {
    expect(await readBeneathNoFollow(root, 'sbin/init', 100)).toBeNull();
    expect(await readBeneathNoFollow(root, 'usr/sbin/init', 100)).toBe('init');
    expect(await readBeneathNoFollow(root, 'etc/abs', 100)).toBeNull();
    expect(await readBeneathNoFollow(root, 'etc/fifo', 100)).toBeNull();
    expect(await readBeneathNoFollow(root, '../etc/passwd', 100)).toBeNull();
    expect((await readBeneathNoFollow(root, 'etc/big', 10))?.length).toBe(10);
    expect(await readCappedNoFollow(path.join(root, 'etc'), 'big', 3, 'end')).toBe('aaa');
    expect(await readCappedNoFollow(path.join(root, 'sbin'), 'init', 100)).toBeNull();
    expect(await readCappedNoFollow(path.join(root, 'etc'), 'fifo', 100)).toBeNull();
  });
});

describe('reboot policy', () => {
  const p = DEFAULT_REBOOT_POLICY;
  it('restarts quick reboots at once up to the free count, then doubles a delay, then leaves the VE stopped', () => {
    let streak = 0;
    const seen: string[] = [];
    for (;;) {
      const d = decideReboot(p, streak, 1_000);
      streak = d.streak;
      seen.push(d.action === 'restart' ? String(d.delayMs) : 'stop');
      if (d.action === 'leave-stopped') break;
    }
    expect(seen).toEqual(['0', '0', '0', '0', '0', '2000', '4000', '8000', '16000', 'stop']);
  });
  it('a run longer than the quick uptime, or of unknown length, starts a new count', () => {
    expect(decideReboot(p, 8, p.quickUptimeMs + 1)).toEqual({ action: 'restart', delayMs: 0, streak: 0 });
    expect(decideReboot(p, 8, null)).toEqual({ action: 'restart', delayMs: 0, streak: 0 });
  });
});

describe('the VE console file at a start (it lives on the VE\'s disk)', () => {
  const dir = path.join(tmp, 'console');
  mkdirSync(dir, { recursive: true });
  const victim = path.join(dir, 'host-file');
  writeFileSync(victim, 'keep me\n');
  const runtime = new RuncRuntime('/nonexistent/runc', path.join(dir, 'runc-root'));
  const start = (consoleFile: string) => runtime.create('c1', { bundleDir: path.join(dir, 'no-bundle'), pidFile: path.join(dir, 'pid'), consoleFile });

  it('is not opened through a symlink: the start fails and the link\'s target is untouched', async () => {
    symlinkSync(victim, path.join(dir, 'link.log'));
    await expect(start(path.join(dir, 'link.log'))).rejects.toThrow(/console file .*link\.log \(ELOOP\)/);
    expect(readFileSync(victim, 'utf8')).toBe('keep me\n');
  });
  it('is not waited on when it is a FIFO: the start fails at once', async () => {
    execFileSync('mkfifo', [path.join(dir, 'fifo.log')]);
    await expect(start(path.join(dir, 'fifo.log'))).rejects.toThrow(/console file .*fifo\.log/);
  });
});
