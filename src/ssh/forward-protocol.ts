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
 *   { t: 'unlisten', id }                close a listener (cancel-tcpip-forward)
 * Relay → server (for the helper):
 *   { t: 'ready' }                                       once, at start
 *   { t: 'connected', id } + socket                      connect succeeded
 *   { t: 'failed', id, code, message }                   connect or listen failed
 *   { t: 'listening', id, port }                         listener bound
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
  | { t: 'unlisten'; id: number };

export type FromHelper =
  | { t: 'ready' }
  | { t: 'connected'; id: number }
  | { t: 'failed'; id: number; code: string; message: string }
  | { t: 'listening'; id: number; port: number }
  | { t: 'accepted'; id: number; remoteAddress: string; remotePort: number }
  | { t: 'rejected'; count: number; reason: string };

const HOST_RE = /^[A-Za-z0-9._:%-]{1,253}$/;

export function isValidHost(host: unknown): host is string {
  return typeof host === 'string' && HOST_RE.test(host);
}

export function isValidPort(port: unknown, allowZero: boolean): port is number {
  return typeof port === 'number' && Number.isInteger(port) && port <= 65535 && (allowZero ? port >= 0 : port >= 1);
}

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
      return isValidPort(o.port, false) ? { t: 'listening', id: o.id, port: o.port } : null;
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
