import net from 'node:net';
import type { Connection, ServerChannel } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import { errorMessage } from '../errors.js';
import { closeFd } from '../system/fdpass.js';
import { BrokerRefusal, type ConnectionBroker } from '../worker/broker-client.js';

/**
 * ssh2's server opens only forwarded-tcpip, x11 and forwarded-streamlocal
 * channels itself; auth-agent@openssh.com is opened here through the same
 * internals its openChannel uses (the channel table and the protocol's
 * openssh_authAgent, which its client side sends). Its CHANNEL_OPEN_CONFIRMATION
 * and _FAILURE handlers serve any channel in that table: they make a Channel
 * for the callback or report the failure. Our receive window and packet size
 * are those ssh2 gives the channel on confirmation (Channel.js MAX_WINDOW,
 * PACKET_SIZE).
 */
interface Ssh2ChannelInternals {
  _chanMgr: { add(wrapper: unknown): number };
  _protocol: { openssh_authAgent(chan: number, initWindow: number, maxPacket: number): void };
}
const SSH2_MAX_WINDOW = 2 * 1024 * 1024;
const SSH2_PACKET_SIZE = 32 * 1024;

/** What agent forwarding needs from its connection. */
export interface AgentForwardingContext {
  conn: Connection;
  broker: ConnectionBroker;
  log: Logger;
  /** Channel budget shared with sessions and forwards; false means "refuse, too many". */
  reserveChannel(): boolean;
  releaseChannel(): void;
  /** Relay a socket and a channel both ways with half-close (ConnectionForwarding.relayChannel). */
  relay(channel: ServerChannel, socket: net.Socket, what: Record<string, unknown>): void;
}

/**
 * Agent forwarding (ssh -A) for one connection. The first session that asks
 * (auth-agent-req@openssh.com) has the broker make the connection's agent
 * socket inside the VE; the broker then gives every later session of the
 * connection SSH_AUTH_SOCK. Each connection a program in the VE makes to
 * that socket reaches us as a socket from the broker, and is relayed to the
 * client's agent over a new auth-agent@openssh.com channel. Whether it is
 * allowed (server, account, key) is the broker's decision, made from what it
 * authenticated; the socket goes away with the connection (the helper that
 * holds it removes it when its relay closes).
 */
export class AgentForwarding {
  private listening: Promise<boolean> | null = null;
  private listener: number | null = null;
  private closed = false;

  constructor(private readonly ctx: AgentForwardingContext) {}

  /**
   * A session asked for agent forwarding. Resolves with whether the socket is
   * there; sessions wait for this before they start, so the broker sets their
   * SSH_AUTH_SOCK (OpenSSH's client sends the request without wanting a reply,
   * and the shell request right after it).
   */
  request(): Promise<boolean> {
    if (!this.listening) {
      this.listening = this.ctx.broker.agentListen().then((a) => {
        this.listener = a.listener;
        return !this.closed;
      }, (err: unknown) => {
        // The broker logged why (agent.refused); a refusal stands for the whole connection.
        if (!(err instanceof BrokerRefusal)) this.ctx.log.warn({ event: 'agent.failed', err: errorMessage(err) });
        return false;
      });
    }
    return this.listening;
  }

  /** The request in flight, if any: what a session waits for before it starts. */
  get pending(): Promise<boolean> | null {
    return this.listening;
  }

  /** Whether `listener` is the agent socket's (its connections come here, not to the -R forwards). */
  owns(listener: number): boolean {
    return this.listener !== null && listener === this.listener;
  }

  /** A program in the VE connected to the agent socket: relay it to the client's agent. */
  onAccepted(fd: number): void {
    if (this.closed || !this.ctx.reserveChannel()) {
      closeFd(fd);
      return;
    }
    const socket = new net.Socket({ fd, readable: true, writable: true, allowHalfOpen: true });
    socket.on('error', () => undefined);
    this.openAgentChannel((err, channel) => {
      if (err || this.closed || !channel) {
        this.ctx.releaseChannel();
        socket.destroy();
        if (err) this.ctx.log.info({ event: 'agent.channel_failed', err: errorMessage(err) });
        return;
      }
      this.ctx.relay(channel, socket, { kind: 'agent' });
    });
  }

  private openAgentChannel(cb: (err: Error | undefined, channel?: ServerChannel) => void): void {
    openClientAgentChannel(this.ctx.conn, cb);
  }

  close(): void {
    this.closed = true;
  }
}

/** Open an auth-agent@openssh.com channel to the client's agent (see Ssh2ChannelInternals). */
export function openClientAgentChannel(conn: Connection, cb: (err: Error | undefined, channel?: ServerChannel) => void): void {
  const internals = conn as unknown as Ssh2ChannelInternals;
  const wrapper = Object.assign((err: Error | undefined, channel?: ServerChannel) => cb(err, channel), { type: 'auth-agent@openssh.com' });
  let local: number;
  try {
    local = internals._chanMgr.add(wrapper);
    if (local === -1) {
      cb(new Error('no free channels'));
      return;
    }
    internals._protocol.openssh_authAgent(local, SSH2_MAX_WINDOW, SSH2_PACKET_SIZE);
  } catch (err) {
    cb(err instanceof Error ? err : new Error(String(err)));
  }
}
