import { promises as fs, readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import path from 'node:path';

/** Which cgroup layout this host has: v1 (all controllers v1), hybrid (v1 plus an empty v2 mount) or v2 (unified). */
export type CgroupLayout = 'v1' | 'hybrid' | 'v2';

export function detectCgroupLayout(mountsText = readFileSync('/proc/self/mounts', 'utf8')): CgroupLayout {
  const lines = mountsText.split('\n').map((l) => l.split(' '));
  const hasV1 = lines.some((f) => f[2] === 'cgroup');
  const v2Root = lines.some((f) => f[2] === 'cgroup2' && f[1] === '/sys/fs/cgroup');
  if (v2Root && !hasV1) return 'v2';
  return lines.some((f) => f[2] === 'cgroup2') ? 'hybrid' : 'v1';
}

export interface CgroupStats {
  memoryBytes: number | null;
  pids: number | null;
}

async function readNumber(file: string): Promise<number | null> {
  try {
    const n = Number((await fs.readFile(file, 'utf8')).trim());
    return Number.isFinite(n) ? n : null;
  } catch {
    return null;
  }
}

/**
 * Memory in use and processes of a VE's cgroup, read straight from cgroupfs:
 * one small read each, much cheaper than asking the runtime per VE when
 * listing a thousand VEs. Memory is what the kernel charges the cgroup
 * (shared template pages are charged to the VE that first read them).
 */
export async function readCgroupStats(cgroupsPath: string, layout: CgroupLayout = detectCgroupLayout()): Promise<CgroupStats> {
  const rel = cgroupsPath.replace(/^\/+/, '');
  if (layout === 'v2') {
    const dir = path.join('/sys/fs/cgroup', rel);
    return { memoryBytes: await readNumber(path.join(dir, 'memory.current')), pids: await readNumber(path.join(dir, 'pids.current')) };
  }
  return {
    memoryBytes: await readNumber(path.join('/sys/fs/cgroup/memory', rel, 'memory.usage_in_bytes')),
    pids: await readNumber(path.join('/sys/fs/cgroup/pids', rel, 'pids.current')),
  };
}

/** Directories a VE's cgroup occupies (every v1 hierarchy, or the one v2 directory). */
export function cgroupDirs(cgroupsPath: string, layout: CgroupLayout = detectCgroupLayout()): string[] {
  const rel = cgroupsPath.replace(/^\/+/, '');
  if (layout === 'v2') return [path.join('/sys/fs/cgroup', rel)];
  // In hybrid mode runc also makes the VE's directory in the (empty) v2 tree.
  const controllers = ['unified', 'memory', 'pids', 'cpu', 'cpuacct', 'cpuset', 'blkio', 'devices', 'freezer', 'systemd', 'net_cls', 'net_prio', 'perf_event', 'hugetlb', 'rdma', 'misc'];
  return controllers.map((c) => path.join('/sys/fs/cgroup', c, rel));
}

/** Remove empty cgroup directories left for a VE (runc removes its own; this also drops our parent when empty). */
export async function removeCgroupDirs(dirs: string[]): Promise<void> {
  for (const d of dirs) {
    await fs.rmdir(d).catch(() => undefined);
  }
}

/**
 * The relay cgroup of container `id`: where the host processes that serve
 * it (session relays, `runc exec`) are charged, beside (not inside) the
 * container's own cgroup, so they neither count against the VE's limits nor
 * get frozen or killed with its processes. The ".relays" suffix cannot be a
 * VE name (those hold no dots). Only the pids and memory controllers are
 * used, so on v1 only those two hierarchies hold it.
 */
export function relayCgroupDirs(parent: string, id: string, layout: CgroupLayout): string[] {
  const rel = `${parent.replace(/^\/+/, '')}/${id}.relays`;
  if (layout === 'v2') return [path.join('/sys/fs/cgroup', rel)];
  return ['pids', 'memory'].map((c) => path.join('/sys/fs/cgroup', c, rel));
}

async function cgroupPids(dir: string): Promise<number[]> {
  const text = await fs.readFile(path.join(dir, 'cgroup.procs'), 'utf8').catch(() => '');
  return text.split('\n').map(Number).filter((n) => Number.isInteger(n) && n > 0);
}

/**
 * Remove a container's relay cgroup once its container is gone. Its relays
 * end by themselves when the agent they talk to or the engine process they
 * wait for goes (a second or so); any still there after `graceMs`
 * serve a container that no longer exists, and are killed.
 */
export async function removeRelayCgroup(dirs: string[], graceMs = 2000): Promise<void> {
  const deadline = Date.now() + graceMs;
  for (;;) {
    const pids = (await Promise.all(dirs.map(cgroupPids))).flat();
    if (pids.length === 0) break;
    if (Date.now() >= deadline) {
      for (const pid of new Set(pids)) {
        try { process.kill(pid, 'SIGKILL'); } catch { /* gone meanwhile */ }
      }
      await sleep(100);
      if (Date.now() >= deadline + 2000) break;
      continue;
    }
    await sleep(100);
  }
  await removeCgroupDirs(dirs);
}

/**
 * Set a VE's TCP buffer limit (memory.kmem.tcp.limit_in_bytes) on cgroup v1
 * before its engine starts it. The kernel charges a cgroup's TCP buffers only
 * once that limit is written, and only for sockets made after: runc 1.1
 * ignores the bundle's kernelTCP, and after the start the VE's init (which VE
 * root may replace) could already hold sockets that are never charged. So the
 * cgroup is made here, empty, with its limit; runc joins it as it is. A
 * kernel without the knob (no kmem accounting) is left alone: doctor says so.
 */
export async function presetTcpLimit(cgroupsPath: string, bytes: number, layout: CgroupLayout): Promise<void> {
  if (layout === 'v2') return;
  const dir = path.join('/sys/fs/cgroup/memory', cgroupsPath.replace(/^\/+/, ''));
  await fs.mkdir(dir, { recursive: true });
  try {
    await fs.writeFile(path.join(dir, 'memory.kmem.tcp.limit_in_bytes'), String(bytes));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
}
