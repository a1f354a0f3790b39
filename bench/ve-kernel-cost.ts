/**
 * Where a VE's kernel memory goes: start N containers of one variant, let
 * them settle, and print per-container deltas of /proc/meminfo and the
 * largest /proc/slabinfo growths; then remove them and go on with the next
 * variant. Variants build up raw `runc run -d` (the same OCI bundle vesh
 * writes, overlay rootfs on the host's disk) one component at a time, so
 * each component's cost is the difference between two rows of one run:
 *
 *   raw          overlay on the template (mount -t overlay), upper on the host disk, `runc run -d`
 *   +idmap       the overlay as vesh mounts it: the template through an idmapped lower layer
 *   +disk        as +idmap, and the upper layer on the VE's ext4 disk image (loop device)
 *   +veth        vesh's net hook: veth pair on the bridge, address and route in the VE
 *   +vetha, +vethb  as +veth, with the net hook of the setup helper given by --helper-a or --helper-b
 *   +diska, +diskb  as +disk, mounted by the setup helper given by --helper-a or --helper-b
 *   +tcp         the VE's TCP buffer limit preset in its memory cgroup (cgroups.ts)
 *   vesh         the whole start through VeManager (all of the above, plus its firewall element)
 *
 * Variants are joined with commas and components with '+', e.g.
 *   npx vite-node bench/ve-kernel-cost.ts -- --count 40 --variants raw,raw+disk,raw+veth,vesh --rounds 2
 * Rounds repeat the whole list (interleaved), and the table shows medians.
 *
 * Columns: "kernel+own" is SUnreclaim + KernelStack + Percpu host-wide plus
 * the anonymous memory and page tables of the containers' own processes
 * (read from their cgroups): on a host shared with other work, AnonPages
 * moves by hundreds of MB with others' processes and makes the full
 * "unreclaimable" sum (SUnreclaim + PageTables + KernelStack + AnonPages +
 * Percpu + Shmem) meaningless at these counts; both are printed. "slab
 * objects" is the growth of live slab objects in all caches (see readSlabs).
 *
 * Not a test. Hold /tmp/vesh-bench.lock while it runs.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { promises as fs, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { silentLogger } from '../src/audit/logger.js';
import { buildOciConfig } from '../src/runtime/oci-bundle.js';
import { intToIp } from '../src/net/ipv4.js';
import { cgroupDirs, detectCgroupLayout, presetTcpLimit, removeCgroupDirs } from '../src/runtime/cgroups.js';
import { tuneHost } from '../src/system/host-tuning.js';
import { makeLayout } from '../src/system/layout.js';
import { createDiskImage, unmountAll, veMountCommand, vePaths } from '../src/ve/storage.js';
import { createTemplateStore, createVeManager, createVeNetwork } from '../src/ve/index.js';
import { removeInstance } from '../test/helpers/ve-env.js';
import { MEMINFO_FIELDS, UNRECLAIMABLE, densityBenchConfig, ownProcessesKiB, readMeminfo, readSlabs } from './kernel-memory.js';
import { median, sleep } from './lib.js';

const { values: args } = parseArgs({
  options: {
    count: { type: 'string', default: '40' },
    variants: { type: 'string', default: 'raw,raw+idmap,raw+disk,raw+veth,vesh' },
    rounds: { type: 'string', default: '1' },
    'settle-ms': { type: 'string', default: '4000' },
    top: { type: 'string', default: '14' },
    json: { type: 'boolean', default: false },
    /** Setup helpers (vesh-setup builds) that the vetha/diska and vethb/diskb components use: one change measured against another in one run. */
    'helper-a': { type: 'string' },
    'helper-b': { type: 'string' },
  },
  allowPositionals: true,
});
const N = Number(args.count);
const ROUNDS = Number(args.rounds);
const SETTLE_MS = Number(args['settle-ms']);
const VARIANTS = args.variants!.split(',').map((v) => v.trim()).filter(Boolean);
const KNOWN = new Set(['raw', 'idmap', 'disk', 'diska', 'diskb', 'veth', 'vetha', 'vethb', 'tcp']);
for (const v of VARIANTS) {
  if (v !== 'vesh' && !v.split('+').every((c) => KNOWN.has(c))) throw new Error(`unknown variant "${v}": use vesh or raw joined with +idmap, +disk[a|b], +veth[a|b], +tcp`);
}

