import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeArena, serverAlive, type Arena } from '../adversarial/kit.js';
import {
  ClientTerminal, keyAuthArgs, runProgram, sshBaseArgs, sshWithKey, startVeshServe, tempDir, type RunResult, type ServeProcess,
} from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';

/**
 * Issue 10's "done when": an SSH worker that dies takes only its own
 * connections with it. alice's connections and bob's land on different
 * workers of a two-worker pool; alice's worker is SIGKILLed while she sits
 * in a shell and bob transfers a file over SFTP. Her connections drop, her
 * sessions are hung up in her VE, bob's transfer and his other session
 * finish intact, new logins work at once, and the pool has a new worker.
 * Then a worker stuck in a loop: the broker's ping finds it, ends it, and
 * the other worker's connections go on meanwhile.
 */

const HOSTILE = path.join(path.dirname(new URL(import.meta.url).pathname), '..', 'adversarial', 'hostile-worker.mjs');
/** Bytes bob sends and takes back; sftp's rate limit makes the transfer last seconds, so the crash comes mid-transfer. */
const FILE_BYTES = 64 * 1024 * 1024;
const SFTP_LIMIT_KBIT = 80_000;

/** Pids of `pid` and all its descendants, from /proc. */
function processTree(pid: number): number[] {
  const parents = new Map<number, number>();
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = readFileSync(`/proc/${e}/stat`, 'utf8');
      parents.set(Number(e), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]));
    } catch { /* gone */ }
  }
  const out = [pid];
  for (let i = 0; i < out.length; i++) for (const [child, parent] of parents) if (parent === out[i]) out.push(child);
  return out.filter((p) => existsSync(`/proc/${p}`));
}

