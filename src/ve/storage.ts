import { promises as fs } from 'node:fs';
import path from 'node:path';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import { run } from '../system/exec.js';
import { requireSetupHelper } from '../system/native-helpers.js';
import type { HostCommand } from '../runtime/types.js';

/**
 * A VE's own file system: a sparse ext4 image (its disk limit, as OpenVZ's
 * ploop) loop-mounted at `private/`, holding the overlay's upper and work
 * directories, and the overlay itself mounted at `rootfs/` over the shared
 * template (an idmapped mount of it that is never attached anywhere, so
 * nothing but the overlay and the image is ever mounted under the VE's
 * directory). Without a disk limit the upper layer lives on the host's disk.
 */
export interface VePaths {
  dir: string;
  image: string;
  private: string;
  upper: string;
  work: string;
  rootfs: string;
  /** Host side of /run/vesh inside the VE (shutdown marker). */
  ctl: string;
  console: string;
  runtimeLog: string;
  pidFile: string;
  record: string;
  /**
   * Present while the host has asked this run of the VE to stop (vesh ve
   * stop/restart), so the monitor does not take it for a reboot. Host side,
   * in ves/NAME, where the VE cannot reach it.
   */
  stopRequest: string;
}

export function vePaths(dir: string): VePaths {
  const priv = path.join(dir, 'private');
  return {
    dir,
    image: path.join(dir, 'disk.img'),
    private: priv,
    upper: path.join(priv, 'upper'),
    work: path.join(priv, 'work'),
    rootfs: path.join(dir, 'rootfs'),
    // Both are written by the VE (its init's output, its shutdown marker), so
    // both live on the VE's own disk, inside its limit, never on the host's.
    ctl: path.join(priv, 'ctl'),
    console: path.join(priv, 'console.log'),
    runtimeLog: path.join(dir, 'runtime.log'),
    pidFile: path.join(dir, 'init.pid'),
    record: path.join(dir, 've.json'),
    stopRequest: path.join(dir, 'stop-requested'),
  };
}

/** Mount points currently mounted, from /proc/self/mountinfo (field 5, octal escapes decoded). */
export async function mountedPaths(): Promise<Set<string>> {
  const text = await fs.readFile('/proc/self/mountinfo', 'utf8');
  const out = new Set<string>();
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    if (f.length > 4) out.add(f[4]!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))));
  }
  return out;
}

export async function isMounted(p: string): Promise<boolean> {
  return (await mountedPaths()).has(p);
}

/** Mount points at or below `dir`, deepest first (the order to unmount them). */
export async function mountsUnder(dir: string): Promise<string[]> {
  const all = [...(await mountedPaths())].filter((m) => m === dir || m.startsWith(dir + '/'));
  return all.sort((a, b) => b.length - a.length);
}

/**
 * True when `err` (a file system call's error, or a helper program's failure
 * whose output names it) is ENOSPC: the file system being written is full.
 */
export function isNoSpaceError(err: unknown): boolean {
  if ((err as NodeJS.ErrnoException | null)?.code === 'ENOSPC') return true;
  const details = (err as { details?: { stderr?: unknown; stdout?: unknown } } | null)?.details;
  const text = [err instanceof Error ? err.message : '', details?.stderr, details?.stdout].filter((t): t is string => typeof t === 'string').join('\n');
  return /No space left on device|ENOSPC/.test(text);
}

/**
 * The one-line error for a VE step that found the host's disk full. `dir`
 * is the host directory whose file system ran full (the VE area under the
 * data dir): the fix is there, not in the VE, so the message names it and
 * how to see its usage. Other errors pass through unchanged.
 */
export function asHostDiskFull(err: unknown, dir: string, what: string): unknown {
  if (!isNoSpaceError(err) || (err instanceof VeshError && err.code === ErrorCodes.DISK_FULL)) return err;
  return new VeshError(ErrorCodes.DISK_FULL,
    `cannot ${what}: the host disk holding ${dir} is full (No space left on device); free space on it (see "df -h ${dir}"), then try again`,
    { cause: err, userMessage: 'The server is out of disk space; the administrator has been told.' });
}

