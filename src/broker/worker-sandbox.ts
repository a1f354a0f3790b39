import { existsSync, realpathSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCodes, VeshError } from '../errors.js';
import { workerSandboxPath } from '../system/native-helpers.js';

/**
 * The command line that starts one SSH worker in its sandbox
 * (src/native/vesh-worker-sandbox.c, run as root by the broker): its own
 * uid/gid, no capabilities, no_new_privs, its own mount, network, IPC and
 * UTS namespaces, and a read-only root holding only /usr, the app root, four
 * device nodes and a pid-only /proc.
 */
export interface WorkerSandboxOptions {
  /** The worker's own uid and gid (never 0; a different uid per worker, so workers cannot signal or trace each other). */
  uid: number;
  gid: number;
  /** The directory holding dist/, node_modules/ and package.json: shown read-only at its own path. Default: appRoot(). */
  appRoot: string;
  /** The node binary; must lie under /usr or the app root to be visible in the sandbox. Default process.execPath. */
  nodePath?: string;
  /** The worker's entry point, absolute and inside appRoot. */
  script: string;
  args?: string[];
  /** Options for node itself (V8 flags), placed before the script. */
  nodeFlags?: string[];
  /**
   * Descriptors the worker keeps, at the same numbers (spawn them there with
   * `stdio`); every other descriptor above 2 is closed by the launcher.
   */
  keepFds: number[];
  /** RLIMIT_NOFILE (soft = hard). Default: 65536, or the launcher's own hard limit if that is lower. */
  nofile?: number;
  /**
   * Directories the worker must not see although they lie inside the app
   * root or /usr (dataDir, hostKeysDir, the accounts and config files'
   * directories): each gets an empty read-only tmpfs on top. Each must exist
   * (it is resolved to its real path here), and none may hold the app root.
   * Ones outside every visible tree are invisible anyway and cost nothing.
   */
  hide: string[];
}

/** The directory holding dist/ and package.json: two levels up from this file in src/broker/ and in dist/broker/. */
export function appRoot(): string {
  const dir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
  if (!existsSync(path.join(dir, 'package.json'))) {
    throw new VeshError(ErrorCodes.INTERNAL, `cannot find vesh's app root: ${dir} holds no package.json (was dist/ moved away from its package?)`);
  }
  return realpathSync(dir);
}

function invalid(message: string): VeshError {
  return new VeshError(ErrorCodes.INVALID_ARGUMENT, `worker sandbox: ${message}`);
}

function checkId(name: string, value: number): void {
  // 0 is root; 2^32-1 means "unchanged" to setresuid.
  if (!Number.isInteger(value) || value < 1 || value > 0xfffffffe) throw invalid(`${name} must be an integer from 1 to 4294967294, got ${value}`);
}

/** The launcher wants canonical paths: the sandbox mirrors host paths, and a symlink on the way would name something else there. */
function realDirectory(what: string, dir: string): string {
  if (!path.isAbsolute(dir)) throw invalid(`${what} must be an absolute path: ${dir}`);
  let real: string;
  try {
    real = realpathSync(dir);
  } catch (err) {
    throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `worker sandbox: ${what} ${dir} does not exist: create it before starting workers`, { cause: err });
  }
  if (!statSync(real).isDirectory()) throw invalid(`${what} is not a directory: ${dir}`);
  return real;
}

function isWithin(child: string, parent: string): boolean {
  const rel = path.relative(parent, child);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

/** The launcher's file and arguments for spawn(file, args, { stdio: [..., the kept fds at their numbers] }). */
export function workerSandboxCommand(opts: WorkerSandboxOptions): { file: string; args: string[] } {
  checkId('uid', opts.uid);
  checkId('gid', opts.gid);
  const root = realDirectory('the app root', opts.appRoot);
  if (root === '/') throw invalid('the app root cannot be /: it would show the whole host');
  const node = opts.nodePath ?? process.execPath;
  if (!path.isAbsolute(node)) throw invalid(`the node binary must be an absolute path: ${node}`);
  if (!path.isAbsolute(opts.script)) throw invalid(`the worker script must be an absolute path: ${opts.script}`);
  let script: string;
  try {
    // Its real path: the sandbox shows the app root only at its real path.
    script = realpathSync(opts.script);
  } catch (err) {
    throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `worker sandbox: the worker script ${opts.script} does not exist: run "npm run build" in the vesh directory`, { cause: err });
  }
  if (!isWithin(script, root)) throw invalid(`the worker script ${opts.script} is outside the app root ${root}, so the worker could not see it`);
  const keep = new Set<number>();
  for (const fd of opts.keepFds) {
    if (!Number.isInteger(fd) || fd < 3 || fd > 1_048_575) throw invalid(`a kept descriptor must be an integer from 3 up (0-2 are always kept), got ${fd}`);
    keep.add(fd);
  }
  if (opts.nofile !== undefined && (!Number.isInteger(opts.nofile) || opts.nofile < 64 || opts.nofile > 1_048_576)) {
    throw invalid(`nofile must be an integer from 64 to 1048576, got ${opts.nofile}`);
  }
  const hide = [...new Set(opts.hide.map((dir) => realDirectory('a hidden directory', dir)))];
  for (const dir of hide) {
    if (isWithin(root, dir)) throw invalid(`the hidden directory ${dir} holds the app root ${root}: move it out of there (for example the data directory or the config file)`);
  }

  const file = workerSandboxPath();
  if (!existsSync(file)) {
    throw new VeshError(ErrorCodes.COMMAND_MISSING, `the worker launcher ${file} is not built: run "npm run build" in the vesh directory (needs gcc and libc6-dev)`);
  }
  const args = ['--uid', String(opts.uid), '--gid', String(opts.gid), '--app-root', root];
  if (opts.nofile !== undefined) args.push('--nofile', String(opts.nofile));
  for (const fd of keep) args.push('--keep-fd', String(fd));
  for (const dir of hide) args.push('--hide', dir);
  for (const flag of opts.nodeFlags ?? []) {
    if (!/^--[a-z0-9-]+(=[A-Za-z0-9._-]+)?$/.test(flag)) throw invalid(`a node flag must look like --name or --name=value, got ${JSON.stringify(flag)}`);
  }
  args.push('--', node, ...(opts.nodeFlags ?? []), script, ...(opts.args ?? []));
  return { file, args };
}

/**
 * The directories of vesh.yaml that workers must not see (data, host keys,
 * accounts, config), as far as they exist and do not hold the app root
 * itself (which the workers must see; a config file kept at the top of the
 * app root stays visible then, and keeps its file mode as its guard: the
 * workers' uids own nothing).
 */
export function hiddenFromWorkers(config: { dataDir: string; hostKeysDir: string; accountsFile: string; configFile: string }, root: string = appRoot()): string[] {
  const dirs = [config.dataDir, config.hostKeysDir, path.dirname(config.accountsFile), path.dirname(config.configFile)];
  const out = new Set<string>();
  for (const d of dirs) {
    let real: string;
    try {
      real = realpathSync(d);
    } catch {
      continue;
    }
    if (!isWithin(root, real)) out.add(real);
  }
  return [...out];
}
