import net from 'node:net';
import { constants as osConstants } from 'node:os';
import type { Duplex } from 'node:stream';
import ssh2, {
  type AgentAuthMethod, type ClientChannel, type ConnectConfig, type Connection, type ParsedKey,
  type PseudoTtyInfo, type ServerChannel, type Session, type TcpipBindInfo, type TcpipRequestInfo,
} from 'ssh2';
import type { Logger } from '../audit/logger.js';
import { parseUserauthBlob } from '../broker/userauth-blob.js';
import { errorMessage, isVeshError } from '../errors.js';
import { closeFd } from '../system/fdpass.js';
import { BrokerRefusal, type ConnectionBroker } from '../worker/broker-client.js';
import type { CappedLog } from './capped-log.js';
import { openClientAgentChannel } from './agent-forwarding.js';
import { CLIENT_SIGNALS } from './exit-status.js';
import { ENV_LIMITS, MAX_COMMAND_LENGTH, MAX_REMOTE_FORWARDS_PER_CONNECTION } from './limits.js';

const { Client, BaseAgent, utils } = ssh2;
type SshClient = InstanceType<typeof Client>;

/** How long the login to the owning node may take (key exchange and authentication) before the user is told it is not answering. */
const READY_TIMEOUT_MS = 10_000;
/** Keepalives to the owning node: a node that stopped answering is noticed within interval × (count + 1). */
const KEEPALIVE_INTERVAL_MS = 15_000;
const KEEPALIVE_COUNT_MAX = 3;
/** Channel opens and -R requests a client may have waiting while the link is still being made (each channel also holds its slot). */
const MAX_WAITING = 64;
/** How long a closing side may take to take the bytes still queued for it before it is closed anyway. */
const CLOSE_FLUSH_MS = 5_000;
/** How long a session's last output may take to reach the client before its exit is told anyway (the client stopped reading). */
const FINISH_FLUSH_MS = 30_000;
/** How long sessions may take to be told that the node's connection ended before the client's connection ends anyway. */
const SESSIONS_END_MS = 2_000;
/** Most of an exit-signal's error message passed on (the owning node's VE writes nothing there, but its length is not ours to trust). */
const MAX_EXIT_MESSAGE = 256;
/** Longest subsystem name passed on (the owning node takes only sftp). */
const MAX_SUBSYSTEM_NAME = 64;

const EMPTY = Buffer.alloc(0);

/** What a relayed login needs from its connection (SshConnection). */
export interface RemoteLinkContext {
  /** The client's connection. */
  conn: Connection;
  broker: ConnectionBroker;
  log: Logger;
  /** For lines the client can cause at will: capped per connection. */
  noisy: Pick<CappedLog, 'info'>;
  /** The node the account's VE lives on (grant.remote.node), for messages before the broker answered. */
  node: string;
  /** The key that logged in said no-pty: the owning node refuses terminals too, so they are refused here before a command is sent. */
  noPty: boolean;
  /** Why forwarding is refused for this login, or null (the owning node decides the same from the vouch). */
  forwardingRefusal: string | null;
  /** Why ssh -A is refused for this login, or null (the owning node decides too: the vouch carries the key's rule). */
  agentForwardingRefusal: string | null;
  /** The connection's channel caps (sessions and all channels). */
  reserveChannel(session: boolean): boolean;
  releaseChannel(session: boolean): void;
  /** Open a session only to tell its user `text` on stderr and exit 1 (SshConnection.refuseSession). */
  refuseSession(accept: () => Session, reject: () => void, text: string): void;
  /** End the client's connection: the owning node's went away. */
  endClient(): void;
  /** Overrides READY_TIMEOUT_MS (tests). */
  readyTimeoutMs?: number;
}

type State = 'connecting' | 'ready' | 'failed' | 'closed';

/** One thing the client asked for while the link was being made: run when it is ready, or told no. */
interface Waiting {
  ready(): void;
  fail(): void;
}

/** An ssh2 channel either way (client or server side): a stream with SSH's EOF and CLOSE. */
type AnyChannel = Duplex & { eof(): void; close(): void };

/**
 * A login whose VE lives on another cluster node (grant.remote). Nothing
 * runs here: this worker logs in to that node's ordinary SSH port as an SSH
 * client, with this node's key (which only our broker holds: it signs the
 * one login it vouches for, cluster.sign) under the user name our broker
 * wrote, and carries every channel and global request of the client there,
 * where that node's broker, policies, limits and recording decide them.
 *
 * What is carried: sessions (pty, env, shell, exec, subsystem, window
 * changes, signals, exit status and signal), -L and -R to TCP ports and
 * Unix sockets, and agent forwarding (-A): the owning node makes the
 * agent socket in the VE and opens an agent channel back to this link for
 * each connection to it, which goes on to the client's own agent
 * (ClientAgentRelay). The node key never answers those: it signs only
 * through the agent in the login method.
 *
 * The owning node is trusted, but its VE's root is not, and much of what
 * comes back starts there: forwarded connections to our -R listeners,
 * exit-signal names, output of any size. Nothing is buffered beyond the
 * SSH windows (streams are piped, so a slow reader stops the window of the
 * other side); names and strings go to ssh2 as given, except where ssh2
 * would throw on them (signal names), which are checked first.
 */
