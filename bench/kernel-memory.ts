/** Readers of the kernel's memory figures that the VE benchmarks share (ve-kernel-cost.ts, ve-density.ts). */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, writeFileSync, type Dirent } from 'node:fs';
import path from 'node:path';
import { parseServerConfig, type ServerConfig } from '../src/config/server-config.js';

export const MEMINFO_FIELDS = ['SUnreclaim', 'SReclaimable', 'PageTables', 'KernelStack', 'AnonPages', 'Percpu', 'Shmem', 'MemAvailable'];
export const UNRECLAIMABLE = ['SUnreclaim', 'PageTables', 'KernelStack', 'AnonPages', 'Percpu', 'Shmem'];


/** Every pid in a v1 memory cgroup tree. */
function pidsUnder(dir: string): number[] {
  let out: number[] = [];
  let entries: Dirent[];
  try { entries = readdirSync(dir, { withFileTypes: true }); } catch { return []; }
  try { out = readFileSync(path.join(dir, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean).map(Number); } catch { /* gone meanwhile */ }
  for (const e of entries) if (e.isDirectory()) out = out.concat(pidsUnder(path.join(dir, e.name)));
  return out;
}

/**
 * Anonymous memory and page tables of the containers' own processes, KiB:
 * the part of the unreclaimable sum that other people's processes on a
 * shared host would otherwise drown (AnonPages moves by hundreds of MB).
 */
export function ownProcessesKiB(cgroupParents: string[]): number {
  let sum = 0;
  for (const parent of cgroupParents) {
    for (const pid of pidsUnder(path.join('/sys/fs/cgroup/memory', parent))) {
      try {
        const st = readFileSync(`/proc/${pid}/status`, 'utf8');
        for (const key of ['RssAnon', 'RssShmem', 'VmPTE']) sum += Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(st)?.[1] ?? 0);
      } catch { /* exited meanwhile */ }
    }
  }
  return sum;
}

export function readMeminfo(): Record<string, number> {
  const text = readFileSync('/proc/meminfo', 'utf8');
  const out: Record<string, number> = {};
  for (const key of MEMINFO_FIELDS) out[key] = Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0);
  return out;
}

/**
 * Bytes of live objects in each slab cache (active objects × object size), by
 * name. Not the slab pages: objects freed by the previous variant's removal
 * leave partly used slabs that the next variant fills without a page more,
 * so page counts (and SUnreclaim) undercount every variant but the first.
 */
export function readSlabs(): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of readFileSync('/proc/slabinfo', 'utf8').split('\n').slice(2)) {
    const f = line.split(/\s+/);
    if (f.length < 4) continue;
    out.set(f[0]!, Number(f[1]) * Number(f[3]));
  }
  return out;
}


/**
 * A throw-away vesh set-up for a density bench: a data dir under /var/tmp,
 * the busybox template's small limits, a bridge and /16 of its own (so two
 * benches, or a bench and the tests, never share one), outbound off.
 */
export function densityBenchConfig(dirPrefix: string, bridgePrefix: string): { dir: string; tag: string; configFile: string; config: ServerConfig } {
  const dir = mkdtempSync(dirPrefix);
  const tag = randomBytes(2).toString('hex');
  const subnet = `10.${200 + Math.floor(Math.random() * 40)}.0.0/16`;
  const yaml = [
    `dataDir: ${dir}/data`,
    `defaults: { template: busybox, limits: { memory: 64M, pids: 64, cpus: 0.5, disk: 64M } }`,
    `network: { bridge: ${bridgePrefix}${tag}, subnet: ${subnet}, outbound: false }`,
  ].join('\n');
  const configFile = path.join(dir, 'vesh.yaml');
  writeFileSync(configFile, yaml);
  return { dir, tag, configFile, config: parseServerConfig(configFile, yaml) };
}
