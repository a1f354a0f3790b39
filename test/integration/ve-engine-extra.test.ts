import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import { cgroupDirs, detectCgroupLayout } from '../../src/runtime/cgroups.js';
import { tableName } from '../../src/net/firewall.js';
import { buildBusyboxRootfs } from '../../src/template/busybox.js';

const sh = shInVe;

/** The vesh CLI with another config file (same data dir, so the same instance). */
function cliWith(configFile: string, args: string[]): { code: number; stdout: string; stderr: string } {
  const res = spawnSync(process.execPath, [path.resolve('bin/vesh.js'), '--config', configFile, ...args], { encoding: 'utf8' });
  return { code: res.status ?? -1, stdout: res.stdout, stderr: res.stderr };
}

/** A copy of the instance's vesh.yaml with one piece of text replaced. */
async function configVariant(env: VeTestEnv, file: string, from: string, to: string): Promise<string> {
  const text = await fs.readFile(env.configFile, 'utf8');
  expect(text).toContain(from);
  const out = path.join(env.dir, file);
  await fs.writeFile(out, text.replace(from, to));
  return out;
}

/** A file of the VE's cgroup for one controller (v1: that controller's hierarchy; v2: the one directory). */
function cgroupFile(env: VeTestEnv, ve: string, controller: string, file: string): string {
  const rel = `${env.layout.cgroupParent}/${ve}`.replace(/^\/+/, '');
  return detectCgroupLayout() === 'v2' ? path.join('/sys/fs/cgroup', rel, file) : path.join('/sys/fs/cgroup', controller, rel, file);
}

/** One "key value" line of a cgroup stat file. */
async function cgroupStat(file: string, key: string): Promise<number> {
  const m = new RegExp(`^${key} (\\d+)$`, 'm').exec(await fs.readFile(file, 'utf8'));
  if (!m) throw new Error(`${file} has no ${key}`);
  return Number(m[1]);
}

/** Whatever a stopped (or destroyed) VE still holds on the host: mounts, loop device, veth, cgroups, engine state. */
async function leftoversOf(env: VeTestEnv, ve: string, hostVeth: string): Promise<string[]> {
  const out: string[] = [];
  const dir = env.layout.veDir(ve);
  const mountinfo = await fs.readFile('/proc/self/mountinfo', 'utf8');
  if (mountinfo.includes(`${dir}/`)) out.push(`mount under ${dir}`);
  const loops = spawnSync('losetup', ['-l', '-n', '-O', 'NAME,BACK-FILE'], { encoding: 'utf8' }).stdout.split('\n').filter((l) => l.includes(`${dir}/`));
  out.push(...loops.map((l) => `loop device ${l.trim()}`));
  if (existsSync(`/sys/class/net/${hostVeth}`)) out.push(`veth ${hostVeth}`);
  for (const d of cgroupDirs(`${env.layout.cgroupParent}/${ve}`)) if (existsSync(d)) out.push(`cgroup ${d}`);
  if (existsSync(path.join(env.layout.runtimeRoot, ve))) out.push(`engine state ${path.join(env.layout.runtimeRoot, ve)}`);
  return out;
}

/**
 * Everything a vesh instance could leave on the host once its test file
 * cleaned up: engine containers and state, mounts (overlays naming the
 * instance's directories included), veths and the bridge, loop devices,
 * cgroups, nftables tables and the data dir itself.
 */
