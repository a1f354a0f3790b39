import type { Logger } from '../audit/logger.js';
import type { SessionLimits } from '../config/server-config.js';

/** The caps of vesh.yaml `sessions:` when a caller gives none (the schema's defaults). */
export const DEFAULT_SESSION_LIMITS: SessionLimits = {
  maxSessions: 10,
  maxConnectionsPerAccount: 500,
  maxSessionsPerAccount: 500,
  maxForwardHelpersPerAccount: 100,
  maxConnections: 4000,
  maxSessionsTotal: 2000,
  agentForwarding: true,
  streamLocalBindUnlink: false,
  streamLocalBindMask: 0o177,
};

export type UsageKind = 'connection' | 'session' | 'forwardHelper';

/** Why something was refused: for the client (userMessage) and for the admin log (setting, limit). */
export interface CapRefusal {
  kind: UsageKind;
  /** The vesh.yaml setting that refused it, e.g. "sessions.maxSessionsPerAccount". */
  setting: string;
  limit: number;
  userMessage: string;
}

/** One refusal log line per (setting, account) per this interval; the rest are counted into the next line. */
const REFUSAL_LOG_INTERVAL_MS = 10_000;

interface Counts {
  connection: number;
  session: number;
  forwardHelper: number;
}

/**
 * What authenticated users hold open, per account and in all, against the
 * caps of vesh.yaml `sessions:` (review H4: every session is a host process
 * and maybe a pty, every forward helper an engine exec; per-connection caps
 * alone let one tenant open thousands of connections). Callers admit before
 * they start anything and release exactly once when it ends.
 */
export class UsageCaps {
  private readonly byAccount = new Map<string, Counts>();
  private readonly total: Counts = { connection: 0, session: 0, forwardHelper: 0 };
  private readonly lastLogged = new Map<string, { at: number; suppressed: number }>();

  constructor(private readonly limits: SessionLimits, private readonly log: Logger, private readonly now: () => number = Date.now) {}

  /** Count one more `kind` for `account`, or say why not (nothing is counted then). */
  admit(kind: UsageKind, account: string): CapRefusal | null {
    const mine = this.byAccount.get(account) ?? { connection: 0, session: 0, forwardHelper: 0 };
    const refusal = this.check(kind, account, mine[kind]);
    if (refusal) {
      this.logRefusal(refusal, account, mine[kind]);
      return refusal;
    }
    mine[kind] += 1;
    this.total[kind] += 1;
    this.byAccount.set(account, mine);
    return null;
  }

  release(kind: UsageKind, account: string): void {
    const mine = this.byAccount.get(account);
    if (!mine || mine[kind] === 0) return;
    mine[kind] -= 1;
    this.total[kind] = Math.max(0, this.total[kind] - 1);
    if (mine.connection === 0 && mine.session === 0 && mine.forwardHelper === 0) this.byAccount.delete(account);
  }

  /** What `account` holds now, and what everybody holds. */
  usage(account?: string): { account: Counts | null; total: Counts } {
    const mine = account === undefined ? undefined : this.byAccount.get(account);
    return { account: mine ? { ...mine } : null, total: { ...this.total } };
  }

  private check(kind: UsageKind, account: string, mine: number): CapRefusal | null {
    const l = this.limits;
    switch (kind) {
      case 'connection':
        if (mine >= l.maxConnectionsPerAccount) {
          return { kind, setting: 'sessions.maxConnectionsPerAccount', limit: l.maxConnectionsPerAccount, userMessage: `too many connections for account ${account} (${l.maxConnectionsPerAccount}); close some and try again` };
        }
        if (this.total.connection >= l.maxConnections) {
          return { kind, setting: 'sessions.maxConnections', limit: l.maxConnections, userMessage: `the server is at its limit of ${l.maxConnections} connections; try again later` };
        }
        return null;
      case 'session':
        if (mine >= l.maxSessionsPerAccount) {
          return { kind, setting: 'sessions.maxSessionsPerAccount', limit: l.maxSessionsPerAccount, userMessage: `too many sessions for account ${account} (${l.maxSessionsPerAccount}); close some and try again` };
        }
        if (this.total.session >= l.maxSessionsTotal) {
          return { kind, setting: 'sessions.maxSessionsTotal', limit: l.maxSessionsTotal, userMessage: `the server is at its limit of ${l.maxSessionsTotal} sessions; try again later` };
        }
        return null;
      case 'forwardHelper':
        if (mine >= l.maxForwardHelpersPerAccount) {
          return { kind, setting: 'sessions.maxForwardHelpersPerAccount', limit: l.maxForwardHelpersPerAccount, userMessage: `too many connections forwarding ports for account ${account} (${l.maxForwardHelpersPerAccount}); close some and try again` };
        }
        return null;
    }
  }

  /**
   * One warning per setting and account, then at most one per interval
   * carrying how many were refused in between: a tenant hammering its cap
   * must not turn the log into its disk.
   */
  private logRefusal(r: CapRefusal, account: string, held: number): void {
    const key = `${r.setting} ${account}`;
    const now = this.now();
    const last = this.lastLogged.get(key);
    if (last && now - last.at < REFUSAL_LOG_INTERVAL_MS) {
      last.suppressed += 1;
      return;
    }
    const suppressed = last?.suppressed ?? 0;
    this.lastLogged.set(key, { at: now, suppressed: 0 });
    // Bounded: one entry per account that hit a cap lately.
    if (this.lastLogged.size > 10_000) {
      for (const [k, v] of this.lastLogged) if (now - v.at >= REFUSAL_LOG_INTERVAL_MS) this.lastLogged.delete(k);
    }
    this.log.warn({ event: 'ssh.limit_reached', account, kind: r.kind, setting: r.setting, limit: r.limit, held, refusedSinceLastLine: suppressed }, `${r.setting} (${r.limit}) reached for account ${account}: refusing its new ${r.kind === 'forwardHelper' ? 'forward helper' : r.kind}`);
  }
}
