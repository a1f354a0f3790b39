import { randomBytes } from 'node:crypto';
import argon2 from 'argon2';
import { ErrorCodes, VeshError } from '../errors.js';

/** OpenSSH refuses longer passwords too; it also bounds the work one attempt can ask of argon2. */
export const MAX_PASSWORD_BYTES = 1024;

export interface PasswordHashCost {
  /** KiB */
  memoryCost: number;
  timeCost: number;
  parallelism: number;
}

/**
 * Cost of new hashes: above OWASP's argon2id minimum (m=19456, t=2, p=1),
 * and node-argon2's defaults, which design.md shows. About 0.3 s on one
 * core of this machine.
 */
export const PASSWORD_HASH_COST: PasswordHashCost = { memoryCost: 65536, timeCost: 3, parallelism: 4 };

/** Why `password` cannot be used, or null when it can. Never echoes the password. */
export function passwordProblem(password: string): string | null {
  if (password.length === 0) return 'the password is empty';
  if (Buffer.byteLength(password, 'utf8') > MAX_PASSWORD_BYTES) return `the password is longer than ${MAX_PASSWORD_BYTES} bytes`;
  if (/[\r\n]/.test(password)) return 'the password holds a line break';
  return null;
}

/** An argon2id PHC string for `password`. Throws VeshError INVALID_ARGUMENT for an unusable password. */
export async function hashPassword(password: string, cost: PasswordHashCost = PASSWORD_HASH_COST): Promise<string> {
  const problem = passwordProblem(password);
  if (problem) throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `${problem}: choose another`);
  return argon2.hash(password, { type: argon2.argon2id, ...cost });
}

/**
 * Runs at most `max` tasks at once and queues at most `maxQueue` more.
 * argon2 hashes on libuv's thread pool, the same 4 threads that serve file
 * I/O: unbounded password checks would stall everything else.
 */
export class Semaphore {
  private active = 0;
  private readonly waiting: Array<() => void> = [];

  constructor(private readonly max: number, private readonly maxQueue: number = Infinity) {}

  /** Runs fn when a slot is free; returns null (without running it) when the queue is full. */
  async run<T>(fn: () => Promise<T>): Promise<{ value: T } | null> {
    if (this.active >= this.max) {
      if (this.waiting.length >= this.maxQueue) return null;
      await new Promise<void>((resolve) => this.waiting.push(resolve));
    } else {
      this.active++;
    }
    try {
      return { value: await fn() };
    } finally {
      // Hand the slot straight to the next waiter (active stays the same), or free it.
      const next = this.waiting.shift();
      if (next) next();
      else this.active--;
    }
  }

  get pending(): number {
    return this.waiting.length;
  }

  get running(): number {
    return this.active;
  }
}

/**
 * A Semaphore whose slots and queue are shared fairly between keys (here:
 * client sources). At most `max` tasks run at once, and one key never runs
 * more than `max - 1` of them (at least 1), so a slot is always left for
 * another source; each key may have at most `maxPerKey` tasks running or
 * waiting, and the whole queue holds at most `maxQueue`. A freed slot goes
 * to the first key in line that may run one more, which then goes to the
 * back of the line (round robin), so one source flooding the queue delays
 * another source's single check by at most one task per busy key, not by
 * its whole backlog (review M5: one source could fill the argon2 queue).
 */
export class FairSemaphore {
  private active = 0;
  private queued = 0;
  /** Keys with waiting tasks, in the order they will be served; each key's tasks in arrival order. */
  private readonly waiting = new Map<string, Array<() => void>>();
  /** Tasks running or waiting, per key. */
  private readonly perKey = new Map<string, number>();
  /** Tasks running, per key. */
  private readonly runningByKey = new Map<string, number>();
  private readonly maxRunningPerKey: number;

  constructor(private readonly max: number, private readonly maxPerKey: number, private readonly maxQueue: number = Infinity) {
    this.maxRunningPerKey = Math.max(1, max - 1);
  }