export class RemoteNodeLink {
  private state: State = 'connecting';
  private readonly startedAt = Date.now();
  private client: SshClient | null = null;
  private socket: net.Socket | null = null;
  /** What the client is told when the link could not be made. */
  private failure = '';
  private readonly waiting: Waiting[] = [];
  private readonly sessions = new Set<RelayedSession>();
  /** -R listeners asked of the owning node, by "addr:port" or "unix:path" (its answers counted as well as those on the way). */
  private readonly listeners = new Map<string, { bindAddr: string; port: number } | { path: string }>();
  private listensInFlight = 0;
  private agentRefusalLogged = false;

  constructor(private readonly ctx: RemoteLinkContext) {
    void this.connect();
  }

  // ------------------------------------------------------------ the link

  private async connect(): Promise<void> {
    let answer: Awaited<ReturnType<ConnectionBroker['clusterConnect']>>;
    try {
      answer = await this.ctx.broker.clusterConnect();
    } catch (err) {
      const text = err instanceof BrokerRefusal ? err.message : isVeshError(err) ? err.userMessage : `Your environment lives on cluster node ${this.ctx.node}, which cannot be reached right now; try again shortly.`;
      this.fail(`the broker did not connect us: ${errorMessage(err)}`, text);
      return;
    }
    if (this.state !== 'connecting') {
      closeFd(answer.fd);
      return;
    }
    const node = answer.node || this.ctx.node;
    const nodeKey = utils.parseKey(answer.nodeKey);
    const hostBlobs: Buffer[] = [];
    for (const line of answer.hostKeys) {
      const k = utils.parseKey(line);
      if (!(k instanceof Error) && !Array.isArray(k)) hostBlobs.push(k.getPublicSSH());
    }
    if (nodeKey instanceof Error || Array.isArray(nodeKey) || nodeKey.type !== 'ssh-ed25519' || hostBlobs.length === 0) {
      closeFd(answer.fd);
      this.fail(nodeKey instanceof Error || Array.isArray(nodeKey) || nodeKey.type !== 'ssh-ed25519' ? 'the node key from the broker is not an ed25519 public key' : `no usable host key of node ${node} from the broker`,
        `Your environment lives on cluster node ${node}, which this node cannot check; tell the administrator.`);
      return;
    }
    let socket: net.Socket;
    try {
      socket = new net.Socket({ fd: answer.fd, readable: true, writable: true });
    } catch (err) {
      closeFd(answer.fd);
      this.fail(`cannot use the socket to node ${node}: ${errorMessage(err)}`, `Your environment lives on cluster node ${node}, which cannot be reached right now; try again shortly.`);
      return;
    }
    socket.setNoDelay(true);
    socket.on('error', () => undefined);
    this.socket = socket;
    const client = new Client();
    this.client = client;
    let hostKeyRefused = false;
    const agent = new NodeKeyAgent(nodeKey, answer.user, (data) => this.ctx.broker.clusterSign(data));
    client.on('ready', () => this.onReady(node));
    client.on('error', (err: Error & { level?: string }) => {
      if (this.state === 'connecting') {
        const why = hostKeyRefused ? 'its host key is not one the cluster lists for it'
          : err.level === 'client-authentication' ? `it did not accept this node's login (${err.message})`
            : err.level === 'agent' ? `the node key's signature failed: ${err.message}`
            : err.level === 'client-timeout' ? `no login within ${(this.ctx.readyTimeoutMs ?? READY_TIMEOUT_MS) / 1000} s`
              : errorMessage(err);
        const text = hostKeyRefused ? `Your environment lives on cluster node ${node}, whose host key is not the one the cluster lists for it; the login was not carried there. Tell the administrator.`
          : err.level === 'client-authentication' || err.level === 'agent' ? `Your environment lives on cluster node ${node}, which did not accept this node's login; tell the administrator.`
            : `Your environment lives on cluster node ${node}, which is not answering right now; try again shortly.`;
        this.fail(why, text);
      } else if (this.state === 'ready') {
        this.ctx.log.info({ event: 'cluster.remote_error', node, err: errorMessage(err), level: err.level });
      }
    });
    client.on('close', () => this.onLinkClosed(node));
    client.on('tcp connection', (info, accept, reject) => this.onForwardedTcp(info, accept, reject));
    client.on('unix connection', (info, accept, reject) => this.onForwardedUnix(info, accept, reject));
    // The agent ssh2 hands the owning node's agent channels to (asked per
    // session with agentForward, never for all: no allowAgentFwd).
    const agentRelay = this.ctx.agentForwardingRefusal === null ? new ClientAgentRelay(this.ctx) : undefined;
    let asked = false;
    // Only the node key, through the broker, and never as an agent the
    // other side could use: the agent is in the auth method, not in the
    // config, so ssh2 has no agent to forward.
    const authHandler = (): AgentAuthMethod | false => {
      if (asked) return false;
      asked = true;
      return { type: 'agent', username: answer.user, agent };
    };
    client.connect({
      sock: socket,
      username: answer.user,
      authHandler: authHandler as unknown as ConnectConfig['authHandler'],
      hostVerifier: (key: Buffer) => {
        const ok = hostBlobs.some((b) => b.equals(key));
        if (!ok) hostKeyRefused = true;
        return ok;
      },
      ...(agentRelay ? { agent: agentRelay } : {}),
      readyTimeout: this.ctx.readyTimeoutMs ?? READY_TIMEOUT_MS,
      keepaliveInterval: KEEPALIVE_INTERVAL_MS,
      keepaliveCountMax: KEEPALIVE_COUNT_MAX,
      // The other node names itself "vesh", not OpenSSH: ssh2 would refuse its streamlocal requests otherwise.
      strictVendor: false,
    });
  }

