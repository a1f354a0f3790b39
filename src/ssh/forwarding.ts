import net from 'node:net';
import type { Connection, ServerChannel, TcpipBindInfo, TcpipRequestInfo } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import { errorMessage } from '../errors.js';
import { closeFd } from '../system/fdpass.js';
import type { ConnectionBroker } from '../worker/broker-client.js';
import { isValidHost, isValidPort, isValidSocketPath, listenHostFor } from './forward-protocol.js';
import { MAX_REMOTE_FORWARDS_PER_CONNECTION } from './limits.js';

/** What forwarding needs from its connection. */
export interface ForwardingContext {
  conn: Connection;
  /** The broker asks the VE's forward relay for us and hands back sockets. */
  broker: ConnectionBroker;
  log: Logger;
  /** null when allowed, else why not (account setting or key option). */
  refusal: string | null;
  /** Channel budget shared with sessions; false means "refuse, too many". */
  reserveChannel(): boolean;
  releaseChannel(): void;
}

interface RemoteListener {
  id: number;
  bindAddr: string;
  port: number;
  /** A Unix-socket listener (streamlocal-forward): its path, as the client named it. */
  path?: string;
}

/**
 * Port forwarding for one connection. Every socket is made inside the VE's
 * network namespace by the forward helper that the broker starts there:
 * `ssh -L` connects from the VE (so `localhost` is the VE's loopback),
 * `ssh -R` listens in the VE. Nothing ever connects or listens in the
 * host's namespace on a user's behalf; the worker only gets sockets.
 */
export class ConnectionForwarding {
  private readonly listeners = new Map<string, RemoteListener>();
  private readonly byId = new Map<number, RemoteListener>();
  private closed = false;

  constructor(private readonly ctx: ForwardingContext) {}

  /** direct-tcpip: the client's -L. */
  onDirectTcpip(accept: () => ServerChannel, reject: () => void, info: TcpipRequestInfo): void {
    const target = { host: info.destIP, port: info.destPort };
    const origin = { address: String(info.srcIP).slice(0, 64), port: info.srcPort };
    if (this.ctx.refusal) {
      this.ctx.log.info({ event: 'forward.refused', kind: 'local', target, reason: this.ctx.refusal });
      reject();
      return;
    }
    if (!isValidHost(info.destIP) || !isValidPort(info.destPort, false)) {
      this.ctx.log.info({ event: 'forward.refused', kind: 'local', reason: 'invalid target', target: { host: String(info.destIP).slice(0, 64), port: info.destPort } });
      reject();
      return;
    }
    if (!this.ctx.reserveChannel()) {
      reject();
      return;
    }
    void this.ctx.broker.forwardConnect(info.destIP, info.destPort)
      .then((fd) => {
        if (this.closed) {
          closeFd(fd);
          this.ctx.releaseChannel();
          return;
        }
        const socket = new net.Socket({ fd, readable: true, writable: true, allowHalfOpen: true });
        const channel = accept();
        this.relayChannel(channel, socket, { kind: 'local', target, origin });
      }, (err: unknown) => {
        this.ctx.releaseChannel();
        this.ctx.log.info({ event: 'forward.failed', kind: 'local', target, err: errorMessage(err) });
        reject();
      });
  }

  /**
   * direct-streamlocal@openssh.com: the client's -L to a Unix socket. The
   * path is connected to by the helper inside the VE, as the account's
   * user: symlinks, /proc/<pid>/root and permissions resolve in the VE.
   */
  onDirectStreamLocal(accept: () => ServerChannel, reject: () => void, info: { socketPath?: unknown }): void {
    const path = String(info.socketPath ?? '');
    const target = { path: path.slice(0, 120) };
    if (this.ctx.refusal) {
      this.ctx.log.info({ event: 'forward.refused', kind: 'local-unix', target, reason: this.ctx.refusal });
      reject();
      return;
    }
    if (!isValidSocketPath(path)) {
      this.ctx.log.info({ event: 'forward.refused', kind: 'local-unix', target, reason: 'invalid socket path (an absolute path of printable ASCII, at most 107 bytes)' });
      reject();
      return;
    }
    if (!this.ctx.reserveChannel()) {
      reject();
      return;
    }
    void this.ctx.broker.forwardConnectUnix(path)
      .then((fd) => {
        if (this.closed) {
          closeFd(fd);
          this.ctx.releaseChannel();
          return;
        }
        const socket = new net.Socket({ fd, readable: true, writable: true, allowHalfOpen: true });
        this.relayChannel(accept(), socket, { kind: 'local-unix', target });
      }, (err: unknown) => {
        this.ctx.releaseChannel();
        this.ctx.log.info({ event: 'forward.failed', kind: 'local-unix', target, err: errorMessage(err) });
        reject();
      });
  }

