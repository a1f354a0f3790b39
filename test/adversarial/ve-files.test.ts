import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runProgram } from '../helpers/ssh-harness.js';
import { makeArena, plantAttack, serverAlive, type Arena } from './kit.js';

/**
 * Host code that touches a VE's tree, and the VE's files seen from the host:
 * the shutdown marker in /run/vesh (H2), the mount options and directory
 * modes that keep a VE-made setuid file from any host user (H7), the chown
 * of the VE's disk directories (H7), the descriptors `vesh ve exec` hands
 * over (L2), and host paths in the VE's mountinfo (L6).
 */

const VESH = path.resolve('bin/vesh.js');
const IDMAP_BASE = 100000;

describe('host code on VE trees: no symlink followed, no FIFO waited on, no VE file reachable by host users', () => {
  let arena: Arena;
  /** Host files and directories the attacks aim at: made by the test, root's, harmless. */
  let targets: string;

  const veDir = () => arena.env.layout.veDir('alice');
  /** The vesh CLI against the arena's instance, killed when it hangs. */
  const cli = (args: string[], timeoutMs = 120_000) => runProgram(process.execPath, [VESH, '--config', arena.env.configFile, ...args], { timeoutMs });

  beforeAll(async () => {
    arena = await makeArena({ template: 'busybox' });
    targets = mkdtempSync('/var/tmp/vesh-adv-files-');
    arena.cleanup.add(() => rmSync(targets, { recursive: true, force: true }));
    // alice's first login creates and starts her VE.
    const r = await arena.ssh('alice', ['true']);
    expect(r.code, r.stderr).toBe(0);
  });

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  it('shows the VE no host path in its /proc/self/mountinfo (overlay layers given by descriptor)', async () => {
    const r = await arena.ssh('alice', ['cat', '/proc/self/mountinfo']);
    expect(r.code, r.stderr).toBe(0);
    const root = r.stdout.split('\n').find((l) => l.split(' ')[4] === '/');
    expect(root, r.stdout).toContain('overlay');
    expect(r.stdout).not.toContain(arena.env.dir);
    expect(r.stdout).not.toContain(arena.env.layout.dataDir);
  });

  it('vesh ve exec without a terminal gives the process in the VE pipes, not the admin\'s own descriptors', async () => {
    const input = path.join(targets, 'admin-stdin');
    const errFile = path.join(targets, 'admin-stderr');
    writeFileSync(input, 'typed-by-the-admin\n');
    const inFd = openSync(input, 'r');
    const errFd = openSync(errFile, 'w');
    try {
      const child = spawn(process.execPath, [VESH, '--config', arena.env.configFile, 've', 'exec', 'alice', '--', '/bin/sh', '-c', 'readlink /proc/self/fd/0; readlink /proc/self/fd/2; cat; exit 3'], { stdio: [inFd, 'pipe', errFd] });
      let out = '';
      child.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
      const code = await new Promise<number | null>((resolve) => child.on('close', (c) => resolve(c)));
      const [fd0, fd2, relayed] = out.split('\n');
      // Not the admin's file (its host path, or a path outside the VE's root), but a pipe of ours.
      expect(fd0, out).toMatch(/^pipe:\[\d+\]$/);
      expect(fd2, out).toMatch(/^pipe:\[\d+\]$/);
      // The bytes still get through both ways, and the exit status too.
      expect(relayed).toBe('typed-by-the-admin');
      expect(code).toBe(3);
    } finally {
      closeSync(inFd);
      closeSync(errFd);
    }
  });

  it('a setuid copy made by VE root gives no host user its uid: VE mounts are nosuid,nodev and VE directories closed to others', async () => {
    const inVe = await plantAttack(arena.env, 'alice', 've-suid-probe');
    await arena.sh('alice', `chmod 4755 ${inVe}`);
    const hostPath = path.join(veDir(), 'rootfs', inVe);
    expect(statSync(hostPath).mode & 0o4000).toBe(0o4000);
    expect(statSync(hostPath).uid).toBe(IDMAP_BASE);

    // An unprivileged host user cannot even reach the file through the VE's directory ...
    const asNobody = ['--reuid=65534', '--regid=65534', '--clear-groups'];
    // (setpriv keeps its capabilities until its own exec: the walk is done by a shell that has none.)
    const walk = spawnSync('setpriv', [...asNobody, '/bin/sh', '-c', 'exec "$0"', hostPath], { encoding: 'utf8', timeout: 30_000 });
    expect(walk.stdout).not.toContain(`euid=${IDMAP_BASE}`);
    expect(walk.status, `${walk.stdout}${walk.stderr}`).not.toBe(0);
    expect(walk.stderr).toMatch(/Permission denied/);

    // ... and handed an open descriptor to it (as a leaked fd or path would), runs it without its setuid bit.
    const fd = openSync(hostPath, 'r');
    try {
      const viaFd = spawnSync('setpriv', [...asNobody, '/bin/sh', '-c', 'exec /proc/self/fd/3'], { encoding: 'utf8', timeout: 30_000, stdio: ['ignore', 'pipe', 'pipe', fd] });
      expect(viaFd.stdout, viaFd.stderr).toMatch(/ruid=65534 euid=65534/);
    } finally {
      closeSync(fd);
    }

    // Every mount holding VE files says nosuid and nodev.
    for (const m of [path.join(veDir(), 'rootfs'), path.join(veDir(), 'private')]) {
      const opts = execFileSync('findmnt', ['-no', 'OPTIONS', '--mountpoint', m], { encoding: 'utf8' }).trim().split(',');
      expect(opts, m).toContain('nosuid');
      expect(opts, m).toContain('nodev');
    }

    // The VE's directory: root and VE root's host group only; above it, every VE's init passes (search only, no listing).
    for (const d of [arena.env.layout.dataDir, arena.env.layout.vesDir]) {
      const st = statSync(d);
      expect({ dir: d, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid }).toEqual({ dir: d, mode: 0o711, uid: 0, gid: 0 });
    }
    const veSt = statSync(veDir());
    expect({ mode: veSt.mode & 0o7777, uid: veSt.uid, gid: veSt.gid }).toEqual({ mode: 0o710, uid: 0, gid: IDMAP_BASE });
    expect(statSync(arena.env.layout.templatesDir).mode & 0o077).toBe(0);

    // Inside, the VE's own view still honours setuid (sudo, su, passwd for its plain users): it gives ids of the VE only.
    const cmd = await arena.env.ves.execCommand('alice', { argv: [inVe], uid: 1000, gid: 1000, tty: false, env: { PATH: '/bin:/usr/bin' } });
    const inside = spawnSync(cmd.file, cmd.args, { encoding: 'utf8', timeout: 60_000 });
    expect(inside.stdout, inside.stderr).toMatch(/ruid=1000 euid=0/);
  });

  it('vesh ve stop and restart write nothing through a /run/vesh/shutdown symlink to a host file', async () => {
    const victim = path.join(targets, 'shutdown-victim');
    await arena.sh('alice', `ln -sfn ${victim} /run/vesh/shutdown`);
    const stop = await cli(['ve', 'stop', 'alice']);
    expect(stop.code, stop.stderr).toBe(0);
    expect(existsSync(victim)).toBe(false);

    expect((await cli(['ve', 'start', 'alice'])).code).toBe(0);
    await arena.sh('alice', `ln -sfn ${victim} /run/vesh/shutdown`);
    const restart = await cli(['ve', 'restart', 'alice']);
    expect(restart.code, restart.stderr).toBe(0);
    expect(existsSync(victim)).toBe(false);
    // The monitor in vesh serve took neither for a reboot, and alice's VE serves her again.
    expect((await arena.env.ves.status('alice')).state).toBe('running');
    await arena.expectServes('alice');
    await arena.expectServes('bob');
    expect(serverAlive(arena)).toBe(true);
  });

  it('vesh ve stop completes when VE root put a FIFO at /run/vesh/shutdown', async () => {
    await arena.sh('alice', 'rm -f /run/vesh/shutdown; mkfifo /run/vesh/shutdown');
    // The engine's stop timeout is 5 s here; a stop blocked in open() never returns.
    const stop = await cli(['ve', 'stop', 'alice'], 90_000);
    expect(stop.signal, 'vesh ve stop hung and was killed').toBeNull();
    expect(stop.code, stop.stderr).toBe(0);
    expect((await arena.env.ves.status('alice')).state).toBe('stopped');
    // Its lock is free again: the next start works.
    const start = await cli(['ve', 'start', 'alice'], 90_000);
    expect(start.code, start.stderr).toBe(0);
    await arena.expectServes('bob');
  });

  it('a symlink planted where the VE\'s disk directories are chowned (by VE root\'s host uid) hands its target to nobody', async () => {
    // The review's attacker holds VE root's host uid (100000) on the host, which
    // owns the root of the VE's disk: it swaps the ctl directory for a link.
    const target = path.join(targets, 'chown-victim');
    mkdirSync(target);
    const priv = path.join(veDir(), 'private');
    const asVeRoot = ['--reuid', String(IDMAP_BASE), '--regid', String(IDMAP_BASE), '--clear-groups'];
    execFileSync('setpriv', [...asVeRoot, '/bin/sh', '-c', 'cd "$1" && mv ctl ctl.saved && ln -s "$2" ctl', 'plant', priv, target]);

    const restart = await cli(['ve', 'restart', 'alice'], 120_000);
    const st = statSync(target);
    expect({ uid: st.uid, gid: st.gid }).toEqual({ uid: 0, gid: 0 });
    // The start refuses the link and says where it is.
    expect(restart.code).not.toBe(0);
    expect(restart.stderr).toMatch(/ctl.*symlink|symlink.*ctl/);

    // The failed start left nothing mounted; bob never noticed.
    expect((await arena.env.ves.status('alice')).state).toBe('stopped');
    expect(readFileSync('/proc/self/mountinfo', 'utf8')).not.toContain(priv);
    await arena.expectServes('bob');
    expect(serverAlive(arena)).toBe(true);
  });
});