/** Make the sparse disk image with an ext4 file system whose root belongs to VE root. */
export async function createDiskImage(p: VePaths, sizeBytes: number, rootId: number): Promise<void> {
  const area = path.dirname(p.dir);
  try {
    const fh = await fs.open(p.image, 'wx', 0o600);
    try {
      await fh.truncate(sizeBytes);
    } finally {
      await fh.close();
    }
  } catch (err) {
    throw asHostDiskFull(err, area, 'make the disk image of the VE');
  }
  // No reserved blocks: the whole limit is the VE's. No journal: a journal
  // costs ~1.1 MiB of memory per mounted VE against ~0.25 MiB without
  // (measured here over 100 mounts), which would break the density target;
  // instead every mount is preceded by a preen check (2 ms on a clean file
  // system), as OpenVZ checks its ploop images.
  await run('mkfs.ext4', ['-q', '-F', '-m', '0', '-O', '^has_journal', '-E', `root_owner=${rootId}:${rootId},lazy_itable_init=1`, p.image]).catch((err: unknown) => {
    // The image is sparse: mkfs writes its metadata into the host's file system, which may be full.
    if (isNoSpaceError(err)) throw asHostDiskFull(err, area, 'make the disk image of the VE');
    if (err instanceof VeshError && err.code === ErrorCodes.COMMAND_MISSING) {
      throw new VeshError(ErrorCodes.COMMAND_MISSING, 'cannot make the disk image of the VE: mkfs.ext4 is not installed: run "apt-get install e2fsprogs"', { cause: err });
    }
    throw new VeshError(ErrorCodes.COMMAND_FAILED, `cannot make the disk image of the VE: ${errorMessage(err)}; run "vesh doctor"`, { cause: err });
  });
}

/**
 * The command that mounts a VE's file systems: its disk image (checked here
 * first, unless the superblock says it was cleanly unmounted) on `private/`
 * through a loop device in direct-I/O mode, the upper, work and ctl
 * directories owned by VE root (ctl without the last run's `marker`), and
 * the overlay on the template at `rootfs/`, the template shown through an
 * idmapped mount in the VE's own id range (see VeMountOptions). One run of the native setup
 * helper (src/native/vesh-setup.c) does all of it, three process starts
 * fewer than mount, losetup and mount again (~35 ms per start here); a start
 * hands it to the engine as its `prepare` step, saving one more. What is
 * already mounted is left as it is.
 *
 * Direct I/O: the image's blocks are not cached a second time in the host's
 * page cache (the VE's own ext4 caches them already); measured here, 1 GiB
 * written into a VE in 6.8 s with the double cache, 3.3 s without. Set when
 * the loop device is made, it costs nothing (switching it on afterwards
 * froze the device for ~70 ms). The device also gets 256 KiB of read-ahead
 * instead of the kernel's 2.5 MiB (VE_DISK_READ_AHEAD_KB in vesh-setup.c:
 * half the CPU for a VE reading a file larger than its memory limit).
 */
export async function veMountCommand(p: VePaths, opts: VeMountOptions): Promise<HostCommand> {
  const mounted = await mountedPaths();
  let image = '-';
  if (opts.hasImage && !mounted.has(p.private)) {
    // e2fsck -p: 0 clean, 1 errors fixed, 2 fixed and reboot advised (not ours); 4 and up need a person.
    // Skipped when the superblock says the file system was cleanly unmounted
    // and has no recorded errors: exactly what -p would find, without a process start.
    const fsck = (await isCleanExt4(p.image)) ? { code: 0, stdout: '' } : await run('e2fsck', ['-p', p.image], { allowFailure: true });
    if (fsck.code >= 4) {
      throw new VeshError(ErrorCodes.VE_START_FAILED, `the VE's disk image ${p.image} has file system errors that need a manual check: run "e2fsck -f ${p.image}" while the VE is stopped (${fsck.stdout.trim().split('\n').pop() ?? ''})`);
    }
    image = p.image;
  }
  const lower = mounted.has(p.rootfs) ? '-' : opts.lowerdir;
  return {
    file: requireSetupHelper(),
    args: ['mount', image, p.private, p.upper, p.work, p.ctl, opts.marker ?? '-', p.rootfs, lower, String(opts.ids.base), `${opts.templateBase}:${opts.ids.size}`],
  };
}

