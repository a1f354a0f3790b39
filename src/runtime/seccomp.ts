import { ErrorCodes, VeshError } from '../errors.js';

/**
 * The VE's seccomp filter: an allow list. A syscall runs only if it is named
 * here; anything else — above all every syscall a newer kernel adds — fails
 * with ENOSYS, the answer a kernel without that syscall gives, so glibc and
 * other libraries fall back to the older call they know (as Docker's default
 * profile and runc's -ENOSYS stub do for syscalls newer than the profile).
 * The interfaces we refuse on purpose answer EPERM instead, as a capability
 * check would: kernel modules and kexec, keyrings, BPF, perf, userfaultfd,
 * io_uring, handle-based opens, the new mount API, swap, accounting, clock
 * setting, NUMA policy, the old sysctl/uselib calls, nested namespaces.
 *
 * The list follows moby/profiles' seccomp/default.json (its base list plus
 * the entries Docker grants for the capabilities a VE holds: CAP_SYS_BOOT,
 * CAP_SYS_CHROOT, CAP_SYS_PTRACE), minus what the deny list this replaced
 * already refused (kcmp, adjtimex, clock_adjtime), and with three changes
 * that matter for hostile tenants:
 * - Only the native 64-bit ABI. The i386 (int 0x80) and x32 entry points are
 *   a second syscall table with its own compat code (CVE-2021-22555 was
 *   reached through compat setsockopt) and on i386 socket(2) hides behind
 *   socketcall(2), whose arguments a filter cannot see. A process that uses
 *   them is killed (libseccomp's bad-architecture action).
 * - Integer arguments are compared on their low 32 bits only (a masked
 *   compare), because the kernel truncates an `int` argument and ignores the
 *   upper half of the register: socket(0x1_0000_0028, …) is AF_VSOCK to the
 *   kernel but not to an `a0 > 40` rule.
 * - socket(2) is limited to the families a Linux system uses (unix, inet,
 *   inet6, netlink, packet); the others — vsock, alg, tipc, rds, can, … — a
 *   long tail of rarely used kernel code that a socket() call loads as a
 *   module on demand, answer EAFNOSUPPORT as on a kernel built without them.
 *   Netlink is limited to the protocols iproute2, ss, audit and udev-style
 *   tools use; netfilter's is a setting (see SeccompOptions.veFirewall).
 *
 * libseccomp builds one decision tree per syscall, and rules whose conditions
 * overlap with different actions get dropped or refused (runc then fails to
 * start the VE), so every conditional rule below covers a set of argument
 * values disjoint from the other rules of its syscall.
 */

export interface SeccompOptions {
  /**
   * Whether VE root may configure netfilter in its own network namespace
   * (vesh.yaml `runtime.veFirewall`). nf_tables and x_tables are reachable
   * from a user namespace with CAP_NET_ADMIN, which a VE has for its own
   * addresses and routes, and are the main source of user-namespace-to-root
   * exploits of recent years (CVE-2022-1015, CVE-2023-32233, CVE-2024-1086 in
   * nf_tables; CVE-2021-22555 in x_tables). The host's own rules, not a VE's,
   * keep VEs apart, so the default is off: socket(AF_NETLINK, …,
   * NETLINK_NETFILTER) (nft, iptables-nft, conntrack, ipset) and the x_tables
   * table-replacing setsockopt calls (iptables-legacy, ip6tables, arptables,
   * ebtables) answer EPERM. On, VE root may run its own firewall, as on
   * OpenVZ. tc (traffic control) goes through NETLINK_ROUTE messages, which a
   * filter cannot tell from `ip addr`, and stays reachable either way.
   */
  veFirewall: boolean;
}

const EPERM = 1;
const ENOSYS = 38;
const EPROTONOSUPPORT = 93;
const EAFNOSUPPORT = 97;

