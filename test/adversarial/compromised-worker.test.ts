import { createHash } from 'node:crypto';
import { readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';
import { makeArena, runAttack as runAttackFrom, serverAlive, type Arena } from './kit.js';

/**
 * "The broker refuses a compromised worker and stays up." Every SSH worker
 * of this `vesh serve` is test/adversarial/hostile-worker.mjs: it serves
 * OpenSSH clients with the real worker code, and on a connection from
 * 127.0.0.2 it makes the attack the test names, over its real request
 * channel and sign socket, reporting on that connection what it sent and
 * what came back. Each test shows what the broker did (the worker ended,
 * with the reason in `broker.worker_killed`, or a refusal), that no process
 * started in alice's or bob's VE, that the same broker process lives on, and
 * that the pool's restarted worker serves bob a real OpenSSH login.
 */

const HOSTILE = path.join(path.dirname(new URL(import.meta.url).pathname), 'hostile-worker.mjs');
const ATTACKER = '127.0.0.2';

type Step = Record<string, unknown> & { step: string };

describe('adversarial: a compromised SSH worker', () => {
  let arena: Arena;
  let alicePrivateKey: string;
  let canary: string;

  beforeAll(async () => {
    arena = await makeArena({ template: 'busybox', extraYaml: 'workers: { count: 2 }', serveEnv: { VESH_WORKER_SCRIPT: HOSTILE } });
    alicePrivateKey = readFileSync(arena.keys.alice!.file, 'utf8');
    canary = path.join(tempDir(arena.cleanup, 'vesh-canary-'), 'canary');
    writeFileSync(canary, 'untouched\n');
    // Both VEs up (the checks below look inside them); both workers ready.
    await arena.expectServes('alice');
    await arena.expectServes('bob');
    await waitFor('both hostile workers ready', async () => poolReady(), 30_000);
  }, 300_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  const logs = () => arena.serve.logs;

  /** Both workers started and not ended since (by their last start/exit records). */
  /** Both workers serve, as the broker sees it (it sends new connections only to those, when any does). */
  function poolReady(): boolean {
    return [0, 1].every((i) => {
      const last = logs().filter((r) => r.worker === i && (r.event === 'broker.worker_started' || r.event === 'broker.worker_exit' || r.event === 'broker.worker_serving')).at(-1);
      return last?.event === 'broker.worker_serving';
    });
  }

  /**
   * Connect from the attacker's address, name the attack, and collect the
   * hostile worker's report lines until it hangs up (it finished, or the
   * broker ended it and with it the connection).
   */
  const runAttack = (name: string, args: Record<string, unknown> = {}, timeoutMs?: number): Promise<Step[]> =>
    runAttackFrom(arena.serve.port, ATTACKER, name, args, timeoutMs);

  const stepOf = (steps: Step[], name: string): Step => {
    const s = steps.find((x) => x.step === name);
    if (!s) throw new Error(`no "${name}" step in ${JSON.stringify(steps)}`);
    return s;
  };

  /** The worker that held the attack connection was ended for `reason`; the pool starts its replacement. */
  async function expectKilled(mark: number, steps: Step[], reason: RegExp): Promise<Record<string, unknown>> {
    const worker = Number(stepOf(steps, 'conn').worker);
    const killed = await arena.serve.waitForLog((r) => logs().indexOf(r) >= mark && r.event === 'broker.worker_killed' && r.worker === worker, 15_000);
    expect(String(killed.reason)).toMatch(reason);
    expect(steps.some((s) => s.step === 'done'), `the worker finished its attack alive: ${JSON.stringify(steps)}`).toBe(false);
    await arena.serve.waitForLog((r) => logs().indexOf(r) >= mark && r.event === 'broker.worker_serving' && r.worker === worker, 30_000);
    return killed;
  }

  /**
   * The broker process is the same and serves: a real OpenSSH login of bob
   * through a (restarted) worker; returns the index of the worker that served it.
   */
  async function expectStillServing(): Promise<number> {
    expect(serverAlive(arena)).toBe(true);
    await waitFor('both workers up again', async () => poolReady(), 30_000);
    const m = mark();
    await arena.expectServes('bob');
    return Number(logs().slice(m).find((r) => r.event === 'ssh.connection')?.worker);
  }

  /** No process or file in either VE that an attack's command would have made. */
  async function expectNothingRanInVes(): Promise<void> {
    for (const ve of ['alice', 'bob']) {
      // Every process's command line but this shell's own (which names the pattern).
      const r = await arena.sh(ve, 'ls /tmp/pwned-* 2>/dev/null; for p in /proc/[0-9]*; do [ "$p" = /proc/$$ ] || { tr "\\0" " " < $p/cmdline 2>/dev/null; echo; }; done');
      expect(r.stdout, `${ve}'s VE ran something the hostile worker asked for`).not.toMatch(/pwned/);
    }
  }

  const mark = () => logs().length;

  /**
   * A real OpenSSH login that ran `cmd`, and its connection gone from the
   * broker (so the next connection goes to the least loaded worker again,
   * the first when all are idle); returns the login's connection record.
   */
  async function loginAndLeave(account: string, word: string): Promise<Record<string, unknown>> {
    const m = mark();
    const r = await arena.ssh(account, ['echo', word]);
    expect(r.stdout.trim(), r.stderr).toBe(word);
    const conn = await arena.serve.waitForLog((x) => logs().indexOf(x) >= m && x.event === 'ssh.connection');
    await arena.serve.waitForLog((x) => logs().indexOf(x) >= m && x.event === 'ssh.connection_closed' && x.conn === conn.conn);
    // The worker tells the broker right after it logs this.
    await new Promise((res) => setTimeout(res, 500));
    return conn;
  }

  it('ends a worker that asks for a session in preauth, and starts nothing in any VE', async () => {
    // Both workers serving, so the pool's choice (fewest connections, then the lower index) is known.
    await waitFor('both workers up', async () => poolReady(), 30_000);
    const m = mark();
    const steps = await runAttack('preauth-session-open');
    const killed = await expectKilled(m, steps, /session\.open in state preauth/);
    await expectNothingRanInVes();
    // Both workers idle: the pool gives bob's login the first, the one it
    // just replaced, so the replacement takes new connections and serves them.
    expect(killed.worker).toBe(0);
    expect(await expectStillServing()).toBe(0);
    expect(logs().slice(m).filter((r) => r.event === 'broker.worker_started' && r.worker === 0)).toHaveLength(1);
  }, 120_000);

  it('ends a worker that asks for a port forward in preauth', async () => {
    const m = mark();
    const steps = await runAttack('preauth-forward-connect');
    await expectKilled(m, steps, /forward\.connect in state preauth/);
    await expectStillServing();
  }, 120_000);

  it('refuses a forged signature over the right blob, and a session after it is still out of state', async () => {
    const m = mark();
    const steps = await runAttack('forged-signature', { user: 'alice', privateKey: alicePrivateKey });
    const auth = stepOf(steps, 'auth.publickey');
    expect(auth.ok, JSON.stringify(auth)).toBe(true);
    expect((auth.body as { success?: boolean }).success).toBe(false);
    await expectKilled(m, steps, /session\.open in state preauth/);
    expect(logs().slice(m).some((r) => r.event === 'ssh.auth' && r.user === 'alice' && r.result === 'failure')).toBe(true);
    expect(logs().slice(m).some((r) => r.event === 'ssh.login')).toBe(false);
    await expectNothingRanInVes();
    await expectStillServing();
  }, 120_000);

  it('refuses alice\'s real signature over a blob naming a session id the broker did not sign for this connection', async () => {
    const m = mark();
    const steps = await runAttack('wrong-session-id', { user: 'alice', privateKey: alicePrivateKey });
    const auth = stepOf(steps, 'auth.publickey');
    expect((auth.body as { success?: boolean }).success, JSON.stringify(auth)).toBe(false);
    const failure = logs().slice(m).find((r) => r.event === 'ssh.auth' && r.user === 'alice' && r.result === 'failure');
    expect(failure?.reason).toBe('signed data does not name this connection');
    await expectKilled(m, steps, /session\.open in state preauth/);
    await expectNothingRanInVes();
    await expectStillServing();
  }, 120_000);

  it('refuses a real login\'s blob and signature replayed on another connection', async () => {
    await waitFor('both workers up', async () => poolReady(), 30_000);
    const m = mark();
    // A real OpenSSH login of alice, through worker 0 (both idle: the pool picks the first).
    const loginWorker = (await loginAndLeave('alice', 'captured')).worker;
    const steps = await runAttack('replay');
    expect(stepOf(steps, 'conn').worker, 'the attack must land on the worker that saw the login').toBe(loginWorker);
    expect(stepOf(steps, 'captured').user).toBe('alice');
    const auth = stepOf(steps, 'auth.publickey');
    expect((auth.body as { success?: boolean }).success, JSON.stringify(auth)).toBe(false);
    const conn = stepOf(steps, 'conn').conn;
    expect(logs().slice(m).find((r) => r.event === 'ssh.auth' && r.conn === conn && r.result === 'failure')?.reason).toBe('signed data does not name this connection');
    await expectKilled(m, steps, /session\.open in state preauth/);
    await expectNothingRanInVes();
    await expectStillServing();
  }, 120_000);

  it('ends a worker whose session.open for alice names bob\'s VE, a user, a uid and an argv', async () => {
    const m = mark();
    const steps = await runAttack('session-extra-fields', { user: 'alice', privateKey: alicePrivateKey });
    expect(stepOf(steps, 'auth.publickey').success, JSON.stringify(steps)).toBe(true);
    const killed = await expectKilled(m, steps, /malformed session\.open: .*Unrecognized key/);
    for (const field of ['ve', 'user', 'uid', 'argv']) expect(String(killed.reason)).toContain(field);
    expect(logs().slice(m).some((r) => r.event === 'ssh.session_start')).toBe(false);
    await expectNothingRanInVes();
    await expectStillServing();
  }, 120_000);

  it('ends a worker that asks for a session on bob\'s connection held by the other worker, and one on a made-up id; bob\'s session goes on', async () => {
    await waitFor('both workers up', async () => poolReady(), 30_000);
    const m = mark();
    // bob holds a connection (worker 0, the least loaded); the attack lands on the other.
    const bobSession = arena.ssh('bob', ['sleep 6; echo bob-finished']);
    const bobConn = await arena.serve.waitForLog((r) => logs().indexOf(r) >= m && r.event === 'ssh.session_start' && r.account === 'bob', 30_000);
    const bobWorker = logs().find((r) => r.event === 'ssh.connection' && r.conn === bobConn.conn)?.worker;
    const steps = await runAttack('foreign-conn', { target: bobConn.conn });
    expect(stepOf(steps, 'conn').worker, 'the attack must come from the worker that does not hold bob').not.toBe(bobWorker);
    await expectKilled(m, steps, /session\.open for a connection that is not its own/);
    const bob = await bobSession;
    expect(bob.stdout.trim(), bob.stderr).toBe('bob-finished');

    const m2 = mark();
    const made = await runAttack('foreign-conn', { target: '0123456789abcdef' });
    await expectKilled(m2, made, /session\.open for a connection that is not its own/);
    expect(logs().slice(m).filter((r) => r.event === 'ssh.session_start' && r.conn !== bobConn.conn)).toEqual([]);
    await expectNothingRanInVes();
    await expectStillServing();
  }, 120_000);

  it('ends a worker that asks to sign another connection\'s exchange hash as a new connection\'s session id', async () => {
    await waitFor('both workers up', async () => poolReady(), 30_000);
    const m = mark();
    const login = await loginAndLeave('bob', 'kex');
    const steps = await runAttack('session-id-reuse');
    expect(stepOf(steps, 'conn').worker, 'the attack must land on the worker that saw the login').toBe(login.worker);
    const sign = stepOf(steps, 'sign');
    expect(sign.hashOf).toBe(login.conn);
    expect(steps.some((s) => s.step === 'answer' && (s.answer as { sig?: string }).sig), 'the broker signed a used session id').toBe(false);
    await expectKilled(m, steps, /malformed sign request/);
    await expectStillServing();
  }, 120_000);

  it('holds a connection to sessions.maxSessions even when a worker asks for 16 sessions at once', async () => {
    await waitFor('both workers up', async () => poolReady(), 30_000);
    const m = mark();
    const steps = await runAttack('session-burst', { user: 'alice', privateKey: alicePrivateKey });
    expect(stepOf(steps, 'auth.publickey').success, JSON.stringify(steps)).toBe(true);
    const burst = stepOf(steps, 'burst');
    // The default sessions.maxSessions is 10: the other six are refused with the cap's reason.
    expect(burst.ok, JSON.stringify(burst)).toBe(10);
    expect((burst.refused as string[]).every((e) => /too many sessions on this connection/.test(e))).toBe(true);
    expect(logs().slice(m).filter((r) => r.event === 'ssh.session_start').length).toBe(10);
    await expectStillServing();
  }, 120_000);

  it('signs one key exchange for a connection that has not logged in, and no more: no host-key signing service for a compromised worker', async () => {
    await waitFor('both workers up', async () => poolReady(), 30_000);
    const m = mark();
    const steps = await runAttack('sign-many');
    const answers = stepOf(steps, 'signs').answers as string[];
    // The first is the key exchange; every later one is refused, and the worker is not ended for asking.
    expect(answers[0]).toBe('sig');
    expect(answers.slice(1).every((a) => a === 'error'), `answers: ${answers.join(',')}`).toBe(true);
    expect(logs().slice(m).some((r) => r.event === 'broker.worker_killed')).toBe(false);
    await expectStillServing();
  }, 120_000);

  it('ends a worker whose request carries descriptors, and the broker holds no more descriptors after many tries', async () => {
    const pid = arena.serve.child.pid!;
    const fdCount = () => readdirSync(`/proc/${pid}/fd`).length;
    const counts: number[] = [];
    for (let i = 0; i < 5; i++) {
      const m = mark();
      const steps = await runAttack('fd-request');
      expect(stepOf(steps, 'send').fds).toBe(2);
      await expectKilled(m, steps, /carried descriptors/);
      await waitFor('both workers up', async () => poolReady(), 30_000);
      counts.push(fdCount());
    }
    // The first try sets the level (lazily opened handles); four more add nothing.
    expect(Math.max(...counts.slice(1)), `broker fd counts after each try: ${counts.join(', ')}`).toBeLessThanOrEqual(counts[0]! + 1);
    await expectStillServing();
  }, 180_000);

  describe('host files', () => {
    const fingerprint = (file: string) => {
      const st = statSync(file);
      return `${createHash('sha256').update(readFileSync(file)).digest('hex')} ${st.mtimeMs} ${st.size}`;
    };
    const watched = () => ['/etc/passwd', '/etc/shadow', canary].map(fingerprint);

    it('refuses host-path subsystems and forward targets, and keeps the client\'s LD_PRELOAD, PATH and BASH_ENV from the session', async () => {
      const before = watched();
      const m = mark();
      const steps = await runAttack('host-files-session', { user: 'alice', privateKey: alicePrivateKey });
      expect(stepOf(steps, 'auth.publickey').success, JSON.stringify(steps)).toBe(true);
      const traversal = stepOf(steps, 'subsystem-traversal');
      expect(traversal.ok).toBe(false);
      expect(String(traversal.error)).toMatch(/unknown subsystem/);
      // sftp with a command: the command is not used; sftp-server runs in alice's VE like any sftp session.
      expect(logs().slice(m).filter((r) => r.event === 'ssh.session_start' && r.kind === 'subsystem').map((r) => r.subsystem)).toEqual(['sftp']);
      const env = stepOf(steps, 'env-session');
      expect(env.ok, JSON.stringify(env)).toBe(true);
      const out = String(env.output);
      expect(out).toContain('END-OF-ENV');
      expect(out).toContain('LANG=C.UTF-8');
      // LANG and LC_* pass, as OpenSSH's AcceptEnv default; nothing else the client (or worker) names.
      expect(out).toMatch(/^LC_EVIL=x$/m);
      expect(out).not.toMatch(/LD_PRELOAD|BASH_ENV|\/evil/);
      expect(out).toMatch(/^PATH=/m);
      for (const host of ['/run/vesh/engine.sock', '../../etc/passwd']) {
        const f = steps.find((s) => s.step === 'forward.connect' && s.host === host);
        expect(f?.ok, JSON.stringify(f)).toBe(false);
        expect(String(f?.error)).toMatch(/invalid target/);
      }
      expect(stepOf(steps, 'done')).toBeTruthy();
      expect(logs().slice(m).some((r) => r.event === 'broker.worker_killed')).toBe(false);
      expect(watched()).toEqual(before);
      await expectStillServing();
    }, 120_000);

    it('answers a password check for a user named like a host path with a plain failure', async () => {
      const before = watched();
      const m = mark();
      const steps = await runAttack('password-path-user');
      const a = stepOf(steps, 'auth.password');
      expect(a.ok, JSON.stringify(a)).toBe(true);
      expect((a.body as { success?: boolean }).success).toBe(false);
      expect(logs().slice(m).some((r) => r.event === 'broker.worker_killed')).toBe(false);
      expect(watched()).toEqual(before);
      await expectStillServing();
    }, 120_000);

    it('ends a worker that sends a 1 MiB password or a frame over 256 KiB', async () => {
      const before = watched();
      for (const size of ['huge-password', 'over-frame']) {
        const m = mark();
        const steps = await runAttack('raw-frame', { size });
        // The broker ends the worker before it can report its send.
        expect(stepOf(steps, 'send').bytes).toBeGreaterThan(256 * 1024);
        const killed = await expectKilled(m, steps, /malformed frame/);
        expect(String(killed.reason)).toMatch(/over 262144 bytes/);
        expect(logs().slice(m).some((r) => r.event === 'ssh.auth')).toBe(false);
      }
      expect(watched()).toEqual(before);
      await expectStillServing();
    }, 120_000);

    it('drops __proto__ and constructor keys from a frame: the request is answered as the plain one, nothing is polluted', async () => {
      const m = mark();
      const steps = await runAttack('raw-frame', { size: 'proto' });
      const conn = stepOf(steps, 'conn').conn;
      expect(stepOf(steps, 'sent').sent).toBe(true);
      expect(stepOf(steps, 'answer').answer, 'the broker answered the frame as a plain password attempt').toMatchObject({ re: 900008, ok: true, success: false });
      // The frame without its prototype keys is a valid password attempt for alice, answered as a failure.
      await arena.serve.waitForLog((r) => logs().indexOf(r) >= m && r.event === 'ssh.auth' && r.conn === conn && r.user === 'alice' && (r.result === 'failure' || r.result === 'penalized'), 15_000);
      expect(logs().slice(m).some((r) => r.event === 'broker.worker_killed')).toBe(false);
      await arena.expectServes('alice');
      await arena.expectServes('bob');
      expect(logs().filter((r) => JSON.stringify(r).includes('polluted'))).toEqual([]);
      expect(serverAlive(arena)).toBe(true);
    }, 120_000);
  });
});
