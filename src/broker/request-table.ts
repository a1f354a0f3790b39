import { z } from 'zod';
import type { TimeoutSettings } from '../config/server-config.js';

/**
 * Everything an SSH worker may ask the broker, in one table.
 *
 * A worker parses every byte a client sends, so the broker treats it as
 * hostile: each frame is checked against this table before anything acts on
 * it. A request names one of the worker's own connections (`conn`, an id the
 * broker gave it) and is allowed only in the states listed for it; the
 * account, the VE, the user inside it and the limits always come from what
 * the broker itself authenticated on that connection, never from the frame.
 * An unknown request, a frame that does not match its schema, a connection
 * that is not this worker's, a request in the wrong state, a repeated
 * once-only request or a frame carrying descriptors ends the worker (all its
 * connections with it); the broker starts another.
 *
 * States: `preauth` (from the broker handing the connection over until an
 * authentication succeeds), `authenticated`, `closed` (the worker said so;
 * nothing more is accepted for it).
 *
 * Answers (`{re, ok: true, ...}` or `{re, ok: false, error}`) and what comes
 * with them:
 *
 * | request           | state          | once | answer                                               |
 * |-------------------|----------------|------|------------------------------------------------------|
 * | auth.key_query    | preauth        |      | acceptable: would this key log in (no signature yet) |
 * | auth.publickey    | preauth        |      | success; the broker verifies the signature over a    |
 * |                   |                |      | blob that must hold the session id it signed         |
 * |                   |                |      | (a *-cert-v01 key: the broker parses the certificate |
 * |                   |                |      | and checks CA signature and trust, principals,       |
 * |                   |                |      | validity, revocation, source-address itself)         |
 * | auth.password     | preauth        |      | success (argon2id check, penalties, MaxAuthTries)    |
 * | auth.failure      | preauth        |      | — a failed attempt the worker saw (bad k-i answers)  |
 * | session.open      | authenticated  |      | fds: pty master, or stdin+stdout and stderr sockets; |
 * |                   |                |      | replay: a held shell's output, re-attached (b64)     |
 * |                   |                |      | tapped: a recorded terminal; the fd is a socket whose |
 * |                   |                |      | other end the broker holds (it keeps the master)      |
 * | session.signal    | authenticated  |      | — signal to a session of this connection             |
 * | session.resize    | authenticated  |      | — window size of a tapped (recorded) terminal: the    |
 * |                   |                |      | broker sets it on the master and records it          |
 * | session.close     | authenticated  |      | — hang it up (SIGHUP, SIGKILL after a grace);        |
 * |                   |                |      | dropped: a persistentShells shell is held instead    |
 * | forward.connect   | authenticated  |      | fd: a socket connected from inside the VE            |
 * | forward.listen    | authenticated  |      | listener id and bound port inside the VE             |
 * | forward.unlisten  | authenticated  |      | — (a TCP or a Unix-socket listener)                  |
 * | forward.connect_unix | authenticated |     | fd: a socket connected to a Unix socket path, from   |
 * |                   |                |      | inside the VE as its user (direct-streamlocal)       |
 * | forward.listen_unix | authenticated |      | listener id of a Unix socket bound inside the VE     |
 * |                   |                |      | (streamlocal-forward; mask and unlink from vesh.yaml) |
 * | cluster.connect   | authenticated  | once | fd: a TCP socket to the node the account's VE lives   |
 * |                   |                |      | on (grant.remote), with that node's host keys, our   |
 * |                   |                |      | node key and the user name that vouches for the login |
 * | cluster.sign      | authenticated  |      | signature with our node key over the userauth blob   |
 * |                   |                |      | of that login (only that user, service and key)      |
 * | agent.listen      | authenticated  |      | listener id and path of the connection's agent socket |
 * |                   |                |      | in the VE (made once; later sessions get             |
 * |                   |                |      | SSH_AUTH_SOCK); refused by the account, key, server  |
 * | conn.closed       | any but closed | once | no answer: the broker forgets the connection         |
 * | worker.alive      | (no conn)      |      | no answer: the pong to the broker's ping             |
 *
 * The key exchange is signed over a second socket (see SignRequest): the
 * first exchange hash signed for a connection becomes its session id.
 * Events the broker sends unasked are listed in BrokerEvent.
 */

/** Most a frame may hold, both ways (a session's env and command fit well inside). */
export const MAX_FRAME_BYTES = 256 * 1024;

const conn = z.string().regex(/^[0-9a-f]{8,16}$/);
/**
 * A user name as the client sent it. Up to 4 KiB: a login carried from
 * another cluster node names the account and its key's restrictions in it
 * (src/broker/node-vouch.ts); an ordinary account name is at most 32.
 */
