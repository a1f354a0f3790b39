import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/audit/logger.js';
import { lxcfsPaths } from '../../src/runtime/lxcfs.js';
import { createVeManager } from '../../src/ve/index.js';
import { makeVeTestEnv, shInVe, type VeTestEnv } from '../helpers/ve-env.js';

/** lxcfs processes serving this instance (their command line names its mount point). */
function lxcfsProcesses(mountPoint: string): number[] {
  const out: number[] = [];
  for (const pid of readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes(mountPoint)) out.push(Number(pid));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

const hostMemTotalKiB = () => Number(/MemTotal:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))![1]);

describe('a VE\'s own view of its limits through LXCFS (Debian template, real runc)', () => {
  let env: VeTestEnv;
  let mountPoint: string;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'debian' });
    mountPoint = lxcfsPaths(path.dirname(env.layout.runtimeRoot)).mountPoint;
    await env.ves.create('sized', { limits: { memory: '512M', cpus: 1 } });
    await env.ves.start('sized');
  });

  afterAll(async () => {
    await env?.cleanup();
    // The instance's daemon and mount go with it (removeInstance stops them).
    expect(readFileSync('/proc/self/mountinfo', 'utf8')).not.toContain(mountPoint);
    for (let i = 0; i < 50 && lxcfsProcesses(mountPoint).length > 0; i++) await new Promise((r) => setTimeout(r, 100));
    expect(lxcfsProcesses(mountPoint)).toEqual([]);
  });

  it('free, the CPU count and uptime inside a 512M, 1-CPU VE show the VE, not the 24 GiB, 2-CPU host', async () => {
    const free = (await shInVe(env, 'sized', 'free -m')).stdout;
    const total = Number(/^Mem:\s+(\d+)/m.exec(free)![1]);
    expect(total).toBe(512);
    // What glibc's sysconf, the JVM and Node's os.availableParallelism's fallback read.
    expect((await shInVe(env, 'sized', 'getconf _NPROCESSORS_ONLN')).stdout.trim()).toBe('1');
    expect((await shInVe(env, 'sized', 'cat /sys/devices/system/cpu/online')).stdout.trim()).toBe('0');
    expect((await shInVe(env, 'sized', 'grep -c ^processor /proc/cpuinfo')).stdout.trim()).toBe('1');
    // The VE started seconds ago; the host has been up far longer.
    const veUp = Number((await shInVe(env, 'sized', 'cat /proc/uptime')).stdout.split(' ')[0]);
    const hostUp = Number(readFileSync('/proc/uptime', 'utf8').split(' ')[0]);
    expect(veUp).toBeLessThan(300);
    expect(hostUp - veUp).toBeGreaterThan(60);
    expect((await shInVe(env, 'sized', 'uptime')).stdout).toMatch(/up\s+(\d+ min|0:0\d|\d+ sec)/);
  });

  it('one daemon serves every VE of the instance, each its own size', async () => {
    await env.ves.create('small', { limits: { memory: '256M', cpus: 1 } });
    await env.ves.start('small');
    try {
      expect(Number(/^Mem:\s+(\d+)/m.exec((await shInVe(env, 'small', 'free -m')).stdout)![1])).toBe(256);
      expect(Number(/^Mem:\s+(\d+)/m.exec((await shInVe(env, 'sized', 'free -m')).stdout)![1])).toBe(512);
      expect(lxcfsProcesses(mountPoint)).toHaveLength(1);
      // Out of its starter's cgroup (a service unit's, which a systemctl stop
      // empties), into one of its own beside the VEs', where a service manager looks.
      const [pid] = lxcfsProcesses(mountPoint);
      const own = `/vesh-${path.basename(path.dirname(env.layout.runtimeRoot))}.lxcfs`;
      const tracked = readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n').filter((l) => /^\d+:(name=systemd)?:/.test(l));
      expect(tracked.length).toBeGreaterThan(0);
      for (const line of tracked) expect(line.split(':')[2], line).toBe(own);
    } finally {
      await env.ves.destroy('small', { force: true });
    }
  });

  it('with runtime.lxcfs off a VE still starts, seeing the host\'s memory', async () => {
    const off = createVeManager({ ...env.config, runtime: { ...env.config.runtime, lxcfs: false } }, silentLogger());
    await off.create('plain', { limits: { memory: '512M', cpus: 1 } });
    try {
      await off.start('plain');
      const memTotal = Number(/MemTotal:\s+(\d+)/.exec((await shInVe(env, 'plain', 'cat /proc/meminfo')).stdout)![1]);
      expect(memTotal).toBe(hostMemTotalKiB());
      expect((await shInVe(env, 'plain', 'grep -c lxcfs /proc/self/mountinfo || true')).stdout.trim()).toBe('0');
    } finally {
      await off.destroy('plain', { force: true });
    }
  });
});
