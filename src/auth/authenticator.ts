import { randomBytes } from 'node:crypto';
import argon2 from 'argon2';
import type { Logger } from '../audit/logger.js';
import type { Account, AuthorizedKey } from '../config/accounts.js';
import type { AccountSource } from '../config/accounts-store.js';
import { errorMessage } from '../errors.js';
import type { PasswordResult, SshAuthenticator } from '../ssh/ports.js';
import { hashPassword, MAX_PASSWORD_BYTES, PASSWORD_HASH_COST, Semaphore, type PasswordHashCost } from './passwords.js';
import { SourcePenalties, type PenaltyConfig } from './penalties.js';
import { sourceAllowed } from './source-match.js';

export { hashPassword } from './passwords.js';

export interface AuthenticatorOptions {
  /** argon2 operations at once (libuv has 4 threads, shared with file I/O). */
  maxConcurrentHashes?: number;
  /** Password checks waiting for a slot before further ones fail at once. */
  maxQueuedHashes?: number;
  /** Cost of the dummy hash checked for unknown accounts: that of new hashes. */
  dummyHashCost?: PasswordHashCost;
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
 * Decides who gets in: passwords (argon2), public keys (authorized_keys
 * lines with their from= restriction) and per-source penalties. The SSH
 * layer asks through SshAuthenticator (src/ssh/ports.ts) and does the
 * auditing; this class logs only what the SSH layer cannot know (a penalty
 * starting, a key refused for its source, an unusable hash). Passwords never
 * reach a log line.
 */
export class Authenticator implements SshAuthenticator<Account, AuthorizedKey> {
  private readonly log: Logger;
  private readonly hashes: Semaphore;
  private readonly penalties: SourcePenalties;
  private readonly dummyHash: Promise<string>;
  private readonly now: () => number;
  private queueFullLoggedAt = -Infinity;

  constructor(
    private readonly accounts: AccountSource,
    auth: { penalties: PenaltyConfig },
    logger: Logger,
    opts: AuthenticatorOptions = {},
  ) {
    this.log = logger.child({ component: 'auth' });
    this.now = opts.now ?? Date.now;
    this.hashes = new Semaphore(opts.maxConcurrentHashes ?? 2, opts.maxQueuedHashes ?? 1000);
    this.penalties = new SourcePenalties(auth.penalties, { maxSources: opts.maxSources, now: this.now });
    // Made once, up front, so that even the first attempt on an unknown
    // account costs one verify, like a known one.
    this.dummyHash = hashPassword(randomBytes(18).toString('base64'), opts.dummyHashCost ?? PASSWORD_HASH_COST);
    this.dummyHash.catch((err: unknown) => this.log.error({ event: 'auth.dummy_hash_failed', err: errorMessage(err) }));
  }

  /**
   * Checks `password` for `user`. Unknown, locked and password-less accounts,
   * and passwords over MAX_PASSWORD_BYTES, are checked against a dummy hash
   * of the same cost, so the answer takes as long as a real check.
   */
  async verifyPassword(user: string, password: string, _source: string): Promise<PasswordResult<Account>> {
    const account = this.accounts.get(user);
    const hash = account && !account.locked ? account.password : undefined;
    const tooLong = Buffer.byteLength(password, 'utf8') > MAX_PASSWORD_BYTES;
    if (hash === undefined || tooLong) {
      const dummy = await this.dummyHash;
      await this.limited(() => argon2.verify(dummy, tooLong ? password.slice(0, MAX_PASSWORD_BYTES) : password));
      return { ok: false };
    }
    let ok = false;
    try {
      ok = (await this.limited(() => argon2.verify(hash, password))) === true;
    } catch (err) {
      this.log.error({ event: 'auth.bad_hash', account: user, err: errorMessage(err) }, `the password hash of ${user} cannot be checked: set it again with vesh user passwd ${user}`);
      return { ok: false };
    }
    if (!ok) return { ok: false };
    // The accounts may have been reloaded while argon2 ran: a lock or a new
    // password applies to a check that was already under way.
    const now = this.accounts.get(user);
    if (!now || now.locked || now.password !== hash) return { ok: false };
    return { ok: true, account: now };
  }

  findKey(user: string, algo: string, blob: Buffer, source: string): { account: Account; key: AuthorizedKey } | null {
    const account = this.accounts.get(user);
    if (!account || account.locked) return null;
    const type = keyTypeOf(algo);
    const key = account.keys.find((k) => k.algo === type && k.blob.equals(blob));
    if (!key) return null;
    if (!sourceAllowed(key.sources, source)) {
      this.log.info({ event: 'auth.key_source_refused', account: user, fingerprint: key.fingerprint, source, from: key.options.from }, `key ${key.fingerprint} of ${user} is not allowed from ${source}`);
      return null;
    }
    return { account, key };
  }

  verifySignature(key: AuthorizedKey, data: Buffer, signature: Buffer, hashAlgo?: string): boolean {
    // ssh-rsa with SHA-1 signatures: OpenSSH stopped accepting them in 8.8.
    if (key.algo === 'ssh-rsa' && hashAlgo !== 'sha256' && hashAlgo !== 'sha512') return false;
    try {
      return key.publicKey.verify(data, signature, hashAlgo) === true;
    } catch {
      return false;
    }
  }

  penaltyRemaining(source: string): number {
    return this.penalties.remaining(source);
  }

  recordFailure(source: string): void {
    const started = this.penalties.recordFailure(source);
    if (started > 0) this.log.warn({ event: 'auth.penalty', source, penaltyMs: started }, `source ${source} must wait ${started} ms after repeated failures`);
  }

  recordSuccess(source: string): void {
    this.penalties.recordSuccess(source);
  }

  /** Runs an argon2 operation under the concurrency cap; a full queue counts as a failed check. */
  private async limited(op: () => Promise<boolean>): Promise<boolean> {
    const res = await this.hashes.run(op);
    if (res) return res.value;
    const now = this.now();
    if (now - this.queueFullLoggedAt >= QUEUE_FULL_LOG_INTERVAL_MS) {
      this.queueFullLoggedAt = now;
      this.log.warn({ event: 'auth.hash_queue_full', pending: this.hashes.pending }, 'too many password checks waiting: failing new ones at once');
    }
    return false;
  }
}
