import { sourceBlock } from './source-match.js';

export interface PenaltyConfig {
  /** Failures from one source against one account before that pair is made to wait. */
  failuresBeforePenalty: number;
  /**
   * Failures from one source in all (against any account, plus connections
   * that never logged in) before the whole source is made to wait. Defaults
   * to failuresBeforePenalty.
   */
  sourceFailuresBeforePenalty?: number;
  /** First wait, ms; each further failure doubles it. */
  penaltyMs: number;
  /** Longest wait, ms. */
  maxPenaltyMs: number;
}

/** Who a penalty applies to: a whole source, or one source's attempts at one account. */
export type PenaltyScope = { kind: 'source' } | { kind: 'account'; account: string };

export interface PenaltyStarted {
  scope: PenaltyScope;
  ms: number;
}

interface Counter {
  failures: number;
  /** Current penalty length, ms (0 = none yet). */
  penaltyMs: number;
  /** Clock value until which the source (or pair) must wait. */
  until: number;
  lastFailure: number;
}

/** A source quiet for this long after its penalty ended starts again from zero. */
const MIN_FORGET_MS = 15 * 60_000;

/**
 * Per-source failure counts and penalties, in the manner of OpenSSH's
 * PerSourcePenalties, kept at two levels:
 *
 * - per (source, account): after `failuresBeforePenalty` failures against
 *   one account, that source's attempts at that account wait; a successful
 *   login to the account from the source clears this counter only;
 * - per source: every failure counts, whatever account it aimed at, and so
 *   does every connection that never logged in; after
 *   `sourceFailuresBeforePenalty` the whole source waits (it is refused at
 *   accept). A success never clears it: otherwise one good login to an
 *   attacker's own account would wipe the failures aimed at a victim's
 *   (review M5). It is forgotten after a quiet spell instead.
 *
 * Each further failure doubles the wait up to `maxPenaltyMs`. A source is an
 * IPv4 address or an IPv6 /64 (sourceBlock), so a host cannot escape its
 * penalty by moving within its prefix. The table is bounded: past
 * `maxSources` entries the one that failed longest ago is forgotten first.
 */
export class SourcePenalties {
  private readonly table = new Map<string, Counter>();
  private readonly maxSources: number;
  private readonly now: () => number;
  private readonly forgetMs: number;
  private readonly sourceThreshold: number;

  constructor(private readonly cfg: PenaltyConfig, opts: { maxSources?: number; now?: () => number } = {}) {
    this.maxSources = opts.maxSources ?? 10_000;
    this.now = opts.now ?? Date.now;
    this.forgetMs = Math.max(cfg.maxPenaltyMs, MIN_FORGET_MS);
    this.sourceThreshold = cfg.sourceFailuresBeforePenalty ?? cfg.failuresBeforePenalty;
  }

  /**
   * Milliseconds `source` must still wait (0 = none): for the whole source,
   * or, with `account`, for its attempts at that account (whichever is longer).
   */
  remaining(source: string, account?: string): number {
    const block = sourceBlock(source);
    const now = this.now();
    const src = this.current(sourceKey(block));
    let ms = src ? Math.max(0, src.until - now) : 0;
    if (account !== undefined) {
      const pair = this.current(pairKey(block, account));
      if (pair) ms = Math.max(ms, pair.until - now);
    }
    return ms;
  }

  /**
   * Counts a failure of `source` (aimed at `account` when one is named);
   * returns the penalties it started, the whole source's first.
   */
  recordFailure(source: string, account?: string): PenaltyStarted[] {
    const block = sourceBlock(source);
    const started: PenaltyStarted[] = [];
    const s = this.bump(sourceKey(block), this.sourceThreshold);
    if (s > 0) started.push({ scope: { kind: 'source' }, ms: s });
    if (account !== undefined) {
      const a = this.bump(pairKey(block, account), this.cfg.failuresBeforePenalty);
      if (a > 0) started.push({ scope: { kind: 'account', account }, ms: a });
    }
    return started;
  }

  /** A login to `account` from `source` succeeded: its failures against that account are forgiven, no others. */
  recordSuccess(source: string, account: string): void {
    this.table.delete(pairKey(sourceBlock(source), account));
  }

  get size(): number {
    return this.table.size;
  }

  /** Penalties now in force (the metrics endpoint): whole sources and (source, account) pairs. */
  inForce(): { sources: number; accounts: number } {
    const now = this.now();
    let sources = 0;
    let accounts = 0;
    for (const [key, c] of this.table) {
      if (c.until <= now) continue;
      if (key.startsWith('s ')) sources += 1;
      else accounts += 1;
    }
    return { sources, accounts };
  }

  private bump(key: string, threshold: number): number {
    const now = this.now();
    const state = this.current(key) ?? { failures: 0, penaltyMs: 0, until: 0, lastFailure: now };
    state.failures++;
    state.lastFailure = now;
    let started = 0;
    if (state.failures >= threshold) {
      state.penaltyMs = state.penaltyMs === 0 ? this.cfg.penaltyMs : Math.min(state.penaltyMs * 2, this.cfg.maxPenaltyMs);
      state.penaltyMs = Math.min(state.penaltyMs, this.cfg.maxPenaltyMs);
      state.until = now + state.penaltyMs;
      started = state.penaltyMs;
    }
    // Re-insert so the Map's order is "least recently failed first".
    this.table.delete(key);
    this.table.set(key, state);
    while (this.table.size > this.maxSources) {
      const oldest = this.table.keys().next().value as string;
      this.table.delete(oldest);
    }
    return started;
  }

  private current(key: string): Counter | undefined {
    const state = this.table.get(key);
    if (!state) return undefined;
    const quietSince = Math.max(state.lastFailure, state.until);
    if (this.now() - quietSince > this.forgetMs) {
      this.table.delete(key);
      return undefined;
    }
    return state;
  }
}

function sourceKey(block: string): string {
  return `s ${block}`;
}

/** Account names cannot hold a space (accounts.ts), so "a BLOCK NAME" is unambiguous. */
function pairKey(block: string, account: string): string {
  return `a ${block} ${account}`;
}
