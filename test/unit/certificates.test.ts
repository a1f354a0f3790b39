import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pino, type Logger } from 'pino';
import ssh2 from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Authenticator } from '../../src/auth/authenticator.js';
import { certificateProblem, compileSourceAddress, parseCertificate } from '../../src/auth/certificates.js';
import { forwardingRefusal, permitListenRefusal, permitOpenRefusal } from '../../src/auth/forward-rules.js';
import { parseRevokedKeys, revocationOf } from '../../src/auth/key-lists.js';
import { sourceAllowed } from '../../src/auth/source-match.js';
import { parseAccounts, parseAuthorizedKeyLine, type Account } from '../../src/config/accounts.js';
import type { AccountSource } from '../../src/config/accounts-store.js';
import { parseExpiryTime, parsePermitListen, parsePermitOpen } from '../../src/config/forward-rules.js';
import { parseServerConfig } from '../../src/config/server-config.js';

/**
 * Certificates made by the real ssh-keygen (-s), read and checked by
 * src/auth; the key options that restrict forwarding; and the
 * authenticator's decisions (trust, principals, revocation, source).
 */

let dir: string;
const NOW = Date.now();
const nowSeconds = NOW / 1000;

function keygen(name: string, type: 'ed25519' | 'ecdsa' | 'rsa'): { file: string; pub: string; blob: Buffer } {
  const file = path.join(dir, name);
  execFileSync('ssh-keygen', ['-q', '-t', type, '-N', '', '-C', name, '-f', file, ...(type === 'rsa' ? ['-b', '2048'] : [])]);
  const pub = readFileSync(`${file}.pub`, 'utf8').trim();
  return { file, pub, blob: Buffer.from(pub.split(' ')[1]!, 'base64') };
}

/** ssh-keygen -s CA … on a copy of `key`'s public key; returns the certificate's algorithm name and blob. */
function sign(ca: { file: string }, key: { file: string }, name: string, args: string[]): { algo: string; blob: Buffer; file: string } {
  const pub = path.join(dir, `${name}.pub`);
  copyFileSync(`${key.file}.pub`, pub);
  execFileSync('ssh-keygen', ['-q', '-s', ca.file, '-I', name, ...args, pub], { stdio: ['ignore', 'ignore', 'pipe'] });
  const [algo, b64] = readFileSync(path.join(dir, `${name}-cert.pub`), 'utf8').trim().split(' ');
  return { algo: algo!, blob: Buffer.from(b64!, 'base64'), file: path.join(dir, `${name}-cert.pub`) };
}

const str = (b: Buffer | string) => {
  const buf = Buffer.from(b);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(buf.length);
  return Buffer.concat([len, buf]);
};

/** An SSH wire signature (string algo, string sig) by an OpenSSH private key file, made with ssh2. */
function wireSign(keyFile: string, data: Buffer, algo: 'ssh-ed25519' | 'rsa-sha2-256' | 'rsa-sha2-512' = 'ssh-ed25519'): Buffer {
  const k = ssh2.utils.parseKey(readFileSync(keyFile, 'utf8')) as ssh2.ParsedKey;
  const raw = algo === 'ssh-ed25519' ? k.sign(data) : k.sign(data, algo === 'rsa-sha2-256' ? 'sha256' : 'sha512');
  return Buffer.concat([str(algo), str(raw)]);
}

/** The certificate with its CA key replaced by `signer`'s own key and signed again by it (a self-made "CA"). */
function selfSigned(certBlob: Buffer, algo: string, signer: { file: string; blob: Buffer }): Buffer {
  const cert = parseCertificate(algo, certBlob);
  const body = cert.signed.subarray(0, cert.signed.length - 4 - cert.caBlob.length);
  const signed = Buffer.concat([body, str(signer.blob)]);
  return Buffer.concat([signed, str(wireSign(signer.file, signed))]);
}

class MapSource implements AccountSource {
  constructor(public accounts = new Map<string, Account>()) {}
  get(name: string): Account | undefined {
    return this.accounts.get(name);
  }
  list(): Account[] {
    return [...this.accounts.values()];
  }
}

