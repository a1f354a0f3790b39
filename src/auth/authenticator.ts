import { createHash, createHmac, createPublicKey, randomBytes, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import argon2 from 'argon2';
import ssh2, { type ParsedKey } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import { keyFingerprint, type Account, type AcceptedKeyType, type AuthorizedKey } from '../config/accounts.js';
import type { AccountSource } from '../config/accounts-store.js';
import { errorMessage } from '../errors.js';
import type { PasswordResult, SshAuthenticator } from '../ssh/ports.js';
import {
  costClassKey, costClassOf, dummyHashOf, FairSemaphore, MAX_PASSWORD_BYTES, OWASP_MIN_COST, PASSWORD_HASH_COST,
  type HashCostClass, type PasswordHashCost,
} from './passwords.js';
import { SourcePenalties, type PenaltyConfig } from './penalties.js';
import { sourceAllowed, sourceBlock } from './source-match.js';
import {
  caSignatureValid, certificateProblem, compileSourceAddress, formatCertTime, isCertificateAlgorithm, loginSignatureAlgorithms, parseCertificate, type Certificate,
} from './certificates.js';
import { parseKeyLines, parseRevokedKeys, revocationOf, WatchedListFile, type RevokedKeys } from './key-lists.js';
import { verifyWireSignature, type WirePublicKey } from './ssh-wire.js';

/** A key's public KeyObject, made at its first check (keys are parsed anew when accounts.yaml changes). */
const publicKeyObjects = new WeakMap<AuthorizedKey['publicKey'], KeyObject>();
/** The certified key and the signature algorithms allowed, of each key a certificate login made. */
const certificateKeys = new WeakMap<AuthorizedKey, { key: WirePublicKey; algorithms: readonly string[] }>();
/**
 * Certificates whose CA signature verified, kept by algorithm and blob
 * hash: a login checks its certificate twice (the query, then the signed
 * request), and parsing it with its CA signature check is most of what a
 * certificate costs the broker's one event loop. Only what cannot change is
 * kept; trust, validity, principals and revocation are checked every time.
 */
const VERIFIED_CERTIFICATES_KEPT = 256;

/** The hash ssh2 verifies with when the client names none (its keyParser's default per key type). */
const VERIFY_DEFAULT_HASH: Record<string, string | null> = {
  'ssh-ed25519': null,
  'ssh-rsa': 'sha1',
  'ecdsa-sha2-nistp256': 'sha256',
  'ecdsa-sha2-nistp384': 'sha384',
  'ecdsa-sha2-nistp521': 'sha512',
};

export { hashPassword } from './passwords.js';

/** vesh.yaml's auth settings the authenticator uses. */
export interface AuthSettings {
  penalties: PenaltyConfig;
  /** TrustedUserCAKeys: key lines, or a file of them. */
  trustedUserCAKeys?: { lines: string[] } | { file: string } | null;
  /** RevokedKeys file. */
  revokedKeys?: string | null;
}

export interface AuthenticatorOptions {
  /** argon2 operations at once (libuv has 4 threads, shared with file I/O). */
  maxConcurrentHashes?: number;
  /** Password checks waiting for a slot before further ones fail at once. */
  maxQueuedHashes?: number;
  /**
   * Password checks one source (sourceBlock) may have running or waiting at
   * once; more fail at once, so one source cannot fill the queue.
   */
  maxHashesPerSource?: number;
  /** Cost of the dummy hash for unknown accounts while no account has a password hash: that of new hashes. */
  dummyHashCost?: PasswordHashCost;
  /**
   * Key that decides which cost class an unknown user name is checked in.
   * Keep it stable across restarts (serve derives it from the host key), so
   * a name's answer time does not change when the server restarts; random
   * when not given.
   */
  dummySecret?: Buffer;
  /** Sources remembered for penalties. */
  maxSources?: number;
  /** Clock, for tests. */
  now?: () => number;
}

/** rsa-sha2-* are signature algorithms of ssh-rsa keys. */
function keyTypeOf(algo: string): string {
  return algo === 'rsa-sha2-256' || algo === 'rsa-sha2-512' ? 'ssh-rsa' : algo;
}

const QUEUE_FULL_LOG_INTERVAL_MS = 10_000;

/**
 * Cost classes beyond these are not copied for dummy checks: a hash with an
 * absurd cost (a typo in a hand-made PHC string) would otherwise make every
 * unknown name cost that much too. Its own account still verifies.
 */
const MAX_DUMMY_COST = { memoryCost: 1024 * 1024, timeCost: 64, parallelism: 64 } as const;

/** What accounts.yaml's password hashes look like right now: how many of each cost class. */
interface CostCensus {
  /** The account objects it was made from: a reload makes new ones, so a changed list is seen without comparing contents. */
  accounts: readonly Account[];
  /** Cost classes in a fixed order, with how many accounts use each. */
  classes: Array<{ cls: HashCostClass; key: string; count: number }>;
  total: number;
}

/** An AccountSource that can also list its accounts (AccountsStore can). */
type ListableSource = AccountSource & { list?: () => Account[] };

/**
 * Decides who gets in: passwords (argon2), public keys (authorized_keys
 * lines with their from= restriction) and per-source penalties. The SSH
 * layer asks through SshAuthenticator (src/ssh/ports.ts) and does the
 * auditing; this class logs only what the SSH layer cannot know (a penalty
 * starting, a key refused for its source, an unusable hash). Passwords never
 * reach a log line.
 */
export class Authenticator implements SshAuthenticator<Account, AuthorizedKey> {
  private readonly log: Logger;
  private readonly hashes: FairSemaphore;
  private readonly penalties: SourcePenalties;
  private readonly now: () => number;
  private readonly fallbackClass: HashCostClass;
  private readonly dummySecret: Buffer;
  /** One dummy hash per cost class, made once and kept. */
  private readonly dummies = new Map<string, Promise<string>>();
  private census: CostCensus = { accounts: [], classes: [], total: 0 };
  /** Hashes already warned about (below OWASP's minimum), so each is logged once. */
  private readonly weakWarned = new Set<string>();
  private queueFullLoggedAt = -Infinity;
  private shareFullLoggedAt = -Infinity;
  /** Trusted CA key blobs from vesh.yaml lines, or the file they are read from. */
  private readonly trustedCas: { blobs: Buffer[] } | WatchedListFile<Buffer[]> | null;
  private readonly revoked: WatchedListFile<RevokedKeys> | null;
  /** Errors of those files already logged, so a broken file is logged once per change, not at every login. */
  private readonly listErrorsLogged = new Set<string>();
  /** See VERIFIED_CERTIFICATES_KEPT; oldest first. */
  private readonly verifiedCertificates = new Map<string, { cert: Certificate; publicKey: ParsedKey }>();

  constructor(
    private readonly accounts: ListableSource,
    auth: AuthSettings,
    logger: Logger,
    opts: AuthenticatorOptions = {},
  ) {
    this.log = logger.child({ component: 'auth' });
    this.now = opts.now ?? Date.now;
    this.hashes = new FairSemaphore(opts.maxConcurrentHashes ?? 2, opts.maxHashesPerSource ?? 2, opts.maxQueuedHashes ?? 1000);
    this.penalties = new SourcePenalties(auth.penalties, { maxSources: opts.maxSources, now: this.now });
    this.fallbackClass = { variant: 'argon2id', ...(opts.dummyHashCost ?? PASSWORD_HASH_COST) };
    this.dummySecret = opts.dummySecret ?? randomBytes(32);
    const cas = auth.trustedUserCAKeys;
    this.trustedCas = !cas ? null : 'file' in cas ? new WatchedListFile(cas.file, parseKeyLines) : { blobs: parseKeyLines(cas.lines.join('\n')) };
    this.revoked = auth.revokedKeys ? new WatchedListFile(auth.revokedKeys, parseRevokedKeys) : null;
    // Made up front, so that even the first attempt on an unknown account
    // costs one verify, like a known one.
    void this.dummyOf(this.fallbackClass);
    this.takeCensus();
  }

  /**
   * Checks `password` for `user`, in the time a check of that account's hash
   * takes, whatever the outcome, so the answer time says nothing about
   * whether the account exists:
   * - a known account with a hash: its own hash (wrong or right password);
   *   when locked or the password is over MAX_PASSWORD_BYTES, a dummy hash
   *   of its hash's cost class instead (the right password of a locked
   *   account is never checked);
   * - an unknown account, or one without a password: a dummy hash in a cost
   *   class drawn, per user name, from the classes the accounts' hashes are
   *   in, weighted by how many accounts use each. A name's class is fixed
   *   (a keyed hash of the name picks it), so asking again tells nothing,
   *   and across names unknown ones answer like the real population: with
   *   every hash at the same cost (the usual case) they are exactly alike.
   *
   * Re-hashing old hashes at login (OpenSSH-style "upgrade on success") would
   * not do: an attacker enumerates accounts that do not log in, and the
   * network-facing server would have to rewrite accounts.yaml.
   */
  async verifyPassword(user: string, password: string, source: string): Promise<PasswordResult<Account>> {
    this.takeCensus();
    const account = this.accounts.get(user);
    const hash = account?.password;
    const tooLong = Buffer.byteLength(password, 'utf8') > MAX_PASSWORD_BYTES;
    const checked = tooLong ? password.slice(0, MAX_PASSWORD_BYTES) : password;
    if (hash === undefined) {
      await this.verifyDummy(this.classForName(user), checked, source);
      return { ok: false };
    }
    const own = costClassOf(hash);
    if (account!.locked || tooLong) {
      await this.verifyDummy(own && this.dummyAllowed(own) ? own : this.classForName(user), checked, source);
      return { ok: false };
    }
    let ok = false;
    try {
      ok = (await this.limited(source, () => argon2.verify(hash, password))) === true;
    } catch (err) {
      this.log.error({ event: 'auth.bad_hash', account: user, err: errorMessage(err) }, `the password hash of ${user} cannot be checked: set it again with vesh user passwd ${user}`);
      // An unusable hash fails fast; spend the time a check would have taken.
      await this.verifyDummy(own && this.dummyAllowed(own) ? own : this.classForName(user), checked, source).catch(() => undefined);
      return { ok: false };
    }
    if (!ok) return { ok: false };
    // The accounts may have been reloaded while argon2 ran: a lock or a new
    // password applies to a check that was already under way.
    const now = this.accounts.get(user);
    if (!now || now.locked || now.password !== hash) return { ok: false };
    return { ok: true, account: now };
  }

  /** The cost class an unknown name is checked in (see verifyPassword). */
  classForName(user: string): HashCostClass {
    const { classes, total } = this.census;
    if (total === 0) return this.fallbackClass;
    const pick = createHmac('sha256', this.dummySecret).update(user).digest().readUInt32BE(0) % total;
    let acc = 0;
    for (const c of classes) {
      acc += c.count;
      if (pick < acc) return c.cls;
    }
    return classes[classes.length - 1]!.cls;
  }

  private async verifyDummy(cls: HashCostClass, password: string, source: string): Promise<void> {
    const dummy = await this.dummyOf(cls);
    await this.limited(source, () => argon2.verify(dummy, password));
  }

  private dummyOf(cls: HashCostClass): Promise<string> {
    const key = costClassKey(cls);
    let dummy = this.dummies.get(key);
    if (!dummy) {
      dummy = dummyHashOf(cls);
      dummy.catch((err: unknown) => {
        this.log.error({ event: 'auth.dummy_hash_failed', costClass: key, err: errorMessage(err) });
        // Try again next time rather than failing every later check.
        this.dummies.delete(key);
      });
      this.dummies.set(key, dummy);
    }
    return dummy;
  }

  private dummyAllowed(c: HashCostClass): boolean {
    return c.memoryCost <= MAX_DUMMY_COST.memoryCost && c.timeCost <= MAX_DUMMY_COST.timeCost && c.parallelism <= MAX_DUMMY_COST.parallelism;
  }

  /**
   * Count the accounts' hashes by cost class, when the accounts changed
   * since the last count, and start making a dummy for every class, so a
   * check never waits for one to be made (except the first check right
   * after a reload brought a class in).
   */
  private takeCensus(): void {
    const list = this.accounts.list?.();
    if (!list) return;
    const prev = this.census.accounts;
    if (list.length === prev.length && list.every((a, i) => a === prev[i])) return;
    const byKey = new Map<string, { cls: HashCostClass; key: string; count: number }>();
    for (const a of list) {
      if (a.password === undefined) continue;
      const cls = costClassOf(a.password);
      if (!cls) continue;
      this.warnIfWeak(a.name, a.password, cls);
      if (!this.dummyAllowed(cls)) continue;
      const key = costClassKey(cls);
      const entry = byKey.get(key) ?? { cls, key, count: 0 };
      entry.count += 1;
      byKey.set(key, entry);
    }
    const classes = [...byKey.values()].sort((x, y) => (x.key < y.key ? -1 : x.key > y.key ? 1 : 0));
    this.census = { accounts: list, classes, total: classes.reduce((n, c) => n + c.count, 0) };
    for (const c of classes) void this.dummyOf(c.cls);
  }

  private warnIfWeak(account: string, hash: string, c: HashCostClass): void {
    if (this.weakWarned.has(hash)) return;
    if (c.variant === 'argon2id' && c.memoryCost >= OWASP_MIN_COST.memoryCost && c.timeCost >= OWASP_MIN_COST.timeCost) return;
    this.weakWarned.add(hash);
    this.log.warn({ event: 'auth.weak_hash', account, costClass: costClassKey(c) }, `the password hash of ${account} is weaker than OWASP's argon2id minimum (m=19456,t=2): set it again with vesh user passwd ${account}`);
  }

  findAccount(name: string): Account | null {
    const account = this.accounts.get(name);
    return account && !account.locked ? account : null;
  }

  findKey(user: string, algo: string, blob: Buffer, source: string): { account: Account; key: AuthorizedKey } | null {
    const account = this.accounts.get(user);
    if (!account || account.locked) return null;
    if (isCertificateAlgorithm(algo)) return this.findCertificate(account, algo, blob, source);
    const type = keyTypeOf(algo);
    // A cert-authority line lets in certificates its key signed, never that key itself (as OpenSSH).
    const key = account.keys.find((k) => !k.options.certAuthority && k.algo === type && k.blob.equals(blob));
    if (!key) return null;
    if (!sourceAllowed(key.sources, source)) {
      this.log.info({ event: 'auth.key_source_refused', account: user, fingerprint: key.fingerprint, source, from: key.options.from }, `key ${key.fingerprint} of ${user} is not allowed from ${source}`);
      return null;
    }
    if (key.options.expiresAt !== undefined && this.now() >= key.options.expiresAt) {
      this.log.info({ event: 'auth.key_expired', account: user, fingerprint: key.fingerprint, expiredAt: new Date(key.options.expiresAt).toISOString() }, `key ${key.fingerprint} of ${user} expired (expiry-time): refused`);
      return null;
    }
    const revoked = this.revocation(blob);
    if (revoked) {
      this.log.warn({ event: 'auth.key_revoked', account: user, fingerprint: key.fingerprint, source, reason: revoked }, `key ${key.fingerprint} of ${user} refused: ${revoked}`);
      return null;
    }
    return { account, key };
  }

  /** Why `key` (and its certificate) may not log in by auth.revokedKeys, or null; a list that cannot be read refuses every key. */
  private revocation(key: Buffer, cert?: Certificate): string | null {
    if (!this.revoked) return null;
    const list = this.revoked.current();
    if (!list.ok) {
      this.logListError('auth.revoked_keys_unusable', list.error, 'auth.revokedKeys cannot be used, so every key login is refused until it is fixed');
      return 'the revoked keys list (auth.revokedKeys) cannot be read';
    }
    return revocationOf(list.list, key, cert);
  }

  private trustedCaBlobs(): Buffer[] {
    if (!this.trustedCas) return [];
    if ('blobs' in this.trustedCas) return this.trustedCas.blobs;
    const list = this.trustedCas.current();
    if (list.ok) return list.list;
    this.logListError('auth.trusted_ca_unusable', list.error, 'auth.trustedUserCAKeys cannot be used, so its CAs are not trusted until it is fixed');
    return [];
  }

  private logListError(event: string, error: string, consequence: string): void {
    if (this.listErrorsLogged.has(error)) return;
    if (this.listErrorsLogged.size > 100) this.listErrorsLogged.clear();
    this.listErrorsLogged.add(error);
    this.log.error({ event, err: error }, `${error}: ${consequence}`);
  }

  /**
   * A user certificate logging in to `account`: parsed here (the worker only
   * relays the bytes), signed by a CA the account trusts (one of its
   * cert-authority lines, whose principals= and options then apply, or one
   * of auth.trustedUserCAKeys, for which the certificate must list the
   * account name), valid now, not revoked, from an allowed source. Returns
   * a key whose options are those of the line merged with the
   * certificate's (force-command, permit-* extensions), as OpenSSH merges
   * them; null, with the reason logged, when it may not log in.
   */
  private findCertificate(account: Account, algo: string, blob: Buffer, source: string): { account: Account; key: AuthorizedKey } | null {
    const refuse = (reason: string, cert?: Certificate): null => {
      this.log.info({
        event: 'auth.certificate_refused', account: account.name, source, reason, algo,
        ...(cert ? { keyId: cert.keyId, serial: String(cert.serial), fingerprint: keyFingerprint(cert.keyBlob), ca: keyFingerprint(cert.caBlob) } : {}),
      }, `certificate for ${account.name} refused: ${reason}`);
      return null;
    };
    const cacheKey = `${algo} ${createHash('sha256').update(blob).digest('base64')}`;
    const known = this.verifiedCertificates.get(cacheKey);
    let cert: Certificate;
    try {
      cert = known?.cert ?? parseCertificate(algo, blob);
    } catch (err) {
      return refuse(`malformed certificate: ${errorMessage(err)}`);
    }
    const lines = account.keys.filter((k) => k.options.certAuthority && k.blob.equals(cert.caBlob));
    const global = this.trustedCaBlobs().some((b) => b.equals(cert.caBlob));
    if (lines.length === 0 && !global) return refuse('its CA is not trusted for this account', cert);
    if (!known && !caSignatureValid(cert)) return refuse('the CA signature does not verify', cert);
    const nowSeconds = this.now() / 1000;
    const problems: string[] = [];
    // The account's own lines first (their principals= may differ from the name), then vesh.yaml's CAs.
    const candidates: Array<AuthorizedKey | null> = [...lines, ...(global ? [null] : [])];
    let chosen: AuthorizedKey | null | undefined;
    for (const line of candidates) {
      const problem = certificateProblem(cert, { nowSeconds, principals: line?.options.principals ?? [account.name], caSignatureVerified: true })
        ?? (line && !sourceAllowed(line.sources, source) ? `the cert-authority line's from= does not allow ${source}` : null)
        ?? (line?.options.expiresAt !== undefined && this.now() >= line.options.expiresAt ? 'the cert-authority line expired (expiry-time)' : null)
        ?? (line?.options.command !== undefined && cert.forceCommand !== undefined && line.options.command !== cert.forceCommand ? 'its force-command differs from the cert-authority line\'s command=' : null);
      if (problem === null) {
        chosen = line;
        break;
      }
      problems.push(problem);
    }
    if (chosen === undefined) return refuse([...new Set(problems)].join('; '), cert);
    if (cert.sourceAddress !== undefined) {
      let allowed: boolean;
      try {
        allowed = sourceAllowed(compileSourceAddress(cert.sourceAddress), source);
      } catch (err) {
        return refuse(errorMessage(err), cert);
      }
      if (!allowed) return refuse(`source-address ${cert.sourceAddress} does not allow ${source}`, cert);
    }
    const revoked = this.revocation(cert.keyBlob, cert);
    if (revoked) return refuse(revoked, cert);
    let publicKey: ParsedKey;
    if (known) {
      publicKey = known.publicKey;
    } else {
      const parsed = ssh2.utils.parseKey(`${cert.key.type} ${cert.keyBlob.toString('base64')}`);
      const first: ParsedKey | Error | undefined = Array.isArray(parsed) ? parsed[0] : parsed;
      if (!first || first instanceof Error) return refuse('its key cannot be read');
      publicKey = first;
      if (this.verifiedCertificates.size >= VERIFIED_CERTIFICATES_KEPT) this.verifiedCertificates.delete(this.verifiedCertificates.keys().next().value!);
      this.verifiedCertificates.set(cacheKey, { cert, publicKey });
    }
    const base = chosen?.options;
    const ext = cert.extensions;
    const key: AuthorizedKey = {
      algo: cert.key.type as AcceptedKeyType,
      blob,
      fingerprint: keyFingerprint(cert.keyBlob),
      comment: `certificate ${cert.keyId}`,
      options: {
        ...(base ?? {}),
        certAuthority: false,
        principals: undefined,
        command: cert.forceCommand ?? base?.command,
        // Extensions grant; absent means not permitted, as in OpenSSH.
        noPty: !!base?.noPty || !ext.has('permit-pty'),
        noPortForwarding: !!base?.noPortForwarding || !ext.has('permit-port-forwarding'),
        noAgentForwarding: !!base?.noAgentForwarding || !ext.has('permit-agent-forwarding'),
      },
      publicKey,
      certificate: { keyId: cert.keyId, serial: String(cert.serial), caFingerprint: keyFingerprint(cert.caBlob), extensions: ext },
    };
    certificateKeys.set(key, { key: cert.key, algorithms: loginSignatureAlgorithms(algo) });
    this.log.debug({ event: 'auth.certificate_accepted', account: account.name, keyId: cert.keyId, serial: String(cert.serial), ca: key.certificate!.caFingerprint, via: chosen ? 'cert-authority' : 'trustedUserCAKeys', validBefore: formatCertTime(cert.validBefore) });
    return { account, key };
  }

  verifySignature(key: AuthorizedKey, data: Buffer, signature: Buffer, hashAlgo?: string): boolean {
    const cert = certificateKeys.get(key);
    // A certificate login's signature arrives in SSH wire form (ssh2 leaves it so for *-cert algorithms).
    if (cert) return verifyWireSignature(cert.key, data, signature, cert.algorithms) !== null;
    // ssh-rsa with SHA-1 signatures: OpenSSH stopped accepting them in 8.8.
    if (key.algo === 'ssh-rsa' && hashAlgo !== 'sha256' && hashAlgo !== 'sha512') return false;
    try {
      // What ssh2's ParsedKey.verify does, from a KeyObject made once per key:
      // ssh2 hands OpenSSL the key's PEM text to decode at every check
      // (251 µs against 126 µs per ed25519 check here, once per key login).
      let pub = publicKeyObjects.get(key.publicKey);
      if (!pub) {
        pub = createPublicKey(key.publicKey.getPublicPEM());
        publicKeyObjects.set(key.publicKey, pub);
      }
      return cryptoVerify(hashAlgo || (VERIFY_DEFAULT_HASH[key.algo] ?? null), data, pub, signature);
    } catch {
      return false;
    }
  }

  penaltyRemaining(source: string, account?: string): number {
    return this.penalties.remaining(source, account);
  }

  /** Penalties now in force, for the metrics endpoint. */
  penaltiesInForce(): { sources: number; accounts: number } {
    return this.penalties.inForce();
  }

  recordFailure(source: string, account?: string): void {
    for (const p of this.penalties.recordFailure(source, account)) {
      if (p.scope.kind === 'source') {
        this.log.warn({ event: 'auth.penalty', source, scope: 'source', penaltyMs: p.ms }, `source ${source} must wait ${p.ms} ms after repeated failures: its connections are refused meanwhile`);
      } else {
        this.log.warn({ event: 'auth.penalty', source, scope: 'account', account: p.scope.account, penaltyMs: p.ms }, `source ${source} must wait ${p.ms} ms before trying account ${p.scope.account} again, after repeated failures`);
      }
    }
  }

  recordSuccess(source: string, account: string): void {
    this.penalties.recordSuccess(source, account);
  }

  /**
   * Runs an argon2 operation under the concurrency cap, in `source`'s turn;
   * a full queue, or a source that already has its share in, counts as a
   * failed check (and costs no hashing).
   */
  private async limited(source: string, op: () => Promise<boolean>): Promise<boolean> {
    const res = await this.hashes.run(sourceBlock(source), op);
    if ('value' in res) return res.value;
    const now = this.now();
    if (res.refused === 'queue') {
      if (now - this.queueFullLoggedAt >= QUEUE_FULL_LOG_INTERVAL_MS) {
        this.queueFullLoggedAt = now;
        this.log.warn({ event: 'auth.hash_queue_full', pending: this.hashes.pending }, 'too many password checks waiting: failing new ones at once');
      }
    } else if (now - this.shareFullLoggedAt >= QUEUE_FULL_LOG_INTERVAL_MS) {
      this.shareFullLoggedAt = now;
      this.log.warn({ event: 'auth.hash_share_full', source }, `source ${source} already has its share of password checks under way: failing its further ones at once`);
    }
    return false;
  }
}
