import crypto from 'node:crypto';
import net from 'node:net';
import ssh2 from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SERVER_ALGORITHMS } from '../../src/ssh/algorithms.js';
import { correctKexGuessHandling, mustIgnoreGuess, summarizeKexInit } from '../../src/ssh/kex-guess.js';
import { generateKeyPair } from '../../src/ssh/keygen.js';

/**
 * A scripted SSH client that sends its KEXINIT with first_kex_packet_follows
 * and a guessed KEX_ECDH_INIT right after (what dropbear's dbclient does), then
 * checks which of its ECDH public keys the server's reply was computed from:
 * the exchange hash H covers the client's key, and the server signs H.
 */

const MSG = { KEXINIT: 20, NEWKEYS: 21, KEX_ECDH_INIT: 30, KEX_ECDH_REPLY: 31, DISCONNECT: 1 } as const;
const CLIENT_IDENT = 'SSH-2.0-kexguess_test_1.0';

function sshString(b: Buffer | string): Buffer {
  const body = typeof b === 'string' ? Buffer.from(b, 'latin1') : b;
  const len = Buffer.alloc(4);
  len.writeUInt32BE(body.length);
  return Buffer.concat([len, body]);
}

function sshMpint(unsigned: Buffer): Buffer {
  let i = 0;
  while (i < unsigned.length && unsigned[i] === 0) i++;
  let v = unsigned.subarray(i);
  if (v.length > 0 && v[0]! & 0x80) v = Buffer.concat([Buffer.from([0]), v]);
  return sshString(v);
}

function kexInit(kex: string[], hostKey: string[], follows: boolean): Buffer {
  const lists = [kex, hostKey, ['aes128-ctr'], ['aes128-ctr'], ['hmac-sha2-256'], ['hmac-sha2-256'], ['none'], ['none'], [], []];
  return Buffer.concat([
    Buffer.from([MSG.KEXINIT]),
    crypto.randomBytes(16),
    ...lists.map((l) => sshString(l.join(','))),
    Buffer.from([follows ? 1 : 0, 0, 0, 0, 0]),
  ]);
}

interface Ephemeral { pub: Buffer; priv: crypto.KeyObject }

function x25519(): Ephemeral {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('x25519');
  const jwk = publicKey.export({ format: 'jwk' });
  return { pub: Buffer.from(jwk.x!, 'base64url'), priv: privateKey };
}

function ecdhInit(e: Ephemeral): Buffer {
  return Buffer.concat([Buffer.from([MSG.KEX_ECDH_INIT]), sshString(e.pub)]);
}

/** Unencrypted binary packet framing (RFC 4253 §6), block size 8. */
function frame(payload: Buffer): Buffer {
  let pad = 8 - ((5 + payload.length) % 8);
  if (pad < 4) pad += 8;
  const head = Buffer.alloc(5);
  head.writeUInt32BE(1 + payload.length + pad);
  head[4] = pad;
  return Buffer.concat([head, payload, crypto.randomBytes(pad)]);
}

class ScriptedClient {
  private buf = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  private closed = false;
  serverIdent = '';
  serverKexInit: Buffer = Buffer.alloc(0);

