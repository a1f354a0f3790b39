import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import ssh2 from 'ssh2';
import { generateKeyPair } from './keygen.js';
import type { Logger } from '../audit/logger.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';

// ssh2 is CommonJS without static named exports: Node's ESM loader only offers its default export.
const { utils } = ssh2;

/** One host key as the server uses it. */
export interface HostKey {
  /** "ssh-ed25519" or "ssh-rsa". */
  type: string;
  /** Absolute path of the private key file (OpenSSH format). */
  file: string;
  /** Private key text, handed to ssh2. */
  privateKey: Buffer;
  /** "SHA256:…" as `ssh-keygen -lf` prints it. */
  fingerprint: string;
  /** One authorized_keys/known_hosts style line: "ssh-ed25519 AAAA…". */
  publicKey: string;
  /** True when this start created the key. */
  created: boolean;
}

interface KeySpec {
  type: 'ed25519' | 'rsa';
  file: string;
  bits?: number;
}

/** ed25519 is what modern clients pick; RSA (3072 bits, NIST's 128-bit level) serves older ones. */
const KEY_SPECS: KeySpec[] = [
  { type: 'ed25519', file: 'ssh_host_ed25519_key' },
  { type: 'rsa', file: 'ssh_host_rsa_key', bits: 3072 },
];

/**
 * Load the host keys from `dir`, creating the ones that are missing. A key
 * that exists is never rewritten, even if it cannot be parsed (that is an
 * admin's problem to fix, not ours to paper over by replacing the server's
 * identity).
 *
 * Keys are generated with ssh2's utils.generateKeyPairSync (see keygen.ts) rather than by
 * running ssh-keygen: the server then needs no OpenSSH binaries on the host,
 * and the library that will parse the key is the one that wrote it. The
 * files are standard "OPENSSH PRIVATE KEY" files that ssh-keygen reads
 * (`ssh-keygen -lf keys/ssh_host_ed25519_key` prints the same fingerprint).
 */
export async function loadOrCreateHostKeys(dir: string, logger: Logger): Promise<HostKey[]> {
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  const keys: HostKey[] = [];
  for (const spec of KEY_SPECS) {
    const file = path.join(dir, spec.file);
    let created = false;
    let text = await readIfExists(file);
    if (text === null) {
      await createKeyFile(file, spec);
      created = true;
      text = await fs.readFile(file);
    }
    await checkPrivateMode(file, logger);
    const key = parseHostKey(file, text);
    keys.push({ ...key, file, privateKey: text, created });
    logger.info({ event: created ? 'ssh.hostkey_created' : 'ssh.hostkey_loaded', file, type: key.type, fingerprint: key.fingerprint });
  }
  return keys;
}

async function readIfExists(file: string): Promise<Buffer | null> {
  try {
    return await fs.readFile(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new VeshError(ErrorCodes.CONFIG_INVALID, `cannot read host key ${file}: ${errorMessage(err)}; fix its permissions or remove it to have a new one made`, { cause: err });
  }
}

/**
 * Write the new key to a private temporary file, then link it into place:
 * link() fails if the name exists, so two servers starting at once cannot
 * overwrite each other's key, and nobody ever sees a half-written file.
 */
async function createKeyFile(file: string, spec: KeySpec): Promise<void> {
  const pair = generateKeyPair(spec.type === 'rsa' ? 'rsa' : 'ed25519', { bits: spec.bits, comment: 'vesh host key' });
  const tmp = `${file}.${randomBytes(6).toString('hex')}.tmp`;
  await fs.writeFile(tmp, pair.private, { mode: 0o600, flag: 'wx' });
  try {
    await fs.link(tmp, file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  } finally {
    await fs.rm(tmp, { force: true });
  }
  await fs.writeFile(`${file}.pub`, `${pair.public.trim()}\n`, { mode: 0o644, flag: 'wx' }).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== 'EEXIST') throw err;
  });
}

async function checkPrivateMode(file: string, logger: Logger): Promise<void> {
  const st = await fs.stat(file);
  if ((st.mode & 0o077) !== 0) {
    logger.warn({ event: 'ssh.hostkey_mode', file, mode: (st.mode & 0o777).toString(8) }, `host key ${file} is readable by others: run "chmod 600 ${file}"`);
  }
}

/** Parse a private host key and compute its public blob's SHA256 fingerprint. */
export function parseHostKey(file: string, text: Buffer): { type: string; fingerprint: string; publicKey: string } {
  const parsed = utils.parseKey(text);
  const key = Array.isArray(parsed) ? parsed[0] : parsed;
  if (!key || key instanceof Error || key.isPrivateKey() !== true) {
    const why = key instanceof Error ? key.message : 'not a private key';
    throw new VeshError(ErrorCodes.CONFIG_INVALID, `host key ${file} cannot be used (${why}): move it away and restart to have a new one made`);
  }
  const blob = key.getPublicSSH();
  return { type: key.type, fingerprint: sshFingerprint(blob), publicKey: `${key.type} ${blob.toString('base64')}` };
}

/** OpenSSH's fingerprint of a public key blob: "SHA256:" + unpadded base64 of its SHA-256. */
export function sshFingerprint(blob: Buffer): string {
  return `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`;
}
