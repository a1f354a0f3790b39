import { randomBytes } from 'node:crypto';
import { isLxcfsMounted, lxcfsPaths } from '../runtime/lxcfs.js';
import { constants as fsc, promises as fs, readFileSync } from 'node:fs';
import path from 'node:path';
import { ErrorCodes, errorMessage, isVeshError } from '../errors.js';
import type { ServerConfig } from '../config/server-config.js';
import { rangeProblems, type IdRange } from '../config/id-ranges.js';
import { detectCgroupLayout, type CgroupLayout } from '../runtime/cgroups.js';
import { veRlimits } from '../runtime/oci-bundle.js';
import { run, safeEnv } from './exec.js';
import { binaryLinkage } from './elf.js';
import { currentSysctl, hostSysctlNeeds, sysctlPath, VES_PER_HOST, type SysctlNeed } from './host-tuning.js';
import { firstUnsearchableAncestor, type Layout } from './layout.js';
import { forwardHelperPath, forwardRelayPath, sessionHelperPath, setupHelperPath } from './native-helpers.js';

/**
 * `vesh doctor`: can this host run VEs, and what to do if not. Each check is
 * a named async function; it answers ok, warn (vesh works, but something an
 * admin will want is missing) or fail (VEs cannot start), with the exact
 * command or setting that fixes it. A check removes whatever it made (a
 * scratch overlay, a bridge, a veth pair) even when it fails half way, and
 * never leaves the host changed: doctor may run next to a live server.
 */

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

export type Check = (ctx: CheckContext) => Promise<CheckResult | CheckResult[]>;

const ok = (name: string, detail: string): CheckResult => ({ name, status: 'ok', detail });
const fail = (name: string, detail: string, fix: string): CheckResult => ({ name, status: 'fail', detail, fix });
const warn = (name: string, detail: string, fix: string): CheckResult => ({ name, status: 'warn', detail, fix });

/** A hung helper must not hang doctor; every check is normally done in well under a second. */
const COMMAND_TIMEOUT_MS = 5000;

interface Outcome { code: number; stdout: string; stderr: string; missing: boolean }

/** Run a helper and never throw: a missing program is `missing`, a kill by the timeout a non-zero code. */
async function attempt(cmd: string, args: string[]): Promise<Outcome> {
  try {
    const r = await run(cmd, args, { allowFailure: true, timeoutMs: COMMAND_TIMEOUT_MS });
    const stderr = r.signal ? `${r.stderr}\n${cmd} killed by ${r.signal} (no answer within ${COMMAND_TIMEOUT_MS / 1000} s)` : r.stderr;
    return { code: r.code, stdout: r.stdout, stderr, missing: false };
  } catch (err) {
    const missing = isVeshError(err) && err.code === ErrorCodes.COMMAND_MISSING;
    return { code: -1, stdout: '', stderr: missing ? `${cmd}: not found` : errorMessage(err), missing };
  }
}

/** A helper's complaint in one line (without mount's "dmesg(1) may have more information" hint), or its exit code. */
function why(r: Outcome): string {
  const lines = r.stderr.split('\n').map((l) => l.trim()).filter((l) => l && !/^dmesg\(1\) may have more information/.test(l));
  return lines.join(' ') || `exit ${r.code}`;
}

/** A "not permitted" from a helper run by a non-root doctor says nothing about the kernel: the fix is to be root. */
function fixFor(r: Outcome, kernelFix: string): string {
  return process.getuid?.() !== 0 && /not permitted|permission denied|must be superuser/i.test(r.stderr) ? 'run vesh doctor as root' : kernelFix;
}

/** Is `cmd` an executable on the PATH helpers run with (see safeEnv)? */
async function onPath(cmd: string): Promise<boolean> {
  for (const dir of (safeEnv().PATH ?? '').split(':')) {
    if (await fs.access(path.join(dir, cmd), fsc.X_OK).then(() => true, () => false)) return true;
  }
  return false;
}

const exists = (p: string): Promise<boolean> => fs.stat(p).then(() => true, () => false);

// ------------------------------------------------------------------ pure helpers (unit-tested)

/** `runc --version` → [major, minor, patch], or null when the answer is not runc's. */
export function parseRuncVersion(stdout: string): [number, number, number] | null {
  const m = /^runc version (\d+)\.(\d+)\.(\d+)/m.exec(stdout);
  return m ? [Number(m[1]), Number(m[2]), Number(m[3])] : null;
}

/** runc 1.1 is the oldest this code and its OCI bundles are tried with. */
export function runcIsNewEnough([maj, min]: [number, number, number]): boolean {
  return maj > 1 || (maj === 1 && min >= 1);
}

/** Names in an /etc/passwd or /etc/group text whose numeric id (third field) lies in [lo, hi]. */
export function idsInRange(text: string, lo: number, hi: number): string[] {
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(':');
    if (f.length < 3 || line.startsWith('#') || !/^\d+$/.test(f[2]!)) continue;
    const id = Number(f[2]);
    if (id >= lo && id <= hi) out.push(`${f[0]} (${id})`);
  }
  return out;
}

/** Entries of an /etc/subuid or /etc/subgid text (name:start:count) that overlap [lo, hi]. */
export function subIdsInRange(text: string, lo: number, hi: number): string[] {
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const f = line.trim().split(':');
    if (f.length !== 3 || line.startsWith('#') || !/^\d+$/.test(f[1]!) || !/^\d+$/.test(f[2]!)) continue;
    const start = Number(f[1]);
    const end = start + Number(f[2]) - 1;
    if (Number(f[2]) > 0 && start <= hi && end >= lo) out.push(`${f[0]} (${start}-${end})`);
  }
  return out;
}