function captureLogger(): { logger: Logger; records: Array<Record<string, unknown>> } {
  const records: Array<Record<string, unknown>> = [];
  const logger = pino({ level: 'debug' }, { write: (line: string) => void records.push(JSON.parse(line) as Record<string, unknown>) });
  return { logger, records };
}

let ca: ReturnType<typeof keygen>;
let rsaCa: ReturnType<typeof keygen>;
let ecCa: ReturnType<typeof keygen>;
let teamCa: ReturnType<typeof keygen>;
let user: ReturnType<typeof keygen>;
let userEc: ReturnType<typeof keygen>;
let userRsa: ReturnType<typeof keygen>;

beforeAll(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'vesh-cert-unit-'));
  ca = keygen('ca', 'ed25519');
  rsaCa = keygen('rsa-ca', 'rsa');
  ecCa = keygen('ec-ca', 'ecdsa');
  teamCa = keygen('team-ca', 'ed25519');
  user = keygen('user', 'ed25519');
  userEc = keygen('user-ec', 'ecdsa');
  userRsa = keygen('user-rsa', 'rsa');
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('certificates: reading and checking what ssh-keygen -s makes', () => {
  it('reads every field and verifies ed25519, ECDSA and RSA (SHA-2) CA signatures', () => {
    const c1 = sign(ca, user, 'c1', ['-n', 'alice,ops', '-z', '42', '-V', '-5m:+1h', '-O', 'force-command=echo hi', '-O', 'source-address=127.0.0.1/32,10.0.0.0/8']);
    const cert = parseCertificate(c1.algo, c1.blob);
    expect(cert).toMatchObject({ keyId: 'c1', serial: 42n, principals: ['alice', 'ops'], forceCommand: 'echo hi', sourceAddress: '127.0.0.1/32,10.0.0.0/8', type: 1 });
    expect(cert.keyBlob.equals(user.blob)).toBe(true);
    expect(cert.caBlob.equals(ca.blob)).toBe(true);
    expect([...cert.extensions].sort()).toEqual(['permit-X11-forwarding', 'permit-agent-forwarding', 'permit-port-forwarding', 'permit-pty', 'permit-user-rc']);
    expect(certificateProblem(cert, { nowSeconds, principals: ['alice'] })).toBeNull();
    const c2 = sign(ecCa, userEc, 'c2', ['-n', 'alice']);
    expect(c2.algo).toBe('ecdsa-sha2-nistp256-cert-v01@openssh.com');
    expect(certificateProblem(parseCertificate(c2.algo, c2.blob), { nowSeconds, principals: ['alice'] })).toBeNull();
    const c3 = sign(rsaCa, userRsa, 'c3', ['-t', 'rsa-sha2-512', '-n', 'alice']);
    expect(certificateProblem(parseCertificate('rsa-sha2-512-cert-v01@openssh.com', c3.blob), { nowSeconds, principals: ['alice'] })).toBeNull();
  });

  it('refuses expired, not yet valid, wrong-principal, no-principal, host and unknown-critical-option certificates', () => {
    const check = (args: string[], name: string, principals = ['alice']) => {
      const c = sign(ca, user, name, args);
      return certificateProblem(parseCertificate(c.algo, c.blob), { nowSeconds, principals });
    };
    expect(check(['-n', 'alice', '-V', '20200101:20200102'], 'expired')).toMatch(/^expired/);
    expect(check(['-n', 'alice', '-V', '+1d:+2d'], 'future')).toMatch(/^not valid yet/);
    expect(check(['-n', 'mallory'], 'mallory')).toMatch(/no allowed principal among \["mallory"\]/);
    expect(check([], 'nobody')).toMatch(/lists no principals/);
    expect(check(['-h', '-n', 'alice'], 'host')).toMatch(/host certificate/);
    expect(check(['-n', 'alice', '-O', 'critical:frobnicate=x'], 'critical')).toMatch(/unknown critical option "frobnicate"/);
    // A non-critical extension we do not know is fine, as in OpenSSH.
    expect(check(['-n', 'alice', '-O', 'extension:login@example.com=x'], 'ext')).toBeNull();
  });

  it('refuses a certificate whose signature or signed body was altered, and one signed by its own key', () => {
    const c = sign(ca, user, 'alter', ['-n', 'alice']);
    const sigFlipped = Buffer.from(c.blob);
    sigFlipped[sigFlipped.length - 5]! ^= 1;
    expect(certificateProblem(parseCertificate(c.algo, sigFlipped), { nowSeconds, principals: ['alice'] })).toMatch(/CA signature does not verify/);
    // "alice" → "alicf" in the principals: the CA signed other bytes.
    const bodyAltered = Buffer.from(c.blob);
    const at = bodyAltered.indexOf(Buffer.from('alice'));
    bodyAltered[at + 4] = 'f'.charCodeAt(0);
    expect(certificateProblem(parseCertificate(c.algo, bodyAltered), { nowSeconds, principals: ['alicf'] })).toMatch(/CA signature does not verify/);
    // Self-signed: the signature verifies (with its own key), so trust is what refuses it (see the authenticator tests).
    const own = parseCertificate(c.algo, selfSigned(c.blob, c.algo, user));
    expect(own.caBlob.equals(user.blob)).toBe(true);
    expect(certificateProblem(own, { nowSeconds, principals: ['alice'] })).toBeNull();
  });

  it('refuses malformed blobs and a blob sent under another algorithm name', () => {
    const c = sign(ca, user, 'shape', ['-n', 'alice']);
    expect(() => parseCertificate(c.algo, c.blob.subarray(0, c.blob.length - 1))).toThrow(/runs past the end|truncated/);
    expect(() => parseCertificate(c.algo, Buffer.concat([c.blob, Buffer.from([0])]))).toThrow(/trailing bytes/);
    expect(() => parseCertificate('ecdsa-sha2-nistp256-cert-v01@openssh.com', c.blob)).toThrow(/not a ecdsa-sha2-nistp256-cert/);
    expect(() => parseCertificate('ssh-ed25519', c.blob)).toThrow(/not a certificate type/);
  });

  it('matches source-address as addresses and CIDR blocks only', () => {
    const list = compileSourceAddress('127.0.0.2, 10.0.0.0/8,2001:db8::/32');
    expect(sourceAllowed(list, '127.0.0.2')).toBe(true);
    expect(sourceAllowed(list, '::ffff:10.9.8.7')).toBe(true);
    expect(sourceAllowed(list, '2001:db8::1')).toBe(true);
    expect(sourceAllowed(list, '127.0.0.1')).toBe(false);
    expect(() => compileSourceAddress('*.example.com')).toThrow(/not an address or CIDR block/);
    expect(() => compileSourceAddress('10.0.0.0/40')).toThrow(/prefix length must be 0-32/);
  });
});