interface Snapshot { meminfo: Record<string, number>; slabs: Map<string, number>; tasks: number; mounts: number; own: number }

async function snapshot(cgroupParents: string[]): Promise<Snapshot> {
  await sleep(SETTLE_MS);
  // Averages of five reads 200 ms apart: all of these move a little with unrelated activity.
  const acc: Record<string, number> = {};
  const slabs = new Map<string, number>();
  const reads = 5;
  for (let i = 0; i < reads; i++) {
    for (const [k, v] of Object.entries(readMeminfo())) acc[k] = (acc[k] ?? 0) + v / reads;
    for (const [k, v] of readSlabs()) slabs.set(k, (slabs.get(k) ?? 0) + v / reads);
    await sleep(200);
  }
  const tasks = Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[3]!.split('/')[1]);
  const mounts = readFileSync('/proc/self/mountinfo', 'utf8').split('\n').length - 1;
  return { meminfo: acc, slabs, tasks, mounts, own: ownProcessesKiB(cgroupParents) };
}

interface Delta { unreclaimable: number; kernelOwn: number; slabObjects: number; memAvailable: number; fields: Record<string, number>; slabs: Map<string, number>; tasks: number; mounts: number }

/** Per-container growth between two snapshots, KiB (tasks and mounts: counts). */
function delta(a: Snapshot, b: Snapshot, n: number): Delta {
  const fields: Record<string, number> = {};
  for (const k of MEMINFO_FIELDS) fields[k] = (b.meminfo[k]! - a.meminfo[k]!) / n;
  const slabs = new Map<string, number>();
  for (const [k, v] of b.slabs) slabs.set(k, (v - (a.slabs.get(k) ?? 0)) / n / 1024);
  return {
    unreclaimable: UNRECLAIMABLE.reduce((s, k) => s + fields[k]!, 0),
    // Kernel-only fields host-wide, plus the containers' own processes' anonymous memory and page tables.
    slabObjects: [...slabs.values()].reduce((x, y) => x + y, 0),
    kernelOwn: fields.SUnreclaim! + fields.KernelStack! + fields.Percpu! + (b.own - a.own) / n,
    memAvailable: -fields.MemAvailable!,
    fields,
    slabs,
    tasks: (b.tasks - a.tasks) / n,
    mounts: (b.mounts - a.mounts) / n,
  };
}

