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
