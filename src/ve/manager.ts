import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import type { Logger } from '../audit/logger.js';
import { resolveLimits, type Limits, type LimitsInput } from '../config/limits.js';
import type { ServerConfig } from '../config/server-config.js';
import { ErrorCodes, VeshError, errorMessage, isVeshError } from '../errors.js';
import { allocateIdRange, legacyRange, type IdRange } from '../config/id-ranges.js';
import { cgroupDirs, detectCgroupLayout, readCgroupStats, removeCgroupDirs, type CgroupLayout } from '../runtime/cgroups.js';
import { VE_PROCESS_ENV, buildOciConfig, type OciHook } from '../runtime/oci-bundle.js';
import { ensureLxcfs, lxcfsOciMounts } from '../runtime/lxcfs.js';
import type { ContainerRuntime, ContainerState, ExecSpec, HostCommand } from '../runtime/types.js';
import type { VeNetIdentity } from '../net/types.js';
import { observeVeStart } from '../audit/metrics.js';
import type { TemplateInfo } from '../template/types.js';
import { run } from '../system/exec.js';
import { VE_TREE_DIR_MODE, prepareDataDir, secureVeTreeDir, type Layout } from '../system/layout.js';
import { tuneHost } from '../system/host-tuning.js';
import { forwardHelperPath, forwardRelayPath } from '../system/native-helpers.js';
import { processStartTime } from '../system/proc.js';
import { readCappedNoFollow } from '../system/tree-read.js';
import { withRevert } from '../system/revert.js';
import type { AgentRoute, VeAccess, VeProcessSpec, VeUserInfo } from './access.js';
import { withLock } from './lock.js';
import { assertVeName } from './names.js';
import { parseGroup, parsePasswd } from './passwd.js';
import { DEFAULT_REBOOT_POLICY, decideReboot, type RebootPolicy } from './reboot-policy.js';
import { SessionAgents } from './session-agents.js';
import { readRecord, writeJsonAtomic, type VeRecord } from './record.js';
import { canDestroy, canStart, canStop, needsCleanup, veStateOf, type VeState } from './state.js';
import {
  asHostDiskFull, createDiskImage, diskUsage, mountedPaths, mountVeDisk, mountVeFileSystems, mountsUnder, shiftVeFiles, veMountCommand, unmountAll, vePaths, type VePaths,
} from './storage.js';

/** What the VE layer needs of the template module. */
export interface TemplateSource {
  get(name: string): Promise<TemplateInfo>;
  /** Remove a template; `usersOf` names the VEs built on it (any: refused). */
  remove(name: string, usersOf: (template: string) => Promise<string[]>): Promise<void>;
  /** Templates an older vesh shifted to its one VE range. */
  shifted(): Promise<string[]>;
  /** Shift one back to host root's ids, in place; no VE may have it mounted meanwhile. */
  unshift(name: string): Promise<number>;
}

/** What the VE layer needs of the network module. */
export interface NetworkPlane {
  /** `ves`: every VE's identity, for the anti-spoofing set (read once per process). */
  ensureHost(ves: () => Promise<VeNetIdentity[]>): Promise<void>;
  allocateAddress(used: string[]): string;
  vethNameFor(address: string): string;
  /** Anti-spoofing entry for the VE's port; kept while the VE exists. */
  allow(id: VeNetIdentity): Promise<void>;
  /** Drop the anti-spoofing entry of a destroyed VE. */
  forget(id: VeNetIdentity): Promise<void>;
  /** attach as an OCI createRuntime hook, run by the engine before the VE's init starts. */
  attachHook(id: VeNetIdentity): OciHook;
  detach(id: VeNetIdentity): Promise<void>;
  hostsFile(name: string, address: string): string;
  resolvConf(): Promise<string>;
}

export interface VeManagerDeps {
  config: ServerConfig;
  layout: Layout;
  logger: Logger;
  runtime: ContainerRuntime;
  templates: TemplateSource;
  network: NetworkPlane;
  /** How reboot loops are slowed and ended (default DEFAULT_REBOOT_POLICY). */
  rebootPolicy?: RebootPolicy;
}

export interface VeStatus {
  name: string;
  state: VeState;
  template: string;
  address: string;
  onBoot: boolean;
  limits: Limits;
  pid: number | null;
  memoryBytes: number | null;
  processes: number | null;
  disk: { used: number; total: number } | null;
  createdAt: string;
  /** The VE's host uid/gid range; null for a VE made before per-VE ranges, until its next start. */
  ids: IdRange | null;
}

export interface CreateOptions {
  template?: string;
  limits?: LimitsInput;
  onBoot?: boolean;
}

const SHUTDOWN_MARKER = 'shutdown';

/**
 * VE lifecycle: create, start, stop, restart, destroy, list, status, exec,
 * plus the VeAccess the SSH side uses. State on disk is ves/NAME/ve.json;
 * whether a VE runs is always asked of the engine, so a restarted vesh finds
 * running VEs again. Every verb takes the VE's lock, refreshes state first
 * and registers an undo for each step it makes.
 */
export class VeManager implements VeAccess {
  private readonly cfg: ServerConfig;
  private readonly layout: Layout;
  private readonly log: Logger;
  private readonly runtime: ContainerRuntime;
  private readonly templates: TemplateSource;
  private readonly network: NetworkPlane;
  readonly cgroupLayout: CgroupLayout;
  private readonly inflight = new Map<string, Promise<void>>();
  /** VEs the monitor watches: name → init pid. */
  private readonly watched = new Map<string, number>();
  /** Start time (/proc/PID/stat field 22) of each watched init: a reused pid is not the VE's init. */
  private readonly initStart = new Map<string, string>();
  private readonly userDbCache = new Map<string, UserDatabase>();
  private readonly agents: SessionAgents;
  private monitorTimer: NodeJS.Timeout | null = null;
  private monitorBusy = false;
  /** VEs whose init's exit is being handled now: each on its own, so one slow or looping VE holds up no other. */
  private readonly exiting = new Set<string>();
  /** When this process last started each VE (for the reboot policy's uptime). */
  private readonly startedAt = new Map<string, number>();
  /** Quick reboots in a row per VE (see reboot-policy.ts); a start from outside the monitor ends the streak. */
  private readonly rebootStreak = new Map<string, number>();
  /** Restarts the reboot policy delayed: VE → timer. */
  private readonly delayedRestarts = new Map<string, NodeJS.Timeout>();
  private readonly rebootPolicy: RebootPolicy;
  /** The instance's LXCFS mount point once this process has made sure of it (see lxcfsView). */
  private lxcfsMount: Promise<string> | null = null;

