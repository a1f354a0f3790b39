import { spawn } from 'node:child_process';
import { accessSync, constants as fsConstants, openSync } from 'node:fs';
import path from 'node:path';
import { safeEnv } from '../system/exec.js';

/**
 * The mount namespace the engine starts VEs from (see engine-ns in
 * src/native/vesh-session.c): the host's system mounts without any VE's file
 * systems. Every VE adds two mounts to the host's namespace (its disk and its
 * root file system); a start made from the host's namespace copied them all
 * twice (once for the engine, once for the VE) and runc read them several
 * times: +40 ms of CPU per start at 2000 mounts, measured with raw runc.
 *
 * Made once per process: a short-lived helper makes and cleans it, we open
 * its /proc/PID/ns/mnt, and that descriptor keeps the namespace alive after
 * the helper ends; each start passes it on to the start step (vesh-setup
 * mount --engine-ns), which clones the VE's directory into a copy of it.
 */

/** Directories whose mounts the engine needs: binaries, libraries, its state. */
const SYSTEM_DIRS = ['/usr', '/etc', '/bin', '/sbin', '/lib', '/lib64'];

/** How long the helper may take to make the namespace (it reads the host's mount table once). */
const READY_TIMEOUT_MS = 10_000;

/** Where `binary` is found: itself when it names a path, else the first match on the PATH runc is started with. */
export function resolveBinary(binary: string): string | null {
  if (binary.includes('/')) return path.resolve(binary);
  for (const dir of (safeEnv().PATH ?? '').split(':')) {
    const file = path.join(dir, binary);
    try {
      accessSync(file, fsConstants.X_OK);
      return file;
    } catch {
      // next directory
    }
  }
  return null;
}

/**
 * The paths the engine's namespace keeps mounts for: the engine's own
 * binary and state directory, vesh's helpers (the start step and the
 * network hook live beside `helper`), and the system's binaries and
 * libraries. The kernel's /proc, /sys and /dev trees are always kept.
 */
export function engineKeepPaths(opts: { engine: string; stateDir: string; helper: string }): string[] {
  const engine = resolveBinary(opts.engine);
  return [...new Set([opts.stateDir, path.dirname(opts.helper), ...(engine ? [path.dirname(engine)] : []), ...SYSTEM_DIRS])];
}

/**
 * Make the engine's mount namespace with `helper engine-ns KEEP...` and return
 * a descriptor of it (close-on-exec; pass it to children explicitly).
 * Rejects with the helper's own message when it fails.
 */
export function openEngineNamespace(helper: string, keep: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(helper, ['engine-ns', ...keep], { stdio: ['pipe', 'pipe', 'pipe'], env: safeEnv() });
    let out = '';
    let err = '';
    let settled = false;
    const finish = (fn: () => void) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      // Its stdin ending is what ends the helper, whichever way this went.
      child.stdin.end();
      fn();
    };
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      finish(() => reject(new Error(`${helper} engine-ns did not make the namespace within ${READY_TIMEOUT_MS / 1000} s`)));
    }, READY_TIMEOUT_MS);
    child.stdin.on('error', () => undefined);
    child.stderr.on('data', (d: Buffer) => { err += d.toString('utf8'); });
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString('utf8');
      if (!out.includes('ready\n') || !child.pid) return;
      try {
        // Opened while the helper still runs and waits for us: the pid is its own.
        const fd = openSync(`/proc/${child.pid}/ns/mnt`, 'r');
        finish(() => resolve(fd));
      } catch (e) {
        finish(() => reject(e as Error));
      }
    });
    child.on('error', (e) => finish(() => reject(e)));
    child.on('close', (code, signal) => finish(() => reject(new Error(err.trim() || `${helper} engine-ns ended (${code ?? signal}) before making the namespace`))));
  });
}