describe('revoked keys list', () => {
  it('revokes by key, fingerprint, CA, serial range and key id; refuses a binary KRL and bad lines', () => {
    const c = sign(ca, user, 'revoke-me', ['-n', 'alice', '-z', '77']);
    const cert = parseCertificate(c.algo, c.blob);
    const about = { serial: cert.serial, keyId: cert.keyId, caBlob: cert.caBlob };
    const other = keygen('other', 'ed25519');
    expect(revocationOf(parseRevokedKeys(`# none\n${other.pub}\n`), cert.keyBlob, about)).toBeNull();
    expect(revocationOf(parseRevokedKeys(`${user.pub}\n`), cert.keyBlob, about)).toMatch(/^key SHA256:.* is revoked/);
    expect(revocationOf(parseRevokedKeys(`key: ${ca.pub}\n`), cert.keyBlob, about)).toMatch(/its CA .* is revoked/);
    const fp = execFileSync('ssh-keygen', ['-l', '-E', 'sha256', '-f', `${user.file}.pub`], { encoding: 'utf8' }).split(' ')[1]!;
    expect(revocationOf(parseRevokedKeys(`hash: ${fp}\n`), cert.keyBlob, about)).toMatch(/is revoked/);
    expect(revocationOf(parseRevokedKeys('serial: 70-80\n'), cert.keyBlob, about)).toBe('serial 77 is revoked');
    expect(revocationOf(parseRevokedKeys('serial: 78\n'), cert.keyBlob, about)).toBeNull();
    expect(revocationOf(parseRevokedKeys('id: revoke-me\n'), cert.keyBlob, about)).toMatch(/key id "revoke-me" is revoked/);
    // A plain key login is checked against the keys too.
    expect(revocationOf(parseRevokedKeys(`${user.pub}\n`), user.blob)).toMatch(/is revoked/);
    expect(() => parseRevokedKeys('SSHKRL\n\0rest')).toThrow(/binary KRL/);
    expect(() => parseRevokedKeys('serial: x\n')).toThrow(/line 1: serial "x" must be N or N-M/);
    expect(() => parseRevokedKeys('\nwhat: ever\n')).toThrow(/line 2: unknown field "what"/);
  });
});

