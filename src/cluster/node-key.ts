import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Logger } from '../audit/logger.js';
import { generateKeyPair } from '../ssh/keygen.js';
import { parseHostKey } from '../ssh/host-keys.js';

/** The node's own key file in keys/, beside the host keys. */
export const NODE_KEY_FILE = 'vesh_node_ed25519_key';

/**
 * This node's identity in the cluster: an ed25519 key made at the first
 * start in cluster mode and never rewritten (as the host keys), whose
 * public half the node publishes in its record. The node-to-node channel
 * (next step of issue 14) authenticates nodes by it, trusting the keys the
 * cluster lists, not the network.
 */
export async function loadOrCreateNodeKey(dir: string, logger: Logger): Promise<{ publicKey: string; fingerprint: string; file: string }> {
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  const file = path.join(dir, NODE_KEY_FILE);
  let text = await fs.readFile(file).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return null;
    throw err;
  });
  let created = false;
  if (text === null) {
    const pair = generateKeyPair('ed25519', { comment: 'vesh node key' });
    const tmp = `${file}.${randomBytes(6).toString('hex')}.tmp`;
    await fs.writeFile(tmp, pair.private, { mode: 0o600, flag: 'wx' });
    try {
      // link() fails when the name exists: two starts at once keep one key.
      await fs.link(tmp, file);
      created = true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    } finally {
      await fs.rm(tmp, { force: true });
    }
    text = await fs.readFile(file);
  }
  const key = parseHostKey(file, text);
  logger.info({ event: created ? 'cluster.node_key_created' : 'cluster.node_key_loaded', file, fingerprint: key.fingerprint });
  return { publicKey: key.publicKey, fingerprint: key.fingerprint, file };
}
