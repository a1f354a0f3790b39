/**
 * VE density and start latency: start N VEs on the busybox template through
 * vesh (overlay + disk image + veth + firewall + cgroups), and N equivalent
 * bundles with raw `runc run -d` (same OCI config: namespaces, seccomp,
 * cgroup limits, overlay rootfs; no disk image, no veth), in the same run.
 * Prints start latency p50/p95 and, per VE, the MemAvailable drop, the
 * unreclaimable memory's growth and the kernel + own growth (see
 * settleAndMeasure) of each, and the vesh/raw ratios.
 *
 *   npx vite-node bench/ve-density.ts -- [--count 100] [--json]
 *   npx vite-node bench/ve-density.ts -- --pss 50 [--json]
 *
 * --pss N: page sharing made visible. One idle bash in each of N VEs on one
 * Debian template (each VE its own id range, the template shown to each
 * through an idmapped lower layer) against N idle bash processes on the
 * host, where binary and libraries are shared by construction; prints the
 * summed Pss (/proc/PID/smaps_rollup) of each group, and their Rss for
 * comparison (what the same processes would cost with nothing shared).
 *
 * Not a test: these machines are shared and noisy; read the figures side by side.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, promises as fs, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { silentLogger } from '../src/audit/logger.js';
import { buildOciConfig } from '../src/runtime/oci-bundle.js';
import { tuneHost } from '../src/system/host-tuning.js';
import { makeLayout } from '../src/system/layout.js';
import { cgroupDirs, removeCgroupDirs } from '../src/runtime/cgroups.js';
import { createTemplateStore, createVeManager } from '../src/ve/index.js';
import { removeInstance } from '../test/helpers/ve-env.js';
import { UNRECLAIMABLE, densityBenchConfig, ownProcessesKiB, readMeminfo } from './kernel-memory.js';

const { values: args } = parseArgs({
  options: {
    count: { type: 'string', default: '100' },
    json: { type: 'boolean', default: false },
    'settle-ms': { type: 'string', default: '3000' },
    /** Instead of the density run: page sharing, one idle bash in each of this many VEs on the Debian template against as many on the host. */
    pss: { type: 'string' },
  },
  allowPositionals: true,
});
const N = Number(args.count);
const settleMs = Number(args['settle-ms']);

function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** What the kernel cannot reclaim, in KiB: SUnreclaim, PageTables, KernelStack, AnonPages, Percpu, Shmem. */
function unreclaimableKiB(m: Record<string, number>): number {
  return UNRECLAIMABLE.reduce((sum, k) => sum + m[k]!, 0);
}

/**
 * available, unreclaimable: host-wide. kernelOwn: SUnreclaim + KernelStack +
 * Percpu host-wide plus the anonymous memory and page tables of the processes
 * in `cgroupParent` only: AnonPages host-wide moves by hundreds of MB with
 * other work on a shared host, which drowns the unreclaimable sum.
 */
interface MemReading { available: number; unreclaimable: number; kernelOwn: number }

async function settleAndMeasure(cgroupParent: string): Promise<MemReading> {
  await sleep(settleMs);
  // Average a few reads: all move with unrelated activity, MemAvailable by far the most.
  const out = { available: 0, unreclaimable: 0, kernelOwn: 0 };
  for (let i = 0; i < 5; i++) {
    const m = readMeminfo();
    out.available += m.MemAvailable! / 5;
    out.unreclaimable += unreclaimableKiB(m) / 5;
    out.kernelOwn += (m.SUnreclaim! + m.KernelStack! + m.Percpu!) / 5;
    await sleep(200);
  }
  out.kernelOwn += ownProcessesKiB([cgroupParent]);
  return out;
}

/** Per-VE MiB between two readings: MemAvailable's drop, the unreclaimable memory's growth, and kernel + own growth. */
function perVe(before: MemReading, after: MemReading, n: number): { memPerVeMiB: number; unreclaimablePerVeMiB: number; kernelOwnPerVeMiB: number } {
  return {
    memPerVeMiB: (before.available - after.available) / n / 1024,
    unreclaimablePerVeMiB: (after.unreclaimable - before.unreclaimable) / n / 1024,
    kernelOwnPerVeMiB: (after.kernelOwn - before.kernelOwn) / n / 1024,
  };
}

