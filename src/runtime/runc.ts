import { ErrorCodes, VeshError, isVeshError } from '../errors.js';
import { lxcfsPaths } from './lxcfs.js';
import { spawn } from 'node:child_process';
import { constants as fsConstants, promises as fs } from 'node:fs';
import path from 'node:path';
import { run, safeEnv } from '../system/exec.js';
import { readCappedNoFollow } from '../system/tree-read.js';
import { engineKeepPaths, openEngineNamespace } from './engine-ns.js';
import { detectCgroupLayout, presetTcpLimit, relayCgroupDirs, removeRelayCgroup, type CgroupLayout } from './cgroups.js';
import type { ContainerRuntime, ContainerState, ExecSpec, HostCommand } from './types.js';

/**
 * Host-side limits for the processes that serve one container (session
 * relays, `runc exec`): each container gets a relay cgroup `PARENT/ID.relays`
 * with these limits, and every host command we hand out joins it first
 * (through `HELPER join`), so a tenant who opens sessions without end runs
 * into his own limits, not the host's.
 */
export interface RelayLimits {
  /** Cgroup path under which the relay cgroups live (the instance's cgroup parent). */
  parent: string;
  layout: CgroupLayout;
  /** Tasks (processes and threads) at most, per container. */
  pids: number;
  memoryBytes: number;
  /** The session helper (vesh-session), or null when it is not built: commands then run uncharged. */
  helper: () => string | null;
}

/** Process specs for `runc exec --process` (see execCommand), and how long one is kept. */
const PROCESS_FILE_PREFIX = 'exec-process-';
const PROCESS_FILE_TTL_MS = 5 * 60_000;
const PROCESS_FILE_SWEEP_MS = 60_000;

/**
 * runc, driven through its command line. State lives under `root` (a tmpfs
 * path such as /run/vesh/<instance>), so it is gone after a host reboot, as the
 * containers are.
 */
export class RuncRuntime implements ContainerRuntime {
  readonly name = 'runc';

  /** Container id → bundle dir, as create/run or `runc state` said. */
  private readonly bundles = new Map<string, string>();
  private processFiles = 0;
  /** Bundle dir → when its old process files were last looked for. */
  private readonly swept = new Map<string, number>();

  /** Container id → its bundle's process spec, and the config.json mtime it was read at. */
  private readonly baseProcess = new Map<string, { mtimeMs: number; process: Record<string, unknown> }>();

  /** The engine's mount namespace (see engine-ns.ts): a descriptor, or null when it could not be made (starts then use the host's). */
  private engineNs: Promise<number | null> | null = null;

  constructor(private readonly binary: string, private readonly root: string, private readonly relays: RelayLimits | null = null) {}

  private base(): string[] {
    return ['--root', this.root];
  }

  private async runc(args: string[], opts: { allowFailure?: boolean } = {}) {
    try {
      return await run(this.binary, [...this.base(), ...args], { allowFailure: opts.allowFailure, timeoutMs: 120_000 });
    } catch (err) {
      if (isVeshError(err, ErrorCodes.COMMAND_MISSING)) {
        throw new VeshError(ErrorCodes.RUNTIME_MISSING, `the runtime binary "${this.binary}" was not found: install it with "apt-get install runc" (or set runtime.binary in vesh.yaml)`, { cause: err });
      }
      if (isVeshError(err, ErrorCodes.COMMAND_FAILED)) {
        const stderr = String((err.details as { stderr?: string } | undefined)?.stderr ?? '');
        throw new VeshError(ErrorCodes.RUNTIME_FAILED, `runc ${args[0]} failed: ${lastRuncLine(stderr) || err.message}`, { cause: err, details: err.details });
      }
      throw err;
    }
  }

  async version(): Promise<string> {
    const res = await this.runc(['--version']);
    const m = /runc version (\S+)/.exec(res.stdout);
    return `runc ${m?.[1] ?? res.stdout.split('\n')[0]}`;
  }