async function leftoversOfInstance(env: VeTestEnv): Promise<string[]> {
  const out: string[] = [];
  const { layout, config } = env;
  const runcRoot = layout.runtimeRoot;
  if (existsSync(runcRoot)) {
    const list = spawnSync('runc', ['--root', runcRoot, 'list', '-q'], { encoding: 'utf8' }).stdout.trim();
    out.push(`engine root ${runcRoot}${list ? ` with containers ${list.split('\n').join(', ')}` : ''}`);
  }
  if (existsSync(path.dirname(runcRoot))) out.push(`instance run dir ${path.dirname(runcRoot)}`);
  const mountinfo = (await fs.readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter((l) => l.includes(env.dir));
  out.push(...mountinfo.map((l) => `mount ${l.split(' ')[4]}`));
  const links = execFileSync('ip', ['-o', 'link'], { encoding: 'utf8' }).split('\n')
    .map((l) => /^\d+: ([^:@]+)/.exec(l)?.[1])
    .filter((n): n is string => !!n && (n.startsWith(`v${layout.instanceId}`) || n === config.network.bridge));
  out.push(...links.map((n) => `network device ${n}`));
  const loops = execFileSync('losetup', ['-l', '-n', '-O', 'NAME,BACK-FILE'], { encoding: 'utf8' }).split('\n').filter((l) => l.includes(env.dir));
  out.push(...loops.map((l) => `loop device ${l.trim()}`));
  for (const d of cgroupDirs(layout.cgroupParent)) if (existsSync(d)) out.push(`cgroup ${d}`);
  const tables = execFileSync('nft', ['list', 'tables'], { encoding: 'utf8' });
  if (tables.includes(` ${tableName(layout.instanceId)}\n`)) out.push(`nftables table ${tableName(layout.instanceId)}`);
  if (existsSync(env.dir)) out.push(`test dir ${env.dir}`);
  return out;
}

async function hostVethOf(env: VeTestEnv, ve: string): Promise<string> {
  return (JSON.parse(await fs.readFile(path.join(env.layout.veDir(ve), 've.json'), 'utf8')) as { hostVeth: string }).hostVeth;
}

/** Processes of a VE as its own /proc shows them: pid, command name, state letter, parent pid. */
async function processesIn(env: VeTestEnv, ve: string): Promise<Array<{ pid: number; comm: string; state: string; ppid: number }>> {
  const res = await sh(env, ve, 'cat /proc/[0-9]*/stat 2>/dev/null; true');
  return res.stdout.split('\n').map((l) => /^(\d+) \((.*)\) (\S) (\d+) /.exec(l)).filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ pid: Number(m[1]), comm: m[2]!, state: m[3]!, ppid: Number(m[4]) }));
}