/** `a, b, c, d, e and 7 more`: a list kept to one readable line. */
export function listSome(items: string[], max = 5): string {
  return items.length <= max ? items.join(', ') : `${items.slice(0, max).join(', ')} and ${items.length - max} more`;
}

/** Which of `wanted` cgroup controllers this host offers, from /proc/self/mounts and (v2) the root's cgroup.controllers. */
export function presentControllers(layout: CgroupLayout, mountsText: string, v2Controllers: string, wanted: string[]): string[] {
  const have = new Set<string>();
  if (layout === 'v2') {
    for (const c of v2Controllers.split(/\s+/)) if (c) have.add(c);
  } else {
    for (const f of mountsText.split('\n').map((l) => l.split(' '))) {
      if (f[2] !== 'cgroup') continue;
      for (const opt of (f[3] ?? '').split(',')) have.add(opt);
    }
  }
  return wanted.filter((c) => have.has(c));
}

/** A kernel setting against what vesh needs of it (see host-tuning.ts): below is a warning (vesh serve raises it), far above one too when it widens a quota for every host user. */
export function judgeSysctl(need: SysctlNeed, value: number | null): CheckResult {
  const persist = `sysctl -w ${need.key}=${need.want} (and "${need.key} = ${need.want}" in /etc/sysctl.d/90-vesh.conf)`;
  if (value === null) return warn(need.key, `cannot read ${sysctlPath(need.key)}; vesh needs at least ${need.want}: ${need.why}`, persist);
  if (value < need.want) {
    return warn(need.key, `${value}, below the ${need.want} vesh needs${need.raise ? ' (vesh serve raises it when it starts)' : ''}: ${need.why}`, persist);
  }
  if (need.tooHigh !== undefined && value > need.tooHigh) {
    return warn(need.key, `${value}, far above the ${need.want} vesh needs; it holds for every non-root host user: ${need.why}`, `sysctl -w ${need.key}=${need.want}`);
  }
  return ok(need.key, `${value} (needs at least ${need.want}: ${need.why})`);
}

/**
 * The per-VE rlimits for the counters VEs share with host root (review M2),
 * as oci-bundle.ts sets them, against this process's own hard limits: runc
 * refuses a bundle rlimit above its caller's, so vesh lowers them to it.
 */
export function judgeSharedCounterLimits(veLimits: Array<{ type: string; hard: number }>, hostHard: (type: string) => number | null): CheckResult[] {
  const what: Record<string, string> = {
    RLIMIT_MSGQUEUE: 'POSIX message queue bytes',
    RLIMIT_SIGPENDING: 'queued signals',
    RLIMIT_MEMLOCK: 'SHM_LOCK\'d memory',
  };
  const out: CheckResult[] = [];
  for (const [type, label] of Object.entries(what)) {
    const ve = veLimits.find((l) => l.type === type)?.hard;
    const host = hostHard(type);
    const name = `${type.replace('RLIMIT_', '').toLowerCase()} per VE`;
    const why = `the kernel charges ${label} of every VE to host root too; each VE process is held to its own rlimit so that one VE cannot use up the count the others and host root share`;
    if (ve === undefined) out.push(warn(name, `no ${type} in the VE bundle: ${why}`, 'report this: oci-bundle.ts sets it'));
    else if (host !== null && host < ve) out.push(warn(name, `vesh's own hard ${type} is ${host}, so VEs get ${host}: ${why}`, `start vesh with a higher hard ${type} (systemd: Limit${type.replace('RLIMIT_', '')}=)`));
    else out.push(ok(name, `${ve} (${why})`));
  }
  return out;
}

// ------------------------------------------------------------------ the checks

const checkRoot: Check = async () => (process.getuid?.() === 0
  ? ok('root', 'running as root')
  : fail('root', `running as uid ${process.getuid?.()}: VEs need namespaces, cgroups, mounts and network devices`, 'run vesh as root (sudo vesh doctor)'));

const checkUserNsEnabled: Check = async () => {
  const raw = await fs.readFile('/proc/sys/user/max_user_namespaces', 'utf8').catch(() => null);
  if (raw === null) return fail('user namespaces enabled', 'this kernel has no user namespaces (/proc/sys/user/max_user_namespaces is missing)', 'a kernel built with CONFIG_USER_NS=y');
  const max = Number(raw.trim());
  if (!(max > 0)) return fail('user namespaces enabled', `user.max_user_namespaces is ${raw.trim()}`, 'sysctl -w user.max_user_namespaces=15000 (and put "user.max_user_namespaces = 15000" in /etc/sysctl.d/90-vesh.conf)');
  return ok('user namespaces enabled', `user.max_user_namespaces = ${max}`);
};

/**
 * Each namespace kind, one at a time so that a missing one is named. The
 * others are made inside a fresh user namespace, as runc makes a VE's.
 */