  private constructor(private readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake?.();
    });
    sock.on('error', () => undefined);
    sock.on('close', () => {
      this.closed = true;
      this.wake?.();
    });
  }

  static async connect(port: number): Promise<ScriptedClient> {
    const sock = net.connect(port, '127.0.0.1');
    await new Promise<void>((resolve, reject) => sock.once('connect', resolve).once('error', reject));
    sock.setNoDelay(true);
    const c = new ScriptedClient(sock);
    sock.write(`${CLIENT_IDENT}\r\n`);
    return c;
  }

  private async need(n: number, what: string): Promise<void> {
    const deadline = Date.now() + 5_000;
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`server closed the connection while we waited for ${what}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no ${what} from the server within 5 s (it did not answer the key exchange)`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => { clearTimeout(t); resolve(); };
      });
      this.wake = null;
    }
  }

  async readIdent(): Promise<void> {
    for (;;) {
      const nl = this.buf.indexOf('\n');
      if (nl !== -1) {
        const line = this.buf.toString('latin1', 0, nl).replace(/\r$/, '');
        this.buf = this.buf.subarray(nl + 1);
        if (line.startsWith('SSH-')) {
          this.serverIdent = line;
          return;
        }
        continue;
      }
      await this.need(this.buf.length + 1, 'identification line');
    }
  }

  async readPacket(what: string): Promise<Buffer> {
    await this.need(4, what);
    const len = this.buf.readUInt32BE(0);
    await this.need(4 + len, what);
    const pad = this.buf[4]!;
    const payload = Buffer.from(this.buf.subarray(5, 4 + len - pad));
    this.buf = this.buf.subarray(4 + len);
    return payload;
  }

  send(...payloads: Buffer[]): void {
    this.sock.write(Buffer.concat(payloads.map(frame)));
  }

  close(): void {
    this.sock.destroy();
  }
}

/** Which of our ephemeral keys the server's KEX_ECDH_REPLY answers, by checking its signature over H for each. */
function answeredKey(reply: Buffer, client: ScriptedClient, clientKexInit: Buffer, candidates: Record<string, Ephemeral>): string | null {
  expect(reply[0], `expected KEX_ECDH_REPLY, got message ${reply[0]}`).toBe(MSG.KEX_ECDH_REPLY);
  let pos = 1;
  const take = (): Buffer => {
    const len = reply.readUInt32BE(pos);
    const v = reply.subarray(pos + 4, pos + 4 + len);
    pos += 4 + len;
    return v;
  };
  const hostKeyBlob = take();
  const serverPub = take();
  const sigBlob = take();
  const hostKeyRaw = hostKeyBlob.subarray(4 + hostKeyBlob.readUInt32BE(0) + 4);
  const sigRaw = sigBlob.subarray(4 + sigBlob.readUInt32BE(0) + 4);
  const hostKey = crypto.createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: hostKeyRaw.toString('base64url') }, format: 'jwk' });
  const serverEph = crypto.createPublicKey({ key: { kty: 'OKP', crv: 'X25519', x: serverPub.toString('base64url') }, format: 'jwk' });
  for (const [name, e] of Object.entries(candidates)) {
    const secret = crypto.diffieHellman({ privateKey: e.priv, publicKey: serverEph });
    const h = crypto.createHash('sha256').update(Buffer.concat([
      sshString(CLIENT_IDENT), sshString(client.serverIdent), sshString(clientKexInit), sshString(client.serverKexInit),
      sshString(hostKeyBlob), sshString(e.pub), sshString(serverPub), sshMpint(secret),
    ])).digest();
    if (crypto.verify(null, h, hostKey, sigRaw)) return name;
  }
  return null;
}

