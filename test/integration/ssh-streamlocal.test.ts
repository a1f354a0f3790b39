import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import {
  Cleanup, freePort, keyAuthArgs, makeClientKey, readFrom, sshBaseArgs, sshWithKey, startVeshServe, tempDir, writeAccounts,
  type ClientKey, type ServeProcess,
} from '../helpers/ssh-harness.js';

/** A Unix-socket server inside the VE (perl-base has IO::Socket::UNIX) that greets each client; `started` once it listens. */
const veUnixServer = (sock: string, greeting: string) =>
  `rm -f ${sock}; setsid perl -MIO::Socket::UNIX -e '$s=IO::Socket::UNIX->new(Local=>"${sock}",Listen=>5) or die "listen: $!"; while($c=$s->accept){print $c "${greeting}\\n"; close $c}' >/dev/null 2>&1 </dev/null & for i in $(seq 50); do [ -S ${sock} ] && break; sleep 0.1; done; echo started`;

/** A Unix-socket client inside the VE, printing what it reads (or "connect: ERROR"). */
const veUnixClient = (sock: string) => `perl -MIO::Socket::UNIX -e '$c=IO::Socket::UNIX->new(Peer=>"${sock}") or die "connect: $!\\n"; print <$c>'`;

/** Read a host Unix socket until EOF (or "ERR:CODE"). */
function readUnix(sock: string): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect(sock);
    let out = '';
    s.setTimeout(10_000, () => s.destroy());
    s.on('data', (d: Buffer) => { out += d.toString(); });
    s.on('error', (err: NodeJS.ErrnoException) => resolve(`ERR:${err.code}`));
    s.on('close', () => resolve(out));
    s.end();
  });
}

/**
 * Unix-socket forwarding (direct-streamlocal@openssh.com, streamlocal-forward@openssh.com)
 * with the real OpenSSH client: the socket is connected to or bound inside
 * the VE by the forward helper, as the account's user, and the account's and
 * key's forwarding switches refuse it as they refuse TCP forwards.
 */
