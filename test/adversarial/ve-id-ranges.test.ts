import { closeSync, openSync, readFileSync, statSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, type VeTestEnv } from '../helpers/ve-env.js';
import { plantAttack } from './kit.js';

/**
 * Issue 11: any way to become one VE's host uid (a setuid file that escaped
 * nosuid, a runtime or kernel bug) must own that VE only. With one range
 * shared by every VE, the attacker below (alice's VE root's host uid) reads
 * bob's files and signals bob's processes; with a range per VE it gets
 * "Permission denied", while bob's own host uid, the control, still can.
 */
describe('one VE\'s host uid owns nothing of another VE, and a setuid file made in a VE gives a host user nothing', () => {
  let env: VeTestEnv;
  let alice: number;
  let bob: number;

  /** Run `script` on the host as `uid` (and its gid), with no capabilities and no groups, as the shell that setpriv execs. */
  const asHostUid = (uid: number, script: string, ...args: string[]) =>
    spawnSync('setpriv', [`--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', '/bin/sh', '-c', script, 'attack', ...args], { encoding: 'utf8', timeout: 30_000 });

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'busybox' });
    await env.ves.create('alice');
    await env.ves.create('bob');
    await env.ves.start('alice');
    await env.ves.start('bob');
    alice = (await env.ves.status('alice')).ids!.base;
    bob = (await env.ves.status('bob')).ids!.base;
    await shInVe(env, 'bob', 'echo bob-secret > /root/secret; chmod 600 /root/secret');
  });

  afterAll(async () => {
    await env?.cleanup();
  });

  it('a setuid-root file made in alice\'s VE is alice\'s range\'s on the host, and gives a host user handed it nothing', async () => {
    const inVe = await plantAttack(env, 'alice', 've-suid-probe');
    await shInVe(env, 'alice', `chmod 4755 ${inVe}`);
    const hostPath = path.join(env.layout.veDir('alice'), 'rootfs', inVe);
    const st = statSync(hostPath);
    expect(st.mode & 0o4000).toBe(0o4000);
    expect(st.uid).toBe(alice);
    expect(st.uid).not.toBe(bob);
    // Handed an open descriptor (the only way a host user gets at it: the VE's directory is closed), it runs without its setuid bit.
    const fd = openSync(hostPath, 'r');
    try {
      const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', '/bin/sh', '-c', 'exec /proc/self/fd/3'], { encoding: 'utf8', timeout: 30_000, stdio: ['ignore', 'pipe', 'pipe', fd] });
      expect(r.stdout, r.stderr).toMatch(/ruid=65534 euid=65534/);
    } finally {
      closeSync(fd);
    }
  });

  it('alice\'s VE root host uid can neither read bob\'s files nor signal bob\'s init; bob\'s own uid (the control) can', async () => {
    expect(alice).not.toBe(bob);
    const secret = path.join(env.layout.veDir('bob'), 'rootfs', 'root', 'secret');
    const bobInit = String((await env.ves.status('bob')).pid);

    const read = asHostUid(alice, 'cat "$1"', secret);
    expect(read.stdout).not.toContain('bob-secret');
    expect(read.stderr).toMatch(/Permission denied/);
    const signal = asHostUid(alice, 'kill -0 "$1"', bobInit);
    expect(signal.status).not.toBe(0);
    expect(signal.stderr).toMatch(/Operation not permitted|not permitted/i);

    // Control: the very same commands as bob's own host uid work, so only the range stops alice.
    expect(asHostUid(bob, 'cat "$1"', secret).stdout).toBe('bob-secret\n');
    expect(asHostUid(bob, 'kill -0 "$1"', bobInit).status).toBe(0);
  });

  it('the template on disk is host root\'s, beyond any VE uid\'s reach', () => {
    const busybox = path.join(env.layout.templateRootfs('busybox'), 'bin', 'busybox');
    expect(statSync(busybox).uid).toBe(0);
    const before = readFileSync(busybox);
    const write = asHostUid(alice, 'echo x >> "$1"', busybox);
    expect(write.status).not.toBe(0);
    expect(readFileSync(busybox).equals(before)).toBe(true);
  });
});