describe('guessed first key-exchange packet (RFC 4253 §7.1)', () => {
  let corrected: ssh2.Server;
  let bare: ssh2.Server;
  let correctedPort = 0;
  let barePort = 0;

  const start = async (fix: boolean): Promise<[ssh2.Server, number]> => {
    const hostKey = generateKeyPair('ed25519').private;
    const srv = new ssh2.Server({ hostKeys: [hostKey], algorithms: SERVER_ALGORITHMS }, (conn) => {
      conn.on('error', () => undefined);
    });
    if (fix) srv.on('connection', (conn) => correctKexGuessHandling(conn));
    await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
    return [srv, (srv.address() as net.AddressInfo).port];
  };

  beforeAll(async () => {
    [corrected, correctedPort] = await start(true);
    [bare, barePort] = await start(false);
  });
  afterAll(async () => {
    await Promise.all([corrected, bare].map((s) => new Promise<void>((resolve) => (s ? s.close(() => resolve()) : resolve()))));
  });

  /** Handshake up to the server's reply: our KEXINIT, then each ECDH_INIT in order, all in one write. */
  const exchange = async (port: number, kex: string[], hostKey: string[], follows: boolean, keys: Record<string, Ephemeral>) => {
    const c = await ScriptedClient.connect(port);
    try {
      await c.readIdent();
      c.serverKexInit = await c.readPacket('KEXINIT');
      expect(c.serverKexInit[0]).toBe(MSG.KEXINIT);
      const ours = kexInit(kex, hostKey, follows);
      c.send(ours, ...Object.values(keys).map(ecdhInit));
      const reply = await c.readPacket('KEX_ECDH_REPLY');
      const used = answeredKey(reply, c, ours, keys);
      const next = await c.readPacket('NEWKEYS');
      return { used, next: next[0] };
    } finally {
      c.close();
    }
  };

  it('uses a right guess (first kex and host key algorithms both ours): the client waits for no second packet', async () => {
    const r = await exchange(correctedPort, ['curve25519-sha256', 'ecdh-sha2-nistp256'], ['ssh-ed25519', 'rsa-sha2-256'], true, { guess: x25519() });
    expect(r).toEqual({ used: 'guess', next: MSG.NEWKEYS });
  });

  it('ignores a guess whose first kex algorithm is not ours, even when the method agreed on is the guessed one', async () => {
    // Negotiation takes the client's first supported method (curve25519-sha256@libssh.org),
    // but our first is curve25519-sha256: the RFC calls that a wrong guess.
    const r = await exchange(correctedPort, ['curve25519-sha256@libssh.org', 'curve25519-sha256'], ['ssh-ed25519'], true, { guess: x25519(), real: x25519() });
    expect(r).toEqual({ used: 'real', next: MSG.NEWKEYS });
  });

  it('ignores a guess whose first host key algorithm is not ours', async () => {
    const r = await exchange(correctedPort, ['curve25519-sha256'], ['ecdsa-sha2-nistp256', 'ssh-ed25519'], true, { guess: x25519(), real: x25519() });
    expect(r).toEqual({ used: 'real', next: MSG.NEWKEYS });
  });

  it('leaves a key exchange without a guess alone', async () => {
    const r = await exchange(correctedPort, ['curve25519-sha256'], ['ssh-ed25519'], false, { only: x25519() });
    expect(r).toEqual({ used: 'only', next: MSG.NEWKEYS });
  });

  it('ssh2 by itself still drops a right guess (when this fails, upstream fixed it: delete kex-guess.ts)', async () => {
    // Without the correction the right guess is thrown away and the next packet taken instead.
    const r = await exchange(barePort, ['curve25519-sha256'], ['ssh-ed25519'], true, { guess: x25519(), second: x25519() });
    expect(r.used).toBe('second');
  });
});

describe('KEXINIT reading', () => {
  it('takes the first kex and host key algorithm and the follows flag', () => {
    expect(summarizeKexInit(kexInit(['a', 'b'], ['c'], true))).toEqual({ firstKex: 'a', firstHostKey: 'c', firstKexPacketFollows: true });
    expect(summarizeKexInit(kexInit([], ['c', 'd'], false))).toEqual({ firstKex: '', firstHostKey: 'c', firstKexPacketFollows: false });
  });

  it('returns undefined for a truncated payload or a list running past the end', () => {
    const p = kexInit(['curve25519-sha256'], ['ssh-ed25519'], true);
    expect(summarizeKexInit(p.subarray(0, 30))).toBeUndefined();
    const lying = Buffer.from(p);
    lying.writeUInt32BE(0xffffff, 17);
    expect(summarizeKexInit(lying)).toBeUndefined();
  });

  it('ignores only a flagged guess that differs in kex or host key', () => {
    const local = kexInit(['k1', 'k2'], ['h1', 'h2'], false);
    expect(mustIgnoreGuess(local, kexInit(['k1'], ['h1'], true))).toBe(false);
    expect(mustIgnoreGuess(local, kexInit(['k2', 'k1'], ['h1'], true))).toBe(true);
    expect(mustIgnoreGuess(local, kexInit(['k1'], ['h2', 'h1'], true))).toBe(true);
    expect(mustIgnoreGuess(local, kexInit(['k2'], ['h2'], false))).toBe(false);
  });
});
