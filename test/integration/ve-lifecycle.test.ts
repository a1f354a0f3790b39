import net from 'node:net';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, promises as fs, statSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import { createVeManager, createVeNetwork } from '../../src/ve/index.js';
import { cgroupDirs, detectCgroupLayout } from '../../src/runtime/cgroups.js';

const sh = shInVe;

/** A file of a VE's cgroup for one controller (v1: that controller's hierarchy; v2: the one directory). */
function veCgroupFile(env: VeTestEnv, ve: string, controller: string, file: string): string {
  const rel = `${env.layout.cgroupParent}/${ve}`.replace(/^\/+/, '');
  return detectCgroupLayout() === 'v2' ? path.join('/sys/fs/cgroup', rel, file) : path.join('/sys/fs/cgroup', controller, rel, file);
}

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
    // The host's root disk, by its real device number.
    const dev = statSync('/').dev;
    const major = Math.floor(dev / 256) & 0xfff;
    const minor = (dev & 0xff) | (Math.floor(dev / 4096) & 0xfff00);
    expect(existsSync(`/sys/dev/block/${major}:${minor}`)).toBe(true);
    const mknod = await sh(env, 'alpha', `mknod /tmp/hostdisk b ${major} ${minor}`, { allowFailure: true });
    expect(mknod.code).not.toBe(0);
    expect(mknod.stderr).toMatch(/mknod: \/tmp\/hostdisk: Operation not permitted/);
    // Even with the node there (made by the host in the VE's layer), VE root can neither mount nor read the disk.
    const node = path.join(env.layout.veDir('alpha'), 'rootfs', 'tmp', 'hostdisk');
    execFileSync('mknod', [node, 'b', String(major), String(minor)]);
    try {
      expect((await sh(env, 'alpha', 'ls -l /tmp/hostdisk')).stdout).toMatch(new RegExp(`^b.* ${major}, +${minor} `));
      const mount = await sh(env, 'alpha', 'mkdir -p /tmp/hostmnt && mount -t ext4 -o ro /tmp/hostdisk /tmp/hostmnt', { allowFailure: true });
      expect(mount.code).not.toBe(0);
      expect(mount.stderr).toMatch(/mounting \/tmp\/hostdisk on \/tmp\/hostmnt failed: (Permission denied|Operation not permitted)|mount: permission denied/i);
      expect((await sh(env, 'alpha', 'grep -c " /tmp/hostmnt " /proc/mounts', { allowFailure: true })).stdout.trim()).toBe('0');
      const read = await sh(env, 'alpha', 'head -c 512 /tmp/hostdisk | wc -c', { allowFailure: true });
      expect(read.stderr).toMatch(/Permission denied|Operation not permitted/);
      expect(read.stdout.trim()).toBe('0');
    } finally {
      await fs.rm(node, { force: true });
      await sh(env, 'alpha', 'rmdir /tmp/hostmnt', { allowFailure: true });
    }
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
  });

  it('keeps a VE off another VE and off the host\'s own services, while the same tools reach what they may', async () => {
    const beta = (await env.ves.status('beta')).address;
    const alpha = (await env.ves.status('alpha')).address;
    const gateway = alpha.replace(/\.\d+$/, '.1');
    // An HTTP GET with nc (busybox-static's wget segfaults here whatever the address, so its failure would prove nothing).
    const get = (addr: string, port: number) => sh(env, 'alpha', `printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 2 ${addr} ${port}`, { allowFailure: true });
    await sh(env, 'alpha', 'mkdir -p /www && echo alpha-self > /www/index.html && httpd -p 8081 -h /www');
    try {
      // Controls: nc in alpha reaches alpha's own service at its address and on its loopback, and beta serves the host.
      expect((await get(alpha, 8081)).stdout).toMatch(/^HTTP\/1\.[01] 200 [\s\S]*\r\n\r\nalpha-self\n$/);
      expect((await get('127.0.0.1', 8081)).stdout).toContain('\r\n\r\nalpha-self\n');
      expect(await (await fetch(`http://${beta}:8080/`, { signal: AbortSignal.timeout(5000) })).text()).toBe('hello-from-beta\n');
      // alpha cannot reach beta on the bridge: its packets are dropped (a timeout, not a refusal).
      const cross = await get(beta, 8080);
      expect(cross.code).not.toBe(0);
      expect(cross.stderr).toMatch(/nc: timed out/);
      expect(cross.stdout).toBe('');

      // Nor can a VE reach a host service bound to 0.0.0.0 through its gateway address.
      let accepted = 0;
      const hostServer = net.createServer((sock) => {
        accepted++;
        sock.end('host-secret\n');
      });
      await new Promise<void>((r) => hostServer.listen(0, '0.0.0.0', () => r()));
      try {
        const port = (hostServer.address() as net.AddressInfo).port;
        // Control: the listener answers on the gateway address (for the host itself).
        const fromHost = await new Promise<string>((resolve, reject) => {
          const c = net.connect(port, gateway);
          let got = '';
          c.on('data', (d) => { got += d; });
          c.on('end', () => resolve(got));
          c.on('error', reject);
        });
        expect(fromHost).toBe('host-secret\n');
        expect(accepted).toBe(1);
        const probe = await sh(env, 'alpha', `nc -w 2 ${gateway} ${port} </dev/null`, { allowFailure: true });
        expect(probe.code).not.toBe(0);
        expect(probe.stderr).toMatch(/nc: timed out/);
        expect(probe.stdout).toBe('');
        // The host's listener never accepted a connection from the VE.
        expect(accepted).toBe(1);
      } finally {
        hostServer.close();
      }
    } finally {
      await sh(env, 'alpha', 'killall httpd', { allowFailure: true });
    }
  });

  it('stops a fork bomb at the VE\'s pids limit while another VE stays responsive', async () => {
    // 64 processes at most in alpha: the bomb fails to fork instead of filling the host.
    const pidsFile = (f: string) => veCgroupFile(env, 'alpha', 'pids', f);
    const sleepers = async () => {
      const pids = (await fs.readFile(pidsFile('cgroup.procs'), 'utf8')).split('\n').filter(Boolean);
      const cmdlines = await Promise.all(pids.map((p) => fs.readFile(`/proc/${p}/cmdline`, 'utf8').then((c) => [p, c] as const, () => [p, ''] as const)));
      return cmdlines.filter(([, c]) => c === 'sleep\0' + '300\0').map(([p]) => p);
    };
    const current = async () => Number((await fs.readFile(pidsFile('pids.current'), 'utf8')).trim());
    const idle = await current();
    try {
      expect((await fs.readFile(pidsFile('pids.max'), 'utf8')).trim()).toBe('64');
      const bomb = await sh(env, 'alpha', 'i=0; while [ $i -lt 200 ]; do sleep 300 >/dev/null 2>&1 & i=$((i+1)); done; echo ALL-FORKED', { allowFailure: true, timeoutMs: 60_000 });
      // busybox sh's own word for a fork that the pids controller refused (EAGAIN); it gives up there.
      expect(bomb.stderr).toMatch(/can't fork: Resource temporarily unavailable/);
      expect(bomb.code).not.toBe(0);
      expect(bomb.stdout).not.toContain('ALL-FORKED');
      const made = await sleepers();
      expect(made.length).toBeGreaterThan(0);
      expect(made.length).toBeLessThan(200);
      expect(await current()).toBeLessThanOrEqual(64);
      expect((await sh(env, 'beta', 'echo alive')).stdout).toBe('alive\n');
    } finally {
      // The VE has no pid left to run killall with: the host ends the bomb's processes by their pids.
      for (const p of await sleepers()) {
        try { process.kill(Number(p), 'SIGKILL'); } catch { /* already gone */ }
      }
      // Gone means reaped too (a zombie still holds its pid): back to what the VE had before.
      await waitFor('the fork bomb\'s processes to be gone', async () => (await sleepers()).length === 0 && (await current()) <= idle);
    }
  });

  it('OOM-kills a memory hog inside its VE only', async () => {
    // The kernel's count of OOM kills in the VE's memory cgroup.
    const events = veCgroupFile(env, 'alpha', 'memory', detectCgroupLayout() === 'v2' ? 'memory.events' : 'memory.oom_control');
    const oomKills = async () => Number(/^oom_kill (\d+)$/m.exec(await fs.readFile(events, 'utf8'))?.[1] ?? NaN);
    const before = await oomKills();
    expect(before).not.toBeNaN();
    // 64M limit; awk doubles a string until the kernel's OOM killer ends it (SIGKILL: status 137).
    const hog = await sh(env, 'alpha', 'awk \'BEGIN { s = "x"; while (1) s = s s }\'; echo "rc=$?"', { allowFailure: true, timeoutMs: 60_000 });
    expect(hog.stdout, JSON.stringify(hog)).toContain('rc=137');
    expect(await oomKills()).toBeGreaterThan(before);
    expect((await env.ves.status('alpha')).state).toBe('running');
    expect((await sh(env, 'alpha', 'echo still-here')).stdout).toBe('still-here\n');
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

  /** Run a vesh verb that must be refused: non-zero exit, one line on stderr (returned), nothing on stdout. */
  const refused = (args: string[]): string => {
    const res = env.cli(args, { allowFailure: true });
    expect(res.code, `vesh ${args.join(' ')}`).not.toBe(0);
    expect(res.stdout).toBe('');
    const lines = res.stderr.trim().split('\n');
    expect(lines, res.stderr).toHaveLength(1);
    return lines[0]!;
  };

  /** What a refused verb could have left: a VE directory without a record, mounts, loop devices, engine state, cgroups, veths. */
  const leftBehind = async (): Promise<string[]> => {
    const out: string[] = [];
    for (const e of await fs.readdir(env.layout.vesDir).catch(() => [] as string[])) {
      if (!e.startsWith('.') && !existsSync(path.join(env.layout.veDir(e), 've.json'))) out.push(`VE directory without a record: ${e}`);
    }
    const mounts = (await fs.readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter((l) => l.includes(`${env.layout.vesDir}/`));
    out.push(...mounts.map((l) => `mount ${l.split(' ')[4]}`));
    const loops = execFileSync('losetup', ['-l', '-n', '-O', 'NAME,BACK-FILE'], { encoding: 'utf8' }).split('\n').filter((l) => l.includes(env.dir));
    out.push(...loops.map((l) => `loop device ${l.trim()}`));
    const running = existsSync(env.layout.runtimeRoot) ? execFileSync('runc', ['--root', env.layout.runtimeRoot, 'list', '-q'], { encoding: 'utf8' }).trim() : '';
    if (running) out.push(`engine containers ${running}`);
    for (const d of cgroupDirs(env.layout.cgroupParent)) {
      for (const e of await fs.readdir(d, { withFileTypes: true }).catch(() => [])) if (e.isDirectory()) out.push(`cgroup ${path.join(d, e.name)}`);
    }
    const links = execFileSync('ip', ['-o', 'link'], { encoding: 'utf8' }).split('\n').filter((l) => new RegExp(`^\\d+: v${env.layout.instanceId}`).test(l));
    out.push(...links.map((l) => `veth ${l.split(':')[1]?.trim()}`));
    return out;
  };

  afterAll(async () => {
    await env?.cleanup();
  });

  it('refuses invalid names, unknown templates and malformed limits with one clear line', async () => {
    const bad = refused(['ve', 'create', '../x']);
    expect(bad).toMatch(/invalid VE name/);
    const long = refused(['ve', 'create', 'a'.repeat(40)]);
    expect(long).toMatch(/invalid VE name .*40 characters.*choose a name such as/);
    const tpl = refused(['ve', 'create', 'x1', '--template', 'nosuch']);
    expect(tpl).toMatch(/template "nosuch" does not exist.*vesh template build/);
    const lim = refused(['ve', 'create', 'x2', '--memory', '12XB']);
    expect(lim).toMatch(/invalid memory limit "12XB"/);
    expect(env.cli(['ve', 'list', '--json']).stdout.trim()).toBe('[]');
    expect(await leftBehind()).toEqual([]);
  });

  it('refuses double create, double start and stopping a stopped VE', async () => {
    env.cli(['ve', 'create', 'dup']);
    const record = await fs.readFile(path.join(env.layout.veDir('dup'), 've.json'), 'utf8');
    expect(refused(['ve', 'create', 'dup'])).toMatch(/VE "dup" already exists: use "vesh ve start dup", or destroy it first/);
    // The refused create left the VE as it was, and made nothing else.
    expect(await fs.readFile(path.join(env.layout.veDir('dup'), 've.json'), 'utf8')).toBe(record);
    expect(await fs.readdir(env.layout.vesDir)).toEqual(['dup']);
    expect(refused(['ve', 'stop', 'dup'])).toMatch(/VE "dup" is not running.*start it with "vesh ve start dup"/);
    expect(await leftBehind()).toEqual([]);
    env.cli(['ve', 'start', 'dup']);
    expect(refused(['ve', 'start', 'dup'])).toMatch(/already running/);
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
      const msg = refused(['ve', 'create', 'full', '--disk', '512M']);
      expect(msg).toContain(`the host disk holding ${ves} is full`);
      expect(msg).toMatch(/free space on it .*then try again.*\[VESH_DISK_FULL\]$/);
      expect(await fs.readdir(ves)).toEqual(['.filler']);
      expect(await leftBehind()).toEqual([]);
    } finally {
      execFileSync('umount', [ves]);
    }
  });
});
