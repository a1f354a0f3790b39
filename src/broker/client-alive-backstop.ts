import type { TimeoutSettings } from '../config/server-config.js';
import { clientAliveLimitMs } from '../ssh/timeouts.js';
import { tcpIdle } from '../system/fdpass.js';

/** The least extra time the worker gets past the keepalive limit before the broker ends a connection itself. */
const MIN_SLACK_MS = 2_000;

/**
 * The broker's own check that a client still talks, for when the worker
 * does not end a dead connection (a worker taken over, or one whose
 * keepalives were switched off by it): the worker ends a client that
 * answered no keepalive within interval × (countMax + 1); the broker reads,
 * with TCP_INFO on its own copy of the socket, how long ago the kernel last
 * got data from the client, and calls `onSilent` once that is past the same
 * limit plus one more interval (at least MIN_SLACK_MS). An answering client
 * never gets there: it answers each probe, and any packet is data to TCP.
 * The worker cannot change what the kernel saw, nor this setting (it comes
 * from vesh.yaml and the broker's own account record).
 *
 * Returns the timer (the caller clears it when the connection goes), or
 * null when keepalives are off.
 */
export function watchClientSilence(fd: number, t: TimeoutSettings, onSilent: (silentMs: number, limitMs: number) => void): NodeJS.Timeout | null {
  const limit = clientAliveLimitMs(t);
  if (limit === 0) return null;
  const deadline = limit + Math.max(t.clientAliveIntervalMs, MIN_SLACK_MS);
  const timer = setInterval(() => {
    let silentMs: number;
    try {
      silentMs = tcpIdle(fd).lastDataRecvMs;
    } catch {
      // Not a socket any more (closed as the connection goes): nothing to watch.
      clearInterval(timer);
      return;
    }
    if (silentMs >= deadline) {
      clearInterval(timer);
      onSilent(silentMs, deadline);
    }
  }, t.clientAliveIntervalMs);
  timer.unref();
  return timer;
}
