import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, keyAuthArgs, sshBaseArgs, startVeshServe } from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';
import { makeArena, type Arena } from '../adversarial/kit.js';

/**
 * Issue 13 "metrics": a real `vesh serve` with metrics.listen on 127.0.0.1,
 * scraped over HTTP while a real OpenSSH session runs in alice's VE; then
 * the same server restarted without the setting serves no endpoint.
 */

/** GET http://127.0.0.1:port/path: status and body. */
function httpGet(port: number, path = '/metrics', method = 'GET'): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path, method, timeout: 30_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => { body += d; });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('timeout', () => req.destroy(new Error('metrics request timed out')));
    req.on('error', reject);
    req.end();
  });
}

/** The value of one sample in Prometheus text (`name{labels}` exactly as printed), or undefined. */
function sample(text: string, series: string): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    if (line.slice(0, i) === series) return Number(line.slice(i + 1));
  }
  return undefined;
}

describe('metrics endpoint', () => {
  let arena: Arena;
  let metricsPort: number;
  let session: ChildProcess | null = null;

  beforeAll(async () => {
    metricsPort = await freePort();
    arena = await makeArena({ template: 'busybox', extraYaml: `metrics: { listen: "127.0.0.1:${metricsPort}" }` });
    await arena.serve.waitForLog((r) => r.event === 'metrics.listening', 30_000);
  }, 300_000);

  afterAll(async () => {
    session?.kill('SIGKILL');
    await arena?.cleanup.run();
  });

  it('reports an open OpenSSH session, the login, the running VE and its usage', async () => {
    const key = arena.keys.alice!;
    session = spawn('ssh', [...sshBaseArgs(arena.serve.port), ...keyAuthArgs(key), 'alice@127.0.0.1', 'echo started; exec sleep 120'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const child = session;
    arena.cleanup.add(() => { child.kill('SIGKILL'); });
    let out = '';
    child.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
    await waitFor('the session runs', async () => out.includes('started'), 120_000);

    const { status, body } = await httpGet(metricsPort);
    expect(status).toBe(200);
    expect(sample(body, 'vesh_sessions_open')).toBe(1);
    expect(sample(body, 'vesh_connections_open')).toBe(1);
    expect(sample(body, 'vesh_connections_accepted_total')).toBeGreaterThanOrEqual(1);
    expect(sample(body, 'vesh_logins_total{result="success",method="publickey"}')).toBeGreaterThanOrEqual(1);
    expect(sample(body, 'vesh_ves{state="running"}')).toBe(1);
    expect(sample(body, 'vesh_ve_memory_bytes{ve="alice"}')).toBeGreaterThan(0);
    expect(sample(body, 'vesh_ve_pids{ve="alice"}')).toBeGreaterThan(0);
    expect(sample(body, 'vesh_ve_cpu_seconds{ve="alice"}')).toBeGreaterThan(0);
    expect(sample(body, 'vesh_ve_disk_size_bytes{ve="alice"}')).toBeGreaterThan(0);
    expect(sample(body, 'vesh_ve_start_seconds_count')).toBe(1);
    expect(sample(body, 'vesh_penalties_in_force{scope="source"}')).toBe(0);
    expect(body).toMatch(/^vesh_broker_nodejs_eventloop_lag_seconds \d/m);
    // No series is labelled with the client's address.
    expect(body).not.toContain('127.0.0.1');

    // The session ends: the gauge follows what the broker saw.
    child.kill('SIGTERM');
    await waitFor('the session count drops', async () => sample((await httpGet(metricsPort)).body, 'vesh_sessions_open') === 0, 30_000);
    expect(sample((await httpGet(metricsPort)).body, 'vesh_connections_open')).toBe(0);
  }, 180_000);

  it('answers only GET /metrics', async () => {
    expect((await httpGet(metricsPort, '/')).status).toBe(404);
    expect((await httpGet(metricsPort, '/metrics', 'POST')).status).toBe(405);
  });

  it('serves no endpoint when metrics.listen is not set', async () => {
    await arena.serve.stop();
    const yaml = readFileSync(arena.env.configFile, 'utf8');
    writeFileSync(arena.env.configFile, yaml.replace(/^metrics:.*$/m, ''));
    const serve = await startVeshServe(arena.cleanup, arena.env.configFile);
    // Served again (alice's VE still runs), and nothing listens on the old metrics port.
    await waitFor('a worker serves', async () => serve.logs.some((r) => r.event === 'broker.worker_serving'), 30_000);
    const refused = await new Promise<string>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port: metricsPort });
      s.once('connect', () => { s.destroy(); resolve('connected'); });
      s.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? 'error'));
    });
    expect(refused).toBe('ECONNREFUSED');
    expect(serve.logs.some((r) => r.event === 'metrics.listening')).toBe(false);
  }, 120_000);
});