export const MAX_USER_NAME_CHARS = 4096;
const user = z.string().min(0).max(MAX_USER_NAME_CHARS);
const b64 = (max: number) => z.string().max(Math.ceil(max / 3) * 4 + 4).regex(/^[A-Za-z0-9+/]*={0,2}$/);
const id = z.number().int().min(1).max(2 ** 31);
const port = z.number().int().min(0).max(65535);
const host = z.string().min(1).max(255);
/** A Unix socket path: what sun_path holds (107 bytes and its NUL); its form is checked again where it is used. */
const socketPath = z.string().min(1).max(107);

/** Worker → broker requests. Strict objects: an unknown field is a malformed frame. */
export const REQUESTS = {
  'auth.key_query': {
    states: ['preauth'], once: false,
    schema: z.strictObject({ req: z.literal('auth.key_query'), id, conn, user, algo: z.string().max(64), key: b64(16384) }),
  },
  'auth.publickey': {
    states: ['preauth'], once: false,
    schema: z.strictObject({
      req: z.literal('auth.publickey'), id, conn, user, algo: z.string().max(64), key: b64(16384),
      blob: b64(40000), signature: b64(16384), hashAlgo: z.enum(['sha1', 'sha256', 'sha512']).optional(),
    }),
  },
  'auth.password': {
    states: ['preauth'], once: false,
    schema: z.strictObject({ req: z.literal('auth.password'), id, conn, user, password: z.string().max(1024), method: z.enum(['password', 'keyboard-interactive']) }),
  },
  'auth.failure': {
    states: ['preauth'], once: false,
    schema: z.strictObject({ req: z.literal('auth.failure'), id, conn, user, method: z.string().max(32), reason: z.string().max(200) }),
  },
  'session.open': {
    states: ['authenticated'], once: false,
    schema: z.strictObject({
      req: z.literal('session.open'), id, conn, session: id,
      kind: z.enum(['shell', 'exec', 'subsystem']),
      command: z.string().max(32 * 1024).optional(),
      subsystem: z.string().max(64).optional(),
      pty: z.strictObject({ term: z.string().max(64), cols: z.number().int().min(1).max(1000), rows: z.number().int().min(1).max(1000) }).optional(),
      env: z.record(z.string().max(64), z.string().max(1024)),
    }),
  },
  'session.signal': {
    states: ['authenticated'], once: false,
    schema: z.strictObject({ req: z.literal('session.signal'), id, conn, session: id, signal: z.string().max(16) }),
  },
  'session.resize': {
    states: ['authenticated'], once: false,
    schema: z.strictObject({ req: z.literal('session.resize'), id, conn, session: id, cols: z.number().int().min(1).max(1000), rows: z.number().int().min(1).max(1000) }),
  },
  'session.close': {
    states: ['authenticated'], once: false,
    /** dropped: the channel went with the connection (not closed by the client): a held shell is detached, not hung up. */
    schema: z.strictObject({ req: z.literal('session.close'), id, conn, session: id, dropped: z.boolean().optional() }),
  },
  'forward.connect': {
    states: ['authenticated'], once: false,
    schema: z.strictObject({ req: z.literal('forward.connect'), id, conn, host, port }),
  },
  'forward.listen': {
    states: ['authenticated'], once: false,
    schema: z.strictObject({ req: z.literal('forward.listen'), id, conn, host, port }),
  },
  'forward.unlisten': {
    states: ['authenticated'], once: false,
    schema: z.strictObject({ req: z.literal('forward.unlisten'), id, conn, listener: id }),
  },
  'forward.connect_unix': {
    states: ['authenticated'], once: false,
    schema: z.strictObject({ req: z.literal('forward.connect_unix'), id, conn, path: socketPath }),
  },
  'forward.listen_unix': {
    states: ['authenticated'], once: false,
    schema: z.strictObject({ req: z.literal('forward.listen_unix'), id, conn, path: socketPath }),
  },
  'cluster.connect': {
    states: ['authenticated'], once: true,
    schema: z.strictObject({ req: z.literal('cluster.connect'), id, conn }),
  },
  'cluster.sign': {
    states: ['authenticated'], once: false,
    schema: z.strictObject({ req: z.literal('cluster.sign'), id, conn, data: b64(16384) }),
  },
  'agent.listen': {
    states: ['authenticated'], once: false,
    schema: z.strictObject({ req: z.literal('agent.listen'), id, conn }),
  },
  'conn.closed': {
    states: ['preauth', 'authenticated'], once: true,
    schema: z.strictObject({
      req: z.literal('conn.closed'), id, conn,
      /** How far the client got, for the pre-auth penalties: never identified, a protocol error, or none of these. */
      stage: z.enum(['before identification', 'protocol error', 'normal']),
      bytesRead: z.number().int().min(0),
      firstBytes: z.string().max(256).optional(),
      protocolError: z.string().max(300).optional(),
    }),
  },
  'worker.alive': {
    states: [], once: false,
    schema: z.strictObject({ req: z.literal('worker.alive'), id, seq: z.number().int().min(0) }),
  },
} as const;

