import type { Connection } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import type { AccountTimeouts } from '../config/accounts.js';
import type { ChannelTimeoutType, TimeoutSettings } from '../config/server-config.js';

/**
 * When a connection or a channel is ended by the server itself, after login:
 *
 * - keepalives (OpenSSH's ClientAliveInterval / ClientAliveCountMax): after
 *   an interval with no packet from the client, a `keepalive@openssh.com`
 *   global request asking for a reply; any packet that comes back (a reply,
 *   success or failure, or anything else) counts as alive. When countMax
 *   probes went unanswered and one more interval passed, the connection is
 *   cut ("Timeout, client not responding"): a dead client is gone within
 *   interval × (countMax + 1) of its last packet.
 * - channel idle times (ChannelTimeout, OpenSSH 9.2+): a channel of a listed
 *   type with no data either way for its time is closed; `global` takes all
 *   the channels of the connection together.
 * - UnusedConnectionTimeout: a connection with no open channel for that
 *   long is ended. Remote (-R) listeners alone do not count as use.
 *
 * These run in the worker, which sees the packets. The worker is not
 * trusted, so what protects the host does not rest on them: the broker ends
 * a connection from which the kernel saw no data for longer than keepalives
 * allow (src/broker/client-alive-backstop.ts) and hangs up sessions that
 * outlive timeouts.maxSessionTime itself.
 */

/** An account's overrides on top of vesh.yaml's settings. */
export function resolveTimeouts(server: TimeoutSettings, account?: AccountTimeouts): TimeoutSettings {
  if (!account) return { ...server, channelTimeoutMs: { ...server.channelTimeoutMs } };
  return {
    clientAliveIntervalMs: account.clientAliveInterval ?? server.clientAliveIntervalMs,
    clientAliveCountMax: account.clientAliveCountMax ?? server.clientAliveCountMax,
    channelTimeoutMs: { ...server.channelTimeoutMs, ...account.channelTimeout },
    unusedConnectionTimeoutMs: account.unusedConnectionTimeout ?? server.unusedConnectionTimeoutMs,
    maxSessionTimeMs: account.maxSessionTime ?? server.maxSessionTimeMs,
  };
}

/** Every timeout off: what a connection gets when nothing was configured. */
export const NO_TIMEOUTS: TimeoutSettings = {
  clientAliveIntervalMs: 0, clientAliveCountMax: 3, channelTimeoutMs: {}, unusedConnectionTimeoutMs: 0, maxSessionTimeMs: 0,
};

/** The longest a client that stopped answering keeps its connection (0 = keepalives off). */
export function clientAliveLimitMs(t: TimeoutSettings): number {
  return t.clientAliveIntervalMs > 0 ? t.clientAliveIntervalMs * (t.clientAliveCountMax + 1) : 0;
}

/** "8h", "90s", "1.5s": a duration as an admin would write it, for messages. */
export function formatDuration(ms: number): string {
  for (const [unit, size] of [['h', 3_600_000], ['m', 60_000], ['s', 1000]] as const) {
    if (ms >= size && ms % size === 0) return `${ms / size}${unit}`;
  }
  return ms >= 1000 ? `${(ms / 1000).toFixed(1)}s` : `${ms}ms`;
}

/** Why the worker ended a connection by itself. */
export type ConnectionExpiry = 'client_alive' | 'unused_connection';

/** The part of ssh2's internal Client these timers touch (as in ssh2-guards.ts). */
interface Ssh2Internals {
  _protocol: {
    _onPacket: () => void;
    _handlers: Record<string, ((...args: unknown[]) => unknown) | undefined>;
    ping(): void;
    channelData(chan: number, data: unknown): void;
    channelExtData(chan: number, data: unknown, type: number): void;
    channelClose(chan: number): void;
  };
  _chanMgr: { _channels: Record<number, unknown>; _count: number; get(id: number): unknown };
}

/** A channel's two halves as ssh2 keeps them: Session (before shell/exec) and Channel share these objects. */
interface ChanInfo {
  /** Unset by ssh2 for channels the client opened other than sessions (direct-tcpip…): see `openedAs`. */
  type: string | undefined;
  incoming: { id: number; state: string };
  outgoing: { id: number; state: string };
}

/** The info of a channel table entry, or null for a slot that holds no open channel yet. */
function infoOf(entry: unknown): ChanInfo | null {
  if (typeof entry !== 'object' || entry === null) return null;
  const e = entry as { _chanInfo?: ChanInfo; type?: string; incoming?: ChanInfo['incoming']; outgoing?: ChanInfo['outgoing'] };
  if (e._chanInfo) return e._chanInfo;
  if (e.incoming && e.outgoing) return e as ChanInfo;
  return null;
}