describe('the authenticator with certificates', () => {
  function setup(opts: { accountsYaml: string; cas?: string[]; revokedFile?: string; now?: number | (() => number) }) {
    const { logger, records } = captureLogger();
    const src = new MapSource(parseAccounts('accounts.yaml', opts.accountsYaml));
    const auth = new Authenticator(src, {
      penalties: { failuresBeforePenalty: 3, sourceFailuresBeforePenalty: 20, penaltyMs: 1000, maxPenaltyMs: 5000 },
      trustedUserCAKeys: opts.cas ? { lines: opts.cas } : null,
      revokedKeys: opts.revokedFile ?? null,
    } as never, logger, { dummyHashCost: { memoryCost: 1024, timeCost: 1, parallelism: 1 }, now: typeof opts.now === 'function' ? opts.now : () => (opts.now as number | undefined) ?? NOW });
    const reasons = () => records.filter((r) => r.event === 'auth.certificate_refused').map((r) => String(r.reason));
    return { auth, records, reasons };
  }

  it('lets in a certificate of a trusted CA naming the account, and verifies the login signature with the certified key', () => {
    const { auth } = setup({ accountsYaml: 'alice: {}\nbob: {}\n', cas: [ca.pub] });
    const c = sign(ca, user, 'good', ['-n', 'alice', '-O', 'no-pty', '-O', 'no-agent-forwarding']);
    const found = auth.findKey('alice', c.algo, c.blob, '127.0.0.1');
    expect(found?.account.name).toBe('alice');
    expect(found?.key.certificate).toMatchObject({ keyId: 'good', serial: '0' });
    expect(found?.key.options).toMatchObject({ noPty: true, noPortForwarding: false, noAgentForwarding: true });
    const data = Buffer.from('session id and userauth request');
    expect(auth.verifySignature(found!.key, data, wireSign(user.file, data))).toBe(true);
    expect(auth.verifySignature(found!.key, Buffer.from('other'), wireSign(user.file, data))).toBe(false);
    // The CA's signature is not the user's: a signature by another key does not log in.
    expect(auth.verifySignature(found!.key, data, wireSign(ca.file, data))).toBe(false);
    // bob is not a principal of this certificate.
    expect(auth.findKey('bob', c.algo, c.blob, '127.0.0.1')).toBeNull();
  });

  it('checks validity, trust and revocation again for a certificate it verified before (only the CA signature is kept)', () => {
    let now = NOW;
    const revoked = path.join(dir, 'revoked-again');
    writeFileSync(revoked, '');
    const { auth, reasons } = setup({ accountsYaml: 'alice: {}\n', cas: [ca.pub], revokedFile: revoked, now: () => now });
    const c = sign(ca, user, 'kept', ['-n', 'alice', '-V', '-1m:+1h', '-z', '9']);
    expect(auth.findKey('alice', c.algo, c.blob, '127.0.0.1')).not.toBeNull();
    expect(auth.findKey('alice', c.algo, c.blob, '127.0.0.1')).not.toBeNull();
    now = NOW + 2 * 3600_000;
    expect(auth.findKey('alice', c.algo, c.blob, '127.0.0.1')).toBeNull();
    now = NOW;
    writeFileSync(revoked, 'serial: 9\n');
    expect(auth.findKey('alice', c.algo, c.blob, '127.0.0.1')).toBeNull();
    expect(reasons()).toEqual([expect.stringMatching(/^expired/), 'serial 9 is revoked']);
  });

  it('refuses a self-signed certificate, an untrusted CA and an RSA certificate signed with SHA-1 by the client', () => {
    const { auth, reasons } = setup({ accountsYaml: 'alice: {}\n', cas: [ca.pub] });
    const c = sign(ca, user, 'self', ['-n', 'alice']);
    expect(auth.findKey('alice', c.algo, selfSigned(c.blob, c.algo, user), '127.0.0.1')).toBeNull();
    const t = sign(teamCa, user, 'team', ['-n', 'alice']);
    expect(auth.findKey('alice', t.algo, t.blob, '127.0.0.1')).toBeNull();
    expect(reasons()).toEqual(['its CA is not trusted for this account', 'its CA is not trusted for this account']);
    const { auth: auth2 } = setup({ accountsYaml: 'alice: {}\n', cas: [rsaCa.pub] });
    const r = sign(rsaCa, userRsa, 'rsa', ['-n', 'alice']);
    const data = Buffer.from('x');
    const viaSha1Name = auth2.findKey('alice', 'ssh-rsa-cert-v01@openssh.com', r.blob, '127.0.0.1')!;
    expect(auth2.verifySignature(viaSha1Name.key, data, wireSign(userRsa.file, data, 'rsa-sha2-512'))).toBe(true);
    const via256 = auth2.findKey('alice', 'rsa-sha2-256-cert-v01@openssh.com', r.blob, '127.0.0.1')!;
    // The name says SHA-256: a SHA-512 signature is not the one the client announced.
    expect(auth2.verifySignature(via256.key, data, wireSign(userRsa.file, data, 'rsa-sha2-512'))).toBe(false);
    expect(auth2.verifySignature(via256.key, data, wireSign(userRsa.file, data, 'rsa-sha2-256'))).toBe(true);
  });

  it('uses an account\'s cert-authority line with principals=, its from= and its options', () => {
    const yaml = [
      'carol:',
      '  keys:',
      `    - cert-authority,principals="ops,admins",from="127.0.0.0/8",permitopen="127.0.0.1:80",no-pty ${teamCa.pub}`,
      '',
    ].join('\n');
    const { auth, reasons } = setup({ accountsYaml: yaml });
    const ops = sign(teamCa, user, 'ops', ['-n', 'ops']);
    const found = auth.findKey('carol', ops.algo, ops.blob, '127.0.0.1');
    expect(found?.key.options).toMatchObject({ noPty: true, certAuthority: false, permitOpen: [{ host: '127.0.0.1', port: 80 }] });
    expect(auth.findKey('carol', ops.algo, ops.blob, '192.0.2.1')).toBeNull();
    // The account name is not enough where principals= is given.
    const named = sign(teamCa, user, 'named', ['-n', 'carol']);
    expect(auth.findKey('carol', named.algo, named.blob, '127.0.0.1')).toBeNull();
    expect(reasons()).toEqual([expect.stringMatching(/from= does not allow 192.0.2.1/), expect.stringMatching(/no allowed principal among \["carol"\]/)]);
    // A cert-authority line does not let its own key log in as a plain key.
    expect(auth.findKey('carol', 'ssh-ed25519', teamCa.blob, '127.0.0.1')).toBeNull();
  });

  it('refuses a force-command that differs from the line\'s command=, and honours source-address and expiry-time', () => {
    const yaml = [
      'dave:',
      '  keys:',
      `    - cert-authority,command="echo line" ${ca.pub}`,
      'erin:',
      '  keys:',
      `    - cert-authority,expiry-time="20200101" ${ca.pub}`,
      '',
    ].join('\n');
    const { auth, reasons } = setup({ accountsYaml: yaml });
    const forced = sign(ca, user, 'forced', ['-n', 'dave', '-O', 'force-command=echo cert']);
    expect(auth.findKey('dave', forced.algo, forced.blob, '127.0.0.1')).toBeNull();
    const plain = sign(ca, user, 'plain', ['-n', 'dave,erin', '-O', 'source-address=127.0.0.2']);
    expect(auth.findKey('dave', plain.algo, plain.blob, '127.0.0.1')).toBeNull();
    expect(auth.findKey('dave', plain.algo, plain.blob, '127.0.0.2')?.key.options.command).toBe('echo line');
    expect(auth.findKey('erin', plain.algo, plain.blob, '127.0.0.2')).toBeNull();
    expect(reasons()).toEqual([
      expect.stringMatching(/force-command differs/),
      'source-address 127.0.0.2 does not allow 127.0.0.1',
      expect.stringMatching(/expired \(expiry-time\)/),
    ]);
  });

  it('refuses revoked certificates and keys, and every key while the list cannot be read', () => {
    const revoked = path.join(dir, 'revoked');
    writeFileSync(revoked, 'serial: 666\n');
    const { auth, records } = setup({ accountsYaml: `alice:\n  keys:\n    - ${userEc.pub}\n`, cas: [ca.pub], revokedFile: revoked });
    const bad = sign(ca, user, 'bad', ['-n', 'alice', '-z', '666']);
    const good = sign(ca, user, 'ok', ['-n', 'alice', '-z', '667']);
    expect(auth.findKey('alice', bad.algo, bad.blob, '127.0.0.1')).toBeNull();
    expect(auth.findKey('alice', good.algo, good.blob, '127.0.0.1')).not.toBeNull();
    expect(auth.findKey('alice', 'ecdsa-sha2-nistp256', userEc.blob, '127.0.0.1')).not.toBeNull();
    // Edited: read again.
    writeFileSync(revoked, `serial: 666\n${userEc.pub}\n# and more\n`);
    expect(auth.findKey('alice', 'ecdsa-sha2-nistp256', userEc.blob, '127.0.0.1')).toBeNull();
    writeFileSync(revoked, 'serial: nonsense\n');
    expect(auth.findKey('alice', good.algo, good.blob, '127.0.0.1')).toBeNull();
    expect(records.filter((r) => r.event === 'auth.revoked_keys_unusable')).toHaveLength(1);
    rmSync(revoked);
    expect(auth.findKey('alice', good.algo, good.blob, '127.0.0.1')).toBeNull();
  });

  it('refuses a plain key past its expiry-time and takes it before', () => {
    const yaml = `alice:\n  keys:\n    - expiry-time="20300101" ${user.pub}\n`;
    expect(setup({ accountsYaml: yaml, now: parseExpiryTime('20291231') }).auth.findKey('alice', 'ssh-ed25519', user.blob, '127.0.0.1')).not.toBeNull();
    const late = setup({ accountsYaml: yaml, now: parseExpiryTime('20300101') });
    expect(late.auth.findKey('alice', 'ssh-ed25519', user.blob, '127.0.0.1')).toBeNull();
    expect(late.records.some((r) => r.event === 'auth.key_expired')).toBe(true);
  });

  it('reads auth.trustedUserCAKeys and auth.revokedKeys from vesh.yaml, refusing a bad CA line', () => {
    const cfg = parseServerConfig(path.join(dir, 'vesh.yaml'), `auth:\n  trustedUserCAKeys: ["${ca.pub}"]\n  revokedKeys: revoked.txt\n`);
    expect(cfg.auth.trustedUserCAKeys).toEqual({ lines: [ca.pub] });
    expect(cfg.auth.revokedKeys).toBe(path.join(dir, 'revoked.txt'));
    expect(parseServerConfig(path.join(dir, 'vesh.yaml'), 'auth: { trustedUserCAKeys: cas.pub }\n').auth.trustedUserCAKeys).toEqual({ file: path.join(dir, 'cas.pub') });
    expect(() => parseServerConfig(path.join(dir, 'vesh.yaml'), `auth:\n  trustedUserCAKeys: ["cert-authority ${ca.pub}"]\n`)).toThrow(/trustedUserCAKeys\[0\]: .*takes no options/);
  });
});