/** Syscalls a Debian system with services uses; they run unconditionally. */
const ALLOWED = [
  'accept', 'accept4', 'access', 'alarm', 'bind', 'brk', 'cachestat', 'capget', 'capset', 'chdir', 'chmod',
  'chown', 'chroot', 'clock_getres', 'clock_gettime', 'clock_nanosleep', 'close', 'close_range', 'connect',
  'copy_file_range', 'creat', 'dup', 'dup2', 'dup3', 'epoll_create', 'epoll_create1', 'epoll_ctl', 'epoll_ctl_old',
  'epoll_pwait', 'epoll_pwait2', 'epoll_wait', 'epoll_wait_old', 'eventfd', 'eventfd2', 'execve', 'execveat', 'exit',
  'exit_group', 'faccessat', 'faccessat2', 'fadvise64', 'fallocate', 'fanotify_mark', 'fchdir', 'fchmod', 'fchmodat',
  'fchmodat2', 'fchown', 'fchownat', 'fcntl', 'fdatasync', 'fgetxattr', 'flistxattr', 'flock', 'fork', 'fremovexattr',
  'fsetxattr', 'fstat', 'fstatfs', 'fsync', 'ftruncate', 'futex', 'futex_requeue', 'futex_wait', 'futex_waitv',
  'futex_wake', 'futimesat', 'getcpu', 'getcwd', 'getdents', 'getdents64', 'getegid', 'geteuid', 'getgid', 'getgroups',
  'getitimer', 'get_mempolicy', 'getpeername', 'getpgid', 'getpgrp', 'getpid', 'getppid', 'getpriority', 'getrandom',
  'getresgid', 'getresuid', 'getrlimit', 'get_robust_list', 'getrusage', 'getsid', 'getsockname', 'getsockopt',
  'get_thread_area', 'gettid', 'gettimeofday', 'getuid', 'getxattr', 'getxattrat', 'inotify_add_watch', 'inotify_init',
  'inotify_init1', 'inotify_rm_watch', 'io_cancel', 'ioctl', 'io_destroy', 'io_getevents', 'io_pgetevents',
  'ioprio_get', 'ioprio_set', 'io_setup', 'io_submit', 'kill', 'landlock_add_rule', 'landlock_create_ruleset',
  'landlock_restrict_self', 'lchown', 'lgetxattr', 'link', 'linkat', 'listen', 'listxattr', 'listxattrat', 'llistxattr',
  'lremovexattr', 'lseek', 'lsetxattr', 'lstat', 'madvise', 'map_shadow_stack', 'membarrier', 'memfd_create',
  'memfd_secret', 'mincore', 'mkdir', 'mkdirat', 'mknod', 'mknodat', 'mlock', 'mlock2', 'mlockall', 'mmap', 'mprotect',
  'mq_getsetattr', 'mq_notify', 'mq_open', 'mq_timedreceive', 'mq_timedsend', 'mq_unlink', 'mremap', 'mseal', 'msgctl',
  'msgget', 'msgrcv', 'msgsnd', 'msync', 'munlock', 'munlockall', 'munmap', 'name_to_handle_at', 'nanosleep',
  'newfstatat', 'open', 'openat', 'openat2', 'pause', 'pidfd_getfd', 'pidfd_open', 'pidfd_send_signal', 'pipe', 'pipe2',
  'pkey_alloc', 'pkey_free', 'pkey_mprotect', 'poll', 'ppoll', 'prctl', 'pread64', 'preadv', 'preadv2', 'prlimit64',
  'process_madvise', 'process_mrelease', 'process_vm_readv', 'process_vm_writev', 'pselect6', 'ptrace', 'pwrite64',
  'pwritev', 'pwritev2', 'read', 'readahead', 'readlink', 'readlinkat', 'readv', 'reboot', 'recvfrom', 'recvmmsg',
  'recvmsg', 'remap_file_pages', 'removexattr', 'removexattrat', 'rename', 'renameat', 'renameat2', 'restart_syscall',
  'rmdir', 'rseq', 'rt_sigaction', 'rt_sigpending', 'rt_sigprocmask', 'rt_sigqueueinfo', 'rt_sigreturn',
  'rt_sigsuspend', 'rt_sigtimedwait', 'rt_tgsigqueueinfo', 'sched_getaffinity', 'sched_getattr', 'sched_getparam',
  'sched_get_priority_max', 'sched_get_priority_min', 'sched_getscheduler', 'sched_rr_get_interval',
  'sched_setaffinity', 'sched_setattr', 'sched_setparam', 'sched_setscheduler', 'sched_yield', 'seccomp', 'select',
  'semctl', 'semget', 'semop', 'semtimedop', 'sendfile', 'sendmmsg', 'sendmsg', 'sendto', 'setfsgid', 'setfsuid',
  'setgid', 'setgroups', 'setitimer', 'setpgid', 'setpriority', 'setregid', 'setresgid', 'setresuid', 'setreuid',
  'setrlimit', 'set_robust_list', 'setsid', 'set_thread_area', 'set_tid_address', 'setuid', 'setxattr', 'setxattrat',
  'shmat', 'shmctl', 'shmdt', 'shmget', 'shutdown', 'sigaltstack', 'signalfd', 'signalfd4', 'splice', 'stat', 'statfs',
  'statx', 'symlink', 'symlinkat', 'sync', 'sync_file_range', 'syncfs', 'sysinfo', 'tee', 'tgkill', 'time',
  'timer_create', 'timer_delete', 'timer_getoverrun', 'timer_gettime', 'timer_settime', 'timerfd_create',
  'timerfd_gettime', 'timerfd_settime', 'times', 'tkill', 'truncate', 'umask', 'uname', 'unlink', 'unlinkat',
  'uretprobe', 'utime', 'utimensat', 'utimes', 'vfork', 'vmsplice', 'wait4', 'waitid', 'write', 'writev',
];