  /** tcpip-forward / cancel-tcpip-forward: the client's -R; streamlocal-forward / cancel-streamlocal-forward@openssh.com: its -R to a Unix socket. */
  onGlobalRequest(accept: ((port?: number) => void) | undefined, reject: (() => void) | undefined, name: string, info: TcpipBindInfo): void {
    if (name === 'tcpip-forward') void this.listen(accept, reject, info);
    else if (name === 'cancel-tcpip-forward') this.cancel(accept, reject, info);
    else if (name === 'streamlocal-forward@openssh.com') void this.listenUnix(accept, reject, String((info as unknown as { socketPath?: unknown }).socketPath ?? ''));
    else if (name === 'cancel-streamlocal-forward@openssh.com') this.cancelUnix(accept, reject, String((info as unknown as { socketPath?: unknown }).socketPath ?? ''));
    else reject?.();
  }

  private async listenUnix(accept: (() => void) | undefined, reject: (() => void) | undefined, path: string): Promise<void> {
    const bind = { path: path.slice(0, 120) };
    if (this.ctx.refusal) {
      this.ctx.log.info({ event: 'forward.refused', kind: 'remote-unix', bind, reason: this.ctx.refusal });
      reject?.();
      return;
    }
    const key = `unix:${path}`;
    if (!isValidSocketPath(path) || this.listeners.has(key) || this.listeners.size >= MAX_REMOTE_FORWARDS_PER_CONNECTION) {
      const reason = !isValidSocketPath(path) ? 'invalid socket path (an absolute path of printable ASCII, at most 107 bytes)' : this.listeners.has(key) ? 'already forwarded on this connection' : 'too many remote forwards';
      this.ctx.log.info({ event: 'forward.refused', kind: 'remote-unix', bind, reason });
      reject?.();
      return;
    }
    this.listensInFlight += 1;
    try {
      const id = await this.ctx.broker.forwardListenUnix(path);
      if (this.closed) return;
      const rl: RemoteListener = { id, bindAddr: '', port: 0, path };
      this.listeners.set(key, rl);
      this.byId.set(id, rl);
      this.ctx.log.info({ event: 'forward.listen', kind: 'remote-unix', bind });
      accept?.();
    } catch (err) {
      this.ctx.log.info({ event: 'forward.failed', kind: 'remote-unix', bind, err: errorMessage(err) });
      reject?.();
    } finally {
      this.listensInFlight -= 1;
      const early = this.early.splice(0);
      for (const e of early) this.onAccepted(e.listener, e.fd, e.remoteAddress, e.remotePort);
    }
  }

  private cancelUnix(accept: (() => void) | undefined, reject: (() => void) | undefined, path: string): void {
    this.unlisten(`unix:${path}`, accept, reject, { kind: 'remote-unix', bind: { path: path.slice(0, 120) } });
  }

  /** cancel-tcpip-forward / cancel-streamlocal-forward: the listener this connection made under `key`, or a refusal. */
  private unlisten(key: string, accept: (() => void) | undefined, reject: (() => void) | undefined, what: Record<string, unknown>): void {
    const rl = this.listeners.get(key);
    if (!rl) {
      reject?.();
      return;
    }
    this.listeners.delete(key);
    this.byId.delete(rl.id);
    this.ctx.broker.forwardUnlisten(rl.id);
    this.ctx.log.info({ event: 'forward.unlisten', ...what });
    accept?.();
  }

  private async listen(accept: ((port?: number) => void) | undefined, reject: (() => void) | undefined, info: TcpipBindInfo): Promise<void> {
    const bind = { address: String(info.bindAddr).slice(0, 64), port: info.bindPort };
    if (this.ctx.refusal) {
      this.ctx.log.info({ event: 'forward.refused', kind: 'remote', bind, reason: this.ctx.refusal });
      reject?.();
      return;
    }
    const host = listenHostFor(info.bindAddr);
    if (!isValidHost(host) || !isValidPort(info.bindPort, true) || this.listeners.size >= MAX_REMOTE_FORWARDS_PER_CONNECTION) {
      this.ctx.log.info({ event: 'forward.refused', kind: 'remote', bind, reason: this.listeners.size >= MAX_REMOTE_FORWARDS_PER_CONNECTION ? 'too many remote forwards' : 'invalid bind address' });
      reject?.();
      return;
    }
    this.listensInFlight += 1;
    try {
      const l = await this.ctx.broker.forwardListen(host, info.bindPort);
      if (this.closed) return;
      const rl: RemoteListener = { id: l.listener, bindAddr: info.bindAddr, port: l.port };
      this.listeners.set(`${info.bindAddr}:${l.port}`, rl);
      this.byId.set(l.listener, rl);
      this.ctx.log.info({ event: 'forward.listen', kind: 'remote', bind: { address: bind.address, port: l.port } });
      accept?.(l.port);
    } catch (err) {
      this.ctx.log.info({ event: 'forward.failed', kind: 'remote', bind, err: errorMessage(err) });
      reject?.();
    } finally {
      this.listensInFlight -= 1;
      // Connections that reached a listener before we had read its answer.
      const early = this.early.splice(0);
      for (const e of early) this.onAccepted(e.listener, e.fd, e.remoteAddress, e.remotePort);
    }
  }

