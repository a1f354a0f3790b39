import { constants as fsConstants, promises as fs } from 'node:fs';
import path from 'node:path';

/**
 * Reading files in trees the host does not control (a VE's disk, an
 * imported template) without being steered by them: no symlink is followed
 * at any step, a FIFO or device never blocks us or gets opened as one
 * (O_NONBLOCK, then fstat must say S_ISREG), and at most a fixed number of
 * bytes is read. Node has no openat(2); opening "/proc/self/fd/N/NAME" with
 * O_NOFOLLOW is openat(N, NAME, O_NOFOLLOW): the magic link names the
 * directory we hold, only NAME is looked up, and it must not be a symlink.
 */

const DIR_FLAGS = fsConstants.O_RDONLY | fsConstants.O_DIRECTORY | fsConstants.O_NOFOLLOW;
const FILE_FLAGS = fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY;

/** Most symlinks one in-root resolution follows (the kernel's own limit). */
const MAX_LINKS = 40;

/**
 * Up to `maxBytes` of the regular file `name` in directory `dir`, from its
 * start or its end. Neither `dir` nor `name` may be a symlink; anything
 * that is not a readable regular file reads as null.
 */
export async function readCappedNoFollow(dir: string, name: string, maxBytes: number, from: 'start' | 'end' = 'start'): Promise<string | null> {
  let dh: fs.FileHandle | null = null;
  try {
    dh = await fs.open(dir, DIR_FLAGS);
    return await readFromDir(dh, name, maxBytes, from);
  } catch {
    return null;
  } finally {
    await dh?.close().catch(() => undefined);
  }
}

/**
 * Up to `maxBytes` of `rel` (a path of plain components, no symlinks in it)
 * under `root`: each directory opened O_NOFOLLOW from the one before, so a
 * symlink at any step reads as null, as does anything not a regular file.
 */
export async function readBeneathNoFollow(root: string, rel: string, maxBytes: number): Promise<string | null> {
  const parts = rel.split('/').filter((p) => p !== '' && p !== '.');
  const name = parts.pop();
  if (!name || parts.includes('..') || name === '..') return null;
  let dh: fs.FileHandle | null = null;
  try {
    dh = await fs.open(root, DIR_FLAGS);
    for (const part of parts) {
      const next = await fs.open(`/proc/self/fd/${dh.fd}/${part}`, DIR_FLAGS);
      await dh.close();
      dh = next;
    }
    return await readFromDir(dh, name, maxBytes, 'start');
  } catch {
    return null;
  } finally {
    await dh?.close().catch(() => undefined);
  }
}

async function readFromDir(dh: fs.FileHandle, name: string, maxBytes: number, from: 'start' | 'end'): Promise<string | null> {
  if (name.includes('/') || name === '..' || name === '.') return null;
  let fh: fs.FileHandle | null = null;
  try {
    fh = await fs.open(`/proc/self/fd/${dh.fd}/${name}`, FILE_FLAGS);
    const st = await fh.stat();
    if (!st.isFile()) return null;
    const len = Math.max(0, Math.min(maxBytes, st.size));
    const buf = Buffer.alloc(len);
    const { bytesRead } = await fh.read(buf, 0, len, from === 'end' ? st.size - len : 0);
    return buf.subarray(0, bytesRead).toString('utf8');
  } catch {
    return null;
  } finally {
    await fh?.close().catch(() => undefined);
  }
}

/**
 * Resolve `rel` inside `root` as the kernel would if `root` were "/"
 * (openat2's RESOLVE_IN_ROOT): an absolute symlink target starts again at
 * `root`, ".." never climbs above it. Returns the path relative to `root`
 * with every symlink replaced (so readBeneathNoFollow can open it), or null
 * when a component is missing, not a directory, or the links loop.
 *
 * Only for trees nobody else changes meanwhile (a template being imported,
 * in a root-only directory): each step is an lstat of a path, so a tree
 * that a VE could change under us would need descriptors instead.
 * `keepLast` leaves the final component unresolved (to lstat a symlink itself).
 */
export async function resolveInRoot(root: string, rel: string, opts: { keepLast?: boolean } = {}): Promise<string | null> {
  const todo = rel.split('/').filter((p) => p !== '' && p !== '.');
  const done: string[] = [];
  let links = 0;
  while (todo.length > 0) {
    const part = todo.shift()!;
    if (part === '..') {
      done.pop();
      continue;
    }
    if (opts.keepLast && todo.length === 0) {
      done.push(part);
      break;
    }
    const here = path.join(root, ...done, part);
    const st = await fs.lstat(here).catch(() => null);
    if (!st) return null;
    if (st.isSymbolicLink()) {
      if (++links > MAX_LINKS) return null;
      const target = await fs.readlink(here);
      if (target.startsWith('/')) done.length = 0;
      todo.unshift(...target.split('/').filter((p) => p !== '' && p !== '.'));
      continue;
    }
    if (todo.length > 0 && !st.isDirectory()) return null;
    done.push(part);
  }
  return done.join('/');
}
