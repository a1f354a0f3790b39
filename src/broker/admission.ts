import type net from 'node:net';
import type { Logger } from '../audit/logger.js';
import type { ServerConfig } from '../config/server-config.js';
import { sourceBlock } from '../auth/source-match.js';
import type { SshAuthenticator } from '../ssh/ports.js';
import { countRefused, type RefusalReason } from '../audit/metrics.js';

/** The auth settings admission reads (the rest of vesh.yaml `auth:` belongs to the authenticator). */
export type AdmissionSettings = Pick<ServerConfig['auth'], 'loginGraceTimeMs' | 'maxStartups' | 'maxStartupsPerSource'> & {
  /** New connections per second one source may open (default DEFAULT_CONNECTION_RATE_PER_SOURCE). */
  maxConnectionRatePerSource?: number;
  penalties?: unknown;
};

/** vesh.yaml's default for auth.maxConnectionRatePerSource. */
export const DEFAULT_CONNECTION_RATE_PER_SOURCE = 20;

/** A source's allowance of new connections is this many seconds' worth of its rate. */
const CONNECTION_BURST_SECONDS = 5;

/** Sources whose connection rate is tracked; past this, the one seen longest ago is forgotten. */
const MAX_RATE_SOURCES = 10_000;

/** A refusal of one kind for one source is logged at most this often; the rest are counted into the next line. */
const REFUSAL_LOG_INTERVAL_MS = 10_000;

/** Why a connection that never logged in counts against its source. */
export type PreAuthFailure = 'grace_timeout' | 'garbage' | 'protocol_error' | 'key_exchange_incomplete' | 'noauth';

/** One admitted connection, while it counts against the pre-auth caps. */
export interface Admitted {
  source: string;
  /** What per-source caps count it under (sourceBlock: the address, or its IPv6 /64). */
  block: string;
  unauthenticated: boolean;
  graceTimer: NodeJS.Timeout | null;
  struck: boolean;
  /** Called when the grace time ran out: end the connection. */
  onGrace: (() => void) | null;
}

/** "::ffff:127.0.0.1" → "127.0.0.1", so penalties and logs see one address per IPv4 client; `missing` when there is none. */
export function normalizeAddress(a: string | undefined, missing = 'unknown'): string {
  if (!a) return missing;
  return a.startsWith('::ffff:') && a.includes('.') ? a.slice(7) : a;
}

/**
 * Which TCP connections the broker takes, decided before a byte is parsed
 * (ssh2 has none of this): penalized sources, a per-source connection rate,
 * MaxStartups overall and per source, and the login grace timer. A
 * connection that never logged in is held against its source as OpenSSH's
 * PerSourcePenalties do (strike).
 */
export class Admission {
  unauthenticated = 0;
  private readonly unauthenticatedBySource = new Map<string, number>();
  private readonly connectionTokens = new Map<string, { tokens: number; at: number }>();
  private readonly refusalLogged = new Map<string, { at: number; unlogged: number }>();

  constructor(private readonly settings: AdmissionSettings, private readonly authenticator: SshAuthenticator, private readonly log: Logger) {}