  /**
   * Runs fn when a slot is free and the key's turn comes; returns
   * `{ refused: 'key' }` when the key already has its share in, and
   * `{ refused: 'queue' }` when the queue is full (fn is not run).
   */
  async run<T>(key: string, fn: () => Promise<T>): Promise<{ value: T } | { refused: 'key' | 'queue' }> {
    const mine = this.perKey.get(key) ?? 0;
    if (mine >= this.maxPerKey) return { refused: 'key' };
    if (this.active < this.max && (this.runningByKey.get(key) ?? 0) < this.maxRunningPerKey) {
      this.perKey.set(key, mine + 1);
      this.start(key);
    } else {
      if (this.queued >= this.maxQueue) return { refused: 'queue' };
      this.perKey.set(key, mine + 1);
      this.queued++;
      // dispatch() starts it (counting it as running) when its turn comes.
      await new Promise<void>((resolve) => {
        const q = this.waiting.get(key);
        if (q) q.push(resolve);
        else this.waiting.set(key, [resolve]);
      });
    }
    try {
      return { value: await fn() };
    } finally {
      this.active--;
      const running = (this.runningByKey.get(key) ?? 1) - 1;
      if (running > 0) this.runningByKey.set(key, running);
      else this.runningByKey.delete(key);
      const left = (this.perKey.get(key) ?? 1) - 1;
      if (left > 0) this.perKey.set(key, left);
      else this.perKey.delete(key);
      this.dispatch();
    }
  }

  private start(key: string): void {
    this.active++;
    this.runningByKey.set(key, (this.runningByKey.get(key) ?? 0) + 1);
  }

  /** Fill free slots from the line: the first key that may run one more gets it and goes to the back. */
  private dispatch(): void {
    while (this.active < this.max) {
      let picked: string | null = null;
      for (const key of this.waiting.keys()) {
        if ((this.runningByKey.get(key) ?? 0) < this.maxRunningPerKey) {
          picked = key;
          break;
        }
      }
      if (picked === null) return;
      const q = this.waiting.get(picked)!;
      const next = q.shift()!;
      this.waiting.delete(picked);
      if (q.length > 0) this.waiting.set(picked, q);
      this.queued--;
      this.start(picked);
      next();
    }
  }

  get pending(): number {
    return this.queued;
  }

  get running(): number {
    return this.active;
  }
}

export type Argon2Variant = 'argon2id' | 'argon2i' | 'argon2d';

/** What decides how long one verify takes: the variant and the three cost parameters. */
export interface HashCostClass extends PasswordHashCost {
  variant: Argon2Variant;
}

/** OWASP's minimum for argon2id (m=19 MiB, t=2, p=1); weaker hashes are worth a warning. */
export const OWASP_MIN_COST: PasswordHashCost = { memoryCost: 19456, timeCost: 2, parallelism: 1 };

/** "argon2id:m=65536,t=3,p=4": one name per cost class, for maps and logs. */
export function costClassKey(c: HashCostClass): string {
  return `${c.variant}:m=${c.memoryCost},t=${c.timeCost},p=${c.parallelism}`;
}

/** The cost class of an argon2 PHC string (parameters in any order), or null if it is not one. */
export function costClassOf(phc: string): HashCostClass | null {
  const parts = phc.split('$');
  const variant = parts[1];
  if (parts[0] !== '' || (variant !== 'argon2id' && variant !== 'argon2i' && variant !== 'argon2d')) return null;
  const params = parts[parts[2]?.startsWith('v=') ? 3 : 2] ?? '';
  const get = (k: string): number | null => {
    const m = new RegExp(`(?:^|,)${k}=(\\d{1,10})(?:,|$)`).exec(params);
    return m ? Number(m[1]) : null;
  };
  const memoryCost = get('m');
  const timeCost = get('t');
  const parallelism = get('p');
  if (memoryCost === null || timeCost === null || parallelism === null) return null;
  return { variant, memoryCost, timeCost, parallelism };
}

const ARGON2_TYPES: Record<Argon2Variant, 0 | 1 | 2> = { argon2d: 0, argon2i: 1, argon2id: 2 };

/** A hash of a random password in exactly this cost class: what unknown accounts are checked against. */
export function dummyHashOf(c: HashCostClass): Promise<string> {
  return argon2.hash(randomBytes(18).toString('base64'), {
    type: ARGON2_TYPES[c.variant], memoryCost: c.memoryCost, timeCost: c.timeCost, parallelism: c.parallelism,
  });
}