async function main(): Promise<void> {
  const { dir, tag, configFile, config } = densityBenchConfig('/var/tmp/vesh-kcost-', 'vk');
  await fs.chmod(dir, 0o711);
  const layout = makeLayout(config.dataDir);
  const logger = silentLogger();
  const ves = createVeManager(config, logger);
  const network = createVeNetwork(config, layout, logger);
  const template = await createTemplateStore(config, layout, logger).build('busybox', {});
  const cgLayout = detectCgroupLayout();
  const rawRoot = path.join('/run/vesh-kcost', tag);
  const rawDir = path.join(dir, 'raw');
  await fs.mkdir(rawDir, { recursive: true, mode: 0o711 });
  const rootId = config.runtime.idmapBase;
  const cgParent = `/vesh-kcost-${tag}`;
  const live: Array<{ id: string; paths: ReturnType<typeof vePaths> }> = [];
  await tuneHost(logger, { pidsPerVe: config.defaults.limits.pids, ptysPerVe: config.runtime.ptysPerVe });

  const removeRaw = async () => {
    for (const c of live.splice(0)) {
      spawnSync('runc', ['--root', rawRoot, 'delete', '--force', c.id]);
      await unmountAll(c.paths).catch(() => undefined);
      await removeCgroupDirs(cgroupDirs(`${cgParent}/${c.id}`, cgLayout));
      await fs.rm(c.paths.dir, { recursive: true, force: true });
    }
  };

  /** Start N containers of one raw variant; their number is `seq` so names never repeat within the run. */
  const startRaw = async (components: Set<string>, seq: number) => {
    const veth = ['veth', 'vetha', 'vethb'].find((c) => components.has(c));
    const disk = ['disk', 'diska', 'diskb'].find((c) => components.has(c));
    const helperFor = (c: string | undefined) => {
      if (!c || !/[ab]$/.test(c)) return undefined;
      const helper = args[`helper-${c.slice(-1)}` as 'helper-a' | 'helper-b'];
      if (!helper) throw new Error(`${c} needs --helper-${c.slice(-1)} PATH (a vesh-setup build)`);
      return helper;
    };
    const hookPath = helperFor(veth);
    const mountHelper = helperFor(disk);
    if (veth) await network.ensureHost(async () => []);
    for (let i = 0; i < N; i++) {
      const id = `k${seq}x${i}`;
      const p = vePaths(path.join(rawDir, id));
      await fs.mkdir(p.dir, { recursive: true, mode: 0o711 });
      live.push({ id, paths: p });
      // Each container its own id range, as vesh gives each VE (slot 0 is the old shared one).
      const ids = { base: rootId + (1 + i) * config.runtime.idmapSize, size: config.runtime.idmapSize };
      if (disk) await createDiskImage(p, config.defaults.limits.disk, ids.base);
      if (disk || components.has('idmap')) {
        const cmd = await veMountCommand(p, { hasImage: !!disk, lowerdir: template.rootfs, ids, templateBase: template.idmapBase });
        execFileSync(mountHelper ?? cmd.file, cmd.args);
      } else {
        for (const d of [p.private, p.upper, p.work, p.ctl, p.rootfs]) await fs.mkdir(d, { recursive: true, mode: 0o711 });
        for (const d of [p.upper, p.ctl]) await fs.chown(d, ids.base, ids.base);
        execFileSync('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${template.rootfs},upperdir=${p.upper},workdir=${p.work}`, p.rootfs]);
      }
      const hooks = [];
      if (veth) {
        const ip = intToIp(network.subnet.network + 2 + i);
        const ident = { name: id, address: ip, hostVeth: network.vethNameFor(ip) };
        await network.allow(ident);
        hooks.push({ ...network.attachHook(ident), ...(hookPath ? { path: hookPath } : {}) });
      }
      const cgroupsPath = `${cgParent}/${id}`;
      const oci = buildOciConfig({
        name: id, hostname: id, rootfs: p.rootfs, init: template.init, limits: config.defaults.limits, cgroupsPath,
        idmap: ids, ctlDir: p.ctl, createRuntimeHooks: hooks,
        ptys: config.runtime.ptysPerVe, cgroupLayout: cgLayout,
      });
      writeFileSync(path.join(p.dir, 'config.json'), JSON.stringify(oci));
      if (components.has('tcp')) await presetTcpLimit(cgroupsPath, config.defaults.limits.memory, cgLayout);
      const log = await fs.open(path.join(p.dir, 'console.log'), 'w');
      const res = spawnSync('runc', ['--root', rawRoot, 'run', '-d', '--bundle', p.dir, id], { stdio: ['ignore', log.fd, log.fd] });
      await log.close();
      if (res.status !== 0) throw new Error(`runc run ${id} failed: ${readFileSync(path.join(p.dir, 'console.log'), 'utf8')}`);
    }
  };

  const results = new Map<string, Delta[]>();
  let seq = 0;
  try {
    for (let i = 0; i < N; i++) await ves.create(`ve${i}`);
    for (let round = 0; round < ROUNDS; round++) {
      for (const variant of VARIANTS) {
        const parents = [cgParent, layout.cgroupParent];
        const before = await snapshot(parents);
        if (variant === 'vesh') {
          for (let i = 0; i < N; i++) await ves.start(`ve${i}`);
        } else {
          await startRaw(new Set(variant.split('+')), seq++);
        }
        const after = await snapshot(parents);
        const d = delta(before, after, N);
        results.set(variant, [...(results.get(variant) ?? []), d]);
        if (variant === 'vesh') {
          for (let i = 0; i < N; i++) await ves.stop(`ve${i}`, { kill: true });
        } else {
          await removeRaw();
        }
        process.stderr.write(`round ${round + 1} ${variant}: unreclaimable ${d.unreclaimable.toFixed(0)} KiB/container, kernel+own ${d.kernelOwn.toFixed(0)}\n`);
      }
    }
    print(results);
  } finally {
    await removeRaw();
    await removeCgroupDirs([...cgroupDirs(cgParent, cgLayout)]);
    await fs.rm(rawRoot, { recursive: true, force: true });
    await fs.rmdir(path.dirname(rawRoot)).catch(() => undefined);
    await removeInstance(config, logger);
    await fs.rm(dir, { recursive: true, force: true }).catch((err: Error) => console.error(`could not remove ${dir}: ${err.message}`));
  }
}

function print(results: Map<string, Delta[]>): void {
  const med = (ds: Delta[], f: (d: Delta) => number) => median(ds.map(f));
  const spread = (ds: Delta[], f: (d: Delta) => number) => {
    const xs = ds.map(f);
    return `${Math.min(...xs).toFixed(0)}..${Math.max(...xs).toFixed(0)}`;
  };
  if (args.json) {
    const out: Record<string, unknown> = {};
    for (const [v, ds] of results) {
      out[v] = { kernelOwnKiB: med(ds, (d) => d.kernelOwn), slabObjectsKiB: med(ds, (d) => d.slabObjects), unreclaimableKiB: med(ds, (d) => d.unreclaimable), memAvailableKiB: med(ds, (d) => d.memAvailable), fields: Object.fromEntries(MEMINFO_FIELDS.map((k) => [k, med(ds, (d) => d.fields[k]!)])), tasks: med(ds, (d) => d.tasks), mounts: med(ds, (d) => d.mounts) };
    }
    console.log(JSON.stringify(out, null, 2));
    return;
  }
  console.log(`Kernel cost per container, ${N} containers per variant, ${ROUNDS} round(s), medians (KiB; min..max over rounds) — ${new Date().toISOString()}`);
  const cols = ['kernel+own', 'slab objects', 'unreclaimable', 'MemAvailable drop', ...UNRECLAIMABLE, 'tasks', 'host mounts'];
  console.log(['variant'.padEnd(16), ...cols.map((c, i) => c.padStart(i < 3 ? 20 : 12))].join(''));
  for (const [v, ds] of results) {
    const cells = [
      `${med(ds, (d) => d.kernelOwn).toFixed(0)}${ROUNDS > 1 ? ` (${spread(ds, (d) => d.kernelOwn)})` : ''}`,
      med(ds, (d) => d.slabObjects).toFixed(0),
      `${med(ds, (d) => d.unreclaimable).toFixed(0)}${ROUNDS > 1 ? ` (${spread(ds, (d) => d.unreclaimable)})` : ''}`,
      med(ds, (d) => d.memAvailable).toFixed(0),
      ...UNRECLAIMABLE.map((k) => med(ds, (d) => d.fields[k]!).toFixed(1)),
      med(ds, (d) => d.tasks).toFixed(2),
      med(ds, (d) => d.mounts).toFixed(2),
    ];
    console.log([v.padEnd(16), ...cells.map((c, i) => c.padStart(i < 3 ? 20 : 12))].join(''));
  }
  const top = Number(args.top);
  for (const [v, ds] of results) {
    const names = new Set(ds.flatMap((d) => [...d.slabs.keys()]));
    const rows = [...names].map((n) => [n, med(ds, (d) => d.slabs.get(n) ?? 0)] as const).sort((a, b) => b[1] - a[1]).slice(0, top);
    console.log(`\n${v}: largest slab growths per container (KiB): ${rows.map(([n, k]) => `${n} ${k.toFixed(1)}`).join(', ')}`);
  }
}

await main();