describe('vesh serve: a worker killed mid-session', () => {
  let arena: Arena;
  let work: string;

  beforeAll(async () => {
    arena = await makeArena({ template: 'debian', extraYaml: 'workers: { count: 2, stallTimeout: 5s }' });
    work = tempDir(arena.cleanup);
    await arena.expectServes('alice');
    await arena.expectServes('bob');
  }, 300_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  /** Both workers of `serve` ready (their last start is followed by a ready, and no exit since). */
  function poolReady(serve: ServeProcess): boolean {
    return [0, 1].every((i) => {
      const last = serve.logs.filter((r) => r.worker === i && (r.event === 'broker.worker_started' || r.event === 'broker.worker_exit' || r.event === 'broker.worker_serving')).at(-1);
      return last?.event === 'broker.worker_serving';
    });
  }

  const workerPid = (serve: ServeProcess, index: number): number => Number(serve.logs.filter((r) => r.event === 'broker.worker_started' && r.worker === index).at(-1)?.pid);

  /** Start something that opens one connection; resolve once the broker has placed it, with the worker index. */
  async function placed(serve: ServeProcess, start: () => void, account: string): Promise<{ conn: string; worker: number }> {
    const m = serve.logs.length;
    start();
    const r = await serve.waitForLog((x) => serve.logs.indexOf(x) >= m && x.event === 'ssh.connection', 30_000);
    // Its session started (the VE's process runs), so the next connection sees it counted.
    await serve.waitForLog((x) => serve.logs.indexOf(x) >= m && x.event === 'ssh.session_start' && x.conn === r.conn && x.account === account, 60_000);
    return { conn: String(r.conn), worker: Number(r.worker) };
  }

  /** Command lines of the processes in `ve` that match `re` (not the scanning shell's own). */
  async function veProcesses(ve: string, re: RegExp): Promise<string[]> {
    const r = await arena.sh(ve, 'for p in /proc/[0-9]*; do [ "$p" = /proc/$$ ] || { tr "\\0" " " < $p/cmdline 2>/dev/null; echo; }; done');
    return r.stdout.split('\n').filter((l) => re.test(l));
  }

  it('drops only the killed worker\'s connections: bob\'s SFTP transfer and session finish, alice\'s sessions are hung up, new logins work, a new worker starts', async () => {
    const serve = arena.serve;
    await waitFor('both workers ready', async () => poolReady(serve), 30_000);
    const tag = 1000 + Math.floor(Math.random() * 8000);
    const content = randomBytes(FILE_BYTES);
    writeFileSync(path.join(work, 'big.bin'), content);
    const batch = path.join(work, 'batch');
    writeFileSync(batch, 'put big.bin /root/big.bin\nget /root/big.bin back.bin\nbye\n');

    // The pool gives each new connection the least loaded worker (the first
    // on a tie): alice, bob, alice, bob alternate between the two.
    let term!: ClientTerminal;
    const a1 = await placed(serve, () => {
      term = new ClientTerminal([...sshBaseArgs(serve.port), ...keyAuthArgs(arena.keys.alice!), '-tt', 'alice@127.0.0.1']);
      arena.cleanup.add(() => term.kill());
    }, 'alice');
    await term.expect(/root@alice:~# /, 60_000);
    term.write(`exec sleep ${tag}1\r`);
    let bobSession!: Promise<RunResult>;
    const b1 = await placed(serve, () => { bobSession = arena.ssh('bob', [`sleep 8; echo bob-done`]); }, 'bob');
    let aliceExec!: Promise<RunResult>;
    const a2 = await placed(serve, () => { aliceExec = arena.ssh('alice', [`exec sleep ${tag}2`]); }, 'alice');
    let sftp!: Promise<RunResult>;
    const b2 = await placed(serve, () => {
      sftp = runProgram('sftp', [...sshBaseArgs(serve.port).map((a) => (a === '-p' ? '-P' : a)), ...keyAuthArgs(arena.keys.bob!), '-l', String(SFTP_LIMIT_KBIT), '-b', batch, 'bob@127.0.0.1'], { cwd: work, timeoutMs: 240_000 });
    }, 'bob');
    expect(a2.worker, 'alice\'s two connections share a worker').toBe(a1.worker);
    expect(b1.worker, 'bob\'s two connections share a worker').toBe(b2.worker);
    expect(b1.worker, 'alice and bob are on different workers').not.toBe(a1.worker);
    await waitFor('alice\'s sessions running in her VE', async () => (await veProcesses('alice', new RegExp(`sleep ${tag}[12]`))).length === 2, 30_000);

    // Mid-transfer (the upload alone takes seconds at this rate): kill alice's worker.
    await new Promise((r) => setTimeout(r, 1_500));
    // The upload is under way, not done: the crash comes mid-transfer.
    const uploaded = Number((await arena.sh('bob', 'stat -c %s /root/big.bin 2>/dev/null || echo 0')).stdout.trim());
    expect(uploaded).toBeLessThan(FILE_BYTES);
    const victimPid = workerPid(serve, a1.worker);
    const victimTree = processTree(victimPid);
    expect(victimTree.length).toBeGreaterThan(0);
    const m = serve.logs.length;
    process.kill(victimPid, 'SIGKILL');

    // Alice's connections drop (ssh's own exit code for a lost connection).
    expect(await term.waitExit(30_000)).toBe(255);
    const ae = await aliceExec;
    expect(ae.code, ae.stderr).toBe(255);

    // At once, without waiting for the replacement: new logins of both work.
    const bobNow = await arena.ssh('bob', ['echo', 'bob-again']);
    expect(bobNow.stdout.trim(), bobNow.stderr).toBe('bob-again');
    const aliceNow = await arena.ssh('alice', ['echo', 'alice-again']);
    expect(aliceNow.stdout.trim(), aliceNow.stderr).toBe('alice-again');

    // bob's connections on the other worker finish intact.
    const bs = await bobSession;
    expect(bs.code, bs.stderr).toBe(0);
    expect(bs.stdout.trim()).toBe('bob-done');
    const sr = await sftp;
    expect(sr.code, sr.stderr).toBe(0);
    const back = readFileSync(path.join(work, 'back.bin'));
    expect(back.length).toBe(FILE_BYTES);
    expect(createHash('sha256').update(back).digest('hex')).toBe(createHash('sha256').update(content).digest('hex'));

    // The broker saw it, said so, and started a replacement with the same index.
    const exit = await serve.waitForLog((r) => serve.logs.indexOf(r) >= m && r.event === 'broker.worker_exit' && r.worker === a1.worker);
    expect(exit).toMatchObject({ pid: victimPid, signal: 'SIGKILL' });
    expect(await serve.waitForLog((r) => serve.logs.indexOf(r) >= m && r.event === 'broker.worker_connections_dropped' && r.worker === a1.worker)).toMatchObject({ connections: 2 });
    const started = await serve.waitForLog((r) => serve.logs.indexOf(r) >= m && r.event === 'broker.worker_started' && r.worker === a1.worker, 30_000);
    expect(started.pid).not.toBe(victimPid);
    // bob's worker was left alone.
    expect(serve.logs.slice(m).filter((r) => (r.event === 'broker.worker_killed' || r.event === 'broker.worker_exit') && r.worker === b1.worker)).toEqual([]);

    // Alice's session processes in her VE were hung up, and nothing of the dead worker is left on the host.
    await waitFor('alice\'s sessions hung up', async () => (await veProcesses('alice', new RegExp(`sleep ${tag}[12]|bash`))).length === 0, 30_000);
    const ended = serve.logs.slice(m).filter((r) => r.event === 'ssh.session_end' && (r.conn === a1.conn || r.conn === a2.conn));
    expect(ended.length).toBe(2);
    expect(victimTree.filter((p) => existsSync(`/proc/${p}`))).toEqual([]);
    await waitFor('both workers ready again', async () => poolReady(serve), 30_000);
    await arena.expectServes('bob');
    expect(serverAlive(arena)).toBe(true);
  }, 300_000);

  it('ends a worker stuck in a loop after workers.stallTimeout; the other worker\'s sessions and new logins go on meanwhile', async () => {
    // The same instance, now with hostile workers (served honestly unless a
    // connection comes from 127.0.0.2); the first serve stops, VEs stay.
    await arena.serve.stop();
    const serve = await startVeshServe(arena.cleanup, arena.env.configFile, undefined, { VESH_WORKER_SCRIPT: HOSTILE });
    const ssh = (account: string, cmd: string[]) => sshWithKey(serve.port, account, arena.keys[account]!, cmd, { timeoutMs: 120_000 });
    await waitFor('both workers ready', async () => poolReady(serve), 30_000);

    let bobSession!: Promise<RunResult>;
    const b1 = await placed(serve, () => { bobSession = ssh('bob', ['sleep 10; echo bob-done']); }, 'bob');
    const m = serve.logs.length;
    // The next connection goes to the idle worker, which stops answering anything.
    const spinning = new Promise<string>((resolve) => {
      let text = '';
      const s = net.connect({ host: '127.0.0.1', port: serve.port, localAddress: '127.0.0.2' });
      s.on('connect', () => s.write('ATTACK spin {}\n'));
      s.on('data', (d: Buffer) => { text += d.toString(); });
      s.on('error', () => undefined);
      s.on('close', () => resolve(text));
    });
    const attack = await serve.waitForLog((r) => serve.logs.indexOf(r) >= m && r.event === 'hostile.attack' && r.attack === 'spin');
    const stuck = Number(attack.worker);
    expect(stuck).not.toBe(b1.worker);
    const stuckPid = workerPid(serve, stuck);

    // While it spins: a new login works (the tie goes to the first worker,
    // the live one, and the broker does not wait on the stuck one).
    const during = await ssh('bob', ['echo', 'while-stuck']);
    expect(during.stdout.trim(), during.stderr).toBe('while-stuck');
    expect(serve.logs.slice(m).some((r) => r.event === 'broker.worker_killed')).toBe(false);

    const killed = await serve.waitForLog((r) => serve.logs.indexOf(r) >= m && r.event === 'broker.worker_killed' && r.worker === stuck, 30_000);
    expect(String(killed.reason)).toMatch(/no answer to the broker's ping .*taken for stuck/);
    expect(await spinning).toContain('spinning');
    const bs = await bobSession;
    expect(bs.code, bs.stderr).toBe(0);
    expect(bs.stdout.trim()).toBe('bob-done');
    await serve.waitForLog((r) => serve.logs.indexOf(r) >= m && r.event === 'broker.worker_started' && r.worker === stuck, 30_000);
    await waitFor('the stuck worker gone from the host', async () => !existsSync(`/proc/${stuckPid}`), 10_000);
    await waitFor('both workers ready again', async () => poolReady(serve), 30_000);
    const after = await ssh('bob', ['echo', 'after']);
    expect(after.stdout.trim(), after.stderr).toBe('after');
    expect(serve.child.exitCode).toBe(null);
  }, 180_000);
});
