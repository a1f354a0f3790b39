import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, type VeTestEnv } from '../helpers/ve-env.js';

const MiB = 1024 * 1024;

/** `df -k /` inside a VE: total and used KiB of the file system its root lives on. */
async function dfRoot(env: VeTestEnv, ve: string): Promise<{ totalKiB: number; usedKiB: number; availKiB: number }> {
  const out = (await shInVe(env, ve, 'df -k /')).stdout.trim().split('\n');
  // busybox and coreutils both: "Filesystem 1K-blocks Used Available Use% Mounted on", then one line.
  const f = out[out.length - 1]!.trim().split(/\s+/);
  return { totalKiB: Number(f[1]), usedKiB: Number(f[2]), availKiB: Number(f[3]) };
}

describe('VE disk limits (busybox template, real runc, one disk image per VE)', () => {
  let env: VeTestEnv;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'busybox' });
    await env.ves.create('small', { limits: { disk: '48M' } });
    await env.ves.create('large', { limits: { disk: '160M' } });
    await env.ves.start('small');
    await env.ves.start('large');
  });

  afterAll(async () => {
    await env?.cleanup();
  });

  it('df inside a VE shows its own disk limit, not the host disk', async () => {
    const small = await dfRoot(env, 'small');
    const large = await dfRoot(env, 'large');
    // ext4's own metadata takes a few percent of the image; nothing is reserved for root (mkfs -m 0).
    expect(small.totalKiB * 1024).toBeLessThanOrEqual(48 * MiB);
    expect(small.totalKiB * 1024).toBeGreaterThan(0.85 * 48 * MiB);
    expect(large.totalKiB * 1024).toBeLessThanOrEqual(160 * MiB);
    expect(large.totalKiB * 1024).toBeGreaterThan(0.85 * 160 * MiB);
    // What df says is what there is: used + available fill the file system.
    expect(small.usedKiB + small.availKiB).toBeGreaterThan(small.totalKiB * 0.97);
  });

  it('a VE that fills its disk gets ENOSPC, and another VE keeps writing meanwhile', async () => {
    const fill = await shInVe(env, 'small', 'dd if=/dev/zero of=/root/fill bs=1M count=100', { allowFailure: true });
    expect(fill.code).not.toBe(0);
    expect(fill.stderr).toMatch(/No space left on device/);
    try {
      // small's disk stays full while large writes more than small's whole limit.
      expect((await dfRoot(env, 'small')).availKiB).toBeLessThan(1024);
      const write = await shInVe(env, 'large', 'dd if=/dev/zero of=/root/data bs=1M count=64 2>/dev/null && sync && wc -c < /root/data');
      expect(write.stdout.trim()).toBe(String(64 * MiB));
      // Under 1 MiB left: one more MiB does not fit (a small file still might, in a partly used block).
      const more = await shInVe(env, 'small', 'dd if=/dev/zero of=/root/more bs=1M count=1', { allowFailure: true });
      expect(more.stderr).toMatch(/No space left on device/);
    } finally {
      await shInVe(env, 'small', 'rm -f /root/fill /root/more');
      await shInVe(env, 'large', 'rm -f /root/data');
    }
    // Freed, the full VE writes again.
    expect((await shInVe(env, 'small', 'echo back > /root/note && cat /root/note')).stdout).toBe('back\n');
  });

  it("a VE's disk is attached with direct I/O and the read-ahead vesh sets (not the kernel's 2.5 MiB)", () => {
    const image = path.join(env.layout.veDir('large'), 'disk.img');
    const dev = path.basename(execFileSync('losetup', ['-n', '-O', 'NAME', '-j', image], { encoding: 'utf8' }).trim());
    expect(dev).toMatch(/^loop\d+$/);
    expect(readFileSync(`/sys/block/${dev}/loop/dio`, 'utf8').trim()).toBe('1');
    // VE_DISK_READ_AHEAD_KB in src/native/vesh-setup.c; the kernel's own at attach is twice the device's largest request.
    expect(readFileSync(`/sys/block/${dev}/queue/read_ahead_kb`, 'utf8').trim()).toBe('256');
  });

  it('destroy leaves no disk image, loop device or mount of the VE behind', async () => {
    const dir = env.layout.veDir('small');
    const image = path.join(dir, 'disk.img');
    expect(execFileSync('losetup', ['-n', '-O', 'NAME', '-j', image], { encoding: 'utf8' }).trim()).toMatch(/^\/dev\/loop\d+$/);
    await env.ves.destroy('small', { force: true });
    expect(existsSync(image)).toBe(false);
    expect(execFileSync('losetup', ['-n', '-j', image], { encoding: 'utf8' }).trim()).toBe('');
    expect(execFileSync('cat', ['/proc/self/mountinfo'], { encoding: 'utf8' })).not.toContain(`${dir}/`);
    // The other VE is untouched.
    expect((await shInVe(env, 'large', 'echo alive')).stdout).toBe('alive\n');
  });
});
