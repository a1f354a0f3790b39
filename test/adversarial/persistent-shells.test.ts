import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startAgentSession } from '../../src/broker/agent-session.js';
import { closeFd } from '../../src/system/fdpass.js';
import { Cleanup, ClientTerminal, keyAuthArgs, sshBaseArgs, tempDir } from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';
import { buildAttack, makeArena, plantAttack, runAttack as runAttackFrom, serverAlive, type Arena } from './kit.js';

/**
 * Shells held after a dropped connection (persistentShells) are handed back
 * by the broker only to their own account, and only as a terminal of the
 * devpts they started on:
 * - a compromised worker logged in as another account (bob, own VE; carol,
 *   sharing alice's VE) asks for a terminal shell while alice's is held: it
 *   gets a fresh one of its own, never alice's (no PID of hers, none of her
 *   held output), and alice's stays held;
 * - an account dropping connection after connection piles up held shells
 *   only to its session cap (sessions.maxSessionsPerAccount): they keep
 *   their places until they end;
 * - VE root answers the re-attach in the agent's place with a FIFO, or with a
 *   pty master of a devpts it mounted itself: the broker refuses it (the
 *   client is told, gets a fresh shell, sees none of the liar's "output"),
 *   the held shell is hung up, and the one worker that also serves bob goes on.
 */

const HOSTILE = path.join(path.dirname(new URL(import.meta.url).pathname), 'hostile-worker.mjs');
const ATTACKER = '127.0.0.2';

type Step = Record<string, unknown> & { step: string };

