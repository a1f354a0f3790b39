import http from 'node:http';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';
import { makeArena, runAttack as runAttackFrom, serverAlive, type Arena } from './kit.js';
import { LOGIN_METHODS } from '../../src/audit/metrics.js';

/**
 * Attack: blow up the metrics endpoint's label sets (memory in the broker
 * for good, a scrape that grows without end, a monitoring system choked)
 * through the one free-text field the broker counts logins by: the auth
 * method name. ssh2 itself drops a client that names a method it does not
 * know, so the real worker only ever relays the five standard names; a
 * compromised worker, though, can put any 32 characters into auth.failure's
 * `method` (request-table.ts), and the broker counts by it. The guard
 * (countLogin in src/audit/metrics.ts): only the methods vesh knows are
 * labels, any other name is "other".
 *
 * The attacker is test/adversarial/hostile-worker.mjs, steered from
 * 127.0.0.2 by an `ATTACK auth-methods` line (as compromised-worker.test.ts).
 */

const HOSTILE = path.join(path.dirname(new URL(import.meta.url).pathname), 'hostile-worker.mjs');
const ATTACKER = '127.0.0.2';

function scrape(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    http.get({ host: '127.0.0.1', port, path: '/metrics' }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => { body += d; });
      res.on('end', () => resolve(body));
    }).on('error', reject);
  });
}

describe('adversarial: metrics labels a worker chooses', () => {
  let arena: Arena;
  let metricsPort: number;

  beforeAll(async () => {
    metricsPort = await freePort();
    arena = await makeArena({
      template: 'busybox',
      extraYaml: `metrics: { listen: "127.0.0.1:${metricsPort}" }\nworkers: { count: 1 }`,
      serveEnv: { VESH_WORKER_SCRIPT: HOSTILE },
    });
    await arena.serve.waitForLog((r) => r.event === 'metrics.listening', 30_000);
    await arena.serve.waitForLog((r) => r.event === 'broker.worker_serving', 30_000);
  }, 300_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  it('made-up auth method names all count as "other", never as series of their own', async () => {
    const made = Array.from({ length: 15 }, (_, i) => `x-attack-${i}`);
    const steps = await runAttackFrom(arena.serve.port, ATTACKER, 'auth-methods', { user: 'alice', methods: made });
    // The broker took every one (answered, not refused) and logged it under the worker's name.
    expect(steps.filter((s) => s.step === 'auth.failure' && s.ok === true)).toHaveLength(made.length);
    await waitFor('the broker logged every failure', async () => arena.serve.logs.filter((r) => r.event === 'ssh.auth' && String(r.method).startsWith('x-attack-')).length === made.length, 10_000);

    const body = await scrape(metricsPort);
    expect(body).not.toContain('x-attack-');
    const methods = new Set([...body.matchAll(/^vesh_logins_total\{[^}]*method="([^"]*)"/gm)].map((m) => m[1]!));
    expect([...methods].filter((m) => m !== 'other' && !(LOGIN_METHODS as readonly string[]).includes(m))).toEqual([]);
    expect(/^vesh_logins_total\{result="failure",method="other"\} (\d+)$/m.exec(body)?.[1]).toBe(String(made.length));
    expect(serverAlive(arena)).toBe(true);
  }, 120_000);
});
