import { readdirSync, readFileSync } from 'node:fs';
import net from 'node:net';

/** Helpers every benchmark shares: percentiles, a free loopback port, waiting for a listener. */

/** The p-th percentile (nearest rank) of `xs`. */
export const pct = (xs: number[], p: number): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
};

export const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A TCP port on 127.0.0.1 that nothing listens on right now (for a peer server's config). */
export function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

/** Resolve once something accepts connections on 127.0.0.1:`port`. */
export async function waitForPort(port: number, timeoutMs = 60_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    const ok = await new Promise<boolean>((r) => {
      const c = net.connect(port, '127.0.0.1', () => { c.destroy(); r(true); });
      c.on('error', () => r(false));
    });
    if (ok) return;
    await sleep(100);
  }
  throw new Error(`nothing listens on 127.0.0.1:${port}`);
}

/** The spread of per-round figures: median, lowest and highest. */
export const spread = (xs: number[]): { median: number; min: number; max: number } => ({
  median: median(xs), min: Math.min(...xs), max: Math.max(...xs),
});

const USER_HZ = 100; // /proc/PID/stat counts CPU time in 1/100 s on Linux

/** One process's CPU time while a sampler ran. */
export interface ProcessCpu { pid: number; ppid: number; comm: string; cpuS: number }

type ProcStat = Omit<ProcessCpu, 'pid'> & { startTicks: number };

function readProcStats(): Map<number, ProcStat> {
  const out = new Map<number, ProcStat>();
  for (const e of readdirSync('/proc')) {
    if (e.charCodeAt(0) < 48 || e.charCodeAt(0) > 57) continue;
    let stat: string;
    try { stat = readFileSync(`/proc/${e}/stat`, 'utf8'); } catch { continue; }
    const close = stat.lastIndexOf(')');
    const f = stat.slice(close + 2).split(' ');
    // after the comm: state(0) ppid(1) … utime(11) stime(12) … starttime(19)
    out.set(Number(e), { ppid: Number(f[1]), comm: stat.slice(stat.indexOf('(') + 1, close), cpuS: (Number(f[11]) + Number(f[12])) / USER_HZ, startTicks: Number(f[19]) });
  }
  return out;
}

/**
 * CPU seconds each process spent between start and stop(), every process on
 * the host (a transfer's client and server side are short-lived processes
 * in different trees: the client's ssh, a VE's sftp-server). /proc is read
 * every `intervalMs`, so a process that exits in between loses at most that
 * much of its time; one born meanwhile counts from zero. The reads cost the
 * calling process CPU: keep it off runs whose figures that would skew.
 */
export function sampleProcessCpu(intervalMs = 100): { stop(): ProcessCpu[] } {
  const first = readProcStats();
  const last = new Map(first);
  const take = () => {
    for (const [pid, p] of readProcStats()) last.set(pid, p);
  };
  const timer = setInterval(take, intervalMs);
  return {
    stop: () => {
      clearInterval(timer);
      take();
      const out: ProcessCpu[] = [];
      for (const [pid, p] of last) {
        const before = first.get(pid);
        // A pid reused by a new process (another start time) counts from
        // zero; not the comm, which a kernel worker changes with its work.
        const base = before && before.startTicks === p.startTicks ? before.cpuS : 0;
        out.push({ pid, ppid: p.ppid, comm: p.comm, cpuS: p.cpuS - base });
      }
      return out.sort((a, b) => b.cpuS - a.cpuS);
    },
  };
}

/** The host's CPU time so far, busy and all, from /proc/stat (every process counted, short-lived ones too). */
export function hostCpuTicks(): { busy: number; total: number } {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq steal (guest time is already inside user)
  const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
  return { busy: total - f[3]! - f[4]!, total };
}

/** Share of the host's CPU capacity that was busy between two hostCpuTicks() readings (0 to 1). */
export const busyShare = (a: { busy: number; total: number }, b: { busy: number; total: number }): number =>
  (b.busy - a.busy) / Math.max(1, b.total - a.total);
