import { promises as fs } from 'node:fs';
import path from 'node:path';

/**
 * Shift every file's owner and group by `base`, once, so that VE root (host
 * uid `base`) owns what template root owned. runc 1.1 has no idmapped
 * mounts, so the shared lower layer itself must carry the shifted ids.
 * chown clears setuid/setgid bits; they are put back from the mode read
 * before. Symlinks are changed with lchown and never followed.
 */
export async function shiftOwnership(root: string, base: number, size: number): Promise<number> {
  let count = 0;
  // A hard-linked file is one inode under several names: shifted once (a second
  // pass would find it already shifted and call it outside the range).
  const linked = new Set<string>();
  const shiftOne = async (p: string): Promise<boolean> => {
    const st = await fs.lstat(p);
    if (!st.isDirectory() && st.nlink > 1) {
      const key = `${st.dev}:${st.ino}`;
      if (linked.has(key)) return false;
      linked.add(key);
    }
    if (st.uid >= size || st.gid >= size) {
      throw new Error(`${p} is owned by ${st.uid}:${st.gid}, outside the VE id range 0-${size - 1}; the template cannot be shifted`);
    }
    await fs.lchown(p, st.uid + base, st.gid + base);
    // Only where a template may carry them at all (see sanitize.ts: imports are narrowed before this).
    if ((st.isFile() || st.isDirectory()) && (st.mode & 0o6000) !== 0) await fs.chmod(p, st.mode & 0o7777);
    count++;
    return st.isDirectory();
  };
  const walk = async (dir: string): Promise<void> => {
    const entries = await fs.readdir(dir);
    // Bounded parallelism: fast on a 10k-file tree without opening thousands of fds at once.
    for (let i = 0; i < entries.length; i += 64) {
      const chunk = entries.slice(i, i + 64).map((e) => path.join(dir, e));
      const dirs = await Promise.all(chunk.map(async (p) => ((await shiftOne(p)) ? p : null)));
      for (const d of dirs) if (d) await walk(d);
    }
  };
  await shiftOne(root);
  await walk(root);
  return count;
}

/** Total bytes of regular files under a tree (hard links counted once). */
export async function treeSize(root: string): Promise<number> {
  const seen = new Set<string>();
  let total = 0;
  const walk = async (dir: string): Promise<void> => {
    for (const e of await fs.readdir(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) await walk(p);
      else if (e.isFile()) {
        const st = await fs.lstat(p);
        const key = `${st.dev}:${st.ino}`;
        if (seen.has(key)) continue;
        seen.add(key);
        total += st.size;
      }
    }
  };
  await walk(root);
  return total;
}
