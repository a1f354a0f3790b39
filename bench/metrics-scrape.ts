/**
 * Cost of one scrape of the metrics endpoint (issue 13) with N VEs running:
 * wall time seen by the scraper and CPU of the broker process (its own and
 * its waited-for children's: the `runc list` each scrape runs), beside the
 * peer: the same broker over an idle window of the same length (what it
 * spends anyway: pings, the VE monitor). Scrapes are 1.05 s apart so none
 * reuses the previous one's VE listing. Rounds interleaved; medians and
 * min–max. Run as root under the bench lock:
 *   flock /tmp/vesh-bench.lock ./node_modules/.bin/vite-node bench/metrics-scrape.ts -- [rounds] [N,N,...]
 */
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { Cleanup, freePort, startVeshServe } from '../test/helpers/ssh-harness.js';
import { makeVeTestEnv } from '../test/helpers/ve-env.js';
import { median, sleep } from './lib.js';

const rounds = Number(process.argv[2] ?? 3);
const counts = (process.argv[3] ?? '1,10,30').split(',').map(Number);
const PER_BATCH = 5;
const GAP_MS = 1_050;
const TICK_MS = 1000 / 100;

/** utime + stime + cutime + cstime of `pid`, ms. */
function cpuMs(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) * TICK_MS;
}

function scrape(port: number): Promise<{ ms: number; bytes: number }> {
  const t = performance.now();
  return new Promise((resolve, reject) => {
    http.get({ host: '127.0.0.1', port, path: '/metrics' }, (res) => {
      let n = 0;
      res.on('data', (d: Buffer) => { n += d.length; });
      res.on('end', () => resolve({ ms: performance.now() - t, bytes: n }));
    }).on('error', reject);
  });
}

const metricsPort = await freePort();
const env = await makeVeTestEnv({ template: 'busybox', extraYaml: `metrics: { listen: "127.0.0.1:${metricsPort}" }` });
const cleanup = new Cleanup();
try {
  const serve = await startVeshServe(cleanup, env.configFile);
  await serve.waitForLog((r) => r.event === 'metrics.listening', 30_000);
  const pid = serve.child.pid!;
  let running = 0;
  const fmt = (xs: number[], d = 1) => `${median(xs).toFixed(d)} (${Math.min(...xs).toFixed(d)}–${Math.max(...xs).toFixed(d)})`;
  console.log(`metrics scrape cost, ${rounds} interleaved rounds of ${PER_BATCH} scrapes ${GAP_MS} ms apart vs an idle window as long`);
  for (const n of counts) {
    for (; running < n; running++) {
      await env.ves.create(`m${running}`);
      await env.ves.start(`m${running}`);
    }
    const wall: number[] = [];
    const ours: number[] = [];
    const idle: number[] = [];
    let bytes = 0;
    await scrape(metricsPort);
    for (let r = 0; r < rounds; r++) {
      await sleep(GAP_MS);
      let c0 = cpuMs(pid);
      for (let i = 0; i < PER_BATCH; i++) {
        const s = await scrape(metricsPort);
        wall.push(s.ms);
        bytes = s.bytes;
        await sleep(GAP_MS);
      }
      ours.push((cpuMs(pid) - c0) / PER_BATCH);
      c0 = cpuMs(pid);
      await sleep(PER_BATCH * GAP_MS);
      idle.push((cpuMs(pid) - c0) / PER_BATCH);
    }
    console.log(`N=${n} VEs: scrape wall ${fmt(wall)} ms; broker CPU per ${GAP_MS} ms with a scrape ${fmt(ours)} ms, idle ${fmt(idle)} ms; body ${(bytes / 1024).toFixed(1)} KiB`);
  }
} finally {
  await cleanup.run().catch((err: unknown) => console.error(err));
  await env.cleanup();
}
