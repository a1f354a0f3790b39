import { ErrorCodes, VeshError } from '../errors.js';
import type { FrameChannel } from '../system/frame-channel.js';
import { closeFd } from '../system/fdpass.js';
import type { AuthGrant, RequestName } from '../broker/request-table.js';

/** The broker said no (its text is for the client); the request was in order. */
export class BrokerRefusal extends Error {}

/** Answers that can take long: a session waits for its VE to boot. */
const SLOW_TIMEOUT_MS = 300_000;
const FAST_TIMEOUT_MS = 60_000;

interface Pending {
  resolve: (v: { body: Record<string, unknown>; fds: number[] }) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

/**
 * The worker's side of the request table: one request, one answer (matched
 * by id). The broker is trusted here; what it answers is used as it is.
 */
export class BrokerClient {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();

  constructor(private readonly channel: FrameChannel) {}

  /** An answer frame ({re, ok, ...}); false if it answers nothing we asked. */
  settle(msg: { re: number; ok: boolean; error?: string } & Record<string, unknown>, fds: number[]): boolean {
    const p = this.pending.get(msg.re);
    if (!p) {
      for (const fd of fds) closeFd(fd);
      return false;
    }
    this.pending.delete(msg.re);
    clearTimeout(p.timer);
    if (msg.ok) p.resolve({ body: msg, fds });
    else {
      for (const fd of fds) closeFd(fd);
      p.reject(new BrokerRefusal(String(msg.error ?? 'refused')));
    }
    return true;
  }

  request(req: RequestName, conn: string, fields: Record<string, unknown> = {}): Promise<{ body: Record<string, unknown>; fds: number[] }> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const slow = req === 'session.open' || req === 'forward.connect' || req === 'forward.listen' || req === 'auth.password'
        || req === 'forward.connect_unix' || req === 'forward.listen_unix' || req === 'agent.listen';
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new VeshError(ErrorCodes.INTERNAL, `the broker did not answer ${req} in time`, { userMessage: 'The server did not answer in time.' }));
      }, slow ? SLOW_TIMEOUT_MS : FAST_TIMEOUT_MS);
      timer.unref();
      this.pending.set(id, { resolve, reject, timer });
      this.channel.send({ req, id, conn, ...fields });
    });
  }

  /** A request with no answer (conn.closed). */
  tell(req: RequestName, conn: string, fields: Record<string, unknown> = {}): void {
    this.channel.send({ req, id: this.nextId++, conn, ...fields });
  }
}

/** What one connection may ask, bound to its id. */
export class ConnectionBroker {
  constructor(private readonly client: BrokerClient, readonly conn: string) {}

  async keyQuery(user: string, algo: string, key: Buffer): Promise<boolean> {
    const r = await this.client.request('auth.key_query', this.conn, { user, algo, key: key.toString('base64') });
    return r.body.acceptable === true;
  }

  async publickey(p: { user: string; algo: string; key: Buffer; blob: Buffer; signature: Buffer; hashAlgo?: string }): Promise<AuthAnswer> {
    const r = await this.client.request('auth.publickey', this.conn, {
      user: p.user, algo: p.algo, key: p.key.toString('base64'), blob: p.blob.toString('base64'), signature: p.signature.toString('base64'),
      ...(p.hashAlgo ? { hashAlgo: p.hashAlgo } : {}),
    });
    return authAnswer(r.body);
  }

  async password(user: string, password: string, method: 'password' | 'keyboard-interactive'): Promise<AuthAnswer> {
    const r = await this.client.request('auth.password', this.conn, { user, password, method });
    return authAnswer(r.body);
  }

  async failure(user: string, method: string, reason: string): Promise<boolean> {
    const r = await this.client.request('auth.failure', this.conn, { user, method, reason });
    return r.body.disconnect === true;
  }

  /** The session's descriptors, and a re-attached held shell's output to show first (`replay`). */
  /** tapped: a recorded terminal; fds[0] is a socket to the broker, which holds the master (window sizes go by resize()). */
  async openSession(spec: { session: number; kind: 'shell' | 'exec' | 'subsystem'; command?: string; subsystem?: string; pty?: { term: string; cols: number; rows: number }; env: Record<string, string> }): Promise<{ fds: number[]; replay?: Buffer; tapped?: boolean }> {
    const r = await this.client.request('session.open', this.conn, spec);
    return { fds: r.fds, ...(typeof r.body.replay === 'string' ? { replay: Buffer.from(r.body.replay, 'base64') } : {}), ...(r.body.tapped === true ? { tapped: true } : {}) };
  }