  private onReady(node: string): void {
    if (this.state !== 'connecting') return;
    this.state = 'ready';
    this.ctx.log.info({ event: 'cluster.remote_ready', node, ms: Date.now() - this.startedAt }, `carried to node ${node}`);
    for (const w of this.waiting.splice(0)) w.ready();
  }

  private fail(reason: string, text: string): void {
    if (this.state !== 'connecting') return;
    this.state = 'failed';
    this.failure = text;
    this.ctx.log.info({ event: 'cluster.remote_failed', node: this.ctx.node, reason, ms: Date.now() - this.startedAt }, `could not carry the connection to node ${this.ctx.node}: ${reason}`);
    this.dropLink();
    for (const w of this.waiting.splice(0)) w.fail();
  }

  /** The owning node's connection ended: so does the client's (nothing of it runs here). */
  private onLinkClosed(node: string): void {
    if (this.state === 'connecting') {
      this.fail('the connection closed before the login', `Your environment lives on cluster node ${node}, which is not answering right now; try again shortly.`);
      return;
    }
    if (this.state !== 'ready') return;
    this.state = 'closed';
    this.ctx.log.info({ event: 'cluster.remote_closed', node, durationMs: Date.now() - this.startedAt }, `node ${node} ended the carried connection: ending the client's`);
    for (const s of this.sessions) s.notify(`vesh: the connection to cluster node ${node}, where your environment lives, ended.\r\n`);
    this.dropLink();
    // Each session ends first (that text, then EOF and close, as ssh2 closes
    // their channels to the node): OpenSSH drops what it has not yet written
    // out when a disconnect arrives, so the disconnect comes after.
    const done = Promise.all([...this.sessions].map((s) => s.done));
    void Promise.race([done, new Promise((r) => setTimeout(r, SESSIONS_END_MS).unref())]).then(() => this.ctx.endClient());
  }

