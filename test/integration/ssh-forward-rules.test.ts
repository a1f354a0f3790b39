import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import {
  Cleanup, freePort, keyAuthArgs, makeClientKey, runProgram, sshBaseArgs, sshWithKey, startVeshServe, tempDir, writeAccounts,
  type ClientKey, type ServeProcess,
} from '../helpers/ssh-harness.js';

const REQUEST = 'GET /index.html HTTP/1.0\r\n\r\n';

/** An HTTP GET through a local port, resolving with what came back ('' when the forward was refused). */
function httpVia(port: number): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    let out = '';
    s.setTimeout(10_000, () => s.destroy());
    s.on('connect', () => s.write(REQUEST));
    s.on('data', (d: Buffer) => { out += d.toString(); });
    s.on('error', () => resolve(out));
    s.on('close', () => resolve(out));
  });
}

/**
 * Forwarding rules with the real OpenSSH client: permitopen= and
 * permitlisten= on a key, permitOpen / permitListen on an account, and
 * expiry-time=. The broker decides (the worker only relays), logs the rule
 * that refused, and the client sees the channel open or global request fail.
 */
describe('vesh serve: forwarding rules (permitopen, permitlisten, expiry-time)', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let serve: ServeProcess;
  let ruled: ClientKey;
  let expired: ClientKey;
  let current: ClientKey;
  let daveKey: ClientKey;
  let hostPort: number;

  const sshN = (key: ClientKey, user: string, fwd: string[]): ChildProcess => {
    const child = spawn('ssh', [...sshBaseArgs(serve.port), ...keyAuthArgs(key), '-N', ...fwd, `${user}@127.0.0.1`], { stdio: ['ignore', 'ignore', 'pipe'] });
    cleanup.add(() => { child.kill('SIGKILL'); });
    return child;
  };
  const sshW = (key: ClientKey, user: string, target: string) => runProgram('ssh', [...sshBaseArgs(serve.port), ...keyAuthArgs(key), '-W', target, `${user}@127.0.0.1`], { input: REQUEST, timeoutMs: 60_000 });
  const refusedBy = (mark: number, pred: (e: Record<string, unknown>) => boolean) => serve.waitForLog((e) => serve.logs.indexOf(e) >= mark && e.event === 'forward.refused' && pred(e));

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'busybox' });
    cleanup.add(() => env.cleanup());
    const dir = tempDir(cleanup);
    ruled = makeClientKey(dir, 'ed25519', 'ruled');
    expired = makeClientKey(dir, 'ed25519', 'expired');
    current = makeClientKey(dir, 'ed25519', 'current');
    daveKey = makeClientKey(dir, 'ed25519', 'dave');
    writeAccounts(env.config.accountsFile, [
      'alice:',
      '  keys:',
      `    - permitopen="127.0.0.1:8081",permitlisten="localhost:9001" ${ruled.publicLine}`,
      `    - expiry-time="20200101" ${expired.publicLine}`,
      `    - expiry-time="20990101Z" ${current.publicLine}`,
      'dave:',
      '  ve: alice',
      '  permitOpen: ["127.0.0.1:8082"]',
      '  permitListen: [none]',
      '  keys:',
      `    - ${daveKey.publicLine}`,
      '',
    ].join('\n'));
    serve = await startVeshServe(cleanup, env.configFile);
    // Two web servers on the VE's loopback (busybox httpd daemonizes).
    const started = await sshWithKey(serve.port, 'alice', current, ['mkdir -p /www && echo from-ve > /www/index.html && httpd -p 127.0.0.1:8081 -h /www && httpd -p 127.0.0.1:8082 -h /www && echo started'], { timeoutMs: 120_000 });
    expect(started.stdout, started.stderr).toContain('started');
    hostPort = await freePort();
    const hostServer = net.createServer((s) => s.end('from-host\n'));
    await new Promise<void>((r) => hostServer.listen(hostPort, '127.0.0.1', () => r()));
    cleanup.add(() => new Promise<void>((r) => hostServer.close(() => r())));
  }, 300_000);

  afterAll(() => cleanup.run());

  it('permitopen: ssh -W reaches the allowed target and is refused another, naming the rule', async () => {
    const ok = await sshW(ruled, 'alice', '127.0.0.1:8081');
    expect(ok.stdout, ok.stderr).toContain('from-ve');
    const mark = serve.logs.length;
    const no = await sshW(ruled, 'alice', '127.0.0.1:8082');
    expect(no.code).toBe(255);
    expect(no.stdout).not.toContain('from-ve');
    expect(no.stderr).toMatch(/stdio forwarding failed|open failed/);
    const rec = await refusedBy(mark, (e) => (e.target as { port?: number } | undefined)?.port === 8082);
    expect(rec.rule).toBe('key option permitopen (127.0.0.1:8081)');
    // Literal hosts, as OpenSSH: "localhost" is not the "127.0.0.1" the rule names.
    expect((await sshW(ruled, 'alice', 'localhost:8081')).code).toBe(255);
  });

  it('permitopen: ssh -L forwards the allowed target and refuses the other channel', async () => {
    const [allowed, other] = [await freePort(), await freePort()];
    sshN(ruled, 'alice', ['-L', `${allowed}:127.0.0.1:8081`, '-L', `${other}:127.0.0.1:8082`]);
    let got = '';
    await waitFor('the -L forward to answer', async () => (got = await httpVia(allowed)).includes('from-ve'), 30_000);
    expect(got).toContain('from-ve');
    const mark = serve.logs.length;
    expect(await httpVia(other)).toBe('');
    expect((await refusedBy(mark, (e) => e.kind === 'local')).rule).toMatch(/permitopen/);
  });

  it('permitlisten: ssh -R listens on the allowed port and is refused another', async () => {
    const child = sshN(ruled, 'alice', ['-o', 'ExitOnForwardFailure=yes', '-R', `9001:127.0.0.1:${hostPort}`]);
    let seen = '';
    await waitFor('the -R listener inside the VE', async () => {
      seen = (await sshWithKey(serve.port, 'alice', current, ['nc 127.0.0.1 9001 </dev/null'])).stdout;
      return seen.includes('from-host');
    }, 30_000).catch((err: Error) => { throw new Error(`${err.message}: ${seen} ${JSON.stringify(serve.logs.filter((e) => /forward/.test(String(e.event))).slice(-6))}`); });
    expect(child.exitCode).toBeNull();
    const mark = serve.logs.length;
    const refused = await runProgram('ssh', [...sshBaseArgs(serve.port), ...keyAuthArgs(ruled), '-N', '-o', 'ExitOnForwardFailure=yes', '-R', `9002:127.0.0.1:${hostPort}`, 'alice@127.0.0.1'], { timeoutMs: 60_000 });
    expect(refused.code).toBe(255);
    expect(refused.stderr).toMatch(/remote port forwarding failed for listen port 9002/);
    expect((await refusedBy(mark, (e) => e.kind === 'remote')).rule).toBe('key option permitlisten (localhost:9001)');
  });

  it('account permitOpen / permitListen restrict a key with no options of its own', async () => {
    const mark = serve.logs.length;
    expect((await sshW(daveKey, 'dave', '127.0.0.1:8081')).code).toBe(255);
    expect((await refusedBy(mark, (e) => e.account === 'dave' && e.kind === 'local')).rule).toBe('account permitOpen (127.0.0.1:8082)');
    const ok = await sshW(daveKey, 'dave', '127.0.0.1:8082');
    expect(ok.stdout, ok.stderr).toContain('from-ve');
    const r = await runProgram('ssh', [...sshBaseArgs(serve.port), ...keyAuthArgs(daveKey), '-N', '-o', 'ExitOnForwardFailure=yes', '-R', `9003:127.0.0.1:${hostPort}`, 'dave@127.0.0.1'], { timeoutMs: 60_000 });
    expect(r.code).toBe(255);
    expect((await refusedBy(mark, (e) => e.account === 'dave' && e.kind === 'remote')).rule).toBe('account permitListen (none)');
  });

  it('expiry-time: a key past it cannot log in, one before it can', async () => {
    const mark = serve.logs.length;
    const old = await sshWithKey(serve.port, 'alice', expired, ['echo', 'in']);
    expect(old.code).toBe(255);
    expect(old.stderr).toMatch(/Permission denied/);
    await serve.waitForLog((e) => serve.logs.indexOf(e) >= mark && e.event === 'auth.key_expired' && e.fingerprint === expired.fingerprint);
    expect((await sshWithKey(serve.port, 'alice', current, ['echo', 'in'])).stdout.trim()).toBe('in');
  });
});
