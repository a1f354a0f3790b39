import { readFileSync, statSync } from 'node:fs';
import { keyFingerprint, parsePublicKeyLine } from '../config/accounts.js';
import { errorMessage } from '../errors.js';

/**
 * The key lists vesh.yaml may point at: trusted user CAs
 * (auth.trustedUserCAKeys) and revoked keys (auth.revokedKeys). Like
 * OpenSSH, which reads them at every authentication, we pick up edits
 * without a restart: the file is read again when its inode, size or mtime
 * changed (one stat per check).
 */

/** Larger files are refused rather than read into the root process. */
const MAX_LIST_BYTES = 16 * 1024 * 1024;

/** A file parsed by `parse`, read again when it changes; `error` says why it cannot be used. */
export class WatchedListFile<T> {
  private stamp = '';
  private value: { ok: true; list: T } | { ok: false; error: string } = { ok: false, error: 'not read yet' };

  constructor(readonly file: string, private readonly parse: (text: string) => T) {}

  current(): { ok: true; list: T } | { ok: false; error: string } {
    let stamp: string;
    try {
      const st = statSync(this.file);
      if (!st.isFile()) return { ok: false, error: `${this.file} is not a regular file` };
      if (st.size > MAX_LIST_BYTES) return { ok: false, error: `${this.file} is larger than ${MAX_LIST_BYTES} bytes` };
      stamp = `${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
    } catch (err) {
      this.stamp = '';
      return { ok: false, error: `cannot read ${this.file}: ${errorMessage(err)}` };
    }
    if (stamp === this.stamp) return this.value;
    try {
      this.value = { ok: true, list: this.parse(readFileSync(this.file, 'utf8')) };
    } catch (err) {
      this.value = { ok: false, error: `${this.file}: ${errorMessage(err)}` };
    }
    this.stamp = stamp;
    return this.value;
  }
}

/** Lines that carry something: no blanks, no # comments. */
function contentLines(text: string): Array<{ n: number; line: string }> {
  return text.split('\n').map((l, i) => ({ n: i + 1, line: l.trim() })).filter((l) => l.line !== '' && !l.line.startsWith('#'));
}

/** Public key blobs of a list of key lines (TrustedUserCAKeys). */
export function parseKeyLines(text: string): Buffer[] {
  return contentLines(text).map(({ n, line }) => {
    try {
      return parsePublicKeyLine(line).blob;
    } catch (err) {
      throw new Error(`line ${n}: ${errorMessage(err)}`);
    }
  });
}

/**
 * A revocation list. OpenSSH's binary KRL format is not read; this is the
 * text form of its KRL specification (ssh-keygen -k):
 *   ssh-ed25519 AAAA…      a public key: revoked as a user key, as the key
 *   key: ssh-ed25519 AAAA…  of a certificate and as a CA (all it signed)
 *   hash: SHA256:…          the same, by fingerprint ("sha256:" too)
 *   serial: N or N-M        certificates with these serials, of any CA
 *   id: KEY-ID              certificates with this key id, of any CA
 * Serials and ids are not tied to one CA here (ssh-keygen -k ties them to
 * the CA given with -s): a list that names them revokes them whoever
 * signed, which can only refuse more, never less.
 */
export interface RevokedKeys {
  fingerprints: Set<string>;
  serials: Array<[bigint, bigint]>;
  ids: Set<string>;
}

const KRL_MAGIC = 'SSHKRL\n\0';

export function parseRevokedKeys(text: string): RevokedKeys {
  if (text.startsWith(KRL_MAGIC)) throw new Error('this is a binary KRL, which vesh does not read: list the keys, serials and ids as text (see README, "SSH certificates")');
  const out: RevokedKeys = { fingerprints: new Set(), serials: [], ids: new Set() };
  for (const { n, line } of contentLines(text)) {
    const m = /^([a-z0-9]+):\s*(.*)$/i.exec(line);
    const field = m?.[1]?.toLowerCase();
    const value = m?.[2]?.trim() ?? '';
    try {
      if (!m || field === 'key') {
        out.fingerprints.add(parsePublicKeyLine(m ? value : line).fingerprint);
      } else if (field === 'hash' || field === 'sha256') {
        const fp = /^(?:SHA256:)?([A-Za-z0-9+/]{43})=?$/.exec(value);
        if (!fp) throw new Error(`"${value.slice(0, 60)}" is not a SHA256 fingerprint (as ssh-keygen -l prints it)`);
        out.fingerprints.add(`SHA256:${fp[1]}`);
      } else if (field === 'serial') {
        const s = /^(\d{1,20})(?:\s*-\s*(\d{1,20}))?$/.exec(value);
        if (!s) throw new Error(`serial "${value.slice(0, 60)}" must be N or N-M`);
        const from = BigInt(s[1]!);
        const to = BigInt(s[2] ?? s[1]!);
        if (to < from || to > 0xffff_ffff_ffff_ffffn) throw new Error(`serial range "${value.slice(0, 60)}" is empty or too large`);
        out.serials.push([from, to]);
      } else if (field === 'id') {
        if (value === '') throw new Error('id: needs a key id');
        out.ids.add(value);
      } else {
        throw new Error(`unknown field "${field}" (key:, hash:, serial:, id:, or a public key line)`);
      }
    } catch (err) {
      throw new Error(`line ${n}: ${errorMessage(err)}`);
    }
  }
  return out;
}

/** Why a key (and the certificate it came in, if any) is revoked, or null. */
export function revocationOf(list: RevokedKeys, key: Buffer, cert?: { serial: bigint; keyId: string; caBlob: Buffer }): string | null {
  if (list.fingerprints.has(keyFingerprint(key))) return `key ${keyFingerprint(key)} is revoked`;
  if (!cert) return null;
  if (list.fingerprints.has(keyFingerprint(cert.caBlob))) return `its CA ${keyFingerprint(cert.caBlob)} is revoked`;
  if (list.serials.some(([a, b]) => cert.serial >= a && cert.serial <= b)) return `serial ${cert.serial} is revoked`;
  if (list.ids.has(cert.keyId)) return `key id ${JSON.stringify(cert.keyId.slice(0, 80))} is revoked`;
  return null;
}