  /** The client's connection is gone: end the owning node's too. */
  close(): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    for (const s of [...this.sessions]) s.close();
    for (const w of this.waiting.splice(0)) {
      try {
        w.fail();
      } catch { /* the client's connection is gone: nothing to refuse it on */ }
    }
    this.dropLink();
  }

  /** Say goodbye to the owning node, and let go of the socket even if it does not answer. */
  private dropLink(): void {
    const client = this.client;
    const socket = this.socket;
    this.client = null;
    this.socket = null;
    try {
      client?.end();
    } catch { /* already gone */ }
    if (socket) setTimeout(() => socket.destroy(), CLOSE_FLUSH_MS).unref();
  }

  /** Run `ready` once the link is up (now, if it is); `fail` when it cannot be. */
  private whenReady(w: Waiting): void {
    if (this.state === 'ready') w.ready();
    else if (this.state === 'connecting' && this.waiting.length < MAX_WAITING) this.waiting.push(w);
    else w.fail();
  }

  // ------------------------------------------------------------ sessions

  onSession(accept: () => Session, reject: () => void): void {
    if (this.state === 'failed') {
      this.ctx.refuseSession(accept, reject, this.failure);
      return;
    }
    if (this.state === 'closed' || !this.ctx.reserveChannel(true)) {
      reject();
      return;
    }
    // The channel is confirmed only once the link is up: a client cannot send requests for it before.
    this.whenReady({
      ready: () => {
        const s = new RelayedSession(accept(), this.relayContext(), () => {
          this.sessions.delete(s);
          this.ctx.releaseChannel(true);
        });
        this.sessions.add(s);
      },
      fail: () => {
        this.ctx.releaseChannel(true);
        if (this.state === 'failed') this.ctx.refuseSession(accept, reject, this.failure);
        else reject();
      },
    });
  }

  private relayContext(): SessionRelayContext {
    return {
      client: () => this.client,
      node: this.ctx.node,
      noPty: this.ctx.noPty,
      log: this.ctx.log,
      noisy: this.ctx.noisy,
      agentAllowed: this.ctx.agentForwardingRefusal === null,
      refuseAgent: () => {
        if (this.agentRefusalLogged) return;
        this.agentRefusalLogged = true;
        this.ctx.log.info({ event: 'agent.refused', node: this.ctx.node, reason: this.ctx.agentForwardingRefusal }, `ssh -A refused: ${this.ctx.agentForwardingRefusal}`);
      },
    };
  }

  // ------------------------------------------------------------ -L

  /** direct-tcpip: the client's -L, connected from the owning node (inside the VE, by its broker). */
  onDirectTcpip(accept: () => ServerChannel, reject: () => void, info: TcpipRequestInfo): void {
    this.openForward(accept, reject, 'local', { host: String(info.destIP).slice(0, 64), port: info.destPort },
      (client, cb) => client.forwardOut(String(info.srcIP), info.srcPort, String(info.destIP), info.destPort, cb));
  }

  /** direct-streamlocal@openssh.com: the client's -L to a Unix socket in the VE. */
  onDirectStreamLocal(accept: () => ServerChannel, reject: () => void, info: { socketPath?: unknown }): void {
    const path = String(info.socketPath ?? '');
    this.openForward(accept, reject, 'local-unix', { path: path.slice(0, 120) }, (client, cb) => client.openssh_forwardOutStreamLocal(path, cb));
  }

  private openForward(
    accept: () => ServerChannel, reject: () => void, kind: string, target: Record<string, unknown>,
    open: (client: SshClient, cb: (err: Error | undefined, channel: ClientChannel) => void) => void,
  ): void {
    if (this.ctx.forwardingRefusal) {
      this.ctx.noisy.info({ event: 'forward.refused', kind, target, reason: this.ctx.forwardingRefusal });
      reject();
      return;
    }
    if (this.state === 'failed' || this.state === 'closed' || !this.ctx.reserveChannel(false)) {
      reject();
      return;
    }
    this.whenReady({
      ready: () => {
        const client = this.client;
        const refused = (err: unknown) => {
          this.ctx.releaseChannel(false);
          this.ctx.noisy.info({ event: 'forward.failed', kind, target, node: this.ctx.node, err: errorMessage(err) });
          reject();
        };
        if (!client) return refused('the link to the node is gone');
        try {
          open(client, (err, back) => {
            if (err) return refused(err);
            if (this.state !== 'ready') {
              back.close();
              this.ctx.releaseChannel(false);
              reject();
              return;
            }
            relayChannels(accept() as unknown as AnyChannel, back as unknown as AnyChannel, () => this.ctx.releaseChannel(false));
          });
        } catch (err) {
          refused(err);
        }
      },
      fail: () => {
        this.ctx.releaseChannel(false);
        reject();
      },
    });
  }

  // ------------------------------------------------------------ -R

  /** tcpip-forward, cancel-tcpip-forward, streamlocal-forward@openssh.com and its cancel: asked of the owning node, which listens in the VE. */
  onGlobalRequest(accept: ((port?: number) => void) | undefined, reject: (() => void) | undefined, name: string, info: TcpipBindInfo): void {
    const no = () => reject?.();
    if (this.ctx.forwardingRefusal) {
      this.ctx.noisy.info({ event: 'forward.refused', kind: name.startsWith('streamlocal') || name.startsWith('cancel-streamlocal') ? 'remote-unix' : 'remote', reason: this.ctx.forwardingRefusal });
      no();
      return;
    }
    if (this.state === 'failed' || this.state === 'closed') {
      no();
      return;
    }
    const path = String((info as unknown as { socketPath?: unknown }).socketPath ?? '');
    const bindAddr = String(info.bindAddr ?? '');
    const bindPort = Number(info.bindPort);
    const adding = name === 'tcpip-forward' || name === 'streamlocal-forward@openssh.com';
    if (adding && this.listeners.size + this.listensInFlight >= MAX_REMOTE_FORWARDS_PER_CONNECTION) {
      this.ctx.noisy.info({ event: 'forward.refused', kind: name === 'tcpip-forward' ? 'remote' : 'remote-unix', reason: 'too many remote forwards' });
      no();
      return;
    }
    if (adding) this.listensInFlight += 1;
    this.whenReady({
      ready: () => {
        const client = this.client;
        const done = (err: Error | null | undefined, after: () => void) => {
          if (adding) this.listensInFlight -= 1;
          if (err || this.state !== 'ready') {
            if (err) this.ctx.noisy.info({ event: 'forward.failed', request: name, node: this.ctx.node, err: errorMessage(err) });
            no();
            return;
          }
          after();
        };
        if (!client) return done(new Error('the link to the node is gone'), () => undefined);
        try {
          switch (name) {
            case 'tcpip-forward':
              client.forwardIn(bindAddr, bindPort, (err, port) => done(err, () => {
                this.listeners.set(`${bindAddr}:${port}`, { bindAddr, port });
                this.ctx.log.info({ event: 'forward.listen', kind: 'remote', node: this.ctx.node, bind: { address: bindAddr.slice(0, 64), port } });
                accept?.(port);
              }));
              return;
            case 'cancel-tcpip-forward':
              if (!this.listeners.delete(`${bindAddr}:${bindPort}`)) return done(new Error('no such forward on this connection'), () => undefined);
              client.unforwardIn(bindAddr, bindPort, (err) => done(err, () => accept?.()));
              return;
            case 'streamlocal-forward@openssh.com':
              if (this.listeners.has(`unix:${path}`)) return done(new Error('already forwarded on this connection'), () => undefined);
              client.openssh_forwardInStreamLocal(path, (err) => done(err, () => {
                this.listeners.set(`unix:${path}`, { path });
                this.ctx.log.info({ event: 'forward.listen', kind: 'remote-unix', node: this.ctx.node, bind: { path: path.slice(0, 120) } });
                accept?.();
              }));
              return;
            case 'cancel-streamlocal-forward@openssh.com':
              if (!this.listeners.delete(`unix:${path}`)) return done(new Error('no such forward on this connection'), () => undefined);
              client.openssh_unforwardInStreamLocal(path, (err) => done(err, () => accept?.()));
              return;
            default:
              done(new Error('not a forwarding request'), () => undefined);
          }
        } catch (err) {
          done(err instanceof Error ? err : new Error(String(err)), () => undefined);
        }
      },
      fail: () => {
        if (adding) this.listensInFlight -= 1;
        no();
      },
    });
  }

  /**
   * A connection reached one of our -R listeners in the VE (a
   * forwarded-tcpip channel from the owning node): open one to the client.
   * Only for a listener this connection asked for (ssh2 checks that too);
   * what the VE can make the other node say about its origin goes to the
   * client as ssh2 encodes it.
   */
  private onForwardedTcp(info: { destIP: string; destPort: number; srcIP: string; srcPort: number }, accept: () => unknown, reject: () => void): void {
    const l = this.listeners.get(`${info.destIP}:${info.destPort}`);
    if (this.state !== 'ready' || !l || !('port' in l) || !this.ctx.reserveChannel(false)) {
      reject();
      return;
    }
    try {
      this.ctx.conn.forwardOut(l.bindAddr, l.port, String(info.srcIP).slice(0, 64), Number(info.srcPort) & 0xffff, (err, front) => this.forwardedOpened(err, front as unknown as AnyChannel, accept, reject, 'remote'));
    } catch (err) {
      this.forwardedOpened(err instanceof Error ? err : new Error(String(err)), null, accept, reject, 'remote');
    }
  }

  private onForwardedUnix(info: { socketPath: string }, accept: () => unknown, reject: () => void): void {
    const l = this.listeners.get(`unix:${info.socketPath}`);
    if (this.state !== 'ready' || !l || !('path' in l) || !this.ctx.reserveChannel(false)) {
      reject();
      return;
    }
    try {
      this.ctx.conn.openssh_forwardOutStreamLocal(l.path, (err, front) => this.forwardedOpened(err, front as unknown as AnyChannel, accept, reject, 'remote-unix'));
    } catch (err) {
      this.forwardedOpened(err instanceof Error ? err : new Error(String(err)), null, accept, reject, 'remote-unix');
    }
  }

  private forwardedOpened(err: Error | undefined, front: AnyChannel | null, accept: () => unknown, reject: () => void, kind: string): void {
    if (err || !front || this.state !== 'ready') {
      if (err) this.ctx.noisy.info({ event: 'forward.failed', kind, err: errorMessage(err) });
      front?.close();
      this.ctx.releaseChannel(false);
      reject();
      return;
    }
    relayChannels(front, accept() as unknown as AnyChannel, () => this.ctx.releaseChannel(false));
  }
}

