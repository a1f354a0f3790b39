import type { Logger } from '../audit/logger.js';
import type { ExitReport } from '../ssh/exit-status.js';
import type { SpawnedSession } from './session-spawn.js';

/** The account's persistentShells setting as the broker applies it. */
export interface PersistentShells {
  /** A detached shell is hung up after this long without a client (ms). */
  idleLimitMs: number;
  /** Newest bytes of its output kept while detached. */
  bufferBytes: number;
}

interface Held {
  account: string;
  session: SpawnedSession;
  detachedAt: number;
  idleTimer: NodeJS.Timeout;
  /** Frees the session's place in the account's caps (once). */
  release: () => void;
}

/**
 * Shells whose connection dropped, held by their VE's session agent until
 * the account logs in again with a terminal (then the newest is re-attached)
 * or the idle limit hangs them up. Keyed by the account and the VE the
 * broker authenticated, never by anything a worker sends: a worker can only
 * ask "a shell for this connection", and gets one of its own account's.
 *
 * A held shell keeps its place in the account's session caps
 * (sessions.maxSessionsPerAccount, maxSessionsTotal) until it ends, and its
 * terminal stays one of its VE's devpts (ptysPerVe): holding shells cannot
 * get round either. The broker's socket to the agent is all it holds on the
 * host; when the broker goes, the agent hangs the shells up.
 */
/** After a wait for a VE's agent came to nothing (agents off, or it cannot start there), do not wait for that VE again for this long. */
const AGENT_WAIT_BACKOFF_MS = 10 * 60 * 1000;

export class HeldShells {
  private readonly held = new Map<string, Held[]>();
  /** VEs whose agent did not come up while a holdable shell waited for it, and when. */
  private readonly agentMissing = new Map<string, number>();

  constructor(private readonly log: Logger) {}

  private key(account: string, ve: string): string {
    return `${account}\0${ve}`;
  }

  /** Hold `session` (already detached at the agent) for `account` in `ve`. */
  hold(account: string, ve: string, session: SpawnedSession, settings: PersistentShells, release: () => void): void {
    const h = session.holdable;
    if (!h) {
      session.hangup();
      release();
      return;
    }
    const key = this.key(account, ve);
    const entry: Held = {
      account,
      session,
      detachedAt: Date.now(),
      release,
      idleTimer: setTimeout(() => {
        this.log.info({ event: 'ssh.shell_idle_hangup', account, ve, pid: session.pid, idleLimitMs: settings.idleLimitMs });
        // Its end (below) removes it and frees its place.
        session.hangup();
      }, settings.idleLimitMs),
    };
    entry.idleTimer.unref();
    h.onExit = (report: ExitReport) => {
      this.remove(key, entry);
      release();
      this.log.info({ event: 'ssh.shell_held_end', account, ve, pid: session.pid, heldMs: Date.now() - entry.detachedAt, ...(report.kind === 'status' ? { exitStatus: report.code } : { exitSignal: report.signal }) });
    };
    const list = this.held.get(key) ?? [];
    list.push(entry);
    this.held.set(key, list);
    this.log.info({ event: 'ssh.shell_detached', account, ve, pid: session.pid, bufferBytes: settings.bufferBytes, idleLimitMs: settings.idleLimitMs });
  }

  /**
   * The newest held shell of `account` in `ve`, taken out of the registry
   * (its idle timer stopped), or null. Its place in the account's caps goes
   * with it: the caller's session holds that place and frees it with
   * `release`, so a login that takes a held shell up needs no place of its
   * own (an account whose held shells fill its cap can still get them back).
   * Until the caller says who hears of its end, nobody does.
   */
  take(account: string, ve: string): { session: SpawnedSession; release: () => void } | null {
    const key = this.key(account, ve);
    const list = this.held.get(key);
    const entry = list?.pop();
    if (!list?.length) this.held.delete(key);
    if (!entry) return null;
    clearTimeout(entry.idleTimer);
    if (entry.session.holdable) entry.session.holdable.onExit = () => undefined;
    return { session: entry.session, release: entry.release };
  }

  /** Hang up the held shells of the accounts `which` picks (locked or deleted, or all at a server stop); how many. */
  hangup(which: (account: string) => boolean): number {
    // Picked first: a hang-up may end a shell, and its end takes it out of these lists.
    const picked = [...this.held.values()].flat().filter((entry) => which(entry.account));
    for (const entry of picked) entry.session.hangup();
    return picked.length;
  }

  /**
   * Whether a holdable shell should wait for `ve`'s session agent (only the
   * agent can hold a terminal; the first session of a VE starts it). Not
   * again soon after a wait in vain: with agents off every login would wait.
   */
  mayWaitForAgent(ve: string): boolean {
    const at = this.agentMissing.get(ve);
    if (at === undefined) return true;
    if (Date.now() - at < AGENT_WAIT_BACKOFF_MS) return false;
    this.agentMissing.delete(ve);
    return true;
  }

  agentDidNotCome(ve: string): void {
    // Bounded by the VEs that exist: one entry each.
    this.agentMissing.set(ve, Date.now());
  }

  /** How many shells `account` has held in `ve`. */
  count(account: string, ve: string): number {
    return this.held.get(this.key(account, ve))?.length ?? 0;
  }

  private remove(key: string, entry: Held): void {
    clearTimeout(entry.idleTimer);
    const list = this.held.get(key);
    if (!list) return;
    const i = list.indexOf(entry);
    if (i >= 0) list.splice(i, 1);
    if (!list.length) this.held.delete(key);
  }
}
