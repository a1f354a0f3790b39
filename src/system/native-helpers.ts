import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCodes, VeshError } from '../errors.js';

/**
 * The native helpers (src/native/*.c), built by scripts/build-native.sh into
 * dist/ beside the compiled TypeScript; the same path from src/ (tests,
 * vite-node) and from dist/ (the installed command).
 */
function helperPath(name: string): string {
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../dist', name);
}

/** The session helper (agent inside VEs, attach on the host). Optional: sessions fall back to runc exec. */
export function sessionHelperPath(): string {
  return helperPath('vesh-session');
}

/** The port-forward helper, run inside VEs (src/native/vesh-forward.c). */
export function forwardHelperPath(): string {
  return helperPath('vesh-forward');
}

/**
 * The host side of port forwarding (src/native/vesh-forward-relay.c): starts
 * the helper in a VE and checks every frame and descriptor it sends before
 * the SSH server sees them.
 */
export function forwardRelayPath(): string {
  return helperPath('vesh-forward-relay');
}

/**
 * The worker launcher (src/native/vesh-worker-sandbox.c): starts an SSH
 * worker unprivileged in its own namespaces and a read-only root.
 */
export function workerSandboxPath(): string {
  return helperPath('vesh-worker-sandbox');
}

/** The VE setup helper (mounts, network hook). Required to start a VE. */
export function setupHelperPath(): string {
  return helperPath('vesh-setup');
}

/** setupHelperPath(), or a clear error when it was never built. */
export function requireSetupHelper(): string {
  const file = setupHelperPath();
  if (!existsSync(file)) {
    throw new VeshError(ErrorCodes.COMMAND_FAILED, `the VE setup helper ${file} is not built: run "npm run build" in the vesh directory (needs gcc and libc6-dev)`);
  }
  return file;
}
