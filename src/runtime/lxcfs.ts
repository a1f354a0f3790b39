import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { ErrorCodes, VeshError } from '../errors.js';
import { run, safeEnv } from '../system/exec.js';
import { detectCgroupLayout } from './cgroups.js';
import { spawn } from 'node:child_process';

/**
 * LXCFS gives each VE its own view of /proc/meminfo, cpuinfo, stat, uptime,
 * loadavg, diskstats, swaps and /sys/devices/system/cpu: one FUSE daemon on
 * the host answers every VE, working out which VE asks from the reader's
 * /proc/<pid>/cgroup (read in the host's cgroup namespace, so the VE's own
 * cgroup namespace does not hide its path). One daemon per vesh instance,
 * started on the first VE start and kept for the server's life (VEs' binds
 * point into it); its mount is under the instance's runtime dir.
 *
 * What a VE can make it do: read-only reads of its own cgroups' counters
 * and of host /proc files it then rewrites. The binds are files mounted ro,
 * nosuid, nodev, noexec; the FUSE mount itself (with its cgroup/ tree) is
 * never visible in a VE.
 */

/** The files LXC binds from LXCFS into a container (its lxc.mount.auto = lxcfs set). */
export const LXCFS_PROC_FILES = ['meminfo', 'cpuinfo', 'stat', 'uptime', 'loadavg', 'diskstats', 'swaps'] as const;
/** A directory LXCFS serves: CPUs online as the VE's CPU limit allows. */
export const LXCFS_SYS_CPU_DIR = 'sys/devices/system/cpu';

export interface LxcfsMount {
  /** Where LXCFS is mounted on the host. */
  mountPoint: string;
  /** The daemon's pid (from its pid file). */
  pid: number;
}

export function lxcfsPaths(instanceRunDir: string): { dir: string; mountPoint: string; pidFile: string } {
  const dir = path.join(instanceRunDir, 'lxcfs');
  return { dir, mountPoint: path.join(dir, 'mnt'), pidFile: path.join(dir, 'lxcfs.pid') };
}

/** Whether a FUSE LXCFS file system is mounted at mountPoint (read from our own mountinfo). */
export async function isLxcfsMounted(mountPoint: string): Promise<boolean> {
  const info = await fs.readFile('/proc/self/mountinfo', 'utf8');
  for (const line of info.split('\n')) {
    const f = line.split(' ');
    const sep = f.indexOf('-');
    if (sep < 0) continue;
    if (f[4] === mountPoint && f[sep + 1] === 'fuse.lxcfs') return true;
  }
  return false;
}

async function readPid(pidFile: string): Promise<number | null> {
  try {
    const n = Number((await fs.readFile(pidFile, 'utf8')).trim());
    return Number.isInteger(n) && n > 0 ? n : null;
  } catch {
    return null;
  }
}

/** Starts in flight, per mount dir: VEs starting at once share one daemon. */
const starting = new Map<string, Promise<LxcfsMount>>();

/**
 * The instance's LXCFS, started when not running yet. Throws
 * COMMAND_MISSING when lxcfs is not installed and COMMAND_FAILED when it
 * does not come up; the caller starts the VE without the binds then.
 */
export function ensureLxcfs(instanceRunDir: string, binary = 'lxcfs'): Promise<LxcfsMount> {
  const key = lxcfsPaths(instanceRunDir).mountPoint;
  let p = starting.get(key);
  if (!p) {
    p = startOnce(instanceRunDir, binary).finally(() => starting.delete(key));
    starting.set(key, p);
  }
  return p;
}

async function startOnce(instanceRunDir: string, binary: string): Promise<LxcfsMount> {
  const p = lxcfsPaths(instanceRunDir);
  if (await isLxcfsMounted(p.mountPoint)) {
    const pid = await readPid(p.pidFile);
    // Another vesh process of this instance (the server, a CLI start) started it: reuse it while it answers.
    if (pid !== null && (await exists(path.join(p.mountPoint, 'proc', 'uptime')))) return { mountPoint: p.mountPoint, pid };
  }
  // runc mounts the binds as VE root's host uid: it must pass through (not
  // list) the directory; the FUSE mount (allow_other) lets it read the files.
  await fs.mkdir(p.mountPoint, { recursive: true, mode: 0o711 });
  await fs.chmod(p.dir, 0o711);
  // So must it through the instance's runtime dir and /run/vesh (0700 by
  // default): search only; everything else in them (runc state, agents)
  // stays 0700 of its own.
  await fs.chmod(instanceRunDir, 0o711);
  await fs.chmod(path.dirname(instanceRunDir), 0o711);
  // A dead daemon leaves its mount behind (reads fail with ENOTCONN): clear it.
  await run('umount', ['-l', p.mountPoint], { allowFailure: true, timeoutMs: 10_000 });
  const log = await fs.open(path.join(p.dir, 'lxcfs.log'), 'a', 0o600);
  let exited: number | null | undefined;
  let spawnError: VeshError | undefined;
  try {
    // lxcfs stays in the foreground (5.0 does, -f or not): it runs detached,
    // in a session of its own, outliving this process; its output goes to a
    // log file, never to a pipe of ours. --enable-cfs: CPUs in
    // cpuinfo/stat/sys as the VE's CFS quota allows; -l: per-VE load average.
    const child = spawn(binary, ['-f', '--enable-cfs', '-l', '-p', p.pidFile, p.mountPoint], { stdio: ['ignore', log.fd, log.fd], env: safeEnv(), detached: true });
    child.once('error', (e: NodeJS.ErrnoException) => {
      spawnError = e.code === 'ENOENT'
        ? new VeshError(ErrorCodes.COMMAND_MISSING, 'lxcfs is not installed: VEs see the host\'s memory, CPUs and uptime in /proc. Install it (apt-get install lxcfs) or set runtime.lxcfs: false')
        : new VeshError(ErrorCodes.COMMAND_FAILED, `cannot run lxcfs: ${e.message}`, { cause: e });
    });
    child.once('exit', (c) => { exited = c; });
    child.unref();
    if (child.pid !== undefined) await leaveServiceCgroup(instanceRunDir, child.pid);
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline && exited === undefined && !spawnError && !(await isLxcfsMounted(p.mountPoint))) {
      await new Promise((r) => setTimeout(r, 20));
    }
    if (spawnError) throw spawnError;
    if (exited === undefined && !(await isLxcfsMounted(p.mountPoint))) child.kill('SIGKILL');
  } finally {
    await log.close();
  }
  const pid = await readPid(p.pidFile);
  if (pid === null || !(await isLxcfsMounted(p.mountPoint))) {
    const tail = (await fs.readFile(path.join(p.dir, 'lxcfs.log'), 'utf8').catch(() => '')).trim().split('\n').slice(-3).join(' | ');
    throw new VeshError(ErrorCodes.COMMAND_FAILED, `lxcfs did not mount at ${p.mountPoint}${exited !== undefined ? ` (exit ${exited})` : ' within 10 s'}: ${tail || 'no message'}; VEs start without their own /proc view until it works (see "vesh doctor")`);
  }
  return { mountPoint: p.mountPoint, pid };
}

