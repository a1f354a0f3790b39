/**
 * VE density and start latency: start N VEs on the busybox template through
 * vesh (overlay + disk image + veth + firewall + cgroups), and N equivalent
 * bundles with raw `runc run -d` (same OCI config: namespaces, seccomp,
 * cgroup limits, overlay rootfs; no disk image, no veth), in the same run.
 * Prints start latency p50/p95 and the MemAvailable drop per VE of each.
 *
 *   npx vite-node bench/ve-density.ts -- [--count 100] [--json]
 *
 * Not a test: these machines are shared and noisy; read the figures side by side.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, promises as fs, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { silentLogger } from '../src/audit/logger.js';
import { parseServerConfig } from '../src/config/server-config.js';
import { buildOciConfig } from '../src/runtime/oci-bundle.js';
import { tuneHost } from '../src/system/host-tuning.js';
import { makeLayout } from '../src/system/layout.js';
import { cgroupDirs, removeCgroupDirs } from '../src/runtime/cgroups.js';
import { createTemplateStore, createVeManager } from '../src/ve/index.js';
import { removeInstance } from '../test/helpers/ve-env.js';

const { values: args } = parseArgs({
  options: { count: { type: 'string', default: '100' }, json: { type: 'boolean', default: false }, 'settle-ms': { type: 'string', default: '3000' } },
  allowPositionals: true,
});
const N = Number(args.count);
const settleMs = Number(args['settle-ms']);

function memAvailableKiB(): number {
  const m = /^MemAvailable:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'));
  return Number(m![1]);
}

function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** What the kernel cannot reclaim, in KiB: SUnreclaim, PageTables, KernelStack, AnonPages, Percpu, Shmem. */
function unreclaimableKiB(): number {
  const text = readFileSync('/proc/meminfo', 'utf8');
  let sum = 0;
  for (const key of ['SUnreclaim', 'PageTables', 'KernelStack', 'AnonPages', 'Percpu', 'Shmem']) {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text);
    sum += Number(m?.[1] ?? 0);
  }
  return sum;
}

interface MemReading { available: number; unreclaimable: number }

async function settleAndMeasure(): Promise<MemReading> {
  await sleep(settleMs);
  // Average a few reads: both move with unrelated activity, MemAvailable by far the most.
  let available = 0;
  let unreclaimable = 0;
  for (let i = 0; i < 5; i++) { available += memAvailableKiB(); unreclaimable += unreclaimableKiB(); await sleep(200); }
  return { available: available / 5, unreclaimable: unreclaimable / 5 };
}

/** Per-VE MiB between two readings: MemAvailable's drop and the unreclaimable memory's growth. */
function perVe(before: MemReading, after: MemReading, n: number): { memPerVeMiB: number; unreclaimablePerVeMiB: number } {
  return { memPerVeMiB: (before.available - after.available) / n / 1024, unreclaimablePerVeMiB: (after.unreclaimable - before.unreclaimable) / n / 1024 };
}

