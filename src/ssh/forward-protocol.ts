/**
 * The message set between the broker and port forwarding in a VE: the
 * helper (src/native/vesh-forward.c) runs inside the VE with all of the VE's
 * namespaces and confinement; the relay (src/native/vesh-forward-relay.c)
 * runs on the host, starts it, and is the only process the broker talks to
 * (src/broker/forward-relay-client.ts).
 *
 * Transport, broker ↔ relay: one JSON object per datagram on a
 * SOCK_SEQPACKET socketpair (src/system/frame-channel.ts); a message that
 * carries a connection also carries its socket descriptor (SCM_RIGHTS) on
 * that datagram. The broker passes each such socket on to the SSH worker
 * that asked, unread.
 *
 * Transport, relay ↔ helper: fixed-size frames over a SOCK_SEQPACKET
 * socketpair (src/native/forward-frame.h). The tenant can take over the
 * helper's end (VE root can ptrace it), so the relay checks every frame — an
 * answer only to a request it forwarded, a connection only for a listener
 * the helper reported — and every descriptor: only connected, non-listening
 * AF_INET/AF_INET6 TCP sockets are taken. What it drops it reports as
 * 'rejected'.
 *
 * What the broker gets for a connection is never the VE's socket but one end
 * of a Unix socketpair the relay made, non-blocking, which nobody else holds;
 * the relay copies between it and the VE's socket without ever blocking. A
 * socket the VE also holds could be switched to blocking from inside the VE
 * (O_NONBLOCK belongs to the open file description, which every holder
 * shares), and one write to it would then stop the server's event loop for
 * every tenant. The copy costs one pass through the relay, which runs beside
 * the server on another core; the kernel's socket buffers still give both
 * directions their backpressure, and EOF travels as a half-close both ways.
 *
 * Why sockets and not data frames on the channel: the helper creates every
 * socket in the VE's namespace — so `localhost` is the VE's loopback and a
 * listener is the VE's — and one helper and one relay per SSH connection
 * serve every -L and -R of it, each connection its own socket with its own
 * flow control (a framed multiplexer would need its own per-stream windows).
 *
 * Server → relay (for the helper):
 *   { t: 'connect', id, host, port }     open a TCP connection (for -L)
 *   { t: 'listen', id, host, port }      listen (for -R); port 0 = any
 *   { t: 'unlisten', id }                close a listener (cancel-tcpip-forward, cancel-streamlocal-forward)
 *   { t: 'connect_unix', id, path }      connect to a Unix socket (direct-streamlocal)
 *   { t: 'listen_unix', id, path, mask, unlink }   listen on a Unix socket (streamlocal-forward):
 *                                        bound under umask `mask` (StreamLocalBindMask), an
 *                                        existing socket removed first when `unlink`
 *   { t: 'listen_agent', id, mask }      listen on a fresh agent socket the helper names
 *                                        (/tmp/ssh-XXXXXXXXXX/agent.PID, directory 0700)
 * Relay → server (for the helper):
 *   { t: 'ready' }                                       once, at start
 *   { t: 'connected', id } + socket                      connect succeeded
 *   { t: 'failed', id, code, message }                   connect or listen failed
 *   { t: 'listening', id, port, path? }                  listener bound (port 0 for a Unix
 *                                                        socket; the agent socket's path)
 *   { t: 'accepted', id, remoteAddress, remotePort } + socket   a -R connection arrived
 *   { t: 'rejected', count, reason }                     the relay dropped `count` frames
 *                                                        from the VE since its last report
 *
 * `id` is chosen by the server, unique per helper; for 'accepted' it is the
 * listener's id. Anything malformed is ignored by the side that receives it.
 */

export type ToHelper =
  | { t: 'connect'; id: number; host: string; port: number }
  | { t: 'listen'; id: number; host: string; port: number }
  | { t: 'unlisten'; id: number }
  | { t: 'connect_unix'; id: number; path: string }
  | { t: 'listen_unix'; id: number; path: string; mask: number; unlink: boolean }
  | { t: 'listen_agent'; id: number; mask: number };

export type FromHelper =
  | { t: 'ready' }
  | { t: 'connected'; id: number }
  | { t: 'failed'; id: number; code: string; message: string }
  | { t: 'listening'; id: number; port: number; path?: string }
  | { t: 'accepted'; id: number; remoteAddress: string; remotePort: number }
  | { t: 'rejected'; count: number; reason: string };

