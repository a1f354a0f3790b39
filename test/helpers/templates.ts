import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import lockfile from 'proper-lockfile';
import { silentLogger } from '../../src/audit/logger.js';
import { makeLayout } from '../../src/system/layout.js';
import { setupHelperPath } from '../../src/system/native-helpers.js';
import { DEBIAN_RECIPE_VERSION } from '../../src/template/debian.js';
import { TemplateStore } from '../../src/template/store.js';

/**
 * The Debian template takes a minute or more to build, so test files share one,
 * built once per machine under /var/tmp (kept between runs, keyed on the
 * recipe version and on the ownership layout: "-u" templates are unshifted,
 * owned by 0..65535 as built; older entries without it were shifted to
 * 100000 and are never handed to this code). Each test instance links it
 * into its own data dir.
 */
const CACHE = '/var/tmp/vesh-test-cache';

export async function sharedTemplate(kind: 'debian'): Promise<{ dir: string }> {
  const name = `${kind}-r${DEBIAN_RECIPE_VERSION}-u`;
  const layout = makeLayout(CACHE);
  const dir = layout.templateDir(name);
  await fs.mkdir(CACHE, { recursive: true, mode: 0o711 });
  await fs.chmod(CACHE, 0o711);
  const release = await lockfile.lock(CACHE, { realpath: false, stale: 600_000, update: 10_000, retries: { retries: 400, minTimeout: 1000, maxTimeout: 2000 } });
  try {
    if (!(await fs.stat(path.join(dir, 'template.json')).catch(() => null)) && !(await unshiftOldCacheEntry(layout.templateDir(`${kind}-r${DEBIAN_RECIPE_VERSION}`), dir, name))) {
      process.stderr.write(`building the shared Debian test template in ${dir} (once per machine)\n`);
      const store = new TemplateStore({ layout, logger: silentLogger(), idmapSize: 65_536 });
      await store.build(kind, { name });
    }
  } finally {
    await release();
  }
  return { dir };
}

/**
 * A cache entry of the same recipe made before templates were kept
 * unshifted (its template.json says which range it was shifted to): copied
 * and shifted back to 0..65535 (seconds) rather than built again (minutes,
 * and a mirror to reach). The old entry stays for older checkouts.
 */
export async function unshiftOldCacheEntry(oldDir: string, dir: string, name: string): Promise<boolean> {
  const meta = await fs.readFile(path.join(oldDir, 'template.json'), 'utf8').then((t) => JSON.parse(t) as Record<string, unknown>, () => null);
  const from = meta?.idmapBase;
  if (typeof from !== 'number' || from <= 0) return false;
  process.stderr.write(`unshifting the shared Debian test template ${oldDir} (shifted to ${from}) into ${dir} (once per machine)\n`);
  const tmp = path.join(path.dirname(dir), `.unshift-${name}-${randomBytes(4).toString('hex')}`);
  await fs.mkdir(tmp, { mode: 0o700 });
  try {
    execFileSync('cp', ['-a', path.join(oldDir, 'rootfs'), path.join(tmp, 'rootfs')]);
    execFileSync(setupHelperPath(), ['shift', path.join(tmp, 'rootfs'), String(from), '0', '65536']);
    await fs.writeFile(path.join(tmp, 'template.json'), `${JSON.stringify({ ...meta, name, idmapBase: 0 }, null, 2)}\n`);
    await fs.rename(tmp, dir);
    return true;
  } catch (err) {
    await fs.rm(tmp, { recursive: true, force: true });
    throw err;
  }
}
