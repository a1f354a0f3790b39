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