  async create(id: string, opts: { bundleDir: string; pidFile: string; consoleFile: string }): Promise<void> {
    await this.launch('create', id, opts);
  }

  async run(id: string, opts: { bundleDir: string; pidFile: string; consoleFile: string; prepare?: HostCommand }): Promise<void> {
    await this.launch('run', id, opts);
  }

  private async launch(verb: 'create' | 'run', id: string, opts: { bundleDir: string; pidFile: string; consoleFile: string; prepare?: HostCommand }): Promise<void> {
    this.bundles.set(id, opts.bundleDir);
    this.baseProcess.delete(id);
    await this.presetTcpLimit(id, opts.bundleDir);
    const missing = () => new VeshError(ErrorCodes.RUNTIME_MISSING, `the runtime binary "${this.binary}" was not found: install it with "apt-get install runc" (or set runtime.binary in vesh.yaml)`);
    // Through the session helper when built: it lifts the limits the VE's user
    // namespace takes from its creator (see raise-limits in vesh-session.c).
    const helper = this.relays?.helper() ?? null;
    const engine = [...(helper ? [helper, 'raise-limits'] : []), this.binary, ...this.base(), verb, ...(verb === 'run' ? ['--detach'] : []), '--bundle', opts.bundleDir, '--pid-file', opts.pidFile, id];
    // The init inherits runc's stdio. Pipes would keep us waiting for an EOF
    // that comes only when the VE stops, so its stdio is the console file.
    // With a prepare step, that step opens it (it may be on a disk the step
    // mounts) and makes it the engine's stdio; its own errors come on stderr.
    const fh = opts.prepare ? null : await openConsoleFile(opts.consoleFile);
    // The prepare step makes the engine's mount namespace from ours (fd 3) when there is one.
    const engineNs = opts.prepare && helper ? await this.engineNamespace(helper) : null;
    try {
      const res = await new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve, reject) => {
        const [file, ...args] = opts.prepare
          ? [opts.prepare.file, ...opts.prepare.args, '--console', opts.consoleFile, ...(engineNs === null ? [] : ['--engine-ns', '3']), '--', ...engine]
          : engine;
        const stdio: Array<'ignore' | 'pipe' | number> = fh ? ['ignore', fh.fd, fh.fd] : ['ignore', 'ignore', 'pipe'];
        if (engineNs !== null) stdio.push(engineNs);
        const child = spawn(file!, args, { stdio, env: safeEnv() });
        const err: Buffer[] = [];
        child.stderr?.on('data', (d: Buffer) => err.push(d));
        child.on('error', (e: NodeJS.ErrnoException) => {
          // Every method throws VeshError: a step that cannot be spawned is no exception.
          if (e.code === 'ENOENT') reject(opts.prepare ? new VeshError(ErrorCodes.COMMAND_MISSING, `the start step "${file}" does not exist (vesh's own helper: run "npm run build" in the vesh directory)`, { cause: e }) : missing());
          else reject(new VeshError(opts.prepare ? ErrorCodes.COMMAND_FAILED : ErrorCodes.RUNTIME_FAILED, `cannot run ${file}: ${e.message}`, { cause: e }));
        });
        child.on('close', (code, signal) => resolve({ code, signal, stderr: Buffer.concat(err).toString('utf8') }));
      });
      if (res.code === 127 && (opts.prepare || helper)) throw missing();
      // The prepare step's own failure (the engine never ran): its line, as it is.
      if (res.code !== 0 && res.stderr.trim()) throw new VeshError(ErrorCodes.COMMAND_FAILED, res.stderr.trim().split('\n').pop()!);
      if (res.code !== 0) {
        // The console is the VE's to write (and to replace): a capped tail, no symlink, no FIFO.
        const text = (await readCappedNoFollow(path.dirname(opts.consoleFile), path.basename(opts.consoleFile), CONSOLE_TAIL_BYTES, 'end')) ?? '';
        throw new VeshError(ErrorCodes.RUNTIME_FAILED, `runc ${verb} ${id} failed: ${lastRuncLine(text) || `exit ${res.code ?? res.signal}`}`);
      }
    } finally {
      await fh?.close();
    }
  }

  /** Made at the first start that has a prepare step; later starts reuse it. */
  private engineNamespace(helper: string): Promise<number | null> {
    // The instance's LXCFS mount (runtime/lxcfs.ts) too: VEs bind files from it.
    // This namespace is a private copy: only a mount made before it is in it.
    const keep = [...engineKeepPaths({ engine: this.binary, stateDir: this.root, helper }), lxcfsPaths(path.dirname(this.root)).dir];
    this.engineNs ??= openEngineNamespace(helper, keep).catch(() => null);
    return this.engineNs;
  }

  /** The bundle's kernelTCP, applied before the engine runs (see presetTcpLimit: runc 1.1 drops it). */
  private async presetTcpLimit(id: string, bundleDir: string): Promise<void> {
    let linux: { cgroupsPath?: string; resources?: { memory?: { kernelTCP?: number } } } | undefined;
    try {
      linux = (JSON.parse(await fs.readFile(path.join(bundleDir, 'config.json'), 'utf8')) as { linux?: typeof linux }).linux;
    } catch {
      return; // no readable bundle: the engine says so itself
    }
    const bytes = linux?.resources?.memory?.kernelTCP;
    if (!bytes || !linux?.cgroupsPath) return;
    try {
      await presetTcpLimit(linux.cgroupsPath, bytes, this.relays?.layout ?? detectCgroupLayout());
    } catch (err) {
      throw new VeshError(ErrorCodes.RUNTIME_FAILED, `cannot set the TCP buffer limit of container ${id} (${linux.cgroupsPath}): ${(err as Error).message}`, { cause: err });
    }
  }

  async start(id: string): Promise<void> {
    await this.runc(['start', id]);
  }

  async state(id: string): Promise<ContainerState | null> {
    // runc keeps each container's state in ROOT/ID; none there means no
    // container, and asking runc would cost a process start (~25 ms here).
    if (!(await fs.stat(path.join(this.root, id)).then(() => true, () => false))) return null;
    const res = await this.runc(['state', id], { allowFailure: true });
    if (res.code !== 0) {
      if (/does not exist|not found/i.test(res.stderr)) return null;
      throw new VeshError(ErrorCodes.RUNTIME_FAILED, `runc state ${id} failed: ${lastRuncLine(res.stderr)}`);
    }
    return toState(JSON.parse(res.stdout));
  }

  async list(): Promise<ContainerState[]> {
    const res = await this.runc(['list', '--format', 'json']);
    const parsed = JSON.parse(res.stdout.trim() || 'null') as unknown[] | null;
    return (parsed ?? []).map(toState);
  }

  async kill(id: string, signal: string, all = false): Promise<void> {
    await this.runc(['kill', ...(all ? ['--all'] : []), id, signal]);
  }

  async delete(id: string, force = false): Promise<void> {
    const bundle = this.bundles.get(id);
    if (bundle) this.swept.delete(bundle);
    this.bundles.delete(id);
    this.baseProcess.delete(id);
    const res = await this.runc(['delete', ...(force ? ['--force'] : []), id], { allowFailure: true });
    if (res.code !== 0 && !/does not exist|not found/i.test(res.stderr)) {
      throw new VeshError(ErrorCodes.RUNTIME_FAILED, `runc delete ${id} failed: ${lastRuncLine(res.stderr)}`);
    }
    // The container is gone, and so are the agent its relays talked to.
    if (this.relays) await removeRelayCgroup(relayCgroupDirs(this.relays.parent, id, this.relays.layout));
  }

  chargeToContainer(id: string, cmd: HostCommand): HostCommand {
    const helper = this.relays?.helper();
    if (!this.relays || !helper) return cmd;
    const dirs = relayCgroupDirs(this.relays.parent, id, this.relays.layout);
    return { ...cmd, file: helper, args: ['join', String(this.relays.pids), String(this.relays.memoryBytes), dirs.join(':'), cmd.file, ...cmd.args] };
  }

  async execCommand(id: string, spec: ExecSpec): Promise<HostCommand> {
    // `runc exec -t` in the foreground allocates the terminal from the
    // container's own devpts and relays it to ours (node-pty's), forwarding
    // SIGWINCH resizes; without -t the process gets our pipes. Either way the
    // process joins the container's cgroups, capabilities and seccomp filter,
    // which nsenter would skip.
    //
    // The process (argv, env, user, size) always goes in a file: on runc's
    // command line every host user would read it with ps (a session's
    // command, SSH_CONNECTION with the client's address); the file is 0600.
    // A size in the file is also set on the terminal before the process
    // starts, where the flags would let `stty size` at its start see 0x0.
    const args = [...this.base(), 'exec', '--process', await this.writeProcessFile(id, spec)];
    if (spec.detach) args.push('--detach');
    if (spec.preserveFds) args.push('--preserve-fds', String(spec.preserveFds));
    if (spec.pidFile) args.push('--pid-file', spec.pidFile);
    args.push(id);
    return this.chargeToContainer(id, { file: this.binary, args });
  }

  /**
   * The process spec `runc exec` would build from its flags (the bundle's
   * process with our argv, user, cwd and env laid over it), plus the console
   * size, written beside the bundle's config. runc reads it when it starts;
   * files older than PROCESS_FILE_TTL_MS are removed as new ones are written
   * (looked for at most once a minute per bundle, so a busy VE's logins do
   * not each read the whole directory), and all of them with the bundle.
   */
  private async writeProcessFile(id: string, spec: ExecSpec): Promise<string> {
    const bundle = await this.bundleOf(id);
    const base = await this.bundleProcess(id, bundle);
    const baseUser = (base.user ?? {}) as { additionalGids?: number[] };
    const proc = {
      ...base,
      terminal: spec.tty,
      ...(spec.tty && spec.consoleSize ? { consoleSize: { height: spec.consoleSize.rows, width: spec.consoleSize.cols } } : {}),
      args: spec.argv,
      cwd: spec.cwd ?? base.cwd ?? '/',
      env: [...((base.env as string[] | undefined) ?? []), ...Object.entries(spec.env ?? {}).map(([k, v]) => `${k}=${v}`)],
      user: { ...baseUser, uid: spec.uid, gid: spec.gid, additionalGids: [...(baseUser.additionalGids ?? []), ...(spec.additionalGids ?? [])] },
    };
    const file = path.join(bundle, `${PROCESS_FILE_PREFIX}${process.pid}-${Date.now()}-${++this.processFiles}.json`);
    await fs.writeFile(file, JSON.stringify(proc), { mode: 0o600 });
    const now = Date.now();
    if (now - (this.swept.get(bundle) ?? 0) >= PROCESS_FILE_SWEEP_MS) {
      this.swept.set(bundle, now);
      void this.removeOldProcessFiles(bundle);
    }
    return file;
  }

  /** The bundle's process spec, read again only when config.json changed (a VE start rewrites it). */
  private async bundleProcess(id: string, bundle: string): Promise<Record<string, unknown>> {
    const config = path.join(bundle, 'config.json');
    try {
      const { mtimeMs } = await fs.stat(config);
      const cached = this.baseProcess.get(id);
      if (cached && cached.mtimeMs === mtimeMs) return cached.process;
      const proc = (JSON.parse(await fs.readFile(config, 'utf8')) as { process: Record<string, unknown> }).process;
      this.baseProcess.set(id, { mtimeMs, process: proc });
      return proc;
    } catch (err) {
      throw new VeshError(ErrorCodes.RUNTIME_FAILED, `cannot read the process spec of container ${id} in ${bundle}: ${(err as Error).message}`, { cause: err });
    }
  }

  private async removeOldProcessFiles(bundle: string): Promise<void> {
    const cutoff = Date.now() - PROCESS_FILE_TTL_MS;
    const names = await fs.readdir(bundle).catch(() => [] as string[]);
    for (const name of names) {
      if (!name.startsWith(PROCESS_FILE_PREFIX)) continue;
      const file = path.join(bundle, name);
      const st = await fs.stat(file).catch(() => null);
      if (st && st.mtimeMs < cutoff) await fs.rm(file, { force: true });
    }
  }

  /**
   * The bundle a container was made from: remembered from create/run, else
   * read from runc's own state file (ROOT/ID/state.json, written by runc as
   * host root; its "bundle=" label), else asked of runc.
   */
  private async bundleOf(id: string): Promise<string> {
    const known = this.bundles.get(id);
    if (known) return known;
    const saved = await fs.readFile(path.join(this.root, id, 'state.json'), 'utf8').then((t) => {
      const labels = (JSON.parse(t) as { config?: { labels?: unknown } }).config?.labels;
      const label = Array.isArray(labels) ? labels.find((l): l is string => typeof l === 'string' && l.startsWith('bundle=')) : undefined;
      return label ? label.slice('bundle='.length) : null;
    }, () => null).catch(() => null);
    if (saved) {
      this.bundles.set(id, saved);
      return saved;
    }
    const st = await this.state(id);
    if (!st) throw new VeshError(ErrorCodes.RUNTIME_FAILED, `container ${id} does not exist`);
    this.bundles.set(id, st.bundle);
    return st.bundle;
  }
}

