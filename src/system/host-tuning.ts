import { promises as fs } from 'node:fs';
import type { Logger } from '../audit/logger.js';

/**
 * Kernel key quotas. runc gives each container a session keyring, owned by
 * the container's root — for every VE the same host uid (runtime.idmapBase).
 * The kernel's default quota for a non-root uid (kernel.keys.maxkeys 200,
 * maxbytes 20000) therefore stops the 201st VE from starting ("disk quota
 * exceeded" from runc). Raise both, never lower them, as LXD's production
 * settings do.
 */
const KEY_QUOTAS: Array<[string, number]> = [
  ['/proc/sys/kernel/keys/maxkeys', 100_000],
  ['/proc/sys/kernel/keys/maxbytes', 10_000_000],
];

export async function raiseKeyQuotas(log: Logger): Promise<void> {
  for (const [file, want] of KEY_QUOTAS) {
    const now = Number((await fs.readFile(file, 'utf8').catch(() => '')).trim());
    if (!Number.isFinite(now) || now >= want) continue;
    try {
      await fs.writeFile(file, String(want));
      log.info({ event: 'host.key_quota_raised', setting: file, from: now, to: want }, 'raised the kernel key quota so that more than a few hundred VEs can start');
    } catch (err) {
      log.warn({ event: 'host.key_quota_unchanged', setting: file, value: now, err: (err as Error).message }, `cannot raise ${file}: VEs beyond the first few hundred may fail to start`);
    }
  }
}
