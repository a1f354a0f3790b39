import { sourceBlock } from './source-match.js';

export interface PenaltyConfig {
  /** Failures from one source before it is made to wait. */
  failuresBeforePenalty: number;
  /** First wait, ms; each further failure doubles it. */
  penaltyMs: number;
  /** Longest wait, ms. */
  maxPenaltyMs: number;
}

interface SourceState {
  failures: number;
  /** Current penalty length, ms (0 = none yet). */
  penaltyMs: number;
  /** Clock value until which the source must wait. */
  until: number;
  lastFailure: number;
}

/** A source quiet for this long after its penalty ended starts again from zero. */
const MIN_FORGET_MS = 15 * 60_000;

/**
 * Per-source failure counts and penalties, in the manner of OpenSSH's
 * PerSourcePenalties: after `failuresBeforePenalty` failures a source waits
 * `penaltyMs`, every further failure doubles the wait up to `maxPenaltyMs`,
 * a success clears the source. What counts as a failure is the caller's
 * choice (the SSH layer counts failed passwords and signatures, connections
 * cut at the login grace time, and garbage or a failed key exchange). A
 * source is an IPv4 address or an IPv6 /64 (sourceBlock), so a host cannot
 * escape its penalty by moving within its prefix. The table is bounded:
 * past `maxSources` the source that failed longest ago is forgotten first.
 */
export class SourcePenalties {
  private readonly table = new Map<string, SourceState>();
  private readonly maxSources: number;
  private readonly now: () => number;
  private readonly forgetMs: number;

  constructor(private readonly cfg: PenaltyConfig, opts: { maxSources?: number; now?: () => number } = {}) {
    this.maxSources = opts.maxSources ?? 10_000;
    this.now = opts.now ?? Date.now;
    this.forgetMs = Math.max(cfg.maxPenaltyMs, MIN_FORGET_MS);
  }

  /** Milliseconds `source` must still wait (0 = none). */
  remaining(source: string): number {
    const state = this.current(sourceBlock(source));
    return state ? Math.max(0, state.until - this.now()) : 0;
  }

  /** Counts a failure; returns the penalty it started (ms), or 0. */
  recordFailure(source: string): number {
    const key = sourceBlock(source);
    const now = this.now();
    const state = this.current(key) ?? { failures: 0, penaltyMs: 0, until: 0, lastFailure: now };
    state.failures++;
    state.lastFailure = now;
    let started = 0;
    if (state.failures >= this.cfg.failuresBeforePenalty) {
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

  recordSuccess(source: string): void {
    this.table.delete(sourceBlock(source));
  }

  get size(): number {
    return this.table.size;
  }

  private current(key: string): SourceState | undefined {
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