/** The end of a failed start's console that can hold runc's last error lines. */
const CONSOLE_TAIL_BYTES = 64 * 1024;

/**
 * The init's console, truncated, for the engine's stdio. It lives on the
 * VE's disk, where VE root may have left a symlink (O_NOFOLLOW: refused) or
 * a FIFO (O_NONBLOCK: no wait for a reader; then not a regular file:
 * refused), as vesh-setup's --console does it.
 */
async function openConsoleFile(file: string): Promise<fs.FileHandle> {
  const fh = await fs.open(file, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK, 0o600)
    .catch((err: NodeJS.ErrnoException) => {
      throw new VeshError(ErrorCodes.RUNTIME_FAILED, `cannot open the console file ${file} (${err.code ?? err.message}): remove it if it is a symlink or not a regular file, then start again`, { cause: err });
    });
  try {
    if (!(await fh.stat()).isFile()) {
      throw new VeshError(ErrorCodes.RUNTIME_FAILED, `the console file ${file} is not a regular file: remove it, then start again`);
    }
    await fh.truncate(0);
    return fh;
  } catch (err) {
    await fh.close();
    throw err;
  }
}

function toState(raw: unknown): ContainerState {
  const r = raw as { id: string; pid?: number; status: string; bundle: string; created?: string };
  return { id: r.id, pid: r.pid ?? 0, status: r.status as ContainerState['status'], bundle: r.bundle, created: r.created };
}

/** runc prints logrus lines (time="…" level=error msg="…"); keep the message. */
function lastRuncLine(stderr: string): string {
  const lines = stderr.trim().split('\n').filter(Boolean);
  const last = lines[lines.length - 1] ?? '';
  const m = /msg="((?:[^"\\]|\\.)*)"/.exec(last);
  const msg = (m ? m[1]!.replace(/\\"/g, '"') : last).trim();
  // A failed hook: what it said is the news, not runc's wrapping of it.
  const hook = /error running hook[^]*?stderr: ([^]*)$/.exec(msg);
  const said = hook?.[1]?.replace(/\\n/g, '\n').trim().split('\n').pop();
  return said ? `a start hook failed: ${said}` : msg;
}
