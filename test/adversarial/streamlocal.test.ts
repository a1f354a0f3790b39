import { chmodSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { Client } from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { waitFor } from '../helpers/ve-env.js';
import { makeArena, runAttack as runAttackFrom, serverAlive, type Arena } from './kit.js';

const HOSTILE = path.join(path.dirname(new URL(import.meta.url).pathname), 'hostile-worker.mjs');
const ATTACKER = '127.0.0.2';

type Step = Record<string, unknown> & { step: string };

/**
 * "A Unix socket path is resolved in the VE's mount namespace, with the VE's
 * credentials, never on the host." VE root (alice) names, over
 * direct-streamlocal and streamlocal-forward, paths that would reach host
 * files if anything on the host side resolved them: a real listening host
 * socket (by its path, through a symlink in the VE, through /proc/1/root),
 * an abstract socket, a FIFO, a regular file, paths too long for sun_path, a
 * bind over an existing file. And a compromised worker asks the broker for
 * Unix-socket forwards and an agent socket for an account whose forwarding
 * is off, and for one in bob's VE. Every SSH worker of this server is
 * hostile-worker.mjs (which serves ordinary clients with the real worker
 * code, and attacks only from 127.0.0.2).
 *
 * Without the guard: connecting to the same paths from the host reaches the
 * host socket (asserted below as the control), and a broker that took a VE
 * or user from the frame would act in bob's VE.
 */
describe('adversarial: Unix-socket forwarding', () => {
  let arena: Arena;
  let alice: Client;
  let hostDir: string;
  let hostSock: string;
  let hostServer: net.Server;
  let abstractServer: net.Server;
  let hostHits = 0;
  const abstractName = `\0vesh-sl-host-${process.pid}`;

  beforeAll(async () => {
    arena = await makeArena({
      template: 'busybox',
      // Unlink on: a socket in the way is removed before bind; anything else must still be refused and kept.
      // And agent forwarding off server-wide: a worker's agent.listen is refused whatever the account says.
      extraYaml: 'workers: { count: 2 }\nsessions: { streamLocalBindUnlink: true, agentForwarding: false }',
      accounts: { alice: [], bob: [], carol: ['ve: alice', 'forwarding: false', 'agentForwarding: false'] },
      serveEnv: { VESH_WORKER_SCRIPT: HOSTILE },
    });
    // A real listening socket on the host that anyone may connect to: only the VE's own mount namespace keeps it out of reach.
    hostDir = mkdtempSync('/tmp/vesh-sl-host-');
    chmodSync(hostDir, 0o755);
    arena.cleanup.add(() => rmSync(hostDir, { recursive: true, force: true }));
    hostSock = path.join(hostDir, 'host.sock');
    hostServer = net.createServer((s) => {
      hostHits += 1;
      s.end('HOST-SECRET\n');
    });
    await new Promise<void>((r) => hostServer.listen(hostSock, () => r()));
    chmodSync(hostSock, 0o777);
    arena.cleanup.add(() => new Promise<void>((r) => hostServer.close(() => r())));
    abstractServer = net.createServer((s) => {
      hostHits += 1;
      s.end('HOST-SECRET\n');
    });
    await new Promise<void>((r) => abstractServer.listen(abstractName, () => r()));
    arena.cleanup.add(() => new Promise<void>((r) => abstractServer.close(() => r())));
    await arena.expectServes('alice');
    await arena.expectServes('bob');
    // ssh2's client, not OpenSSH's: it names any path, and sends the openssh_ requests to a server that is not OpenSSH (strictVendor off).
    alice = new Client();
    alice.on('error', () => undefined);
    arena.cleanup.add(() => { alice.end(); });
    await new Promise<void>((resolve, reject) => {
      alice.once('ready', () => resolve());
      alice.once('error', reject);
      alice.connect({ host: '127.0.0.1', port: arena.serve.port, username: 'alice', privateKey: readFileSync(arena.keys.alice!.file), readyTimeout: 60_000, strictVendor: false });
    });
  }, 300_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  /** direct-streamlocal to `p` as alice: what came back, or "refused: …" when the channel was not opened. */
  const connectVia = (p: string): Promise<string> => new Promise((resolve) => {
    const t = setTimeout(() => resolve('timeout'), 20_000);
    alice.openssh_forwardOutStreamLocal(p, (err, ch) => {
      if (err) {
        clearTimeout(t);
        resolve(`refused: ${err.message}`);
        return;
      }
      let out = '';
      ch.on('data', (d: Buffer) => { out += d.toString(); });
      ch.on('error', () => undefined);
      ch.on('close', () => { clearTimeout(t); resolve(out); });
      ch.end();
    });
  });

  /** streamlocal-forward of `p` as alice: null when bound, else the error. */
  const listenVia = (p: string): Promise<string | null> => new Promise((resolve) => {
    alice.openssh_forwardInStreamLocal(p, (err) => resolve(err ? err.message : null));
  });

  it('control: the host socket and the abstract one answer from the host', async () => {
    const read = (target: string) => new Promise<string>((resolve) => {
      const s = net.connect(target);
      let out = '';
      s.on('data', (d: Buffer) => { out += d.toString(); });
      s.on('error', (e) => resolve(`ERR ${e.message}`));
      s.on('close', () => resolve(out));
    });
    expect(await read(hostSock)).toBe('HOST-SECRET\n');
    expect(await read(abstractName)).toBe('HOST-SECRET\n');
    hostHits = 0;
  });

  it('never reaches a host socket: by its host path, through a symlink in the VE, through /proc/1/root, or as an abstract name', async () => {
    await arena.sh('alice', `ln -sf ${hostSock} /tmp/link.sock; ln -sfn /proc/1/root /tmp/p1; mkdir -p /tmp/hostdir; ln -sfn ${hostDir} /tmp/hostdir/d`);
    const paths = [hostSock, '/tmp/link.sock', `/tmp/p1${hostSock}`, `/proc/1/root${hostSock}`, `/tmp/hostdir/d/host.sock`, abstractName, `@${abstractName.slice(1)}`];
    for (const p of paths) {
      const got = await connectVia(p);
      expect(got, `direct-streamlocal to ${JSON.stringify(p)}`).toMatch(/^refused/);
    }
    expect(hostHits).toBe(0);
    const failed = arena.serve.logs.filter((e) => e.event === 'forward.failed' && e.kind === 'local-unix').map((e) => String(e.err));
    // Resolved in the VE, where no such file is: ENOENT from the kernel there, not a host connect.
    expect(failed.some((e) => /ENOENT/.test(e))).toBe(true);
    // The abstract names are refused before anything is asked of the VE.
    expect(arena.serve.logs.some((e) => e.event === 'forward.refused' && e.kind === 'local-unix' && /invalid socket path/.test(String(e.reason)))).toBe(true);
  }, 120_000);

  it('a FIFO, a regular file, a relative path and a path longer than sun_path are refused, and the helper still serves', async () => {
    await arena.sh('alice', 'rm -f /tmp/fifo; mkfifo /tmp/fifo; echo keep > /tmp/regular');
    for (const p of ['/tmp/fifo', '/tmp/regular', '/etc/passwd', 'tmp/regular', `/tmp/${'x'.repeat(110)}`, `/${'a/'.repeat(60)}s.sock`]) {
      expect(await connectVia(p), `direct-streamlocal to ${p.slice(0, 40)}`).toMatch(/^refused/);
    }
    // Still answering: a -R socket it binds is reachable by a connect through it.
    expect(await listenVia('/tmp/after.sock')).toBeNull();
    const r = await arena.sh('alice', 'test -S /tmp/after.sock && echo socket');
    expect(r.stdout.trim()).toBe('socket');
    expect(hostHits).toBe(0);
  }, 120_000);

  it('a -R bind never replaces a regular file or a FIFO, even with streamLocalBindUnlink (which removes only a socket in the way)', async () => {
    await arena.sh('alice', 'rm -f /tmp/fifo2; mkfifo /tmp/fifo2; echo keep > /tmp/regular2; ln -sf /etc/passwd /tmp/plink');
    for (const p of ['/tmp/regular2', '/tmp/fifo2', '/tmp/plink', `/tmp/p1${hostDir}/new.sock`, `${hostDir}/new.sock`]) {
      const err = await listenVia(p);
      // The last two resolve in the VE: /proc/1/root is the VE init's root, and the host's temp dir is not there.
      expect(err, `streamlocal-forward ${p}`).not.toBeNull();
    }
    const r = await arena.sh('alice', 'cat /tmp/regular2; stat -c %F /tmp/fifo2 /tmp/plink; head -c 5 /etc/passwd');
    expect(r.stdout).toBe('keep\nfifo\nsymbolic link\nroot:');
    expect(readFileSync('/etc/passwd', 'utf8').length).toBeGreaterThan(0);
    // A socket in the way is replaced (unlink on): a cancelled -R leaves its file, as OpenSSH's does, and the next bind takes the path.
    await arena.sh('alice', 'rm -f /tmp/stale.sock');
    expect(await listenVia('/tmp/stale.sock')).toBeNull();
    await new Promise<void>((resolve, reject) => alice.openssh_unforwardInStreamLocal('/tmp/stale.sock', (err) => (err ? reject(err) : resolve())));
    expect((await arena.sh('alice', 'test -S /tmp/stale.sock && echo left')).stdout.trim()).toBe('left');
    expect(await listenVia('/tmp/stale.sock')).toBeNull();
  }, 120_000);

  // ------------------------------------------------------------ a compromised worker

  const runAttack = (name: string, args: Record<string, unknown> = {}, timeoutMs?: number): Promise<Step[]> =>
    runAttackFrom(arena.serve.port, ATTACKER, name, args, timeoutMs);
  const stepOf = (steps: Step[], name: string): Step => {
    const s = steps.find((x) => x.step === name);
    if (!s) throw new Error(`no "${name}" step in ${JSON.stringify(steps)}`);
    return s;
  };

  it('a compromised worker gets no Unix-socket forward and no agent socket for an account whose forwarding is off', async () => {
    const m = arena.serve.logs.length;
    const steps = await runAttack('streamlocal-refused', { user: 'carol', privateKey: readFileSync(arena.keys.carol!.file, 'utf8') });
    expect(stepOf(steps, 'auth.publickey').success, JSON.stringify(steps)).toBe(true);
    expect(stepOf(steps, 'forward.connect_unix')).toMatchObject({ ok: false, error: 'forwarding is off for this account' });
    expect(stepOf(steps, 'forward.listen_unix')).toMatchObject({ ok: false, error: 'forwarding is off for this account' });
    // Off for the account and for the server here: the server's switch is checked first.
    expect(stepOf(steps, 'agent.listen')).toMatchObject({ ok: false, error: 'agent forwarding refused: agent forwarding is off on this server (sessions.agentForwarding)' });
    // The log line comes through the server's output, which may trail the reply the worker got.
    await arena.serve.waitForLog((e) => arena.serve.logs.indexOf(e) >= m && e.event === 'agent.refused' && e.account === 'carol', 15_000);
    // Nothing was started for it: no forward helper in alice's VE (carol's), no socket.
    const r = await arena.sh('alice', 'ls /tmp/vesh-sl-pwned.sock /tmp/ssh-* 2>&1; echo end');
    expect(r.stdout).not.toMatch(/^\/tmp\/(vesh-sl-pwned\.sock|ssh-)/m);
  }, 120_000);

  it('a compromised worker gets no agent socket when sessions.agentForwarding is off, for an account that allows it', async () => {
    const steps = await runAttack('streamlocal-refused', { user: 'alice', privateKey: readFileSync(arena.keys.alice!.file, 'utf8') });
    expect(stepOf(steps, 'auth.publickey').success, JSON.stringify(steps)).toBe(true);
    expect(stepOf(steps, 'agent.listen')).toMatchObject({ ok: false, error: 'agent forwarding refused: agent forwarding is off on this server (sessions.agentForwarding)' });
    const r = await arena.sh('alice', 'ls -d /tmp/ssh-* 2>&1; echo end');
    expect(r.stdout).not.toMatch(/^\/tmp\/ssh-/m);
    // alice may forward: the attack's -R socket was bound, and is not what the next test is about.
    await arena.sh('alice', 'rm -f /tmp/vesh-sl-pwned.sock');
  }, 120_000);

  it('ends a compromised worker whose Unix-socket forward for alice names bob\'s VE and a user', async () => {
    const m = arena.serve.logs.length;
    const steps = await runAttack('streamlocal-other-ve', { user: 'alice', privateKey: readFileSync(arena.keys.alice!.file, 'utf8') });
    expect(stepOf(steps, 'auth.publickey').success, JSON.stringify(steps)).toBe(true);
    const worker = Number(stepOf(steps, 'conn').worker);
    const killed = await arena.serve.waitForLog((r) => arena.serve.logs.indexOf(r) >= m && r.event === 'broker.worker_killed' && r.worker === worker, 15_000);
    expect(String(killed.reason)).toMatch(/malformed forward\.listen_unix: .*Unrecognized key/);
    expect(steps.some((s) => s.step === 'done')).toBe(false);
    for (const ve of ['alice', 'bob']) {
      const r = await arena.sh(ve, 'ls /tmp/vesh-sl-pwned.sock 2>&1; echo end');
      expect(r.stdout, ve).toMatch(/No such file/);
    }
    await waitFor('the worker restarted', async () => arena.serve.logs.some((r) => arena.serve.logs.indexOf(r) > arena.serve.logs.indexOf(killed) && r.event === 'broker.worker_serving' && r.worker === worker), 30_000);
    expect(serverAlive(arena)).toBe(true);
    await arena.expectServes('bob');
  }, 120_000);
});
