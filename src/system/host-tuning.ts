import { promises as fs } from 'node:fs';
import type { Logger } from '../audit/logger.js';

/**
 * Host-wide kernel settings that every VE draws on, raised (never lowered)
 * when a vesh process first works with VEs, each for a reason a tenant or
 * the VE count gives. `vesh doctor` reports the same list (hostSysctlNeeds)
 * with the value each needs and why.
 */

/** The largest value an int sysctl takes. */
const INT_MAX = 2_147_483_647;

/** How many VEs a host is sized for (the density target), for settings that grow with it. */
export const VES_PER_HOST = 1000;

export interface SysctlNeed {
  /** sysctl name, e.g. kernel.pid_max */
  key: string;
  /** At least this. */
  want: number;
  /** Why, in a sentence an admin can act on. */
  why: string;
  /** vesh raises it at start when below (false: doctor only reports it). */
  raise: boolean;
  /** Above this is more than vesh needs and widens something for every host user (doctor warns). */
  tooHigh?: number;
}

export function sysctlPath(key: string): string {
  return `/proc/sys/${key.replace(/\./g, '/')}`;
}

/**
 * What vesh needs of the host's kernel settings, for VEs of `pidsPerVe`
 * processes and `ptysPerVe` terminals.
 */
export function hostSysctlNeeds(opts: { pidsPerVe: number; ptysPerVe: number }): SysctlNeed[] {
  // Kernel keys: runc itself gives each VE a session keyring (before the
  // VE's seccomp filter applies, so refusing keyctl and add_key inside VEs
  // does not remove it), owned by VE root and charged to that host uid's key
  // quota. Each VE has a uid of its own now (one key each), but VEs made by
  // an older vesh share runtime.idmapBase until their next start, so the
  // raise below stays for a host upgraded with many running VEs. Measured in
  // /proc/key-users: one key and about 11 bytes per VE with 5-letter names
  // (31 keys, 333 bytes for 31 VEs), so at most ~40 bytes with 32-letter
  // ones. The defaults (200 keys, 20000 bytes) stop the 201st VE. The quota
  // applies to every non-root host uid alike, so it is raised only to what
  // twice the density target needs, not further (review L4).
  const keys = 2 * VES_PER_HOST;
  return [
    {
      key: 'kernel.pid_max', want: 4_194_304, raise: true,
      why: `every VE process and thread is a host pid: ${VES_PER_HOST} VEs of ${opts.pidsPerVe} need ${VES_PER_HOST * opts.pidsPerVe} beyond the host's own (4194304 is the kernel's ceiling and systemd's default)`,
    },
    {
      key: 'kernel.pty.max', want: 1_048_576, raise: true,
      why: `every VE's terminals come from one pool of pty.max - pty.reserve; each VE holds at most runtime.ptysPerVe (${opts.ptysPerVe}) and pays for them from its own memory limit, so the pool is raised to the kernel's ceiling`,
    },
    // inotify: the kernel counts every VE's instances and watches against
    // host root too (the VEs' user namespaces are made by host root), in one
    // count shared by all VEs, systemd and vesh. Any finite limit there can be
    // used up by VEs together (measured: an instance costs ~1 KB, so a 512 MB
    // VE holds ~500000, LXD's 1048576 falls to two VEs). Both are charged to
    // the memory cgroup of whoever makes them, and every instance is an open
    // file: memory and RLIMIT_NOFILE are the real bounds, per VE. So the
    // shared count is lifted out of the way. The price: host users outside any
    // memory-limited cgroup are bounded by their memory only, not by the
    // kernel's RAM-sized watch default.
    {
      key: 'fs.inotify.max_user_instances', want: INT_MAX, raise: true,
      why: 'every VE\'s inotify instances also count against host root\'s, one count for all VEs, systemd and vesh: at the default 128 one VE takes them all; each instance (~1 KB) is charged to the memory of the VE that made it, which is the real per-VE bound',
    },
    {
      key: 'fs.inotify.max_user_watches', want: INT_MAX, raise: true,
      why: 'inotify watches are shared with host root in the same way; each is charged to the memory of the VE that made it',
    },
    {
      key: 'kernel.keys.maxkeys', want: keys, raise: true, tooHigh: 10 * keys,
      why: `runc gives each VE a session keyring charged to one host uid (VE root): ${keys} keys for up to ${keys} VEs; the quota holds for every non-root host uid, so no higher`,
    },
    {
      key: 'kernel.keys.maxbytes', want: keys * 50, raise: true, tooHigh: 10 * keys * 50,
      why: `the same keyrings take at most ~40 bytes each: ${keys * 50} bytes for ${keys} VEs; the quota holds for every non-root host uid, so no higher`,
    },
  ];
}

async function readSysctl(key: string): Promise<number | null> {
  const text = await fs.readFile(sysctlPath(key), 'utf8').catch(() => null);
  const n = text === null ? NaN : Number(text.trim().split(/\s+/)[0]);
  return Number.isFinite(n) ? n : null;
}

/** The current value of a numeric sysctl (its first field), or null when unreadable. */
export const currentSysctl = readSysctl;

/** Raise every setting of hostSysctlNeeds that is below its need; log what changed and why. */
export async function tuneHost(log: Logger, opts: { pidsPerVe: number; ptysPerVe: number }): Promise<void> {
  for (const need of hostSysctlNeeds(opts)) {
    if (!need.raise) continue;
    const now = await readSysctl(need.key);
    if (now === null || now >= need.want) continue;
    try {
      await fs.writeFile(sysctlPath(need.key), String(need.want));
      log.info({ event: 'host.sysctl_raised', setting: need.key, from: now, to: need.want }, `raised ${need.key} from ${now} to ${need.want}: ${need.why}`);
    } catch (err) {
      log.warn({ event: 'host.sysctl_unchanged', setting: need.key, value: now, want: need.want, err: (err as Error).message }, `cannot raise ${need.key} to ${need.want} (${need.why}); run "sysctl -w ${need.key}=${need.want}"`);
    }
  }
}
