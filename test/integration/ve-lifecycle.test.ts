import net from 'node:net';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import { createVeManager, createVeNetwork } from '../../src/ve/index.js';

const sh = shInVe;

describe('VE lifecycle, isolation and limits (busybox template, real runc)', () => {
  let env: VeTestEnv;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'busybox' });
    await env.ves.create('alpha', { limits: { memory: '64M', pids: 64, disk: '64M' } });
    await env.ves.create('beta');
    await env.ves.start('alpha');
    await env.ves.start('beta');
  });

  afterAll(async () => {
    await env?.cleanup();
  });

  it('gives each VE its own processes with its init as PID 1, and its own hostname', async () => {
    const ps = await sh(env, 'alpha', 'ps -o pid,comm');
    const lines = ps.stdout.trim().split('\n').slice(1).map((l) => l.trim().split(/\s+/));
    expect(lines.find((f) => f[0] === '1')?.[1]).toBe('init');
    // Only alpha's own processes: init, the shell and ps (plus what init started).
    expect(lines.length).toBeLessThan(8);
    expect((await sh(env, 'alpha', 'hostname')).stdout.trim()).toBe('alpha');
    expect((await sh(env, 'beta', 'hostname')).stdout.trim()).toBe('beta');
  });

  it('maps VE root to an unprivileged host uid', async () => {
    const st = await env.ves.status('alpha');
    const status = await fs.readFile(`/proc/${st.pid}/status`, 'utf8');
    expect(/^Uid:\s+(\d+)/m.exec(status)?.[1]).toBe(String(env.config.runtime.idmapBase));
    expect((await sh(env, 'alpha', 'id -u')).stdout.trim()).toBe('0');
  });

  it('keeps files private: a write in one VE lands in its own layer only', async () => {
    await sh(env, 'alpha', 'echo secret > /root/note; echo "10.1.2.3 extra" >> /etc/hosts');
    expect((await sh(env, 'beta', 'cat /root/note', { allowFailure: true })).code).not.toBe(0);
    expect((await sh(env, 'beta', 'cat /etc/hosts')).stdout).not.toContain('extra');
    const upper = path.join(env.layout.veDir('alpha'), 'private', 'upper', 'root', 'note');
    expect(await fs.readFile(upper, 'utf8')).toBe('secret\n');
    expect(existsSync(path.join(env.layout.templateRootfs('busybox'), 'root', 'note'))).toBe(false);
  });

  it('cannot signal another VE\'s processes', async () => {
    await sh(env, 'beta', 'nohup sleep 600 >/dev/null 2>&1 &');
    const hostPids = execFileSync('pgrep', ['-f', 'sleep 600'], { encoding: 'utf8' }).trim().split('\n');
    const victim = hostPids[hostPids.length - 1]!;
    const res = await sh(env, 'alpha', `kill -9 ${victim}`, { allowFailure: true });
    expect(res.code).not.toBe(0);
    expect(existsSync(`/proc/${victim}`)).toBe(true);
    await sh(env, 'beta', 'pkill -f "sleep 600" || killall sleep', { allowFailure: true });
  });

  it('denies VE root the host disk, /proc/sys writes and kernel modules', async () => {
    const mknod = await sh(env, 'alpha', 'mknod /tmp/hostdisk b 254 0 && mount /tmp/hostdisk /mnt', { allowFailure: true });
    expect(mknod.code).not.toBe(0);
    const sysctl = await sh(env, 'alpha', 'echo 1 > /proc/sys/net/ipv4/ip_forward', { allowFailure: true });
    expect(sysctl.code).not.toBe(0);
    expect(sysctl.stderr).toMatch(/Read-only|Permission denied/i);
    const sysrq = await sh(env, 'alpha', 'echo b > /proc/sysrq-trigger', { allowFailure: true });
    expect(sysrq.code).not.toBe(0);
  });

  it('keeps a nohup daemon running after its shell exits', async () => {
    await sh(env, 'alpha', 'nohup sleep 500 >/dev/null 2>&1 &');
    await new Promise((r) => setTimeout(r, 200));
    expect((await sh(env, 'alpha', 'ps')).stdout).toContain('sleep 500');
  });

  it('persists changes across a VE restart', async () => {
    await sh(env, 'alpha', 'echo kept > /etc/motd.local');
    await env.ves.restart('alpha');
    expect((await env.ves.status('alpha')).state).toBe('running');
    expect((await sh(env, 'alpha', 'cat /etc/motd.local')).stdout).toBe('kept\n');
    expect((await sh(env, 'alpha', 'ps')).stdout).not.toContain('sleep 500');
  });

  it('finds running VEs again from a fresh vesh process', async () => {
    const out = env.cli(['ve', 'list', '--json']);
    const list = JSON.parse(out.stdout) as Array<{ name: string; state: string; address: string }>;
    expect(list.map((v) => [v.name, v.state])).toEqual([['alpha', 'running'], ['beta', 'running']]);
    const status = JSON.parse(env.cli(['ve', 'status', 'beta', '--json']).stdout);
    expect(status.processes).toBeGreaterThan(0);
    expect(env.cli(['ve', 'list']).stdout).toMatch(/^NAME\s+STATE\s+ADDRESS/);
  });

  it('passes exit status through "vesh ve exec"', () => {
    expect(env.cli(['ve', 'exec', 'beta', '--', 'sh', '-c', 'exit 7'], { allowFailure: true }).code).toBe(7);
    expect(env.cli(['ve', 'exec', 'beta', '--', 'echo', 'hi']).stdout).toBe('hi\n');
  });

  it('serves from a VE at its address, reachable from the host', async () => {
    const { address } = await env.ves.status('beta');
    await sh(env, 'beta', 'mkdir -p /www && echo hello-from-beta > /www/index.html && httpd -p 8080 -h /www');
    const res = await fetch(`http://${address}:8080/`, { signal: AbortSignal.timeout(5000) });
    expect(await res.text()).toBe('hello-from-beta\n');
    // alpha cannot reach beta on the bridge.
    const cross = await sh(env, 'alpha', `wget -q -O - -T 2 http://${address}:8080/`, { allowFailure: true });
    expect(cross.code).not.toBe(0);
    // Nor can a VE reach a host service bound to 0.0.0.0 through its gateway.
    const hostServer = net.createServer((sock) => sock.end('host-secret\n'));
    await new Promise<void>((r) => hostServer.listen(0, '0.0.0.0', () => r()));
    try {
      const port = (hostServer.address() as net.AddressInfo).port;
      const gateway = address.replace(/\.\d+$/, '.1');
      const probe = await sh(env, 'alpha', `nc -w 2 ${gateway} ${port} </dev/null`, { allowFailure: true });
      expect(probe.stdout).not.toContain('host-secret');
    } finally {
      hostServer.close();
    }
  });

  it('stops a fork bomb at the VE\'s pids limit while another VE stays responsive', async () => {
    // 64 processes at most in alpha: the bomb fails to fork instead of filling the host.
    const bomb = await sh(env, 'alpha', 'i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done 2>&1; echo forked', { allowFailure: true, timeoutMs: 60_000 });
    expect(bomb.stdout + bomb.stderr).toMatch(/can't fork|Resource temporarily unavailable|Cannot allocate|fork/i);
    const st = await env.ves.status('alpha');
    expect(st.processes).toBeLessThanOrEqual(64);
    expect((await sh(env, 'beta', 'echo alive')).stdout).toBe('alive\n');
    await sh(env, 'alpha', 'killall sleep; true', { allowFailure: true });
  });

  it('OOM-kills a memory hog inside its VE only', async () => {
    // 64M limit; the shell tries to hold ~150 MB in a variable.
    const hog = await sh(env, 'alpha', 'x=$(head -c 150000000 /dev/zero | tr "\\0" a); echo survived ${#x}', { allowFailure: true, timeoutMs: 60_000 });
    expect(hog.stdout).not.toContain('survived');
    expect((await env.ves.status('alpha')).state).toBe('running');
    expect((await sh(env, 'beta', 'echo alive')).stdout).toBe('alive\n');
  });

  it('fails writes past the disk limit with ENOSPC in that VE only', async () => {
    // The disk image sits on a loop device of its own in direct-I/O mode (no second copy in the host's page cache).
    const image = path.join(env.layout.veDir('alpha'), 'disk.img');
    const dev = execFileSync('losetup', ['-n', '-O', 'NAME', '-j', image], { encoding: 'utf8' }).trim();
    expect(dev).toMatch(/^\/dev\/loop\d+$/);
    expect((await fs.readFile(`/sys/block/${path.basename(dev)}/loop/dio`, 'utf8')).trim()).toBe('1');
    const dd = await sh(env, 'alpha', 'dd if=/dev/zero of=/root/big bs=1M count=100', { allowFailure: true });
    expect(dd.code).not.toBe(0);
    expect(dd.stderr).toMatch(/No space left on device/);
    expect((await sh(env, 'beta', 'dd if=/dev/zero of=/root/ok bs=1M count=80 && echo ok')).stdout).toContain('ok');
    await sh(env, 'alpha', 'rm -f /root/big');
    await sh(env, 'beta', 'rm -f /root/ok');
  });

  it('restarts on reboot and stays down after poweroff (with the monitor running)', async () => {
    await env.ves.startMonitor(200);
    try {
      const before = (await env.ves.status('beta')).pid;
      await sh(env, 'beta', 'reboot', { allowFailure: true });
      await waitFor('beta to come back with a new init', async () => {
        const s = await env.ves.status('beta');
        return s.state === 'running' && s.pid !== before;
      });
      expect((await sh(env, 'beta', 'hostname')).stdout.trim()).toBe('beta');
      await sh(env, 'beta', 'poweroff', { allowFailure: true });
      await waitFor('beta to stop', async () => (await env.ves.status('beta')).state === 'stopped');
      await new Promise((r) => setTimeout(r, 1000));
      expect((await env.ves.status('beta')).state).toBe('stopped');
      // Stopped means cleaned up: no mounts left for it.
      const mounts = await fs.readFile('/proc/self/mountinfo', 'utf8');
      expect(mounts).not.toContain(env.layout.veDir('beta') + '/');
      // ...and its loop device freed.
      expect(execFileSync('losetup', ['-n', '-j', path.join(env.layout.veDir('beta'), 'disk.img')], { encoding: 'utf8' }).trim()).toBe('');
    } finally {
      env.ves.stopMonitor();
    }
  });

  it('starts the VEs marked onboot when vesh serve starts after a host reboot', async () => {
    env.cli(['ve', 'set', 'beta', '--onboot', 'yes']);
    await env.ves.stop('alpha', { kill: true });
    // What a host reboot leaves: no containers, mounts, bridge or firewall tables.
    await createVeNetwork(env.config, env.layout, env.logger).teardownHost();
    const booted = createVeManager(env.config, env.logger);
    expect(await booted.bootOnStart()).toEqual({ started: ['beta'], failed: [] });
    expect((await booted.status('beta')).state).toBe('running');
    expect((await booted.status('alpha')).state).toBe('stopped');
    expect((await sh(env, 'beta', 'hostname')).stdout.trim()).toBe('beta');
  });
});

