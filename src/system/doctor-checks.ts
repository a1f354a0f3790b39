import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { ServerConfig } from '../config/server-config.js';
import { detectCgroupLayout } from '../runtime/cgroups.js';
import { run } from './exec.js';
import { firstUnsearchableAncestor, type Layout } from './layout.js';

export type CheckStatus = 'ok' | 'warn' | 'fail';

export interface CheckResult {
  name: string;
  status: CheckStatus;
  detail: string;
  /** What to do about a warn or fail: a command or a setting. */
  fix?: string;
}

export interface CheckContext {
  config: ServerConfig;
  layout: Layout;
}

type Check = (ctx: CheckContext) => Promise<CheckResult | CheckResult[]>;

const ok = (name: string, detail: string): CheckResult => ({ name, status: 'ok', detail });
const fail = (name: string, detail: string, fix: string): CheckResult => ({ name, status: 'fail', detail, fix });
const warn = (name: string, detail: string, fix: string): CheckResult => ({ name, status: 'warn', detail, fix });

async function has(cmd: string): Promise<boolean> {
  const r = await run('sh', ['-c', 'command -v "$1"', 'has', cmd], { allowFailure: true });
  return r.code === 0;
}

const checkRoot: Check = async () => (process.getuid?.() === 0
  ? ok('root', 'running as root')
  : fail('root', `running as uid ${process.getuid?.()}`, 'run vesh as root (it makes namespaces, cgroups, mounts and network devices)'));

/** Each namespace kind, tried one at a time so that a missing one is named. */
const checkNamespaces: Check = async () => {
  const kinds: Array<[string, string[]]> = [
    ['user', ['--user', '--map-root-user']], ['pid', ['--pid', '--fork']], ['mount', ['--mount']], ['uts', ['--uts']],
    ['ipc', ['--ipc']], ['net', ['--net']], ['cgroup', ['--cgroup']],
  ];
  const out: CheckResult[] = [];
  const max = Number((await fs.readFile('/proc/sys/user/max_user_namespaces', 'utf8').catch(() => '0')).trim());
  for (const [kind, flags] of kinds) {
    const r = await run('unshare', [...flags, 'true'], { allowFailure: true }).catch((e: Error) => ({ code: -1, stderr: e.message }));
    if (r.code === 0) out.push(ok(`${kind} namespace`, 'usable'));
    else {
      const fix = kind === 'user' && max === 0 ? 'sysctl -w user.max_user_namespaces=15000' : `a kernel with CONFIG_${kind.toUpperCase()}_NS (and util-linux's unshare: apt-get install util-linux)`;
      out.push(fail(`${kind} namespace`, r.stderr.trim().split('\n').pop() || `unshare exited ${r.code}`, fix));
    }
  }
  return out;
};

