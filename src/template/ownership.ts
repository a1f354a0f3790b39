import { promises as fs } from 'node:fs';
import path from 'node:path';

/**
 * Check that every file of a new template is owned by ids 0..size-1, the
 * ids a VE has: the template stays as built (unshifted, its root is host
 * root) and each VE sees it through an idmapped mount in its own range
 * (see vesh-setup mount), where an id outside 0..size-1 would show as the
 * overflow id, nobody's. Symlinks are looked at with lstat, never followed.
 * Returns how many entries were checked.
 */
export async function assertIdsInRange(root: string, size: number): Promise<number> {
  let count = 0;
  const checkOne = async (p: string): Promise<boolean> => {
    const st = await fs.lstat(p);
    if (st.uid >= size || st.gid >= size) {
      throw new Error(`${p} is owned by ${st.uid}:${st.gid}, outside the VE id range 0-${size - 1}: a VE could not see it as anyone's; give it an owner in that range`);
    }
    count++;
    return st.isDirectory();
  };
  const walk = async (dir: string): Promise<void> => {
    const entries = await fs.readdir(dir);
    // Bounded parallelism: fast on a 10k-file tree without opening thousands of fds at once.
    for (let i = 0; i < entries.length; i += 64) {
      const chunk = entries.slice(i, i + 64).map((e) => path.join(dir, e));
      const dirs = await Promise.all(chunk.map(async (p) => ((await checkOne(p)) ? p : null)));
      for (const d of dirs) if (d) await walk(d);
    }
  };
  await checkOne(root);
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
