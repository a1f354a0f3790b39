import { promises as fs } from 'node:fs';
import path from 'node:path';
import lockfile from 'proper-lockfile';
import { ErrorCodes, VeshError } from '../errors.js';

/**
 * Cross-process locks (the CLI and the server both act on VEs). proper-lockfile
 * uses an atomic mkdir with a refreshed mtime, so a lock of a killed process
 * goes stale and is taken over instead of blocking forever.
 */
export async function withLock<T>(locksDir: string, key: string, body: () => Promise<T>, opts: { waitMs?: number } = {}): Promise<T> {
  await fs.mkdir(locksDir, { recursive: true, mode: 0o700 });
  const target = path.join(locksDir, `${key}.lock-target`);
  await fs.writeFile(target, '', { flag: 'a' });
  let release: () => Promise<void>;
  try {
    release = await lockfile.lock(target, {
      stale: 15_000,
      update: 5_000,
      retries: { retries: Math.ceil((opts.waitMs ?? 120_000) / 200), minTimeout: 100, maxTimeout: 300, factor: 1.2 },
      realpath: false,
    });
  } catch (err) {
    throw new VeshError(ErrorCodes.VE_BUSY, `"${key}" is busy with another vesh operation; try again when it has finished`, { cause: err });
  }
  try {
    return await body();
  } finally {
    await release().catch(() => undefined);
  }
}
