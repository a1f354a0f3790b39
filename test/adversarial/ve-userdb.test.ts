import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serverBugRecords } from '../helpers/ssh-harness.js';
import { makeArena, plantAttack, serverAlive, type Arena } from './kit.js';

/**
 * The host reads a VE's /etc/passwd and /etc/group at login, by running
 * `cat` inside the VE through the engine. VE root decides what that read
 * returns and whether it ever ends: an endless stream (H3), a read that
 * never finishes (H3), a field no process can be started with (L10). Each
 * must end that login with a clear message, and nothing else: the server
 * stays small and alive, and other tenants are served. (runc itself reads
 * the VE's passwd before it starts `cat`, and stops at a line over 64 KiB:
 * /dev/zero as /etc/passwd is refused there, so the endless stream comes
 * from a /bin/sh VE root replaced.)
 */

/** Past this the server is taken to be buffering without bound: it is killed so the host never runs short. */
const RSS_KILL_BYTES = 500 * 1024 * 1024;

function rssBytes(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

describe('the host-side passwd lookup: capped, bounded in time, strict', () => {
  let arena: Arena;

  beforeAll(async () => {
    // One attacker per attack, each in her own VE: runc itself reads the VE's
    // passwd for every exec into it, so a VE with a broken one cannot be
    // repaired from the host, and the next attack needs a good one.
    arena = await makeArena({ template: 'busybox', accounts: { alice: [], bob: [], carol: [], dave: [], erin: [], frank: [] } });
    for (const a of ['alice', 'carol', 'dave', 'erin', 'frank']) {
      const r = await arena.ssh(a, ['true']);
      expect(r.code, r.stderr).toBe(0);
    }
  });

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  /**
   * Log alice in while watching the server's memory; a server that grows past
   * RSS_KILL_BYTES is killed (and the growth reported) so the test stays
   * harmless against code that buffers without end.
   */
  async function loginWatchingMemory(account: string, timeoutMs: number) {
    const pid = arena.serve.child.pid!;
    const before = rssBytes(pid);
    let peak = before;
    let killed = false;
    const watch = setInterval(() => {
      try {
        peak = Math.max(peak, rssBytes(pid));
        if (peak > RSS_KILL_BYTES && !killed) {
          killed = true;
          arena.serve.child.kill('SIGKILL');
        }
      } catch { /* the server is gone */ }
    }, 50);
    try {
      const r = await arena.ssh(account, ['echo', 'logged-in'], { timeoutMs });
      return { r, before, peak, killed };
    } finally {
      clearInterval(watch);
    }
  }

  it('ln -sf /dev/zero /etc/passwd: the login fails with a message naming the file, the server stays small and keeps serving bob', async () => {
    await arena.sh('alice', 'ln -sf /dev/zero /etc/passwd');
    const { r, before, peak, killed } = await loginWatchingMemory('alice', 120_000);
    expect(killed, `server RSS reached ${Math.round(peak / 1048576)} MB reading /dev/zero`).toBe(false);
    // A 1 MiB cap: the growth stays a small fraction of the kill threshold.
    expect(peak - before).toBeLessThan(150 * 1024 * 1024);
    expect(r.code).not.toBe(0);
    expect(r.stdout).not.toContain('logged-in');
    expect(r.stderr).toMatch(/\/etc\/passwd.*could not be read/);
    expect(serverAlive(arena)).toBe(true);
    await arena.expectServes('bob');
  });

  it('a /bin/sh that never stops writing (VE root replaced it): the login fails, the server buffers at most the cap', async () => {
    const tool = await plantAttack(arena.env, 'erin', 've-endless-output');
    await arena.sh('erin', `rm -f /bin/sh && cp ${tool} /bin/sh && touch /etc/passwd`);
    // (touch: the host re-reads the VE's passwd only when its stat changed.)
    const { r, before, peak, killed } = await loginWatchingMemory('erin', 120_000);
    expect(killed, `server RSS reached ${Math.round(peak / 1048576)} MB reading an endless /etc/passwd`).toBe(false);
    expect(peak - before).toBeLessThan(150 * 1024 * 1024);
    expect(r.signal, 'the login hung until the test killed the client').toBeNull();
    expect(r.code).not.toBe(0);
    expect(r.stdout).not.toContain('logged-in');
    expect(r.stderr).toMatch(/\/etc\/passwd.*could not be read/);
    expect(serverAlive(arena)).toBe(true);
    await arena.expectServes('bob');
  });

  it('a /bin/sh that writes nothing and never exits, holding the pipe: the login ends with an error at the read deadline', async () => {
    const tool = await plantAttack(arena.env, 'frank', 've-endless-output');
    await arena.sh('frank', `touch /ve-endless-output.hold && rm -f /bin/sh && cp ${tool} /bin/sh && touch /etc/passwd`);
    // The read deadline is 20 s; a wait for the pipe's end lasts for ever (killed here at 90 s).
    const r = await arena.ssh('frank', ['echo', 'logged-in'], { timeoutMs: 90_000 });
    expect(r.signal, 'the login hung until the test killed the client').toBeNull();
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/\/etc\/passwd.*could not be read/);
    expect(serverAlive(arena)).toBe(true);
    await arena.expectServes('bob');
  });

  it('a FIFO nobody writes at /etc/passwd: the login ends with an error at the read deadline, not never', async () => {
    await arena.sh('carol', 'rm -f /etc/passwd && mkfifo /etc/passwd');
    // The read deadline is 20 s; without one the login waits for ever (killed here at 90 s).
    const r = await arena.ssh('carol', ['echo', 'logged-in'], { timeoutMs: 90_000 });
    expect(r.signal, 'the login hung until the test killed the client').toBeNull();
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/\/etc\/passwd.*could not be read/);
    expect(serverAlive(arena)).toBe(true);
    await arena.expectServes('bob');
  });

  it('a NUL byte in the login user\'s passwd entry: a clear login error, no unhandled rejection, no hung session', async () => {
    await arena.sh('dave', "cp /etc/passwd /root/passwd.good && { printf 'root:x:0:0:root:/root:/bin/sh\\000evil\\n'; grep -v '^root:' /root/passwd.good; } > /etc/passwd");
    const r = await arena.ssh('dave', ['echo', 'logged-in'], { timeoutMs: 60_000 });
    expect(r.signal, 'the session hung until the test killed the client').toBeNull();
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/NUL byte/);
    expect(serverBugRecords(arena.serve.logs)).toEqual([]);
    expect(serverAlive(arena)).toBe(true);
    await arena.expectServes('bob');
  });
});
