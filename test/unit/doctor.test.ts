import { describe, expect, it } from 'vitest';
import {
  doctorExitCode, formatCheck, idsInRange, judgeSharedCounterLimits, judgeSysctl, listSome, parseRuncVersion, presentControllers, runChecks, runcIsNewEnough,
  type CheckResult,
} from '../../src/system/doctor-checks.js';
import { hostSysctlNeeds } from '../../src/system/host-tuning.js';
import { elfIsDynamic } from '../../src/system/elf.js';

describe('vesh doctor: printing and exit status', () => {
  it('prints ok lines without a fix and warn/FAIL lines with theirs', () => {
    expect(formatCheck({ name: 'runtime', status: 'ok', detail: 'runc 1.1.5', fix: 'never shown' })).toBe('ok   runtime: runc 1.1.5');
    expect(formatCheck({ name: 'templates', status: 'warn', detail: 'none built', fix: 'vesh template build debian' }))
      .toBe('warn templates: none built — fix: vesh template build debian');
    expect(formatCheck({ name: 'runtime', status: 'fail', detail: 'runc binary "/x" is not installed', fix: 'apt-get install runc' }))
      .toBe('FAIL runtime: runc binary "/x" is not installed — fix: apt-get install runc');
  });

  it('exits 1 on any failure, 0 with only oks and warnings', () => {
    const o: CheckResult = { name: 'a', status: 'ok', detail: 'd' };
    const w: CheckResult = { name: 'b', status: 'warn', detail: 'd', fix: 'f' };
    const f: CheckResult = { name: 'c', status: 'fail', detail: 'd', fix: 'f' };
    expect(doctorExitCode([])).toBe(0);
    expect(doctorExitCode([o, w])).toBe(0);
    expect(doctorExitCode([o, w, f])).toBe(1);
  });

  it('keeps the order of checks, flattens checks that answer several results, and reports a check that throws as failed without stopping the rest', async () => {
    const many = async (): Promise<CheckResult[]> => [{ name: 'x1', status: 'ok', detail: '' }, { name: 'x2', status: 'warn', detail: '', fix: 'f' }];
    const boom = async function checkHostKeys(): Promise<CheckResult> { throw new Error('no such file'); };
    const fine = async (): Promise<CheckResult> => ({ name: 'fine', status: 'ok', detail: 'yes' });
    const results = await runChecks({} as never, [many, boom, fine]);
    expect(results.map((r) => [r.name, r.status])).toEqual([['x1', 'ok'], ['x2', 'warn'], ['host keys', 'fail'], ['fine', 'ok']]);
    expect(results[2]!.detail).toContain('no such file');
    expect(results[2]!.fix).toBeTruthy();
    expect(doctorExitCode(results)).toBe(1);
  });
});