/** Channel types remembered before those of closed channels are dropped (MAX_CHANNELS_PER_CONNECTION is 128). */
const MAX_REMEMBERED_OPENS = 512;

/** Shortest and longest pause between two looks at the channels. */
const SWEEP_MIN_MS = 250;
const SWEEP_MAX_MS = 15_000;

/**
 * The timers of one authenticated connection. `expire` is called once when
 * the connection must end; the caller cuts it.
 */
export class ConnectionTimeouts {
  private readonly internals: Ssh2Internals;
  private aliveTimer: NodeJS.Timeout | null = null;
  private unanswered = 0;
  private sweepTimer: NodeJS.Timeout | null = null;
  /** Last data either way, per channel, keyed by the channel's `incoming` object (one per open channel). */
  private readonly lastUsed = new WeakMap<object, number>();
  /** Client's channel id → our `incoming` object, for data we send (ssh2 addresses it by the client's id). */
  private byRemote = new Map<number, object>();
  /** The type each channel the client opened was asked for, by the client's channel id (ssh2 keeps it only for sessions). */
  private readonly openedAs = new Map<number, string>();
  private unusedSince: number | null = null;
  private stopped = false;

  constructor(
    conn: Connection,
    private readonly settings: TimeoutSettings,
    private readonly log: Logger,
    private readonly expire: (why: ConnectionExpiry, message: string) => void,
  ) {
    this.internals = conn as unknown as Ssh2Internals;
  }

  /** Start the timers (after login: before it, auth.loginGraceTime bounds the connection). */
  start(): void {
    this.unusedSince = Date.now();
    if (this.settings.clientAliveIntervalMs > 0) this.startKeepalive();
    const channelTimes = Object.values(this.settings.channelTimeoutMs).filter((ms): ms is number => typeof ms === 'number' && ms > 0);
    const watched = [...channelTimes, ...(this.settings.unusedConnectionTimeoutMs > 0 ? [this.settings.unusedConnectionTimeoutMs] : [])];
    if (watched.length > 0) {
      if (channelTimes.length > 0) this.trackChannelData();
      // A quarter of the shortest time: a channel or a connection lives at most 25% past its limit.
      const period = Math.min(SWEEP_MAX_MS, Math.max(SWEEP_MIN_MS, Math.floor(Math.min(...watched) / 4)));
      this.sweepTimer = setInterval(() => this.sweep(), period);
      this.sweepTimer.unref();
    }
  }

  stop(): void {
    this.stopped = true;
    if (this.aliveTimer) clearTimeout(this.aliveTimer);
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    this.aliveTimer = null;
    this.sweepTimer = null;
  }

  // ------------------------------------------------------------ keepalives

  private startKeepalive(): void {
    const proto = this.internals._protocol;
    const onPacket = proto._onPacket;
    // Every packet the client sends, whatever it is: a reply to our probe or anything else.
    proto._onPacket = () => {
      onPacket();
      this.unanswered = 0;
      this.aliveTimer?.refresh();
    };
    this.aliveTimer = setTimeout(() => this.onClientSilent(), this.settings.clientAliveIntervalMs);
    this.aliveTimer.unref();
  }

  private onClientSilent(): void {
    if (this.stopped) return;
    if (this.unanswered >= this.settings.clientAliveCountMax) {
      this.log.warn({ event: 'ssh.client_alive_timeout', unanswered: this.unanswered, intervalMs: this.settings.clientAliveIntervalMs }, 'Timeout, client not responding');
      this.stop();
      this.expire('client_alive', 'Timeout, client not responding');
      return;
    }
    this.unanswered += 1;
    try {
      // keepalive@openssh.com with want-reply: OpenSSH clients answer it
      // (with a failure, which is as good as a success here).
      this.internals._protocol.ping();
    } catch { /* the socket is going; its close ends us */ }
    this.aliveTimer?.refresh();
  }

  // ------------------------------------------------------------ channel idle times