// ------------------------------------------------------------ the node key, as an agent

/**
 * ssh2 authenticates with keys it does not hold through an agent: this one
 * lists the node key and has our broker sign. Only the one login the broker
 * vouches for is signed, once: the blob is checked here first (user,
 * service, key), as the broker checks it, because a request the broker
 * refuses as malformed costs the whole worker.
 */
class NodeKeyAgent extends BaseAgent<ParsedKey> {
  private signed = false;

  constructor(private readonly key: ParsedKey, private readonly user: string, private readonly signer: (data: Buffer) => Promise<Buffer>) {
    super();
  }

  getIdentities(cb: (err: Error | undefined, keys?: ParsedKey[]) => void): void {
    cb(undefined, [this.key]);
  }

  sign(_pubKey: ParsedKey, data: Buffer, options: unknown, cb?: (err: Error | undefined, signature?: Buffer) => void): void {
    const done = (typeof options === 'function' ? options : cb) as (err: Error | undefined, signature?: Buffer) => void;
    const parsed = parseUserauthBlob(data);
    const blob = this.key.getPublicSSH();
    if (this.signed) return done(new Error('the node key signs one login per connection'));
    if (!parsed || parsed.user !== this.user || parsed.service !== 'ssh-connection' || parsed.algo !== 'ssh-ed25519' || !parsed.key.equals(blob)
      || parsed.sessionId.length < 20 || parsed.sessionId.length > 64) {
      return done(new Error('ssh2 asked to sign something other than our login to the node'));
    }
    this.signed = true;
    this.signer(data).then((sig) => {
      if (sig.length !== 64) done(new Error(`the broker's signature is ${sig.length} bytes, not an ed25519 signature`));
      else done(undefined, sig);
    }, (err: unknown) => done(err instanceof Error ? err : new Error(String(err))));
  }
}