/** Only on x86_64: the TLS base (arch_prctl) that every x86_64 program sets. */
const ALLOWED_X86_64 = ['arch_prctl'];

/**
 * Refused on purpose (EPERM). Everything the former deny list held, plus the
 * calls Docker grants only with capabilities a VE does not have: most would
 * fail on the capability check anyway, and refusing them here keeps their
 * kernel code out of reach should a capability check ever be wrong.
 */
export const DENIED = [
  // Kernel modules and replacing the kernel.
  'create_module', 'delete_module', 'finit_module', 'get_kernel_syms', 'init_module', 'query_module',
  'kexec_file_load', 'kexec_load',
  // Keyrings (shared quota per host uid), BPF, perf, userfaultfd: a long run of privilege escalations.
  'add_key', 'keyctl', 'request_key', 'bpf', 'perf_event_open', 'userfaultfd',
  // io_uring: a second syscall interface with its own run of privilege escalations.
  'io_uring_enter', 'io_uring_register', 'io_uring_setup',
  // Handle-based opens (the "shocker" escape) and fanotify's whole-mount watches.
  'open_by_handle_at', 'fanotify_init',
  // Mounts, the new mount API and namespaces: a VE has no CAP_SYS_ADMIN; its namespaces are made for it.
  'mount', 'umount', 'umount2', 'pivot_root', 'fsconfig', 'fsmount', 'fsopen', 'fspick', 'mount_setattr',
  'move_mount', 'open_tree', 'open_tree_attr', 'setns', 'sethostname', 'setdomainname',
  // Host-wide state: swap, process accounting, quotas, clocks, the kernel log, NUMA placement.
  'swapoff', 'swapon', 'acct', 'quotactl', 'quotactl_fd', 'adjtimex', 'clock_adjtime', 'clock_settime',
  'settimeofday', 'stime', 'syslog', 'mbind', 'migrate_pages', 'move_pages', 'set_mempolicy', 'set_mempolicy_home_node',
  // Old or obsolete interfaces and raw hardware access.
  '_sysctl', 'sysfs', 'uselib', 'ustat', 'nfsservctl', 'lookup_dcookie', 'ioperm', 'iopl', 'modify_ldt', 'vm86',
  'vm86old', 'vhangup', 'kcmp', 'lsm_get_self_attr', 'lsm_list_modules', 'lsm_set_self_attr',
];

