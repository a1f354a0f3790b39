import { randomBytes } from 'node:crypto';
import net from 'node:net';
import ssh2, { type ParsedKey } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import type { ServerConfig, SessionLimits } from '../config/server-config.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import type { HostKey } from '../ssh/host-keys.js';
import { MAX_SESSIONS_PER_CONNECTION } from '../ssh/limits.js';
import type { SshAuthenticator } from '../ssh/ports.js';
import { DEFAULT_SESSION_LIMITS, UsageCaps } from '../ssh/usage-caps.js';
import { closeFd, dupFd, socketFd } from '../system/fdpass.js';
import { countAccepted, countForward, countRefused } from '../audit/metrics.js';
import type { VeAccess } from '../ve/access.js';
import { Admission, normalizeAddress, type AdmissionSettings } from './admission.js';
import { BrokerConnection, ProtocolViolation, Refused } from './broker-connection.js';
import { HeldShells } from './held-shells.js';
import { hostKeySigner } from './host-key-signer.js';
import { REQUESTS, SignRequest, parseRequest, type BrokerEvent, type Request } from './request-table.js';
import { WorkerPool, workerCount, type Worker } from './worker-pool.js';
import type { NodeRoutes } from './node-routes.js';
import type { VeReceiver } from './ve-receive.js';
import type { Recordings } from '../audit/recording-store.js';

const { utils } = ssh2;

export interface BrokerDeps {
  config: {
    listen: ServerConfig['listen'];
    auth: AdmissionSettings & { maxAuthTries: number };
    sessions?: SessionLimits;
    workers?: Partial<ServerConfig['workers']>;
    logging?: { level: string };
    /** Absent (tests that build a broker by hand): every timeout off. */
    timeouts?: ServerConfig['timeouts'];
  };
  authenticator: SshAuthenticator;
  ves: VeAccess;
  hostKeys: HostKey[];
  logger: Logger;
  /** Directories workers must not see (data dir, keys, accounts, config). */
  hide?: string[];
  /** The worker program; dist/worker/main.js unless a test stands in a hostile one. */
  workerScript?: string;
  /** Where the workers' output (their JSON log lines) goes; our own stdout and stderr when not given. */
  workerOutput?: (chunk: Buffer) => void;
  /** Session recording (src/audit/recording-store.ts); absent: off. */
  recordings?: Recordings | null;
  /** Cluster mode: carrying logins to the node their VE lives on (node-routes.ts); absent: a single node. */
  routes?: NodeRoutes | null;
  /** Cluster mode: VEs other nodes move here (vesh ve move; ve-receive.ts); absent: none taken. */
  veReceiver?: VeReceiver | null;
}

/** workers.stallTimeout's default. */
const DEFAULT_STALL_MS = 30_000;

/** Closed connections a worker may still name in a request already on its way (per worker). */
const MAX_REMEMBERED_CLOSED = 10_000;

/** Session ids remembered after their connection ended, so no later connection can take one over. */
const MAX_REMEMBERED_SESSION_IDS = 200_000;

/**
 * The root side of the SSH server. It accepts TCP connections and decides,
 * before a byte is parsed, whether to take them (Admission); hands each to
 * an SSH worker with a copy of the socket kept to end it later; and answers
 * the workers' requests (request-table.ts) for the connections they hold:
 * authentication checks, host-key signatures of key exchanges, sessions and
 * forwards in the VE of the account it authenticated. It never parses SSH.
 */
export class Broker {
  private readonly tcp: net.Server;
  private readonly log: Logger;
  private readonly admission: Admission;
  private readonly pool: WorkerPool;
  private readonly conns = new Map<string, BrokerConnection>();
  private readonly signingKeys = new Map<string, ParsedKey>();
  /** Per host key type: its signer (host-key-signer.ts). */
  private readonly signers = new Map<string, (data: Buffer, hashAlgo?: string) => Buffer | Error>();
  /** Every session id a connection has had (insertion order = age), so that none is ever used twice. */
  private readonly usedSessionIds = new Set<string>();
  readonly caps: UsageCaps;
  /** Shells of dropped connections held for their account's next login (persistentShells). */
  private readonly heldShells: HeldShells;
  private closing = false;
  private watchdog: NodeJS.Timeout | null = null;

