/**
 * An SSH worker: runs ssh2 for the connections the broker hands it, and
 * nothing privileged. Started by the broker through the sandbox launcher
 * (src/native/vesh-worker-sandbox.c: own uid, no capabilities, own mount,
 * network, IPC and UTS namespaces, a root with only Node and this program),
 * with fd 3 for requests and events and fd 4 for key-exchange signatures.
 * Once its modules are loaded it installs its seccomp filter (no exec, no
 * fork, no sockets but Unix ones, no namespaces or mounts), then waits for
 * the broker's hello.
 */
import { pino } from 'pino';
import type { BrokerEvent } from '../broker/request-table.js';
import { MAX_FRAME_BYTES } from '../broker/request-table.js';
import { errorMessage } from '../errors.js';
import { callSync, lockdown } from '../system/fdpass.js';
import { FrameChannel } from '../system/frame-channel.js';
import { BrokerClient } from './broker-client.js';
import { WorkerServer } from './worker-server.js';

const CONTROL_FD = 3;
const SIGN_FD = 4;
/** A key-exchange signature the broker has not given in this long fails that key exchange. */
const SIGN_TIMEOUT_MS = 5_000;

function main(): void {
  const channel = new FrameChannel(CONTROL_FD, { maxFrameBytes: MAX_FRAME_BYTES, name: 'broker' });
  const client = new BrokerClient(channel);
  let server: WorkerServer | null = null;
  let log = pino({ level: 'info', base: { pid: process.pid, component: 'worker' } });

  // Everything is loaded: from here on the process can neither exec nor
  // fork nor open a network socket (ssh2's code paths included).
  if (process.env.VESH_WORKER_NO_SECCOMP !== '1') lockdown();

  const sign = (conn: string, keyType: string, data: Buffer, hashAlgo?: string): Buffer => {
    let answer: Buffer;
    try {
      answer = callSync(SIGN_FD, Buffer.from(JSON.stringify({ conn, keyType, data: data.toString('base64'), ...(hashAlgo ? { hashAlgo } : {}) })), SIGN_TIMEOUT_MS, 4096);
    } catch (err) {
      // A late answer would be taken for the next request's: this socket is
      // out of step for good. Leave; the broker starts a fresh worker.
      log.fatal({ event: 'worker.sign_failed', err: errorMessage(err) }, 'no answer from the broker to a key-exchange signature: exiting');
      process.exit(1);
    }
    const parsed = JSON.parse(answer.toString('utf8')) as { sig?: string; error?: string };
    if (!parsed.sig) throw new Error(`the broker did not sign: ${parsed.error ?? 'no answer'}`);
    return Buffer.from(parsed.sig, 'base64');
  };

  channel.on('frame', (msg: unknown, fds: number[]) => {
    const m = msg as Record<string, unknown>;
    if (typeof m.re === 'number') {
      client.settle(m as { re: number; ok: boolean }, fds);
      return;
    }
    const ev = m as BrokerEvent;
    if (ev.ev === 'hello') {
      log = pino({ level: ev.settings.logLevel, base: { pid: process.pid, component: 'worker', worker: ev.worker } });
      server = new WorkerServer(client, ev.hostKeys, sign, ev.settings, log);
      log.info({ event: 'worker.ready', worker: ev.worker, uid: process.getuid?.() });
      // Tells the broker we serve now: it sends new connections to workers that do.
      channel.send({ req: 'worker.alive', id: 1, seq: 0 });
      return;
    }
    if (ev.ev === 'ping') {
      channel.send({ req: 'worker.alive', id: 1, seq: ev.seq });
      return;
    }
    if (!server) return;
    server.onEvent(ev, fds);
  });
  // The broker went away (or closed us): nothing to serve for.
  channel.on('close', () => process.exit(0));
  channel.on('malformed', (why: string) => {
    log.error({ event: 'worker.bad_frame', why });
    process.exit(1);
  });
  process.on('SIGTERM', () => process.exit(0));
  // A bug in one connection's handling must not end every connection of
  // this worker: log it, with the stack, and keep serving.
  process.on('uncaughtException', (err) => log.fatal({ event: 'serve.uncaught_exception', err: errorMessage(err), stack: err.stack }, 'uncaught exception in an SSH worker (bug): please report it'));
  process.on('unhandledRejection', (err) => log.error({ event: 'serve.unhandled_rejection', err: errorMessage(err) }));
}

main();