export type RequestName = keyof typeof REQUESTS;
export type ConnState = 'preauth' | 'authenticated' | 'closed';
export type Request<N extends RequestName = RequestName> = z.infer<(typeof REQUESTS)[N]['schema']>;

/** The signing socket's one request: sign this exchange hash with the host key of this type. */
export const SignRequest = z.strictObject({
  conn,
  /** ssh2's key type: 'ssh-ed25519' or 'ssh-rsa'. */
  keyType: z.string().max(32),
  hashAlgo: z.enum(['sha256', 'sha512']).optional(),
  /** The exchange hash: 20 to 64 bytes, as a hash is. */
  data: b64(64),
});
export type SignRequest = z.infer<typeof SignRequest>;

/**
 * Broker → worker, unasked. `conn.new` carries the client's TCP socket;
 * `forward.accepted` a connection made to a -R listener inside the VE.
 */
export type BrokerEvent =
  | { ev: 'hello'; worker: number; hostKeys: Array<{ type: string; publicSsh: string }>; settings: WorkerSettings }
  | { ev: 'conn.new'; conn: string; source: string; port: number; localAddress: string; localPort: number }
  | { ev: 'conn.end'; conn: string; reason: string }
  | { ev: 'session.exit'; conn: string; session: number; report: { kind: 'status'; code: number } | { kind: 'signal'; signal: string } }
  | { ev: 'forward.accepted'; conn: string; listener: number; remoteAddress: string; remotePort: number }
  | { ev: 'forward.gone'; conn: string; reason: string }
  /** Text for a session's user (stderr), e.g. why the broker hangs it up (timeouts.maxSessionTime). */
  | { ev: 'session.notice'; conn: string; session: number; text: string }
  | { ev: 'shutdown'; timeoutMs: number }
  | { ev: 'ping'; seq: number };

/** What a worker needs to know of vesh.yaml (it never reads the file). */
export interface WorkerSettings {
  maxAuthTries: number;
  maxSessions: number;
  logLevel: string;
}

/** What the broker says when an authentication succeeded (in the auth.* answer). */
export interface AuthGrant {
  account: string;
  ve: string;
  /** Why port forwarding is refused (account setting, key option), or null when it is allowed. */
  forwardingRefusal: string | null;
  /**
   * Why ssh -A is refused (server or account setting, no-agent-forwarding,
   * a certificate without permit-agent-forwarding), or null. The broker
   * refuses agent.listen by the same rule whatever the worker does with it.
   */
  agentForwardingRefusal?: string | null;
  /** The key said no-pty (or its certificate lacks permit-pty). */
  noPty: boolean;
  /** Logged in, but over a cap: sessions are refused with this text and the connection ends soon. */
  refusal?: string;
  fingerprint?: string;
  /**
   * The account's timeouts (vesh.yaml's with its own overrides), for the
   * worker's keepalives and idle timers. Per account, so here rather than
   * in WorkerSettings; the broker enforces its own share whatever the
   * worker does with them (client-alive-backstop.ts, maxSessionTime).
   */
  timeouts?: TimeoutSettings;
  /**
   * The account's VE lives on another cluster node: nothing runs here. The
   * worker carries the connection's channels to that node (cluster.connect,
   * cluster.sign; src/ssh/remote-link.ts), whose broker decides them.
   */
  remote?: { node: string };
}

/**
 * Check a frame from a worker. Returns the typed request, or why it is
 * malformed (the caller ends the worker).
 */
export function parseRequest(raw: unknown): { ok: true; request: Request } | { ok: false; why: string } {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) return { ok: false, why: 'frame is not an object' };
  const name = (raw as { req?: unknown }).req;
  if (typeof name !== 'string' || !Object.hasOwn(REQUESTS, name)) return { ok: false, why: `unknown request ${JSON.stringify(String(name)).slice(0, 40)}` };
  const parsed = REQUESTS[name as RequestName].schema.safeParse(raw);
  if (!parsed.success) return { ok: false, why: `malformed ${name}: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ').slice(0, 300)}` };
  return { ok: true, request: parsed.data as Request };
}