const checkNamespaces: Check = async () => {
  const kinds: Array<[string, string[], string]> = [
    ['pid', ['--pid', '--fork'], 'PID_NS'], ['mount', ['--mount'], 'NAMESPACES'], ['uts', ['--uts'], 'UTS_NS'],
    ['ipc', ['--ipc'], 'IPC_NS'], ['net', ['--net'], 'NET_NS'], ['cgroup', ['--cgroup'], 'CGROUP_NS'],
  ];
  const userFlags = ['--user', '--map-root-user'];
  const out: CheckResult[] = [];
  const user = await attempt('unshare', [...userFlags, 'true']);
  if (user.missing) return fail('namespaces', 'unshare is not installed', 'apt-get install util-linux');
  out.push(user.code === 0 ? ok('user namespace', 'usable') : fail('user namespace', why(user), fixFor(user, 'sysctl -w user.max_user_namespaces=15000; a kernel with CONFIG_USER_NS=y')));
  for (const [kind, flags, option] of kinds) {
    const inside = user.code === 0 ? userFlags : [];
    const r = await attempt('unshare', [...inside, ...flags, 'true']);
    out.push(r.code === 0
      ? ok(`${kind} namespace`, inside.length ? 'usable inside a user namespace' : 'usable (tried without a user namespace)')
      : fail(`${kind} namespace`, why(r), fixFor(r, `a kernel built with CONFIG_${option}=y`)));
  }
  return out;
};

