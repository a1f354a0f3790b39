import { isIP } from 'node:net';

/**
 * Hard limits on what one client may ask of the SSH layer. They exist because
 * ssh2 enforces none of them itself; each is chosen so that no real client
 * (OpenSSH, PuTTY, libssh) comes near it, while a hostile one cannot make the
 * server hold unbounded memory, descriptors or processes.
 */

/** Session channels open at once per connection (OpenSSH's MaxSessions default). */
export const MAX_SESSIONS_PER_CONNECTION = 10;

/** Channels of any kind (sessions + forwarded TCP) open at once per connection. */
export const MAX_CHANNELS_PER_CONNECTION = 128;

/**
 * Channel opens refused on one connection before we drop it: a client that
 * keeps opening channels after being told "no" is flooding, not working.
 */
export const MAX_REFUSED_CHANNEL_OPENS = 256;

/** Remote (-R) listeners per connection. */
export const MAX_REMOTE_FORWARDS_PER_CONNECTION = 16;

/**
 * Smallest maximum packet size we accept from a peer for a channel. ssh2
 * spins forever sending a channel's data when the peer's maximum packet size
 * is 0 (upstream #1504); tiny sizes turn every byte into a ~50-byte packet.
 * OpenSSH uses 32768 (16384 for forwarded channels), so 256 refuses nobody real.
 */
export const MIN_PEER_MAX_PACKET = 256;

/** Terminal sizes outside these bounds are clamped (0 means "unknown" and becomes the default). */
export const PTY_LIMITS = { minCols: 1, maxCols: 1000, minRows: 1, maxRows: 1000, defaultCols: 80, defaultRows: 24 } as const;

/** Environment requests: count and size caps per session. */
export const ENV_LIMITS = { maxVars: 32, maxNameLength: 64, maxValueLength: 1024 } as const;

/** Longest exec command line we run (OpenSSH has no limit below the packet size; 32 KiB suits rsync/git). */
export const MAX_COMMAND_LENGTH = 32 * 1024;

/** Pending writes (channel packets, ≤32 KiB each) into a terminal before we stop reading the client. */
export const PTY_INPUT_QUEUE_MAX = 64;

/** How long a hung-up process may take to exit before its runc relay is killed. */
export const HANGUP_GRACE_MS = 5_000;

/** Log at most this many refused requests per connection, then only count them. */
export const MAX_REFUSAL_LOGS_PER_CONNECTION = 20;

/** Clamp a terminal size from the client to something the kernel and node-pty accept. */
export function clampPtySize(cols: number, rows: number): { cols: number; rows: number; clamped: boolean } {
  const fix = (v: number, min: number, max: number, dflt: number): number => {
    if (!Number.isFinite(v) || v <= 0) return dflt;
    return Math.min(max, Math.max(min, Math.floor(v)));
  };
  const c = fix(cols, PTY_LIMITS.minCols, PTY_LIMITS.maxCols, PTY_LIMITS.defaultCols);
  const r = fix(rows, PTY_LIMITS.minRows, PTY_LIMITS.maxRows, PTY_LIMITS.defaultRows);
  return { cols: c, rows: r, clamped: c !== cols || r !== rows };
}

/**
 * Leading bits of an IPv6 address that make one source. OpenSSH's
 * PerSourceNetBlockSize counts single IPv6 addresses by default, but one
 * host or LAN commonly holds a whole /64 and can pick a fresh address from
 * it for every connection.
 */
export const IPV6_SOURCE_PREFIX_BITS = 64;

/** The 8 groups of an IPv6 address (zone id dropped, an IPv4 tail folded in), or null if it is not one. */
function ipv6Groups(address: string): number[] | null {
  let a = address.toLowerCase();
  const zone = a.indexOf('%');
  if (zone >= 0) a = a.slice(0, zone);
  if (!isIP(a) || isIP(a) !== 6) return null;
  const v4 = /(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(a);
  if (v4) {
    const [b0, b1, b2, b3] = v4.slice(1).map(Number) as [number, number, number, number];
    a = `${a.slice(0, v4.index)}${((b0 << 8) | b1).toString(16)}:${((b2 << 8) | b3).toString(16)}`;
  }
  const [head, tail] = a.includes('::') ? a.split('::') as [string, string] : [a, null];
  const parse = (s: string) => (s === '' ? [] : s.split(':').map((g) => parseInt(g, 16)));
  const h = parse(head);
  if (tail === null) return h;
  const t = parse(tail);
  return [...h, ...new Array<number>(8 - h.length - t.length).fill(0), ...t];
}

/**
 * The source a connection is counted under for per-source caps and
 * penalties: an IPv4 address (IPv4-mapped IPv6 is IPv4) as it is, an IPv6
 * address by its /64, since whoever holds one address of a /64 can use all
 * 2^64 of them to dodge a per-address count.
 */
export function sourceBlock(address: string): string {
  const s = address.toLowerCase();
  const mapped = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/.exec(s);
  if (mapped) return mapped[1]!;
  const groups = ipv6Groups(s);
  if (!groups) return s;
  // ::ffff:7f00:1 is 127.0.0.1 too.
  if (groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff) {
    return [groups[6]! >> 8, groups[6]! & 0xff, groups[7]! >> 8, groups[7]! & 0xff].join('.');
  }
  const keep = IPV6_SOURCE_PREFIX_BITS / 16;
  return `${groups.slice(0, keep).map((g) => g.toString(16)).join(':')}::/${IPV6_SOURCE_PREFIX_BITS}`;
}