// ------------------------------------------------------------ the client's agent, for the owning node

/**
 * The agent ssh2 gives the owning node's auth-agent@openssh.com channels
 * to: each becomes a new agent channel to our client (its own agent), as a
 * local login's agent connections do. It holds no key and signs nothing:
 * authentication goes through NodeKeyAgent, in the login method only.
 */
class ClientAgentRelay extends BaseAgent {
  constructor(private readonly ctx: Pick<RemoteLinkContext, 'conn' | 'reserveChannel' | 'releaseChannel' | 'log'>) {
    super();
  }

  getIdentities(cb: (err: Error | undefined) => void): void {
    cb(new Error('this agent only relays the client\'s agent channels'));
  }

  sign(_pubKey: unknown, _data: Buffer, options: unknown, cb?: (err: Error | undefined) => void): void {
    ((typeof options === 'function' ? options : cb) as (err: Error | undefined) => void)(new Error('this agent only relays the client\'s agent channels'));
  }

  override getStream(cb: (err: Error | undefined, stream?: Duplex) => void): void {
    if (!this.ctx.reserveChannel(false)) {
      cb(new Error('too many channels'));
      return;
    }
    openClientAgentChannel(this.ctx.conn, (err, channel) => {
      if (err || !channel) {
        this.ctx.releaseChannel(false);
        this.ctx.log.info({ event: 'agent.channel_failed', err: err ? errorMessage(err) : 'no channel' });
        cb(err ?? new Error('no channel'));
        return;
      }
      channel.on('error', () => undefined);
      channel.once('close', () => this.ctx.releaseChannel(false));
      cb(undefined, channel);
    });
  }
}

// ------------------------------------------------------------ one relayed session

interface SessionRelayContext {
  /** The link's ssh2 client while it is up. */
  client(): SshClient | null;
  node: string;
  noPty: boolean;
  log: Logger;
  noisy: Pick<CappedLog, 'info'>;
  /** ssh -A may be carried for this login. */
  agentAllowed: boolean;
  /** The client asked for agent forwarding and may not (logged once per connection). */
  refuseAgent(): void;
}

type ExitInfo = { code: number } | { signal: string; dump: boolean; desc: string };

/**
 * One session channel, carried: env and pty requests are kept until the
 * shell, command or subsystem is asked for, then sent with it on a session
 * channel to the owning node; its output, exit and EOF come back in
 * OpenSSH's order (all output, exit-status or exit-signal, EOF, close).
 */
class RelayedSession {
  /** No prototype: a client's env name is any string, "__proto__" too. */
  private readonly env: Record<string, string> = Object.create(null) as Record<string, string>;
  private envCount = 0;
  private pty: PseudoTtyInfo | null = null;
  private agentForward = false;
  private started = false;
  private front: ServerChannel | null = null;
  private back: ClientChannel | null = null;
  private exit: ExitInfo | null = null;
  private outEnded = false;
  private errEnded = false;
  private backClosed = false;
  private finished = false;
  private closed = false;
  /** A window change arrived before the owning node had answered: sent once it has. */
  private sizeChanged = false;
  private resolveDone!: () => void;
  /** Resolves when the client's channel is closed. */
  readonly done = new Promise<void>((r) => {
    this.resolveDone = r;
  });

  constructor(private readonly session: Session, private readonly ctx: SessionRelayContext, private readonly onClosed: () => void) {
    session.on('error', () => undefined);
    session.on('env', (accept, reject, info) => this.onEnv(accept, reject, info.key, info.val));
    session.on('pty', (accept, reject, info) => this.onPty(accept, reject, info));
    session.on('window-change', (accept, reject, info) => this.onWindowChange(accept, reject, info));
    session.on('signal', (accept, reject, info) => this.onSignal(accept, reject, info.name));
    session.on('auth-agent', (accept, reject) => {
      if (!ctx.agentAllowed || this.started) {
        if (!ctx.agentAllowed) ctx.refuseAgent();
        reject?.();
        return;
      }
      // Asked of the owning node with this session's shell or command.
      this.agentForward = true;
      accept?.();
    });
    session.on('shell', (accept, reject) => this.start('shell', accept, reject));
    session.on('exec', (accept, reject, info) => this.start('exec', accept, reject, info.command));
    session.on('subsystem', (accept, reject, info) => this.start('subsystem', accept, reject, info.name));
    session.on('close', () => this.close());
  }

