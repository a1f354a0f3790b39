/**
 * A compromised SSH worker, for test/adversarial/dead-clients.test.ts:
 * `vesh serve` runs it in place of dist/worker/main.js (VESH_WORKER_SCRIPT).
 * It is the real worker, except that for connections from 127.0.0.2 it
 * switches every timeout it was granted off (no keepalives, no idle timers)
 * and never shows a session notice: what an attacker holding the worker
 * would do to keep dead connections and long sessions on the host. What the
 * broker enforces by itself must hold anyway.
 */
import { ConnectionTimeouts } from '../../dist/ssh/timeouts.js';
import { SshConnection } from '../../dist/ssh/connection.js';
import { WorkerServer } from '../../dist/worker/worker-server.js';

const ATTACKER_SOURCE = '127.0.0.2';
const attackerConns = new Set();

const onEvent = WorkerServer.prototype.onEvent;
WorkerServer.prototype.onEvent = function (ev, fds) {
  if (ev.ev === 'conn.new' && ev.source === ATTACKER_SOURCE) attackerConns.add(ev.conn);
  return onEvent.call(this, ev, fds);
};

const start = ConnectionTimeouts.prototype.start;
ConnectionTimeouts.prototype.start = function () {
  if (attackerConns.has(this.log.bindings().conn)) return;
  return start.call(this);
};

const sessionNotice = SshConnection.prototype.sessionNotice;
SshConnection.prototype.sessionNotice = function (id, text) {
  if (attackerConns.has(this.id)) return;
  return sessionNotice.call(this, id, text);
};

await import('../../dist/worker/main.js');
