/**
 * A compromised SSH worker, for test/adversarial/notify-socket.test.ts:
 * `vesh serve` runs it in place of dist/worker/main.js (VESH_WORKER_SCRIPT).
 * Before the real worker loads (so before its seccomp lockdown: the
 * attacker's best moment), it looks for systemd's NOTIFY_SOCKET in its
 * environment and, when there, tells systemd the server stops and is ready
 * with a forged status. It logs what it found as one JSON line.
 */
import { sdNotify } from '../../dist/system/sd-notify.js';

const socket = process.env.NOTIFY_SOCKET ?? null;
let sent = false;
if (socket) {
  sent = sdNotify({ STOPPING: '1' }, undefined, socket);
  sent = sdNotify({ READY: '1', STATUS: 'forged by a worker' }, undefined, socket) || sent;
}
process.stdout.write(`${JSON.stringify({ event: 'attack.notify_socket', socket, sent })}\n`);

await import('../../dist/worker/main.js');
