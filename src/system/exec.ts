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

/**
 * Default cap on each of stdout and stderr. Host tools we run print little;
 * a program that prints more (or one in a VE that streams /dev/zero) is cut
 * off rather than allowed to grow the server's memory without bound.
 */
export const DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024;

export interface RunOptions {
  input?: string | Buffer;
  env?: Record<string, string>;
  cwd?: string;
  /**
   * Hard deadline: the program is killed and its pipes are destroyed, and
   * run() rejects, even when a process it started (e.g. one inside a VE,
   * behind `runc exec`) still holds the other end of a pipe.
   */
  timeoutMs?: number;
  /** Cap on each of stdout and stderr (default DEFAULT_MAX_OUTPUT_BYTES); beyond it the program is killed and run() rejects. */
  maxOutputBytes?: number;
  /** Do not throw on a non-zero exit; the caller inspects `code`. */
  allowFailure?: boolean;
  stdio?: SpawnOptions['stdio'];
}

/**
 * Run a program with an argv array (never a shell string) and collect its output.
 * Throws VESH_COMMAND_MISSING when the program is not installed and
 * VESH_COMMAND_FAILED on a non-zero exit unless allowFailure is set, on
 * output over the cap and at the deadline (whatever allowFailure says).
 */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const cap = opts.maxOutputBytes ?? DEFAULT_MAX_OUTPUT_BYTES;
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: opts.env ?? safeEnv(),
      cwd: opts.cwd,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const size = { out: 0, err: 0 };
    let settled = false;
    let timer: NodeJS.Timeout | undefined;

    /**
     * Ends the run once: kill the program, destroy our ends of its pipes (a
     * process that inherited them can no longer keep 'close' from firing or
     * make us buffer), and settle.
     */
    const abort = (why: VeshError) => {
      if (settled) return;
      settled = true;
      if (timer) clearTimeout(timer);
      child.kill('SIGKILL');
      child.stdout!.destroy();
      child.stderr!.destroy();
      child.stdin!.destroy();
      reject(why);
    };
    if (opts.timeoutMs) {
      timer = setTimeout(() => abort(new VeshError(ErrorCodes.COMMAND_FAILED,
        `${cmd} ${args.join(' ')} did not finish within ${opts.timeoutMs} ms and was stopped`)), opts.timeoutMs);
    }
    const collect = (into: Buffer[], which: 'out' | 'err') => (d: Buffer) => {
      if (settled) return;
      size[which] += d.length;
      if (size[which] > cap) {
        abort(new VeshError(ErrorCodes.COMMAND_FAILED, `${cmd} ${args.join(' ')} wrote more than ${cap} bytes to std${which} and was stopped`));
        return;
      }
      into.push(d);
    };
    child.stdout!.on('data', collect(out, 'out'));
    child.stderr!.on('data', collect(err, 'err'));
    // Destroyed streams may report errors after we settled; nothing is waiting for them.
    child.stdout!.on('error', () => undefined);
    child.stderr!.on('error', () => undefined);
    child.stdin!.on('error', () => { /* the program may exit before reading its input */ });
    child.on('error', (e: NodeJS.ErrnoException) => {
      if (settled) return;
      settled = true;
      if (timer) clearTimeout(timer);
      if (e.code === 'ENOENT') {
        reject(new VeshError(ErrorCodes.COMMAND_MISSING, `${cmd} is not installed or not on PATH: run "vesh doctor" to see what to install`, { cause: e }));
      } else {
        reject(new VeshError(ErrorCodes.COMMAND_FAILED, `cannot run ${cmd}: ${e.message}`, { cause: e }));
      }
    });
    child.on('close', (code, signal) => {
      if (settled) return;
      settled = true;
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