  /** Text for the session's user on stderr (the link is ending). */
  notify(text: string): void {
    if (this.front && !this.finished && !this.closed) {
      try {
        this.front.stderr.write(text);
      } catch { /* channel gone */ }
    }
  }

  private onEnv(accept: (() => void) | undefined, reject: (() => void) | undefined, name: string, value: string): void {
    const n = String(name);
    const v = String(value);
    // The owning node applies its own rules (which names); the bounds keep what waits here small.
    if (this.started || this.envCount >= ENV_LIMITS.maxVars || n.length === 0 || n.length > ENV_LIMITS.maxNameLength || v.length > ENV_LIMITS.maxValueLength || Object.hasOwn(this.env, n)) {
      reject?.();
      return;
    }
    this.env[n] = v;
    this.envCount += 1;
    accept?.();
  }

  private onPty(accept: (() => void) | undefined, reject: (() => void) | undefined, info: PseudoTtyInfo): void {
    if (this.started || this.pty) {
      reject?.();
      return;
    }
    if (this.ctx.noPty) {
      this.ctx.noisy.info({ event: 'ssh.pty_refused', reason: 'no-pty key option' });
      reject?.();
      return;
    }
    this.pty = { ...info };
    accept?.();
  }

  private onWindowChange(accept: (() => void) | undefined, reject: (() => void) | undefined, info: { cols: number; rows: number; width: number; height: number }): void {
    if (!this.pty) {
      reject?.();
      return;
    }
    this.pty.cols = info.cols;
    this.pty.rows = info.rows;
    this.pty.width = info.width;
    this.pty.height = info.height;
    if (this.back) this.sendSize();
    else this.sizeChanged = true;
    accept?.();
  }

  private sendSize(): void {
    const p = this.pty;
    if (!p || !this.back) return;
    try {
      this.back.setWindow(p.rows, p.cols, p.height, p.width);
    } catch { /* channel gone */ }
  }

  private onSignal(accept: (() => void) | undefined, reject: (() => void) | undefined, name: string): void {
    const sig = String(name).replace(/^SIG/, '');
    // ssh2 throws on a name outside RFC 4254's list: checked here first.
    if (!this.back || !CLIENT_SIGNALS.has(sig)) {
      this.ctx.noisy.info({ event: 'ssh.signal_refused', signal: String(name).slice(0, 16) });
      reject?.();
      return;
    }
    try {
      this.back.signal(sig);
    } catch { /* channel gone */ }
    accept?.();
  }

  private start(kind: 'shell' | 'exec' | 'subsystem', accept: () => ServerChannel, reject: (() => void) | undefined, detail?: string): void {
    if (this.started || this.closed) {
      reject?.();
      return;
    }
    if (kind === 'exec' && (detail === undefined || detail.length > MAX_COMMAND_LENGTH || detail.includes('\0'))) {
      this.ctx.noisy.info({ event: 'ssh.exec_refused', reason: 'command empty, too long or with NUL', length: detail?.length ?? 0 });
      reject?.();
      return;
    }
    if (kind === 'subsystem' && (!detail || detail.length > MAX_SUBSYSTEM_NAME)) {
      this.ctx.noisy.info({ event: 'ssh.subsystem_refused', subsystem: String(detail).slice(0, 64) });
      reject?.();
      return;
    }
    this.started = true;
    // Accepted at once, as a local session is: OpenSSH sends stdin without
    // waiting for the reply, and ssh2 drops a channel's data before accept.
    // The client's input waits in the channel (its window) until piped.
    const front = accept();
    this.front = front;
    front.on('error', () => undefined);
    front.stderr.on('error', () => undefined);
    front.on('close', () => this.close());
    const client = this.ctx.client();
    const opened = (err: Error | undefined, back: ClientChannel) => this.opened(kind, err, back);
    if (!client) {
      this.opened(kind, new Error('the link to the node is gone'), null);
      return;
    }
    const pty = this.pty ? { rows: this.pty.rows, cols: this.pty.cols, height: this.pty.height, width: this.pty.width, term: this.pty.term, modes: this.pty.modes } : undefined;
    try {
      const agent = this.agentForward ? { agentForward: true } : {};
      if (kind === 'exec') client.exec(detail!, { env: this.env, ...(pty ? { pty } : {}), ...agent }, opened);
      else if (kind === 'shell') client.shell(pty ?? false, { env: this.env, ...agent }, opened);
      else client.subsys(detail!, opened);
    } catch (err) {
      this.opened(kind, err instanceof Error ? err : new Error(String(err)), null);
    }
  }

