import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, type VeTestEnv } from '../helpers/ve-env.js';

/**
 * VE root against the LXCFS files bound into its VE (runtime/lxcfs.ts): the
 * daemon behind them runs as root on the host, so VE root tries to write
 * through them, to make them writable, to uncover them, and to walk from a
 * bound directory into the rest of the FUSE tree (its cgroup/ view).
 */
describe('VE root against the LXCFS binds (busybox VE, real runc)', () => {
  let env: VeTestEnv;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'busybox' });
    await env.ves.create('tenant', { limits: { memory: '128M', cpus: 1, disk: 0 } });
    await env.ves.start('tenant');
  });

  afterAll(async () => {
    await env?.cleanup();
  });

  it('every LXCFS file is bound read-only, nosuid, nodev, noexec', async () => {
    const lines = (await shInVe(env, 'tenant', 'grep fuse.lxcfs /proc/self/mountinfo')).stdout.trim().split('\n');
    expect(lines.length).toBe(8);
    for (const l of lines) expect(l.split(' ')[5]!.split(',')).toEqual(expect.arrayContaining(['ro', 'nosuid', 'nodev', 'noexec']));
  });

  it('writing through a bound file fails with EROFS, before the root daemon sees it', async () => {
    for (const f of ['/proc/meminfo', '/proc/uptime', '/sys/devices/system/cpu/online']) {
      const r = await shInVe(env, 'tenant', `echo 1 > ${f}`, { allowFailure: true });
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/Read-only file system/);
    }
  });

  it('VE root cannot remount a bind writable nor take it away', async () => {
    const remount = await shInVe(env, 'tenant', 'mount -o remount,bind,rw /proc/meminfo', { allowFailure: true });
    expect(remount.code).not.toBe(0);
    const umount = await shInVe(env, 'tenant', 'umount /proc/meminfo', { allowFailure: true });
    expect(umount.code).not.toBe(0);
    expect((await shInVe(env, 'tenant', 'grep -c fuse.lxcfs /proc/self/mountinfo')).stdout.trim()).toBe('8');
  });

  it('.. from the bound cpu directory leads back into sysfs, not into the FUSE tree and its cgroup view', async () => {
    const up = (await shInVe(env, 'tenant', 'ls /sys/devices/system/cpu/..; ls /sys/devices/system/cpu/../../..')).stdout.split(/\s+/);
    expect(up).not.toContain('cgroup');
    expect(up).not.toContain('proc');
    // sysfs's own: /sys/devices/system holds clocksource, /sys holds devices.
    expect(up).toEqual(expect.arrayContaining(['clocksource', 'devices']));
    const r = await shInVe(env, 'tenant', 'ls /sys/devices/system/cpu/../../../../cgroup', { allowFailure: true });
    expect(r.stdout).not.toMatch(/memory|cpuset/);
  });
});
