import ssh2, { type ParsedKey } from 'ssh2';
import { generateKeyPair } from '../ssh/keygen.js';

const { utils } = ssh2;

/** Sign `data` (an exchange hash) for connection `conn` with the host key of `keyType`; throws when the broker refuses. */
export type SignFn = (conn: string, keyType: string, data: Buffer, hashAlgo?: string) => Buffer;


/**
 * Host keys for ssh2 that the worker cannot sign with itself. ssh2 takes
 * only private keys and signs the key exchange synchronously inside its
 * parser (kex.js, `_hostKey.sign`), so each real key is stood in for by a
 * throwaway key of the same type, made here, whose public half is replaced
 * by the real one and whose sign() asks the broker over the sign socket,
 * waiting for the answer (the broker answers at once; the wait is about as
 * long as signing here would take). The private host keys never enter a
 * worker: a compromised worker can have its own key exchanges signed while
 * it runs, as OpenSSH's unprivileged child can through its monitor, but it
 * cannot take the keys away and impersonate the server elsewhere.
 */
export function brokerSignedHostKeys(
  keys: Array<{ type: string; publicSsh: string }>,
  sign: (keyType: string, data: Buffer, hashAlgo?: string) => Buffer,
): Array<{ key: ParsedKey }> {
  return keys.map((k) => {
    const kind = k.type === 'ssh-ed25519' ? 'ed25519' : k.type === 'ssh-rsa' ? 'rsa' : k.type.startsWith('ecdsa-') ? 'ecdsa' : null;
    if (!kind) throw new Error(`unsupported host key type ${k.type}`);
    // The stand-in's own secret is never used; the smallest key of its type is made fastest.
    const pair = generateKeyPair(kind, kind === 'rsa' ? { bits: 1024 } : {});
    const parsed = utils.parseKey(pair.private);
    if (parsed instanceof Error) throw parsed;
    const key = (Array.isArray(parsed) ? parsed[0] : parsed) as ParsedKey;
    const publicSsh = Buffer.from(k.publicSsh, 'base64');
    key.getPublicSSH = () => publicSsh;
    // ssh2 takes an Error as the answer of a failed signature (and fails that key exchange).
    (key as unknown as { sign(data: Buffer, algo?: string): Buffer | Error }).sign = (data: Buffer, algo?: string) => {
      try {
        return sign(k.type, data, algo);
      } catch (err) {
        return err instanceof Error ? err : new Error(String(err));
      }
    };
    return { key };
  });
}