  private listensInFlight = 0;
  /** Connections the broker passed for a listener whose answer was not processed yet (same batch of frames). */
  private readonly early: Array<{ listener: number; fd: number; remoteAddress: string; remotePort: number }> = [];

  private cancel(accept: (() => void) | undefined, reject: (() => void) | undefined, info: TcpipBindInfo): void {
    this.unlisten(`${info.bindAddr}:${info.bindPort}`, accept, reject, { kind: 'remote', bind: { address: String(info.bindAddr).slice(0, 64), port: info.bindPort } });
  }

  /** A connection arrived on a -R listener inside the VE (the broker passed its socket): open a forwarded-tcpip channel for it. */
  onAccepted(listenerId: number, fd: number, remoteAddress: string, remotePort: number): void {
    if (!this.byId.has(listenerId) && this.listensInFlight > 0 && !this.closed && this.early.length < MAX_REMOTE_FORWARDS_PER_CONNECTION) {
      this.early.push({ listener: listenerId, fd, remoteAddress, remotePort });
      return;
    }
    const rl = this.byId.get(listenerId);
    if (!rl || this.closed || !this.ctx.reserveChannel()) {
      closeFd(fd);
      return;
    }
    const socket = new net.Socket({ fd, readable: true, writable: true, allowHalfOpen: true });
    socket.on('error', () => undefined);
    if (rl.path !== undefined) {
      const bind = { path: rl.path.slice(0, 120) };
      this.ctx.conn.openssh_forwardOutStreamLocal(rl.path, (err, channel) => {
        if (err || this.closed) {
          this.ctx.releaseChannel();
          socket.destroy();
          if (err) this.ctx.log.info({ event: 'forward.failed', kind: 'remote-unix', bind, err: errorMessage(err) });
          return;
        }
        this.relayChannel(channel as unknown as ServerChannel, socket, { kind: 'remote-unix', bind });
      });
      return;
    }
    this.ctx.conn.forwardOut(rl.bindAddr, rl.port, remoteAddress || '0.0.0.0', remotePort, (err, channel) => {
      if (err || this.closed) {
        this.ctx.releaseChannel();
        socket.destroy();
        if (err) this.ctx.log.info({ event: 'forward.failed', kind: 'remote', bind: { address: rl.bindAddr, port: rl.port }, err: errorMessage(err) });
        return;
      }
      this.relayChannel(channel as unknown as ServerChannel, socket, { kind: 'remote', bind: { address: rl.bindAddr, port: rl.port }, origin: { address: remoteAddress, port: remotePort } });
    });
  }

  /**
   * Relay a forwarded TCP connection and its channel, with half-close both
   * ways: many clients send EOF first and then wait for the answer (`nc`,
   * request/response tools). Node would end a socket's writing side when its
   * reading side ends, and ssh2 closes a server channel when its writing side
   * ends; both are avoided here — EOF travels as EOF, and the channel closes
   * only when both directions are done.
   */
  relayChannel(channel: ServerChannel, socket: net.Socket, what: Record<string, unknown>): void {
    const opened = Date.now();
    this.ctx.log.info({ event: 'forward.open', ...what });
    socket.allowHalfOpen = true;
    let done = false;
    let socketEnded = false;
    let channelEnded = false;
    const finish = () => {
      if (done) return;
      done = true;
      this.ctx.releaseChannel();
      this.ctx.log.info({ event: 'forward.close', ...what, durationMs: Date.now() - opened, bytesToVe: socket.bytesWritten, bytesFromVe: socket.bytesRead });
    };
    const closeWhenBothEnded = () => {
      if (socketEnded && channelEnded) {
        channel.close();
        socket.end();
      }
    };
    channel.on('error', () => socket.destroy());
    socket.on('error', () => {
      channel.close();
      socket.destroy();
    });
    // VE → client: data, then EOF once every byte went out.
    socket.pipe(channel, { end: false });
    socket.on('end', () => {
      channel.write(Buffer.alloc(0), () => {
        channel.eof();
        socketEnded = true;
        closeWhenBothEnded();
      });
    });
    // client → VE: data, then a half-close of the socket on the client's EOF.
    channel.pipe(socket);
    channel.on('end', () => {
      channelEnded = true;
      closeWhenBothEnded();
    });
    socket.on('close', () => {
      // Reset or closed by the VE side without a clean end: close the channel too.
      if (!socketEnded) channel.close();
    });
    channel.on('close', () => {
      socket.destroy();
      finish();
    });
    socket.resume();
  }

  close(): void {
    this.closed = true;
    for (const e of this.early.splice(0)) closeFd(e.fd);
    this.listeners.clear();
    this.byId.clear();
  }
}