/** Namespace flags of clone(2)/unshare(2); CLONE_NEWTIME (0x80) only means that to unshare. */
const CLONE_NS_FLAGS = [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000];
const CLONE_NEWTIME = 0x00000080;

const AF_UNIX = 1;
const AF_INET = 2;
const AF_INET6 = 10;
const AF_NETLINK = 16;
const AF_PACKET = 17;
const SOCKET_FAMILIES = [AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET];

const NETLINK_NETFILTER = 12;
/** route (ip), sock_diag (ss), xfrm (ip xfrm), audit (PAM, sshd), kobject_uevent (udev), generic (ethtool, wireguard). */
const NETLINK_PROTOCOLS = [0, 4, 6, 9, 15, 16];

const SOL_IP = 0;
const SOL_IPV6 = 41;
/**
 * x_tables calls that replace a table or its counters: IPT/IP6T_SO_SET_REPLACE
 * and _ADD_COUNTERS (64, 65), ARPT_ (96, 97), EBT_SO_SET_ENTRIES/COUNTERS
 * (128, 129). No IPv4 or IPv6 socket option uses these numbers.
 */
const XT_SET_OPTIONS = [64, 65, 96, 97, 128, 129];

/** personality(2) values Docker allows (Linux, linux32, uname26, query) and ADDR_NO_RANDOMIZE, which gdb sets. */
const PERSONALITIES = [0x0, 0x8, 0x20000, 0x20008, 0x40000, 0x40008, 0xffffffff];

interface Arg { index: number; value: number; valueTwo: number; op: 'SCMP_CMP_MASKED_EQ' }
interface Rule { names: string[]; action: 'SCMP_ACT_ALLOW' | 'SCMP_ACT_ERRNO'; errnoRet?: number; args?: Arg[] }

/** Argument `index` has bits `mask` equal to `bits`; upper-half bits are ignored (mask < 2^32). */
function masked(index: number, mask: number, bits: number): Arg {
  return { index, value: mask >>> 0, valueTwo: bits >>> 0, op: 'SCMP_CMP_MASKED_EQ' };
}

/** The low 32 bits of argument `index` equal `v`: the kernel's view of an int argument. */
const int32Is = (index: number, v: number): Arg => masked(index, 0xffffffff, v);

/**
 * Aligned blocks of 32-bit values that together cover every value except
 * `excluded`, as masked compares: lets a rule say "any other value" with no
 * overlap with the rules for the excluded ones (see the file comment).
 */
export function int32AllExcept(index: number, excluded: number[]): Arg[] {
  const holes = [...new Set(excluded.map((v) => v >>> 0))].sort((a, b) => a - b);
  const out: Arg[] = [];
  let from = 0;
  for (const end of [...holes, 2 ** 32]) {
    // Cover [from, end) with the largest aligned power-of-two blocks that fit.
    while (from < end) {
      let size = 1;
      while (from % (size * 2) === 0 && from + size * 2 <= end && size * 2 <= 2 ** 31) size *= 2;
      out.push(masked(index, 2 ** 32 - size, from));
      from += size;
    }
    from = end + 1;
  }
  return out;
}

const allow = (names: string[], args?: Arg[]): Rule => ({ names, action: 'SCMP_ACT_ALLOW', ...(args ? { args } : {}) });
const deny = (names: string[], errnoRet: number, args?: Arg[]): Rule => ({ names, action: 'SCMP_ACT_ERRNO', errnoRet, ...(args ? { args } : {}) });

