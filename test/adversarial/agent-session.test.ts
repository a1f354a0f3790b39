import { spawn, type ChildProcess } from 'node:child_process';
import os from 'node:os';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { keyAuthArgs, sshBaseArgs } from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';
import { makeArena, plantAttack, serverAlive, type Arena } from './kit.js';

/**
 * The broker asks a VE's session agent for a session itself
 * (src/broker/agent-session.ts), and VE root can answer in the agent's place.
 * What it sends must not reach a worker unchecked: a worker that took a FIFO
 * or a file for a terminal's master would fail on it (Node's tty stream
 * throws) and take every connection it holds with it. One worker serves
 * both accounts here, so that bob's session shares alice's worker.
 */
describe('adversarial: VE root answers for its session agent', () => {
  let arena: Arena;
  const held: ChildProcess[] = [];

  beforeAll(async () => {
    arena = await makeArena({ template: 'busybox', extraYaml: 'workers: { count: 1 }' });
    arena.cleanup.add(async () => {
      for (const c of held.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    });
    for (const a of ['alice', 'bob']) {
      const r = await arena.ssh(a, ['true']);
      expect(r.code, r.stderr).toBe(0);
    }
    await plantAttack(arena.env, 'alice', 'agent-liar');
  }, 300_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  /** bob's `echo up; sleep 120`, held open; resolves once it printed "up". */
  function holdBob(): Promise<ChildProcess> {
    const child = spawn('ssh', [...sshBaseArgs(arena.serve.port), ...keyAuthArgs(arena.keys.bob!), 'bob@127.0.0.1', 'echo up; sleep 120'], {
      stdio: ['pipe', 'pipe', 'pipe'], env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir() },
    });
    held.push(child);
    return new Promise((resolve, reject) => {
      let out = '';
      child.stdout!.on('data', (d: Buffer) => {
        out += d.toString();
        if (out.includes('up')) resolve(child);
      });
      child.on('close', (code) => reject(new Error(`bob's session ended before it was up (exit ${String(code)})`)));
    });
  }

  for (const bait of ['fifo', 'file']) {
    it(`refuses a terminal whose master the "agent" sends as a ${bait} of the VE; the worker and bob's session on it go on`, async () => {
      await waitFor('sessions started by alice\'s agent', async () => (await arena.ssh('alice', ['cat /proc/$PPID/comm'])).stdout.trim() === 'vesh-agent', 60_000);
      const bob = await holdBob();
      await arena.sh('alice', `rm -f /tmp/liar.out; nohup /usr/local/bin/agent-liar ${bait} 40 > /tmp/liar.out 2>&1 < /dev/null &`);
      let said = '';
      await waitFor('the liar to take the agent\'s place', async () => {
        said = (await arena.sh('alice', 'cat /tmp/liar.out 2>/dev/null; true')).stdout;
        return said.trim() !== '';
      }, 20_000);
      expect(said, 'VE root could not take the agent\'s place').toContain('impersonating');

      const r = await arena.ssh('alice', ['tty'], { extra: ['-tt'], timeoutMs: 30_000 });
      said = (await arena.sh('alice', 'cat /tmp/liar.out; true')).stdout;
      expect(said).toContain(`answered with a ${bait}`);
      expect(r.code).not.toBe(0);
      expect(`${r.stdout}${r.stderr}`).toMatch(/answered without a terminal/);

      // The worker that holds both connections did not fail: bob's session is still there.
      expect(bob.exitCode).toBeNull();
      expect(bob.signalCode).toBeNull();
      bob.kill('SIGKILL');
      expect(serverAlive(arena)).toBe(true);
      // The real agent goes on once the liar let it.
      await waitFor('alice served by her agent again', async () => (await arena.ssh('alice', ['cat /proc/$PPID/comm'])).stdout.trim() === 'vesh-agent', 60_000);
      await arena.expectServes('bob');
    }, 180_000);
  }
});