  private opened(kind: string, err: Error | undefined, back: ClientChannel | null): void {
    const front = this.front!;
    if (this.closed) {
      back?.close();
      return;
    }
    if (err || !back) {
      this.ctx.log.info({ event: 'cluster.session_refused', node: this.ctx.node, kind, err: errorMessage(err) });
      void this.finish({ code: 1 }, `vesh: cluster node ${this.ctx.node}, where your environment lives, did not start this ${kind}.\r\n`);
      return;
    }
    this.back = back;
    back.on('error', () => undefined);
    back.stderr.on('error', () => undefined);
    if (this.sizeChanged) this.sendSize();
    // Output: piped, so a client that does not read stops the other node's window, not our memory.
    back.pipe(front, { end: false });
    back.stderr.pipe(front.stderr, { end: false });
    // Input: the client's EOF becomes EOF there (the client side of ssh2 half-closes).
    front.pipe(back);
    back.on('exit', (code: number | null, signal?: string, dump?: boolean, desc?: string) => {
      this.exit = typeof code === 'number' ? { code } : { signal: String(signal ?? ''), dump: dump === true, desc: String(desc ?? '').slice(0, MAX_EXIT_MESSAGE) };
      this.maybeFinish();
    });
    back.on('end', () => {
      this.outEnded = true;
      this.maybeFinish();
    });
    back.stderr.on('end', () => {
      this.errEnded = true;
      this.maybeFinish();
    });
    back.on('close', () => {
      this.backClosed = true;
      this.maybeFinish();
    });
  }

  /** All output is in (EOF both ways from the other node) and it said how the process ended, or closed without saying. */
  private maybeFinish(): void {
    if (this.outEnded && this.errEnded && (this.exit || this.backClosed)) void this.finish(this.exit);
  }

  /** Tell the client: every byte of output first, then the exit, then EOF and close. */
  private async finish(exit: ExitInfo | null, message?: string): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    const front = this.front;
    if (!front || this.closed) return;
    try {
      if (message) front.stderr.write(message);
      await flushed(front);
      if (exit && 'code' in exit) front.exit(exit.code);
      else if (exit) {
        const name = exit.signal.replace(/^SIG/, '');
        // ssh2 throws on a signal name outside RFC 4254's list; another one is told as the shell would show it.
        if (CLIENT_SIGNALS.has(name)) front.exit(name, exit.dump, exit.desc);
        else front.exit(128 + (osConstants.signals[`SIG${name}` as NodeJS.Signals] ?? 127));
      }
      front.end();
    } catch (err) {
      this.ctx.log.debug({ event: 'ssh.session_finish_error', err: errorMessage(err) });
    }
  }

  /** The client closed the channel, or the connection went: hang up there too. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    try {
      this.back?.close();
    } catch { /* already gone */ }
    this.resolveDone();
    this.onClosed();
  }
}

/**
 * Resolve once what was written to the channel and its stderr has gone out,
 * or after FINISH_FLUSH_MS when the client stopped reading.
 */
function flushed(channel: ServerChannel): Promise<void> {
  const one = (w: NodeJS.WritableStream) => new Promise<void>((resolve) => {
    if (!(w as unknown as { writable: boolean }).writable) return resolve();
    w.write(EMPTY, () => resolve());
  });
  return Promise.race([
    Promise.all([one(channel), one(channel.stderr)]).then(() => undefined),
    new Promise<void>((r) => setTimeout(r, FINISH_FLUSH_MS).unref()),
  ]);
}

/** Run `fn` once every byte already written to `dst` went out (at once if it cannot take more); after `timeoutMs` anyway when given. */
function afterWrites(dst: AnyChannel, fn: () => void, timeoutMs = 0): void {
  let called = false;
  const once = () => {
    if (called) return;
    called = true;
    try {
      fn();
    } catch { /* channel gone */ }
  };
  if (!dst.writable || dst.writableEnded || dst.destroyed) {
    once();
    return;
  }
  try {
    dst.write(EMPTY, () => once());
  } catch {
    once();
  }
  if (timeoutMs > 0) setTimeout(once, timeoutMs).unref();
}

/**
 * Relay a forwarded channel between the client (front) and the owning node
 * (back), half-close both ways: EOF travels as EOF after the bytes before
 * it; a side that closes has the other closed once what it sent went out.
 * `done` runs once, when the client's side is closed.
 */
function relayChannels(front: AnyChannel, back: AnyChannel, done: () => void): void {
  let frontEnded = false;
  let backEnded = false;
  let finished = false;
  const closeBoth = () => {
    front.close();
    back.close();
  };
  const half = (src: AnyChannel, dst: AnyChannel, ended: () => void) => {
    src.on('error', () => undefined);
    src.pipe(dst, { end: false });
    src.on('end', () => afterWrites(dst, () => {
      dst.eof();
      ended();
      if (frontEnded && backEnded) closeBoth();
    }));
    src.on('close', () => afterWrites(dst, () => dst.close(), CLOSE_FLUSH_MS));
  };
  half(front, back, () => { frontEnded = true; });
  half(back, front, () => { backEnded = true; });
  front.on('close', () => {
    if (finished) return;
    finished = true;
    done();
  });
}
