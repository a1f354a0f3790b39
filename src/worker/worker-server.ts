import net from 'node:net';
import ssh2, { type ClientInfo, type Connection } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import type { BrokerEvent, WorkerSettings } from '../broker/request-table.js';
import { errorMessage } from '../errors.js';
import { SERVER_ALGORITHMS } from '../ssh/algorithms.js';
import { SshConnection } from '../ssh/connection.js';
import { ackShortRead, closeFd } from '../system/fdpass.js';
import { ConnectionBroker, type BrokerClient } from './broker-client.js';
import { brokerSignedHostKeys, type SignFn } from './host-key-proxy.js';

const Ssh2Server = ssh2.Server;

/** One client connection the broker handed us. */
interface Held {
  id: string;
  socket: net.Socket;
  source: string;
  port: number;
  connection: SshConnection | null;
  firstBytes: Buffer | null;
  reported: boolean;
}

/**
 * The SSH side of a worker: ssh2 over the sockets the broker hands over,
 * one SshConnection each, every privileged step a request to the broker.
 */
export class WorkerServer {
  private readonly ssh: InstanceType<typeof ssh2.Server>;
  private readonly held = new Map<string, Held>();
  private readonly bySocket = new Map<net.Socket, Held>();
  /** The connection whose bytes ssh2 is parsing right now: a key exchange signs for it. */
  private current: string | null = null;

  constructor(
    private readonly client: BrokerClient,
    hostKeys: Array<{ type: string; publicSsh: string }>,
    sign: SignFn,
    private readonly settings: WorkerSettings,
    private readonly log: Logger,
  ) {
    this.ssh = new Ssh2Server({
      hostKeys: brokerSignedHostKeys(hostKeys, (keyType, data, hashAlgo) => {
        if (!this.current) throw new Error('a key exchange outside of any connection');
        return sign(this.current, keyType, data, hashAlgo);
      }),
      algorithms: SERVER_ALGORITHMS,
      ident: 'vesh',
    });
    this.ssh.on('error', (err: Error) => this.log.error({ event: 'ssh.server_error', err: errorMessage(err) }));
    this.ssh.on('connection', (conn: Connection, info: ClientInfo) => this.onSshConnection(conn, info));
  }

  /** The broker's unasked messages. */
  onEvent(ev: BrokerEvent, fds: number[]): void {
    switch (ev.ev) {
      case 'conn.new':
        if (fds.length !== 1) {
          for (const fd of fds) closeFd(fd);
          return;
        }
        this.adopt(ev, fds[0]!);
        return;
      case 'session.exit':
        this.held.get(ev.conn)?.connection?.sessionExited(ev.session, ev.report);
        return;
      case 'forward.accepted': {
        const ok = fds.length === 1 && this.held.get(ev.conn)?.connection?.forwardAccepted(ev.listener, fds[0]!, ev.remoteAddress, ev.remotePort);
        if (!ok) for (const fd of fds) closeFd(fd);
        return;
      }
      case 'conn.end':
        this.held.get(ev.conn)?.connection?.endByAdmin(ev.reason);
        return;
      case 'session.notice':
        this.held.get(ev.conn)?.connection?.sessionNotice(ev.session, ev.text);
        return;
      case 'shutdown':
        void this.shutdown(ev.timeoutMs);
        return;
      default:
        for (const fd of fds) closeFd(fd);
    }
  }

  private adopt(ev: Extract<BrokerEvent, { ev: 'conn.new' }>, fd: number): void {
    let socket: net.Socket;
    try {
      socket = new net.Socket({ fd, readable: true, writable: true });
    } catch (err) {
      closeFd(fd);
      this.log.error({ event: 'ssh.adopt_failed', conn: ev.conn, err: errorMessage(err) });
      new ConnectionBroker(this.client, ev.conn).closed({ stage: 'normal', bytesRead: 0 });
      return;
    }
    socket.setNoDelay(true);
    socket.on('error', (err) => this.log.debug({ event: 'ssh.socket_error', conn: ev.conn, err: errorMessage(err) }));
    const h: Held = { id: ev.conn, socket, source: ev.source, port: ev.port, connection: null, firstBytes: null, reported: false };
    this.held.set(ev.conn, h);
    this.bySocket.set(socket, h);
    socket.once('close', () => this.onSocketClose(h));
    this.ssh.injectSocket(socket);
    // After ssh2's own listener is in place: mark whose bytes are parsed now,
    // so that a key exchange in them is signed for this connection.
    socket.prependListener('data', (d: Buffer) => {
      this.current = h.id;
      // Short reads ACKed at once (ackShortRead says why).
      ackShortRead(fd, d.length);
    });
    socket.once('data', (d: Buffer) => {
      if (!h.connection) h.firstBytes = Buffer.from(d.subarray(0, 64));
    });
  }

  private onSshConnection(conn: Connection, info: ClientInfo): void {
    const socket = (conn as unknown as { _sock: net.Socket })._sock;
    const h = this.bySocket.get(socket);
    if (!h) {
      conn.on('error', () => undefined);
      conn.end();
      return;
    }
    h.firstBytes = null;
    const log = this.log.child({ conn: h.id });
    log.info({ event: 'ssh.identification', source: h.source, client: String(info.header?.identRaw ?? '').slice(0, 128) });
    h.connection = new SshConnection(h.id, conn, { ...info, ip: h.source, port: h.port }, socket, {
      broker: new ConnectionBroker(this.client, h.id),
      maxSessions: this.settings.maxSessions,
    }, log);
  }

  private onSocketClose(h: Held): void {
    if (h.reported) return;
    h.reported = true;
    this.held.delete(h.id);
    this.bySocket.delete(h.socket);
    if (this.current === h.id) this.current = null;
    const protocolError = h.connection?.protocolError ?? undefined;
    // After ssh2's own 'close' handlers (our SshConnection hangs up its
    // sessions there), so the broker hears of those before the close.
    setImmediate(() => new ConnectionBroker(this.client, h.id).closed({
      stage: !h.connection ? 'before identification' : protocolError ? 'protocol error' : 'normal',
      bytesRead: h.socket.bytesRead,
      ...(h.firstBytes ? { firstBytes: JSON.stringify(h.firstBytes.toString('latin1')).slice(0, 256) } : {}),
      ...(protocolError ? { protocolError: protocolError.slice(0, 300) } : {}),
    }));
  }

  /** Server shutdown: sessions end as the broker hangs their processes up, then every connection says goodbye. */
  private async shutdown(timeoutMs: number): Promise<void> {
    this.log.info({ event: 'ssh.shutdown', connections: this.held.size });
    await Promise.all([...this.held.values()].map(async (h) => {
      if (h.connection) await h.connection.shutdown(timeoutMs);
      else h.socket.destroy();
    }));
  }
}