  constructor(deps: VeManagerDeps) {
    this.cfg = deps.config;
    this.layout = deps.layout;
    this.log = deps.logger.child({ component: 've' });
    this.runtime = deps.runtime;
    this.templates = deps.templates;
    this.network = deps.network;
    this.rebootPolicy = deps.rebootPolicy ?? DEFAULT_REBOOT_POLICY;
    this.cgroupLayout = detectCgroupLayout();
    this.agents = new SessionAgents({
      runtime: this.runtime,
      dir: this.layout.agentsDir,
      log: this.log,
      currentInit: (ve) => this.knownInit(ve),
      enabled: this.cfg.runtime.sessionAgents,
    });
  }

  /** The LXCFS binds for a starting VE; none (a warning, the VE still starts) when off or when lxcfs does not work. */
  private async lxcfsView(name: string): Promise<Awaited<ReturnType<typeof lxcfsOciMounts>>> {
    if (!this.cfg.runtime.lxcfs) return [];
    try {
      // Made once per process, at its first VE start: the engine's mount
      // namespace (runc.ts) is a private copy made at that start too, so a
      // daemon started later would not be in it. One that died since gives
      // no files (ENOTCONN) and VEs start without the binds until vesh restarts.
      this.lxcfsMount ??= ensureLxcfs(path.dirname(this.layout.runtimeRoot)).then((m) => m.mountPoint);
      return await lxcfsOciMounts(await this.lxcfsMount);
    } catch (e) {
      const err = e as VeshError;
      this.log.warn({ event: 've.lxcfs_unavailable', ve: name, code: err.code, err: err.message }, `VE "${name}" starts with the host's /proc view: ${err.message}`);
      return [];
    }
  }

  private paths(name: string): VePaths {
    return vePaths(this.layout.veDir(name));
  }

  /** The VE's cgroup path (under each v1 hierarchy, or in the v2 tree). */
  cgroupsPath(name: string): string {
    return `${this.layout.cgroupParent}/${name}`;
  }

  private netId(rec: VeRecord): VeNetIdentity {
    return { name: rec.name, address: rec.address, hostVeth: rec.hostVeth };
  }

  private async allNetIds(): Promise<VeNetIdentity[]> {
    const entries = await fs.readdir(this.layout.vesDir).catch(() => [] as string[]);
    const recs = await Promise.all(entries.filter((e) => !e.startsWith('.')).map((e) => readRecord(this.paths(e).record).catch(() => null)));
    return recs.filter((r): r is VeRecord => r !== null).map((r) => this.netId(r));
  }

  private async lock<T>(name: string, body: () => Promise<T>): Promise<T> {
    await this.prepared();
    return withLock(this.layout.locksDir, `ve-${name}`, body);
  }

  private preparing: Promise<void> | null = null;
  private prepared(): Promise<void> {
    this.preparing ??= prepareDataDir(this.layout).then(() => tuneHost(this.log, { pidsPerVe: this.cfg.defaults.limits.pids, ptysPerVe: this.cfg.runtime.ptysPerVe }));
    return this.preparing;
  }

  async exists(name: string): Promise<boolean> {
    assertVeName(name);
    return (await readRecord(this.paths(name).record)) !== null;
  }

  private async record(name: string): Promise<VeRecord> {
    assertVeName(name);
    const rec = await readRecord(this.paths(name).record);
    if (!rec) {
      throw new VeshError(ErrorCodes.VE_NOT_FOUND, `VE "${name}" does not exist: create it with "vesh ve create ${name}"`, { userMessage: 'Your environment does not exist.' });
    }
    return rec;
  }

