import { spawn, type ChildProcess } from 'node:child_process';
import os from 'node:os';
import argon2 from 'argon2';
import { Client } from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { keyAuthArgs, sshBaseArgs, sshWithPassword } from '../helpers/ssh-harness.js';
import { makeArena, serverAlive, type Arena } from './kit.js';

/**
 * Authentication against hostile clients: a tenant guessing another
 * tenant's password between logins of its own, a source that connects,
 * exchanges keys and leaves, a source flooding the password queue, and an
 * account locked by the admin while it is logged in. Each attacking source
 * is its own 127.0.0.x address, so per-source penalties of one test do not
 * reach another, and the victim logs in from 127.0.0.1.
 */

const ALICE_PW = 'alice-correct-horse';
const BOB_PW = 'bob-battery-staple';

describe('authentication against hostile clients', () => {
  let arena: Arena;
  const children: ChildProcess[] = [];

  beforeAll(async () => {
    // OWASP's minimum argon2id cost: real hashing, quick enough for a test.
    const hash = (pw: string) => argon2.hash(pw, { type: argon2.argon2id, memoryCost: 19456, timeCost: 2, parallelism: 1 });
    arena = await makeArena({
      accounts: {
        alice: [`password: "${await hash(ALICE_PW)}"`],
        bob: [`password: "${await hash(BOB_PW)}"`],
      },
    });
    arena.cleanup.add(() => {
      for (const c of children) c.kill('SIGKILL');
    });
    await arena.expectServes('alice');
    await arena.expectServes('bob');
  }, 600_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  }, 300_000);

  const pw = (user: string, password: string, from: string, cmd: string[] = ['echo', 'in']) => sshWithPassword(arena.serve.port, user, password, cmd, { extra: ['-b', from], timeoutMs: 60_000 });
  const since = (n: number) => arena.serve.logs.slice(n);

  /** A log record of `vesh serve` since index `from` matching `pred` (its output reaches us a little after the client sees the effect). */
  async function logged(from: number, pred: (r: Record<string, unknown>) => boolean): Promise<void> {
    await waitUntil('a log record', () => since(from).some(pred), 15_000);
  }

  async function waitUntil(what: string, cond: () => boolean, timeoutMs = 60_000): Promise<void> {
    const end = Date.now() + timeoutMs;
    while (!cond()) {
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  it('penalizes guessing at bob\'s password even when alice logs in between guesses from the same source (review M5)', async () => {
    const from = '127.0.0.5';
    const before = arena.serve.logs.length;
    for (let i = 0; i < 10; i++) {
      expect((await pw('bob', `guess-${i}`, from)).stdout).toBe('');
      // The attacker's own good login in between used to wipe the source's record.
      expect((await pw('alice', ALICE_PW, from)).stdout).toBe('in\n');
    }
    await logged(before, (r) => r.event === 'auth.penalty' && r.source === from && r.scope === 'account' && r.account === 'bob');
    // From now on even bob's right password is not checked from that source: guessing is over for the penalty's length.
    const right = await pw('bob', BOB_PW, from);
    expect(right.stdout).toBe('');
    await logged(before, (r) => r.event === 'ssh.auth' && r.user === 'bob' && r.source === from && r.result === 'penalized');
    // Only that source's attempts at bob wait: alice from it, and bob from elsewhere, get in.
    expect((await pw('alice', ALICE_PW, from)).stdout).toBe('in\n');
    expect((await pw('bob', BOB_PW, '127.0.0.1')).stdout).toBe('in\n');
  }, 300_000);

  it('penalizes a source whose connections finish the key exchange and leave, or ask only "none" (review M4)', async () => {
    const from = '127.0.0.6';
    const before = arena.serve.logs.length;
    /** One connection from `from` that exchanges keys, then leaves (or tries "none" and leaves). Resolves when it is closed. */
    const probe = (askNone: boolean) => new Promise<'closed' | 'refused'>((resolve) => {
      const c = new Client();
      let handshake = false;
      c.on('error', () => undefined);
      c.on('handshake', () => {
        handshake = true;
        if (!askNone) c.end();
      });
      c.on('close', () => resolve(handshake ? 'closed' : 'refused'));
      // No credentials: ssh2 asks "none" only, fails, and disconnects.
      c.connect({ host: '127.0.0.1', port: arena.serve.port, localAddress: from, username: 'nobody', readyTimeout: 30_000, tryKeyboard: false });
    });
    const outcomes: string[] = [];
    for (let i = 0; i < 30 && !outcomes.includes('refused'); i++) {
      outcomes.push(await probe(i % 2 === 0));
    }
    await logged(before, (r) => r.event === 'ssh.preauth_failure' && r.source === from && r.kind === 'noauth');
    await logged(before, (r) => r.event === 'auth.penalty' && r.source === from && r.scope === 'source');
    // Once penalized, the source is refused before its bytes are parsed.
    expect(outcomes).toContain('refused');
    await logged(before, (r) => r.event === 'ssh.connection_refused' && r.source === from && String(r.reason).includes('penalized'));
    // Nobody else is.
    await arena.expectServes('bob');
    expect((await pw('bob', BOB_PW, '127.0.0.1')).stdout).toBe('in\n');
  }, 300_000);

  it('does not let parallel wrong passwords from one source starve bob\'s password login from another (review M5)', async () => {
    const flood = '127.0.0.2';
    const before = arena.serve.logs.length;
    let stop = false;
    let floodAttempts = 0;
    /** One flooder: wrong passwords for bob from `flood`, one connection after another, until told to stop. */
    const flooder = async () => {
      while (!stop) {
        floodAttempts++;
        await pw('bob', `wrong-${floodAttempts}`, flood, ['true']);
      }
    };
    const flooders = Array.from({ length: 10 }, () => flooder());
    // The queue refuses the flooder's checks beyond its share before bob comes.
    await waitUntil('the flood to reach its share of the password queue', () => since(before).some((r) => r.event === 'auth.hash_share_full' && r.source === flood), 120_000);
    const bob = await pw('bob', BOB_PW, '127.0.0.1');
    const floodStillOn = !stop;
    stop = true;
    await Promise.all(flooders);
    expect(bob.stdout).toBe('in\n');
    expect(floodStillOn).toBe(true);
    expect(serverAlive(arena)).toBe(true);
    // bob's check was never turned away by the queue; only the flooder's were.
    expect(since(before).some((r) => r.event === 'auth.hash_share_full' && r.source !== flood)).toBe(false);
    expect(since(before).some((r) => r.event === 'auth.hash_queue_full')).toBe(false);
  }, 300_000);

  it('ends alice\'s open connection when the admin locks her account, and logs it (review L8)', async () => {
    const before = arena.serve.logs.length;
    const held = spawn('ssh', [...sshBaseArgs(arena.serve.port), ...keyAuthArgs(arena.keys.alice!), 'alice@127.0.0.1', 'sleep 300 # until locked'], {
      stdio: ['pipe', 'ignore', 'ignore'],
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir() },
    });
    children.push(held);
    const exited = new Promise<void>((r) => held.once('exit', () => r()));
    await waitUntil('alice\'s session to start', () => since(before).some((r) => r.event === 'ssh.session_start' && r.account === 'alice' && String(r.command).includes('until locked')), 120_000);
    arena.env.cli(['user', 'lock', 'alice']);
    arena.cleanup.add(() => { arena.env.cli(['user', 'unlock', 'alice'], { allowFailure: true }); });
    await Promise.race([exited, new Promise((_, rej) => setTimeout(() => rej(new Error('alice\'s connection stayed open after the lock')), 60_000))]);
    await logged(before, (r) => r.event === 'ssh.connection_ended' && r.account === 'alice' && r.reason === 'account locked');
    // bob's connections are not touched.
    await arena.expectServes('bob');
    // And alice cannot log in again.
    const again = await arena.ssh('alice', ['echo', 'in'], { timeoutMs: 60_000 });
    expect(again.stdout).toBe('');
  }, 300_000);
});