async function main(): Promise<void> {
  const { dir, tag, configFile, config } = densityBenchConfig('/var/tmp/vesh-bench-', 'vb');
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
    const rawBefore = await settleAndMeasure(`/vesh-bench-${tag}`);
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
    const rawAfter = await settleAndMeasure(`/vesh-bench-${tag}`);
    for (const id of rawIds.splice(0)) {
      spawnSync('runc', ['--root', rawRoot, 'delete', '--force', id]);
      spawnSync('umount', [path.join(rawDir, id, 'rootfs')]);
    }

    // ---- vesh
    for (let i = 0; i < N; i++) await ves.create(`ve${i}`);
    const veshBefore = await settleAndMeasure(layout.cgroupParent);
    const veshTimes: number[] = [];
    for (let i = 0; i < N; i++) {
      const t0 = performance.now();
      await ves.start(`ve${i}`);
      veshTimes.push(performance.now() - t0);
    }
    const veshAfter = await settleAndMeasure(layout.cgroupParent);
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
      const row = (name: string, r: typeof result.vesh) => console.log(`${name.padEnd(17)}${f(r.p50ms).padStart(7)} ms  ${f(r.p95ms).padStart(7)} ms  ${f(r.memPerVeMiB).padStart(8)} MiB  ${f(r.unreclaimablePerVeMiB).padStart(10)} MiB  ${f(r.kernelOwnPerVeMiB).padStart(10)} MiB`);
      console.log(`                 start p50   start p95   per VE: MemAvailable drop   unreclaimable   kernel + own`);
      row('vesh', result.vesh);
      row('raw runc run -d', result.rawRunc);
      const ratio = (k: 'memPerVeMiB' | 'unreclaimablePerVeMiB' | 'kernelOwnPerVeMiB') => (result.vesh[k] / result.rawRunc[k]).toFixed(2);
      console.log(`vesh/raw: MemAvailable ${ratio('memPerVeMiB')}, unreclaimable ${ratio('unreclaimablePerVeMiB')}, kernel + own ${ratio('kernelOwnPerVeMiB')}; running at once: ${running}`);
      console.log('(unreclaimable = SUnreclaim + PageTables + KernelStack + AnonPages + Percpu + Shmem host-wide; kernel + own = SUnreclaim + KernelStack + Percpu host-wide + the anon memory and page tables of the VEs\' own processes)');
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

/** Pss, Rss and their anonymous parts of one process, KiB (smaps_rollup). */
function smapsRollup(pid: number): { pss: number; rss: number; pssAnon: number } {
  const text = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const kib = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN);
  return { pss: kib('Pss'), rss: kib('Rss'), pssAnon: kib('Pss_Anon') };
}

function sumRollups(pids: number[]): { pss: number; rss: number; pssAnon: number } {
  const out = { pss: 0, rss: 0, pssAnon: 0 };
  for (const pid of pids) {
    const r = smapsRollup(pid);
    out.pss += r.pss; out.rss += r.rss; out.pssAnon += r.pssAnon;
  }
  return out;
}

/**
 * Wait for a bash to block (on its sleeping child): its Pss is then what
 * an idle shell holds (a process still loading its libraries reads lower).
 */
async function waitIdle(pid: number): Promise<void> {
  const end = Date.now() + 10_000;
  while (Date.now() < end) {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    if (/\) S /.test(stat) && readFileSync(`/proc/${pid}/wchan`, 'utf8') !== '0') return;
    await sleep(20);
  }
  throw new Error(`bash ${pid} did not settle into waiting on its stdin within 10 s`);
}

async function pssMain(n: number): Promise<void> {
  // A test instance (its own data dir, bridge, subnet) on the Debian template the tests share (built once per machine).
  const { makeVeTestEnv } = await import('../test/helpers/ve-env.js');
  const env = await makeVeTestEnv({ template: 'debian' });
  const hostShells: ChildProcess[] = [];
  // Waits on its child (an exec'd sleep) like a shell at rest; not on stdin:
  // Node closes a child's stdin pipe when that child (here, a detached runc exec) exits.
  const script = 'while :; do sleep 86400; done';
  try {
    const vePids: number[] = [];
    for (let i = 0; i < n; i++) {
      const ve = `p${i}`;
      await env.ves.create(ve);
      await env.ves.start(ve);
      const pidFile = path.join(env.dir, `bash-${i}.pid`);
      const cmd = await env.ves.execCommand(ve, {
        argv: ['/bin/bash', '--norc', '--noprofile', '-c', script, 'idle-bash'], uid: 0, gid: 0, tty: false, detach: true, pidFile,
        env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', HOME: '/root' },
      });
      // Detached: runc returns once bash runs.
      const child = spawn(cmd.file, cmd.args, { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
      const code = await new Promise<number | null>((r) => child.on('exit', r));
      if (code !== 0) throw new Error(`starting bash in VE ${ve} failed (exit ${code}): ${stderr.trim()}`);
      vePids.push(Number(readFileSync(pidFile, 'utf8').trim()));
    }
    const hostPids: number[] = [];
    for (let i = 0; i < n; i++) {
      const child = spawn('/bin/bash', ['--norc', '--noprofile', '-c', script, 'idle-bash'], { stdio: 'ignore', detached: true });
      hostShells.push(child);
      hostPids.push(child.pid!);
    }
    for (const pid of [...vePids, ...hostPids]) await waitIdle(pid);
    const ve = sumRollups(vePids);
    const host = sumRollups(hostPids);
    const result = { count: n, veBash: ve, hostBash: host, pssRatio: ve.pss / host.pss };
    if (args.json) {
      console.log(JSON.stringify(result, null, 2));
    } else {
      const m = (k: number) => `${(k / 1024).toFixed(2)} MiB`.padStart(10);
      console.log(`Page sharing: ${n} idle bash processes, one in each of ${n} VEs on one Debian template, against ${n} on the host (${new Date().toISOString()})`);
      console.log(`                         summed Pss   of it anon   summed Rss (nothing shared)`);
      console.log(`bash in ${String(n).padEnd(3)} VEs           ${m(ve.pss)}   ${m(ve.pssAnon)}   ${m(ve.rss)}`);
      console.log(`bash on the host         ${m(host.pss)}   ${m(host.pssAnon)}   ${m(host.rss)}`);
      console.log(`VEs/host summed Pss: ${result.pssRatio.toFixed(2)} (Pss per bash: ${(ve.pss / n).toFixed(0)} KiB in a VE, ${(host.pss / n).toFixed(0)} KiB on the host)`);
    }
  } finally {
    // The VEs' shells go with their VEs; each host shell leads a process group, killed with its sleep.
    for (const c of hostShells) {
      try { process.kill(-c.pid!, 'SIGKILL'); } catch { /* gone already */ }
    }
    await env.cleanup();
  }
}

if (args.pss !== undefined) await pssMain(Number(args.pss));
else await main();
