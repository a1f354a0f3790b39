import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import {
  Cleanup, freePort, keyAuthArgs, makeClientKey, runProgram, sshBaseArgs, sshWithKey, startVeshServe, tempDir, writeAccounts,
  type ClientKey, type ServeProcess,
} from '../helpers/ssh-harness.js';

/**
 * Agent forwarding (ssh -A) with the real OpenSSH client and ssh-agent: the
 * session sees SSH_AUTH_SOCK naming a socket inside its VE, owned by its user
 * in a fresh 0700 directory; programs there use the client's agent through
 * it (ssh-add -l, and git over ssh to another vesh account whose key only the
 * agent holds); the socket goes with the connection; the key option, the
 * account and the server can each refuse it.
 */
describe('vesh serve: agent forwarding', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let serve: ServeProcess;
  let aliceKey: ClientKey;
  let noAgentKey: ClientKey;
  let carolKey: ClientKey;
  let bobKey: ClientKey;
  let daveKey: ClientKey;
  let agentSock: string;

  /**
   * ssh -A as `user` with `key` (IdentitiesOnly: the agent's keys are not
   * offered for this login), forwarding the test's agent, which holds only
   * bob's key. The client asks for forwarding only when SSH_AUTH_SOCK names
   * an agent, so the harness's IdentityAgent=none (which unsets it) is left out.
   */
  const sshA = (user: string, key: ClientKey, cmd: string, extra: string[] = []) => runProgram('ssh', [
    ...sshBaseArgs(serve.port, extra).filter((a, i, all) => a !== 'IdentityAgent=none' && !(a === '-o' && all[i + 1] === 'IdentityAgent=none')),
    ...keyAuthArgs(key), '-A', `${user}@127.0.0.1`, cmd,
  ], { env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: dirOf(agentSock), SSH_AUTH_SOCK: agentSock }, timeoutMs: 120_000 });
  const dirOf = (p: string) => path.dirname(p);

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'debian' });
    cleanup.add(() => env.cleanup());
    const dir = tempDir(cleanup);
    aliceKey = makeClientKey(dir, 'ed25519', 'alice');
    noAgentKey = makeClientKey(dir, 'ed25519', 'noagent');
    carolKey = makeClientKey(dir, 'ed25519', 'carol');
    bobKey = makeClientKey(dir, 'ed25519', 'bob');
    daveKey = makeClientKey(dir, 'ed25519', 'dave');
    writeAccounts(env.config.accountsFile, [
      'alice:',
      '  keys:',
      `    - ${aliceKey.publicLine}`,
      `    - no-agent-forwarding ${noAgentKey.publicLine}`,
      'carol:',
      '  ve: alice',
      '  agentForwarding: false',
      '  keys:',
      `    - ${carolKey.publicLine}`,
      'bob:',
      '  keys:',
      `    - ${bobKey.publicLine}`,
      // A plain user inside alice's VE (made below).
      'dave:',
      '  ve: alice',
      '  user: dave',
      '  keys:',
      `    - ${daveKey.publicLine}`,
      '',
    ].join('\n'));
    // The client's agent: bob's key is only here (the client logs in to alice with alice's key file).
    agentSock = path.join(dir, 'agent.sock');
    const agent = spawn('ssh-agent', ['-D', '-a', agentSock], { stdio: 'ignore' });
    cleanup.add(() => {
      agent.kill('SIGKILL');
    });
    await waitFor('ssh-agent to listen', async () => existsSync(agentSock), 10_000);
    const added = await runProgram('ssh-add', [bobKey.file], { env: { SSH_AUTH_SOCK: agentSock, PATH: process.env.PATH ?? '/usr/bin:/bin' } });
    expect(added.code, added.stderr).toBe(0);
    serve = await startVeshServe(cleanup, env.configFile);
    // bob's repository, made in bob's VE with git init --bare (and one commit to clone).
    const made = await sshWithKey(serve.port, 'bob', bobKey, [
      'set -e; git init -q /root/src; cd /root/src; git -c user.name=bob -c user.email=bob@test commit -q --allow-empty -m from-bobs-ve;'
      + ' git init -q --bare /root/repo.git; git push -q /root/repo.git HEAD:refs/heads/main; git -C /root/repo.git symbolic-ref HEAD refs/heads/main; echo made',
    ], { timeoutMs: 120_000 });
    expect(made.stdout, made.stderr).toContain('made');
    const user = await sshWithKey(serve.port, 'alice', aliceKey, ['useradd -m -s /bin/bash dave && echo made'], { timeoutMs: 120_000 });
    expect(user.stdout, user.stderr).toContain('made');
  }, 300_000);

  afterAll(() => cleanup.run());

  let lastSocket = '';

  it('ssh -A: SSH_AUTH_SOCK names a socket in the VE, 0600 in a 0700 directory of the session\'s user, and ssh-add -l there lists the client\'s key', async () => {
    const r = await sshA('alice', aliceKey, 'echo "sock=$SSH_AUTH_SOCK"; stat -c "%a %U %F" "$SSH_AUTH_SOCK" "$(dirname "$SSH_AUTH_SOCK")"; ssh-add -l');
    expect(r.code, r.stderr).toBe(0);
    const sock = /^sock=(.*)$/m.exec(r.stdout)?.[1] ?? '';
    expect(sock).toMatch(/^\/tmp\/ssh-[A-Za-z0-9]{10}\/agent\.\d+$/);
    expect(sock, 'all ten letters of the directory name drawn at random').not.toMatch(/ssh-XXXX/);
    expect(r.stdout).toContain('600 root socket\n700 root directory\n');
    expect(r.stdout).toContain(bobKey.fingerprint);
    expect(r.stdout).not.toContain(aliceKey.fingerprint);
    lastSocket = sock;
    await serve.waitForLog((e) => e.event === 'agent.listen' && e.path === sock);
  }, 120_000);

  it('for a plain user inside the VE, the socket and its directory are that user\'s, and other users there cannot reach the agent', async () => {
    const r = sshA('dave', daveKey, 'stat -c "%a %U %F" "$SSH_AUTH_SOCK" "$(dirname "$SSH_AUTH_SOCK")"; ssh-add -l; sleep 3');
    // While dave's connection holds it: another plain user of the VE is kept out by the kernel (0700 directory).
    const made = await serve.waitForLog((e) => e.event === 'agent.listen' && e.account === 'dave', 60_000);
    const other = await sshWithKey(serve.port, 'alice', aliceKey, [`ls -l ${String(made.path)}; su -s /bin/sh nobody -c "SSH_AUTH_SOCK=${String(made.path)} ssh-add -l" 2>&1; echo "nobody=$?"`], { timeoutMs: 60_000 });
    const dave = await r;
    expect(dave.code, dave.stderr).toBe(0);
    expect(dave.stdout).toContain('600 dave socket\n700 dave directory\n');
    expect(dave.stdout).toContain(bobKey.fingerprint);
    expect(other.stdout).toMatch(/^srw------- 1 dave dave /m);
    // EACCES on the 0700 directory, in ssh-add's words.
    expect(other.stdout).toContain('Error connecting to agent: Permission denied');
    expect(other.stdout).toContain('nobody=2');
    expect(other.stdout).not.toContain(bobKey.fingerprint);
  }, 120_000);

  it('removes the socket and its directory when the connection ends', async () => {
    expect(lastSocket).not.toBe('');
    await waitFor('the agent socket to go', async () => (await shInVe(env, 'alice', `test -e ${path.dirname(lastSocket)} && echo there || echo gone`)).stdout.trim() === 'gone', 15_000);
  }, 30_000);

  it('git clone from inside the VE through the forwarded agent, over ssh to bob\'s account on the same vesh server', async () => {
    // The VE reaches the server through the client's own -R (the host's services are not open to VEs): port P in alice's VE is vesh's port.
    const port = await freePort();
    const sshCmd = `ssh -p ${port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR`;
    const r = await sshA('alice', aliceKey, `rm -rf /tmp/clone; GIT_SSH_COMMAND="${sshCmd}" git clone -q ssh://bob@127.0.0.1:${port}/root/repo.git /tmp/clone && git -C /tmp/clone log --format=%s`, [
      '-R', `${port}:127.0.0.1:${serve.port}`, '-o', 'ExitOnForwardFailure=yes',
    ]);
    expect(r.stderr).not.toMatch(/Permission denied/);
    expect(r.stdout.trim(), r.stderr).toBe('from-bobs-ve');
    expect(r.code).toBe(0);
    // bob logged in with the key only the agent held.
    expect(serve.logs.some((e) => e.event === 'ssh.login' && e.account === 'bob' && e.fingerprint === bobKey.fingerprint)).toBe(true);
  }, 120_000);

  it('refuses it with the no-agent-forwarding key option and with agentForwarding: false, logging why', async () => {
    for (const [user, key, reason] of [['alice', noAgentKey, 'no-agent-forwarding key option'], ['carol', carolKey, 'agent forwarding is off for this account (agentForwarding: false)']] as const) {
      const r = await sshA(user, key, 'echo "sock=${SSH_AUTH_SOCK:-none}"; ssh-add -l; echo "added=$?"');
      expect(r.stdout, r.stderr).toContain('sock=none');
      expect(r.stdout).toContain('added=2');
      expect(r.stdout).not.toContain(bobKey.fingerprint);
      await serve.waitForLog((e) => e.event === 'agent.refused' && e.account === user && e.reason === reason);
    }
  }, 120_000);
});
