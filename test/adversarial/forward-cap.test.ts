import type { Client } from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { waitFor } from '../helpers/ve-env.js';
import { makeArena, serverAlive, ssh2Login, type Arena } from './kit.js';

/**
 * Every SSH connection that forwards ports gets a helper in its VE and a
 * relay on the host: a tenant opening forwarding connections without end
 * would hold host processes and buffers without end. The per-account cap
 * (sessions.maxForwardHelpersPerAccount, set to 2 here) refuses the next
 * one, frees its slot when a connection closes, and leaves other accounts
 * alone.
 */
describe('adversarial: forwarding connections past the per-account cap', () => {
  let arena: Arena;

  beforeAll(async () => {
    arena = await makeArena({ template: 'busybox', extraYaml: 'sessions: { maxForwardHelpersPerAccount: 2 }' });
    // A web server on each VE's own loopback, the target of the forwards.
    for (const ve of ['alice', 'bob']) {
      const r = await arena.ssh(ve, ['mkdir -p /tmp/www && echo "page of $(hostname)" > /tmp/www/index.html && httpd -p 127.0.0.1:8080 -h /tmp/www && echo up']);
      expect(r.stdout, r.stderr).toContain('up');
    }
  }, 300_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  /** A direct-tcpip channel (ssh -L's) to the VE's 127.0.0.1:8080: the page, or the refusal's message. */
  function fetchThroughForward(c: Client): Promise<{ ok: true; body: string } | { ok: false; reason: string }> {
    return new Promise((resolve) => {
      c.forwardOut('127.0.0.1', 40000, '127.0.0.1', 8080, (err, stream) => {
        if (err) return resolve({ ok: false, reason: err.message });
        let body = '';
        stream.on('data', (d: Buffer) => { body += d.toString(); });
        stream.on('error', () => undefined);
        stream.on('close', () => resolve({ ok: true, body }));
        stream.end('GET /index.html HTTP/1.0\r\n\r\n');
      });
    });
  }

  const refusals = () => arena.serve.logs.filter((r) => r.event === 'ssh.limit_reached' && r.account === 'alice' && r.kind === 'forwardHelper');

  it('refuses alice a third forwarding connection, serves bob, and frees the slot when one closes', async () => {
    const first = await ssh2Login(arena, 'alice');
    const second = await ssh2Login(arena, 'alice');
    for (const c of [first, second]) {
      const r = await fetchThroughForward(c);
      expect(r.ok && r.body, JSON.stringify(r)).toContain('page of alice');
    }
    const third = await ssh2Login(arena, 'alice');
    const refused = await fetchThroughForward(third);
    expect(refused.ok, 'a third forwarding connection got a helper past the cap of 2').toBe(false);
    await waitFor('the refusal in the log', async () => refusals().length > 0, 10_000);
    expect(refusals()[0]).toMatchObject({ setting: 'sessions.maxForwardHelpersPerAccount', limit: 2 });
    // The connections that hold a helper keep working.
    const again = await fetchThroughForward(first);
    expect(again.ok && again.body).toContain('page of alice');
    // Another account is not held back by alice's cap.
    const bob = await ssh2Login(arena, 'bob');
    const bobs = await fetchThroughForward(bob);
    expect(bobs.ok && bobs.body, JSON.stringify(bobs)).toContain('page of bob');
    // Closing one of alice's forwarding connections gives its slot back.
    first.end();
    const fourth = await ssh2Login(arena, 'alice');
    await waitFor('a freed forwarding slot', async () => {
      const r = await fetchThroughForward(fourth);
      return r.ok && r.body.includes('page of alice');
    }, 30_000);
    expect(serverAlive(arena)).toBe(true);
  }, 180_000);
});