async function main(): Promise<void> {
  const dir = mkdtempSync('/var/tmp/vesh-bench-');
  const tag = randomBytes(2).toString('hex');
  const subnet = `10.${200 + Math.floor(Math.random() * 40)}.0.0/16`;
  const yaml = [
    `dataDir: ${dir}/data`,
    `defaults: { template: busybox, limits: { memory: 64M, pids: 64, cpus: 0.5, disk: 64M } }`,
    `network: { bridge: vb${tag}, subnet: ${subnet}, outbound: false }`,
  ].join('\n');
  const configFile = path.join(dir, 'vesh.yaml');
  writeFileSync(configFile, yaml);
  const config = parseServerConfig(configFile, yaml);
  const layout = makeLayout(config.dataDir);
  const logger = silentLogger();
  const ves = createVeManager(config, logger);
  const store = createTemplateStore(config, layout, logger);
  const template = await store.build('busybox', {});
  const rawRoot = path.join('/run/vesh-bench', tag);
  const rawDir = path.join(dir, 'raw');
  const rawIds: string[] = [];

  // Both sides need it past ~200 VEs (one session keyring per container, all owned by one host uid).
  await tuneHost(logger, { pidsPerVe: config.defaults.limits.pids, ptysPerVe: config.runtime.ptysPerVe });
  try {
    // ---- raw runc
    await fs.mkdir(rawDir, { recursive: true, mode: 0o711 });
    await fs.chmod(dir, 0o711);
    const rawBefore = await settleAndMeasure();
    const rawTimes: number[] = [];
    for (let i = 0; i < N; i++) {
      const id = `raw${i}`;
      const b = path.join(rawDir, id);
      for (const d of ['upper', 'work', 'rootfs']) await fs.mkdir(path.join(b, d), { recursive: true, mode: 0o711 });
      await fs.mkdir(path.join(b, 'ctl'));
      await fs.chown(path.join(b, 'upper'), config.runtime.idmapBase, config.runtime.idmapBase);
      const t0 = performance.now();
      execFileSync('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${template.rootfs},upperdir=${b}/upper,workdir=${b}/work`, `${b}/rootfs`]);
      const oci = buildOciConfig({
        name: id, hostname: id, rootfs: `${b}/rootfs`, init: template.init, limits: config.defaults.limits,
        cgroupsPath: `/vesh-bench-${tag}/${id}`, idmap: { base: config.runtime.idmapBase, size: config.runtime.idmapSize }, ctlDir: `${b}/ctl`,
      });
      writeFileSync(path.join(b, 'config.json'), JSON.stringify(oci));
      // The container's init inherits runc's stdio: a pipe would never reach EOF, so a file.
      const log = openSync(path.join(b, 'console.log'), 'w');
      const res = spawnSync('runc', ['--root', rawRoot, 'run', '-d', '--bundle', b, id], { stdio: ['ignore', log, log] });
      closeSync(log);
      if (res.status !== 0) throw new Error(`raw runc run ${id} failed: ${readFileSync(path.join(b, 'console.log'), 'utf8')}`);
      rawTimes.push(performance.now() - t0);
      rawIds.push(id);
    }
    const rawAfter = await settleAndMeasure();
    for (const id of rawIds.splice(0)) {
      spawnSync('runc', ['--root', rawRoot, 'delete', '--force', id]);
      spawnSync('umount', [path.join(rawDir, id, 'rootfs')]);
    }

    // ---- vesh
    for (let i = 0; i < N; i++) await ves.create(`ve${i}`);
    const veshBefore = await settleAndMeasure();
    const veshTimes: number[] = [];
    for (let i = 0; i < N; i++) {
      const t0 = performance.now();
      await ves.start(`ve${i}`);
      veshTimes.push(performance.now() - t0);
    }
    const veshAfter = await settleAndMeasure();
    const running = (await ves.list()).filter((v) => v.state === 'running').length;

    const result = {
      count: N,
      runningAtOnce: running,
      vesh: { p50ms: percentile(veshTimes, 50), p95ms: percentile(veshTimes, 95), ...perVe(veshBefore, veshAfter, N) },
      rawRunc: { p50ms: percentile(rawTimes, 50), p95ms: percentile(rawTimes, 95), ...perVe(rawBefore, rawAfter, N) },
    };
    if (args.json) {
      console.log(JSON.stringify(result, null, 2));
    } else {
      const f = (x: number) => x.toFixed(2);
      console.log(`VE density, ${N} VEs on the busybox template (${new Date().toISOString()})`);
      console.log(`                 start p50   start p95   MemAvailable drop per VE   unreclaimable growth per VE`);
      console.log(`vesh             ${f(result.vesh.p50ms).padStart(7)} ms  ${f(result.vesh.p95ms).padStart(7)} ms  ${f(result.vesh.memPerVeMiB)} MiB                   ${f(result.vesh.unreclaimablePerVeMiB)} MiB`);
      console.log(`raw runc run -d  ${f(result.rawRunc.p50ms).padStart(7)} ms  ${f(result.rawRunc.p95ms).padStart(7)} ms  ${f(result.rawRunc.memPerVeMiB)} MiB                   ${f(result.rawRunc.unreclaimablePerVeMiB)} MiB`);
      console.log(`vesh/raw memory ratio: MemAvailable ${(result.vesh.memPerVeMiB / result.rawRunc.memPerVeMiB).toFixed(2)}, unreclaimable ${(result.vesh.unreclaimablePerVeMiB / result.rawRunc.unreclaimablePerVeMiB).toFixed(2)}; running at once: ${running}`);
    }
  } finally {
    for (const id of rawIds) {
      spawnSync('runc', ['--root', rawRoot, 'delete', '--force', id]);
      spawnSync('umount', ['-l', path.join(rawDir, id, 'rootfs')]);
    }
    await removeCgroupDirs(cgroupDirs(`/vesh-bench-${tag}`));
    await fs.rm(rawRoot, { recursive: true, force: true });
    await fs.rmdir(path.dirname(rawRoot)).catch(() => undefined); // only when no other run uses it
    await removeInstance(config, logger);
    await fs.rm(dir, { recursive: true, force: true }).catch((err: Error) => console.error(`could not remove ${dir}: ${err.message}`));
  }
}

await main();