  /** Resolves once the broker has set the size (or refused): input typed after a resize waits for it, as it would behind an ioctl. */
  resize(session: number, cols: number, rows: number): Promise<void> {
    return this.client.request('session.resize', this.conn, { session, cols, rows }).then(() => undefined, () => undefined);
  }

  signal(session: number, signal: string): Promise<unknown> {
    return this.client.request('session.signal', this.conn, { session, signal });
  }

  /** dropped: the channel went with the connection, not closed by the client (a persistentShells shell is held). */
  closeSession(session: number, dropped = false): void {
    this.client.request('session.close', this.conn, { session, ...(dropped ? { dropped } : {}) }).catch(() => undefined);
  }

  async forwardConnect(host: string, port: number): Promise<number> {
    const r = await this.client.request('forward.connect', this.conn, { host, port });
    const [fd, ...extra] = r.fds;
    for (const x of extra) closeFd(x);
    if (fd === undefined) throw new BrokerRefusal('no socket in the answer');
    return fd;
  }

  async forwardListen(host: string, port: number): Promise<{ listener: number; port: number }> {
    const r = await this.client.request('forward.listen', this.conn, { host, port });
    return { listener: Number(r.body.listener), port: Number(r.body.port) };
  }

  async forwardConnectUnix(path: string): Promise<number> {
    const r = await this.client.request('forward.connect_unix', this.conn, { path });
    const [fd, ...extra] = r.fds;
    for (const x of extra) closeFd(x);
    if (fd === undefined) throw new BrokerRefusal('no socket in the answer');
    return fd;
  }

  async forwardListenUnix(path: string): Promise<number> {
    const r = await this.client.request('forward.listen_unix', this.conn, { path });
    return Number(r.body.listener);
  }

  /** The connection's agent socket in the VE (made once by the broker): its listener id and path. */
  async agentListen(): Promise<{ listener: number; path: string }> {
    const r = await this.client.request('agent.listen', this.conn);
    return { listener: Number(r.body.listener), path: String(r.body.path) };
  }

  /**
   * The connection to the cluster node this login's VE lives on (grant.remote;
   * once per connection): a connected TCP socket, the user name to log in
   * there with, our node key and that node's host keys (OpenSSH lines).
   */
  async clusterConnect(): Promise<{ fd: number; node: string; user: string; nodeKey: string; hostKeys: string[] }> {
    const r = await this.client.request('cluster.connect', this.conn);
    const [fd, ...extra] = r.fds;
    for (const x of extra) closeFd(x);
    if (fd === undefined) throw new BrokerRefusal('no socket in the answer');
    const hostKeys = Array.isArray(r.body.hostKeys) ? r.body.hostKeys.filter((k): k is string => typeof k === 'string') : [];
    return { fd, node: String(r.body.node), user: String(r.body.user), nodeKey: String(r.body.nodeKey), hostKeys };
  }

  /** Our node key's raw ed25519 signature over the userauth blob of that login (the broker signs nothing else). */
  async clusterSign(data: Buffer): Promise<Buffer> {
    const r = await this.client.request('cluster.sign', this.conn, { data: data.toString('base64') });
    return Buffer.from(String(r.body.signature), 'base64');
  }

  forwardUnlisten(listener: number): void {
    this.client.request('forward.unlisten', this.conn, { listener }).catch(() => undefined);
  }

  closed(info: { stage: 'before identification' | 'protocol error' | 'normal'; bytesRead: number; firstBytes?: string; protocolError?: string }): void {
    this.client.tell('conn.closed', this.conn, info);
  }
}

export interface AuthAnswer {
  success: boolean;
  grant?: AuthGrant;
  /** MaxAuthTries used up: disconnect. */
  disconnect: boolean;
}

function authAnswer(body: Record<string, unknown>): AuthAnswer {
  return { success: body.success === true, grant: body.grant as AuthGrant | undefined, disconnect: body.disconnect === true };
}