describe('vesh serve: Unix-socket forwarding inside the VE', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let serve: ServeProcess;
  let key: ClientKey;
  let noFwdKey: ClientKey;
  let closedKey: ClientKey;
  let dir: string;

  const sshN = (k: ClientKey, user: string, fwd: string[]): ChildProcess => {
    const child = spawn('ssh', [...sshBaseArgs(serve.port), ...keyAuthArgs(k), '-N', '-o', 'ExitOnForwardFailure=yes', ...fwd, `${user}@127.0.0.1`], { stdio: ['ignore', 'ignore', 'pipe'] });
    cleanup.add(() => {
      child.kill('SIGKILL');
    });
    return child;
  };

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'debian' });
    cleanup.add(() => env.cleanup());
    dir = tempDir(cleanup);
    key = makeClientKey(dir, 'ed25519', 'alice');
    noFwdKey = makeClientKey(dir, 'ed25519', 'nofwd');
    closedKey = makeClientKey(dir, 'ed25519', 'closed');
    writeAccounts(env.config.accountsFile, [
      'alice:',
      '  keys:',
      `    - ${key.publicLine}`,
      `    - no-port-forwarding ${noFwdKey.publicLine}`,
      'closed:',
      '  ve: alice',
      '  forwarding: false',
      '  keys:',
      `    - ${closedKey.publicLine}`,
      '',
    ].join('\n'));
    serve = await startVeshServe(cleanup, env.configFile);
    const started = await sshWithKey(serve.port, 'alice', key, [veUnixServer('/tmp/ve.sock', 'from-ve-socket')], { timeoutMs: 120_000 });
    expect(started.stdout).toContain('started');
  }, 300_000);

  afterAll(() => cleanup.run());

  /** Poll `read` until it gives `want` (the forward needs the login first), or return its last answer. */
  const readUntil = async (read: () => Promise<string>, want: string): Promise<string> => {
    let got = '';
    for (let i = 0; i < 60 && got !== want; i++) {
      await new Promise((r) => setTimeout(r, 250));
      got = await read();
    }
    return got;
  };

  it('ssh -L /local.sock:/remote.sock reaches the socket a program listens on inside the VE', async () => {
    const local = path.join(dir, 'l1.sock');
    const child = sshN(key, 'alice', ['-L', `${local}:/tmp/ve.sock`]);
    expect(await readUntil(() => readUnix(local), 'from-ve-socket\n')).toBe('from-ve-socket\n');
    child.kill();
    await serve.waitForLog((e) => e.event === 'forward.open' && e.kind === 'local-unix' && (e.target as { path: string }).path === '/tmp/ve.sock');
  }, 60_000);

  it('ssh -L PORT:/remote.sock (a TCP port on the client to a socket in the VE)', async () => {
    const local = await freePort();
    const child = sshN(key, 'alice', ['-L', `${local}:/tmp/ve.sock`]);
    expect(await readUntil(() => readFrom(local), 'from-ve-socket\n')).toBe('from-ve-socket\n');
    child.kill();
  }, 60_000);

  it('ssh -R /remote.sock:localhost:PORT is a socket inside the VE, mode 0600 (StreamLocalBindMask 0177), owned by the session\'s user, that reaches the client side', async () => {
    const port = await freePort();
    const server = net.createServer((s) => s.end('from-client-side\n'));
    await new Promise<void>((r) => server.listen(port, '127.0.0.1', () => r()));
    cleanup.add(() => new Promise<void>((r) => server.close(() => r())));
    const child = sshN(key, 'alice', ['-R', `/tmp/r1.sock:localhost:${port}`]);
    await serve.waitForLog((e) => e.event === 'forward.listen' && e.kind === 'remote-unix' && (e.bind as { path: string }).path === '/tmp/r1.sock', 30_000);
    // Over SSH, not shInVe: its spawnSync would stall this process, which serves the client side.
    const r = await sshWithKey(serve.port, 'alice', key, [`stat -c '%a %U %F' /tmp/r1.sock; ${veUnixClient('/tmp/r1.sock')}`]);
    expect(r.stdout).toBe('600 root socket\nfrom-client-side\n');
    child.kill();
    // As with OpenSSH, the socket file stays after the forward ends (StreamLocalBindUnlink is for that): the next -R on the path fails until it is removed.
    await waitFor('the -R connection to end', async () => serve.logs.some((e) => e.event === 'ssh.connection_closed' && e.account === 'alice'), 15_000);
    const again = sshN(key, 'alice', ['-R', `/tmp/r1.sock:localhost:${port}`]);
    const code = await new Promise<number | null>((res) => again.on('exit', (c) => res(c)));
    expect(code).toBe(255);
    await serve.waitForLog((e) => e.event === 'forward.failed' && e.kind === 'remote-unix' && /EADDRINUSE/.test(String(e.err)));
    await shInVe(env, 'alice', 'rm -f /tmp/r1.sock');
  }, 60_000);

  it('refuses both directions with the no-port-forwarding key option and with forwarding: false, logging why', async () => {
    const local = path.join(dir, 'l2.sock');
    const l = sshN(noFwdKey, 'alice', ['-L', `${local}:/tmp/ve.sock`]);
    await waitFor('the -L socket to exist', async () => (await readUnix(local)) !== 'ERR:ENOENT', 30_000);
    expect(await readUnix(local)).toBe('');
    await serve.waitForLog((e) => e.event === 'forward.refused' && e.kind === 'local-unix' && e.reason === 'no-port-forwarding key option');
    l.kill();
    const r = sshN(closedKey, 'closed', ['-R', '/tmp/r2.sock:localhost:9']);
    expect(await new Promise<number | null>((res) => r.on('exit', (c) => res(c)))).toBe(255);
    await serve.waitForLog((e) => e.event === 'forward.refused' && e.kind === 'remote-unix' && e.reason === 'forwarding is off for this account');
    expect((await shInVe(env, 'alice', 'ls /tmp/r2.sock 2>&1 || true')).stdout).toMatch(/No such file/);
  }, 60_000);
});
