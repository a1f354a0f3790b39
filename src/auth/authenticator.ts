import { createHmac, createPublicKey, randomBytes, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import argon2 from 'argon2';
import type { Logger } from '../audit/logger.js';
import type { Account, AuthorizedKey } from '../config/accounts.js';
import type { AccountSource } from '../config/accounts-store.js';
import { errorMessage } from '../errors.js';
import type { PasswordResult, SshAuthenticator } from '../ssh/ports.js';
import {
  costClassKey, costClassOf, dummyHashOf, FairSemaphore, MAX_PASSWORD_BYTES, OWASP_MIN_COST, PASSWORD_HASH_COST,
  type HashCostClass, type PasswordHashCost,
} from './passwords.js';
import { SourcePenalties, type PenaltyConfig } from './penalties.js';
import { sourceAllowed, sourceBlock } from './source-match.js';

/** A key's public KeyObject, made at its first check (keys are parsed anew when accounts.yaml changes). */
const publicKeyObjects = new WeakMap<AuthorizedKey['publicKey'], KeyObject>();
/** The hash ssh2 verifies with when the client names none (its keyParser's default per key type). */
const VERIFY_DEFAULT_HASH: Record<string, string | null> = {
  'ssh-ed25519': null,
  'ssh-rsa': 'sha1',
  'ecdsa-sha2-nistp256': 'sha256',
  'ecdsa-sha2-nistp384': 'sha384',
  'ecdsa-sha2-nistp521': 'sha512',
};

export { hashPassword } from './passwords.js';

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

  constructor(
    private readonly accounts: ListableSource,
    auth: { penalties: PenaltyConfig },
    logger: Logger,
    opts: AuthenticatorOptions = {},
  ) {
    this.log = logger.child({ component: 'auth' });
    this.now = opts.now ?? Date.now;
    this.hashes = new FairSemaphore(opts.maxConcurrentHashes ?? 2, opts.maxHashesPerSource ?? 2, opts.maxQueuedHashes ?? 1000);
    this.penalties = new SourcePenalties(auth.penalties, { maxSources: opts.maxSources, now: this.now });
    this.fallbackClass = { variant: 'argon2id', ...(opts.dummyHashCost ?? PASSWORD_HASH_COST) };
    this.dummySecret = opts.dummySecret ?? randomBytes(32);
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
