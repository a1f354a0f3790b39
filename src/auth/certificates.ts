import { BlockList, isIP } from 'node:net';
import type { SourcePattern } from '../config/accounts.js';
import { parseWirePublicKey, readKeyParts, signatureAlgorithmsOf, verifyWireSignature, WireReader, type WirePublicKey } from './ssh-wire.js';

/**
 * OpenSSH certificates (PROTOCOL.certkeys): read from the wire format and
 * checked with node:crypto. Not with sshpk: its last release is from 2023,
 * it checks ECDSA and Ed25519 signatures in JavaScript (jsbn, tweetnacl)
 * rather than OpenSSL, and it would add eight packages to the root
 * process for a format of a dozen fields.
 */

/** The key algorithm names a client logs in with, and what each means. */
const CERT_ALGORITHMS: Record<string, { certType: string; keyType: string; signature: readonly string[] }> = {
  'ssh-ed25519-cert-v01@openssh.com': { certType: 'ssh-ed25519-cert-v01@openssh.com', keyType: 'ssh-ed25519', signature: ['ssh-ed25519'] },
  'ecdsa-sha2-nistp256-cert-v01@openssh.com': { certType: 'ecdsa-sha2-nistp256-cert-v01@openssh.com', keyType: 'ecdsa-sha2-nistp256', signature: ['ecdsa-sha2-nistp256'] },
  'ecdsa-sha2-nistp384-cert-v01@openssh.com': { certType: 'ecdsa-sha2-nistp384-cert-v01@openssh.com', keyType: 'ecdsa-sha2-nistp384', signature: ['ecdsa-sha2-nistp384'] },
  'ecdsa-sha2-nistp521-cert-v01@openssh.com': { certType: 'ecdsa-sha2-nistp521-cert-v01@openssh.com', keyType: 'ecdsa-sha2-nistp521', signature: ['ecdsa-sha2-nistp521'] },
  // An RSA certificate is always of type ssh-rsa-cert; the name a client
  // uses says which SHA-2 signature it makes (RFC 8332 applied to certs).
  'ssh-rsa-cert-v01@openssh.com': { certType: 'ssh-rsa-cert-v01@openssh.com', keyType: 'ssh-rsa', signature: ['rsa-sha2-256', 'rsa-sha2-512'] },
  'rsa-sha2-256-cert-v01@openssh.com': { certType: 'ssh-rsa-cert-v01@openssh.com', keyType: 'ssh-rsa', signature: ['rsa-sha2-256'] },
  'rsa-sha2-512-cert-v01@openssh.com': { certType: 'ssh-rsa-cert-v01@openssh.com', keyType: 'ssh-rsa', signature: ['rsa-sha2-512'] },
};

export function isCertificateAlgorithm(algo: string): boolean {
  return Object.hasOwn(CERT_ALGORITHMS, algo);
}

export const USER_CERT = 1;
export const HOST_CERT = 2;
/** valid_before of a certificate that never expires. */
const FOREVER = 0xffff_ffff_ffff_ffffn;

/** Critical options we know; any other refuses the certificate, as OpenSSH does. */
const KNOWN_CRITICAL_OPTIONS = new Set(['force-command', 'source-address']);

export interface Certificate {
  /** The whole certificate blob, as the client sent it. */
  blob: Buffer;
  certType: string;
  /** The certified key's type and the key itself. */
  key: WirePublicKey;
  /** The certified key as a plain public key blob, for revocation lists and fingerprints. */
  keyBlob: Buffer;
  serial: bigint;
  type: number;
  keyId: string;
  principals: string[];
  /** Seconds since the epoch. */
  validAfter: bigint;
  validBefore: bigint;
  forceCommand?: string;
  /** source-address as written ("192.0.2.0/24,2001:db8::/32"). */
  sourceAddress?: string;
  /** Critical options we do not know (the certificate is refused when there are any). */
  unknownCriticalOptions: string[];
  /** Extension names (permit-pty, permit-port-forwarding…). */
  extensions: Set<string>;
  /** The CA's public key blob. */
  caBlob: Buffer;
  ca: WirePublicKey;
  /** The bytes the CA signed (everything before the signature). */
  signed: Buffer;
  signature: Buffer;
}

/** A list of (string name, string data) in the certificate, names unique. */
function readNameDataList(buf: Buffer, what: string): Map<string, Buffer> {
  const r = new WireReader(buf);
  const out = new Map<string, Buffer>();
  while (!r.done) {
    const name = r.text(`${what} name`);
    const data = r.string(`${what} ${name}`);
    if (out.has(name)) throw new Error(`${what} "${name.slice(0, 40)}" appears twice`);
    out.set(name, data);
  }
  return out;
}

/** A critical option's value: one string inside its data. */
function optionText(data: Buffer, name: string): string {
  const r = new WireReader(data);
  const s = r.text(`critical option ${name}`);
  if (!r.done) throw new Error(`critical option ${name}: trailing bytes`);
  return s;
}

/**
 * Parse a certificate blob sent with key algorithm `algo`. Checks its form
 * only (throws an Error saying what is malformed); trust, validity and the
 * CA's signature are checked by checkCertificate.
 */
