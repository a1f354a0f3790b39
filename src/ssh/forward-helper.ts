/**
 * Port-forward helper: a separate program, started by the SSH server through
 * VeAccess.netCommand (nsenter into the VE's user and network namespaces, as
 * the account's VE user). Every socket it makes therefore lives in the VE's
 * network: `localhost` is the VE's loopback and listeners are the VE's. It
 * hands each connected socket to the server over the IPC channel (see
 * forward-protocol.ts) and carries no data itself.
 *
 * It imports nothing but Node built-ins and the protocol module, because it
 * runs as an unprivileged uid that can read only world-readable files.
 */
import net from 'node:net';
import { parseToHelper, type FromHelper, type ToHelper } from './forward-protocol.js';

const CONNECT_TIMEOUT_MS = 10_000;

function send(msg: FromHelper, handle?: net.Socket): void {
  if (!process.send || !process.connected) return;
  // keepOpen false: once the descriptor is on its way, our copy is closed.
  if (handle) process.send(msg, handle, { keepOpen: false }, () => undefined);
  else process.send(msg, undefined, {}, () => undefined);
}

const listeners = new Map<number, net.Server>();

function failure(id: number, err: unknown): FromHelper {
  const e = err as NodeJS.ErrnoException;
  return { t: 'failed', id, code: e.code ?? 'ERROR', message: (e.message ?? String(err)).slice(0, 200) };
}

function connect(m: Extract<ToHelper, { t: 'connect' }>): void {
  const sock = net.connect({ host: m.host, port: m.port });
  const timer = setTimeout(() => {
    sock.destroy();
    send({ t: 'failed', id: m.id, code: 'ETIMEDOUT', message: `connect to ${m.host}:${m.port} timed out` });
  }, CONNECT_TIMEOUT_MS);
  sock.once('connect', () => {
    clearTimeout(timer);
    // Stop reading before handing the descriptor over, so no byte is left behind here.
    sock.pause();
    send({ t: 'connected', id: m.id }, sock);
  });
  sock.once('error', (err) => {
    clearTimeout(timer);
    send(failure(m.id, err));
  });
}

function listen(m: Extract<ToHelper, { t: 'listen' }>): void {
  if (listeners.has(m.id)) return;
  // pauseOnConnect: an accepted socket is not read before it is handed over.
  const server = net.createServer({ pauseOnConnect: true }, (sock) => {
    sock.on('error', () => undefined);
    send({ t: 'accepted', id: m.id, remoteAddress: sock.remoteAddress ?? '', remotePort: sock.remotePort ?? 0 }, sock);
  });
  server.once('error', (err) => {
    listeners.delete(m.id);
    send(failure(m.id, err));
  });
  server.listen({ host: m.host, port: m.port, exclusive: true }, () => {
    server.removeAllListeners('error');
    server.on('error', () => undefined);
    const addr = server.address();
    send({ t: 'listening', id: m.id, port: typeof addr === 'object' && addr ? addr.port : m.port });
  });
  listeners.set(m.id, server);
}

function unlisten(id: number): void {
  const server = listeners.get(id);
  listeners.delete(id);
  if (server) server.close(() => send({ t: 'closed', id }));
  else send({ t: 'closed', id });
}

if (!process.send) {
  process.stderr.write('vesh forward helper: start me from the SSH server (needs an IPC channel)\n');
  process.exit(2);
}

process.on('message', (raw: unknown) => {
  const m = parseToHelper(raw);
  if (!m) return;
  if (m.t === 'connect') connect(m);
  else if (m.t === 'listen') listen(m);
  else unlisten(m.id);
});
// The server went away (or closed the SSH connection): nothing left to serve.
process.on('disconnect', () => process.exit(0));
send({ t: 'ready' });