  async names(): Promise<string[]> {
    let entries: string[];
    try {
      entries = await fs.readdir(this.layout.vesDir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    const out: string[] = [];
    for (const e of entries.sort()) {
      if (!e.startsWith('.') && (await readRecord(path.join(this.layout.vesDir, e, 've.json')).catch(() => null))) out.push(e);
    }
    return out;
  }

  /** VEs built on a template (the template module refuses to remove one in use). */
  async usersOfTemplate(template: string): Promise<string[]> {
    const out: string[] = [];
    for (const n of await this.names()) {
      const rec = await readRecord(this.paths(n).record);
      if (rec?.template === template) out.push(n);
    }
    return out;
  }

  /**
   * Remove a template no VE uses. Under the lock creates take, so no create
   * can pick the template between the check for users and the removal.
   */
  async removeTemplate(template: string): Promise<void> {
    await withLock(this.layout.locksDir, 'create', () => this.templates.remove(template, (t) => this.usersOfTemplate(t)));
  }

  // ---------------------------------------------------------------- create

  async create(name: string, opts: CreateOptions = {}): Promise<VeRecord> {
    assertVeName(name);
    const limits = resolveLimits(opts.limits, this.cfg.defaults.limits);
    const templateName = opts.template ?? this.cfg.defaults.template;
    // Fails early, before the lock wait, when the template is unknown.
    await this.templates.get(templateName);
    // Address and id range allocation and the record's appearance are one
    // step under global locks, so two creates never take one address or
    // range (nor a VE moving to a range of its own at its start: the ids
    // lock), and a template cannot be removed (removeTemplate) while a
    // create is using it.
    await this.prepared();
    return withLock(this.layout.locksDir, 'create', () => this.lock(name, () => withLock(this.layout.locksDir, IDS_LOCK, async () => {
      const template = await this.templates.get(templateName);
      const p = this.paths(name);
      if (await readRecord(p.record)) {
        throw new VeshError(ErrorCodes.VE_EXISTS, `VE "${name}" already exists: use "vesh ve start ${name}", or destroy it first`);
      }
      const used: string[] = [];
      const held: IdRange[] = [];
      for (const n of await this.names()) {
        const r = await readRecord(this.paths(n).record);
        if (r) {
          used.push(r.address);
          held.push(r.ids ?? legacyRange(this.cfg.runtime));
        }
      }
      const address = this.network.allocateAddress(used);
      const ids = allocateIdRange(held, this.cfg.runtime);
      const rec: VeRecord = {
        name,
        template: template.name,
        limits,
        address,
        hostVeth: this.network.vethNameFor(address),
        onBoot: opts.onBoot ?? false,
        createdAt: new Date().toISOString(),
        ids,
      };
      // Whichever step runs out of host disk (directory, image, identity files, record), the message names that disk.
      await withRevert(async (r) => {
        // Traversable by the VE's host gid only (see VE_TREE_DIR_MODE): runc's init
        // runs as VE root's host uid/gid when it bind-mounts the rootfs and /run/vesh.
        await fs.mkdir(p.dir, { mode: VE_TREE_DIR_MODE });
        await secureVeTreeDir(p.dir, ids.base);
        r.add('remove VE directory', () => fs.rm(p.dir, { recursive: true, force: true }));
        r.add('unmount VE file systems', () => unmountAll(p));
        if (limits.disk > 0) await createDiskImage(p, limits.disk, ids.base);
        await mountVeFileSystems(p, { hasImage: limits.disk > 0, lowerdir: template.rootfs, ids, templateBase: template.idmapBase });
        await this.writeIdentityFiles(p, rec);
        await unmountAll(p);
        await writeJsonAtomic(p.record, rec);
      }, (failures) => this.log.error({ event: 've.create.undo_failed', ve: name, failures: failures.map((f) => `${f.what}: ${errorMessage(f.error)}`) }))
        .catch((err: unknown) => { throw asHostDiskFull(err, this.layout.vesDir, `create VE "${name}"`); });
      this.log.info({ event: 've.created', ve: name, template: template.name, address, limits, ids });
      if (limits.disk === 0) {
        // Allowed (an admin may want it), but its files then count against nobody's limit; "vesh doctor" lists such VEs.
        this.log.warn({ event: 've.no_disk_limit', ve: name, dir: this.layout.vesDir }, `VE "${name}" has no disk limit: its files sit on the host disk without limit`);
      }
      return rec;
    })));
  }

  /**
   * The VE's own /etc/hostname, /etc/hosts and /etc/resolv.conf, written once
   * at creation before the VE has ever run (so no VE-made symlink can redirect
   * the write), owned by VE root; afterwards they are VE root's to change.
   */
  private async writeIdentityFiles(p: VePaths, rec: VeRecord): Promise<void> {
    const etc = path.join(p.rootfs, 'etc');
    const st = await fs.lstat(etc).catch(() => null);
    if (!st?.isDirectory()) {
      throw new VeshError(ErrorCodes.TEMPLATE_NOT_FOUND, `template "${rec.template}" has no /etc directory: rebuild or re-import it`);
    }
    const root = (rec.ids ?? legacyRange(this.cfg.runtime)).base;
    const files: Array<[string, string]> = [
      ['hostname', `${rec.name}\n`],
      ['hosts', this.network.hostsFile(rec.name, rec.address)],
      ['resolv.conf', await this.network.resolvConf()],
    ];
    for (const [file, content] of files) {
      const target = path.join(etc, file);
      await fs.rm(target, { force: true });
      await fs.writeFile(target, content, { mode: 0o644, flag: 'wx' });
      await fs.lchown(target, root, root);
    }
  }

  // ---------------------------------------------------------------- start

  async start(name: string): Promise<void> {
    this.rebootStreak.delete(name);
    await this.lock(name, () => this.startLocked(name));
  }

  private async startLocked(name: string): Promise<void> {
    const t = stepTimer();
    const rec = await this.record(name);
    const p = this.paths(name);
    const before = await this.runtime.state(name);
    const state = veStateOf(before);
    if (!canStart(state)) {
      throw new VeshError(ErrorCodes.VE_STATE, `VE "${name}" is already ${state}: stop it first if you want to restart it ("vesh ve restart ${name}")`);
    }
    if (needsCleanup(before)) await this.cleanupLocked(rec);
    const ids = await this.ownIds(rec);
    // A VE made by an older vesh has a directory any host user could pass through.
    await secureVeTreeDir(p.dir, ids.base);
    // This run has not been asked to stop (see stopLocked).
    await fs.rm(p.stopRequest, { force: true });
    const template = await this.templates.get(rec.template);
    t('state');
    const started = Date.now();
    await withRevert(async (r) => {
      r.add('unmount VE file systems', () => unmountAll(p));
      // Mounted by the engine's prepare step, in the same process start.
      const mounts = await veMountCommand(p, { hasImage: rec.limits.disk > 0, lowerdir: template.rootfs, ids, templateBase: template.idmapBase, marker: SHUTDOWN_MARKER });
      t('fsck');
      await this.network.ensureHost(() => this.allNetIds());
      t('host_net');
      const oci = buildOciConfig({
        name,
        hostname: name,
        rootfs: p.rootfs,
        init: template.init,
        limits: rec.limits,
        cgroupsPath: this.cgroupsPath(name),
        idmap: ids,
        ctlDir: p.ctl,
        createRuntimeHooks: [this.network.attachHook(this.netId(rec))],
        ptys: this.cfg.runtime.ptysPerVe,
        cgroupLayout: this.cgroupLayout,
        veFirewall: this.cfg.runtime.veFirewall,
        viewMounts: await this.lxcfsView(name),
      });
      await writeJsonAtomic(path.join(p.dir, 'config.json'), oci);
      t('bundle');
      await fs.rm(p.pidFile, { force: true });
      // Two steps, run in reverse: the engine may make the VE's cgroup before it
      // fails (the TCP limit is set in it first), and its delete may fail too (a
      // missing engine binary), which must not keep the cgroup from going.
      r.add('remove cgroups', () => removeCgroupDirs(cgroupDirs(this.cgroupsPath(name), this.cgroupLayout)));
      r.add('delete container', () => this.runtime.delete(name, true));
      r.add('detach network', () => this.network.detach(this.netId(rec)));
      // The engine makes the namespaces, runs the network hook (veth, address,
      // route) and only then the VE's init; the anti-spoofing entry goes in
      // meanwhile (it needs no VE).
      const settled = await Promise.allSettled([
        this.network.allow(this.netId(rec)),
        this.runtime.run(name, { bundleDir: p.dir, pidFile: p.pidFile, consoleFile: p.console, prepare: mounts }),
      ]);
      const failed = settled.find((x): x is PromiseRejectedResult => x.status === 'rejected');
      if (failed) throw failed.reason;
      t('run');
      const pid = Number((await fs.readFile(p.pidFile, 'utf8')).trim());
      await this.watch(name, pid);
      this.startedAt.set(name, Date.now());
    }, (failures) => this.log.error({ event: 've.start.undo_failed', ve: name, failures: failures.map((f) => `${f.what}: ${errorMessage(f.error)}`) })).catch((err) => {
      this.log.error({ event: 've.start_failed', ve: name, err: errorMessage(err) });
      if (isVeshError(err) && err.code !== ErrorCodes.RUNTIME_FAILED && err.code !== ErrorCodes.COMMAND_FAILED) throw err;
      throw new VeshError(ErrorCodes.VE_START_FAILED, `VE "${name}" failed to start: ${errorMessage(err)}`, { cause: err, userMessage: 'Your environment failed to start; the administrator has been told why.' });
    });
    observeVeStart(Date.now() - started);
    this.log.info({ event: 've.started', ve: name, ms: Date.now() - started, steps: t.steps });
  }

  /**
   * The VE's own id range. A VE made when all VEs shared one range (its
   * record has no `ids`; it is stopped here) gets the smallest free range
   * now, and its files move there from the shared one: recorded first with
   * `idsFrom`, so a move cut short is finished at the next start (only ids
   * still in the old range move, so doing it twice changes nothing). The
   * last such VE may get the shared range itself, slot 0: nothing moves.
   */
  private async ownIds(rec: VeRecord): Promise<IdRange> {
    if (rec.ids && rec.idsFrom === undefined) return rec.ids;
    const p = this.paths(rec.name);
    const moved = rec.ids ? rec : await withLock(this.layout.locksDir, IDS_LOCK, async () => {
      const held: IdRange[] = [];
      for (const n of await this.names()) {
        if (n === rec.name) continue;
        const r = await readRecord(this.paths(n).record);
        if (r) held.push(r.ids ?? legacyRange(this.cfg.runtime));
      }
      const ids = allocateIdRange(held, this.cfg.runtime);
      const from = legacyRange(this.cfg.runtime).base;
      const next: VeRecord = ids.base === from ? { ...rec, ids } : { ...rec, ids, idsFrom: from };
      await writeJsonAtomic(p.record, next);
      return next;
    });
    const ids = moved.ids!;
    if (moved.idsFrom !== undefined) {
      const started = Date.now();
      await mountVeDisk(p, { hasImage: rec.limits.disk > 0, rootId: ids.base });
      const changed = await shiftVeFiles(p, moved.idsFrom, ids.base, ids.size);
      const done: VeRecord = { ...moved };
      delete done.idsFrom;
      await writeJsonAtomic(p.record, done);
      this.log.info({ event: 've.ids_moved', ve: rec.name, from: moved.idsFrom, to: ids.base, size: ids.size, changed, ms: Date.now() - started },
        `VE "${rec.name}" moved from the shared id range ${moved.idsFrom} to its own, ${ids.base}-${ids.base + ids.size - 1} (${changed} files)`);
    } else if (!rec.ids) {
      this.log.info({ event: 've.ids_moved', ve: rec.name, from: ids.base, to: ids.base, size: ids.size, changed: 0 }, `VE "${rec.name}" keeps the id range ${ids.base}-${ids.base + ids.size - 1} as its own`);
    }
    return ids;
  }

  // ---------------------------------------------------------------- stop

  async stop(name: string, opts: { kill?: boolean; timeoutMs?: number } = {}): Promise<void> {
    await this.lock(name, () => this.stopLocked(name, opts));
  }

  private async stopLocked(name: string, opts: { kill?: boolean; timeoutMs?: number } = {}): Promise<void> {
    const rec = await this.record(name);
    const st = await this.runtime.state(name);
    const state = veStateOf(st);
    if (!canStop(state)) {
      // A reboot the monitor has delayed (reboot-policy.ts) must not start it after the admin said stop.
      this.cancelDelayedRestart(name);
      await writeJsonAtomic(this.paths(name).stopRequest, { requestedAt: new Date().toISOString(), signal: null, kill: Boolean(opts.kill) });
      if (needsCleanup(st)) await this.cleanupLocked(rec);
      throw new VeshError(ErrorCodes.VE_STATE, `VE "${name}" is not running, so there is nothing to stop: start it with "vesh ve start ${name}"`);
    }
    this.watched.delete(name);
    this.cancelDelayedRestart(name);
    const template = opts.kill ? null : await this.templates.get(rec.template).catch(() => null);
    const signal = opts.kill ? 'SIGKILL' : template?.stopSignal ?? 'SIGTERM';
    // Why it goes down is kept on the host side, where the VE cannot reach
    // it (/run/vesh, ctl, is VE root's to fill with symlinks and FIFOs), and
    // on every stop path, --kill and destroy included: a monitor in another
    // process (vesh serve) must not take the init's exit for the reboot the
    // VE may have asked for.
    await writeJsonAtomic(this.paths(name).stopRequest, { requestedAt: new Date().toISOString(), signal, kill: Boolean(opts.kill) });
    if (state === 'running' && !opts.kill) {
      await this.runtime.kill(name, signal).catch(() => undefined);
      const deadline = Date.now() + (opts.timeoutMs ?? this.cfg.runtime.stopTimeoutMs);
      while (Date.now() < deadline && veStateOf(await this.runtime.state(name)) === 'running') {
        await sleep(100);
      }
    }
    if (veStateOf(await this.runtime.state(name)) !== 'stopped') {
      await this.runtime.kill(name, 'SIGKILL', state !== 'running').catch(() => undefined);
      const deadline = Date.now() + 10_000;
      while (Date.now() < deadline && veStateOf(await this.runtime.state(name)) === 'running') await sleep(50);
    }
    await this.cleanupLocked(rec);
    this.log.info({ event: 've.stopped', ve: name });
  }

  /** Remove what a stopped (or half-started) VE holds: engine state, cgroups, veth, mounts. */
  private async cleanupLocked(rec: VeRecord): Promise<void> {
    const p = this.paths(rec.name);
    await this.runtime.delete(rec.name, true);
    await removeCgroupDirs(cgroupDirs(this.cgroupsPath(rec.name), this.cgroupLayout));
    await this.network.detach(this.netId(rec));
    await unmountAll(p);
    await fs.rm(p.pidFile, { force: true });
    this.watched.delete(rec.name);
    await this.agents.forget(rec.name);
  }

  async restart(name: string): Promise<void> {
    this.rebootStreak.delete(name);
    await this.lock(name, async () => {
      const st = veStateOf(await this.runtime.state(name));
      if (canStop(st)) await this.stopLocked(name);
      await this.startLocked(name);
    });
  }

  // ---------------------------------------------------------------- destroy

  async destroy(name: string, opts: { force?: boolean } = {}): Promise<void> {
    await this.lock(name, async () => {
      const rec = await this.record(name);
      const state = veStateOf(await this.runtime.state(name));
      if (!canDestroy(state, Boolean(opts.force))) {
        throw new VeshError(ErrorCodes.VE_STATE, `VE "${name}" is ${state}: stop it first, or destroy it with --force`);
      }
      if (canStop(state)) await this.stopLocked(name, { kill: true });
      await this.cleanupLocked(rec);
      const p = this.paths(name);
      const left = await mountsUnder(p.dir);
      if (left.length > 0) {
        throw new VeshError(ErrorCodes.VE_BUSY, `VE "${name}" still has mounts (${left.join(', ')}): unmount them, then destroy again`);
      }
      await this.network.forget(this.netId(rec));
      // Closed to the VE's group first: the range is free for a new VE as
      // soon as ve.json is gone, which may come before the last of its files.
      await secureVeTreeDir(p.dir, 0, 0o700);
      await fs.rm(p.dir, { recursive: true, force: true });
      this.log.info({ event: 've.destroyed', ve: name, ids: rec.ids ?? null });
    });
    await this.removeEmptyParents();
  }

  /** When an instance has no VE left, drop its parent cgroups too so nothing lingers. */
  private async removeEmptyParents(): Promise<void> {
    // A directory listing, not names(): that reads every VE's record, and
    // destroying N VEs one after another would read N² of them.
    const entries = await fs.readdir(this.layout.vesDir).catch(() => [] as string[]);
    if (entries.some((e) => !e.startsWith('.'))) return;
    await removeCgroupDirs(cgroupDirs(this.layout.cgroupParent, this.cgroupLayout));
  }

  async setOnBoot(name: string, onBoot: boolean): Promise<void> {
    await this.lock(name, async () => {
      const rec = await this.record(name);
      await writeJsonAtomic(this.paths(name).record, { ...rec, onBoot });
    });
  }

  // ---------------------------------------------------------------- status

  async status(name: string): Promise<VeStatus> {
    const rec = await this.record(name);
    return this.statusOf(rec, await this.runtime.state(name));
  }

  async list(): Promise<VeStatus[]> {
    const containers = new Map((await this.runtime.list()).map((c) => [c.id, c]));
    const mounted = await mountedPaths();
    const out: VeStatus[] = [];
    for (const n of await this.names()) {
      const rec = await readRecord(this.paths(n).record);
      if (rec) out.push(await this.statusOf(rec, containers.get(n) ?? null, mounted));
    }
    return out;
  }

  private async statusOf(rec: VeRecord, c: ContainerState | null, mounted?: Set<string>): Promise<VeStatus> {
    const state = veStateOf(c);
    const running = state === 'running' || state === 'paused';
    const stats = running ? await readCgroupStats(this.cgroupsPath(rec.name), this.cgroupLayout) : { memoryBytes: null, pids: null };
    return {
      name: rec.name,
      state,
      template: rec.template,
      address: rec.address,
      onBoot: rec.onBoot,
      limits: rec.limits,
      pid: running && c ? c.pid : null,
      memoryBytes: stats.memoryBytes,
      processes: stats.pids,
      disk: running ? await diskUsage(this.paths(rec.name), mounted) : null,
      createdAt: rec.createdAt,
      ids: rec.ids ?? null,
    };
  }

  // ---------------------------------------------------------------- processes inside

  /** Host command running `spec` inside a running VE; throws VE_STATE if it is not running. */
  async execCommand(name: string, spec: ExecSpec): Promise<HostCommand> {
    await this.record(name);
    const state = (await this.knownRunning(name)) ? 'running' : veStateOf(await this.runtime.state(name));
    if (state !== 'running') {
      throw new VeshError(ErrorCodes.VE_STATE, `VE "${name}" is ${state}: start it with "vesh ve start ${name}"`);
    }
    return this.runtime.execCommand(name, spec);
  }

  async ensureRunning(ve: string, opts: { template?: string; limits?: LimitsInput; reason?: string } = {}): Promise<void> {
    assertVeName(ve);
    // Concurrent logins of one account in this process share one start; the
    // file lock covers other processes (the CLI).
    const pending = this.inflight.get(ve);
    if (pending) return pending;
    // A warm login must not pay for an engine process: a VE this process
    // started or saw running, whose init is still the same process, runs.
    if (await this.knownRunning(ve)) return;
    const p = (async () => {
      if (!(await this.exists(ve))) {
        try {
          await this.create(ve, { template: opts.template, limits: opts.limits });
          this.log.info({ event: 've.created_on_demand', ve, reason: opts.reason });
        } catch (err) {
          if (!isVeshError(err, ErrorCodes.VE_EXISTS)) throw err;
        }
      }
      await this.lock(ve, async () => {
        if (veStateOf(await this.runtime.state(ve)) !== 'running') {
          // A login brings a VE left stopped by the reboot policy back, with a new count.
          this.rebootStreak.delete(ve);
          await this.startLocked(ve);
        }
      });
    })().finally(() => this.inflight.delete(ve));
    this.inflight.set(ve, p);
    return p;
  }

  /**
   * Run a short command inside a VE as its root and collect stdout (for
   * reading the VE's own databases). VE root decides what it prints and
   * whether it ever ends (/etc/passwd may be /dev/zero or a FIFO nobody
   * writes): the output is capped and the deadline frees the pipe even when
   * a process inside still holds it.
   */
  private async readInside(ve: string, argv: string[], what: string): Promise<string> {
    const cmd = await this.runtime.execCommand(ve, { argv, uid: 0, gid: 0, tty: false });
    try {
      const res = await run(cmd.file, cmd.args, { timeoutMs: READ_INSIDE_TIMEOUT_MS, maxOutputBytes: READ_INSIDE_MAX_BYTES });
      return res.stdout;
    } catch (err) {
      throw new VeshError(ErrorCodes.COMMAND_FAILED,
        `cannot read ${what} inside VE "${ve}" (at most ${READ_INSIDE_MAX_BYTES} bytes within ${READ_INSIDE_TIMEOUT_MS / 1000} s): ${errorMessage(err)}; in the VE they must be small regular files`,
        { cause: err, userMessage: `Logging in failed: ${what} in your environment could not be read (each must be a regular file under ${READ_INSIDE_MAX_BYTES / 1024 / 1024} MiB).` });
    }
  }

  async lookupUser(ve: string, user: string): Promise<VeUserInfo> {
    const db = await this.userDatabase(ve);
    // A user found once under this read of the files is not parsed for again.
    // Only the answers are kept, for the user names accounts name: parsed
    // entries of a passwd VE root filled to the read cap would hold many
    // times the text's memory in this process for as long as the VE lives.
    const known = db.found.get(user);
    if (known) return { ...known, groups: [...known.groups] };
    const entry = parsePasswd(db.passwd).find((e) => e.name === user);
    if (!entry) {
      throw new VeshError(ErrorCodes.ACCOUNT_NOT_FOUND, `user "${user}" does not exist inside VE "${ve}": add it there (adduser) or change the account's "user"`, { userMessage: `User ${user} does not exist in your environment.` });
    }
    if (entry.invalid) {
      throw new VeshError(ErrorCodes.ACCOUNT_NOT_FOUND, `user "${user}" inside VE "${ve}" cannot log in: its /etc/passwd entry has ${entry.invalid}; fix the entry in the VE (vesh ve exec ${ve} -- vipw)`,
        { userMessage: `User ${user} cannot log in: its entry in your environment's /etc/passwd has ${entry.invalid}.` });
    }
    const extra = parseGroup(db.group).filter((g) => g.members.includes(user) && g.gid !== entry.gid).map((g) => g.gid);
    const info: VeUserInfo = { name: entry.name, uid: entry.uid, gid: entry.gid, groups: [entry.gid, ...extra], home: entry.home || '/', shell: entry.shell || '/bin/sh' };
    db.found.set(user, info);
    return { ...info, groups: [...info.groups] };
  }

  /**
   * The VE's /etc/passwd and /etc/group, read inside the VE (its kernel view
   * resolves the paths: a symlink planted there cannot make us read a host
   * file, as it could through the host path). Kept while an lstat of both
   * through the host path shows the same files unchanged (device, inode,
   * size, mtime, ctime); a mismatch of any kind, a swapped directory
   * included, means reading them again inside. Stat data only decides
   * whether to re-read; no content is ever taken from the host path.
   */
  private async userDatabase(ve: string): Promise<UserDatabase> {
    // Async on purpose: a tenant can keep its own disk busy, and a sync
    // stat waiting on it would stall every tenant's logins in this process.
    const key = await this.userDatabaseKey(ve);
    const cached = this.userDbCache.get(ve);
    if (cached && key && cached.key === key) return cached;
    const out = await this.readInside(ve, ['/bin/sh', '-c', 'cat /etc/passwd; echo "$1"; cat /etc/group 2>/dev/null; true', 'vesh-userdb', USERDB_SEPARATOR], '/etc/passwd and /etc/group');
    const i = out.indexOf(`${USERDB_SEPARATOR}\n`);
    const db: UserDatabase = { key: key ?? '', passwd: i >= 0 ? out.slice(0, i) : out, group: i >= 0 ? out.slice(i + USERDB_SEPARATOR.length + 1) : '', found: new Map() };
    if (key) this.userDbCache.set(ve, db);
    return db;
  }

  private async userDatabaseKey(ve: string): Promise<string | null> {
    const etc = path.join(this.paths(ve).rootfs, 'etc');
    try {
      // A symlinked /etc would be resolved against the host's root here: no key, read inside every time.
      if (!(await fs.lstat(etc)).isDirectory()) return null;
      const parts: string[] = [];
      for (const f of ['passwd', 'group']) {
        const st = await fs.lstat(path.join(etc, f), { bigint: true });
        parts.push(`${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}:${st.mode}`);
      }
      return parts.join('/');
    } catch {
      return null;
    }
  }

  /** True when the VE's init, as this process last saw it start or run, is still that same process. */
  private async knownRunning(ve: string): Promise<boolean> {
    return (await this.knownInit(ve)) !== null;
  }

  /** "pid:start time" of the VE's init when knownRunning, else null. */
  private async knownInit(ve: string): Promise<string | null> {
    const pid = this.watched.get(ve);
    const start = this.initStart.get(ve);
    if (!pid || pid <= 0 || !start) return null;
    return (await processStartTime(pid)) === start ? `${pid}:${start}` : null;
  }

  private async watch(ve: string, pid: number): Promise<void> {
    this.watched.set(ve, pid);
    const start = pid > 0 ? await processStartTime(pid) : null;
    if (start) this.initStart.set(ve, start);
    else this.initStart.delete(ve);
  }

  async processCommand(ve: string, spec: VeProcessSpec): Promise<HostCommand> {
    const additionalGids = spec.user.groups.filter((g) => g !== spec.user.gid);
    // runc refuses to start a process whose cwd is missing; a login must still
    // work when the user removed their home, so change directory inside, as
    // sshd does, falling back to /.
    const viaRunc: ExecSpec = {
      argv: spec.cwd
        ? ['/bin/sh', '-c', 'cd -- "$1" 2>/dev/null || cd /; shift; exec "$@"', 'vesh-cd', spec.cwd, ...spec.argv]
        : spec.argv,
      uid: spec.user.uid,
      gid: spec.user.gid,
      additionalGids,
      env: spec.env,
      tty: spec.tty,
      consoleSize: spec.consoleSize,
    };
    // A VE whose init we know runs: through its session agent (see
    // session-agents.ts), with `runc exec` as the fallback.
    const init = await this.knownInit(ve);
    if (!init) return this.execCommand(ve, viaRunc);
    return this.agents.command(ve, init, {
      argv: spec.argv,
      uid: spec.user.uid,
      gid: spec.user.gid,
      groups: [spec.user.gid, ...additionalGids],
      cwd: spec.cwd,
      // What runc exec would give: the VE's process environment under the session's.
      env: { ...VE_PROCESS_ENV, ...spec.env },
      tty: spec.tty,
    }, await this.runtime.execCommand(ve, viaRunc));
  }

  async agentRoute(ve: string, spec: VeProcessSpec): Promise<AgentRoute | null> {
    const init = await this.knownInit(ve);
    const socket = init ? await this.agents.liveSocket(ve, init) : null;
    if (!socket) return null;
    return {
      socket,
      process: {
        argv: spec.argv,
        uid: spec.user.uid,
        gid: spec.user.gid,
        groups: [spec.user.gid, ...spec.user.groups.filter((g) => g !== spec.user.gid)],
        cwd: spec.cwd,
        // What runc exec would give: the VE's process environment under the session's.
        env: { ...VE_PROCESS_ENV, ...spec.env },
        tty: spec.tty,
        ...(spec.consoleSize ? { consoleSize: spec.consoleSize } : {}),
      },
    };
  }

  async forwardCommand(ve: string, user: VeUserInfo): Promise<HostCommand & { program: string }> {
    const st = await this.runtime.state(ve);
    if (veStateOf(st) !== 'running' || !st) {
      throw new VeshError(ErrorCodes.VE_STATE, `VE "${ve}" is not running`);
    }
    const program = forwardHelperPath();
    const relay = forwardRelayPath();
    for (const file of [program, relay]) {
      if (!existsSync(file)) {
        throw new VeshError(ErrorCodes.INTERNAL, `the port-forward helper ${file} is not built: run "npm run build" in the vesh directory`, { userMessage: 'Port forwarding is not available right now.' });
      }
    }
    // Started by the engine like any session process, so it gets all of the
    // VE's confinement; the program comes in as fd 4 (nothing of ours is put
    // in the VE's files) and fd 3 is the relay's frame channel. Detached: no
    // engine process stays on the host for the helper's lifetime. The relay
    // runs the engine and is the only one that talks to the helper, which
    // the tenant can reach.
    const cmd = await this.runtime.execCommand(ve, {
      argv: ['/proc/self/fd/4'],
      uid: user.uid,
      gid: user.gid,
      additionalGids: user.groups.filter((g) => g !== user.gid),
      env: { ...VE_PROCESS_ENV },
      tty: false,
      detach: true,
      preserveFds: 2,
    });
    // The relay is a host process that serves this VE (and holds its
    // connections' buffers): charged to the VE's relay cgroup like the
    // engine it starts, from its first instruction.
    return { ...this.runtime.chargeToContainer(ve, { file: relay, args: ['--', cmd.file, ...cmd.args], env: cmd.env }), program };
  }

  /**
   * Shift templates an older vesh shifted to its one VE range back to host
   * root's ids, each once no VE built on it runs: under the create lock
   * (no create can mount it) and every user's lock (no start can), all
   * checked stopped. One still in use is left for a later call (it works
   * as it is meanwhile: VeMountOptions.templateBase). Returns the templates
   * moved back.
   */
  async unshiftTemplates(): Promise<string[]> {
    await this.prepared();
    const done: string[] = [];
    for (const t of await this.templates.shifted()) {
      try {
        const moved = await withLock(this.layout.locksDir, 'create', async () => {
          const users = (await this.usersOfTemplate(t)).sort();
          return this.withVeLocks(users, async () => {
            for (const u of users) {
              if (veStateOf(await this.runtime.state(u)) !== 'stopped') return false;
            }
            await this.templates.unshift(t);
            return true;
          });
        });
        if (moved) done.push(t);
        else this.log.info({ event: 'template.unshift_deferred', template: t }, `template "${t}" stays in the old shared id range while a VE built on it runs; it moves back at a later "vesh serve" start`);
      } catch (err) {
        this.log.warn({ event: 'template.unshift_failed', template: t, err: errorMessage(err) });
      }
    }
    return done;
  }

  /** Run `body` holding the locks of all `names` (sorted by the caller: every holder of several takes them in one order). */
  private async withVeLocks<T>(names: string[], body: () => Promise<T>): Promise<T> {
    if (names.length === 0) return body();
    const [first, ...rest] = names as [string, ...string[]];
    return this.lock(first, () => this.withVeLocks(rest, body));
  }

  // ---------------------------------------------------------------- boot and monitor

  /** Start every VE marked onBoot that is not running (vesh serve after a host reboot). */
  async bootOnStart(): Promise<{ started: string[]; failed: string[] }> {
    const started: string[] = [];
    const failed: string[] = [];
    // After a host reboot nothing runs yet: the moment to move old templates back.
    await this.unshiftTemplates();
    for (const n of await this.names()) {
      const rec = await readRecord(this.paths(n).record);
      if (!rec?.onBoot) continue;
      try {
        await this.lock(n, async () => {
          if (veStateOf(await this.runtime.state(n)) !== 'running') {
            await this.startLocked(n);
            started.push(n);
          }
        });
      } catch (err) {
        failed.push(n);
        this.log.error({ event: 've.boot_failed', ve: n, err: errorMessage(err) });
      }
    }
    return { started, failed };
  }

  /**
   * Watch running VEs for an init that ended by itself: `reboot` inside
   * (marker "reboot" in /run/vesh/shutdown) starts the VE again; `poweroff`,
   * `halt` or a crash leave it stopped, cleaned up, until the next login or
   * start. Polling pids costs a stat per VE per second, and no resident
   * process per VE (which would cost memory in every VE).
   */
  async startMonitor(intervalMs = 1000): Promise<void> {
    for (const c of await this.runtime.list()) {
      if (c.status === 'running' && c.pid > 0) await this.watch(c.id, c.pid);
      else if (c.status === 'stopped') this.watched.set(c.id, -1);
    }
    this.monitorTimer = setInterval(() => void this.monitorTick(), intervalMs);
    this.monitorTimer.unref();
  }

  stopMonitor(): void {
    if (this.monitorTimer) clearInterval(this.monitorTimer);
    this.monitorTimer = null;
    for (const name of [...this.delayedRestarts.keys()]) this.cancelDelayedRestart(name);
  }

  private async monitorTick(): Promise<void> {
    if (this.monitorBusy) return;
    this.monitorBusy = true;
    try {
      for (const name of [...this.watched.keys()]) {
        if (this.exiting.has(name)) continue;
        // Otherwise the init is gone, or its pid now names another process: it has exited either way.
        if (await this.knownRunning(name)) continue;
        this.watched.delete(name);
        // Not awaited: a VE's restart takes seconds, and the next tick must
        // see every other VE's exit meanwhile (each VE has its own lock).
        this.exiting.add(name);
        void this.handleInitExit(name)
          .catch((err) => this.log.error({ event: 've.monitor_failed', ve: name, err: errorMessage(err) }))
          .finally(() => this.exiting.delete(name));
      }
    } finally {
      this.monitorBusy = false;
    }
  }

  private async handleInitExit(name: string): Promise<void> {
    await this.lock(name, async () => {
      const rec = await readRecord(this.paths(name).record);
      if (!rec) return;
      const st = await this.runtime.state(name);
      if (veStateOf(st) === 'running') {
        if (st) await this.watch(name, st.pid);
        return;
      }
      const p = this.paths(name);
      // Stopped by the host (vesh ve stop in another process): stays stopped, whatever the VE wrote.
      const stoppedByHost = await this.stopRequested(name);
      const marker = stoppedByHost ? 'poweroff' : ((await readCappedNoFollow(p.ctl, SHUTDOWN_MARKER, 16, 'start')) ?? '').trim()
        // busybox's own reboot applet (which its sh prefers to /sbin/reboot) signals init
        // directly; busybox init says on its console which way it went down.
        || (((await readCappedNoFollow(p.private, path.basename(p.console), 4096, 'end')) ?? '').includes('Requesting system reboot') ? 'reboot' : '');
      await this.cleanupLocked(rec);
      if (marker !== 'reboot') {
        this.rebootStreak.delete(name);
        this.log.info({ event: 've.stopped', ve: name, reason: stoppedByHost ? 'stopped by the host' : marker || 'init exited' });
        return;
      }
      const started = this.startedAt.get(name);
      const decision = decideReboot(this.rebootPolicy, this.rebootStreak.get(name) ?? 0, started === undefined ? null : Date.now() - started);
      this.rebootStreak.set(name, decision.streak);
      if (decision.action === 'leave-stopped') {
        this.rebootStreak.delete(name);
        this.log.warn({ event: 've.reboot_loop', ve: name, reboots: decision.streak },
          `VE "${name}" rebooted ${decision.streak} times in a row, each within ${this.rebootPolicy.quickUptimeMs / 1000} s of starting: left stopped; the next login or "vesh ve start ${name}" starts it again`);
        return;
      }
      if (decision.delayMs === 0) {
        this.log.info({ event: 've.reboot', ve: name });
        await this.startLocked(name);
        return;
      }
      this.log.warn({ event: 've.reboot_delayed', ve: name, reboots: decision.streak, delayMs: decision.delayMs },
        `VE "${name}" keeps rebooting (${decision.streak} quick reboots in a row): starting it again in ${decision.delayMs / 1000} s`);
      this.scheduleRestart(name, decision.delayMs);
    });
  }

  private async stopRequested(name: string): Promise<boolean> {
    return fs.lstat(this.paths(name).stopRequest).then(() => true, () => false);
  }

  /** A delayed reboot, unless the VE was started (a login) or stopped by the host meanwhile. */
  private scheduleRestart(name: string, delayMs: number): void {
    this.cancelDelayedRestart(name);
    const timer = setTimeout(() => {
      this.delayedRestarts.delete(name);
      this.exiting.add(name);
      void this.lock(name, async () => {
        if (!(await readRecord(this.paths(name).record)) || (await this.stopRequested(name))) return;
        if (veStateOf(await this.runtime.state(name)) === 'running') return;
        this.log.info({ event: 've.reboot', ve: name, delayedMs: delayMs });
        await this.startLocked(name);
      }).catch((err) => this.log.error({ event: 've.reboot_failed', ve: name, err: errorMessage(err) }))
        .finally(() => this.exiting.delete(name));
    }, delayMs);
    timer.unref();
    this.delayedRestarts.set(name, timer);
  }

  private cancelDelayedRestart(name: string): void {
    const t = this.delayedRestarts.get(name);
    if (t) clearTimeout(t);
    this.delayedRestarts.delete(name);
  }
}

/** Milliseconds spent in each named step since the previous one, for the start log event. */
function stepTimer(): ((step: string) => void) & { steps: Record<string, number> } {
  let last = performance.now();
  const steps: Record<string, number> = {};
  const mark = (step: string) => {
    const now = performance.now();
    steps[step] = Math.round((now - last) * 10) / 10;
    last = now;
  };
  return Object.assign(mark, { steps });
}

/** Taken innermost (after a VE's lock) by whatever chooses an id range and records it. */
const IDS_LOCK = 'ids';
const USERDB_SEPARATOR = '--vesh-userdb-separator--';

/** A VE's /etc/passwd and /etc/group as last read inside it, the stat key they were read under, and the users looked up in them since. */
interface UserDatabase {
  key: string;
  passwd: string;
  group: string;
  found: Map<string, VeUserInfo>;
}
/** /etc/passwd plus /etc/group of a VE: a few KiB normally, 1 MiB is far beyond any real one. */
const READ_INSIDE_MAX_BYTES = 1024 * 1024;
/** One runc exec and two cats: well under a second normally, even on a busy host. */
const READ_INSIDE_TIMEOUT_MS = 20_000;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
