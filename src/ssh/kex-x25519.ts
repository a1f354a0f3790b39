import { createPublicKey, diffieHellman, generateKeyPairSync, type KeyObject } from 'node:crypto';
import type { Connection } from 'ssh2';
import { watchKeyExchanges, type KeyExchangeLike } from './kex-watch.js';

/**
 * curve25519-sha256 (RFC 8731) as ssh2 1.17 computes it, from raw keys
 * instead of DER. ssh2 exports our ephemeral public key as SPKI DER (twice
 * per exchange) and wraps the peer's 32 bytes in SPKI DER for OpenSSL to
 * decode; OpenSSL 3's decoder looks its methods up anew each time. Measured
 * on this 2-CPU host (Node 20, OpenSSL 3.0): 424-454 µs of CPU per key
 * exchange that way against 124-131 µs with the same keys as JWK (raw
 * bytes, base64url), every login once. The results are byte for byte
 * ssh2's: the same 32-byte public key, the same shared secret as an SSH
 * mpint, and an Error (which ssh2 turns into a failed key exchange) for a
 * peer key that is not 32 bytes or whose shared secret is all zeros
 * (OpenSSL refuses that, RFC 8731 §3).
 *
 * Replaces three methods of ssh2's Curve25519Exchange on each such object
 * when ssh2 makes it (kex-watch.ts). Delete this module if ssh2 stops using
 * DER there (lib/protocol/kex.js, Curve25519Exchange).
 */

interface Curve25519Like extends KeyExchangeLike {
  _keys: { publicKey: KeyObject; privateKey: KeyObject } | null;
  generateKeys(): void;
  getPublicKey(): Buffer;
  computeSecret(otherPublicKey: Buffer): Buffer | Error;
}

/** A big-endian unsigned number in SSH mpint form (RFC 4251 §5): no leading zero bytes, one added when the top bit is set. */
export function toMpint(buf: Buffer): Buffer {
  let i = 0;
  while (i < buf.length && buf[i] === 0) i++;
  const rest = buf.subarray(i);
  if (rest.length > 0 && rest[0]! & 0x80) return Buffer.concat([Buffer.from([0]), rest]);
  return Buffer.from(rest);
}

/** X25519's base point, u = 9 (RFC 7748 §4.1). */
const BASE_POINT = createPublicKey({ key: { kty: 'OKP', crv: 'X25519', x: Buffer.concat([Buffer.from([9]), Buffer.alloc(31)]).toString('base64url') }, format: 'jwk' });

/**
 * The 32 bytes of an X25519 public key, as X25519(private, 9): the public
 * key is the scalar times the base point (RFC 7748 §6.1).
 *
 * Not `publicKey.export({ format: 'jwk' })`: Node 20 holds the key's mutex
 * while it makes the JWK's strings, and a garbage collection in that
 * allocation runs the finalizer of the generateKeyPairSync job that made
 * the key, which takes the same mutex: the thread deadlocks (seen under
 * login load in the bench's ssh2 load process, which made its keys with
 * this code, and in 3 of 3 runs of a loop of 60 000 keys;
 * test/unit/kex-x25519.test.ts). diffieHellman() takes the keys' locks
 * only around OpenSSL's derive and makes its Buffer after.
 */
export function x25519PublicKey(privateKey: KeyObject): Buffer {
  return diffieHellman({ privateKey, publicKey: BASE_POINT });
}

/** Gives one of ssh2's Curve25519Exchange objects the raw-key methods. Exported for the unit test. */
export function useRawX25519(kex: KeyExchangeLike): void {
  if (kex.type !== '25519') return;
  const x = kex as Curve25519Like;
  let ownPublic: Buffer | null = null;
  x.generateKeys = function generateKeys(this: Curve25519Like) {
    if (!this._keys) this._keys = generateKeyPairSync('x25519');
  };
  x.getPublicKey = function getPublicKey(this: Curve25519Like) {
    this.generateKeys();
    ownPublic ??= x25519PublicKey(this._keys!.privateKey);
    return ownPublic;
  };
  x.computeSecret = function computeSecret(this: Curve25519Like, otherPublicKey: Buffer) {
    this.generateKeys();
    try {
      if (otherPublicKey.length !== 32) throw new Error(`an X25519 public key is 32 bytes, not ${otherPublicKey.length}`);
      const publicKey = createPublicKey({ key: { kty: 'OKP', crv: 'X25519', x: otherPublicKey.toString('base64url') }, format: 'jwk' });
      return toMpint(diffieHellman({ privateKey: this._keys!.privateKey, publicKey }));
    } catch (err) {
      return err instanceof Error ? err : new Error(String(err));
    }
  };
}

/** Installs it on one connection; call it synchronously from the server's 'connection' event, before the peer's KEXINIT is parsed. */
export function rawX25519KeyExchange(conn: Connection): void {
  watchKeyExchanges(conn, (kex) => useRawX25519(kex));
}
