import { spawn, type SpawnOptions } from 'node:child_process';
import { ErrorCodes, VeshError } from '../errors.js';

/** Environment for helper programs: an allow-list, never the server's own environment. */
export function safeEnv(extra: Record<string, string> = {}): Record<string, string> {
  const env: Record<string, string> = {
    PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
    LANG: 'C.UTF-8',
  };
  return { ...env, ...extra };
}

export interface RunResult {
  code: number;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  input?: string | Buffer;
  env?: Record<string, string>;
  cwd?: string;
  timeoutMs?: number;
  /** Do not throw on a non-zero exit; the caller inspects `code`. */
  allowFailure?: boolean;
  stdio?: SpawnOptions['stdio'];
}

/**
 * Run a program with an argv array (never a shell string) and collect its output.
 * Throws VESH_COMMAND_MISSING when the program is not installed and
 * VESH_COMMAND_FAILED on a non-zero exit unless allowFailure is set.
 */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: opts.env ?? safeEnv(),
      cwd: opts.cwd,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timer: NodeJS.Timeout | undefined;
    if (opts.timeoutMs) {
      timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs);
    }
    child.stdout!.on('data', (d: Buffer) => out.push(d));
    child.stderr!.on('data', (d: Buffer) => err.push(d));
    child.stdin!.on('error', () => { /* the program may exit before reading its input */ });
    child.on('error', (e: NodeJS.ErrnoException) => {
      if (timer) clearTimeout(timer);
      if (e.code === 'ENOENT') {
        reject(new VeshError(ErrorCodes.COMMAND_MISSING, `${cmd} is not installed or not on PATH: run "vesh doctor" to see what to install`, { cause: e }));
      } else {
        reject(new VeshError(ErrorCodes.COMMAND_FAILED, `cannot run ${cmd}: ${e.message}`, { cause: e }));
      }
    });
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      const res: RunResult = { code: code ?? -1, signal, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') };
      if (res.code !== 0 && !opts.allowFailure) {
        const detail = (res.stderr.trim() || res.stdout.trim()).split('\n').slice(-3).join(' | ');
        reject(new VeshError(ErrorCodes.COMMAND_FAILED, `${cmd} ${args.join(' ')} failed (${signal ? `signal ${signal}` : `exit ${res.code}`}): ${detail}`, { details: { ...res } }));
        return;
      }
      resolve(res);
    });
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    else child.stdin!.end();
  });
}
