import { readFileSync } from 'node:fs';
import path from 'node:path';
import { Client } from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { keyAuthArgs, runProgram, sshBaseArgs } from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';
import { makeArena, serverAlive, type Arena } from './kit.js';

/**
 * "A dead client cannot hold its slot, its sessions and the host's
 * resources forever." Two attackers:
 *
 * - a client that logs in, starts output, and then never reads again, with
 *   its TCP connection open (its window fills, so it answers no keepalive):
 *   the worker's keepalives must cut it;
 * - the worker itself, taken over (test/adversarial/timeouts-off-worker.mjs:
 *   for connections from 127.0.0.2 it switches every granted timeout off and
 *   shows no notice): the broker's own limits must hold anyway, that is its
 *   TCP_INFO backstop for silent clients and timeouts.maxSessionTime.
 *
 * Keepalives here: 1 s x 2, so the worker cuts after ~3 s of silence and
 * the broker after ~5 s; polls allow much more and never time anything.
 */

const WORKER = path.join(path.dirname(new URL(import.meta.url).pathname), 'timeouts-off-worker.mjs');
const ATTACKER = '127.0.0.2';
const SLACK_MS = 20_000;

describe('adversarial: dead and silent clients', () => {
  let arena: Arena;

  beforeAll(async () => {
    arena = await makeArena({
      template: 'busybox',
      extraYaml: [
        'timeouts: { clientAliveInterval: 1s, clientAliveCountMax: 2 }',
        'sessions: { maxConnectionsPerAccount: 1 }',
        'workers: { count: 1 }',
      ].join('\n'),
      accounts: { alice: [], carol: ['timeouts: { maxSessionTime: 3s }'] },
      serveEnv: { VESH_WORKER_SCRIPT: WORKER },
    });
    await arena.expectServes('alice');
    await arena.expectServes('carol');
  }, 300_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  const logs = () => arena.serve.logs;
  const psIn = async (ve: string): Promise<string> => (await arena.sh(ve, 'ps -o args')).stdout;

  /**
   * Log in with ssh2's client from `source`, start `command` (which prints
   * without end), and once output flows stop reading the socket for good:
   * the TCP connection stays open, the client's receive window fills, and
   * nothing the server sends (keepalives included) is ever answered.
   */
  async function loginAndStopReading(source: string, command: string): Promise<{ conn: string; client: Client }> {
    const c = new Client();
    c.on('error', () => undefined);
    arena.cleanup.add(() => { c.destroy(); });
    const before = logs().length;
    await new Promise<void>((resolve, reject) => {
      c.once('ready', () => resolve());
      c.once('error', reject);
      c.connect({ host: '127.0.0.1', localAddress: source, port: arena.serve.port, username: 'alice', privateKey: readFileSync(arena.keys.alice!.file), readyTimeout: 60_000 });
    });
    await new Promise<void>((resolve, reject) => {
      c.exec(command, (err, stream) => {
        if (err) return reject(err);
        stream.on('error', () => undefined);
        stream.once('data', () => {
          (c as unknown as { _sock: { pause(): void } })._sock.pause();
          resolve();
        });
      });
    });
    // The broker's log lines may come in after the client saw output.
    const login = await arena.serve.waitForLog((r) => r.event === 'ssh.login' && r.account === 'alice' && r.source === source && logs().indexOf(r) >= before, SLACK_MS);
    return { conn: String(login.conn), client: c };
  }

  it('a client that stops reading (TCP open, window full) is cut by keepalives, and its session and slot are freed', async () => {
    const { conn } = await loginAndStopReading('127.0.0.1', 'yes honest-worker');
    await waitFor('the session in the VE', async () => (await psIn('alice')).includes('yes honest-worker'), 30_000);
    await waitFor('the worker to cut the silent client', async () => logs().some((r) => r.event === 'ssh.client_alive_timeout' && r.conn === conn), SLACK_MS);
    await waitFor('its session to be hung up', async () => !(await psIn('alice')).includes('yes honest-worker'), SLACK_MS);
    // The slot is back (sessions.maxConnectionsPerAccount 1): alice logs in again.
    await waitFor('alice served again', async () => (await arena.ssh('alice', ['echo', 'ok'])).stdout.trim() === 'ok', SLACK_MS);
    expect(logs().some((r) => r.event === 'ssh.client_silent_cut' && r.conn === conn)).toBe(false);
  }, 120_000);

  it('a worker that switched keepalives off cannot keep a silent client: the broker cuts it from what the kernel saw', async () => {
    const { conn } = await loginAndStopReading(ATTACKER, 'yes compromised-worker');
    await waitFor('the session in the VE', async () => (await psIn('alice')).includes('yes compromised-worker'), 30_000);
    await waitFor('the broker to cut the silent client', async () => logs().some((r) => r.event === 'ssh.client_silent_cut' && r.conn === conn), SLACK_MS);
    // The worker did not: its timers for this connection were off.
    expect(logs().some((r) => r.event === 'ssh.client_alive_timeout' && r.conn === conn)).toBe(false);
    await waitFor('its session to be hung up', async () => !(await psIn('alice')).includes('yes compromised-worker'), SLACK_MS);
    await waitFor('alice served again', async () => (await arena.ssh('alice', ['echo', 'ok'])).stdout.trim() === 'ok', SLACK_MS);
    expect(serverAlive(arena)).toBe(true);
  }, 120_000);

  it('a worker cannot keep a session past timeouts.maxSessionTime: the broker hangs it up', async () => {
    const r = await runProgram('ssh', [...sshBaseArgs(arena.serve.port, ['-b', ATTACKER]), ...keyAuthArgs(arena.keys.carol!), 'carol@127.0.0.1', 'sleep 1005'], { timeoutMs: 3_000 + SLACK_MS });
    expect(r.signal, 'ssh ended by itself, not by the test').toBeNull();
    await arena.serve.waitForLog((x) => x.event === 'ssh.session_time_limit' && x.account === 'carol', SLACK_MS);
    // The compromised worker kept the reason from the user, but not the session alive.
    expect(r.stderr).not.toContain('time limit');
    await waitFor('the session to be gone from the VE', async () => !(await psIn('carol')).includes('sleep 1005'), SLACK_MS);
  }, 60_000);
});