  constructor(private readonly deps: BrokerDeps) {
    this.log = deps.logger.child({ component: 'broker' });
    this.heldShells = new HeldShells(this.log);
    if (deps.hostKeys.length === 0) {
      throw new VeshError(ErrorCodes.CONFIG_INVALID, 'no host keys: the server cannot identify itself; check hostKeysDir');
    }
    for (const k of deps.hostKeys) {
      const parsed = utils.parseKey(k.privateKey);
      if (parsed instanceof Error) throw new VeshError(ErrorCodes.CONFIG_INVALID, `host key ${k.file} cannot be read: ${parsed.message}`);
      const key = Array.isArray(parsed) ? parsed[0]! : parsed;
      this.signingKeys.set(k.type, key);
      this.signers.set(k.type, hostKeySigner(key));
    }
    this.caps = new UsageCaps(deps.config.sessions ?? DEFAULT_SESSION_LIMITS, this.log);
    this.admission = new Admission(deps.config.auth, deps.authenticator, this.log);
    const w = deps.config.workers ?? {};
    this.pool = new WorkerPool({
      count: workerCount(w.count ?? 0),
      firstUid: w.firstUid ?? 2_147_000_000,
      maxFiles: w.maxFiles ?? 65_536,
      hide: deps.hide ?? [],
      script: deps.workerScript,
      output: deps.workerOutput,
      logger: deps.logger,
      onStart: (wk) => this.hello(wk),
      onFrame: (wk, msg, fds) => this.onFrame(wk, msg, fds),
      onSign: (wk, raw) => this.onSign(wk, raw),
      onExit: (wk) => this.onWorkerExit(wk),
    });
    this.tcp = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.onSocket(socket));
    this.tcp.on('error', (err) => this.log.error({ event: 'ssh.listen_error', err: errorMessage(err) }));
  }

  /** Start the workers and listen; resolves with the bound address (port 0 picks a free one). */
  listen(): Promise<{ host: string; port: number }> {
    this.pool.start();
    // A worker stuck in a loop answers nothing: its connections are stuck
    // with it. Ping each one; one that stays silent past stallTimeout is
    // ended and replaced (its connections drop, the others go on).
    const stallMs = this.deps.config.workers?.stallTimeoutMs ?? DEFAULT_STALL_MS;
    let seq = 0;
    this.watchdog = setInterval(() => {
      seq += 1;
      const now = Date.now();
      for (const w of this.pool.list()) {
        if (!w.alive) continue;
        if (now - w.lastAlive > stallMs) this.pool.kill(w, `no answer to the broker's ping for ${Math.round((now - w.lastAlive) / 1000)} s (workers.stallTimeout): taken for stuck`);
        else this.sendTo(w, { ev: 'ping', seq });
      }
    }, Math.max(200, Math.min(5_000, stallMs / 4)));
    this.watchdog.unref();
    const { host, port } = this.deps.config.listen;
    return new Promise((resolve, reject) => {
      const onError = (err: NodeJS.ErrnoException) => {
        const hint = err.code === 'EADDRINUSE' ? 'another program (or another vesh) uses it: stop it or change "listen" in vesh.yaml'
          : err.code === 'EACCES' ? 'ports below 1024 need root' : 'check "listen" in vesh.yaml';
        reject(new VeshError(ErrorCodes.CONFIG_INVALID, `cannot listen on ${host}:${port}: ${err.message}; ${hint}`, { cause: err }));
      };
      this.tcp.once('error', onError);
      this.tcp.listen({ host, port }, () => {
        this.tcp.removeListener('error', onError);
        const a = this.address();
        this.log.info({ event: 'ssh.listening', host: a.host, port: a.port, workers: this.pool.list().length });
        resolve(a);
      });
    });
  }

  address(): { host: string; port: number } {
    const a = this.tcp.address();
    if (!a || typeof a === 'string') return { host: this.deps.config.listen.host, port: this.deps.config.listen.port };
    return { host: a.address, port: a.port };
  }

  /** Whether a worker has said it serves (systemd's READY=1 waits for this, not only for the listener). */
  serving(): boolean {
    return this.pool.list().some((w) => w.alive && w.ready);
  }

  /**
   * A SIGHUP reload: the settings read per new connection take the new
   * values (admission caps and the login grace time, timeouts). Admission
   * reads the same auth object, so it is updated in place.
   */
  reconfigure(next: Pick<BrokerDeps['config'], 'auth' | 'timeouts'>): void {
    const { loginGraceTimeMs, maxStartups, maxStartupsPerSource, maxConnectionRatePerSource } = next.auth;
    Object.assign(this.deps.config.auth, { loginGraceTimeMs, maxStartups, maxStartupsPerSource, maxConnectionRatePerSource });
    if (next.timeouts) this.deps.config.timeouts = next.timeouts;
  }

  /** Connections now open, how many have not authenticated yet, and the workers' pids. */
  stats(): { connections: number; unauthenticated: number; workers: Array<{ index: number; pid: number; connections: number }> } {
    return {
      connections: this.conns.size,
      unauthenticated: this.admission.unauthenticated,
      workers: this.pool.list().filter((w) => w.alive).map((w) => ({ index: w.index, pid: w.pid, connections: w.conns.size })),
    };
  }

  /** What the metrics endpoint reports of the broker: from its own tables, never from a worker's word. */
  metricsCounts(): { connections: number; unauthenticated: number; sessions: number; listeners: number; workers: number } {
    let sessions = 0;
    let listeners = 0;
    for (const c of this.conns.values()) {
      sessions += c.openSessions;
      listeners += c.openListeners;
    }
    const workers = this.pool.list().filter((w) => w.alive).length;
    return { connections: this.conns.size, unauthenticated: this.admission.unauthenticated, sessions, listeners, workers };
  }

  // ------------------------------------------------------------ connections in

  private onSocket(socket: net.Socket): void {
    const adm = this.closing ? null : this.admission.admit(socket);
    if (!adm) {
      if (this.closing) countRefused('shutting_down');
      socket.destroy();
      return;
    }
    const worker = this.pool.pick();
    if (!worker) {
      countRefused('no_worker');
      this.log.error({ event: 'ssh.connection_refused', source: adm.source, reason: 'no SSH worker is running' });
      this.admission.leave(adm);
      socket.destroy();
      return;
    }
    const fd = socketFd(socket);
    if (fd === null) {
      countRefused('internal');
      this.admission.leave(adm);
      socket.destroy();
      return;
    }
    const id = randomBytes(4).toString('hex');
    let cutFd: number;
    try {
      cutFd = dupFd(fd);
    } catch (err) {
      countRefused('internal');
      this.log.error({ event: 'ssh.connection_refused', source: adm.source, reason: `cannot keep the socket: ${errorMessage(err)}` });
      this.admission.leave(adm);
      socket.destroy();
      return;
    }
    const log = this.log.child({ conn: id });
    const localAddress = normalizeAddress(socket.localAddress, '');
    const c = new BrokerConnection(id, worker.index, adm.source, socket.remotePort ?? 0, { address: localAddress, port: socket.localPort ?? 0 }, cutFd, {
      authenticator: this.deps.authenticator,
      ves: this.deps.ves,
      caps: this.caps,
      maxAuthTries: this.deps.config.auth.maxAuthTries,
      maxSessions: this.deps.config.sessions?.maxSessions,
      features: this.deps.config.sessions,
      send: (ev, fds) => this.sendTo(worker, ev, fds),
      heldShells: this.heldShells,
      recordings: this.deps.recordings ?? null,
      routes: this.deps.routes ?? null,
      veReceiver: this.deps.veReceiver ?? null,
      onAuthenticated: () => this.admission.leave(adm),
      ...(this.deps.config.timeouts ? { timeouts: this.deps.config.timeouts } : {}),
    }, log);
    this.conns.set(id, c);
    worker.conns.add(id);
    countAccepted();
    adm.onGrace = () => c.cut();
    log.info({ event: 'ssh.connection', source: adm.source, port: socket.remotePort, worker: worker.index });
    this.sendTo(worker, { ev: 'conn.new', conn: id, source: adm.source, port: socket.remotePort ?? 0, localAddress, localPort: socket.localPort ?? 0 }, [fd]);
    // Our handle goes; the worker has the socket, and cutFd stays to end it.
    socket.destroy();
    c.admission = adm;
  }

  private hello(w: Worker): void {
    const hostKeys = [...this.signingKeys.entries()].map(([type, k]) => ({ type, publicSsh: k.getPublicSSH().toString('base64') }));
    this.sendTo(w, {
      ev: 'hello', worker: w.index, hostKeys,
      settings: {
        maxAuthTries: this.deps.config.auth.maxAuthTries,
        maxSessions: this.deps.config.sessions?.maxSessions ?? MAX_SESSIONS_PER_CONNECTION,
        logLevel: this.deps.config.logging?.level ?? 'info',
      },
    });
  }

  private sendTo(w: Worker, ev: BrokerEvent | Record<string, unknown>, fds: number[] = []): void {
    if (!w.alive) return;
    try {
      w.channel.send(ev, fds);
    } catch (err) {
      this.pool.kill(w, `cannot send to it: ${errorMessage(err)}`);
    }
  }

  // ------------------------------------------------------------ requests

  private onFrame(w: Worker, msg: unknown, fds: number[]): void {
    if (fds.length > 0) {
      for (const fd of fds) closeFd(fd);
      this.pool.kill(w, 'a request carried descriptors (workers never send any)');
      return;
    }
    const parsed = parseRequest(msg);
    if (!parsed.ok) {
      this.pool.kill(w, parsed.why);
      return;
    }
    const r = parsed.request;
    if (r.req === 'worker.alive') {
      w.lastAlive = Date.now();
      if (!w.ready) this.log.info({ event: 'broker.worker_serving', worker: w.index, pid: w.pid });
      w.ready = true;
      return;
    }
    const c = this.conns.get(r.conn);
    if (!c || c.worker !== w.index || !w.conns.has(r.conn)) {
      // A request that crossed the worker's own "closed" for it (a session
      // hung up as its connection went) is answered, not held against it.
      if (w.closedConns.has(r.conn)) {
        if (r.req !== 'conn.closed') this.sendTo(w, { re: r.id, ok: false, error: 'the connection is closed' });
        return;
      }
      this.pool.kill(w, `${r.req} for a connection that is not its own`);
      return;
    }
    const entry = REQUESTS[r.req];
    if (!(entry.states as readonly string[]).includes(c.state)) {
      this.pool.kill(w, `${r.req} in state ${c.state}`);
      return;
    }
    if (entry.once) {
      if (c.onceSeen.has(r.req)) {
        this.pool.kill(w, `${r.req} twice for one connection`);
        return;
      }
      c.onceSeen.add(r.req);
    }
    void this.answer(w, c, r).then(
      (reply) => {
        if (reply) this.sendTo(w, { re: r.id, ok: true, ...reply.body }, reply.fds);
        for (const fd of reply?.fds ?? []) closeFd(fd);
      },
      (err: unknown) => {
        if (err instanceof ProtocolViolation) {
          this.pool.kill(w, err.message);
          return;
        }
        if (!(err instanceof Refused)) c.log.error({ event: 'broker.request_failed', req: r.req, err: errorMessage(err) });
        const text = err instanceof Refused ? err.message : err instanceof VeshError ? err.userMessage : 'The server could not complete the request.';
        this.sendTo(w, { re: r.id, ok: false, error: text });
      },
    );
  }

  /** Act on one checked request; the answer's body and the descriptors that go with it (closed here after sending). */
  private async answer(w: Worker, c: BrokerConnection, r: Request): Promise<{ body: Record<string, unknown>; fds?: number[] } | null> {
    switch (r.req) {
      case 'auth.key_query':
        return { body: await c.keyQuery(r) };
      case 'auth.publickey':
        return { body: await c.publickey(r) };
      case 'auth.password':
        return { body: await c.password(r) };
      case 'auth.failure':
        return { body: c.failure(r) };
      case 'session.open': {
        const s = await c.openSession(r);
        return { body: { pid: s.pid, ...(s.replay?.length ? { replay: s.replay.toString('base64') } : {}), ...(s.tapped ? { tapped: true } : {}) }, fds: s.fds };
      }
      case 'session.resize':
        c.resizeSession(r);
        return { body: {} };
      case 'session.signal':
        c.signalSession(r);
        return { body: {} };
      case 'session.close':
        c.closeSession(r);
        return { body: {} };
      case 'forward.connect': {
        const fd = await c.forwardConnect(r);
        countForward('tcp');
        return { body: {}, fds: [fd] };
      }
      case 'forward.listen':
        return { body: await c.forwardListen(r) };
      case 'forward.unlisten':
        c.forwardUnlisten(r);
        return { body: {} };
      case 'forward.connect_unix': {
        const fd = await c.forwardConnectUnix(r);
        countForward('unix');
        return { body: {}, fds: [fd] };
      }
      case 'forward.listen_unix':
        return { body: await c.forwardListenUnix(r) };
      case 'agent.listen':
        return { body: await c.agentListen(r) };
      case 'cluster.connect': {
        const link = await c.clusterConnect();
        return { body: link.body, fds: [link.fd] };
      }
      case 'cluster.sign':
        return { body: c.clusterSign(r) };
      case 'conn.closed':
        this.connectionClosed(w, c, r);
        return null;
      case 'worker.alive':
        return null;
    }
  }

  private connectionClosed(w: Worker, c: BrokerConnection, r: Request<'conn.closed'>): void {
    const adm = c.admission;
    const wasPreauth = c.state === 'preauth';
    if (adm && wasPreauth) {
      if (r.stage === 'before identification') {
        c.log.info({ event: 'ssh.connection_closed', source: c.source, stage: 'before identification', bytesReceived: r.bytesRead, firstBytes: r.firstBytes ?? null });
        // A bare TCP probe (nothing sent) is not held against its source.
        if (r.bytesRead > 0) this.admission.strike(adm, 'garbage');
      } else if (r.stage === 'protocol error') this.admission.strike(adm, 'protocol_error');
      else if (!c.sessionId) this.admission.strike(adm, 'key_exchange_incomplete');
      // Key exchange done (a host-key signature spent), then gone without
      // logging in and without a failure already held against it: a
      // scanner's or a handshake flood's "noauth".
      else if (c.recordedFailures === 0) this.admission.strike(adm, 'noauth');
    }
    this.forget(w, c);
  }

  private forget(w: Worker | null, c: BrokerConnection): void {
    if (c.admission) this.admission.leave(c.admission);
    c.dispose();
    this.conns.delete(c.id);
    if (w?.conns.delete(c.id)) {
      w.closedConns.add(c.id);
      if (w.closedConns.size > MAX_REMEMBERED_CLOSED) w.closedConns.delete(w.closedConns.values().next().value as string);
    }
  }

  // ------------------------------------------------------------ key exchange signatures

  private onSign(w: Worker, raw: Buffer): Buffer | null {
    let req: SignRequest;
    try {
      const parsed = SignRequest.safeParse(JSON.parse(raw.toString('utf8')));
      if (!parsed.success) return null;
      req = parsed.data;
    } catch {
      return null;
    }
    const c = this.conns.get(req.conn);
    if (!c || c.worker !== w.index || c.state === 'closed') {
      if (w.closedConns.has(req.conn)) return Buffer.from(JSON.stringify({ error: 'the connection is closed' }));
      return null;
    }
    const data = Buffer.from(req.data, 'base64');
    if (![20, 32, 48, 64].includes(data.length)) return null;
    const signer = this.signers.get(req.keyType === 'rsa-sha2-256' || req.keyType === 'rsa-sha2-512' ? 'ssh-rsa' : req.keyType);
    if (!signer) return Buffer.from(JSON.stringify({ error: `no ${req.keyType} host key` }));
    if (c.sessionId && !c.mayResign()) {
      // One signature before login (the key exchange), as OpenSSH's monitor
      // allows; re-keys after it at a bounded rate. More would make the
      // broker a host-key signing service for a compromised worker. The
      // answer fails this key exchange only, not the worker's others.
      return Buffer.from(JSON.stringify({ error: c.state === 'preauth' ? 'one key exchange before login' : 're-keying too often' }));
    }
    if (!c.sessionId) {
      // The first exchange hash is the connection's session id for good
      // (RFC 4253 7.2). One already used by any connection is refused: a
      // worker must not give a new connection an old one's id and then
      // replay a signature a client made for the old.
      const hex = data.toString('hex');
      if (this.usedSessionIds.has(hex)) return null;
      this.usedSessionIds.add(hex);
      if (this.usedSessionIds.size > MAX_REMEMBERED_SESSION_IDS) this.usedSessionIds.delete(this.usedSessionIds.values().next().value as string);
      c.sessionId = data;
    }
    const sig = signer(data, req.hashAlgo);
    if (sig instanceof Error) return Buffer.from(JSON.stringify({ error: sig.message }));
    return Buffer.from(JSON.stringify({ sig: sig.toString('base64') }));
  }

  // ------------------------------------------------------------ ending

  private onWorkerExit(w: Worker): void {
    let n = 0;
    for (const id of w.conns) {
      const c = this.conns.get(id);
      if (!c) continue;
      c.cut();
      this.forget(null, c);
      n += 1;
    }
    w.conns.clear();
    if (n > 0) this.log.warn({ event: 'broker.worker_connections_dropped', worker: w.index, connections: n });
  }

  /**
   * End the open connections of accounts that `why` names a reason for
   * (accounts.yaml reloaded: a locked or deleted account loses them).
   */
  endConnectionsOf(why: (account: string) => string | null): number {
    let n = 0;
    for (const c of this.conns.values()) {
      const account = c.account;
      if (!account || c.state !== 'authenticated') continue;
      const reason = why(account);
      if (reason === null) continue;
      c.log.warn({ event: 'ssh.connection_ended', reason }, `ending the connection of account ${account}: ${reason}`);
      c.hangupAll();
      const w = this.pool.list().find((x) => x.index === c.worker);
      if (w) this.sendTo(w, { ev: 'conn.end', conn: c.id, reason });
      // A worker (or client) that does not end it is cut.
      setTimeout(() => c.cut(), 1_000).unref();
      n += 1;
    }
    // Their shells held from dropped connections go too.
    this.heldShells.hangup((account) => why(account) !== null);
    return n;
  }

  /**
   * Stop: no new connections; every session is hung up and its client told
   * how it ended, then the connections get a goodbye and the workers stop.
   * VEs keep running.
   */
  async close(timeoutMs = 5000): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    if (this.watchdog) clearInterval(this.watchdog);
    const stopped = new Promise<void>((r) => this.tcp.close(() => r()));
    this.log.info({ event: 'ssh.shutdown', connections: this.conns.size });
    for (const c of this.conns.values()) c.hangupAll();
    this.heldShells.hangup(() => true);
    for (const w of this.pool.list()) this.sendTo(w, { ev: 'shutdown', timeoutMs: Math.max(500, timeoutMs - 1500) });
    const deadline = Date.now() + timeoutMs;
    while (this.conns.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    for (const c of [...this.conns.values()]) {
      c.cut();
      this.forget(null, c);
    }
    await this.pool.stop(1000);
    await stopped;
  }
}