describe('bad input leaves nothing half-made', () => {
  let env: VeTestEnv;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'busybox' });
  });

  afterAll(async () => {
    await env?.cleanup();
  });

  it('refuses invalid names, unknown templates and malformed limits with one clear line', () => {
    const bad = env.cli(['ve', 'create', '../x'], { allowFailure: true });
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/invalid VE name/);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    const long = env.cli(['ve', 'create', 'a'.repeat(40)], { allowFailure: true });
    expect(long.stderr).toMatch(/40 characters/);
    const tpl = env.cli(['ve', 'create', 'x1', '--template', 'nosuch'], { allowFailure: true });
    expect(tpl.code).not.toBe(0);
    expect(tpl.stderr).toMatch(/nosuch/);
    const lim = env.cli(['ve', 'create', 'x2', '--memory', '12XB'], { allowFailure: true });
    expect(lim.stderr).toMatch(/invalid memory limit "12XB"/);
    expect(env.cli(['ve', 'list', '--json']).stdout.trim()).toBe('[]');
  });

  it('refuses double create, double start and stopping a stopped VE', () => {
    env.cli(['ve', 'create', 'dup']);
    expect(env.cli(['ve', 'create', 'dup'], { allowFailure: true }).stderr).toMatch(/already exists/);
    expect(env.cli(['ve', 'stop', 'dup'], { allowFailure: true }).stderr).toMatch(/not running/);
    env.cli(['ve', 'start', 'dup']);
    const again = env.cli(['ve', 'start', 'dup'], { allowFailure: true });
    expect(again.code).not.toBe(0);
    expect(again.stderr).toMatch(/already running/);
    // A template a VE is built on cannot be removed.
    const rm = env.cli(['template', 'remove', 'busybox'], { allowFailure: true });
    expect(rm.code).not.toBe(0);
    expect(rm.stderr).toMatch(/template "busybox" is used by 1 VE\(s\) \(dup\)/);
    expect(JSON.parse(env.cli(['template', 'list', '--json']).stdout).map((t: { name: string }) => t.name)).toEqual(['busybox']);
    expect(env.cli(['ve', 'destroy', 'dup'], { allowFailure: true }).stderr).toMatch(/--force/);
    env.cli(['ve', 'destroy', 'dup', '--force']);
    expect(existsSync(env.layout.veDir('dup'))).toBe(false);
  });

  it('a start that fails (missing runtime binary) leaves no mount, veth, cgroup or engine state', async () => {
    env.cli(['ve', 'create', 'norun']);
    const text = (await fs.readFile(env.configFile, 'utf8')).replace('runtime: { stopTimeout: 5s }', 'runtime: { stopTimeout: 5s, binary: /nonexistent/runc }');
    const badConfig = path.join(env.dir, 'bad-runtime.yaml');
    await fs.writeFile(badConfig, text);
    const res = spawnSync(process.execPath, ['bin/vesh.js', '--config', badConfig, 've', 'start', 'norun'], { encoding: 'utf8' });
    expect(res.status).not.toBe(0);
    expect(res.stderr).toMatch(/runtime binary "\/nonexistent\/runc" was not found.*apt-get install runc/);
    const mounts = await fs.readFile('/proc/self/mountinfo', 'utf8');
    expect(mounts).not.toContain(env.layout.veDir('norun'));
    const links = execFileSync('ip', ['-o', 'link'], { encoding: 'utf8' });
    const rec = JSON.parse(await fs.readFile(path.join(env.layout.veDir('norun'), 've.json'), 'utf8'));
    expect(links).not.toContain(rec.hostVeth);
    expect(existsSync(`/sys/fs/cgroup/memory${env.layout.cgroupParent}/norun`)).toBe(false);
    expect(env.cli(['ve', 'status', 'norun', '--json']).stdout).toContain('"state": "stopped"');
  });

  it('a start whose network set-up fails leaves no mount, loop device, cgroup or engine state', async () => {
    env.cli(['ve', 'create', 'nonet']);
    const rec = JSON.parse(await fs.readFile(path.join(env.layout.veDir('nonet'), 've.json'), 'utf8'));
    // Something already holds the name of the VE's host-side veth (a leftover of a crashed run, say).
    execFileSync('ip', ['link', 'add', rec.hostVeth, 'type', 'bridge']);
    try {
      const res = env.cli(['ve', 'start', 'nonet'], { allowFailure: true });
      expect(res.code).not.toBe(0);
      expect(res.stderr).toContain(`${rec.hostVeth} already exists`);
      expect(res.stderr.trim().split('\n')).toHaveLength(1);
      expect(await fs.readFile('/proc/self/mountinfo', 'utf8')).not.toContain(env.layout.veDir('nonet'));
      expect(execFileSync('losetup', ['-n', '-j', path.join(env.layout.veDir('nonet'), 'disk.img')], { encoding: 'utf8' }).trim()).toBe('');
      expect(existsSync(`/sys/fs/cgroup/memory${env.layout.cgroupParent}/nonet`)).toBe(false);
      expect(env.cli(['ve', 'status', 'nonet', '--json']).stdout).toContain('"state": "stopped"');
    } finally {
      spawnSync('ip', ['link', 'del', rec.hostVeth]); // the failed start's undo may have removed it already
    }
    env.cli(['ve', 'destroy', 'nonet']);
  });

  it('a create on a full disk fails cleanly', async () => {
    // A 2 MiB tmpfs as the VE area: the disk image's file system cannot be made there.
    const ves = env.layout.vesDir;
    await fs.mkdir(ves, { recursive: true });
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m,mode=0711', 'tmpfs', ves]);
    try {
      // Fill it to the last block, as a host disk that ran full.
      await fs.writeFile(path.join(ves, '.filler'), Buffer.alloc(4 * 1024 * 1024)).catch(() => undefined);
      const res = env.cli(['ve', 'create', 'full', '--disk', '512M'], { allowFailure: true });
      expect(res.code).not.toBe(0);
      expect(res.stderr).toMatch(/No space left|disk/i);
      expect(res.stderr.trim().split('\n')).toHaveLength(1);
      expect(await fs.readdir(ves)).toEqual(['.filler']);
    } finally {
      execFileSync('umount', [ves]);
    }
  });
});
