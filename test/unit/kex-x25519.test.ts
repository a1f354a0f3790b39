import { spawn } from 'node:child_process';
import { createPublicKey, diffieHellman, generateKeyPairSync, type KeyObject } from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import ssh2 from 'ssh2';
import { describe, expect, it } from 'vitest';
import { SERVER_ALGORITHMS } from '../../src/ssh/algorithms.js';
import { rawX25519KeyExchange, toMpint, useRawX25519, x25519PublicKey } from '../../src/ssh/kex-x25519.js';
import { watchKeyExchanges } from '../../src/ssh/kex-watch.js';
import { generateKeyPair } from '../../src/ssh/keygen.js';

/** SPKI DER of a raw X25519 public key: what ssh2 builds for OpenSSL. */
const spki = (raw: Buffer) => Buffer.concat([Buffer.from('302a300506032b656e032100', 'hex'), raw]);
/** The raw 32 bytes of a public key, from its DER (not its JWK: see x25519PublicKey). */
const rawOf = (k: KeyObject) => k.export({ format: 'der', type: 'spki' }).subarray(12);
const ROOT = path.resolve(import.meta.dirname, '../..');

function freshKex() {
  const kex = { type: '25519', _keys: null } as unknown as { type: string; getPublicKey(): Buffer; computeSecret(b: Buffer): Buffer | Error };
  useRawX25519(kex);
  return kex;
}

describe('curve25519-sha256 from raw keys (kex-x25519.ts)', () => {
  it('writes SSH mpints as ssh2 does', () => {
    expect(toMpint(Buffer.from([0, 0, 0x80, 1]))).toEqual(Buffer.from([0, 0x80, 1]));
    expect(toMpint(Buffer.from([0, 0x7f, 2]))).toEqual(Buffer.from([0x7f, 2]));
    expect(toMpint(Buffer.from([0x80]))).toEqual(Buffer.from([0, 0x80]));
    expect(toMpint(Buffer.from([0x12, 0]))).toEqual(Buffer.from([0x12, 0]));
    expect(toMpint(Buffer.from([0, 0]))).toEqual(Buffer.alloc(0));
  });

  it('agrees with the peer on the shared secret, and with the DER path ssh2 takes', () => {
    for (let i = 0; i < 50; i++) {
      const kex = freshKex();
      const peer = generateKeyPairSync('x25519');
      const ours = kex.getPublicKey();
      expect(ours.length).toBe(32);
      // The same buffer both times ssh2 asks (hash and reply).
      expect(kex.getPublicKey()).toEqual(ours);
      const secret = kex.computeSecret(rawOf(peer.publicKey));
      expect(secret).toBeInstanceOf(Buffer);
      // The peer's side, through DER as ssh2 does it.
      const theirs = diffieHellman({ privateKey: peer.privateKey, publicKey: createPublicKey({ key: spki(ours), format: 'der', type: 'spki' }) });
      expect(secret).toEqual(toMpint(theirs));
    }
  });

  it('refuses a peer key of the wrong length or an all-zero shared secret with an Error, as ssh2 does', () => {
    const kex = freshKex();
    expect(kex.computeSecret(Buffer.alloc(31, 9))).toBeInstanceOf(Error);
    expect(kex.computeSecret(Buffer.alloc(33, 9))).toBeInstanceOf(Error);
    // A low-order point: the shared secret would be all zeros (RFC 8731 §3).
    expect(kex.computeSecret(Buffer.alloc(32, 0))).toBeInstanceOf(Error);
  });

  it('derives the public key OpenSSL has for the private one', () => {
    for (let i = 0; i < 20; i++) {
      const pair = generateKeyPairSync('x25519');
      expect(x25519PublicKey(pair.privateKey)).toEqual(rawOf(pair.publicKey));
    }
  });

  it('makes its public keys without the deadlock of Node 20\'s JWK export (a garbage collection inside it)', async () => {
    // The built module, in a child with a small young generation (many
    // scavenges): before, 3 of 3 such loops hung in a futex within 60 000
    // keys; a hung child is killed and fails the test.
    const script = [
      `import { useRawX25519 } from ${JSON.stringify(pathToFileURL(path.join(ROOT, 'dist/ssh/kex-x25519.js')).href)};`,
      'let junk = [];',
      'for (let i = 0; i < 60000; i++) {',
      "  const kex = { type: '25519', _keys: null };",
      '  useRawX25519(kex);',
      '  if (kex.getPublicKey().length !== 32) process.exit(2);',
      '  junk.push({ a: new Array(20).fill(i) });',
      '  if (junk.length > 1000) junk = [];',
      '}',
    ].join('\n');
    const child = spawn(process.execPath, ['--max-semi-space-size=1', '--input-type=module', '-e', script], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => { stderr += d; });
    let hung = false;
    const timer = setTimeout(() => {
      hung = true;
      child.kill('SIGKILL');
    }, 120_000);
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    clearTimeout(timer);
    expect(hung, 'the key loop hung (deadlocked)').toBe(false);
    expect({ code, stderr }).toEqual({ code: 0, stderr: '' });
  }, 150_000);

  it('leaves other key exchanges alone', () => {
    const ecdh = { type: 'ecdh', computeSecret: () => Buffer.from([1]) };
    useRawX25519(ecdh);
    expect(ecdh.computeSecret()).toEqual(Buffer.from([1]));
  });

  it('carries a real ssh2 login, first exchange and rekey, through the replaced methods', async () => {
    const hostKey = generateKeyPair('ed25519').private;
    let replaced = 0;
    const srv = new ssh2.Server({ hostKeys: [hostKey], algorithms: SERVER_ALGORITHMS }, (conn) => {
      conn.on('error', () => undefined);
      conn.on('authentication', (ctx) => ctx.accept());
      conn.on('ready', () => conn.on('session', (accept) => {
        const s = accept();
        s.on('exec', (acc) => {
          const ch = acc();
          // A rekey goes through a second exchange object.
          conn.rekey(() => {
            ch.exit(0);
            ch.end('hi');
          });
        });
      }));
    });
    srv.on('connection', (conn) => {
      rawX25519KeyExchange(conn);
      watchKeyExchanges(conn, (kex) => {
        // Ours are the object's own methods; ssh2's sit on its class.
        if (kex.type === '25519' && Object.hasOwn(kex, 'computeSecret') && Object.hasOwn(kex, 'getPublicKey')) replaced++;
      });
    });
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const port = (srv.address() as net.AddressInfo).port;
    try {
      const out = await new Promise<string>((resolve, reject) => {
        const c = new ssh2.Client();
        c.on('error', reject);
        c.on('ready', () => {
          c.exec('x', (err, ch) => {
            if (err) return reject(err);
            let data = '';
            ch.on('data', (d: Buffer) => { data += d; });
            ch.on('close', () => { c.end(); resolve(data); });
          });
        });
        c.connect({ host: '127.0.0.1', port, username: 'u', password: 'p', algorithms: { kex: ['curve25519-sha256'] } });
      });
      expect(out).toBe('hi');
      expect(replaced).toBe(2);
    } finally {
      await new Promise<void>((r) => srv.close(() => r()));
    }
  });
});
