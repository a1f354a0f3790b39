import { createPublicKey, randomBytes, verify } from 'node:crypto';
import ssh2, { type ParsedKey } from 'ssh2';
import { describe, expect, it } from 'vitest';
import { hostKeySigner } from '../../src/broker/host-key-signer.js';
import { generateKeyPair } from '../../src/ssh/keygen.js';

const parse = (pem: string): ParsedKey => {
  const k = ssh2.utils.parseKey(pem);
  if (k instanceof Error) throw k;
  return (Array.isArray(k) ? k[0] : k) as ParsedKey;
};

describe('the broker\'s host-key signer', () => {
  it('signs an exchange hash exactly as ssh2\'s own key does (ed25519, RSA with each hash the exchange may name)', () => {
    for (const [type, hashes] of [['ed25519', [undefined]], ['rsa', [undefined, 'sha256', 'sha512']]] as const) {
      const key = parse(generateKeyPair(type, type === 'rsa' ? { bits: 2048 } : {}).private);
      const sign = hostKeySigner(key);
      for (const hash of hashes) {
        const data = randomBytes(32);
        expect(sign(data, hash)).toEqual(key.sign(data, hash));
      }
    }
  });

  it('gives an ECDSA signature ssh2 would take (randomised, so checked by verifying it)', () => {
    const key = parse(generateKeyPair('ecdsa').private);
    const data = randomBytes(32);
    const sig = hostKeySigner(key)(data);
    expect(sig).toBeInstanceOf(Buffer);
    expect(verify('sha256', data, createPublicKey(key.getPublicPEM()), sig as Buffer)).toBe(true);
  });

  it('answers an Error, not a throw, for a hash OpenSSL does not know', () => {
    const key = parse(generateKeyPair('rsa', { bits: 2048 }).private);
    expect(hostKeySigner(key)(randomBytes(32), 'no-such-hash')).toBeInstanceOf(Error);
  });
});