describe('vesh doctor: parsing what the host says', () => {
  it('reads runc --version and wants 1.1 or later', () => {
    expect(parseRuncVersion('runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\n')).toEqual([1, 1, 5]);
    expect(parseRuncVersion('crun version 1.8.1\ncommit: abc\n')).toBeNull();
    expect(parseRuncVersion('true (GNU coreutils) 9.1')).toBeNull();
    expect(runcIsNewEnough([1, 1, 0])).toBe(true);
    expect(runcIsNewEnough([1, 2, 3])).toBe(true);
    expect(runcIsNewEnough([2, 0, 0])).toBe(true);
    expect(runcIsNewEnough([1, 0, 3])).toBe(false);
    expect(runcIsNewEnough([0, 9, 9])).toBe(false);
  });

  it('finds host users and groups whose ids fall in the VE range', () => {
    const passwd = 'root:x:0:0:root:/root:/bin/bash\n# a comment:x:100001:\nalice:x:1000:1000::/home/alice:/bin/sh\nsub:x:100000:100000::/:/bin/false\nedge:x:165535:1::/:/bin/false\nout:x:165536:1::/:/bin/false\nbroken:x:abc:1\n\n';
    expect(idsInRange(passwd, 100000, 165535)).toEqual(['sub (100000)', 'edge (165535)']);
    expect(idsInRange('daemon:x:1:\nusers:x:100:\n', 100000, 165535)).toEqual([]);
    expect(listSome(['a', 'b'])).toBe('a, b');
    expect(listSome(['a', 'b', 'c', 'd', 'e', 'f', 'g'])).toBe('a, b, c, d, e and 2 more');
  });

  it('finds the memory, pids and cpu controllers in v1, hybrid and v2 layouts', () => {
    const v1 = [
      'cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0',
      'cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0',
      'cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0',
    ].join('\n');
    const want = ['memory', 'pids', 'cpu'];
    expect(presentControllers('v1', v1, '', want)).toEqual(['memory', 'cpu']);
    expect(presentControllers('hybrid', `${v1}\ncgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0`, '', want)).toEqual(['memory', 'pids', 'cpu']);
    expect(presentControllers('v2', 'cgroup2 /sys/fs/cgroup cgroup2 rw 0 0', 'cpuset cpu io memory hugetlb pids rdma misc\n', want)).toEqual(['memory', 'pids', 'cpu']);
    expect(presentControllers('v2', 'cgroup2 /sys/fs/cgroup cgroup2 rw 0 0', 'cpuset io\n', want)).toEqual([]);
  });

  it('tells a static ELF from a dynamically linked one by its PT_INTERP program header', () => {
    /** A little-endian ELF64 header followed by program headers of the given types. */
    const elf64 = (types: number[]): Buffer => {
      const b = Buffer.alloc(64 + 56 * types.length);
      b.writeUInt32BE(0x7f454c46, 0);
      b[4] = 2; // 64-bit
      b[5] = 1; // little-endian
      b.writeBigUInt64LE(64n, 32); // e_phoff
      b.writeUInt16LE(56, 54); // e_phentsize
      b.writeUInt16LE(types.length, 56); // e_phnum
      types.forEach((t, i) => b.writeUInt32LE(t, 64 + i * 56));
      return b;
    };
    expect(elfIsDynamic(elf64([6, 3, 1, 1, 2]))).toBe(true); // PHDR, INTERP, LOAD, LOAD, DYNAMIC
    expect(elfIsDynamic(elf64([1, 1, 4]))).toBe(false); // LOAD, LOAD, NOTE
    expect(elfIsDynamic(Buffer.from('#!/bin/sh\necho not elf\n'.padEnd(80)))).toBeNull();
    expect(elfIsDynamic(elf64([1, 3]).subarray(0, 100))).toBeNull(); // program headers cut off
  });
});

describe('vesh doctor: host settings VEs share', () => {
  const needs = hostSysctlNeeds({ pidsPerVe: 512, ptysPerVe: 1024 });
  const need = (key: string) => needs.find((n) => n.key === key)!;

  it('names pid_max, pty.max, the inotify limits and the key quotas, each with a value and a reason', () => {
    expect(needs.map((n) => n.key)).toEqual(expect.arrayContaining([
      'kernel.pid_max', 'kernel.pty.max', 'fs.inotify.max_user_instances', 'fs.inotify.max_user_watches', 'kernel.keys.maxkeys', 'kernel.keys.maxbytes',
    ]));
    // 1000 VEs of 512 pids fit under pid_max.
    expect(need('kernel.pid_max').want).toBeGreaterThanOrEqual(1000 * 512);
    for (const n of needs) expect(n.why.length, n.key).toBeGreaterThan(20);
  });

  it('warns below the need with the sysctl that fixes it, and warns when a key quota is far above it (L4)', () => {
    expect(judgeSysctl(need('kernel.pid_max'), 32768)).toMatchObject({ status: 'warn', fix: expect.stringContaining('sysctl -w kernel.pid_max=4194304') });
    expect(judgeSysctl(need('kernel.pid_max'), 4194304).status).toBe('ok');
    expect(judgeSysctl(need('fs.inotify.max_user_instances'), 128).detail).toContain('128, below');
    expect(judgeSysctl(need('kernel.keys.maxkeys'), need('kernel.keys.maxkeys').want).status).toBe('ok');
    expect(judgeSysctl(need('kernel.keys.maxkeys'), 100_000)).toMatchObject({ status: 'warn', detail: expect.stringContaining('far above') });
    expect(judgeSysctl(need('kernel.pty.max'), null).status).toBe('warn');
  });

  it('reports each per-VE limit for counters shared with host root, and when vesh\'s own hard limit lowers it (M2)', () => {
    const ve = [{ type: 'RLIMIT_MSGQUEUE', hard: 819200 }, { type: 'RLIMIT_SIGPENDING', hard: 16384 }, { type: 'RLIMIT_MEMLOCK', hard: 8388608 }];
    expect(judgeSharedCounterLimits(ve, () => Infinity).map((r) => r.status)).toEqual(['ok', 'ok', 'ok']);
    const low = judgeSharedCounterLimits(ve, (t) => (t === 'RLIMIT_SIGPENDING' ? 1000 : Infinity));
    expect(low[1]).toMatchObject({ name: 'sigpending per VE', status: 'warn', fix: expect.stringContaining('LimitSIGPENDING') });
    expect(judgeSharedCounterLimits([], () => null).every((r) => r.status === 'warn')).toBe(true);
  });
});
