import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseAccounts } from '../../src/config/accounts.js';
import { parseServerConfig } from '../../src/config/server-config.js';
import {
  Cleanup, freePort, keyAuthArgs, makeClientKey, runProgram, sshBaseArgs, startVeshServe, tempDir, writeAccounts,
  type ClientKey, type RunResult, type ServeProcess,
} from '../helpers/ssh-harness.js';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';

/**
 * Timeouts with the real OpenSSH client (issue 12): keepalives that end a
 * dead client and keep a live one, channel idle times, the unused-connection
 * time, and the maximum session time. Times are short (1-3 s); every wait is
 * a poll with a generous bound, never a wall-clock assertion.
 *
 * The dead client runs in a network namespace this file makes, joined to
 * the host by a veth pair with a private /30 (addresses in 127/8 are not
 * routed between namespaces); the server listens on the host's end of it.
 * Its TCP is then silently dropped by an nftables rule inside the namespace.
 */

const INTERVAL = '1s';
const COUNT_MAX = 2;
/** interval × (countMax + 1): the worker's limit; the polls below allow this plus ample slack. */
const ALIVE_LIMIT_MS = 1000 * (COUNT_MAX + 1);
const SLACK_MS = 12_000;

const ACCOUNTS = ['dead', 'alive', 'fwd', 'idle', 'glob', 'unused', 'capped'] as const;
type Name = (typeof ACCOUNTS)[number];