describe('adversarial: held shells', () => {
  let arena: Arena;
  const terms: ClientTerminal[] = [];
  const held: ChildProcess[] = [];

  beforeAll(async () => {
    arena = await makeArena({
      template: 'busybox',
      extraYaml: 'workers: { count: 1 }\nsessions: { maxSessionsPerAccount: 4 }',
      serveEnv: { VESH_WORKER_SCRIPT: HOSTILE },
      accounts: {
        alice: ['persistentShells: true'],
        bob: ['persistentShells: true'],
        carol: ['ve: alice', 'persistentShells: true'],
        erin: ['ve: bob', 'persistentShells: true'],
      },
    });
    arena.cleanup.add(async () => {
      for (const t of terms) t.kill();
      for (const c of held.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    });
    for (const a of ['alice', 'bob']) {
      await waitFor(`${a}'s session agent`, async () => (await arena.ssh(a, ['cat /proc/$PPID/comm'])).stdout.trim() === 'vesh-agent', 60_000);
    }
    await plantAttack(arena.env, 'alice', 'held-shell-liar');
  }, 300_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  function login(account: string, env: Record<string, string> = {}): ClientTerminal {
    const sendEnv = Object.keys(env).map((k) => `-oSendEnv=${k}`);
    const t = new ClientTerminal([...sshBaseArgs(arena.serve.port), ...keyAuthArgs(arena.keys[account]!), ...sendEnv, '-tt', `${account}@127.0.0.1`], env);
    terms.push(t);
    return t;
  }

  async function shellPid(t: ClientTerminal): Promise<number> {
    t.write('echo "pid=$(($$+0))="\r');
    return Number((await t.expect(/pid=(\d+)=/))[1]);
  }

  const alive = async (ve: string, pid: number) => (await arena.sh(ve, `kill -0 ${pid} 2>/dev/null && echo yes || echo no`)).stdout.trim() === 'yes';

  /** alice's shell, detached by killing her ssh client; it prints `secret` once nobody watches. Resolves with its PID. */
  async function holdAliceShell(secret: string): Promise<number> {
    const t = login('alice');
    const pid = await shellPid(t);
    t.write(`sleep 2; echo "${secret}-$((6*7))"\r`);
    await t.expect(/sleep 2; echo/);
    const n = arena.serve.logs.length;
    t.kill();
    await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.shell_detached' && r.account === 'alice', 15_000);
    await new Promise((r) => setTimeout(r, 2500));
    return pid;
  }

  const runAttack = (name: string, args: Record<string, unknown> = {}, timeoutMs?: number): Promise<Step[]> =>
    runAttackFrom(arena.serve.port, ATTACKER, name, args, timeoutMs);

  it('a compromised worker logged in as another account never gets the held shell', async () => {
    const pid = await holdAliceShell('held-secret');
    for (const user of ['bob', 'carol']) {
      const steps = await runAttack('shell-as', { user, privateKey: readFileSync(arena.keys[user]!.file, 'utf8') });
      const shell = steps.find((s) => s.step === 'shell');
      expect(shell, JSON.stringify(steps)).toBeDefined();
      expect(shell!.ok, JSON.stringify(shell)).toBe(true);
      expect(shell!.pid).not.toBe(pid);
      expect(String(shell!.replay)).not.toContain('held-secret');
    }
    expect(arena.serve.logs.filter((r) => r.event === 'ssh.shell_reattached')).toHaveLength(0);
    // alice's own next login takes it up, output and all.
    expect(await alive('alice', pid)).toBe(true);
    const t = login('alice');
    await t.expect(/held-secret-42/);
    expect(await shellPid(t)).toBe(pid);
    t.write('exit\r');
    await t.waitExit();
  }, 120_000);

  it('holding shells does not get round the account\'s session cap', async () => {
    // erin drops connection after connection, each time asking for a new shell, to pile up held shells.
    const n = arena.serve.logs.length;
    for (let i = 1; i <= 4; i++) {
      const t = login('erin', { LC_VESH_SHELL: 'new' });
      await shellPid(t);
      t.kill();
      await waitFor(`held shell ${i}`, async () => arena.serve.logs.slice(n).filter((r) => r.event === 'ssh.shell_detached' && r.account === 'erin').length === i, 15_000);
    }
    // sessions.maxSessionsPerAccount 4: the four held shells hold all of erin's places.
    const refused = login('erin', { LC_VESH_SHELL: 'new' });
    await refused.expect(/too many sessions for account erin/);
    await refused.waitExit();
    // Each plain login takes one back; ended, it frees its place.
    for (let i = 0; i < 4; i++) {
      const t = login('erin');
      await shellPid(t);
      t.write('exit\r');
      await t.waitExit();
    }
    expect(arena.serve.logs.slice(n).filter((r) => r.event === 'ssh.shell_reattached' && r.account === 'erin')).toHaveLength(4);
    const r = await arena.ssh('erin', ['echo', 'free-again']);
    expect(r.stdout.trim()).toBe('free-again');
  }, 120_000);

  /** bob's `echo up; sleep 120` on the same (only) worker; resolves once it printed "up". */
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

  // VE root's seccomp filter refuses mount, so it has no devpts but its VE's: the other-devpts lie is the host-side fake agent's, below.
  for (const [bait, why] of [['fifo', /without a terminal/]] as const) {
    it(`refuses a re-attach answered by VE root with a ${bait}; the held shell is hung up and the worker goes on`, async () => {
      const pid = await holdAliceShell(`secret-${bait}`);
      const bob = await holdBob();
      await arena.sh('alice', `rm -f /tmp/liar.out; nohup /usr/local/bin/held-shell-liar ${bait} 40 > /tmp/liar.out 2>&1 < /dev/null &`);
      let said = '';
      await waitFor('the liar to take the agent\'s place', async () => {
        said = (await arena.sh('alice', 'cat /tmp/liar.out 2>/dev/null; true')).stdout;
        return said.trim() !== '';
      }, 20_000);
      expect(said, 'VE root could not take the agent\'s place').toContain('impersonating');

      const n = arena.serve.logs.length;
      const t = login('alice');
      let shown = '';
      t.proc.onData((d) => { shown += d; });
      await t.expect(/could not be re-attached/);
      const refused = await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.shell_reattach_refused', 15_000);
      expect(String(refused.err)).toMatch(why);
      said = (await arena.sh('alice', 'cat /tmp/liar.out; true')).stdout;
      expect(said).toContain(`answered with a ${bait}`);
      // A fresh shell of the real agent, none of the liar's "output".
      expect(await shellPid(t)).not.toBe(pid);
      t.write('exit\r');
      await t.waitExit();
      expect(shown).not.toContain('LIAR-OUTPUT');
      await waitFor('the held shell hung up', async () => !(await alive('alice', pid)), 15_000);

      // The one worker that holds bob's connection too did not fail.
      expect(bob.exitCode).toBeNull();
      expect(bob.signalCode).toBeNull();
      bob.kill('SIGKILL');
      expect(serverAlive(arena)).toBe(true);
      await arena.expectServes('bob');
    }, 180_000);
  }
});

/**
 * The broker's side against a fake agent on the host (held-shell-liar
 * serve): the session starts on a terminal of the host's /dev/ptmx; the
 * re-attach is answered with a terminal of a devpts instance mounted for the
 * test. The broker must refuse it (and take it when the devpts is the same).
 */
describe('adversarial: a held shell handed back as a terminal of another devpts', () => {
  const cleanup = new Cleanup();
  let dir: string;
  let pts: string;

  beforeAll(() => {
    dir = tempDir(cleanup, 'vesh-held-liar-');
    pts = path.join(dir, 'pts');
    mkdirSync(pts);
    execFileSync('mount', ['-t', 'devpts', '-o', 'newinstance,ptmxmode=0600', 'devpts', pts]);
    cleanup.add(() => { execFileSync('umount', ['-l', pts]); });
  });

  afterAll(async () => {
    await cleanup.run();
  });

  async function attachThrough(ptmx: string): Promise<{ fd: number; replay: Buffer }> {
    const sock = path.join(dir, `agent-${path.basename(path.dirname(ptmx))}.sock`);
    const liar = spawn(buildAttack('held-shell-liar'), ['serve', sock, ptmx], { stdio: ['ignore', 'pipe', 'inherit'] });
    cleanup.add(() => { if (liar.exitCode === null) liar.kill('SIGKILL'); });
    await new Promise<void>((resolve) => liar.stdout!.once('data', () => resolve()));
    const s = await startAgentSession({ socket: sock, process: { argv: ['/bin/sh'], uid: 0, gid: 0, groups: [], env: {}, tty: true } }, () => undefined, true);
    for (const fd of s.fds) closeFd(fd);
    expect(s.holdable).toBeDefined();
    s.holdable!.detach(4096);
    try {
      return await s.holdable!.attach(80, 24, 4096);
    } finally {
      liar.kill('SIGKILL');
    }
  }

  it('refuses the terminal of another devpts', async () => {
    await expect(attachThrough(path.join(pts, 'ptmx'))).rejects.toThrow(/another devpts/);
  });

  it('takes a terminal of the devpts the session started on', async () => {
    const r = await attachThrough('/dev/ptmx');
    closeFd(r.fd);
    expect(r.replay.toString()).toBe('LIAR-OUTPUT\r\n');
  });
});
