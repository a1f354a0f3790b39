import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeArena, serverAlive, type Arena } from '../adversarial/kit.js';
import { ClientTerminal, keyAuthArgs, sshBaseArgs } from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';

/**
 * Issue 12, shells that survive a dropped connection (accounts.yaml
 * persistentShells), with the real OpenSSH client under a pty:
 * - alice's shell runs a counting loop; her ssh client is killed with
 *   SIGKILL (and, later, her worker): the loop goes on in her VE, her next
 *   terminal login shows what it printed meanwhile, the same shell (PID)
 *   counts on, and it was sent SIGWINCH to repaint;
 * - dave shares alice's VE with persistentShells on: he never gets her shell;
 * - the newest output is kept up to the buffer (older output pushed out);
 * - bob has the setting off: his shell is hung up as before;
 * - `exit` holds nothing; carol's idle limit hangs her detached shell up;
 * - a held shell ends with its VE; the first shell after the VE starts is
 *   held too (it waits for the VE's agent, the only one that can hold it).
 */
describe('vesh serve: shells that survive a dropped connection', () => {
  let arena: Arena;

  beforeAll(async () => {
    arena = await makeArena({
      template: 'busybox',
      extraYaml: 'workers: { count: 2 }',
      accounts: {
        alice: ['persistentShells: { buffer: 2K }'],
        bob: [],
        carol: ['persistentShells: { idleLimit: 3s }'],
        dave: ['ve: alice', 'persistentShells: true'],
      },
    });
    // Sessions are held by the VE's session agent: wait until it serves them
    // (the first session of a VE goes through runc exec while it starts).
    for (const a of ['alice', 'bob', 'carol']) {
      await waitFor(`${a}'s session agent`, async () => (await arena.ssh(a, ['cat /proc/$PPID/comm'])).stdout.trim() === 'vesh-agent', 60_000);
    }
  }, 300_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  const terms: ClientTerminal[] = [];
  afterAll(() => {
    for (const t of terms) t.kill();
  });

  function login(account: string, env: Record<string, string> = {}): ClientTerminal {
    const sendEnv = Object.keys(env).map((k) => `-oSendEnv=${k}`);
    const t = new ClientTerminal([...sshBaseArgs(arena.serve.port), ...keyAuthArgs(arena.keys[account]!), ...sendEnv, '-tt', `${account}@127.0.0.1`], env);
    terms.push(t);
    return t;
  }

  /** The shell's own PID, printed in a line the test can tell from the echo of what it typed. */
  async function shellPid(t: ClientTerminal): Promise<number> {
    t.write('echo "pid=$(($$+0))="\r');
    return Number((await t.expect(/pid=(\d+)=/))[1]);
  }

  const alive = async (ve: string, pid: number) => (await arena.sh(ve, `kill -0 ${pid} 2>/dev/null && echo yes || echo no`)).stdout.trim() === 'yes';

  function logsSince(n: number, event: string, account: string) {
    return arena.serve.logs.slice(n).filter((r) => r.event === event && r.account === account);
  }

  /**
   * Start a counting program in the foreground of alice's terminal (a shell
   * of its own, so that it is in the foreground process group a window
   * change signals); resolves with its PID and the last count seen.
   */
  async function startCounting(t: ClientTerminal): Promise<{ pid: number; last: number }> {
    // Once the login shell answers, so that it runs the program as a foreground job.
    await shellPid(t);
    t.write('sh -c \'trap "echo winch-\\$i-seen" WINCH; i=0; while :; do i=$((i+1)); echo "tick-$i-$(($$+0))-"; sleep 0.2; done\'\r');
    const m = await t.expect(/tick-(\d+)-(\d+)-/);
    return { pid: Number(m[2]), last: Number(m[1]) };
  }

  /**
   * Re-attached: the same program counts on from where it was (ticks past
   * `before`, then later ones), and it was signalled to repaint. The order of
   * the repaint line against the first ticks depends on whether any tick was
   * held (a re-attach right after the drop may find none), so each is looked
   * for in everything the new client showed.
   */
  async function expectReattached(t: ClientTerminal, pid: number, before: number): Promise<void> {
    let all = '';
    t.proc.onData((d) => { all += d; });
    const ticks = () => [...all.matchAll(new RegExp(`tick-(\\d+)-${pid}-`, 'g'))].map((m) => Number(m[1]));
    await waitFor('the same program counting on', async () => ticks().length > 0, 15_000);
    const first = ticks()[0]!;
    expect(first).toBeGreaterThan(before);
    await waitFor('the repaint signal (SIGWINCH) to reach the program', async () => /winch-\d+-seen/.test(all), 15_000);
    await waitFor('later ticks', async () => Math.max(...ticks()) > first + 1, 15_000);
  }

  it('keeps a shell whose ssh client was killed, and the next login takes it up with its output and the program intact', async () => {
    const t = login('alice');
    const { pid, last } = await startCounting(t);
    const n = arena.serve.logs.length;
    t.kill();
    await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.shell_detached' && r.account === 'alice', 15_000);
    // It counts on while nobody is there.
    await new Promise((r) => setTimeout(r, 1500));
    expect(await alive('alice', pid)).toBe(true);

    // dave shares the VE but not the shell: a fresh one for him, hers still held.
    const d = login('dave');
    const davePid = await shellPid(d);
    expect(davePid).not.toBe(pid);
    d.write('exit\r');
    await d.waitExit();
    expect(logsSince(n, 'ssh.shell_reattached', 'dave')).toHaveLength(0);

    const again = login('alice');
    await expectReattached(again, pid, last);
    const reattached = logsSince(n, 'ssh.shell_reattached', 'alice');
    expect(reattached).toHaveLength(1);
    // What it printed while detached (1.5 s of ticks) came back first.
    expect(Number(reattached[0]!.replayBytes)).toBeGreaterThan(0);
    // Ended on purpose: nothing stays held.
    again.write('\x03');
    await again.expect(/root@alice:~# /);
    const m = arena.serve.logs.length;
    again.write('exit\r');
    await again.waitExit();
    await waitFor('the shell gone', async () => !(await alive('alice', pid)), 10_000);
    expect(arena.serve.logs.slice(m).filter((r) => r.event === 'ssh.shell_detached')).toHaveLength(0);
    const fresh = login('alice');
    expect(await shellPid(fresh)).not.toBe(pid);
    fresh.write('exit\r');
    await fresh.waitExit();
  }, 120_000);

  it('keeps a shell whose worker was killed', async () => {
    const n = arena.serve.logs.length;
    const t = login('alice');
    const conn = await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.connection', 20_000);
    const { pid, last } = await startCounting(t);
    const worker = Number(conn.worker);
    const workerPid = Number(arena.serve.logs.filter((r) => r.event === 'broker.worker_started' && r.worker === worker).at(-1)?.pid);
    expect(workerPid).toBeGreaterThan(0);
    process.kill(workerPid, 'SIGKILL');
    await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.shell_detached' && r.account === 'alice', 15_000);
    await t.waitExit();
    expect(await alive('alice', pid)).toBe(true);
    const again = login('alice');
    await expectReattached(again, pid, last);
    again.write('\x03');
    again.write('exit\r');
    await again.waitExit();
    expect(serverAlive(arena)).toBe(true);
  }, 120_000);

  it('keeps only the newest output up to the buffer while detached', async () => {
    const t = login('alice');
    const pid = await shellPid(t);
    await arena.sh('alice', 'rm -f /tmp/seq-done');
    t.write('sleep 1; seq 1 3000; touch /tmp/seq-done\r');
    // The line reached the shell (its echo came back) before the client goes.
    await t.expect(/seq-done\r\n/);
    const n = arena.serve.logs.length;
    t.kill();
    await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.shell_detached' && r.account === 'alice', 15_000);
    await waitFor('seq to finish', async () => (await arena.sh('alice', 'test -e /tmp/seq-done && echo y || echo n')).stdout.trim() === 'y', 20_000);
    const again = login('alice');
    await again.expect(/2999\r\n3000\r\n/);
    const r = await arena.serve.waitForLog((x) => arena.serve.logs.indexOf(x) >= n && x.event === 'ssh.shell_reattached' && x.account === 'alice');
    // 2K of ~14K: the newest lines only (line 100 was pushed out long before).
    expect(Number(r.replayBytes)).toBeLessThanOrEqual(2048);
    expect(Number(r.replayBytes)).toBeGreaterThan(1024);
    expect(await shellPid(again)).toBe(pid);
    again.write('exit\r');
    await again.waitExit();
  }, 120_000);

  it('LC_VESH_SHELL=new gives a fresh shell and leaves the held one held', async () => {
    const t = login('alice');
    const pid = await shellPid(t);
    const n = arena.serve.logs.length;
    t.kill();
    await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.shell_detached' && r.account === 'alice', 15_000);
    const fresh = login('alice', { LC_VESH_SHELL: 'new' });
    expect(await shellPid(fresh)).not.toBe(pid);
    fresh.write('exit\r');
    await fresh.waitExit();
    const again = login('alice');
    expect(await shellPid(again)).toBe(pid);
    again.write('exit\r');
    await again.waitExit();
  }, 120_000);

  it('hangs the shell up as before when the setting is off', async () => {
    const t = login('bob');
    const pid = await shellPid(t);
    const n = arena.serve.logs.length;
    t.kill();
    await waitFor('bob\'s shell hung up', async () => !(await alive('bob', pid)), 15_000);
    expect(logsSince(n, 'ssh.shell_detached', 'bob')).toHaveLength(0);
  }, 60_000);

  it('hangs a detached shell up after its idle limit', async () => {
    const t = login('carol');
    const pid = await shellPid(t);
    const n = arena.serve.logs.length;
    t.kill();
    await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.shell_detached' && r.account === 'carol', 15_000);
    await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.shell_idle_hangup' && r.account === 'carol', 15_000);
    const end = await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.shell_held_end' && r.account === 'carol', 15_000);
    expect(end.exitSignal).toBe('HUP');
    expect(await alive('carol', pid)).toBe(false);
    // Nothing left to take up: the next login is a fresh shell.
    const fresh = login('carol');
    expect(await shellPid(fresh)).not.toBe(pid);
    fresh.write('exit\r');
    await fresh.waitExit();
  }, 60_000);

  it('ends a held shell when its VE stops', async () => {
    const t = login('alice');
    await shellPid(t);
    const n = arena.serve.logs.length;
    t.kill();
    await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.shell_detached' && r.account === 'alice', 15_000);
    expect(arena.env.cli(['ve', 'stop', 'alice']).code).toBe(0);
    await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.shell_held_end' && r.account === 'alice', 30_000);
  }, 90_000);

  it('holds the first shell after the VE starts too (it waits for the VE\'s session agent)', async () => {
    // The VE was stopped above: this login starts it, and no agent runs in it yet.
    const t = login('alice');
    const pid = await shellPid(t);
    const n = arena.serve.logs.length;
    t.kill();
    await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= n && r.event === 'ssh.shell_detached' && r.account === 'alice', 15_000);
    const again = login('alice');
    expect(await shellPid(again)).toBe(pid);
    again.write('exit\r');
    await again.waitExit();
  }, 90_000);
});
