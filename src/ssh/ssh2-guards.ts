import type { Connection } from 'ssh2';
import { MIN_PEER_MAX_PACKET } from './limits.js';

/**
 * Guards for open bugs in ssh2 1.17 that a hostile client can trigger after
 * logging in. They wrap ssh2's per-connection message handlers (internal, but
 * stable across 1.x: `client._protocol._handlers` is the table the parser
 * calls, `client._chanMgr` maps our channel ids to channel objects). When
 * upstream fixes land, delete the matching wrapper.
 *
 * - #1504: a peer maximum packet size of 0 makes Channel._write loop forever
 *   (slice length 0, no progress). We refuse CHANNEL_OPEN with a packet size
 *   below MIN_PEER_MAX_PACKET, and drop a connection whose
 *   CHANNEL_OPEN_CONFIRMATION (for a -R channel we opened) carries one.
 * - #1505: ssh2 drops CHANNEL_DATA only when the receive window is exactly 0
 *   and then subtracts, so one oversized packet drives the window negative
 *   and from then on everything is buffered. We treat data beyond the window
 *   as the protocol violation it is (RFC 4254 5.2) and drop the connection.
 */

interface ChannelInfoLike {
  incoming: { window: number };
}

/** The part of ssh2's internal Client that the guards touch. */
interface Ssh2ClientInternals {
  _protocol: {
    _handlers: Record<string, ((...args: unknown[]) => unknown) | undefined>;
    channelOpenFail(recipient: number, reason: number, desc: string): void;
    disconnect(reason: number): void;
  };
  _chanMgr: { get(id: number): unknown };
  _sock?: { destroy(): void };
}

const OPEN_FAILURE_ADMINISTRATIVELY_PROHIBITED = 1;
const DISCONNECT_PROTOCOL_ERROR = 2;

export interface GuardEvents {
  /** Called once a guard refused or dropped something; `fatal` means the connection is being closed. */
  onViolation(what: string, details: Record<string, unknown>, fatal: boolean): void;
  /** Called for every channel or global request type ssh2 will refuse on its own, so it can be logged. */
  onUnknownRequest(kind: 'channel' | 'global', type: string): void;
}

/** Channel request types our session handler serves; ssh2 refuses the rest without telling us. */
const HANDLED_CHANNEL_REQUESTS = new Set(['env', 'pty-req', 'window-change', 'shell', 'exec', 'subsystem', 'signal', 'auth-agent-req@openssh.com']);
/** Known requests we decline on purpose (no X11); not worth a log line each. */
const DECLINED_CHANNEL_REQUESTS = new Set(['x11-req', 'keepalive@openssh.com', 'eow@openssh.com', 'xon-xoff', 'break']);
const HANDLED_GLOBAL_REQUESTS = new Set(['tcpip-forward', 'cancel-tcpip-forward', 'no-more-sessions@openssh.com', 'streamlocal-forward@openssh.com', 'cancel-streamlocal-forward@openssh.com']);
const DECLINED_GLOBAL_REQUESTS = new Set(['keepalive@openssh.com', 'hostkeys-prove-00@openssh.com']);

export function installProtocolGuards(conn: Connection, events: GuardEvents): void {
  const client = conn as unknown as Ssh2ClientInternals;
  const handlers = client._protocol._handlers;
  const proto = client._protocol;

  const drop = (what: string, details: Record<string, unknown>) => {
    events.onViolation(what, details, true);
    try {
      proto.disconnect(DISCONNECT_PROTOCOL_ERROR);
    } catch { /* socket already gone */ }
    client._sock?.destroy();
  };

  const origOpen = handlers.CHANNEL_OPEN;
  handlers.CHANNEL_OPEN = (p: unknown, info: unknown) => {
    const i = info as { sender: number; packetSize: number; type: string };
    if (!(i.packetSize >= MIN_PEER_MAX_PACKET)) {
      events.onViolation('channel_open_packet_size', { channelType: i.type, packetSize: i.packetSize }, false);
      proto.channelOpenFail(i.sender, OPEN_FAILURE_ADMINISTRATIVELY_PROHIBITED, '');
      return;
    }
    return origOpen?.(p, info);
  };

  const origConfirm = handlers.CHANNEL_OPEN_CONFIRMATION;
  handlers.CHANNEL_OPEN_CONFIRMATION = (p: unknown, info: unknown) => {
    const i = info as { packetSize: number };
    if (!(i.packetSize >= MIN_PEER_MAX_PACKET)) {
      drop('channel_confirm_packet_size', { packetSize: i.packetSize });
      return;
    }
    return origConfirm?.(p, info);
  };

  const origData = handlers.CHANNEL_DATA;
  handlers.CHANNEL_DATA = (p: unknown, recipient: unknown, data: unknown) => {
    const entry = client._chanMgr.get(recipient as number) as Partial<ChannelInfoLike> & { _channel?: ChannelInfoLike } | undefined;
    // A Session object has no window of its own; its stream (after shell/exec) is _channel.
    const ch = entry && typeof entry === 'object' ? (entry.incoming ? (entry as ChannelInfoLike) : entry._channel) : undefined;
    if (ch && (data as Buffer).length > ch.incoming.window) {
      drop('channel_window_exceeded', { bytes: (data as Buffer).length, window: ch.incoming.window });
      return;
    }
    return origData?.(p, recipient, data);
  };

  const origRequest = handlers.CHANNEL_REQUEST;
  handlers.CHANNEL_REQUEST = (p: unknown, recipient: unknown, type: unknown, wantReply: unknown, data: unknown) => {
    const t = String(type);
    if (!HANDLED_CHANNEL_REQUESTS.has(t) && !DECLINED_CHANNEL_REQUESTS.has(t)) events.onUnknownRequest('channel', t);
    return origRequest?.(p, recipient, type, wantReply, data);
  };

  const origGlobal = handlers.GLOBAL_REQUEST;
  handlers.GLOBAL_REQUEST = (p: unknown, name: unknown, wantReply: unknown, data: unknown) => {
    const n = String(name);
    if (!HANDLED_GLOBAL_REQUESTS.has(n) && !DECLINED_GLOBAL_REQUESTS.has(n)) events.onUnknownRequest('global', n);
    return origGlobal?.(p, name, wantReply, data);
  };
}
