import { describe, expect, it } from 'vitest';
import { isVeshError } from '../../src/errors.js';
import { buildOciConfig } from '../../src/runtime/oci-bundle.js';
import { DENIED, int32AllExcept, seccompArchitectures, vesSeccompProfile } from '../../src/runtime/seccomp.js';

interface Arg { index: number; value: number; valueTwo: number; op: string }
interface Rule { names: string[]; action: string; errnoRet?: number; args?: Arg[] }
interface Profile { defaultAction: string; defaultErrnoRet: number; architectures: string[]; syscalls: Rule[] }

const profile = (veFirewall = false) => vesSeccompProfile({ veFirewall }, 'x64') as unknown as Profile;

/** What the deny list at commit c6bb4cc refused: each must still be refused. */
const FORMERLY_DENIED = [
  'acct', 'add_key', 'bpf', 'create_module', 'delete_module', 'finit_module', 'get_kernel_syms',
  'init_module', 'ioperm', 'iopl', 'kexec_file_load', 'kexec_load', 'keyctl', 'lookup_dcookie',
  'nfsservctl', 'open_by_handle_at', 'perf_event_open', 'query_module', 'quotactl', 'request_key',
  'swapoff', 'swapon', '_sysctl', 'sysfs', 'uselib', 'userfaultfd', 'ustat', 'vm86', 'vm86old',
  'fanotify_init', 'kcmp', 'move_pages', 'mbind', 'migrate_pages', 'set_mempolicy', 'clock_adjtime',
  'clock_settime', 'settimeofday', 'adjtimex', 'stime', 'syslog', 'pivot_root', 'fsopen', 'fsconfig',
  'fsmount', 'fspick', 'open_tree', 'move_mount', 'mount_setattr', 'io_uring_setup', 'io_uring_enter', 'io_uring_register',
];

/**
 * The action the filter takes for `name` with these (32-bit) argument values,
 * read the way libseccomp compiles masked compares; throws when two rules
 * with different actions match, which libseccomp would mishandle.
 */
function decide(p: Profile, name: string, args: number[] = []): string {
  const hits = p.syscalls.filter((r) => r.names.includes(name) && (r.args ?? []).every((a) => {
    expect(a.op).toBe('SCMP_CMP_MASKED_EQ');
    return ((args[a.index] ?? 0) & a.value) >>> 0 === a.valueTwo;
  }));
  const actions = [...new Set(hits.map((r) => (r.action === 'SCMP_ACT_ALLOW' ? 'allow' : `errno ${r.errnoRet}`)))];
  if (actions.length > 1) throw new Error(`${name}(${args.join(', ')}) matches rules with different actions: ${actions.join(', ')}`);
  return actions[0] ?? `errno ${p.defaultErrnoRet}`;
}

