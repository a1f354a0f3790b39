import { readFileSync } from 'node:fs';
import type { Limits } from '../config/limits.js';
import { vesSeccompProfile } from './seccomp.js';

/** Everything needed to describe one VE to an OCI runtime. */
export interface VeBundleSpec {
  name: string;
  hostname: string;
  rootfs: string;
  init: string[];
  limits: Limits;
  cgroupsPath: string;
  idmap: { base: number; size: number };
  /** Host directory bind-mounted at /run/vesh (writable by VE root). */
  ctlDir: string;
  /** OCI createRuntime hooks: host programs run once the VE's namespaces exist, before its init runs. */
  createRuntimeHooks?: OciHook[];
  /** Terminals the VE may have open at once (its devpts max=); DEFAULT_VE_PTYS when absent. */
  ptys?: number;
  /**
   * The host's cgroup layout. On v1 (and hybrid) the kernel charges a
   * cgroup's TCP buffers only once its TCP limit is set, so the bundle sets
   * one; v2 charges socket memory to the VE's memory by itself.
   */
  cgroupLayout?: 'v1' | 'hybrid' | 'v2';
  /** VE root may configure netfilter in its own network (runtime.veFirewall); off when absent. */
  veFirewall?: boolean;
  /** Bind mounts over the VE's /proc and /sys files (LXCFS's per-VE view, runtime/lxcfs.ts); after the file systems they cover. */
  viewMounts?: Array<{ destination: string; type: string; source: string; options: string[] }>;
}

/** Terminals per VE when the caller names no number (runtime.ptysPerVe's default). */
export const DEFAULT_VE_PTYS = 1024;

/**
 * Per-VE rlimits for counters the kernel also charges to the user that made
 * the VE's user namespace (host root, through runc) and so shares between
 * every VE and host root (review M2): POSIX message queue bytes, queued
 * signals, SHM_LOCK'd memory. A VE process may use at most these (per VE uid);
 * the kernel's defaults for an ordinary user, lowered to the supervisor's hard
 * limit when that is lower (runc refuses more).
 */
const VE_SHARED_COUNTER_RLIMITS: Array<[type: string, limitsName: string, value: number]> = [
  ['RLIMIT_MSGQUEUE', 'Max msgqueue size', 819_200],
  ['RLIMIT_SIGPENDING', 'Max pending signals', 16_384],
  ['RLIMIT_MEMLOCK', 'Max locked memory', 8 * 1024 * 1024],
];

/**
 * Per-socket TCP buffer bounds in the VE's own network namespace (these
 * sysctls are per netns; the kernel's defaults). The VE's total TCP buffer
 * memory is bounded by its memory cgroup (kernelTCP on v1), these only keep
 * one socket's autotuning at the kernel's usual size.
 */
const VE_NET_SYSCTLS: Record<string, string> = {
  'net.ipv4.tcp_rmem': '4096 131072 6291456',
  'net.ipv4.tcp_wmem': '4096 16384 4194304',
};

/** An OCI hook (runtime-spec config.md#posix-platform-hooks); its stdin is the container's state JSON. */
export interface OciHook {
  path: string;
  args: string[];
  env?: string[];
  timeout?: number;
}

/**
 * Docker's default capability set (what a container's root keeps), plus
 * three a whole-machine VE needs and that its user namespace confines:
 * SYS_BOOT (reboot/poweroff restart or stop only the VE's pid namespace),
 * NET_ADMIN (VE root configures its own network namespace; the host stops
 * address spoofing on the bridge) and SYS_PTRACE (debuggers on the VE's own
 * processes; other VEs' processes are not visible).
 */
export const VE_CAPABILITIES = [
  'CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_FSETID', 'CAP_FOWNER', 'CAP_MKNOD', 'CAP_NET_RAW',
  'CAP_SETGID', 'CAP_SETUID', 'CAP_SETFCAP', 'CAP_SETPCAP', 'CAP_NET_BIND_SERVICE',
  'CAP_SYS_CHROOT', 'CAP_KILL', 'CAP_AUDIT_WRITE',
  'CAP_SYS_BOOT', 'CAP_NET_ADMIN', 'CAP_SYS_PTRACE',
];

const MASKED_PATHS = [
  '/proc/acpi', '/proc/asound', '/proc/kcore', '/proc/keys', '/proc/latency_stats', '/proc/timer_list',
  '/proc/timer_stats', '/proc/sched_debug', '/proc/scsi', '/sys/firmware', '/sys/devices/virtual/powercap',
  // Loop devices (every VE's disk image) live here; loop/backing_file names the
  // host path of each image, so the data dir and every VE's name. /sys/block,
  // /sys/class/block and /sys/dev/block only link here. Real disks stay visible.
  '/sys/devices/virtual/block',
];
const READONLY_PATHS = ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'];

/**
 * A hard limit of this process ("Max open files" … as /proc/self/limits names
 * it): an OCI rlimit above it makes runc fail. `fallback` when unreadable;
 * Infinity for "unlimited".
 */
