import { createHash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import type { TemplateInfo } from '../template/types.js';

/**
 * A content digest of a template's tree, so that "node B has template
 * debian" can be checked to mean the same files (a VE moved between nodes
 * runs on the other node's copy of its lower layer). It covers every
 * entry's path, type, mode, owner, and a regular file's bytes or a link's
 * target. Computing it reads the whole template once; the result is kept
 * in DATA/cluster/template-digests.json, keyed by the template's name,
 * creation time and size, and recomputed only when one of those changes.
 */
export async function templateDigest(t: TemplateInfo): Promise<string> {
  const h = createHash('sha256');
  const walk = async (dir: string, rel: string): Promise<void> => {
    const names = (await fs.readdir(dir)).sort();
    for (const name of names) {
      const abs = path.join(dir, name);
      const r = rel === '' ? name : `${rel}/${name}`;
      const st = await fs.lstat(abs);
      h.update(`${r}\0${st.mode.toString(8)}\0${st.uid}\0${st.gid}\0`);
      if (st.isDirectory()) await walk(abs, r);
      else if (st.isSymbolicLink()) h.update(`${await fs.readlink(abs)}\0`);
      else if (st.isFile()) h.update(await fileHash(abs));
      h.update('\n');
    }
  };
  await walk(t.rootfs, '');
  return `sha256:${h.digest('hex')}`;
}

/** A file's sha256, read in chunks: a template may hold files of any size. */
function fileHash(file: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    createReadStream(file).on('data', (d) => h.update(d)).on('error', reject).on('end', () => resolve(h.digest()));
  });
}

type Cache = Record<string, string>;

/**
 * Digests of `templates`, from the cache where it still holds, computed
 * (and cached) otherwise; with `compute: false` a digest not cached is null
 * (a 200 MB Debian template takes about 4 s to read: not at start-up).
 */
export async function templateDigests(dataDir: string, templates: TemplateInfo[], opts: { compute?: boolean } = {}): Promise<Array<{ name: string; digest: string | null }>> {
  const file = path.join(dataDir, 'cluster', 'template-digests.json');
  let cache: Cache = {};
  try {
    const parsed: unknown = JSON.parse(await fs.readFile(file, 'utf8'));
    if (parsed && typeof parsed === 'object') cache = parsed as Cache;
  } catch { /* none yet, or damaged: recompute */ }
  const out: Array<{ name: string; digest: string | null }> = [];
  let changed = false;
  for (const t of templates) {
    const id = `${t.name}@${t.createdAt}@${t.sizeBytes}`;
    let digest: string | null = typeof cache[id] === 'string' && /^sha256:[0-9a-f]{64}$/.test(cache[id]) ? cache[id] : null;
    if (digest === null && opts.compute !== false) {
      digest = await templateDigest(t).catch(() => null);
      if (digest !== null) {
        cache[id] = digest;
        changed = true;
      }
    }
    out.push({ name: t.name, digest });
  }
  if (changed) {
    await fs.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
    const tmp = `${file}.${process.pid}.tmp`;
    await fs.writeFile(tmp, JSON.stringify(cache));
    await fs.rename(tmp, file);
  }
  return out;
}