describe('VE engine: stop, limits, templates, init, seccomp and network rules (busybox template, real runc)', () => {
  let env: VeTestEnv;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'busybox' });
  });

  afterAll(async () => {
    if (!env) return;
    await env.cleanup();
    // Nothing of this file's instance may outlive it.
    expect(await leftoversOfInstance(env)).toEqual([]);
  });

  it('stops a VE whose init ignores the stop signal: "vesh ve stop" kills it after the timeout and leaves nothing', async () => {
    try {
      env.cli(['ve', 'create', 'stubborn']);
      env.cli(['ve', 'start', 'stubborn']);
      // VE root replaces its own init with one that ignores every signal vesh could ask it to stop with.
      await sh(env, 'stubborn', [
        'rm /sbin/init',
        'printf \'#!/bin/sh\\ntrap "" TERM USR1 USR2 INT HUP QUIT\\nwhile :; do sleep 3600; done\\n\' > /sbin/init',
        'chmod 755 /sbin/init',
      ].join(' && '));
      env.cli(['ve', 'restart', 'stubborn']);
      const { pid, state } = await env.ves.status('stubborn');
      expect(state).toBe('running');
      // The kernel's view: the VE's init has the template's stop signal (busybox: SIGUSR2) and SIGTERM ignored.
      const tpl = JSON.parse(env.cli(['template', 'list', '--json']).stdout) as Array<{ name: string; stopSignal: string }>;
      expect(tpl.find((t) => t.name === 'busybox')?.stopSignal).toBe('SIGUSR2');
      const ignored = BigInt(`0x${/^SigIgn:\s+([0-9a-f]+)/m.exec(await fs.readFile(`/proc/${pid}/status`, 'utf8'))![1]}`);
      for (const sig of [10, 12, 15]) expect((ignored >> BigInt(sig - 1)) & 1n).toBe(1n); // USR1, USR2, TERM
      expect(await fs.readFile(`/proc/${pid}/cmdline`, 'utf8')).toContain('/sbin/init');

      const fast = await configVariant(env, 'fast-stop.yaml', 'stopTimeout: 5s', 'stopTimeout: 1s');
      const stop = cliWith(fast, ['ve', 'stop', 'stubborn']);
      expect(stop.stderr).toBe('');
      expect(stop.code).toBe(0);
      expect((await env.ves.status('stubborn')).state).toBe('stopped');
      expect(existsSync(`/proc/${pid}`) && (await fs.readFile(`/proc/${pid}/cmdline`, 'utf8')).includes('/sbin/init')).toBe(false);
      expect(await leftoversOf(env, 'stubborn', await hostVethOf(env, 'stubborn'))).toEqual([]);
    } finally {
      env.cli(['ve', 'destroy', 'stubborn', '--force'], { allowFailure: true });
    }
  });

  it('throttles a busy loop in a VE limited to half a CPU (the cgroup\'s nr_throttled grows)', async () => {
    try {
      await env.ves.create('cpuhalf', { limits: { cpus: 0.5 } });
      await env.ves.start('cpuhalf');
      const v2 = detectCgroupLayout() === 'v2';
      const quota = (await fs.readFile(cgroupFile(env, 'cpuhalf', 'cpu', v2 ? 'cpu.max' : 'cpu.cfs_quota_us'), 'utf8')).trim();
      expect(quota).toBe(v2 ? '50000 100000' : '50000');
      const stat = cgroupFile(env, 'cpuhalf', 'cpu', 'cpu.stat');
      const before = await cgroupStat(stat, 'nr_throttled');
      const loop = (await sh(env, 'cpuhalf', 'sh -c "while :; do :; done" >/dev/null 2>&1 & echo $!')).stdout.trim();
      expect(loop).toMatch(/^\d+$/);
      try {
        // One spinning thread wants a whole CPU; the kernel holds the cgroup to half of each period.
        await waitFor('the VE\'s cgroup to be throttled', async () => (await cgroupStat(stat, 'nr_throttled')) >= before + 5);
      } finally {
        await sh(env, 'cpuhalf', `kill -9 ${loop}`, { allowFailure: true });
      }
    } finally {
      await env.ves.destroy('cpuhalf', { force: true }).catch(() => undefined);
    }
  });

  /** Where a test's template source tree and tar go. */
  const paths = (name: string) => ({ src: path.join(env.dir, `${name}-src`), tar: path.join(env.dir, `${name}.tar`) });

  /** A busybox root filesystem with `extra` files in it, packed as a tar for "vesh template import". */
  async function busyboxTar(src: string, tar: string, extra: Record<string, string> = {}): Promise<void> {
    await fs.mkdir(src, { mode: 0o755 });
    await buildBusyboxRootfs(src);
    for (const [file, text] of Object.entries(extra)) await fs.writeFile(path.join(src, file), text, { mode: 0o644 });
    execFileSync('tar', ['--numeric-owner', '-C', src, '-cf', tar, '.']);
  }

  it('imports a template from a tar archive ("vesh template import") and runs a VE on it', async () => {
    const { src, tar } = paths('import');
    try {
      await busyboxTar(src, tar, { 'etc/imported-by-test': 'from-the-tar\n' });
      const imp = env.cli(['template', 'import', 'bbimp', tar]);
      expect(imp.code).toBe(0);
      const list = JSON.parse(env.cli(['template', 'list', '--json']).stdout) as Array<{ name: string; stopSignal: string }>;
      expect(list.map((t) => t.name).sort()).toEqual(['bbimp', 'busybox']);
      expect(list.find((t) => t.name === 'bbimp')?.stopSignal).toBe('SIGUSR2');
      env.cli(['ve', 'create', 'imp', '--template', 'bbimp']);
      env.cli(['ve', 'start', 'imp']);
      expect(env.cli(['ve', 'exec', 'imp', '--', 'cat', '/etc/imported-by-test']).stdout).toBe('from-the-tar\n');
      expect(env.cli(['ve', 'exec', 'imp', '--', 'hostname']).stdout).toBe('imp\n');
      // VE root owns its files in the imported template too.
      expect(env.cli(['ve', 'exec', 'imp', '--', 'stat', '-c', '%u', '/etc/imported-by-test']).stdout).toBe('0\n');
      env.cli(['ve', 'stop', 'imp']);
      env.cli(['ve', 'destroy', 'imp']);
      env.cli(['template', 'remove', 'bbimp']);
      expect(JSON.parse(env.cli(['template', 'list', '--json']).stdout).map((t: { name: string }) => t.name)).toEqual(['busybox']);
      expect(existsSync(env.layout.templateDir('bbimp'))).toBe(false);
    } finally {
      env.cli(['ve', 'destroy', 'imp', '--force'], { allowFailure: true });
      env.cli(['template', 'remove', 'bbimp'], { allowFailure: true });
      await fs.rm(src, { recursive: true, force: true });
      await fs.rm(tar, { force: true });
    }
  });

  it('never lets a create and a template remove that race both succeed: one of them is refused', async () => {
    const { src, tar } = paths('race');
    try {
      await busyboxTar(src, tar);
      for (let round = 0; round < 3; round++) {
        expect(env.cli(['template', 'import', 'bbrace', tar]).code).toBe(0);
        // The create asks for the template first; the remove comes while it waits for the lock or works.
        const [created, removed] = await Promise.allSettled([
          env.ves.create('race', { template: 'bbrace' }),
          new Promise((r) => setImmediate(r)).then(() => env.ves.removeTemplate('bbrace')),
        ]);
        const templates = JSON.parse(env.cli(['template', 'list', '--json']).stdout).map((t: { name: string }) => t.name);
        if (created.status === 'fulfilled') {
          expect(removed.status, `round ${round}`).toBe('rejected');
          expect(String((removed as PromiseRejectedResult).reason)).toMatch(/template "bbrace" is used by 1 VE\(s\) \(race\)/);
          expect(templates).toContain('bbrace');
          await env.ves.destroy('race', { force: true });
          await env.ves.removeTemplate('bbrace');
        } else {
          expect(removed.status, `round ${round}`).toBe('fulfilled');
          expect(String(created.reason)).toMatch(/template "bbrace" does not exist/);
          expect(templates).not.toContain('bbrace');
          expect(await env.ves.exists('race')).toBe(false);
        }
      }
    } finally {
      await env.ves.destroy('race', { force: true }).catch(() => undefined);
      env.cli(['template', 'remove', 'bbrace'], { allowFailure: true });
      await fs.rm(src, { recursive: true, force: true });
      await fs.rm(tar, { force: true });
    }
  });

  describe('inside one running VE', () => {
    beforeAll(async () => {
      await env.ves.create('box');
      await env.ves.start('box');
    });

    afterAll(async () => {
      await env?.ves.destroy('box', { force: true }).catch(() => undefined);
    });

    it('has its init reap orphaned children, so no zombie is left', async () => {
      // The inner shell exits at once: its five sleeps are orphans and go to the VE's init.
      await sh(env, 'box', 'sh -c \'for i in 1 2 3 4 5; do sleep 2 >/dev/null 2>&1 & done\'');
      const orphans = (await processesIn(env, 'box')).filter((p) => p.comm === 'sleep');
      expect(orphans).toHaveLength(5);
      for (const o of orphans) expect(o.ppid).toBe(1);
      // A zombie keeps its /proc entry until its parent reaps it: gone means reaped.
      await waitFor('the orphans to exit and be reaped by the VE\'s init', async () => {
        const procs = await processesIn(env, 'box');
        return !procs.some((p) => orphans.some((o) => o.pid === p.pid)) && !procs.some((p) => p.state === 'Z');
      });
    });

    it('denies nested user namespaces by its seccomp filter', async () => {
      expect((await sh(env, 'box', 'grep "^Seccomp:" /proc/self/status')).stdout).toMatch(/^Seccomp:\s+2$/m);
      const res = await sh(env, 'box', 'unshare -U true', { allowFailure: true });
      expect(res.code).not.toBe(0);
      expect(res.stderr).toMatch(/unshare\(0x10000000\): Operation not permitted/);
      // Controls: the same applet works when it asks for nothing the filter denies, and
      // outside the VE the kernel lets the same host uid make a user namespace.
      expect((await sh(env, 'box', 'unshare true && echo ok')).stdout).toBe('ok\n');
      const id = String(env.config.runtime.idmapBase);
      const host = spawnSync('setpriv', [`--reuid=${id}`, `--regid=${id}`, '--clear-groups', '/bin/busybox', 'unshare', '-U', 'true'], { encoding: 'utf8' });
      expect(host.stderr).toBe('');
      expect(host.status).toBe(0);
    });
  });

  it('keeps VE root from taking another address: spoofed after an address change, the VE is unreachable', async () => {
    const bridge = env.config.network.bridge;
    // An address of this instance's own subnet that no VE has.
    const base = env.config.network.subnet.replace(/\.0\/24$/, '');
    const spoofed = `${base}.250`;
    try {
      await env.ves.create('spoof');
      await env.ves.start('spoof');
      const { address } = await env.ves.status('spoof');
      expect(address.startsWith(`${base}.`)).toBe(true);
      const gateway = `${base}.1`;
      const used = (await env.ves.list()).map((s) => s.address);
      expect(used).not.toContain(spoofed);
      await sh(env, 'spoof', 'mkdir -p /www && echo spoof-ve > /www/index.html && httpd -p 8080 -h /www');
      // Control: the service answers at the VE's own address.
      const ok = await fetch(`http://${address}:8080/`, { signal: AbortSignal.timeout(5000) });
      expect(await ok.text()).toBe('spoof-ve\n');
      // VE root (it has CAP_NET_ADMIN in its own network) moves eth0 to another address of the subnet.
      await sh(env, 'spoof', `ip addr del ${address}/24 dev eth0 && ip addr add ${spoofed}/24 dev eth0 && ip route replace default via ${gateway}`);
      expect((await sh(env, 'spoof', 'ip -4 -o addr show dev eth0')).stdout).toContain(` ${spoofed}/24 `);
      // Its ARP answers for the spoofed address do not get through, so the host cannot find it...
      await expect(fetch(`http://${spoofed}:8080/`, { signal: AbortSignal.timeout(3000) }).then((r) => r.text())).rejects.toThrow();
      // (the host asked, but no answer reached it: its neighbour entry has no MAC)...
      const mac = (await sh(env, 'spoof', 'cat /sys/class/net/eth0/address')).stdout.trim();
      expect(execFileSync('ip', ['neigh', 'show', spoofed, 'dev', bridge], { encoding: 'utf8' })).not.toContain(mac);
      // ...and when the host is told its MAC (no ARP needed), its IPv4 replies from that address do not get through either.
      execFileSync('ip', ['neigh', 'replace', spoofed, 'lladdr', mac, 'dev', bridge, 'nud', 'permanent']);
      await expect(fetch(`http://${spoofed}:8080/`, { signal: AbortSignal.timeout(3000) }).then((r) => r.text())).rejects.toThrow();
      // Its own address back beside the spoofed one: the same service is reachable there again, never at the other.
      await sh(env, 'spoof', `ip addr add ${address}/24 dev eth0`);
      const again = await fetch(`http://${address}:8080/`, { signal: AbortSignal.timeout(5000) });
      expect(await again.text()).toBe('spoof-ve\n');
      await expect(fetch(`http://${spoofed}:8080/`, { signal: AbortSignal.timeout(3000) }).then((r) => r.text())).rejects.toThrow();
    } finally {
      spawnSync('ip', ['neigh', 'del', spoofed, 'dev', bridge]);
      await env.ves.destroy('spoof', { force: true }).catch(() => undefined);
    }
  });

  it('makes the firewall follow network.outbound when vesh.yaml flips it (ruleset inspected, no traffic)', async () => {
    const table = tableName(env.layout.instanceId);
    const bridge = env.config.network.bridge;
    const inet = () => execFileSync('nft', ['-a', 'list', 'table', 'inet', table], { encoding: 'utf8' });
    const handle = (listing: string) => /^table inet \S+ \{ # handle (\d+)/m.exec(listing)?.[1];
    const allowedSet = () => execFileSync('nft', ['list', 'set', 'bridge', table, 'allowed'], { encoding: 'utf8' });
    // The forward chain's verdict for what VEs send towards any other network.
    const forwardRule = (listing: string) => {
      const chain = /chain forward \{[\s\S]*?\n\t\}/.exec(listing)?.[0] ?? '';
      return new RegExp(`^\\s*iifname "${bridge}" (accept|drop)(?: # handle \\d+)?$`, 'm').exec(chain)?.[1];
    };
    const ipForward = await fs.readFile('/proc/sys/net/ipv4/ip_forward', 'utf8');
    try {
      env.cli(['ve', 'create', 'outb']);
      env.cli(['ve', 'start', 'outb']);
      const veth = await hostVethOf(env, 'outb');
      const off = inet();
      expect(forwardRule(off)).toBe('drop');
      expect(off).not.toContain('masquerade');
      expect(off).toMatch(/comment "vesh: [^"]*outbound off/);
      expect(allowedSet()).toContain(`"${veth}" . `);

      // Same configuration: the tables are kept as they are.
      env.cli(['ve', 'restart', 'outb']);
      expect(handle(inet())).toBe(handle(off));

      const onConfig = await configVariant(env, 'outbound-on.yaml', 'outbound: false', 'outbound: true');
      expect(cliWith(onConfig, ['ve', 'restart', 'outb']).code).toBe(0);
      const on = inet();
      expect(handle(on)).not.toBe(handle(off));
      expect(forwardRule(on)).toBe('accept');
      expect(on).toMatch(new RegExp(`ip saddr ${env.config.network.subnet.replace(/\./g, '\\.')} oifname != "${bridge}" masquerade`));
      expect(on).toMatch(/comment "vesh: [^"]*outbound on/);
      // The anti-spoofing set kept the running VE's element.
      expect(allowedSet()).toContain(`"${veth}" . `);

      // And back: off again as soon as a vesh with outbound off sets up the host.
      env.cli(['ve', 'restart', 'outb']);
      const offAgain = inet();
      expect(forwardRule(offAgain)).toBe('drop');
      expect(offAgain).not.toContain('masquerade');
      expect(allowedSet()).toContain(`"${veth}" . `);
    } finally {
      env.cli(['ve', 'destroy', 'outb', '--force'], { allowFailure: true });
      // Turning outbound on switched IPv4 forwarding on; the host gets its own setting back.
      await fs.writeFile('/proc/sys/net/ipv4/ip_forward', ipForward);
    }
  });
});