export interface VeMountOptions {
  hasImage: boolean;
  /** The template's root file system, the overlay's lower layer. */
  lowerdir: string;
  /** The VE's host ids: VE root owns upper/ and ctl/, and the template is shown to the VE in this range. */
  ids: { base: number; size: number };
  /**
   * Host id that the template's own root has on disk: 0 for a template as
   * built (unshifted), the old shared runtime.idmapBase for one shifted by
   * an older vesh. The template is shown through an idmapped mount that
   * maps templateBase.. to ids.base.., so one template on disk serves every
   * range, and is never changed.
   */
  templateBase: number;
  /** File in ctl/ to remove first (the last run's shutdown marker). */
  marker?: string;
}

/**
 * Give every file of a stopped VE's own file system (its disk image, or
 * private/ without one) owned by ids in `from` the same ids in `to`: a VE
 * made when all VEs shared one range, moved to its own. Done by the setup
 * helper, by descriptor without following a symlink (the tree is VE root's).
 * Returns how many entries changed. The image must be mounted (mount it
 * with veMountCommand's helper first).
 */
export async function shiftVeFiles(p: VePaths, from: number, to: number, size: number): Promise<number> {
  const res = await run(requireSetupHelper(), ['shift', p.private, String(from), String(to), String(size)], { timeoutMs: SHIFT_TIMEOUT_MS });
  return Number(res.stdout.trim());
}

/** A VE's disk holds at most a few million entries; one chown each takes microseconds. */
const SHIFT_TIMEOUT_MS = 30 * 60_000;

/**
 * Mount a VE's disk image on private/ (when it has one and it is not
 * mounted) and make upper/, work/ and ctl/, without the overlay: for work on
 * the VE's own files while it is stopped (see shiftVeFiles).
 */
export async function mountVeDisk(p: VePaths, opts: { hasImage: boolean; rootId: number }): Promise<void> {
  const image = opts.hasImage && !(await isMounted(p.private)) ? p.image : '-';
  await run(requireSetupHelper(), ['mount', image, p.private, p.upper, p.work, p.ctl, '-', p.rootfs, '-', String(opts.rootId), '-']);
}

/** Mount a VE's file systems now (see veMountCommand). */
export async function mountVeFileSystems(p: VePaths, opts: VeMountOptions): Promise<void> {
  const cmd = await veMountCommand(p, opts);
  await run(cmd.file, cmd.args).catch((err: unknown) => {
    // The helper makes the upper and work directories: on the host's disk without a disk image, and a sparse image's writes land there too.
    throw asHostDiskFull(err, path.dirname(p.dir), 'mount the file systems of the VE');
  });
}

export async function unmount(target: string): Promise<void> {
  if (!(await isMounted(target))) return;
  const res = await run('umount', [target], { allowFailure: true });
  if (res.code !== 0) {
    // Busy (a host process still inside): detach lazily so the VE can be cleaned up; the kernel frees it when the last user goes.
    await run('umount', ['-l', target]);
  }
}

/** Unmount the overlay and the disk image of a VE, deepest first. */
export async function unmountAll(p: VePaths): Promise<void> {
  for (const m of await mountsUnder(p.dir)) await unmount(m);
}

/** Bytes used and total of the VE's disk (its image's file system), or null without an image. */
export async function diskUsage(p: VePaths, mounted?: Set<string>): Promise<{ used: number; total: number } | null> {
  // `mounted`: the mount table read once for many VEs (list): it grows with
  // every VE, so reading it per VE made a listing quadratic.
  if (!(mounted ?? await mountedPaths()).has(p.private)) return null;
  const st = await fs.statfs(p.private);
  return { used: (st.blocks - st.bfree) * st.bsize, total: st.blocks * st.bsize };
}

/**
 * ext4 superblock (at byte 1024): s_magic 0xEF53 at +0x38, s_state at +0x3A
 * (bit 0 "cleanly unmounted", bit 1 "errors"). The kernel clears the clean
 * bit on disk while the file system is mounted (also without a journal) and
 * sets it again at a clean unmount.
 */
export async function isCleanExt4(image: string): Promise<boolean> {
  const fh = await fs.open(image, 'r').catch(() => null);
  if (!fh) return false;
  try {
    const buf = Buffer.alloc(0x40);
    await fh.read(buf, 0, buf.length, 1024);
    return buf.readUInt16LE(0x38) === 0xef53 && (buf.readUInt16LE(0x3a) & 0b11) === 0b01;
  } finally {
    await fh.close();
  }
}