const HOST_RE = /^[A-Za-z0-9._:%-]{1,253}$/;

export function isValidHost(host: unknown): host is string {
  return typeof host === 'string' && HOST_RE.test(host);
}

export function isValidPort(port: unknown, allowZero: boolean): port is number {
  return typeof port === 'number' && Number.isInteger(port) && port <= 65535 && (allowZero ? port >= 0 : port >= 1);
}

/** What sun_path holds, less its NUL. */
export const MAX_SOCKET_PATH = 107;

/**
 * A Unix socket path a client may name: absolute (so never an abstract
 * socket, whose name starts with NUL), printable ASCII, within sun_path.
 * What it names is decided inside the VE (the helper binds or connects
 * there); this only keeps it a path the frames carry whole.
 */
export function isValidSocketPath(path: unknown): path is string {
  return typeof path === 'string' && path.length <= MAX_SOCKET_PATH && /^\/[\x20-\x7e]*$/.test(path);
}

/** The agent socket's path as the helper makes it. */
const AGENT_PATH_RE = /^\/tmp\/ssh-[A-Za-z0-9]{10}\/agent\.[0-9]{1,10}$/;

function isId(v: unknown): v is number {
  return typeof v === 'number' && Number.isInteger(v) && v >= 0;
}

export function parseToHelper(m: unknown): ToHelper | null {
  if (!m || typeof m !== 'object') return null;
  const o = m as Record<string, unknown>;
  if (!isId(o.id)) return null;
  if ((o.t === 'connect' || o.t === 'listen') && isValidHost(o.host) && isValidPort(o.port, o.t === 'listen')) {
    return { t: o.t, id: o.id, host: o.host, port: o.port };
  }
  if (o.t === 'unlisten') return { t: 'unlisten', id: o.id };
  if (o.t === 'connect_unix' && isValidSocketPath(o.path)) return { t: 'connect_unix', id: o.id, path: o.path };
  const mask = typeof o.mask === 'number' && Number.isInteger(o.mask) && o.mask >= 0 && o.mask <= 0o777 ? o.mask : null;
  if (o.t === 'listen_unix' && isValidSocketPath(o.path) && mask !== null) return { t: 'listen_unix', id: o.id, path: o.path, mask, unlink: o.unlink === true };
  if (o.t === 'listen_agent' && mask !== null) return { t: 'listen_agent', id: o.id, mask };
  return null;
}

export function parseFromHelper(m: unknown): FromHelper | null {
  if (!m || typeof m !== 'object') return null;
  const o = m as Record<string, unknown>;
  if (o.t === 'ready') return { t: 'ready' };
  if (o.t === 'rejected') {
    return { t: 'rejected', count: typeof o.count === 'number' && Number.isInteger(o.count) && o.count > 0 ? o.count : 1, reason: String(o.reason ?? '').slice(0, 128) };
  }
  if (!isId(o.id)) return null;
  switch (o.t) {
    case 'connected':
      return { t: 'connected', id: o.id };
    case 'failed':
      return { t: 'failed', id: o.id, code: String(o.code ?? 'ERROR').slice(0, 64), message: String(o.message ?? '').slice(0, 256) };
    case 'listening':
      if (o.path !== undefined) return o.port === 0 && typeof o.path === 'string' && AGENT_PATH_RE.test(o.path) ? { t: 'listening', id: o.id, port: 0, path: o.path } : null;
      return isValidPort(o.port, true) ? { t: 'listening', id: o.id, port: o.port } : null;
    case 'accepted':
      return { t: 'accepted', id: o.id, remoteAddress: String(o.remoteAddress ?? '').slice(0, 64), remotePort: isValidPort(o.remotePort, true) ? o.remotePort : 0 };
    default:
      return null;
  }
}

/**
 * Where the helper should bind for a client's bind address (RFC 4254 7.1):
 * "" and "*" mean every address of the VE, "localhost" its loopback.
 */
export function listenHostFor(bindAddr: string): string {
  if (bindAddr === '' || bindAddr === '*' || bindAddr === '0.0.0.0') return '0.0.0.0';
  if (bindAddr === 'localhost') return '127.0.0.1';
  return bindAddr;
}
