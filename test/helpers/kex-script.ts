import crypto from 'node:crypto';
import net from 'node:net';

/**
 * A scripted SSH client for the key exchange only: it sends its KEXINIT with
 * or without first_kex_packet_follows and then whatever packets a test
 * scripts (guessed KEX_ECDH_INITs, or hostile ones), in one write, as
 * dropbear's dbclient does; then it tells from the server's signature over
 * the exchange hash H which of its ECDH keys the server answered.
 * Used by test/unit/kex-guess.test.ts, test/adversarial/kex-guess.test.ts and
 * test/integration/ssh-tcp-acks.test.ts.
 */

export const MSG = { DISCONNECT: 1, KEXINIT: 20, NEWKEYS: 21, KEX_ECDH_INIT: 30, KEX_ECDH_REPLY: 31, USERAUTH_REQUEST: 50 } as const;
const CLIENT_IDENT = 'SSH-2.0-kexguess_test_1.0';

export function sshString(b: Buffer | string): Buffer {
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

/** A KEXINIT payload with the given kex and host key lists (plain AES-CTR and HMAC for the rest). */
export function kexInit(kex: string[], hostKey: string[], follows: boolean): Buffer {
  const lists = [kex, hostKey, ['aes128-ctr'], ['aes128-ctr'], ['hmac-sha2-256'], ['hmac-sha2-256'], ['none'], ['none'], [], []];
  return Buffer.concat([
    Buffer.from([MSG.KEXINIT]),
    crypto.randomBytes(16),
    ...lists.map((l) => sshString(l.join(','))),
    Buffer.from([follows ? 1 : 0, 0, 0, 0, 0]),
  ]);
}

export interface Ephemeral { pub: Buffer; priv: crypto.KeyObject }

export function x25519(): Ephemeral {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('x25519');
  // From the DER (its last 32 bytes), not the JWK: Node 20's JWK export of a
  // generated key can deadlock in a garbage collection (src/ssh/kex-x25519.ts).
  return { pub: publicKey.export({ format: 'der', type: 'spki' }).subarray(-32), priv: privateKey };
}

export function ecdhInit(e: Ephemeral): Buffer {
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

export class ScriptedClient {
  private buf = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  closed = false;
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

  /** Waits for `n` buffered bytes; throws on a close or after 5 s. */
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

  /** Resolves once the server closed the connection (after reading and dropping whatever it sent); throws after 5 s. */
  async waitClosed(): Promise<void> {
    const deadline = Date.now() + 5_000;
    while (!this.closed) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('the server kept the connection open for 5 s');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => { clearTimeout(t); resolve(); };
      });
      this.wake = null;
    }
  }

  send(...payloads: Buffer[]): void {
    this.sock.write(Buffer.concat(payloads.map(frame)));
  }

  close(): void {
    this.sock.destroy();
  }
}

/**
 * Which of our ephemeral keys the server's KEX_ECDH_REPLY answers (by its
 * ed25519 signature over H computed for each), or null for none.
 */
export function answeredKey(reply: Buffer, client: ScriptedClient, clientKexInit: Buffer, candidates: Record<string, Ephemeral>): string | null {
  if (reply[0] !== MSG.KEX_ECDH_REPLY) throw new Error(`expected KEX_ECDH_REPLY, got message ${reply[0]}`);
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

/**
 * One scripted handshake up to the server's reply: our KEXINIT, then `after`
 * (ECDH_INITs from `keys`, in order, unless given raw), all in one write.
 * Returns which key the reply answered and the message after it.
 */
export async function guessedExchange(port: number, opts: { kex: string[]; hostKey: string[]; follows: boolean; keys: Record<string, Ephemeral>; after?: Buffer[] }): Promise<{ used: string | null; next: number }> {
  const c = await ScriptedClient.connect(port);
  try {
    await c.readIdent();
    c.serverKexInit = await c.readPacket('KEXINIT');
    if (c.serverKexInit[0] !== MSG.KEXINIT) throw new Error(`expected the server's KEXINIT, got message ${c.serverKexInit[0]}`);
    const ours = kexInit(opts.kex, opts.hostKey, opts.follows);
    c.send(ours, ...(opts.after ?? Object.values(opts.keys).map(ecdhInit)));
    const reply = await c.readPacket('KEX_ECDH_REPLY');
    const used = answeredKey(reply, c, ours, opts.keys);
    const next = await c.readPacket('NEWKEYS');
    return { used, next: next[0]! };
  } finally {
    c.close();
  }
}
