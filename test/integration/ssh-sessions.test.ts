import argon2 from 'argon2';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import {
  Cleanup, ClientTerminal, keyAuthArgs, makeClientKey, sshBaseArgs, sshWithKey, sshWithPassword, startVeshServe, tempDir, writeAccounts,
  type ClientKey, type ServeProcess,
} from '../helpers/ssh-harness.js';

/**
 * `vesh serve` with real VEs (Debian template), driven by the real OpenSSH
 * client: logins, commands, terminals, isolation between accounts, hot
 * reload of accounts.yaml, audit events, and a shutdown that leaves VEs up.
 */
describe('vesh serve: logins and sessions in real VEs', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let serve: ServeProcess;
  let aliceKey: ClientKey;
  let bobKey: ClientKey;
  let newKey: ClientKey;
  let accountsFile: string;
  let baseAccounts: string;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'debian', extraYaml: 'auth: { maxAuthTries: 4, loginGraceTime: 20s, maxStartups: 20 }' });
    cleanup.add(() => env.cleanup());
    const dir = tempDir(cleanup);
    aliceKey = makeClientKey(dir, 'ed25519', 'alice');
    bobKey = makeClientKey(dir, 'rsa', 'bob');
    newKey = makeClientKey(dir, 'ecdsa', 'newkey');
    const hash = await argon2.hash('alice-secret', { type: argon2.argon2id });
    accountsFile = env.config.accountsFile;
    baseAccounts = [
      '# test accounts',
      'alice:',
      `  password: "${hash}"`,
      '  keys:',
      `    - ${aliceKey.publicLine} alice@test`,
      'bob:',
      '  keys:',
      `    - ${bobKey.publicLine} bob@test`,
      'erin:',
      '  keys:',
      `    - ${aliceKey.publicLine} erin@test`,
      'frank:',
      '  ve: alice',
      '  user: frank',
      '  keys:',
      `    - ${aliceKey.publicLine} frank@test`,
      'carol:',
      `  password: "${hash}"`,
      '  ve: alice',
      '  locked: true',
      '',
    ].join('\n');
    writeAccounts(accountsFile, baseAccounts);
    serve = await startVeshServe(cleanup, env.configFile);
  });

  afterAll(async () => {
    await cleanup.run();
  });

  const ssh = (key: ClientKey, user: string, cmd: string[], extra: string[] = [], input?: string) => sshWithKey(serve.port, user, key, cmd, { extra, input, timeoutMs: 120_000 });

  it('prints the listen address and host key fingerprints at start', () => {
    expect(serve.text()).toMatch(/listening on 127\.0\.0\.1:\d+/);
    expect(serve.text()).toMatch(/host key ssh-ed25519 SHA256:\S+/);
    expect(serve.text()).toMatch(/host key ssh-rsa SHA256:\S+/);
  });

  it('first key login creates the VE and runs the command inside it as root', async () => {
    const r = await ssh(aliceKey, 'alice', ['hostname; id -u; cat /proc/1/comm >/dev/null && ps -o pid= -p 1 | tr -d " "']);
    expect(r.stderr).toBe('');
    expect(r.stdout.split('\n').slice(0, 3)).toEqual(['alice', '0', '1']);
    expect(r.code).toBe(0);
    expect((await env.ves.status('alice')).state).toBe('running');
  });

  it('runs later sessions through the VE session agent, with the VE cgroups, seccomp filter and capabilities', async () => {
    // The first login went through runc exec and started the agent in the background.
    const parentOf = async () => (await ssh(aliceKey, 'alice', ['cat /proc/$PPID/comm'])).stdout.trim();
    await waitFor('sessions started by vesh-agent', async () => (await parentOf()) === 'vesh-agent', 30_000);
    // Same cgroups, seccomp mode and capabilities as the VE's init.
    const show = 'for p in self 1; do sort /proc/$p/cgroup | md5sum; grep -E "^(Seccomp|CapEff|CapBnd|NoNewPrivs):" /proc/$p/status; done';
    const r = await ssh(aliceKey, 'alice', [show]);
    const lines = r.stdout.trim().split('\n');
    expect(lines).toHaveLength(10);
    expect(lines.slice(0, 5)).toEqual(lines.slice(5));
    expect(lines).toContain('Seccomp:\t2');
    // VE root killing the agent: the next login still works (runc exec), and a new agent comes up.
    await shInVe(env, 'alice', 'pkill -x vesh-agent');
    const after = await ssh(aliceKey, 'alice', ['echo still-in']);
    expect(after.stdout).toBe('still-in\n');
    expect(after.code).toBe(0);
    await waitFor('a new vesh-agent', async () => (await parentOf()) === 'vesh-agent', 30_000);
  });

  it('runs a non-root account as its user inside the VE: home, no capabilities, its own terminal', async () => {
    await shInVe(env, 'alice', 'id frank >/dev/null 2>&1 || useradd -m -s /bin/bash frank');
    const r = await ssh(aliceKey, 'frank', ['id -un; id -u; pwd; echo "$HOME $USER $SHELL"; grep CapEff /proc/self/status; touch /etc/frank-was-here 2>&1 | grep -c "Permission denied"']);
    expect(r.stdout.split('\n').slice(0, 6)).toEqual(['frank', '1000', '/home/frank', '/home/frank frank /bin/bash', 'CapEff:\t0000000000000000', '1']);
    const term = new ClientTerminal([...sshBaseArgs(serve.port), ...keyAuthArgs(aliceKey), '-tt', 'frank@127.0.0.1']);
    cleanup.add(() => term.kill());
    try {
      await term.expect(/frank@alice:~\$ /);
      term.write('stat -c "OWNER=%U MODE=%a" $(tty)\r');
      await term.expect(/OWNER=frank MODE=620/);
      term.write('exit\r');
      expect(await term.waitExit()).toBe(0);
    } finally {
      term.kill();
    }
  });

  it('makes one VE for concurrent first logins of one account', async () => {
    const runs = await Promise.all([1, 2, 3, 4].map((i) => ssh(aliceKey, 'erin', [`echo login-${i}`])));
    runs.forEach((r, i) => expect(r.stdout).toBe(`login-${i + 1}\n`));
    const created = serve.logs.filter((e) => e.event === 've.created' && e.ve === 'erin');
    expect(created).toHaveLength(1);
    expect(serve.logs.filter((e) => e.event === 've.started' && e.ve === 'erin')).toHaveLength(1);
  });

  it('keeps stdout and stderr apart and passes exit codes and signals', async () => {
    const r = await ssh(aliceKey, 'alice', ['echo to-out; echo to-err >&2; exit 42']);
    expect(r.stdout).toBe('to-out\n');
    expect(r.stderr).toBe('to-err\n');
    expect(r.code).toBe(42);
    const k = await ssh(aliceKey, 'alice', ['kill -KILL $$']);
    expect(k.code).toBe(255);
    await serve.waitForLog((e) => e.event === 'ssh.session_end' && e.exitSignal === 'KILL');
    const big = await ssh(aliceKey, 'alice', ['sha256sum'], [], 'z'.repeat(1_000_000));
    expect(big.stdout).toMatch(/^[0-9a-f]{64} /);
  });

  it('logs in with a password (and keyboard-interactive); refuses wrong, locked and unknown alike', async () => {
    const ok = await sshWithPassword(serve.port, 'alice', 'alice-secret', ['echo pw-ok'], { timeoutMs: 120_000 });
    expect(ok.stdout).toBe('pw-ok\n');
    const kbd = await sshWithPassword(serve.port, 'alice', 'alice-secret', ['echo kbd-ok'], { method: 'keyboard-interactive', timeoutMs: 120_000 });
    expect(kbd.stdout).toBe('kbd-ok\n');
    // Wrong password, locked account, unknown user: refused, and alike to the client.
    const refused = [];
    for (const [user, pw] of [['alice', 'wrong'], ['carol', 'alice-secret'], ['nobody', 'alice-secret']] as const) {
      refused.push(await sshWithPassword(serve.port, user, pw, ['echo', 'should-not-run']));
    }
    for (const r of refused) {
      expect(r.code).not.toBe(0);
      expect(r.code).toBe(refused[0]!.code);
      expect(r.stdout).toBe('');
      expect(r.stderr).toMatch(/Permission denied/);
    }
    const fails = serve.logs.filter((e) => e.event === 'ssh.auth' && e.result === 'failure');
    expect(fails.map((e) => e.user)).toEqual(expect.arrayContaining(['alice', 'carol', 'nobody']));
    expect(JSON.stringify(serve.logs)).not.toContain('alice-secret');
    const success = serve.logs.find((e) => e.event === 'ssh.auth' && e.result === 'success' && e.method === 'publickey');
    expect(success).toMatchObject({ user: 'alice', account: 'alice', fingerprint: aliceKey.fingerprint, source: '127.0.0.1' });
  });

  it('gives a terminal from the VE devpts with the prompt, TERM, size and resizes', async () => {
    const term = new ClientTerminal([...sshBaseArgs(serve.port), ...keyAuthArgs(aliceKey), '-tt', 'alice@127.0.0.1']);
    cleanup.add(() => term.kill());
    try {
      await term.expect(/Welcome to your vesh VE/);
      await term.expect(/root@alice:~# /);
      term.write('t=$(tty); echo "TTY=$t"; test -c "$t" && echo TTY-EXISTS; echo "TERM=$TERM"; stty size\r');
      await term.expect(/TTY=\/dev\/pts\/\d+/);
      await term.expect(/TTY-EXISTS/);
      await term.expect(/TERM=xterm/);
      await term.expect(/24 80/);
      term.proc.resize(120, 40);
      await new Promise((r) => setTimeout(r, 500));
      term.write('stty size\r');
      await term.expect(/40 120/);
      // Job control: Ctrl-Z stops, fg resumes, Ctrl-C interrupts.
      term.write('sleep 300\r');
      await new Promise((r) => setTimeout(r, 500));
      term.write('\x1a');
      await term.expect(/Stopped/);
      term.write('fg\r');
      await new Promise((r) => setTimeout(r, 300));
      term.write('\x03');
      await term.expect(/root@alice:~# /);
      term.write('exit 7\r');
      expect(await term.waitExit()).toBe(7);
    } finally {
      term.kill();
    }
  });

  it('runs a login shell without a pty for ssh -T', async () => {
    const r = await ssh(aliceKey, 'alice', [], ['-T'], 'echo "no-tty:$(tty 2>&1)"; shopt -q login_shell && echo LOGIN\nexit 3\n');
    expect(r.stdout).toContain('no-tty:not a tty');
    expect(r.stdout).toContain('LOGIN');
    expect(r.code).toBe(3);
  });

  it('hangs up the processes of a closed session; detached daemons keep running', async () => {
    await ssh(aliceKey, 'alice', ['setsid sleep 1000 >/dev/null 2>&1 < /dev/null & echo started'], []);
    const term = new ClientTerminal([...sshBaseArgs(serve.port), ...keyAuthArgs(aliceKey), '-tt', 'alice@127.0.0.1', 'sleep 2000']);
    await new Promise((r) => setTimeout(r, 2000));
    term.kill(); // the client goes away: the session closes
    // Hung up: SIGHUP through the session agent; KILL when the session had to
    // take the relay path (agent busy or restarting) and the hang-up grace ran
    // out on a loaded host (seen once in CI). Either way the process must go.
    const ended = (e: Record<string, unknown>) => e.event === 'ssh.session_end' && (e.exitSignal === 'HUP' || e.exitSignal === 'KILL');
    await serve.waitForLog(ended, 20_000).catch((err: Error) => {
      throw new Error(`${err.message}\nsession ends: ${serve.logs.filter((e) => e.event === 'ssh.session_end').slice(-3).map((e) => JSON.stringify(e)).join('\n')}`);
    });
    let ps = { stdout: '' };
    for (let i = 0; i < 40; i++) {
      ps = await ssh(aliceKey, 'alice', ['ps -eo args']);
      if (!ps.stdout.includes('sleep 2000')) break;
      await new Promise((r) => setTimeout(r, 500));
    }
    expect(ps.stdout).toContain('sleep 1000');
    expect(ps.stdout).not.toContain('sleep 2000');
  });

  it('keeps two accounts in two VEs apart: files and processes', async () => {
    await ssh(aliceKey, 'alice', ['echo alice-private > /root/secret.txt; sleep 600 >/dev/null 2>&1 & disown; echo ok']);
    const b = await ssh(bobKey, 'bob', ['hostname; cat /root/secret.txt 2>&1; ps -eo args']);
    expect(b.stdout.split('\n')[0]).toBe('bob');
    expect(b.stdout).toContain('No such file');
    expect(b.stdout).not.toContain('sleep 600');
    const a = await ssh(aliceKey, 'alice', ['cat /root/secret.txt']);
    expect(a.stdout).toBe('alice-private\n');
  });

  it('applies an accounts.yaml edit without restart, and keeps the last good accounts on a broken edit', async () => {
    writeAccounts(accountsFile, `${baseAccounts}dave:\n  ve: bob\n  keys:\n    - ${newKey.publicLine} dave@test\n`);
    let r = { code: -1 as number | null, stdout: '' };
    for (let i = 0; i < 40 && r.code !== 0; i++) {
      await new Promise((res) => setTimeout(res, 250));
      r = await ssh(newKey, 'dave', ['hostname']);
    }
    expect(r.code).toBe(0);
    expect(r.stdout).toBe('bob\n');
    writeAccounts(accountsFile, 'alice:\n  keys: [this is: not valid\n');
    await new Promise((res) => setTimeout(res, 2000));
    const still = await ssh(aliceKey, 'alice', ['echo still-here']);
    expect(still.stdout).toBe('still-here\n');
    const dave = await ssh(newKey, 'dave', ['echo dave-still']);
    expect(dave.stdout).toBe('dave-still\n');
    writeAccounts(accountsFile, baseAccounts);
  });

  it('writes the audit events: connection, auth, session start/end with duration, exec command line', () => {
    const ev = (name: string) => serve.logs.filter((e) => e.event === name);
    expect(ev('ssh.connection').length).toBeGreaterThan(0);
    expect(ev('ssh.session_start').some((e) => e.command === 'echo to-out; echo to-err >&2; exit 42')).toBe(true);
    expect(ev('ssh.session_end').every((e) => typeof e.durationMs === 'number')).toBe(true);
    expect(ev('ssh.connection_closed').length).toBeGreaterThan(0);
  });

  it('on SIGTERM closes sessions cleanly and leaves the VEs running', async () => {
    const agentBefore = (await ssh(aliceKey, 'alice', ['[ "$(cat /proc/$PPID/comm)" = vesh-agent ] && echo $PPID'])).stdout.trim();
    expect(agentBefore).toMatch(/^\d+$/);
    const term = new ClientTerminal([...sshBaseArgs(serve.port), ...keyAuthArgs(aliceKey), '-tt', 'alice@127.0.0.1']);
    cleanup.add(() => term.kill());
    await term.expect(/root@alice:~# /);
    const code = await serve.stop('SIGTERM');
    expect(code).toBe(0);
    await term.waitExit();
    expect((await env.ves.status('alice')).state).toBe('running');
    expect((await env.ves.status('bob')).state).toBe('running');
    // A new server finds them again.
    serve = await startVeshServe(cleanup, env.configFile);
    // The new server takes over the VE's session agent at its first session
    // (not through runc exec until a launch finds it), and starts no second one.
    const first = await ssh(aliceKey, 'alice', ['echo $PPID; cat /root/secret.txt']);
    expect(first.stdout).toBe(`${agentBefore}\nalice-private\n`);
    const agents = await ssh(aliceKey, 'alice', ['echo $PPID; pgrep -c -x vesh-agent']);
    expect(agents.stdout).toBe(`${agentBefore}\n1\n`);
    void path;
  });
});
