import { spawn, type ChildProcess } from 'node:child_process';
import os from 'node:os';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { keyAuthArgs, sshBaseArgs } from '../helpers/ssh-harness.js';
import { makeArena, plantAttack, serverAlive, ssh2Login, type Arena } from './kit.js';

/**
 * The SSH front end against an authenticated tenant (alice) who tries to
 * take more than her share, flood the log, or stall the event loop every
 * tenant shares; bob is the victim who must still be served. Caps are set
 * small in vesh.yaml so a test reaches them with a handful of connections.
 */

const CAP_CONNECTIONS = 3;
const CAP_SESSIONS = 3;

describe('the SSH front end against a hostile tenant', () => {
  let arena: Arena;
  const held: ChildProcess[] = [];

  beforeAll(async () => {
    arena = await makeArena({
      extraYaml: `sessions: { maxConnectionsPerAccount: ${CAP_CONNECTIONS}, maxSessionsPerAccount: ${CAP_SESSIONS} }`,
    });
    arena.cleanup.add(() => {
      for (const c of held) c.kill('SIGKILL');
    });
    // Both VEs exist and run before any attack.
    await arena.expectServes('alice');
    await arena.expectServes('bob');
  }, 600_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  }, 300_000);

  /** `ssh alice@… CMD` left running in the background (killed at cleanup). */
  function holdSession(account: string, cmd: string): ChildProcess {
    const child = spawn('ssh', [...sshBaseArgs(arena.serve.port), ...keyAuthArgs(arena.keys[account]!), `${account}@127.0.0.1`, cmd], {
      stdio: ['pipe', 'ignore', 'ignore'],
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir() },
    });
    held.push(child);
    return child;
  }

  const sessionsStarted = (account: string, tag: string) => arena.serve.logs.filter((r) => r.event === 'ssh.session_start' && r.account === account && String(r.command ?? '').includes(tag)).length;

  async function waitUntil(what: string, cond: () => boolean, timeoutMs = 120_000): Promise<void> {
    const end = Date.now() + timeoutMs;
    while (!cond()) {
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  it('refuses alice a connection over sessions.maxConnectionsPerAccount with a message saying so, and still serves bob', async () => {
    const tag = `held-${Date.now()}`;
    const mine = Array.from({ length: CAP_CONNECTIONS }, () => holdSession('alice', `sleep 300 # ${tag}`));
    await waitUntil(`${CAP_CONNECTIONS} sessions of alice`, () => sessionsStarted('alice', tag) >= CAP_CONNECTIONS);

    const over = await arena.ssh('alice', ['echo', 'should-not-run'], { timeoutMs: 60_000 });
    expect(over.stdout).toBe('');
    expect(over.code).not.toBe(0);
    expect(over.stderr).toContain(`too many connections for account alice (${CAP_CONNECTIONS})`);
    await waitUntil('the refusal to be logged', () => arena.serve.logs.some((r) => r.event === 'ssh.limit_reached' && r.account === 'alice' && r.setting === 'sessions.maxConnectionsPerAccount'), 15_000);

    // The victim is not affected by alice's cap, and the server is the same process.
    await arena.expectServes('bob');
    expect(serverAlive(arena)).toBe(true);

    // Her own connections are released when they end: she may log in again.
    for (const c of mine) c.kill('SIGTERM');
    await waitUntil('alice\'s held connections to close', () => mine.every((c) => c.exitCode !== null || c.signalCode !== null));
    await waitUntil('the server to see them closed', () => arena.serve.logs.filter((r) => r.event === 'ssh.connection_closed' && r.account === 'alice' && r.authenticated === true).length >= CAP_CONNECTIONS + 1);
    await arena.expectServes('alice');
  }, 300_000);

  it('refuses alice a session over sessions.maxSessionsPerAccount on one connection, telling her why', async () => {
    const c = await ssh2Login(arena, 'alice');
    const exec = (command: string) => new Promise<{ code: number | null; stderr: string; stream: import('ssh2').ClientChannel }>((resolve, reject) => {
      c.exec(command, (err, stream) => {
        if (err) return reject(err);
        let stderr = '';
        stream.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
        stream.resume();
        let code: number | null = null;
        stream.on('exit', (x: number | null) => { code = x; });
        // Sleepers resolve once started (see below); the refused one when it closes.
        stream.on('close', () => resolve({ code, stderr, stream }));
      });
    });
    const tag = `multi-${Date.now()}`;
    const sleepers: Array<Promise<unknown>> = [];
    for (let i = 0; i < CAP_SESSIONS; i++) sleepers.push(exec(`sleep 300 # ${tag}`));
    await waitUntil(`${CAP_SESSIONS} sessions on one connection`, () => sessionsStarted('alice', tag) >= CAP_SESSIONS);
    const refused = await exec('echo should-not-run');
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain(`too many sessions for account alice (${CAP_SESSIONS})`);
    expect(sessionsStarted('alice', 'should-not-run')).toBe(0);
    await arena.expectServes('bob');
    c.end();
    await Promise.allSettled(sleepers);
  }, 300_000);

  it('logs a bounded number of lines for a flood of clamped window sizes and refused signals, and counts the rest', async () => {
    const c = await ssh2Login(arena, 'alice');
    const before = arena.serve.logs.length;
    const FLOOD = 3000;
    await new Promise<void>((resolve, reject) => {
      c.shell({ rows: 24, cols: 80, term: 'xterm' }, (err, stream) => {
        if (err) return reject(err);
        stream.resume();
        stream.stderr.resume();
        for (let i = 0; i < FLOOD; i++) {
          // Sizes out of bounds are clamped, and each clamp was logged; so was
          // each signal (QUIT: an interactive shell ignores it).
          stream.setWindow(100_000 + i, 100_000 + i, 0, 0);
          stream.signal('QUIT');
        }
        // The shell answering afterwards proves the flood was processed.
        // Typed again until it answers: a signal may land while a line is typed.
        const ask = setInterval(() => stream.write('echo $((6*7))done\n'), 500);
        let out = '';
        stream.on('data', (d: Buffer) => {
          out += d.toString();
          if (out.includes('42done')) {
            clearInterval(ask);
            stream.end('exit\n');
          }
        });
        stream.on('close', () => clearInterval(ask));
        stream.on('close', () => resolve());
      });
    });
    c.end();
    const closedRecord = () => arena.serve.logs.slice(before).find((r) => r.event === 'ssh.connection_closed' && r.account === 'alice');
    await waitUntil('the flood connection to close', () => closedRecord() !== undefined, 60_000);
    const lines = arena.serve.logs.slice(before).filter((r) => ['ssh.pty_size_clamped', 'ssh.signal_refused', 'ssh.signal', 'ssh.request_refused'].includes(String(r.event)));
    // One capped mechanism per connection (MAX_REFUSAL_LOGS_PER_CONNECTION = 20), not one line per request.
    expect(lines.length).toBeLessThanOrEqual(20);
    // The rest are counted, and the count is reported when the connection closes.
    expect(Number(closedRecord()!.logLinesSuppressed)).toBeGreaterThanOrEqual(2 * FLOOD - 20);
    await arena.expectServes('bob');
  }, 300_000);

  it('stays responsive while VE root\'s fake sftp-server floods its stderr with crafted rename lines, parsing them at a bounded rate', async () => {
    // VE root replaces the real sftp-server with a program that writes
    // ~8 KiB crafted "rename" lines to stderr for 8 seconds.
    const fake = await plantAttack(arena.env, 'alice', 'sftp-stderr-flood');
    await arena.sh('alice', `cp ${fake} /usr/lib/openssh/sftp-server`);
    const before = arena.serve.logs.length;
    const started = Date.now();
    const attack = arena.ssh('alice', ['sftp'], { extra: ['-s'], timeoutMs: 120_000 });
    await waitUntil('the fake sftp-server to start', () => arena.serve.logs.slice(before).some((r) => r.event === 'ssh.session_start' && r.account === 'alice' && r.subsystem === 'sftp'), 60_000);
    // Bob logs in while the flood runs, on the same event loop.
    await arena.expectServes('bob');
    await attack;
    const elapsedS = (Date.now() - started) / 1000;
    expect(serverAlive(arena)).toBe(true);
    // What was parsed is bounded by the byte budget (256 KiB/s per session),
    // whatever the VE writes: each crafted line is ~8 KiB.
    const parsed = arena.serve.logs.slice(before).filter((r) => r.event === 'sftp.rename').length;
    expect(parsed).toBeLessThanOrEqual(Math.ceil(((elapsedS + 1) * 256 * 1024) / 8000));
    await waitUntil('the rate limit to be logged', () => arena.serve.logs.slice(before).some((r) => r.event === 'sftp.log_rate_limited' && r.account === 'alice'), 15_000);
    await arena.expectServes('bob');
  }, 300_000);
});
