import { ErrorCodes, VeshError, isVeshError } from '../errors.js';
import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { run, safeEnv } from '../system/exec.js';
import type { ContainerRuntime, ContainerState, ExecSpec, HostCommand } from './types.js';

/**
 * runc, driven through its command line. State lives under `root` (a tmpfs
 * path such as /run/vesh/<instance>), so it is gone after a host reboot, as the
 * containers are.
 */
export class RuncRuntime implements ContainerRuntime {
  readonly name = 'runc';

  constructor(private readonly binary: string, private readonly root: string) {}

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
    const missing = () => new VeshError(ErrorCodes.RUNTIME_MISSING, `the runtime binary "${this.binary}" was not found: install it with "apt-get install runc" (or set runtime.binary in vesh.yaml)`);
    const engine = [this.binary, ...this.base(), verb, ...(verb === 'run' ? ['--detach'] : []), '--bundle', opts.bundleDir, '--pid-file', opts.pidFile, id];
    // The init inherits runc's stdio. Pipes would keep us waiting for an EOF
    // that comes only when the VE stops, so its stdio is the console file.
    // With a prepare step, that step opens it (it may be on a disk the step
    // mounts) and makes it the engine's stdio; its own errors come on stderr.
    const fh = opts.prepare ? null : await fs.open(opts.consoleFile, 'w', 0o600);
    try {
      const res = await new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve, reject) => {
        const [file, ...args] = opts.prepare ? [opts.prepare.file, ...opts.prepare.args, '--console', opts.consoleFile, '--', ...engine] : engine;
        const child = spawn(file!, args, { stdio: fh ? ['ignore', fh.fd, fh.fd] : ['ignore', 'ignore', 'pipe'], env: safeEnv() });
        const err: Buffer[] = [];
        child.stderr?.on('data', (d: Buffer) => err.push(d));
        child.on('error', (e: NodeJS.ErrnoException) => {
          // Every method throws VeshError: a step that cannot be spawned is no exception.
          if (e.code === 'ENOENT') reject(opts.prepare ? new VeshError(ErrorCodes.COMMAND_MISSING, `the start step "${file}" does not exist (vesh's own helper: run "npm run build" in the vesh directory)`, { cause: e }) : missing());
          else reject(new VeshError(opts.prepare ? ErrorCodes.COMMAND_FAILED : ErrorCodes.RUNTIME_FAILED, `cannot run ${file}: ${e.message}`, { cause: e }));
        });
        child.on('close', (code, signal) => resolve({ code, signal, stderr: Buffer.concat(err).toString('utf8') }));
      });
      if (res.code === 127 && opts.prepare) throw missing();
      // The prepare step's own failure (the engine never ran): its line, as it is.
      if (res.code !== 0 && res.stderr.trim()) throw new VeshError(ErrorCodes.COMMAND_FAILED, res.stderr.trim().split('\n').pop()!);
      if (res.code !== 0) {
        const text = await fs.readFile(opts.consoleFile, 'utf8').catch(() => '');
        throw new VeshError(ErrorCodes.RUNTIME_FAILED, `runc ${verb} ${id} failed: ${lastRuncLine(text) || `exit ${res.code ?? res.signal}`}`);
      }
    } finally {
      await fh?.close();
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
    const res = await this.runc(['delete', ...(force ? ['--force'] : []), id], { allowFailure: true });
    if (res.code !== 0 && !/does not exist|not found/i.test(res.stderr)) {
      throw new VeshError(ErrorCodes.RUNTIME_FAILED, `runc delete ${id} failed: ${lastRuncLine(res.stderr)}`);
    }
  }

  execCommand(id: string, spec: ExecSpec): HostCommand {
    // `runc exec -t` in the foreground allocates the terminal from the
    // container's own devpts and relays it to ours (node-pty's), forwarding
    // SIGWINCH resizes; without -t the process gets our pipes. Either way the
    // process joins the container's cgroups, capabilities and seccomp filter,
    // which nsenter would skip.
    const args = [...this.base(), 'exec', `--tty=${spec.tty}`, '--user', `${spec.uid}:${spec.gid}`];
    for (const g of spec.additionalGids ?? []) args.push('--additional-gids', String(g));
    if (spec.cwd) args.push('--cwd', spec.cwd);
    if (spec.detach) args.push('--detach');
    if (spec.preserveFds) args.push('--preserve-fds', String(spec.preserveFds));
    if (spec.pidFile) args.push('--pid-file', spec.pidFile);
    for (const [k, v] of Object.entries(spec.env ?? {})) args.push('--env', `${k}=${v}`);
    args.push(id, ...spec.argv);
    return { file: this.binary, args };
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
