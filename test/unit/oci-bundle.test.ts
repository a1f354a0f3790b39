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