/** A tiny overlay mounted in a scratch directory under /var/tmp and unmounted again. */
const checkOverlay: Check = async () => {
  const dir = await fs.mkdtemp(path.join('/var/tmp', 'vesh-doctor-overlay-'));
  const [lower, upper, work, merged] = ['lower', 'upper', 'work', 'merged'].map((d) => path.join(dir, d)) as [string, string, string, string];
  let mounted = false;
  try {
    for (const d of [lower, upper, work, merged]) await fs.mkdir(d);
    await fs.writeFile(path.join(lower, 'probe'), 'lower\n');
    const r = await attempt('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lower},upperdir=${upper},workdir=${work}`, merged]);
    if (r.code !== 0) {
      const known = (await fs.readFile('/proc/filesystems', 'utf8').catch(() => '')).split('\n').some((l) => l.trim().endsWith('overlay'));
      return fail('overlayfs', `${why(r)}${known ? '' : ' (overlay is not in /proc/filesystems)'}`, fixFor(r, 'modprobe overlay (a kernel with CONFIG_OVERLAY_FS)'));
    }
    mounted = true;
    const seen = await fs.readFile(path.join(merged, 'probe'), 'utf8').catch(() => '');
    if (seen !== 'lower\n') return fail('overlayfs', 'an overlay mounted but did not show its lower layer', 'modprobe overlay (a kernel with CONFIG_OVERLAY_FS)');
    return ok('overlayfs', 'mounted and unmounted an overlay');
  } finally {
    // Never recurse into a directory that is still a mount: that would delete through it.
    if (mounted && (await attempt('umount', [merged])).code !== 0) await attempt('umount', ['-l', merged]);
    await fs.rm(dir, { recursive: true, force: true }).catch(() => undefined);
  }
};

/**
 * The template as each VE sees it: an idmapped mount as the overlay's lower
 * layer, made by the setup helper exactly as a start makes it, in a scratch
 * directory on the file system that holds dataDir (idmapped mounts depend on
 * the file system: ext4, xfs, btrfs, tmpfs have them; NFS does not).
 */
const checkIdmappedLower: Check = async ({ config, layout }) => {
  const helper = setupHelperPath();
  if (!(await exists(helper))) return warn('idmapped template', `${helper} is not built, so it cannot be tried`, 'npm run build');
  const near = (await exists(layout.dataDir)) ? layout.dataDir : '/var/tmp';
  const dir = await fs.mkdtemp(path.join(near, '.vesh-doctor-idmap-'));
  const [lower, priv, merged] = ['lower', 'private', 'merged'].map((d) => path.join(dir, d)) as [string, string, string];
  const root = config.runtime.idmapBase;
  try {
    await fs.mkdir(lower);
    await fs.writeFile(path.join(lower, 'probe'), 'lower\n');
    const r = await attempt(helper, ['mount', '-', priv, path.join(priv, 'upper'), path.join(priv, 'work'), path.join(priv, 'ctl'), '-', merged, lower, String(root), `0:${config.runtime.idmapSize}`]);
    if (r.code !== 0) return fail('idmapped template', `${why(r)}`, fixFor(r, `put dataDir (${layout.dataDir}) on ext4, xfs or btrfs, on a kernel with idmapped mounts (5.12 or later; overlay over a detached idmapped mount needs 6.15 or later)`));
    const st = await fs.stat(path.join(merged, 'probe')).catch(() => null);
    if (st?.uid !== root) return fail('idmapped template', `a template file owned by root showed as uid ${st?.uid ?? '?'} through the idmapped mount, not as VE root (${root})`, 'run vesh doctor on a kernel with idmapped mounts (6.15 or later)');
    return ok('idmapped template', `templates on ${near}'s file system show in each VE's own id range (tried: root's file seen as ${root})`);
  } finally {
    if ((await attempt('umount', [merged])).code !== 0) await attempt('umount', ['-l', merged]);
    await fs.rm(dir, { recursive: true, force: true }).catch(() => undefined);
  }
};

const checkCgroups: Check = async () => {
  const layout = detectCgroupLayout();
  const wanted = ['memory', 'pids', 'cpu'];
  const mounts = readFileSync('/proc/self/mounts', 'utf8');
  const v2 = layout === 'v2' ? await fs.readFile('/sys/fs/cgroup/cgroup.controllers', 'utf8').catch(() => '') : '';
  const present = presentControllers(layout, mounts, v2, wanted);
  const missing = wanted.filter((c) => !present.includes(c));
  if (missing.length) {
    const fix = layout === 'v2'
      ? `boot with ${missing.includes('memory') ? '"cgroup_enable=memory" ' : ''}the ${missing.join(', ')} controller(s) enabled (kernel command line); they must appear in /sys/fs/cgroup/cgroup.controllers`
      : `mount the ${missing.join(', ')} hierarchies under /sys/fs/cgroup (systemd does; otherwise apt-get install cgroupfs-mount)${missing.includes('memory') ? ', and boot with "cgroup_enable=memory"' : ''}`;
    return fail('cgroups', `layout ${layout}; controllers missing: ${missing.join(', ')}`, fix);
  }
  return ok('cgroups', `layout ${layout}; memory, pids and cpu controllers present`);
};

const checkRuntime: Check = async ({ config }) => {
  const bin = config.runtime.binary;
  const r = await attempt(bin, ['--version']);
  if (r.code !== 0) {
    return fail('runtime', `runc binary "${bin}" ${r.missing ? 'is not installed' : `cannot be run: ${why(r)}`}`, `apt-get install runc (or set runtime.binary in vesh.yaml to where runc is)`);
  }
  const v = parseRuncVersion(r.stdout);
  if (!v) return fail('runtime', `"${bin}" answers, but not as runc: ${r.stdout.split('\n')[0]}`, 'apt-get install runc and set runtime.binary to it (runc 1.1 or later)');
  if (!runcIsNewEnough(v)) return fail('runtime', `runc ${v.join('.')} at ${bin} is too old (1.1 or later needed)`, 'apt-get install runc');
  return ok('runtime', `runc ${v.join('.')} (${bin})`);
};

/** A bridge and a veth pair with one end on it, under random names, deleted again. */
const checkBridgeVeth: Check = async () => {
  const tag = randomBytes(3).toString('hex');
  const br = `vdb${tag}`;
  const veth = `vdv${tag}`;
  const peer = `vdp${tag}`;
  try {
    const b = await attempt('ip', ['link', 'add', br, 'type', 'bridge']);
    if (b.missing) return fail('bridge and veth', 'ip is not installed', 'apt-get install iproute2');
    if (b.code !== 0) return fail('bridge and veth', `cannot make a bridge: ${why(b)}`, fixFor(b, 'modprobe bridge'));
    const v = await attempt('ip', ['link', 'add', veth, 'type', 'veth', 'peer', 'name', peer]);
    if (v.code !== 0) return fail('bridge and veth', `cannot make a veth pair: ${why(v)}`, fixFor(v, 'modprobe veth'));
    const m = await attempt('ip', ['link', 'set', veth, 'master', br]);
    if (m.code !== 0) return fail('bridge and veth', `cannot put a veth end on a bridge: ${why(m)}`, fixFor(m, 'modprobe bridge'));
    return ok('bridge and veth', 'made a bridge and a veth pair on it, and removed them');
  } finally {
    // Deleting one end of a veth pair deletes the other.
    await attempt('ip', ['link', 'del', veth]);
    await attempt('ip', ['link', 'del', br]);
  }
};

const checkNftables: Check = async () => {
  const r = await attempt('nft', ['list', 'tables']);
  if (r.missing) return fail('nftables', 'nft is not installed', 'apt-get install nftables');
  if (r.code !== 0) return fail('nftables', `nft list tables: ${why(r)}`, fixFor(r, 'modprobe nf_tables (a kernel with CONFIG_NF_TABLES)'));
  return ok('nftables', 'nft list tables works');
};

const checkDiskTools: Check = async () => {
  const out: CheckResult[] = [];
  const tools: Array<[string, string]> = [['mkfs.ext4', 'e2fsprogs'], ['e2fsck', 'e2fsprogs'], ['losetup', 'mount'], ['mount', 'mount']];
  const missing: Array<[string, string]> = [];
  for (const t of tools) if (!(await onPath(t[0]))) missing.push(t);
  out.push(missing.length
    ? fail('disk tools', `missing: ${missing.map((t) => t[0]).join(', ')}`, `apt-get install ${[...new Set(missing.map((t) => t[1]))].join(' ')}`)
    : ok('disk tools', 'mkfs.ext4, e2fsck, losetup, mount present'));
  if (!missing.some((t) => t[0] === 'losetup')) {
    // `losetup -f` only names a free device (creating the node through /dev/loop-control if needed); it attaches nothing.
    const loop = await attempt('losetup', ['-f']);
    out.push(loop.code === 0 ? ok('loop devices', `next free: ${loop.stdout.trim()}`) : fail('loop devices', why(loop), fixFor(loop, 'modprobe loop')));
  }
  return out;
};

const checkTemplateTools: Check = async () => {
  const out: CheckResult[] = [];
  out.push((await onPath('mmdebstrap'))
    ? ok('mmdebstrap', 'present (builds the debian template)')
    : warn('mmdebstrap', 'missing: "vesh template build debian" needs it', 'apt-get install mmdebstrap'));
  const bb = '/bin/busybox';
  const linkage = await binaryLinkage(bb);
  if (linkage === 'missing') out.push(warn('busybox', `${bb} is missing: "vesh template build busybox" needs it`, 'apt-get install busybox-static'));
  else if (linkage === 'dynamic') out.push(warn('busybox', `${bb} is dynamically linked and would not run in a VE`, 'apt-get install busybox-static'));
  else out.push(ok('busybox', `${bb} is static (builds the busybox template)`));
  return out;
};

const checkDataDir: Check = async ({ layout }) => {
  const blocked = await firstUnsearchableAncestor(layout.dataDir);
  if (blocked) return fail('dataDir', `${blocked.dir} (above dataDir ${layout.dataDir}, mode ${blocked.mode.toString(8)}) is not searchable by other users, and VE inits run as unprivileged host uids`, `chmod o+x ${blocked.dir} (or set dataDir elsewhere)`);
  return ok('dataDir', `${layout.dataDir}: every directory above it lets VE inits pass`);
};

/**
 * The span every VE's own id range is taken from (runtime.idmapBase,
 * idmapSize x idRanges) against the host's users and groups and the
 * subordinate ids the host hands out (/etc/subuid, /etc/subgid: rootless
 * containers of a host user run as those ids), and the ranges the VEs hold.
 */
const checkIdmap: Check = async ({ config, layout }) => {
  const out: CheckResult[] = [];
  const span = config.runtime;
  const lo = span.idmapBase;
  const hi = lo + span.idRanges * span.idmapSize - 1;
  const users = idsInRange(await fs.readFile('/etc/passwd', 'utf8').catch(() => ''), lo, hi);
  const groups = idsInRange(await fs.readFile('/etc/group', 'utf8').catch(() => ''), lo, hi);
  const subuids = subIdsInRange(await fs.readFile('/etc/subuid', 'utf8').catch(() => ''), lo, hi);
  const subgids = subIdsInRange(await fs.readFile('/etc/subgid', 'utf8').catch(() => ''), lo, hi);
  if (users.length || groups.length) {
    const who = [users.length ? `users ${listSome(users)}` : '', groups.length ? `groups ${listSome(groups)}` : ''].filter(Boolean).join('; ');
    out.push(warn('id range', `host ${who} have ids in the VE span ${lo}-${hi}: they would own a VE's files`, 'set runtime.idmapBase (or idRanges) in vesh.yaml to a span no host user or group uses'));
  }
  if (subuids.length || subgids.length) {
    const who = [subuids.length ? `/etc/subuid ${listSome(subuids)}` : '', subgids.length ? `/etc/subgid ${listSome(subgids)}` : ''].filter(Boolean).join('; ');
    out.push(warn('id range', `${who} overlap the VE span ${lo}-${hi}: that host user's rootless containers could run as a VE's ids and own its files`, 'move those subordinate ids out of the span (usermod --del-subuids/--add-subuids), or move the span (runtime.idmapBase)'));
  }
  if (out.length === 0) out.push(ok('id range', `VE ids: ${span.idRanges} ranges of ${span.idmapSize} in host ${lo}-${hi}, used by no host user, group or subordinate id`));
  // Each VE's recorded range: inside the span, its own.
  const ranges: Array<{ ve: string; ids: IdRange | null }> = [];
  for (const n of (await fs.readdir(layout.vesDir).catch(() => [] as string[])).filter((e) => !e.startsWith('.'))) {
    const rec = await readRecordCapped(path.join(layout.vesDir, n, 've.json'));
    if (!rec) continue;
    const ids = rec.ids as { base?: unknown; size?: unknown } | undefined;
    ranges.push({ ve: n, ids: ids && typeof ids.base === 'number' && typeof ids.size === 'number' ? { base: ids.base, size: ids.size } : null });
  }
  const problems = rangeProblems(ranges, span);
  const legacy = ranges.filter((r) => !r.ids).map((r) => r.ve);
  for (const p of problems) out.push(fail('VE id ranges', p, 'restore the VE\'s ve.json from a backup or destroy it; do not change runtime.idmapBase, idmapSize or idRanges while VEs exist'));
  if (legacy.length > 0) {
    out.push(warn('VE id ranges', `${legacy.length} VE(s) still share the ids ${lo}-${lo + span.idmapSize - 1} (made by an older vesh: ${listSome(legacy)})`, 'restart them ("vesh ve restart NAME"): each moves to a range of its own at its next start'));
  } else if (problems.length === 0) {
    out.push(ok('VE id ranges', `${ranges.length} VE(s), each with a range of its own inside the span`));
  }
  // Templates an older vesh shifted to the old shared range still work (mapped from there), but slot 0's VE owns them on the host.
  const shifted: string[] = [];
  for (const t of (await fs.readdir(layout.templatesDir).catch(() => [] as string[])).filter((e) => !e.startsWith('.'))) {
    const meta = await readRecordCapped(path.join(layout.templatesDir, t, 'template.json'), true);
    if (meta && typeof meta.idmapBase === 'number' && meta.idmapBase !== 0) shifted.push(`${t} (${meta.idmapBase})`);
  }
  if (shifted.length > 0) {
    out.push(warn('templates', `template(s) ${listSome(shifted)} were shifted to one VE range by an older vesh: on the host the VE holding that range owns their files`, 'stop the VEs built on them and restart "vesh serve": it moves each template back to host root\'s ids once none of its VEs runs'));
  }
  return out;
};

/**
 * A small JSON state file (ve.json, template.json): root's, on the host;
 * read without following a symlink (a template directory may be one, into a
 * shared cache: `followDir`), capped; null when absent or damaged ("vesh ve
 * list" names a damaged record).
 */
async function readRecordCapped(file: string, followDir = false): Promise<Record<string, unknown> | null> {
  const target = followDir ? path.join(await fs.realpath(path.dirname(file)).catch(() => path.dirname(file)), path.basename(file)) : file;
  const fh = await fs.open(target, fsc.O_RDONLY | fsc.O_NOFOLLOW).catch(() => null);
  if (!fh) return null;
  try {
    const buf = Buffer.alloc(64 * 1024);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    const v: unknown = JSON.parse(buf.subarray(0, bytesRead).toString('utf8'));
    return v && typeof v === 'object' ? (v as Record<string, unknown>) : null;
  } catch {
    return null;
  } finally {
    await fh.close();
  }
}

const checkTemplates: Check = async ({ config, layout }) => {
  const want = config.defaults.template;
  if (await exists(path.join(layout.templateDir(want), 'template.json'))) return ok('templates', `default template "${want}" present`);
  const fix = want === 'debian' || want === 'busybox' ? `vesh template build ${want}` : `vesh template build debian --name ${want} (or vesh template import ${want} FILE.tar)`;
  return warn('templates', `default template "${want}" is not built yet: logins to new VEs would fail`, fix);
};

/**
 * Can `vesh serve` write its host keys? Tried without creating the directory
 * (doctor leaves the host as it found it): a probe file in it when it exists,
 * else a probe directory in its nearest existing ancestor.
 */
const checkHostKeys: Check = async ({ config }) => {
  const dir = path.resolve(config.hostKeysDir);
  let at = dir;
  let st = await fs.stat(at).catch(() => null);
  while (!st && path.dirname(at) !== at) {
    at = path.dirname(at);
    st = await fs.stat(at).catch(() => null);
  }
  if (!st?.isDirectory()) return fail('host keys', `${at} is not a directory`, 'set hostKeysDir in vesh.yaml to a directory path');
  const probe = path.join(at, `.vesh-doctor-${randomBytes(4).toString('hex')}`);
  try {
    await fs.mkdir(probe, { mode: 0o700 });
    const where = at === dir ? `${dir} is writable` : `${dir} does not exist yet; vesh serve can create it in ${at}`;
    return ok('host keys', where);
  } catch (err) {
    return fail('host keys', `cannot write in ${at}: ${(err as Error).message}`, `mkdir -p -m 0700 ${dir} on a writable file system (or set hostKeysDir in vesh.yaml)`);
  } finally {
    await fs.rmdir(probe).catch(() => undefined);
  }
};

/**
 * A helper that runs inside VEs, which may hold no C library: it must be
 * built and static. Without it vesh still runs, minus what `without` says.
 */
function staticInVeHelperCheck(name: string, file: () => string, without: string): Check {
  const check: Check = async () => {
    const path = file();
    const kind = await binaryLinkage(path);
    if (kind === 'missing') return warn(name, `${path} is not built: ${without}`, 'npm run build (needs gcc and libc6-dev)');
    if (kind !== 'static') return warn(name, `${path} is ${kind === 'dynamic' ? 'dynamically linked' : 'not an ELF binary we can read'}: it cannot run in VEs without a C library`, 'npm run build (scripts/build-native.sh links it statically)');
    return ok(name, `${path} (static)`);
  };
  // runChecks names a check that throws after its function's name (checkSessionHelper → "session helper").
  const camel = name.replace(/(^| )([a-z])/g, (_m, _s, c: string) => c.toUpperCase());
  return Object.defineProperty(check, 'name', { value: `check${camel}` });
}

/** The session helper starts sessions inside VEs without a `runc exec` each (session-agents.ts). */
const checkSessionHelper = staticInVeHelperCheck('session helper', sessionHelperPath, 'every session pays for a runc exec');

/** The forward helper makes every -L/-R socket inside the VE. */
const checkForwardHelper = staticInVeHelperCheck('forward helper', forwardHelperPath, 'port forwarding (ssh -L/-R) is refused');

/** The forward relay is the host side of every forward: it checks what the helper in the VE sends before the server sees it. */
const checkForwardRelay: Check = async () => {
  const file = forwardRelayPath();
  const kind = await binaryLinkage(file);
  if (kind === 'missing') return warn('forward relay', `${file} is not built: port forwarding (ssh -L/-R) is refused`, 'npm run build (needs gcc and libc6-dev)');
  if (kind === 'unknown') return warn('forward relay', `${file} is not an ELF binary we can read: port forwarding (ssh -L/-R) is refused`, 'npm run build');
  return ok('forward relay', file);
};

/** The setup helper mounts a VE's file systems and is its network hook: no VE starts without it. */
const checkSetupHelper: Check = async () => {
  const file = setupHelperPath();
  const kind = await binaryLinkage(file);
  if (kind === 'missing') return fail('setup helper', `${file} is not built: no VE can start`, 'npm run build (needs gcc and libc6-dev)');
  if (kind === 'unknown') return fail('setup helper', `${file} is not an ELF binary we can read`, 'npm run build');
  return ok('setup helper', file);
};

/** Kernel settings every VE draws on (pid_max, pty.max, inotify, key quotas), each with the value vesh needs and why. */
const checkHostSysctls: Check = async ({ config }) => {
  const needs = hostSysctlNeeds({ pidsPerVe: config.defaults.limits.pids, ptysPerVe: config.runtime.ptysPerVe });
  const out: CheckResult[] = [];
  for (const need of needs) out.push(judgeSysctl(need, await currentSysctl(need.key)));
  // Not raised by vesh: the kernel sizes it from RAM, and it is what keeps tasks from eating all memory.
  const threads = await currentSysctl('kernel.threads-max');
  const wantThreads = VES_PER_HOST * config.defaults.limits.pids;
  out.push(threads !== null && threads < wantThreads
    ? warn('kernel.threads-max', `${threads}: ${VES_PER_HOST} VEs with their full ${config.defaults.limits.pids} tasks each would need ${wantThreads}; the kernel sizes this from RAM, so that many VEs at their limit need more memory (or lower pids limits)`, 'add memory, or lower defaults.limits.pids')
    : ok('kernel.threads-max', `${threads ?? 'unknown'} (${VES_PER_HOST} VEs of ${config.defaults.limits.pids} tasks need ${wantThreads})`));
  return out;
};

/** Host limits of vesh itself that cap the per-VE rlimits for counters shared with host root (review M2). */
const checkSharedCounters: Check = async () => {
  const limits = readFileSync('/proc/self/limits', 'utf8');
  const names: Record<string, string> = { RLIMIT_MSGQUEUE: 'Max msgqueue size', RLIMIT_SIGPENDING: 'Max pending signals', RLIMIT_MEMLOCK: 'Max locked memory' };
  const hostHard = (type: string): number | null => {
    const line = limits.split('\n').find((l) => l.startsWith(names[type] ?? '\0'));
    const m = line ? /^\S+(?:\s\S+)*?\s{2,}\S+\s+(\S+)/.exec(line) : null;
    if (!m) return null;
    return m[1] === 'unlimited' ? Infinity : Number(m[1]);
  };
  return judgeSharedCounterLimits(veRlimits(), hostHard);
};

/**
 * Socket buffers (review N1). cgroup v2 charges them to the VE's memory; v1
 * only TCP, and only with a TCP limit (the bundle sets kernelTCP). UDP
 * buffers on v1 are charged nowhere: only the host-wide udp_mem bounds them.
 */
const checkSocketMemory: Check = async () => {
  const layout = detectCgroupLayout();
  if (layout === 'v2') return ok('socket memory', 'cgroup v2 charges TCP and UDP buffers to the memory limit of the VE that holds them');
  const out: CheckResult[] = [];
  const tcpKnob = await exists('/sys/fs/cgroup/memory/memory.kmem.tcp.limit_in_bytes');
  out.push(tcpKnob
    ? ok('tcp socket memory', 'cgroup v1: each VE\'s TCP buffers are charged to it and held to its memory limit (memory.kmem.tcp.limit_in_bytes)')
    : warn('tcp socket memory', 'cgroup v1 without memory.kmem.tcp.limit_in_bytes: VE TCP buffers escape their memory limits into the host-wide tcp_mem pool', 'boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1), or a kernel with CONFIG_MEMCG_KMEM'));
  const udp = (await fs.readFile('/proc/sys/net/ipv4/udp_mem', 'utf8').catch(() => '')).trim().split(/\s+/).map(Number);
  const pages = udp[2];
  const mib = pages && Number.isFinite(pages) ? Math.round((pages * 4096) / 1024 / 1024) : null;
  out.push(warn('udp socket memory', `cgroup v1 charges UDP buffers to no cgroup: one VE can hold up to net.ipv4.udp_mem's ${mib ?? '?'} MiB host-wide (then UDP drops for every VE and the host); each socket holds at most 2 x net.core.rmem_max`, 'boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1), which charges them to the VE; or lower net.ipv4.udp_mem to what the host can spare'));
  return out;
};

/**
 * The host's /proc (review N2). vesh keeps session commands and client
 * addresses off its own processes' command lines; the processes inside VEs
 * are host processes too, and their command lines (a tenant's
 * `mysql -pSECRET`) are readable by every host user unless /proc hides them.
 */
const checkProcHidepid: Check = async () => {
  const line = (await fs.readFile('/proc/self/mounts', 'utf8').catch(() => '')).split('\n').map((l) => l.split(' ')).find((f) => f[1] === '/proc' && f[2] === 'proc');
  const opts = line?.[3] ?? '';
  if (/(^|,)hidepid=(2|invisible|noaccess|1)(,|$)/.test(opts)) return ok('host /proc', `mounted with ${/hidepid=[^,]+/.exec(opts)![0]}: host users see only their own processes`);
  return warn('host /proc', 'mounted without hidepid: every host user can read the command lines of the processes in every VE (a tenant\'s passwords given on a command line)', 'mount -o remount,hidepid=invisible /proc (and hidepid=invisible in /etc/fstab; give monitoring tools a gid= exemption)');
};

/**
 * LXCFS (runtime/lxcfs.ts): without it VEs start anyway but see the host's
 * memory, CPUs, load and uptime in /proc, so free, top, nproc-like sysconf
 * and JVM/Node heap sizing inside a VE size themselves to the host.
 */
const checkLxcfs: Check = async (ctx) => {
  const name = 'lxcfs';
  if (!ctx.config.runtime.lxcfs) return ok(name, 'off (runtime.lxcfs: false): VEs see the host\'s memory, CPUs and uptime in /proc');
  const v = await attempt('lxcfs', ['--version']);
  if (v.missing || v.code !== 0) {
    return warn(name, 'lxcfs is not installed: VEs start, but free, top and uptime inside them show the host\'s memory, CPUs and uptime', 'apt-get install lxcfs (or set runtime.lxcfs: false to silence this)');
  }
  if (!(await exists('/dev/fuse'))) {
    return warn(name, `lxcfs ${v.stdout.trim()} is installed but /dev/fuse is missing: it cannot mount, VEs see the host's /proc`, 'modprobe fuse (and add fuse to /etc/modules)');
  }
  const { mountPoint } = lxcfsPaths(path.dirname(ctx.layout.runtimeRoot));
  if ((await isLxcfsMounted(mountPoint)) && !(await exists(path.join(mountPoint, 'proc', 'uptime')))) {
    return warn(name, `the instance's lxcfs at ${mountPoint} does not answer (its daemon died): VEs started from now on see the host's /proc`, 'restart vesh serve (it starts lxcfs again with its first VE start)');
  }
  return ok(name, `lxcfs ${v.stdout.trim()}: each VE sees its own memory, CPUs, load and uptime in /proc`);
};

export const CHECKS: Check[] = [
  checkRoot, checkUserNsEnabled, checkNamespaces, checkOverlay, checkCgroups, checkRuntime, checkBridgeVeth, checkNftables,
  checkDiskTools, checkTemplateTools, checkDataDir, checkIdmap, checkIdmappedLower, checkTemplates, checkHostKeys, checkSetupHelper, checkSessionHelper, checkForwardHelper, checkForwardRelay,
  checkHostSysctls, checkSharedCounters, checkSocketMemory, checkProcHidepid, checkLxcfs,
];

/** Run every check in turn; one that throws is reported as failed and never stops the rest. */
export async function runChecks(ctx: CheckContext, checks: Check[] = CHECKS): Promise<CheckResult[]> {
  const out: CheckResult[] = [];
  for (const check of checks) {
    try {
      const r = await check(ctx);
      out.push(...(Array.isArray(r) ? r : [r]));
    } catch (err) {
      const name = check.name.replace(/^check/, '').replace(/([a-z])([A-Z])/g, '$1 $2').toLowerCase() || 'check';
      out.push(fail(name, `the check itself broke: ${(err as Error).message}`, 'report this; the message above says what went wrong'));
    }
  }
  return out;
}

/** `ok   <what>: <detail>`, `warn <what>: <problem> — fix: <…>`, `FAIL <what>: <problem> — fix: <…>`. */
export function formatCheck(r: CheckResult): string {
  const tag = { ok: 'ok  ', warn: 'warn', fail: 'FAIL' }[r.status];
  return `${tag} ${r.name}: ${r.detail}${r.fix && r.status !== 'ok' ? ` — fix: ${r.fix}` : ''}`;
}

/** Exit status of `vesh doctor`: 1 when anything needed failed; warnings alone pass. */
export function doctorExitCode(results: CheckResult[]): number {
  return results.some((r) => r.status === 'fail') ? 1 : 0;
}

/**
 * VE disks (review L7). A VE with `disk: 0` keeps its files on the host's
 * disk with no limit; and disk images are sparse, so limits that add up to
 * more than the file system holding them overcommit it: VEs that fill their
 * disks fill the host's first. Both are allowed (an admin may want them) but
 * said here. Reads each VE's record (a root-owned host file, capped).
 */
const checkVeDisks: Check = async ({ config, layout }) => {
  const out: CheckResult[] = [];
  if (config.defaults.limits.disk === 0) {
    out.push(warn('VE disks', 'defaults.limits.disk is 0: new VEs get no disk of their own and write to the host disk without limit', 'set defaults.limits.disk in vesh.yaml (e.g. 2G)'));
  }
  const names = (await fs.readdir(layout.vesDir).catch(() => [] as string[])).filter((n) => !n.startsWith('.'));
  const unlimited: string[] = [];
  let committed = 0;
  for (const n of names) {
    const fh = await fs.open(path.join(layout.vesDir, n, 've.json'), fsc.O_RDONLY | fsc.O_NOFOLLOW).catch(() => null);
    if (!fh) continue;
    try {
      const buf = Buffer.alloc(64 * 1024);
      const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
      const disk = (JSON.parse(buf.subarray(0, bytesRead).toString('utf8')) as { limits?: { disk?: unknown } }).limits?.disk;
      if (typeof disk !== 'number') continue;
      if (disk === 0) unlimited.push(n);
      committed += disk;
    } catch { /* a damaged record: "vesh ve list" names it */ } finally {
      await fh.close();
    }
  }
  if (unlimited.length > 0) {
    out.push(warn('VE disks', `${unlimited.length} VE(s) have no disk limit (${listSome(unlimited)}): their files sit on the host disk holding ${layout.vesDir}, without limit`, 'recreate them with "vesh ve create NAME --disk SIZE" (copy the files over), or watch that disk'));
  }
  const st = await fs.statfs(layout.vesDir).catch(() => null);
  if (st) {
    const size = st.blocks * st.bsize;
    const gib = (b: number) => `${(b / 1024 ** 3).toFixed(1)} GiB`;
    if (committed > size) {
      out.push(warn('VE disks', `VE disk limits add up to ${gib(committed)}, more than the ${gib(size)} file system holding ${layout.vesDir}: the sparse images overcommit it, and VEs filling their disks fill the host's first`, `lower disk limits, or put dataDir on a file system of at least ${gib(committed)}`));
    } else if (unlimited.length === 0) {
      out.push(ok('VE disks', `${names.length} VE(s), disk limits add up to ${gib(committed)} of the ${gib(size)} file system holding them`));
    }
  }
  return out;
};
CHECKS.push(checkVeDisks);