describe('ssh timeouts', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let serve: ServeProcess;
  const keys = {} as Record<Name, ClientKey>;
  const tag = randomBytes(2).toString('hex');
  const ns = `vto${tag}`;
  const hostVeth = `vtoh${tag}`;
  const third = 1 + Math.floor(Math.random() * 254);
  const fourth = 4 * Math.floor(Math.random() * 63);
  const hostAddr = `10.253.${third}.${fourth + 1}`;
  const nsAddr = `10.253.${third}.${fourth + 2}`;

  const ip = (...args: string[]) => {
    const r = spawnSync('ip', args, { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`ip ${args.join(' ')}: ${r.stderr}`);
  };

  beforeAll(async () => {
    try {
      cleanup.add(() => { spawnSync('ip', ['netns', 'del', ns]); });
      cleanup.add(() => { spawnSync('ip', ['link', 'del', hostVeth]); });
      ip('netns', 'add', ns);
      ip('link', 'add', hostVeth, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns);
      ip('addr', 'add', `${hostAddr}/30`, 'dev', hostVeth);
      ip('link', 'set', hostVeth, 'up');
      ip('-n', ns, 'addr', 'add', `${nsAddr}/30`, 'dev', 'eth0');
      ip('-n', ns, 'link', 'set', 'eth0', 'up');
      ip('-n', ns, 'link', 'set', 'lo', 'up');

      env = await makeVeTestEnv({
        template: 'busybox',
        extraYaml: [
          `timeouts: { clientAliveInterval: ${INTERVAL}, clientAliveCountMax: ${COUNT_MAX} }`,
          'sessions: { maxConnectionsPerAccount: 1 }',
        ].join('\n'),
      });
      cleanup.add(() => env.cleanup());
      // The server listens on the host's end of the test's veth only.
      writeFileSync(env.configFile, readFileSync(env.configFile, 'utf8').replace('listen: "127.0.0.1:0"', `listen: "${hostAddr}:0"`));
      const dir = tempDir(cleanup);
      const perAccount: Record<Name, string[]> = {
        dead: [],
        alive: [],
        fwd: ['  timeouts: { channelTimeout: { direct-tcpip: 2s } }'],
        idle: ['  timeouts: { channelTimeout: { session: 2s } }'],
        glob: ['  timeouts: { channelTimeout: { global: 2s } }'],
        unused: ['  timeouts: { unusedConnectionTimeout: 2s }'],
        capped: ['  timeouts: { maxSessionTime: 2s }'],
      };
      const lines: string[] = [];
      for (const name of ACCOUNTS) {
        keys[name] = makeClientKey(dir, 'ed25519', name);
        // One VE for all: fewer VEs to start; each test tells its processes apart by their arguments.
        lines.push(`${name}:`, '  ve: tmo', '  keys:', `    - ${keys[name].publicLine} ${name}@test`, ...perAccount[name]);
      }
      writeAccounts(env.config.accountsFile, `${lines.join('\n')}\n`);
      serve = await startVeshServe(cleanup, env.configFile);
      // The VE up before the first timed test.
      const r = await ssh('alive', ['echo', 'up']);
      expect(r.stdout.trim(), r.stderr).toBe('up');
    } catch (err) {
      await cleanup.run().catch(() => undefined);
      throw err;
    }
  }, 180_000);

  afterAll(async () => {
    await cleanup.run();
  });

  function sshArgs(name: Name, extra: string[] = []): string[] {
    return [...sshBaseArgs(serve.port, extra), ...keyAuthArgs(keys[name]), `${name}@${hostAddr}`];
  }

  function ssh(name: Name, cmd: string[], opts: { extra?: string[]; timeoutMs?: number } = {}): Promise<RunResult> {
    return runProgram('ssh', [...sshArgs(name, opts.extra), ...cmd], { timeoutMs: opts.timeoutMs ?? 60_000 });
  }

  /** A client left running in the background (killed at cleanup if still there). */
  function background(file: string, args: string[]): { child: ChildProcess; exit: Promise<number | null>; stderr: () => string } {
    const child = spawn(file, args, { stdio: ['pipe', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
    const exit = new Promise<number | null>((r) => child.on('close', (code) => r(code)));
    cleanup.add(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL'); });
    return { child, exit, stderr: () => err };
  }

  const veProcesses = async (): Promise<string> => (await shInVe(env, 'tmo', 'ps -o args')).stdout;

  it('ends a dead client (its TCP silently dropped) within interval x (countMax + 1): its connection record, its session in the VE and its account slot are gone', async () => {
    const client = background('ip', ['netns', 'exec', ns, 'ssh', ...sshArgs('dead'), 'sleep 1001']);
    await waitFor('the dead client\'s session in the VE', async () => (await veProcesses()).includes('sleep 1001'), 60_000);
    // The broker's log lines may come in after the session's process shows.
    const conn = (await serve.waitForLog((r) => r.event === 'ssh.login' && r.account === 'dead' && !r.refused, SLACK_MS)).conn;
    expect(conn).toBeTruthy();
    // While it holds its slot, the account's next login is refused (sessions.maxConnectionsPerAccount 1).
    const refused = await ssh('dead', ['true']);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/maxConnectionsPerAccount|too many/i);

    // From here on the namespace answers nothing and sends nothing.
    const nft = spawnSync('ip', ['netns', 'exec', ns, 'nft', '-f', '-'], {
      input: 'table inet vtodrop {\n chain cin { type filter hook input priority 0; policy drop; }\n chain cout { type filter hook output priority 0; policy drop; }\n}\n',
      encoding: 'utf8',
    });
    expect(nft.status, nft.stderr).toBe(0);

    await waitFor('the worker to give up on the dead client', async () => serve.logs.some((r) => r.event === 'ssh.client_alive_timeout' && r.conn === conn), ALIVE_LIMIT_MS + SLACK_MS);
    await waitFor('the worker to close the connection', async () => serve.logs.some((r) => r.event === 'ssh.connection_closed' && r.conn === conn), SLACK_MS);
    await waitFor('the dead client\'s session to be hung up in the VE', async () => !(await veProcesses()).includes('sleep 1001'), SLACK_MS);
    // The worker did it: the broker's own backstop had no need to act.
    expect(serve.logs.some((r) => r.event === 'ssh.client_silent_cut' && r.conn === conn)).toBe(false);
    // Its slot is free again.
    const again = await ssh('dead', ['echo', 'back']);
    expect(again.stdout.trim(), again.stderr).toBe('back');
    client.child.kill('SIGKILL');
  }, 120_000);

  it('keeps a live client that answers keepalives (ServerAliveInterval off) across several intervals', async () => {
    const r = await ssh('alive', ['sleep 5; echo still-here'], { extra: ['-v', '-o', 'ServerAliveInterval=0'] });
    expect(r.stdout.trim(), r.stderr.slice(-2000)).toBe('still-here');
    expect(r.code).toBe(0);
    // The server did probe it: OpenSSH logs each keepalive@openssh.com request it answers.
    expect((r.stderr.match(/client_input_global_request: rtype keepalive@openssh\.com want_reply 1/g) ?? []).length).toBeGreaterThanOrEqual(3);
  }, 60_000);

  it('closes an idle -L channel after channelTimeout.direct-tcpip, and keeps the connection', async () => {
    // A listener in the VE that keeps a connection open and says nothing.
    await shInVe(env, 'tmo', 'setsid httpd -p 127.0.0.1:7070 -h /tmp >/dev/null 2>&1 </dev/null; echo ok');
    const local = await freePort();
    const fwd = background('ssh', [...sshArgs('fwd', ['-N', '-L', `${local}:127.0.0.1:7070`])]);
    const conn = await waitForForward(local);
    const closed = new Promise<void>((r) => conn.on('close', () => r()));
    await Promise.race([closed, new Promise((_, rej) => setTimeout(() => rej(new Error('the idle forward was not closed')), 2_000 + SLACK_MS))]);
    const rec = await serve.waitForLog((r) => r.event === 'ssh.channel_timeout' && r.account === 'fwd', SLACK_MS);
    expect(rec.type).toBe('direct-tcpip');
    expect(rec.setting).toBe('channelTimeout.direct-tcpip');
    // Only the channel went: ssh -N still runs.
    expect(fwd.child.exitCode).toBeNull();
    fwd.child.kill('SIGTERM');
    await fwd.exit;
  }, 60_000);

  it('closes an idle session after channelTimeout.session (its process hung up), and not one that keeps printing', async () => {
    const idle = await ssh('idle', ['sleep 1002'], { timeoutMs: 2_000 + SLACK_MS + 5_000 });
    expect(idle.signal).toBeNull(); // it ended by itself, not by our timeout
    await serve.waitForLog((r) => r.event === 'ssh.channel_timeout' && r.account === 'idle' && r.type === 'session', SLACK_MS);
    await waitFor('the idle session\'s process to be hung up', async () => !(await veProcesses()).includes('sleep 1002'), SLACK_MS);
    // Output every second keeps a 2 s idle time from ever being reached.
    const busy = await ssh('idle', ['for i in 1 2 3 4 5; do echo $i; sleep 1; done; echo done']);
    expect(busy.stdout.trim().split('\n').at(-1), busy.stderr).toBe('done');
    expect(busy.code).toBe(0);
  }, 60_000);

  it('closes the channels of a connection idle as a whole after channelTimeout.global', async () => {
    const r = await ssh('glob', ['sleep 1006'], { timeoutMs: 2_000 + SLACK_MS + 5_000 });
    expect(r.signal).toBeNull();
    await serve.waitForLog((x) => x.event === 'ssh.channel_timeout' && x.account === 'glob' && x.setting === 'channelTimeout.global', SLACK_MS);
  }, 60_000);

  it('ends ssh -N with no channel after unusedConnectionTimeout', async () => {
    const r = await ssh('unused', [], { extra: ['-N'], timeoutMs: 2_000 + SLACK_MS + 5_000 });
    expect(r.signal).toBeNull();
    await serve.waitForLog((x) => x.event === 'ssh.unused_connection_timeout' && x.account === 'unused', SLACK_MS);
  }, 60_000);

  it('hangs up a session at maxSessionTime, telling the user why', async () => {
    const r = await ssh('capped', ['sleep 1003'], { timeoutMs: 2_000 + SLACK_MS + 5_000 });
    expect(r.signal).toBeNull();
    expect(r.stderr).toContain('time limit of 2s (timeouts.maxSessionTime)');
    await serve.waitForLog((x) => x.event === 'ssh.session_time_limit' && x.account === 'capped', SLACK_MS);
    await waitFor('the capped session\'s process to be gone', async () => !(await veProcesses()).includes('sleep 1003'), SLACK_MS);
    // With a terminal too: the message lands on it.
    const t = await ssh('capped', ['sleep 1004'], { extra: ['-tt'], timeoutMs: 2_000 + SLACK_MS + 5_000 });
    expect(t.stdout + t.stderr).toContain('time limit of 2s');
  }, 60_000);

  /** Connect to the local end of a -L forward until it is up; the connection, left open and silent. */
  async function waitForForward(port: number): Promise<net.Socket> {
    const end = Date.now() + 30_000;
    while (Date.now() < end) {
      const s = await new Promise<net.Socket | null>((resolve) => {
        const c = net.connect(port, '127.0.0.1');
        c.once('connect', () => resolve(c));
        c.once('error', () => resolve(null));
      });
      if (s) {
        s.on('error', () => undefined);
        cleanup.add(() => { s.destroy(); });
        return s;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`the -L forward on port ${port} never came up`);
  }
});

describe('timeouts settings', () => {
  const server = (timeouts: string) => () => parseServerConfig('/etc/vesh/vesh.yaml', `timeouts: ${timeouts}\n`);
  const account = (timeouts: string) => () => parseAccounts('/etc/vesh/accounts.yaml', `alice:\n  timeouts: ${timeouts}\n`);

  it('defaults: keepalives 60 s x 3, the rest off', () => {
    const t = parseServerConfig('/etc/vesh/vesh.yaml', '').timeouts;
    expect(t).toEqual({ clientAliveIntervalMs: 60_000, clientAliveCountMax: 3, channelTimeoutMs: {}, unusedConnectionTimeoutMs: 0, maxSessionTimeMs: 0 });
  });

  it('reads durations in the usual units, per channel type', () => {
    const t = server('{ clientAliveInterval: 15s, clientAliveCountMax: 5, channelTimeout: { session: 1h, direct-tcpip: 90 }, unusedConnectionTimeout: 5m, maxSessionTime: 8h }')().timeouts;
    expect(t).toEqual({ clientAliveIntervalMs: 15_000, clientAliveCountMax: 5, channelTimeoutMs: { session: 3_600_000, 'direct-tcpip': 90_000 }, unusedConnectionTimeoutMs: 300_000, maxSessionTimeMs: 8 * 3_600_000 });
    expect(account('{ maxSessionTime: 8h, channelTimeout: { global: 10m } }')().get('alice')?.timeouts).toEqual({ maxSessionTime: 8 * 3_600_000, channelTimeout: { global: 600_000 } });
  });

  it('refuses what it cannot honour, saying what is wrong', () => {
    expect(server('{ clientAliveInterval: 200ms }')).toThrow(/clientAliveInterval must be 0 \(off\) or between 1s/);
    expect(server('{ clientAliveInterval: soon }')).toThrow(/invalid clientAliveInterval "soon": use a number with a unit/);
    expect(server('{ clientAliveCountMax: 0 }')).toThrow(/clientAliveCountMax must be at least 1/);
    expect(server('{ maxSessionTime: 1000h }')).toThrow(/maxSessionTime must be 0 \(off\) or between 1s and 596h/);
    expect(server('{ channelTimeout: { x11: 1m } }')).toThrow(/x11/);
    expect(account('{ idle: 5m }')).toThrow(/accounts\.yaml:2.*idle/s);
  });
});