export function parseCertificate(algo: string, blob: Buffer): Certificate {
  const spec = CERT_ALGORITHMS[algo];
  if (!spec) throw new Error(`"${algo.slice(0, 60)}" is not a certificate type vesh accepts`);
  const r = new WireReader(blob);
  const certType = r.text('certificate type');
  if (certType !== spec.certType) throw new Error(`the certificate is a ${certType.slice(0, 60)}, not a ${spec.certType}`);
  r.string('nonce');
  const keyStart = r.offset;
  const key = { type: spec.keyType, key: readKeyParts(spec.keyType, r) };
  // The certified key as a plain key: its type name, then the same parts.
  const typeName = Buffer.from(spec.keyType);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(typeName.length);
  const keyBlob = Buffer.concat([len, typeName, blob.subarray(keyStart, r.offset)]);
  const serial = r.uint64('serial');
  const type = r.uint32('certificate kind');
  const keyId = r.text('key id');
  const principalList = new WireReader(r.string('principals'));
  const principals: string[] = [];
  while (!principalList.done) principals.push(principalList.text('principal'));
  const validAfter = r.uint64('valid after');
  const validBefore = r.uint64('valid before');
  const critical = readNameDataList(r.string('critical options'), 'critical option');
  const extensions = new Set(readNameDataList(r.string('extensions'), 'extension').keys());
  r.string('reserved');
  const caBlob = r.string('signature key');
  const signedEnd = r.offset;
  const signature = r.string('signature');
  if (!r.done) throw new Error('trailing bytes after the signature');
  const ca = parseWirePublicKey(caBlob);
  const cert: Certificate = {
    blob, certType, key, keyBlob, serial, type, keyId, principals, validAfter, validBefore,
    unknownCriticalOptions: [...critical.keys()].filter((n) => !KNOWN_CRITICAL_OPTIONS.has(n)),
    extensions, caBlob, ca, signed: blob.subarray(0, signedEnd), signature,
  };
  const force = critical.get('force-command');
  if (force) cert.forceCommand = optionText(force, 'force-command');
  const source = critical.get('source-address');
  if (source) cert.sourceAddress = optionText(source, 'source-address');
  return cert;
}

/** The signature algorithms the client may make with this certificate's key when it logs in with `algo`. */
export function loginSignatureAlgorithms(algo: string): readonly string[] {
  return CERT_ALGORITHMS[algo]?.signature ?? [];
}

/** Whether the certificate's CA signed it (any SHA-2 signature its CA key can make; never ssh-rsa SHA-1). */
export function caSignatureValid(cert: Certificate): boolean {
  return verifyWireSignature(cert.ca, cert.signed, cert.signature, signatureAlgorithmsOf(cert.ca.type)) !== null;
}

/**
 * source-address: a comma-separated list of addresses and CIDR blocks, no
 * patterns or negation (OpenSSH's addr_match_cidr_list). A malformed list
 * refuses the certificate.
 */
export function compileSourceAddress(list: string): SourcePattern[] {
  return list.split(',').map((raw) => {
    const text = raw.trim();
    const [addr = '', bitsText, extra] = text.split('/');
    const family = isIP(addr) === 4 ? 'ipv4' : isIP(addr) === 6 ? 'ipv6' : null;
    if (!family || extra !== undefined) throw new Error(`source-address "${text.slice(0, 60)}" is not an address or CIDR block`);
    const max = family === 'ipv4' ? 32 : 128;
    const bits = bitsText === undefined ? max : /^\d{1,3}$/.test(bitsText) ? Number(bitsText) : NaN;
    if (!(bits >= 0 && bits <= max)) throw new Error(`source-address "${text.slice(0, 60)}": prefix length must be 0-${max}`);
    const subnet = new BlockList();
    subnet.addSubnet(addr, bits, family);
    return { text, negated: false, kind: 'cidr' as const, family, subnet };
  });
}

export interface CertificateChecks {
  /** Seconds since the epoch. */
  nowSeconds: number;
  /** Names one of which the certificate must list. */
  principals: readonly string[];
  /** The CA signature was verified already (the caller keeps verified certificates); it is not checked again. */
  caSignatureVerified?: boolean;
}

/**
 * Why this certificate may not log in, or null: a user certificate, signed
 * by its CA, valid now, for one of `principals`, with no critical option we
 * do not know. Trust in the CA, revocation and source-address are the
 * caller's (they depend on the account and the connection).
 */
export function certificateProblem(cert: Certificate, checks: CertificateChecks): string | null {
  if (cert.type !== USER_CERT) return cert.type === HOST_CERT ? 'a host certificate, not a user certificate' : `certificate of unknown kind ${cert.type}`;
  if (!checks.caSignatureVerified && !caSignatureValid(cert)) return 'the CA signature does not verify';
  const now = BigInt(Math.floor(checks.nowSeconds));
  if (now < cert.validAfter) return `not valid yet (valid from ${formatCertTime(cert.validAfter)})`;
  if (cert.validBefore !== FOREVER && now >= cert.validBefore) return `expired (valid until ${formatCertTime(cert.validBefore)})`;
  if (cert.unknownCriticalOptions.length > 0) return `unknown critical option ${JSON.stringify(cert.unknownCriticalOptions[0]!.slice(0, 40))}`;
  if (!cert.principals.some((p) => checks.principals.includes(p))) {
    return cert.principals.length === 0 ? 'the certificate lists no principals' : `no allowed principal among ${JSON.stringify(cert.principals.slice(0, 8).map((p) => p.slice(0, 40)))}`;
  }
  return null;
}

export function formatCertTime(t: bigint): string {
  if (t === FOREVER) return 'forever';
  const ms = Number(t) * 1000;
  return Number.isFinite(ms) && ms < 8.64e15 ? new Date(ms).toISOString() : String(t);
}
