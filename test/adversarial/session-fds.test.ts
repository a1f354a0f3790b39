import { readdirSync } from 'node:fs';
import type { Client } from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeArena, serverAlive, ssh2Login, type Arena } from './kit.js';

/**
 * A closed session must give back the server's descriptors even when a
 * process in the VE keeps its stdout and stderr: otherwise one tenant, with
 * `cmd & exit` in a loop on one connection, walks the server to EMFILE and
 * every tenant loses accept, spawn and runc (found by the red-team round,
 * not in the review).
 */
describe('adversarial: sessions closed by the client free the server descriptors a VE process still holds', () => {
  let arena: Arena;

  beforeAll(async () => {
    arena = await makeArena({ template: 'busybox' });
  });

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  const serverFds = (): number => readdirSync(`/proc/${arena.serve.child.pid}/fd`).length;

  /** Run `cmd` on an exec channel, wait for `mark` on its stdout, then close the channel from the client's side. */
  function execAndClose(c: Client, cmd: string, mark: string): Promise<void> {
    return new Promise((resolve, reject) => {
      c.exec(cmd, (err, stream) => {
        if (err) return reject(err);
        let out = '';
        stream.stderr.resume();
        stream.on('data', (d: Buffer) => {
          out += d.toString();
          if (out.includes(mark)) {
            stream.close();
            resolve();
          }
        });
        stream.on('error', () => undefined);
      });
    });
  }

  it('frees them within the hang-up grace when background jobs keep the stdio of twenty closed sessions on one connection', async () => {
    const c = await ssh2Login(arena, 'alice');
    // The session agent takes over from runc exec a moment after the first session.
    await execAndClose(c, 'echo warm', 'warm');
    await new Promise((r) => setTimeout(r, 2_000));
    const before = serverFds();
    for (let i = 0; i < 20; i++) {
      // The background job, in a session of its own so no hang-up reaches it,
      // keeps the session's stdout and stderr open for ten minutes.
      await execAndClose(c, 'setsid sleep 600 & echo started', 'started');
    }
    // Hang-up grace (5 s) plus slack for a loaded machine.
    const deadline = Date.now() + 30_000;
    let after = serverFds();
    while (after > before + 6 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500));
      after = serverFds();
    }
    // Twenty held sessions would be 40+ descriptors; a few may be in flight.
    expect(after).toBeLessThanOrEqual(before + 6);
    // The jobs themselves are the VE's business and still run there.
    const jobs = await arena.sh('alice', 'ps -o args | grep -c "^sleep 600" || true');
    expect(Number(jobs.stdout.trim())).toBeGreaterThanOrEqual(20);
    expect(serverAlive(arena)).toBe(true);
    await arena.expectServes('bob');
  });
});