function hostHardLimit(name: string, fallback: number): number {
  try {
    const text = readFileSync('/proc/self/limits', 'utf8');
    const line = text.split('\n').find((l) => l.startsWith(name));
    const m = line ? /^\S+(?:\s\S+)*?\s{2,}\S+\s+(\S+)/.exec(line) : null;
    if (m) return m[1] === 'unlimited' ? Infinity : Number(m[1]);
  } catch {
    // fall through to the caller's value
  }
  return fallback;
}

function hostNofileHardLimit(): number {
  const n = hostHardLimit('Max open files', 4096);
  return Number.isFinite(n) ? n : 1_048_576;
}

/** The rlimits of every VE process: open files, and the counters VEs share with host root (see VE_SHARED_COUNTER_RLIMITS). */
export function veRlimits(): Array<{ type: string; hard: number; soft: number }> {
  const nofileHard = Math.min(hostNofileHardLimit(), 65_536);
  const out = [{ type: 'RLIMIT_NOFILE', hard: nofileHard, soft: Math.min(1024, nofileHard) }];
  for (const [type, name, want] of VE_SHARED_COUNTER_RLIMITS) {
    const v = Math.min(want, hostHardLimit(name, want));
    out.push({ type, hard: v, soft: v });
  }
  return out;
}

/**
 * The environment every process started in a VE begins with (the init's, and
 * under what a session sets). container= tells init scripts they run in a
 * container, as LXC and systemd-nspawn set it.
 */
export const VE_PROCESS_ENV: Readonly<Record<string, string>> = {
  PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
  container: 'vesh',
  TERM: 'linux',
};

export function buildOciConfig(spec: VeBundleSpec): Record<string, unknown> {
  const caps = VE_CAPABILITIES;
  const period = 100_000;
  const ptys = spec.ptys ?? DEFAULT_VE_PTYS;
  // On v1 a VE's TCP buffers are charged (to memory.kmem.tcp) only with a
  // limit set: without it they escape the VE's memory limit into the
  // host-wide tcp_mem pool (review N1). As large as the VE's memory limit.
  // runc 1.1 does not write it: RuncRuntime sets it from here before the
  // engine runs (cgroups.ts presetTcpLimit).
  const kernelTcp = spec.cgroupLayout === 'v2' ? {} : { kernelTCP: spec.limits.memory };
  return {
    ociVersion: '1.0.2-dev',
    ...(spec.createRuntimeHooks?.length ? { hooks: { createRuntime: spec.createRuntimeHooks } } : {}),
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: spec.init,
      env: Object.entries(VE_PROCESS_ENV).map(([k, v]) => `${k}=${v}`),
      cwd: '/',
      capabilities: { bounding: caps, effective: caps, permitted: caps, inheritable: [], ambient: [] },
      rlimits: veRlimits(),
      // setuid programs (su, sudo, passwd) must work inside the VE.
      noNewPrivileges: false,
    },
    root: { path: spec.rootfs, readonly: false },
    hostname: spec.hostname,
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc', options: ['nosuid', 'noexec', 'nodev'] },
      { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
      { destination: '/dev/pts', type: 'devpts', source: 'devpts', options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620', 'gid=5', `max=${ptys}`] },
      { destination: '/dev/shm', type: 'tmpfs', source: 'shm', options: ['nosuid', 'noexec', 'nodev', 'mode=1777', `size=${Math.max(1, Math.floor(spec.limits.memory / 2 / 1024 / 1024))}m`] },
      { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: ['nosuid', 'noexec', 'nodev'] },
      { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
      { destination: '/sys/fs/cgroup', type: 'cgroup', source: 'cgroup', options: ['nosuid', 'noexec', 'nodev', 'relatime', 'ro'] },
      { destination: '/run', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'nodev', 'mode=755', 'size=65536k'] },
      { destination: '/run/vesh', type: 'bind', source: spec.ctlDir, options: ['rbind', 'rw', 'nosuid', 'nodev', 'noexec'] },
      ...(spec.viewMounts ?? []),
    ],
    linux: {
      uidMappings: [{ containerID: 0, hostID: spec.idmap.base, size: spec.idmap.size }],
      gidMappings: [{ containerID: 0, hostID: spec.idmap.base, size: spec.idmap.size }],
      namespaces: ['pid', 'network', 'ipc', 'uts', 'mount', 'user', 'cgroup'].map((type) => ({ type })),
      cgroupsPath: spec.cgroupsPath,
      sysctl: { ...VE_NET_SYSCTLS },
      resources: {
        devices: [{ allow: false, access: 'rwm' }],
        memory: { limit: spec.limits.memory, swap: spec.limits.memory, ...kernelTcp },
        pids: { limit: spec.limits.pids },
        cpu: { quota: Math.round(spec.limits.cpus * period), period },
      },
      maskedPaths: MASKED_PATHS,
      readonlyPaths: READONLY_PATHS,
      seccomp: vesSeccompProfile({ veFirewall: spec.veFirewall === true }),
    },
  };
}