/** clone(2) and unshare(2) without namespace flags; with any, EPERM (nested user namespaces above all). */
function namespaceRules(): Rule[] {
  const rules: Rule[] = [];
  const cloneMask = CLONE_NS_FLAGS.reduce((a, b) => a | b, 0);
  rules.push(allow(['clone'], [masked(0, cloneMask, 0)]));
  rules.push(allow(['unshare'], [masked(0, cloneMask | CLONE_NEWTIME, 0)]));
  for (const flag of CLONE_NS_FLAGS) rules.push(deny(['clone', 'unshare'], EPERM, [masked(0, flag, flag)]));
  rules.push(deny(['unshare'], EPERM, [masked(0, CLONE_NEWTIME, CLONE_NEWTIME)]));
  // clone3 passes its flags in memory, where a filter cannot look: ENOSYS makes glibc fall back to clone.
  rules.push(deny(['clone3'], ENOSYS));
  return rules;
}

/** socket(2)/socketpair(2): the families a Linux system uses; netlink by protocol. */
function socketRules(opts: SeccompOptions): Rule[] {
  const rules: Rule[] = [];
  for (const family of SOCKET_FAMILIES.filter((f) => f !== AF_NETLINK)) rules.push(allow(['socket'], [int32Is(0, family)]));
  for (const family of SOCKET_FAMILIES) rules.push(allow(['socketpair'], [int32Is(0, family)]));
  for (const block of int32AllExcept(0, SOCKET_FAMILIES)) rules.push(deny(['socket', 'socketpair'], EAFNOSUPPORT, [block]));
  const netlink = opts.veFirewall ? [...NETLINK_PROTOCOLS, NETLINK_NETFILTER] : NETLINK_PROTOCOLS;
  for (const proto of netlink) rules.push(allow(['socket'], [int32Is(0, AF_NETLINK), int32Is(2, proto)]));
  if (!opts.veFirewall) rules.push(deny(['socket'], EPERM, [int32Is(0, AF_NETLINK), int32Is(2, NETLINK_NETFILTER)]));
  for (const block of int32AllExcept(2, [...NETLINK_PROTOCOLS, NETLINK_NETFILTER])) {
    rules.push(deny(['socket'], EPROTONOSUPPORT, [int32Is(0, AF_NETLINK), block]));
  }
  return rules;
}

/** setsockopt(2): everything, except (without veFirewall) replacing x_tables rules. */
function setsockoptRules(opts: SeccompOptions): Rule[] {
  if (opts.veFirewall) return [allow(['setsockopt'])];
  const rules: Rule[] = [];
  for (const block of int32AllExcept(1, [SOL_IP, SOL_IPV6])) rules.push(allow(['setsockopt'], [block]));
  for (const level of [SOL_IP, SOL_IPV6]) {
    for (const block of int32AllExcept(2, XT_SET_OPTIONS)) rules.push(allow(['setsockopt'], [int32Is(1, level), block]));
    for (const opt of XT_SET_OPTIONS) rules.push(deny(['setsockopt'], EPERM, [int32Is(1, level), int32Is(2, opt)]));
  }
  return rules;
}

/** The seccomp architectures for the host's: its native 64-bit ABI only (see the file comment). */
export function seccompArchitectures(arch: string = process.arch): string[] {
  if (arch === 'x64') return ['SCMP_ARCH_X86_64'];
  if (arch === 'arm64') return ['SCMP_ARCH_AARCH64'];
  throw new VeshError(ErrorCodes.RUNTIME_FAILED, `vesh's seccomp profile knows x86_64 and aarch64 hosts only, not "${arch}": run vesh on one of those`);
}

export function vesSeccompProfile(opts: SeccompOptions = { veFirewall: false }, arch: string = process.arch): Record<string, unknown> {
  const syscalls: Rule[] = [
    deny(DENIED, EPERM),
    allow(arch === 'x64' ? [...ALLOWED, ...ALLOWED_X86_64] : ALLOWED),
    ...namespaceRules(),
    ...socketRules(opts),
    ...setsockoptRules(opts),
    ...PERSONALITIES.map((p) => allow(['personality'], [int32Is(0, p)])),
  ];
  return {
    defaultAction: 'SCMP_ACT_ERRNO',
    defaultErrnoRet: ENOSYS,
    architectures: seccompArchitectures(arch),
    syscalls,
  };
}
