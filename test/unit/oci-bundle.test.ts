import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { buildOciConfig, VE_CAPABILITIES } from '../../src/runtime/oci-bundle.js';
import { parseGroup, parsePasswd } from '../../src/ve/passwd.js';
import { assertVeName } from '../../src/ve/names.js';
import { canDestroy, canStart, canStop, veStateOf } from '../../src/ve/state.js';

const spec = {
  name: 'alice', hostname: 'alice', rootfs: '/d/ves/alice/rootfs', init: ['/sbin/init'],
  limits: { memory: 256 * 1024 ** 2, pids: 100, cpus: 0.5, disk: 0 },
  cgroupsPath: '/vesh-abc/alice', idmap: { base: 100000, size: 65536 }, ctlDir: '/d/ves/alice/ctl',
};

describe('OCI bundle of a VE', () => {
  const c = buildOciConfig(spec) as any;
  it('maps VE root to an unprivileged host range', () => {
    expect(c.linux.uidMappings).toEqual([{ containerID: 0, hostID: 100000, size: 65536 }]);
    expect(c.linux.gidMappings[0].hostID).toBe(100000);
  });
  it('uses every namespace kind the contract names', () => {
    expect(c.linux.namespaces.map((n: any) => n.type).sort()).toEqual(['cgroup', 'ipc', 'mount', 'network', 'pid', 'user', 'uts']);
  });
  it('carries the limits into cgroup resources', () => {
    expect(c.linux.resources.memory.limit).toBe(256 * 1024 ** 2);
    expect(c.linux.resources.pids.limit).toBe(100);
    expect(c.linux.resources.cpu).toEqual({ quota: 50_000, period: 100_000 });
  });
  it('keeps dangerous capabilities out and masks kernel interfaces', () => {
    expect(VE_CAPABILITIES).not.toContain('CAP_SYS_ADMIN');
    expect(VE_CAPABILITIES).not.toContain('CAP_SYS_MODULE');
    expect(VE_CAPABILITIES).toContain('CAP_SYS_BOOT');
    expect(c.linux.maskedPaths).toContain('/proc/kcore');
    expect(c.linux.readonlyPaths).toContain('/proc/sys');
    expect(c.linux.seccomp.syscalls[0].names).toContain('kexec_load');
  });
  it('caps the terminals of the VE\'s own devpts (max=, review M1)', () => {
    const pts = (cfg: any) => cfg.mounts.find((m: any) => m.destination === '/dev/pts').options as string[];
    expect(pts(c)).toContain('newinstance');
    expect(pts(c)).toContain('max=1024');
    expect(pts(buildOciConfig({ ...spec, ptys: 64 }))).toContain('max=64');
  });
  it('holds each VE process to its own message-queue, pending-signal and locked-memory rlimits, never above ours (review M2)', () => {
    const byType = new Map((c.process.rlimits as Array<{ type: string; hard: number; soft: number }>).map((r) => [r.type, r]));
    for (const type of ['RLIMIT_NOFILE', 'RLIMIT_MSGQUEUE', 'RLIMIT_SIGPENDING', 'RLIMIT_MEMLOCK']) expect(byType.has(type), type).toBe(true);
    expect(byType.get('RLIMIT_MSGQUEUE')!.hard).toBeLessThanOrEqual(819_200);
    expect(byType.get('RLIMIT_MEMLOCK')!.hard).toBeLessThanOrEqual(8 * 1024 * 1024);
    const limits = readFileSync('/proc/self/limits', 'utf8');
    const hard = (name: string) => { const v = new RegExp(`^${name}\\s+\\S+\\s+(\\S+)`, 'm').exec(limits)![1]!; return v === 'unlimited' ? Infinity : Number(v); };
    expect(byType.get('RLIMIT_SIGPENDING')!.hard).toBeLessThanOrEqual(hard('Max pending signals'));
    expect(byType.get('RLIMIT_MSGQUEUE')!.hard).toBeLessThanOrEqual(hard('Max msgqueue size'));
    for (const r of byType.values()) expect(r.soft).toBeLessThanOrEqual(r.hard);
  });
  it('charges TCP buffers to the VE on cgroup v1 (kernelTCP as large as its memory) and not on v2, where that is the default (review N1)', () => {
    expect(buildOciConfig({ ...spec, cgroupLayout: 'hybrid' }).linux).toMatchObject({ resources: { memory: { kernelTCP: 256 * 1024 ** 2 } } });
    expect(buildOciConfig({ ...spec, cgroupLayout: 'v1' }).linux).toMatchObject({ resources: { memory: { kernelTCP: 256 * 1024 ** 2 } } });
    expect((buildOciConfig({ ...spec, cgroupLayout: 'v2' }) as any).linux.resources.memory.kernelTCP).toBeUndefined();
    expect(c.linux.sysctl).toMatchObject({ 'net.ipv4.tcp_rmem': expect.any(String), 'net.ipv4.tcp_wmem': expect.any(String) });
  });
  it('binds the control directory at /run/vesh over a private /run', () => {
    const dests = c.mounts.map((m: any) => m.destination);
    expect(dests.indexOf('/run')).toBeLessThan(dests.indexOf('/run/vesh'));
    expect(c.mounts.find((m: any) => m.destination === '/run/vesh').source).toBe('/d/ves/alice/ctl');
  });
});

describe('VE names, passwd parsing and state predicates', () => {
  it('refuses path characters and over-long names', () => {
    expect(() => assertVeName('../etc')).toThrow(/invalid VE name/);
    expect(() => assertVeName('a/b')).toThrow(/invalid VE name/);
    expect(() => assertVeName('x'.repeat(40))).toThrow(/40 characters/);
    expect(() => assertVeName('Alice')).toThrow();
    expect(() => assertVeName('web-1')).not.toThrow();
  });
  it('skips malformed passwd and group lines', () => {
    const pw = parsePasswd('root:x:0:0:root:/root:/bin/bash\nbad line\nbob:x:abc:1::/home/bob:/bin/sh\nann:x:1000:1000::/home/ann:/bin/sh\n');
    expect(pw.map((e) => e.name)).toEqual(['root', 'ann']);
    expect(parseGroup('wheel:x:10:ann,bob\nbroken\n')).toEqual([{ name: 'wheel', gid: 10, members: ['ann', 'bob'] }]);
  });
  it('derives states from the engine view', () => {
    expect(veStateOf(null)).toBe('stopped');
    expect(veStateOf({ id: 'a', pid: 1, status: 'created', bundle: '' })).toBe('broken');
    expect(canStart('running')).toBe(false);
    expect(canStop('stopped')).toBe(false);
    expect(canDestroy('running', false)).toBe(false);
    expect(canDestroy('running', true)).toBe(true);
  });
});