  /** Take the connection (counted as unauthenticated, grace timer running) or refuse it (null; the caller closes it). */
  admit(socket: net.Socket): Admitted | null {
    const source = normalizeAddress(socket.remoteAddress);
    const block = sourceBlock(source);
    const refuse = (reason: string, extra: Record<string, unknown> = {}, counted: RefusalReason = 'penalized') => {
      countRefused(counted);
      this.logRefusal(block, reason, { source, port: socket.remotePort, reason, ...extra });
      return null;
    };
    const penalty = this.authenticator.penaltyRemaining(source);
    if (penalty > 0) return refuse('source penalized after failed logins', { penaltyMs: penalty });
    const rate = this.settings.maxConnectionRatePerSource ?? DEFAULT_CONNECTION_RATE_PER_SOURCE;
    if (!this.takeConnectionToken(block, rate)) return refuse('source connects too fast (maxConnectionRatePerSource)', { maxConnectionRatePerSource: rate }, 'rate');
    const max = this.settings.maxStartups;
    if (this.unauthenticated >= max) return refuse('too many unauthenticated connections (maxStartups)', { maxStartups: max }, 'max_startups');
    const perSource = this.settings.maxStartupsPerSource;
    const fromSource = this.unauthenticatedBySource.get(block) ?? 0;
    if (fromSource >= perSource) return refuse('too many unauthenticated connections from this source (maxStartupsPerSource)', { maxStartupsPerSource: perSource, block }, 'max_startups_per_source');

    const adm: Admitted = { source, block, unauthenticated: true, graceTimer: null, struck: false, onGrace: null };
    this.unauthenticated += 1;
    this.unauthenticatedBySource.set(block, fromSource + 1);
    adm.graceTimer = setTimeout(() => {
      this.log.warn({ event: 'ssh.login_grace_timeout', source, graceMs: this.settings.loginGraceTimeMs });
      this.strike(adm, 'grace_timeout');
      adm.onGrace?.();
    }, this.settings.loginGraceTimeMs);
    adm.graceTimer.unref();
    return adm;
  }

  /** The connection authenticated or ended: it no longer counts against MaxStartups, and its grace timer stops. */
  leave(adm: Admitted): void {
    if (adm.graceTimer) clearTimeout(adm.graceTimer);
    adm.graceTimer = null;
    if (!adm.unauthenticated) return;
    adm.unauthenticated = false;
    this.unauthenticated -= 1;
    const n = (this.unauthenticatedBySource.get(adm.block) ?? 1) - 1;
    if (n > 0) this.unauthenticatedBySource.set(adm.block, n);
    else this.unauthenticatedBySource.delete(adm.block);
  }

  /**
   * Count a connection that never logged in against its source: holding a
   * pre-auth slot to the end of the grace time, feeding the parser garbage,
   * or a key exchange (a host-key signature spent) and no login attempt.
   * Failed passwords and signatures are counted where they are checked.
   */
  strike(adm: Admitted, kind: PreAuthFailure): void {
    if (adm.struck) return;
    adm.struck = true;
    this.log.info({ event: 'ssh.preauth_failure', source: adm.source, kind });
    this.authenticator.recordFailure(adm.source);
  }

  /**
   * One token of `block`'s allowance: a token bucket of
   * CONNECTION_BURST_SECONDS × rate tokens refilled at `rate` per second.
   */
  private takeConnectionToken(block: string, rate: number): boolean {
    const now = Date.now();
    const burst = rate * CONNECTION_BURST_SECONDS;
    const b = this.connectionTokens.get(block) ?? { tokens: burst, at: now };
    b.tokens = Math.min(burst, b.tokens + ((now - b.at) / 1000) * rate);
    b.at = now;
    const ok = b.tokens >= 1;
    if (ok) b.tokens -= 1;
    this.connectionTokens.delete(block);
    this.connectionTokens.set(block, b);
    if (this.connectionTokens.size > MAX_RATE_SOURCES) this.connectionTokens.delete(this.connectionTokens.keys().next().value as string);
    return ok;
  }

  /** One log line per (source block, reason) per interval, with how many were refused in between. */
  private logRefusal(block: string, reason: string, fields: Record<string, unknown>): void {
    const key = `${block} ${reason}`;
    const now = Date.now();
    const last = this.refusalLogged.get(key);
    if (last && now - last.at < REFUSAL_LOG_INTERVAL_MS) {
      last.unlogged += 1;
      return;
    }
    this.refusalLogged.delete(key);
    this.refusalLogged.set(key, { at: now, unlogged: 0 });
    if (this.refusalLogged.size > MAX_RATE_SOURCES) this.refusalLogged.delete(this.refusalLogged.keys().next().value as string);
    this.log.warn({ event: 'ssh.connection_refused', ...fields, ...(last ? { refusedSinceLastLine: last.unlogged } : {}) });
  }
}