const checkOverlay: Check = async () => {
  const dir = await fs.mkdtemp(path.join('/var/tmp', 'vesh-doctor-'));
  const [lower, upper, work, merged] = ['lower', 'upper', 'work', 'merged'].map((d) => path.join(dir, d));
  try {
    for (const d of [lower!, upper!, work!, merged!]) await fs.mkdir(d);
    const r = await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lower},upperdir=${upper},workdir=${work}`, merged!], { allowFailure: true });
    if (r.code !== 0) return fail('overlayfs', r.stderr.trim(), 'modprobe overlay (a kernel with CONFIG_OVERLAY_FS)');
    await run('umount', [merged!], { allowFailure: true });
    return ok('overlayfs', 'mounts');
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
};

const checkCgroups: Check = async () => {
  const layout = detectCgroupLayout();
  const base = '/sys/fs/cgroup';
  const missing: string[] = [];
  for (const c of ['memory', 'pids', 'cpu']) {
    const present = layout === 'v2'
      ? (await fs.readFile(path.join(base, 'cgroup.controllers'), 'utf8').catch(() => '')).split(/\s+/).includes(c)
      : await fs.stat(path.join(base, c)).then(() => true, () => false);
    if (!present) missing.push(c);
  }
  if (missing.length) return fail('cgroups', `layout ${layout}; controllers missing: ${missing.join(', ')}`, 'enable the memory, pids and cpu cgroup controllers (kernel command line or your init system)');
  return ok('cgroups', `layout ${layout}; memory, pids and cpu controllers present`);
};

const checkRuntime: Check = async ({ config }) => {
  const bin = config.runtime.binary;
  const r = await run(bin, ['--version'], { allowFailure: true }).catch(() => null);
  if (!r || r.code !== 0) return fail('runtime', `"${bin}" cannot be run`, 'apt-get install runc (or set runtime.binary in vesh.yaml)');
  const v = /runc version (\d+)\.(\d+)\.(\d+)/.exec(r.stdout);
  if (!v) return warn('runtime', `"${bin}" answers, but not as runc: ${r.stdout.split('\n')[0]}`, 'use runc 1.1 or later');
  const [maj, min] = [Number(v[1]), Number(v[2])];
  if (maj < 1 || (maj === 1 && min < 1)) return fail('runtime', `runc ${v[1]}.${v[2]}.${v[3]} is too old`, 'apt-get install runc (1.1 or later)');
  return ok('runtime', `runc ${v[1]}.${v[2]}.${v[3]}`);
};

/** A bridge and a veth pair made and deleted again, under random names. */
const checkBridgeVeth: Check = async () => {
  const tag = randomBytes(3).toString('hex');
  const br = `vdb${tag}`;
  const veth = `vdv${tag}`;
  try {
    const b = await run('ip', ['link', 'add', br, 'type', 'bridge'], { allowFailure: true }).catch((e: Error) => ({ code: -1, stderr: e.message }));
    if (b.code !== 0) return fail('bridge', b.stderr.trim(), 'modprobe bridge; apt-get install iproute2');
    const v = await run('ip', ['link', 'add', veth, 'master', br, 'type', 'veth', 'peer', 'name', `${veth}p`], { allowFailure: true });
    if (v.code !== 0) return fail('veth', v.stderr.trim(), 'modprobe veth');
    return ok('bridge and veth', 'made and removed a bridge and a veth pair');
  } finally {
    await run('ip', ['link', 'del', veth], { allowFailure: true }).catch(() => undefined);
    await run('ip', ['link', 'del', br], { allowFailure: true }).catch(() => undefined);
  }
};

const checkNftables: Check = async () => {
  const r = await run('nft', ['list', 'tables'], { allowFailure: true }).catch(() => null);
  if (!r || r.code !== 0) return fail('nftables', r ? r.stderr.trim() : 'nft is not installed', 'apt-get install nftables (the kernel needs nf_tables)');
  return ok('nftables', 'usable');
};

const checkDiskTools: Check = async () => {
  const missing: string[] = [];
  for (const c of ['mkfs.ext4', 'e2fsck', 'losetup', 'nsenter']) if (!(await has(c))) missing.push(c);
  if (missing.length) return fail('disk tools', `missing: ${missing.join(', ')}`, 'apt-get install e2fsprogs mount util-linux');
  const loop = await run('losetup', ['-f'], { allowFailure: true });
  if (loop.code !== 0) return fail('loop devices', loop.stderr.trim(), 'modprobe loop');
  return ok('disk tools', 'mkfs.ext4, e2fsck, losetup, nsenter; loop devices available');
};

const checkTemplateTools: Check = async () => {
  const out: CheckResult[] = [];
  out.push((await has('mmdebstrap')) ? ok('mmdebstrap', 'present (Debian template)') : warn('mmdebstrap', 'missing: "vesh template build debian" needs it', 'apt-get install mmdebstrap'));
  const bb = await fs.stat('/bin/busybox').then(() => true, () => false);
  out.push(bb ? ok('busybox', 'present (busybox template)') : warn('busybox', 'missing: "vesh template build busybox" needs it', 'apt-get install busybox-static'));
  return out;
};

const checkDataDir: Check = async ({ layout }) => {
  const blocked = await firstUnsearchableAncestor(layout.dataDir);
  if (blocked) return fail('dataDir', `${blocked.dir} (above dataDir ${layout.dataDir}) is not searchable by other users`, `chmod o+x ${blocked.dir}, or choose another dataDir`);
  return ok('dataDir', `${layout.dataDir}: every directory above it can be passed by VE inits`);
};

const checkIdmap: Check = async ({ config }) => {
  const lo = config.runtime.idmapBase;
  const hi = lo + config.runtime.idmapSize - 1;
  const passwd = await fs.readFile('/etc/passwd', 'utf8').catch(() => '');
  const clash = passwd.split('\n').map((l) => l.split(':')).filter((f) => f.length >= 3 && Number(f[2]) >= lo && Number(f[2]) <= hi).map((f) => f[0]);
  if (clash.length) return warn('id range', `host users ${clash.join(', ')} have uids in the VE range ${lo}-${hi}`, 'set runtime.idmapBase to a free range (templates must then be rebuilt)');
  return ok('id range', `VE root is host uid ${lo} (range ${lo}-${hi}), used by no host user`);
};

const checkTemplates: Check = async ({ config, layout }) => {
  const want = config.defaults.template;
  const file = path.join(layout.templateDir(want), 'template.json');
  if (await fs.stat(file).then(() => true, () => false)) return ok('templates', `default template "${want}" present`);
  return warn('templates', `default template "${want}" is not built yet: first logins would fail`, `vesh template build ${want === 'busybox' ? 'busybox' : 'debian'}`);
};

const checkHostKeys: Check = async ({ config }) => {
  const dir = config.hostKeysDir;
  try {
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    const probe = path.join(dir, `.doctor-${process.pid}`);
    await fs.writeFile(probe, '');
    await fs.rm(probe);
    return ok('host keys', `${dir} is writable`);
  } catch (err) {
    return fail('host keys', `${dir}: ${(err as Error).message}`, `make ${dir} a writable directory, or set hostKeysDir`);
  }
};

export const CHECKS: Check[] = [
  checkRoot, checkNamespaces, checkOverlay, checkCgroups, checkRuntime, checkBridgeVeth, checkNftables,
  checkDiskTools, checkTemplateTools, checkDataDir, checkIdmap, checkTemplates, checkHostKeys,
];

/** Run every check; one that throws is reported as failed, never aborts the rest. */
export async function runChecks(ctx: CheckContext, checks: Check[] = CHECKS): Promise<CheckResult[]> {
  const out: CheckResult[] = [];
  for (const check of checks) {
    try {
      const r = await check(ctx);
      out.push(...(Array.isArray(r) ? r : [r]));
    } catch (err) {
      out.push(fail(check.name.replace(/^check/, '').toLowerCase() || 'check', (err as Error).message, 'see the message'));
    }
  }
  return out;
}

export function formatCheck(r: CheckResult): string {
  const tag = { ok: 'ok  ', warn: 'warn', fail: 'FAIL' }[r.status];
  return `${tag} ${r.name}: ${r.detail}${r.fix && r.status !== 'ok' ? ` — fix: ${r.fix}` : ''}`;
}

/** Exit status of `vesh doctor`: 1 when anything needed failed; warnings alone pass. */
export function doctorExitCode(results: CheckResult[]): number {
  return results.some((r) => r.status === 'fail') ? 1 : 0;
}