describe('key options and account rules for forwarding', () => {
  const ed = () => user.pub;

  it('parses permitopen, permitlisten and expiry-time as OpenSSH writes them', () => {
    const k = parseAuthorizedKeyLine(`permitopen="localhost:80",permitopen="[::1]:*",permitlisten="8080",permitlisten="LocalHost:*",expiry-time="202501021504" ${ed()}`);
    expect(k.options.permitOpen?.map((r) => [r.host, r.port])).toEqual([['localhost', 80], ['::1', '*']]);
    expect(k.options.permitListen?.map((r) => [r.host, r.port])).toEqual([['*', 8080], ['LocalHost', '*']]);
    expect(k.options.expiresAt).toBe(new Date(2025, 0, 2, 15, 4, 0).getTime());
    expect(parseExpiryTime('20250102150405Z')).toBe(Date.UTC(2025, 0, 2, 15, 4, 5));
    expect(() => parseAuthorizedKeyLine(`permitopen="localhost" ${ed()}`)).toThrow(/needs HOST:PORT/);
    expect(() => parseAuthorizedKeyLine(`permitopen="::1:80" ${ed()}`)).toThrow(/IPv6 address in brackets/);
    expect(() => parseAuthorizedKeyLine(`permitopen="*.example.com:80" ${ed()}`)).toThrow(/literal name or address/);
    expect(() => parseAuthorizedKeyLine(`permitlisten="host:0" ${ed()}`)).toThrow(/port must be 1-65535 or \*/);
    expect(() => parseAuthorizedKeyLine(`expiry-time="20250231" ${ed()}`)).toThrow(/not a real date/);
    expect(() => parseAuthorizedKeyLine(`expiry-time="2025" ${ed()}`)).toThrow(/must be YYYYMMDD/);
    expect(() => parseAuthorizedKeyLine(`permitopen ${ed()}`)).toThrow(/needs a value/);
    expect(() => parseAuthorizedKeyLine(`principals="a" ${ed()}`)).toThrow(/only applies to a cert-authority line/);
  });

  it('reads account permitOpen / permitListen with "any" and "none", and names the line of a bad rule', () => {
    const a = parseAccounts('accounts.yaml', 'alice:\n  permitOpen: ["127.0.0.1:80", "db:5432"]\n  permitListen: [none]\nbob:\n  permitOpen: [any]\n');
    expect(a.get('alice')?.permitOpen?.map((r) => r.text)).toEqual(['127.0.0.1:80', 'db:5432']);
    expect(a.get('alice')?.permitListen).toEqual([]);
    expect(a.get('bob')?.permitOpen).toBeUndefined();
    expect(() => parseAccounts('accounts.yaml', 'alice:\n  keys: []\n  permitOpen: ["nope"]\n')).toThrow(/accounts.yaml:3: .*permitOpen="nope" needs HOST:PORT/);
    expect(() => parseAccounts('accounts.yaml', 'alice:\n  permitOpen: [any, "a:1"]\n')).toThrow(/must stand alone/);
  });

  it('allows a forward only when both the account and the key allow it, and names the refusing rule', () => {
    const key = parseAuthorizedKeyLine(`permitopen="127.0.0.1:80",permitopen="db:*",permitlisten="localhost:8080" ${ed()}`);
    const account = { forwarding: true, permitOpen: [parsePermitOpen('127.0.0.1:80'), parsePermitOpen('*:443')], permitListen: [parsePermitListen('*')] };
    expect(permitOpenRefusal(account, key, '127.0.0.1', 80)).toBeNull();
    expect(permitOpenRefusal(account, key, '127.0.0.1', 81)).toBe('account permitOpen (127.0.0.1:80, *:443)');
    expect(permitOpenRefusal(account, key, 'db', 443)).toBeNull();
    expect(permitOpenRefusal(account, key, 'web', 443)).toBe('key option permitopen (127.0.0.1:80, db:*)');
    // Literal hosts: "localhost" is not "127.0.0.1".
    expect(permitOpenRefusal({ forwarding: true }, key, 'localhost', 80)).toMatch(/key option permitopen/);
    expect(permitListenRefusal(account, key, 'LOCALHOST', 8080)).toBeNull();
    expect(permitListenRefusal(account, key, '0.0.0.0', 8080)).toBe('key option permitlisten (localhost:8080)');
    // The worker binds "localhost" as 127.0.0.1: a rule naming localhost still matches it, not 0.0.0.0.
    expect(permitListenRefusal(account, key, '127.0.0.1', 8080)).toBeNull();
    expect(permitListenRefusal({ forwarding: true, permitListen: [parsePermitListen('127.0.0.1:*')] }, null, '0.0.0.0', 1)).toMatch(/account permitListen/);
    expect(permitListenRefusal({ forwarding: true, permitListen: [] }, null, 'localhost', 8080)).toBe('account permitListen (none)');
    expect(forwardingRefusal({ forwarding: true }, { options: { noPortForwarding: false }, certificate: { extensions: new Set(['permit-pty']) } })).toBe('certificate without permit-port-forwarding');
    expect(forwardingRefusal({ forwarding: false }, null)).toBe('forwarding is off for this account');
  });
});
