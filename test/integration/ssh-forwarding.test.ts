import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import {
  Cleanup, freePort, keyAuthArgs, makeClientKey, readFrom, sshBaseArgs, sshWithKey, startVeshServe, tempDir, writeAccounts,
  type ClientKey, type ServeProcess,
} from '../helpers/ssh-harness.js';

/** A TCP server inside the VE (perl-base is in every Debian system) that greets each client. */
const veServer = (port: number, greeting: string) =>
  `setsid perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalAddr=>"127.0.0.1",LocalPort=>${port},Listen=>5,ReuseAddr=>1) or die "listen: $!"; while($c=$s->accept){print $c "${greeting}\\n"; close $c}' >/dev/null 2>&1 </dev/null & sleep 0.5; echo started`;

/** A TCP client inside the VE, printing what it reads. */
const veClient = (port: number) => `perl -MIO::Socket::INET -e '$c=IO::Socket::INET->new("127.0.0.1:${port}") or die "connect: $!\\n"; print <$c>'`;

/**
 * Port forwarding with real VEs: -L connects from inside the VE's network
 * namespace (its loopback, not the host's), -R listens inside it, and both
 * can be switched off per account and per key.
 */
describe('vesh serve: port forwarding stays inside the VE', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let serve: ServeProcess;
  let key: ClientKey;
  let restrictedKey: ClientKey;
  let noFwdKey: ClientKey;
  let hostServer: net.Server;
  let port: number;

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
    const dir = tempDir(cleanup);
    key = makeClientKey(dir, 'ed25519', 'alice');
    restrictedKey = makeClientKey(dir, 'ed25519', 'restricted');
    noFwdKey = makeClientKey(dir, 'ed25519', 'nofwd');
    writeAccounts(env.config.accountsFile, [
      'alice:',
      '  keys:',
      `    - ${key.publicLine}`,
      `    - no-port-forwarding ${restrictedKey.publicLine}`,
      'closed:',
      '  ve: alice',
      '  forwarding: false',
      '  keys:',
      `    - ${noFwdKey.publicLine}`,
      '',
    ].join('\n'));
    serve = await startVeshServe(cleanup, env.configFile);
    // The same port on the host's loopback, answering differently.
    port = await freePort();
    hostServer = net.createServer((s) => s.end('from-host\n'));
    await new Promise<void>((r) => hostServer.listen(port, '127.0.0.1', () => r()));
    cleanup.add(() => new Promise<void>((r) => hostServer.close(() => r())));
    const started = await sshWithKey(serve.port, 'alice', key, [veServer(port, 'from-ve')], { timeoutMs: 120_000 });
    expect(started.stdout).toContain('started');
  });

  afterAll(() => cleanup.run());

  /**
   * Host pids of the forward helpers running in alice's VE. A zombie has
   * exited: the VE's init reaps it when it gets to it, which on a loaded host
   * took over 10 s.
   */
  const forwardHelpers = async (): Promise<string[]> => {
    const init = (await env.ves.status('alice')).pid!;
    const initNs = readlinkSync(`/proc/${init}/ns/pid`);
    return readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
      try {
        const zombie = /^State:\s*Z/m.test(readFileSync(`/proc/${p}/status`, 'utf8'));
        return !zombie && readFileSync(`/proc/${p}/comm`, 'utf8').trim() === 'vesh-forward' && readlinkSync(`/proc/${p}/ns/pid`) === initNs;
      } catch { return false; }
    });
  };

  it('-L localhost:P reaches the VE loopback server, not the host one on the same port', async () => {
    const local = await freePort();
    const child = sshN(key, 'alice', ['-L', `${local}:localhost:${port}`]);
    let got = '';
    for (let i = 0; i < 60 && got !== 'from-ve\n'; i++) {
      await new Promise((r) => setTimeout(r, 250));
      got = await readFrom(local);
    }
    expect(got).toBe('from-ve\n');
    expect(await readFrom(port)).toBe('from-host\n');
    child.kill();
    await serve.waitForLog((e) => e.event === 'forward.open' && e.kind === 'local' && (e.target as { port: number }).port === port);
    await serve.waitForLog((e) => e.event === 'forward.close' && e.kind === 'local');
  });

  /** What the helpers still running are doing, for a failure message. */
  const describeHelpers = async (): Promise<string> => (await forwardHelpers()).map((p) => {
    try {
      const st = readFileSync(`/proc/${p}/status`, 'utf8');
      const f = (k: string) => new RegExp(`^${k}:\\s*(.*)$`, 'm').exec(st)?.[1];
      return `pid ${p} state ${f('State')} ppid ${f('PPid')} wchan ${readFileSync(`/proc/${p}/wchan`, 'utf8')} fds ${readdirSync(`/proc/${p}/fd`).length}`;
    } catch (e) { return `pid ${p}: ${(e as Error).message}`; }
  }).join('; ') + ` (log: ${serve.logs.filter((e) => /forward|conn|session_end/.test(String(e.event))).slice(-8).map((e) => JSON.stringify(e)).join(' ')})`;

  it('runs the forward helper inside the VE with its confinement, resolving names through the VE\'s own /etc/hosts', async () => {
    // The helper of the connection in the test before ended with that connection.
    await waitFor('the earlier connection\'s forward helper to exit', async () => (await forwardHelpers()).length === 0, 10_000);
    // A name only the VE knows: the host cannot resolve it.
    await sshWithKey(serve.port, 'alice', key, ['echo "127.0.0.1 vesh-fwd-test.internal" >> /etc/hosts']);
    const local = await freePort();
    const child = sshN(key, 'alice', ['-L', `${local}:vesh-fwd-test.internal:${port}`]);
    let got = '';
    for (let i = 0; i < 60 && got !== 'from-ve\n'; i++) {
      await new Promise((r) => setTimeout(r, 250));
      got = await readFrom(local);
    }
    expect(got).toBe('from-ve\n');
    // The helper, seen from the host: every namespace and cgroup of the VE's
    // init, the VE's seccomp filter, no_new_privs setting and capability set.
    const init = (await env.ves.status('alice')).pid!;
    const helpers = await forwardHelpers();
    expect(helpers).toHaveLength(1);
    const h = helpers[0]!;
    for (const ns of ['user', 'mnt', 'pid', 'net', 'uts', 'ipc', 'cgroup']) {
      expect(readlinkSync(`/proc/${h}/ns/${ns}`), ns).toBe(readlinkSync(`/proc/${init}/ns/${ns}`));
    }
    expect(readFileSync(`/proc/${h}/cgroup`, 'utf8')).toBe(readFileSync(`/proc/${init}/cgroup`, 'utf8'));
    const status = (pid: number | string, field: string) => new RegExp(`^${field}:\\s*(.*)$`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
    expect(status(h, 'Seccomp')).toBe('2');
    expect(status(h, 'NoNewPrivs')).toBe(status(init, 'NoNewPrivs'));
    expect(status(h, 'CapBnd')).toBe(status(init, 'CapBnd'));
    expect(status(h, 'CapEff')).toBe(status(init, 'CapEff'));
    expect(status(h, 'Uid')).toBe(status(init, 'Uid'));
    // VE root sees it among its own processes.
    expect((await sshWithKey(serve.port, 'alice', key, ['ps -eo comm'])).stdout).toContain('vesh-forward');
    child.kill();
    await serve.waitForLog((e) => e.event === 'forward.close' && e.kind === 'local' && (e.target as { host: string }).host === 'vesh-fwd-test.internal');
    await waitFor('the forward helper to exit with its connection', async () => (await forwardHelpers()).length === 0, 10_000);
  });

  it('a name lookup that hangs in the VE holds up only its own -L connection, not the others of that SSH connection', async () => {
    await waitFor('the earlier connection\'s forward helper to exit', async () => (await forwardHelpers()).length === 0, 10_000);
    // A DNS server in the VE that never answers, and the VE's resolver pointed at it.
    const silentDns = `setsid perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalAddr=>"127.0.0.53",LocalPort=>53,Proto=>"udp") or die "bind: $!"; while(1){$s->recv($b,512)}' >/dev/null 2>&1 </dev/null & sleep 0.5; echo started`;
    expect((await sshWithKey(serve.port, 'alice', key, ['cp /etc/resolv.conf /root/resolv.conf.saved && printf "nameserver 127.0.0.53\\noptions timeout:5 attempts:1\\n" > /etc/resolv.conf'])).code).toBe(0);
    expect((await sshWithKey(serve.port, 'alice', key, [silentDns])).stdout).toContain('started');
    try {
      const [slow, fast] = [await freePort(), await freePort()];
      const child = sshN(key, 'alice', ['-L', `${slow}:vesh-silent-dns.test:${port}`, '-L', `${fast}:localhost:${port}`]);
      let got = '';
      for (let i = 0; i < 60 && got !== 'from-ve\n'; i++) {
        await new Promise((r) => setTimeout(r, 250));
        got = await readFrom(fast);
      }
      expect(got).toBe('from-ve\n');
      const events: string[] = [];
      // The lookup starts, in a child of the helper (a second vesh-forward in the VE), which waits for the silent server.
      const slowDone = readFrom(slow).then((r) => { events.push(`slow:${r}`); });
      await waitFor('the lookup child of the forward helper', async () => (await forwardHelpers()).length === 2, 10_000);
      // Meanwhile another forward of the same connection goes through at once.
      events.push(`fast:${await readFrom(fast)}`);
      await slowDone;
      expect(events).toEqual(['fast:from-ve\n', 'slow:']);
      // The failed lookup is reported as such, once it gives up.
      await serve.waitForLog((e) => e.event === 'forward.failed' && /cannot resolve vesh-silent-dns\.test in the VE|looking up vesh-silent-dns\.test in the VE took longer/.test(String(e.err)), 30_000);
      child.kill();
      await waitFor('the forward helper and its lookup child to exit', async () => (await forwardHelpers()).length === 0, 30_000).catch(async (err: Error) => {
        throw new Error(`${err.message}: ${await describeHelpers()}`);
      });
    } finally {
      await sshWithKey(serve.port, 'alice', key, ['cp /root/resolv.conf.saved /etc/resolv.conf; pkill -f "LocalPort=>[5]3"; true']);
    }
  });

  it('-R listens inside the VE and relays back to the client side', async () => {
    const target = net.createServer((s) => s.end('from-client-side\n'));
    await new Promise<void>((r) => target.listen(0, '127.0.0.1', () => r()));
    cleanup.add(() => new Promise<void>((r) => target.close(() => r())));
    const tport = (target.address() as net.AddressInfo).port;
    const remote = await freePort();
    const child = sshN(key, 'alice', ['-R', `${remote}:127.0.0.1:${tport}`]);
    await serve.waitForLog((e) => e.event === 'forward.listen' && (e.bind as { port: number }).port === remote, 60_000);
    const r = await sshWithKey(serve.port, 'alice', key, [veClient(remote)]);
    expect(r.stdout).toBe('from-client-side\n');
    // Nothing listens on the host for it.
    expect(await readFrom(remote)).toMatch(/^ERR:ECONNREFUSED/);
    child.kill();
  });

  it('refuses forwarding for a no-port-forwarding key and for an account with forwarding off', async () => {
    for (const [k, user, reason] of [[restrictedKey, 'alice', 'no-port-forwarding key option'], [noFwdKey, 'closed', 'forwarding is off for this account']] as const) {
      const child = sshN(k, user, ['-R', `${await freePort()}:127.0.0.1:9`]);
      const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
      expect(code).toBe(255);
      await serve.waitForLog((e) => e.event === 'forward.refused' && e.reason === reason);
    }
  });
});