  private trackChannelData(): void {
    const proto = this.internals._protocol;
    const handlers = proto._handlers;
    const open = handlers.CHANNEL_OPEN;
    handlers.CHANNEL_OPEN = (p: unknown, info: unknown) => {
      const i = info as { sender: number; type: string };
      if (this.openedAs.size >= MAX_REMEMBERED_OPENS) this.forgetClosedOpens();
      this.openedAs.set(i.sender, String(i.type).slice(0, 64));
      return open?.(p, info);
    };
    const touchLocal = (local: unknown) => {
      const info = typeof local === 'number' ? infoOf(this.channelEntry(local)) : null;
      if (info) this.lastUsed.set(info.incoming, Date.now());
    };
    const touchRemote = (remote: number) => {
      let key = this.byRemote.get(remote);
      if (!key) {
        this.indexChannels();
        key = this.byRemote.get(remote);
      }
      if (key) this.lastUsed.set(key, Date.now());
    };
    for (const name of ['CHANNEL_DATA', 'CHANNEL_EXTENDED_DATA']) {
      const orig = handlers[name];
      handlers[name] = (p: unknown, recipient: unknown, ...rest: unknown[]) => {
        touchLocal(recipient);
        return orig?.(p, recipient, ...rest);
      };
    }
    const channelData = proto.channelData.bind(proto);
    proto.channelData = (chan, data) => {
      touchRemote(chan);
      channelData(chan, data);
    };
    const channelExtData = proto.channelExtData.bind(proto);
    proto.channelExtData = (chan, data, type) => {
      touchRemote(chan);
      channelExtData(chan, data, type);
    };
  }

  private channelEntry(local: number): unknown {
    try {
      return this.internals._chanMgr.get(local);
    } catch {
      return undefined;
    }
  }

  /** Rebuilt from ssh2's channel table: at most MAX_CHANNELS_PER_CONNECTION entries. */
  private indexChannels(): void {
    this.byRemote = new Map();
    for (const entry of Object.values(this.internals._chanMgr._channels)) {
      const info = infoOf(entry);
      if (info) this.byRemote.set(info.outgoing.id, info.incoming);
    }
  }

  /** Keep the types of channels still open only (a client may open and close channels without end). */
  private forgetClosedOpens(): void {
    const live = new Set<number>();
    for (const entry of Object.values(this.internals._chanMgr._channels)) {
      const info = infoOf(entry);
      if (info) live.add(info.outgoing.id);
    }
    for (const id of this.openedAs.keys()) if (!live.has(id)) this.openedAs.delete(id);
  }

  private sweep(): void {
    if (this.stopped) return;
    const now = Date.now();
    const limits = this.settings.channelTimeoutMs;
    const open: Array<{ entry: unknown; info: ChanInfo; last: number }> = [];
    for (const entry of Object.values(this.internals._chanMgr._channels)) {
      const info = infoOf(entry);
      if (!info || info.outgoing.state === 'closing' || info.outgoing.state === 'closed') continue;
      let last = this.lastUsed.get(info.incoming);
      if (last === undefined) {
        // First seen now: its idle time counts from here (at most one sweep late).
        last = now;
        this.lastUsed.set(info.incoming, last);
      }
      open.push({ entry, info, last });
    }
    const global = limits.global ?? 0;
    const lastAny = Math.max(0, ...open.map((c) => c.last));
    for (const c of open) {
      const type = c.info.type ?? this.openedAs.get(c.info.outgoing.id) ?? 'unknown';
      const own = limits[type as ChannelTimeoutType] ?? 0;
      if (own > 0 && now - c.last >= own) this.closeIdle(c.entry, c.info, type, now - c.last, own, type);
      else if (global > 0 && now - lastAny >= global) this.closeIdle(c.entry, c.info, type, now - lastAny, global, 'global');
    }
    this.checkUnused(now);
  }

  private closeIdle(entry: unknown, info: ChanInfo, type: string, idleMs: number, limitMs: number, setting: string): void {
    this.log.info({ event: 'ssh.channel_timeout', channel: info.incoming.id, type, idleMs, setting: `channelTimeout.${setting}`, limitMs },
      `channel ${info.incoming.id}: closing after ${Math.round(idleMs / 1000)} seconds of inactivity`);
    const ch = entry as { close?: () => void; _chanInfo?: ChanInfo };
    try {
      if (!ch._chanInfo && typeof ch.close === 'function') {
        // A started channel: ssh2 sends CHANNEL_CLOSE; the session's own
        // close handler then hangs up its process, a forward's closes its socket.
        ch.close();
      } else {
        // A session that never started anything has no stream to close.
        info.outgoing.state = 'closing';
        this.internals._protocol.channelClose(info.outgoing.id);
      }
    } catch { /* the connection is going */ }
  }

  private checkUnused(now: number): void {
    const limit = this.settings.unusedConnectionTimeoutMs;
    if (limit <= 0) return;
    if (this.internals._chanMgr._count > 0) {
      this.unusedSince = null;
      return;
    }
    this.unusedSince ??= now;
    if (now - this.unusedSince >= limit) {
      this.log.info({ event: 'ssh.unused_connection_timeout', idleMs: now - this.unusedSince, limitMs: limit }, 'terminating inactive connection: no open channel for timeouts.unusedConnectionTimeout');
      this.stop();
      this.expire('unused_connection', 'terminating inactive connection');
    }
  }
}