/** Unmounts the instance's LXCFS and ends its daemon (VEs still bound to it read ENOTCONN after). */
export async function stopLxcfs(instanceRunDir: string): Promise<void> {
  const p = lxcfsPaths(instanceRunDir);
  const pid = await readPid(p.pidFile);
  if (await isLxcfsMounted(p.mountPoint)) {
    await run('umount', ['-l', p.mountPoint], { allowFailure: true, timeoutMs: 10_000 });
  }
  if (pid !== null) {
    try {
      const comm = (await fs.readFile(`/proc/${pid}/comm`, 'utf8')).trim();
      // The pid file may be stale and the pid reused: end it only if it is lxcfs.
      if (comm === 'lxcfs') {
        process.kill(pid, 'SIGTERM');
        // It ends its FUSE loop on its own time; one that lingers is not left behind.
        for (let i = 0; i < 50 && (await isAlive(pid)); i++) await new Promise((r) => setTimeout(r, 50));
        if (await isAlive(pid)) process.kill(pid, 'SIGKILL');
      }
    } catch {
      // already gone
    }
  }
  await fs.rm(p.dir, { recursive: true, force: true });
  for (const d of lxcfsCgroupDirs(instanceRunDir)) await fs.rmdir(d).catch(() => undefined);
}

/**
 * Where the daemon is moved once started: a cgroup of its own, beside the
 * VEs' (`/vesh-ID`), in the hierarchies a service manager tracks (v2's, and
 * on v1/hybrid the named systemd one and the unified one). Started by `vesh
 * serve` it would otherwise sit in the service's cgroup, and a `systemctl
 * stop` or restart (KillMode=mixed kills what is left there) would take it
 * away from the VEs that keep running, whose /proc reads would then fail.
 */
function lxcfsCgroupDirs(instanceRunDir: string): string[] {
  const rel = `vesh-${path.basename(instanceRunDir)}.lxcfs`;
  return detectCgroupLayout() === 'v2'
    ? [path.join('/sys/fs/cgroup', rel)]
    : ['systemd', 'unified'].map((h) => path.join('/sys/fs/cgroup', h, rel)).filter((d) => existsSync(path.dirname(d)));
}

async function leaveServiceCgroup(instanceRunDir: string, pid: number): Promise<void> {
  for (const dir of lxcfsCgroupDirs(instanceRunDir)) {
    try {
      await fs.mkdir(dir, { recursive: true });
      await fs.writeFile(path.join(dir, 'cgroup.procs'), `${pid}\n`);
    } catch (err) {
      // Not fatal: the daemon works where it is, it only shares the service's fate.
      process.emitWarning(`lxcfs stays in its starter's cgroup (${dir}: ${(err as Error).message}): a service stop would end it`);
    }
  }
}

/**
 * OCI bind mounts of the LXCFS files into a VE: each one read-only, so VE
 * root can read its own view and can neither write through it nor reach the
 * rest of the FUSE tree. Only files LXCFS actually serves are bound.
 */
export async function lxcfsOciMounts(mountPoint: string): Promise<Array<{ destination: string; type: string; source: string; options: string[] }>> {
  const opts = ['bind', 'ro', 'nosuid', 'nodev', 'noexec'];
  const out: Array<{ destination: string; type: string; source: string; options: string[] }> = [];
  for (const f of LXCFS_PROC_FILES) {
    const source = path.join(mountPoint, 'proc', f);
    if (await exists(source)) out.push({ destination: `/proc/${f}`, type: 'bind', source, options: opts });
  }
  const cpu = path.join(mountPoint, LXCFS_SYS_CPU_DIR);
  if (await exists(cpu)) out.push({ destination: `/${LXCFS_SYS_CPU_DIR}`, type: 'bind', source: cpu, options: ['rbind', ...opts.slice(1)] });
  return out;
}

async function exists(p: string): Promise<boolean> {
  try {
    await fs.stat(p);
    return true;
  } catch {
    return false;
  }
}

/** Whether pid is a live lxcfs (not a zombie, not a reused pid). */
async function isAlive(pid: number): Promise<boolean> {
  try {
    const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
    return stat.includes('(lxcfs)') && !/\) Z /.test(stat);
  } catch {
    return false;
  }
}
