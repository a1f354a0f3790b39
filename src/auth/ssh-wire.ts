import { createPublicKey, verify as cryptoVerify, type KeyObject } from 'node:crypto';

/**
 * SSH wire-format public keys and signatures (RFC 4253 6.6, RFC 5656,
 * RFC 8332, RFC 8709), read strictly and checked with OpenSSL through
 * node:crypto. Used for certificates, whose CA signature and whose key's
 * signature over the session both arrive in this form.
 */

/** A bounded reader over one buffer: every read checks the length it was given. */
export class WireReader {
  private pos = 0;
  constructor(private readonly buf: Buffer) {}

  get offset(): number {
    return this.pos;
  }

  get done(): boolean {
    return this.pos === this.buf.length;
  }

  string(what: string): Buffer {
    if (this.pos + 4 > this.buf.length) throw new Error(`${what}: truncated`);
    const len = this.buf.readUInt32BE(this.pos);
    if (len > this.buf.length - this.pos - 4) throw new Error(`${what}: length ${len} runs past the end`);
    const out = this.buf.subarray(this.pos + 4, this.pos + 4 + len);
    this.pos += 4 + len;
    return out;
  }

  text(what: string): string {
    const b = this.string(what);
    const s = b.toString('utf8');
    if (!Buffer.from(s, 'utf8').equals(b) || s.includes('\0')) throw new Error(`${what}: not UTF-8 text`);
    return s;
  }

  uint32(what: string): number {
    if (this.pos + 4 > this.buf.length) throw new Error(`${what}: truncated`);
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }

  uint64(what: string): bigint {
    if (this.pos + 8 > this.buf.length) throw new Error(`${what}: truncated`);
    const v = this.buf.readBigUInt64BE(this.pos);
    this.pos += 8;
    return v;
  }

  /** A positive mpint, without its sign byte. */
  mpint(what: string): Buffer {
    const b = this.string(what);
    if (b.length === 0 || (b[0]! & 0x80) !== 0) throw new Error(`${what}: not a positive integer`);
    if (b.length > 1 && b[0] === 0 && (b[1]! & 0x80) === 0) throw new Error(`${what}: integer with a needless leading zero`);
    return b[0] === 0 ? b.subarray(1) : b;
  }
}

/** Key types we verify signatures of (what accounts.yaml accepts; no DSA, no FIDO). */
const CURVES: Record<string, { name: string; crv: string; bytes: number; hash: string }> = {
  'ecdsa-sha2-nistp256': { name: 'nistp256', crv: 'P-256', bytes: 32, hash: 'sha256' },
  'ecdsa-sha2-nistp384': { name: 'nistp384', crv: 'P-384', bytes: 48, hash: 'sha384' },
  'ecdsa-sha2-nistp521': { name: 'nistp521', crv: 'P-521', bytes: 66, hash: 'sha512' },
};

/** OpenSSH's RequiredRSASize default. */
export const MIN_RSA_BITS = 1024;

export interface WirePublicKey {
  /** 'ssh-ed25519', 'ecdsa-sha2-nistp256'…, 'ssh-rsa'. */
  type: string;
  key: KeyObject;
}

const b64url = (b: Buffer) => b.toString('base64url');

/**
 * Read the public key parts that follow the type name, for `type` (shared by
 * plain key blobs and certificates, whose key parts sit after the nonce).
 */
export function readKeyParts(type: string, r: WireReader): KeyObject {
  if (type === 'ssh-ed25519') {
    const pk = r.string('ed25519 key');
    if (pk.length !== 32) throw new Error('ed25519 key: not 32 bytes');
    return createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: b64url(pk) }, format: 'jwk' });
  }
  const curve = CURVES[type];
  if (curve) {
    if (r.text('curve name') !== curve.name) throw new Error(`${type}: curve name does not match`);
    const q = r.string('ecdsa point');
    if (q.length !== 1 + 2 * curve.bytes || q[0] !== 4) throw new Error(`${type}: not an uncompressed point of ${curve.crv}`);
    return createPublicKey({ key: { kty: 'EC', crv: curve.crv, x: b64url(q.subarray(1, 1 + curve.bytes)), y: b64url(q.subarray(1 + curve.bytes)) }, format: 'jwk' });
  }
  if (type === 'ssh-rsa') {
    const e = r.mpint('rsa exponent');
    const n = r.mpint('rsa modulus');
    const key = createPublicKey({ key: { kty: 'RSA', n: b64url(n), e: b64url(e) }, format: 'jwk' });
    const bits = key.asymmetricKeyDetails?.modulusLength ?? 0;
    if (bits < MIN_RSA_BITS) throw new Error(`RSA key of ${bits} bits is too short (at least ${MIN_RSA_BITS})`);
    return key;
  }
  throw new Error(`key type "${type.slice(0, 60)}" is not accepted (ssh-ed25519, ecdsa-sha2-nistp256/384/521, ssh-rsa)`);
}

/** A plain public key blob (not a certificate), read whole. */
export function parseWirePublicKey(blob: Buffer): WirePublicKey {
  const r = new WireReader(blob);
  const type = r.text('key type');
  const key = readKeyParts(type, r);
  if (!r.done) throw new Error(`${type}: trailing bytes after the key`);
  return { type, key };
}

/** Signature algorithms a key type may sign with. ssh-rsa (SHA-1) is refused, as OpenSSH 8.8+ does by default. */
export function signatureAlgorithmsOf(keyType: string): readonly string[] {
  if (keyType === 'ssh-rsa') return ['rsa-sha2-256', 'rsa-sha2-512'];
  return keyType === 'ssh-ed25519' || CURVES[keyType] ? [keyType] : [];
}

/**
 * Verify a signature in SSH wire form (string algorithm, string blob) over
 * `data` with `key`, accepting only the algorithms in `allowed`. Returns the
 * algorithm it was made with, or null when it does not verify or is malformed.
 */
export function verifyWireSignature(key: WirePublicKey, data: Buffer, signature: Buffer, allowed: readonly string[]): string | null {
  try {
    const r = new WireReader(signature);
    const algo = r.text('signature algorithm');
    const sig = r.string('signature');
    if (!r.done || !allowed.includes(algo) || !signatureAlgorithmsOf(key.type).includes(algo)) return null;
    if (key.type === 'ssh-ed25519') return sig.length === 64 && cryptoVerify(null, data, key.key, sig) ? algo : null;
    const curve = CURVES[key.type];
    if (curve) {
      // mpint r, mpint s, made into the fixed-width r || s OpenSSL takes as IEEE P1363.
      const sr = new WireReader(sig);
      const rr = sr.mpint('ecdsa r');
      const ss = sr.mpint('ecdsa s');
      if (!sr.done || rr.length > curve.bytes || ss.length > curve.bytes) return null;
      const p1363 = Buffer.alloc(2 * curve.bytes);
      rr.copy(p1363, curve.bytes - rr.length);
      ss.copy(p1363, 2 * curve.bytes - ss.length);
      return cryptoVerify(curve.hash, data, { key: key.key, dsaEncoding: 'ieee-p1363' }, p1363) ? algo : null;
    }
    const hash = algo === 'rsa-sha2-512' ? 'sha512' : 'sha256';
    return cryptoVerify(hash, data, key.key, sig) ? algo : null;
  } catch {
    return null;
  }
}
