import { createRequire } from 'node:module';
import type { Logger } from '../audit/logger.js';
import { errorMessage } from '../errors.js';
import { fdpassAddonPath } from './fdpass.js';

/**
 * systemd's readiness protocol (sd_notify): "KEY=VALUE" lines in one
 * datagram to the AF_UNIX socket named by NOTIFY_SOCKET ("@name" is an
 * abstract address). Node's dgram module speaks only UDP, so the datagram
 * goes out through the native addon (sendDatagram in src/native/vesh-fdpass.c).
 * Without NOTIFY_SOCKET (not started by systemd with Type=notify) nothing is sent.
 */

interface DatagramAddon {
  sendDatagram(path: string, data: Buffer): boolean;
}

let addon: DatagramAddon | null = null;

/** What takeNotifySocket() took out of the environment. */
let taken: string | null = null;

/** The socket systemd gave us, or null: absent, or not a path/abstract name (ignored as systemd's own helpers do). */
export function notifySocket(env: NodeJS.ProcessEnv = process.env): string | null {
  const s = env.NOTIFY_SOCKET;
  if (!s || (!s.startsWith('/') && !s.startsWith('@'))) return null;
  return s;
}

/**
 * Keep NOTIFY_SOCKET for sdNotify and remove it from our environment, as
 * sd_notify(3)'s unset_environment does: no child (SSH worker, hook,
 * helper) may find systemd's socket to say READY=1 or STOPPING=1 for the
 * server. The worker sandbox's environment allow-list drops it too, and the
 * unit's NotifyAccess=main makes systemd refuse any other sender.
 */
export function takeNotifySocket(env: NodeJS.ProcessEnv = process.env): string | null {
  taken = notifySocket(env) ?? taken;
  delete env.NOTIFY_SOCKET;
  return taken;
}

/**
 * Send `state` (e.g. { READY: '1', STATUS: '…' }). A failure is logged, not
 * thrown: a server that serves must not stop because its supervisor is gone.
 * Returns whether a datagram was sent.
 */
export function sdNotify(state: Record<string, string>, log?: Logger, socket: string | null = taken ?? notifySocket(process.env)): boolean {
  if (!socket) return false;
  // A newline inside a value would start a new (forged) assignment.
  const text = Object.entries(state).map(([k, v]) => `${k}=${v.replace(/\n/g, ' ')}`).join('\n');
  try {
    addon ??= createRequire(import.meta.url)(fdpassAddonPath()) as DatagramAddon;
    const sent = addon.sendDatagram(socket, Buffer.from(text));
    if (!sent) log?.warn({ event: 'serve.notify_failed', socket, err: 'the notify socket queue is full' });
    return sent;
  } catch (err) {
    log?.warn({ event: 'serve.notify_failed', socket, err: errorMessage(err) }, `cannot tell systemd (${Object.keys(state).join(', ')}) on NOTIFY_SOCKET ${socket}: ${errorMessage(err)}`);
    return false;
  }
}

/** CLOCK_MONOTONIC now in µs, which systemd asks for beside RELOADING=1. */
export function monotonicUsec(): string {
  return (process.hrtime.bigint() / 1000n).toString();
}