describe('the VE seccomp profile', () => {
  const p = profile();
  const allowed = new Set(p.syscalls.filter((r) => r.action === 'SCMP_ACT_ALLOW').flatMap((r) => r.names));

  it('is an allow list: anything it does not name fails with ENOSYS, so libraries fall back as on an older kernel', () => {
    expect(p.defaultAction).toBe('SCMP_ACT_ERRNO');
    expect(p.defaultErrnoRet).toBe(38);
    expect(decide(p, 'some_future_syscall')).toBe('errno 38');
    expect(decide(p, 'statmount')).toBe('errno 38');
    expect(decide(p, 'read')).toBe('allow');
  });

  it('filters the host\'s native 64-bit ABI only: no i386 or x32 table beside it', () => {
    expect(p.architectures).toEqual(['SCMP_ARCH_X86_64']);
    expect(seccompArchitectures('arm64')).toEqual(['SCMP_ARCH_AARCH64']);
    expect(() => seccompArchitectures('ppc64')).toThrow(/x86_64 and aarch64/);
    try { seccompArchitectures('s390x'); } catch (err) { expect(isVeshError(err)).toBe(true); }
    expect(allowed.has('arch_prctl')).toBe(true);
    expect((vesSeccompProfile({ veFirewall: false }, 'arm64') as unknown as Profile).syscalls.flatMap((r) => r.names)).not.toContain('arch_prctl');
    expect(allowed.has('socketcall')).toBe(false);
  });

  it('still refuses, with EPERM, every syscall the former deny list refused', () => {
    for (const name of FORMERLY_DENIED) {
      expect([name, allowed.has(name)]).toEqual([name, false]);
      expect([name, decide(p, name)]).toEqual([name, 'errno 1']);
    }
    expect(DENIED.filter((n) => allowed.has(n))).toEqual([]);
  });

  it('refuses nested namespaces (CLONE_NEWUSER above all) in clone and unshare, and clone3 with ENOSYS so glibc falls back to clone', () => {
    const SIGCHLD = 17;
    const CLONE_NEWUSER = 0x10000000;
    const threadFlags = 0x003d0f00; // what glibc's pthread_create passes
    expect(decide(p, 'clone', [SIGCHLD])).toBe('allow');
    expect(decide(p, 'clone', [threadFlags])).toBe('allow');
    expect(decide(p, 'clone', [CLONE_NEWUSER | SIGCHLD])).toBe('errno 1');
    expect(decide(p, 'clone', [0x40000000 | 0x20000 | SIGCHLD])).toBe('errno 1');
    expect(decide(p, 'unshare', [CLONE_NEWUSER])).toBe('errno 1');
    expect(decide(p, 'unshare', [0x80])).toBe('errno 1'); // CLONE_NEWTIME
    expect(decide(p, 'unshare', [0x400 | 0x200])).toBe('allow'); // CLONE_FILES | CLONE_FS
    expect(decide(p, 'clone3')).toBe('errno 38');
  });

  it('lets socket() make unix, inet, inet6, packet and some netlink sockets; other families answer EAFNOSUPPORT, other netlink protocols EPROTONOSUPPORT', () => {
    for (const family of [1, 2, 10, 17]) expect(decide(p, 'socket', [family, 1, 0])).toBe('allow');
    for (const proto of [0, 4, 6, 9, 15, 16]) expect(decide(p, 'socket', [16, 3, proto])).toBe('allow');
    for (const family of [0, 3, 15, 21, 29, 30, 38, 40, 44, 45, 46, 255, 0xffffffff]) expect(decide(p, 'socket', [family, 1, 0])).toBe('errno 97');
    for (const proto of [1, 2, 5, 7, 11, 13, 21, 22, 1000]) expect(decide(p, 'socket', [16, 3, proto])).toBe('errno 93');
    expect(decide(p, 'socketpair', [1, 1, 0])).toBe('allow');
    expect(decide(p, 'socketpair', [30, 1, 0])).toBe('errno 97');
  });

  it('refuses netfilter configuration unless veFirewall is on: NETLINK_NETFILTER sockets and the x_tables set calls', () => {
    expect(decide(p, 'socket', [16, 3, 12])).toBe('errno 1');
    for (const level of [0, 41]) {
      for (const opt of [64, 65, 96, 97, 128, 129]) expect(decide(p, 'setsockopt', [3, level, opt])).toBe('errno 1');
      for (const opt of [1, 2, 26, 63, 66, 200, 1152, 0xffffffff]) expect(decide(p, 'setsockopt', [3, level, opt])).toBe('allow');
    }
    for (const level of [1, 6, 17, 40, 42, 255, 263, 270, 282, 0x80000000]) expect(decide(p, 'setsockopt', [3, level, 64])).toBe('allow');
    const fw = profile(true);
    expect(decide(fw, 'socket', [16, 3, 12])).toBe('allow');
    expect(decide(fw, 'setsockopt', [3, 0, 64])).toBe('allow');
    expect(decide(fw, 'socket', [40, 1, 0])).toBe('errno 97');
  });

  it('compares integer arguments on their low 32 bits only, as the kernel reads them (no value above 2^32 in a rule)', () => {
    for (const r of p.syscalls) {
      for (const a of r.args ?? []) {
        expect(a.value).toBeLessThanOrEqual(0xffffffff);
        expect(a.valueTwo).toBeLessThanOrEqual(0xffffffff);
        expect(a.valueTwo & ~a.value).toBe(0);
      }
    }
  });

  it('allows only the personalities Docker does, plus ADDR_NO_RANDOMIZE for debuggers', () => {
    for (const v of [0, 8, 0x20000, 0x40000, 0xffffffff]) expect(decide(p, 'personality', [v])).toBe('allow');
    for (const v of [0x0400000, 0x0100000, 0x0200000]) expect(decide(p, 'personality', [v])).toBe('errno 38');
  });

  it('covers exactly the other 32-bit values with int32AllExcept', () => {
    const blocks = int32AllExcept(0, [0, 41, 64, 0xffffffff]);
    const covered = (v: number) => blocks.filter((b) => ((v & b.value) >>> 0) === b.valueTwo).length;
    for (const v of [0, 41, 64, 0xffffffff]) expect(covered(v)).toBe(0);
    for (const v of [1, 2, 40, 42, 63, 65, 127, 128, 0x7fffffff, 0x80000000, 0xfffffffe]) expect(covered(v)).toBe(1);
    expect(blocks.length).toBeLessThan(4 * 32);
  });

  it('is what the OCI bundle of a VE carries, with the VE\'s firewall setting', () => {
    const spec = {
      name: 'a', hostname: 'a', rootfs: '/r', init: ['/sbin/init'], limits: { memory: 2 ** 28, pids: 100, cpus: 1, disk: 0 },
      cgroupsPath: '/v/a', idmap: { base: 100000, size: 65536 }, ctlDir: '/c',
    };
    const off = (buildOciConfig(spec) as { linux: { seccomp: Profile } }).linux.seccomp;
    expect(decide(off, 'socket', [16, 3, 12])).toBe('errno 1');
    const on = (buildOciConfig({ ...spec, veFirewall: true }) as { linux: { seccomp: Profile } }).linux.seccomp;
    expect(decide(on, 'socket', [16, 3, 12])).toBe('allow');
  });
});
