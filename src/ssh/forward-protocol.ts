/**
 * The message set between the SSH server and its port-forward helper
 * (src/native/vesh-forward.c), which runs inside a VE with all of the VE's
 * namespaces and confinement.
 *
 * Transport: Node's IPC channel (a Unix socketpair set up by
 * child_process.spawn with an 'ipc' stdio slot, passed into the VE by the
 * engine as fd 3). Each message is one JSON object a line; a message that
 * carries a connection also carries its socket descriptor (SCM_RIGHTS) as
 * the send handle, framed as Node frames handles.
 *
 * Why descriptors and not data frames: the helper creates every socket in the
 * VE's namespace — so `localhost` is the VE's loopback and a listener is the
 * VE's — and then hands the connected socket to the server, which relays it
 * to the SSH channel directly. No byte passes through the helper, the kernel
 * socket buffers give both directions their natural backpressure (a framed
 * multiplexer would need its own per-stream flow control), and one helper
 * per SSH connection serves every -L and -R of it.
 *
 * Server → helper:
 *   { t: 'connect', id, host, port }     open a TCP connection (for -L)
 *   { t: 'listen', id, host, port }      listen (for -R); port 0 = any
 *   { t: 'unlisten', id }                close a listener (cancel-tcpip-forward)
 * Helper → server:
 *   { t: 'ready' }                                       once, at start
 *   { t: 'connected', id } + socket                      connect succeeded
 *   { t: 'failed', id, code, message }                   connect or listen failed
 *   { t: 'listening', id, port }                         listener bound
 *   { t: 'accepted', id, remoteAddress, remotePort } + socket   a -R connection arrived
 *   { t: 'closed', id }                                  listener closed
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
  | { t: 'closed'; id: number };

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
  if (!isId(o.id)) return null;
  switch (o.t) {
    case 'connected':
    case 'closed':
      return { t: o.t, id: o.id };
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
