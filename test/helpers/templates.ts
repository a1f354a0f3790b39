import { promises as fs } from 'node:fs';
import path from 'node:path';
import lockfile from 'proper-lockfile';
import { silentLogger } from '../../src/audit/logger.js';
import { makeLayout } from '../../src/system/layout.js';
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
    if (!(await fs.stat(path.join(dir, 'template.json')).catch(() => null))) {
      process.stderr.write(`building the shared Debian test template in ${dir} (once per machine)\n`);
      const store = new TemplateStore({ layout, logger: silentLogger(), idmapSize: 65_536 });
      await store.build(kind, { name });
    }
  } finally {
    await release();
  }
  return { dir };
}
