import type { Logger } from '../audit/logger.js';
import { countLogin } from '../audit/metrics.js';
import { ErrorCodes, VeshError, errorMessage, isVeshError } from '../errors.js';
import { acceptClientEnv, sessionEnvironment, sanitizeTerm } from '../ssh/environment.js';
import { CLIENT_SIGNALS, type ExitReport } from '../ssh/exit-status.js';
import { isValidHost, isValidPort, isValidSocketPath } from '../ssh/forward-protocol.js';
import { ENV_LIMITS, MAX_REMOTE_FORWARDS_PER_CONNECTION, MAX_SESSIONS_PER_CONNECTION, clampPtySize } from '../ssh/limits.js';
import { prepareLogin, type LoginContext } from '../ssh/login.js';
import type { SshAccount, SshAuthenticator, SshAuthorizedKey } from '../ssh/ports.js';
import { SFTP_SERVER_PATH, sftpServerArgv } from '../ssh/sftp.js';
import type { CapRefusal, UsageCaps } from '../ssh/usage-caps.js';
import { sshFingerprint } from '../ssh/host-keys.js';
import { NO_TIMEOUTS, formatDuration, resolveTimeouts } from '../ssh/timeouts.js';
import type { TimeoutSettings } from '../config/server-config.js';
import { closeFd, shutdownFd } from '../system/fdpass.js';
import type { VeAccess, VeProcessSpec } from '../ve/access.js';
import { AgentUnavailable, startAgentSession } from './agent-session.js';
import type { HeldShells, PersistentShells } from './held-shells.js';
import { ForwardRelayClient } from './forward-relay-client.js';
import { watchClientSilence } from './client-alive-backstop.js';
import type { Admitted } from './admission.js';
import type { AuthGrant, BrokerEvent, ConnState, Request } from './request-table.js';
import { spawnSession, type SpawnedSession } from './session-spawn.js';
import { recordSession } from './session-recording.js';
import type { ConnectionRecording, Recordings } from '../audit/recording-store.js';
import type { Tap } from '../audit/recording-tap.js';
import { parseUserauthBlob } from './userauth-blob.js';
import { verify as cryptoVerify, type KeyObject } from 'node:crypto';
import type { NodeRoutes } from './node-routes.js';
import { VOUCH_MAX_SKEW_MS, decodeVouch, encodeVouch, isVouchName, keyFromVouch, vouchKeyOf, type MoveVouch, type Vouch, type VouchedKeySource } from './node-vouch.js';
import { parseMoveCommand, type VeReceiver } from './ve-receive.js';
import { MAX_USER_NAME_CHARS } from './request-table.js';
import { isCertificateAlgorithm } from '../auth/certificates.js';
import { forwardingRefusal, permitListenRefusal, permitOpenRefusal } from '../auth/forward-rules.js';

/** What a connection record needs from the broker. */
export interface ConnectionDeps {
  authenticator: SshAuthenticator;
  ves: VeAccess;
  caps: UsageCaps;
  maxAuthTries: number;
  maxSessions?: number;
  /** Send an event to the worker that holds this connection. */
  send(ev: BrokerEvent, fds?: number[]): void;
  /** Shells of dropped connections, held for their account's next login (accounts' persistentShells). */
  heldShells?: HeldShells;
  /** Authentication succeeded: the connection leaves the pre-auth caps and its grace timer. */
  onAuthenticated(): void;
  /** vesh.yaml's timeouts (an account's own override them); absent: all off. */
  timeouts?: TimeoutSettings;
  /** vesh.yaml's agent and Unix-socket forwarding settings (sessions:); absent fields take OpenSSH's defaults. */
  features?: { agentForwarding?: boolean; streamLocalBindUnlink?: boolean; streamLocalBindMask?: number };
  /** Session recording (vesh.yaml recording:, accounts.yaml record:); absent: nothing is recorded. */
  recordings?: Recordings | null;
  /** Cluster mode: logins carried to and from other nodes (node-routes.ts); absent: a single node. */
  routes?: NodeRoutes | null;
  /** Cluster mode: VEs other nodes move here (vesh ve move; ve-receive.ts); absent: this node takes none. */
  veReceiver?: VeReceiver | null;
}

/** The umask of the agent socket (OpenSSH's too): the session's user only. */
const AGENT_SOCKET_MASK = 0o177;

/** A refusal the worker passes on to its client; the worker itself did nothing wrong. */
export class Refused extends Error {}

/** Who logged in, and with which key (when it was a key). */
interface AuthResult {
  account: SshAccount;
  key: SshAuthorizedKey | null;
  method: 'publickey' | 'password' | 'keyboard-interactive';
  /** Authenticated by another cluster node, which carried the login here (its vouch). */
  via?: Vouch;
}

/** Signatures with the node key one carried connection may ask for (ssh2 signs once; a retry or two at most). */
const NODE_SIGNS_PER_CONNECTION = 3;

/** Re-key signatures one connection may have at once, and how often one more. */
const RESIGN_BURST = 4;
const RESIGN_INTERVAL_MS = 60_000;

/** How long a holdable shell waits for its VE's session agent to come up (its start waits 1 s, then a runc exec). */
const HOLD_AGENT_WAIT_MS = 3_000;

/** How long a connection refused by a cap may stay before the broker cuts it (the worker ends it after 5 s). */
const CAP_REFUSAL_CUT_MS = 8_000;

/**
 * The broker's record of one client connection, held by one worker: its
 * authentication (decided here, from what the worker relays), then the
 * sessions and forwards it runs. The account, VE, user and limits come from
 * `result`, set only by a successful check here.
 *
 * `cutFd` is our own copy of the client's TCP socket: we never read it, but
 * with it we can end the connection whatever the worker does (grace time,
 * lock, a cap refusal, a worker that went bad).
 */
export class BrokerConnection {
  state: ConnState = 'preauth';
  /** The first exchange hash we signed for it: the session identifier client signatures must name. */
  sessionId: Buffer | null = null;
  private result: AuthResult | null = null;
  private failures = 0;
  private authDone = false;
  /** Failures already held against the source (so closing is not counted again as "noauth"). */
  recordedFailures = 0;
  private login: Promise<LoginContext> | null = null;
  private capRefusal: CapRefusal | null = null;
  private countedAccount: string | null = null;
  private helperCounted = false;
  private readonly sessions = new Map<number, SpawnedSession>();
  /** Sessions the agent may hold when the connection drops, with what frees their place in the caps. */
  private readonly holdable = new Map<number, () => void>();
  private readonly sessionIds = new Set<number>();
  private relay: Promise<ForwardRelayClient> | null = null;
  /** The connection's agent socket in the VE, once asked for (ssh -A): one per connection, as OpenSSH's. */
  private agent: Promise<{ listener: number; path: string }> | null = null;
  private readonly listeners = new Set<number>();
  /** Sessions asked for and not ended (starting or running): what sessions.maxSessions counts. */
  private sessionsHeld = 0;
  /** -R listens asked for and not answered yet: they count against the cap too. */
  private listensPending = 0;
  private timers: NodeJS.Timeout[] = [];
  /** The account's timeouts, set at login. */
  private timeouts: TimeoutSettings = NO_TIMEOUTS;
  /** Sessions' maxSessionTime timers, by session id. */
  private readonly sessionTimers = new Map<number, NodeJS.Timeout>();
  /** The client went silent past the keepalive limit and we cut it: nothing new starts for it. */
  private silenced = false;
  private resignTokens = RESIGN_BURST;
  /** This connection's recording, made at its first session when its account is recorded. */
  private recording: ConnectionRecording | null = null;
  /** Recorded terminal sessions: the broker holds their master, and window changes come to it. */
  private readonly taps = new Map<number, Tap>();
  private resignAt = Date.now();
  /** The account's VE lives on another node: the worker carries the connection there, under this vouching user name. */
  private remote: { node: string; user: string } | null = null;
  private nodeSignsLeft = NODE_SIGNS_PER_CONNECTION;
  /** A node login's key was a live node's, vouching as itself (its other checks may still fail). */
  private keyOfLiveNode = false;
  /** A node moving a VE here logged in (a move vouch): no account, no login; its sessions are the receiver's (ve-receive.ts). */
  private move: MoveVouch | null = null;

  /**
   * May the key exchange be signed again (a re-key)? Never before login;
   * after it, RESIGN_BURST at once and one more per RESIGN_INTERVAL_MS
   * (OpenSSH re-keys after about a gigabyte or an hour).
   */
  mayResign(): boolean {
    if (this.state !== 'authenticated') return false;
    const now = Date.now();
    this.resignTokens = Math.min(RESIGN_BURST, this.resignTokens + (now - this.resignAt) / RESIGN_INTERVAL_MS);
    this.resignAt = now;
    if (this.resignTokens < 1) return false;
    this.resignTokens -= 1;
    return true;
  }

  /** Sessions started and not ended (the metrics endpoint). */
  get openSessions(): number {
    return this.sessions.size;
  }

  /** Its -R, Unix-socket and agent listeners in the VE (the metrics endpoint). */
  get openListeners(): number {
    return this.listeners.size;
  }

  /** The once-only requests (request-table.ts) this connection has had. */
  readonly onceSeen = new Set<string>();
  /** Its place in the pre-auth caps (set by the broker once handed over). */
  admission: Admitted | null = null;
  log: Logger;

  constructor(
    readonly id: string,
    readonly worker: number,
    readonly source: string,
    readonly port: number,
    readonly local: { address: string; port: number },
    private cutFd: number,
    private readonly deps: ConnectionDeps,
    baseLog: Logger,
  ) {
    this.log = baseLog;
  }

  get account(): string | null {
    return this.result?.account.name ?? null;
  }

  // ------------------------------------------------------------ authentication

  async keyQuery(r: Request<'auth.key_query'>): Promise<{ acceptable: boolean }> {
    const key = Buffer.from(r.key, 'base64');
    if (isVouchName(r.user)) {
      const v = await this.vouched(r.user, r.algo, key);
      if (v) {
        this.audit('key-acceptable', 'publickey', r.user, { account: v.account?.name, via: v.vouch.from, fingerprint: sshFingerprint(key) });
        return { acceptable: true };
      }
      this.countFailure();
      return { acceptable: false };
    }
    const found = this.deps.authenticator.findKey(r.user, r.algo, key, this.source);
    const fingerprint = sshFingerprint(key);
    if (found) {
      this.audit('key-acceptable', 'publickey', r.user, { account: found.account.name, fingerprint, algo: r.algo });
      return { acceptable: true };
    }
    // An unknown key counts against MaxAuthTries as in OpenSSH, not as a
    // penalty failure: clients routinely offer several keys.
    this.audit('key-refused', 'publickey', r.user, { fingerprint, algo: r.algo });
    this.countFailure();
    return { acceptable: false };
  }

  async publickey(r: Request<'auth.publickey'>): Promise<{ success: boolean; grant?: AuthGrant; disconnect?: boolean }> {
    if (this.authDone) return { success: false, disconnect: true };
    const key = Buffer.from(r.key, 'base64');
    const blob = Buffer.from(r.blob, 'base64');
    const fingerprint = sshFingerprint(key);
    if (isVouchName(r.user)) return this.nodePublickey(r, key, blob);
    const found = this.deps.authenticator.findKey(r.user, r.algo, key, this.source);
    const parsed = parseUserauthBlob(blob);
    const bound = !!parsed && !!this.sessionId && parsed.sessionId.equals(this.sessionId)
      && parsed.user === r.user && parsed.key.equals(key) && parsed.service === 'ssh-connection'
      // A certificate's algorithm name decides which signatures it may make: the one the client signed must be the one checked.
      && (!isCertificateAlgorithm(r.algo) || parsed.algo === r.algo);
    const ok = !!found && bound && this.deps.authenticator.verifySignature(found.key, blob, Buffer.from(r.signature, 'base64'), r.hashAlgo);
    if (ok && found) {
      const cert = found.key.certificate;
      this.audit('success', 'publickey', r.user, { account: found.account.name, fingerprint, algo: r.algo, ...(cert ? { fingerprint: found.key.fingerprint, keyId: cert.keyId, serial: cert.serial, ca: cert.caFingerprint } : {}) });
      return { success: true, grant: await this.succeed({ account: found.account, key: found.key, method: 'publickey' }) };
    }
    this.audit('failure', 'publickey', r.user, { account: found?.account.name, fingerprint, algo: r.algo, ...(found && !bound ? { reason: 'signed data does not name this connection' } : {}) });
    this.holdAgainstSource(r.user);
    return { success: false, disconnect: this.countFailure() };
  }

  async password(r: Request<'auth.password'>): Promise<{ success: boolean; grant?: AuthGrant; disconnect?: boolean }> {
    if (this.authDone) return { success: false, disconnect: true };
    const a = this.deps.authenticator;
    const penalty = a.penaltyRemaining(this.source, r.user);
    if (penalty > 0) {
      // A source under penalty gets no password checks and costs us no
      // hashing; trying on anyway is a failure too, so the penalty grows.
      this.audit('penalized', r.method, r.user, { penaltyMs: penalty });
      this.holdAgainstSource(r.user);
      return { success: false, disconnect: this.countFailure() };
    }
    let res;
    try {
      res = await a.verifyPassword(r.user, r.password, this.source);
    } catch (err) {
      // Our fault, not the source's: not held against it, but it still
      // counts against MaxAuthTries, or a client that can make checks fail
      // would get unlimited attempts.
      this.log.error({ event: 'ssh.auth_error', source: this.source, user: r.user, err: errorMessage(err) }, 'authentication check failed inside the server');
      return { success: false, disconnect: this.countFailure() };
    }
    if (this.authDone || this.state !== 'preauth') return { success: false, disconnect: true };
    if (res.ok) {
      this.audit('success', r.method, r.user, { account: res.account.name });
      return { success: true, grant: await this.succeed({ account: res.account, key: null, method: r.method }) };
    }
    this.audit('failure', r.method, r.user, {});
    this.holdAgainstSource(r.user);
    return { success: false, disconnect: this.countFailure() };
  }

  failure(r: Request<'auth.failure'>): { disconnect: boolean } {
    this.audit('failure', r.method, r.user, { reason: r.reason });
    if (r.method === 'keyboard-interactive') this.holdAgainstSource(r.user);
    return { disconnect: this.countFailure() };
  }

  /**
   * A login carried here by another cluster node (node-vouch.ts): the
   * node's key, a vouch that names this node, an account that exists here,
   * and a VE that lives here; then the signature over this connection's
   * session id. The key's restrictions come from the vouch.
   */
  private async nodePublickey(r: Request<'auth.publickey'>, key: Buffer, blob: Buffer): Promise<{ success: boolean; grant?: AuthGrant; disconnect?: boolean }> {
    const v = await this.vouched(r.user, r.algo, key);
    const parsed = parseUserauthBlob(blob);
    const bound = !!parsed && !!this.sessionId && parsed.sessionId.equals(this.sessionId)
      && parsed.user === r.user && parsed.key.equals(key) && parsed.service === 'ssh-connection' && parsed.algo === 'ssh-ed25519';
    const signature = Buffer.from(r.signature, 'base64');
    let ok = false;
    try {
      ok = !!v && bound && signature.length === 64 && cryptoVerify(null, blob, v.key, signature);
    } catch { /* malformed: not ok */ }
    if (!v || !ok || this.authDone || this.state !== 'preauth') {
      this.audit('failure', 'publickey', r.user, { via: v?.vouch.from, ...(v && !bound ? { reason: 'signed data does not name this connection' } : {}) });
      // A live node's own key and vouch, refused for what this node knows
      // (an account or placement the nodes disagree on): not an attack by
      // that address, whose other users' logins must go on.
      if (v || !this.keyOfLiveNode) this.holdAgainstSource(r.user);
      return { success: false, disconnect: this.countFailure() };
    }
    if (v.account === null) return this.moveAccepted(v.vouch, r.user);
    const vouch = v.vouch;
    let vkey: SshAuthorizedKey | null;
    try {
      vkey = keyFromVouch(vouch);
    } catch (err) {
      this.log.warn({ event: 'cluster.vouch_refused', via: vouch.from, account: vouch.account, reason: `a key rule does not parse here: ${errorMessage(err)}` });
      return { success: false, disconnect: this.countFailure() };
    }
    this.audit('success', vouch.method, vouch.account, { account: vouch.account, via: vouch.from, clientSource: vouch.source, fingerprint: vouch.key?.fingerprint });
    return { success: true, grant: await this.succeed({ account: v.account, key: vkey, method: vouch.method, via: vouch }) };
  }

  /**
   * The vouch in a node login's user name, when everything it claims holds
   * here; null (and why, in the log) otherwise.
   */
  private async vouched(user: string, algo: string, key: Buffer): Promise<{ vouch: Vouch; account: SshAccount; key: KeyObject } | { vouch: MoveVouch; account: null; key: KeyObject } | null> {
    const routes = this.deps.routes;
    const refuse = (reason: string, extra: Record<string, unknown> = {}) => {
      this.log.warn({ event: 'cluster.vouch_refused', source: this.source, reason, ...extra }, `a login carried from another node refused: ${reason}`);
      return null;
    };
    if (!routes) return refuse('cluster mode is off on this node');
    const d = decodeVouch(user);
    if (!d.ok) return refuse(`the user name is not a node's vouch (${d.why})`);
    const vouch = d.vouch;
    if (algo !== 'ssh-ed25519') return refuse(`node keys are ed25519, not ${algo.slice(0, 40)}`);
    let node;
    try {
      node = await routes.nodeOfKey(key);
    } catch (err) {
      return refuse(`cannot read the cluster's nodes: ${errorMessage(err)}`);
    }
    if (!node) return refuse('the key is not the node key of a live node of this cluster', { claims: vouch.from, fingerprint: sshFingerprint(key) });
    if (node.name !== vouch.from) return refuse(`node ${node.name}'s key vouches as node ${vouch.from}`);
    this.keyOfLiveNode = true;
    if (vouch.to !== routes.nodeName) return refuse(`the login is for node ${vouch.to}, not this one`, { via: node.name });
    if (Math.abs(Date.now() - vouch.at) > VOUCH_MAX_SKEW_MS) return refuse(`node ${node.name}'s clock is more than ${VOUCH_MAX_SKEW_MS / 60_000} minutes from ours (or the vouch is old): check NTP on both`, { via: node.name });
    // A move names no account: what it may do is decided at its one session (ve-receive.ts).
    if (vouch.purpose === 'move') return this.deps.veReceiver ? { vouch, account: null, key: node.key } : refuse('this node takes no VE moves', { via: node.name });
    const account = this.deps.authenticator.findAccount?.(vouch.account) ?? null;
    if (!account) return refuse(`account ${vouch.account} does not exist here or is locked (accounts.yaml must be the same on every node)`, { via: node.name });
    // Read, never placed: the carrying node placed it before it vouched,
    // and a node key alone must not make this node write to etcd.
    let here: boolean;
    try {
      here = await routes.placedHere(account.ve);
    } catch (err) {
      return refuse(`cannot tell where VE ${account.ve} lives: ${errorMessage(err)}`, { via: node.name });
    }
    if (!here) return refuse(`VE ${account.ve} is not placed on this node: logins are carried one hop only, to the VE's node`, { via: node.name });
    return { vouch, account, key: node.key };
  }

  private async succeed(result: AuthResult): Promise<AuthGrant> {
    this.authDone = true;
    // Where the VE lives decides what this connection is: here, its
    // sessions run here; on another node, the worker carries them there.
    const routes = this.deps.routes;
    let remote: { node: string; user: string } | null = null;
    let placeError: unknown = null;
    if (routes && !result.via) {
      try {
        const node = await routes.locate(result.account.ve);
        if (node !== routes.nodeName) {
          const vouch: Vouch = {
            v: 1, from: routes.nodeName, to: node, account: result.account.name, source: this.source, port: this.port,
            at: Date.now(), method: result.method, key: vouchKeyOf(result.key as VouchedKeySource | null),
          };
          const user = encodeVouch(vouch, MAX_USER_NAME_CHARS);
          if (user === null) {
            placeError = new VeshError(ErrorCodes.VE_ELSEWHERE, `the restrictions of the key ${result.key?.fingerprint ?? ''} are too long to carry to node ${node} (over ${MAX_USER_NAME_CHARS} characters): shorten its options`, {
              userMessage: `Your environment lives on cluster node ${node}, and your key's options are too long to carry there; ask the administrator.`,
            });
          } else {
            remote = { node, user };
          }
        }
      } catch (err) {
        placeError = err;
      }
    }
    // The client may have gone during that etcd read (the broker forgot the
    // connection): counting it now would hold its caps' slots for good.
    if (this.state !== 'preauth') throw new Refused('the connection is closing');
    this.result = result;
    this.state = 'authenticated';
    this.deps.authenticator.recordSuccess(this.source, result.account.name);
    this.deps.onAuthenticated();
    this.log = this.log.child({ account: result.account.name, ve: result.account.ve });
    const key = result.key;
    const grant: AuthGrant = {
      account: result.account.name,
      ve: result.account.ve,
      forwardingRefusal: forwardingRefusal(result.account, key),
      agentForwardingRefusal: this.agentRefusal(result),
      noPty: !!key?.options.noPty,
      ...(key ? { fingerprint: key.fingerprint } : {}),
    };
    this.timeouts = resolveTimeouts(this.deps.timeouts ?? NO_TIMEOUTS, result.account.timeouts);
    grant.timeouts = this.timeouts;
    const refused = this.deps.caps.admit('connection', result.account.name);
    if (refused) {
      // Logged in, but over a cap: nothing is prepared or started for it.
      this.capRefusal = refused;
      this.log.info({ event: 'ssh.login', method: result.method, fingerprint: key?.fingerprint, source: this.source, refused: refused.setting });
      this.timers.push(setTimeout(() => this.cut(), CAP_REFUSAL_CUT_MS).unref());
      return { ...grant, refusal: refused.userMessage };
    }
    this.countedAccount = result.account.name;
    const watch = watchClientSilence(this.cutFd, this.timeouts, (silentMs, limitMs) => this.onClientSilent(silentMs, limitMs));
    if (watch) this.timers.push(watch);
    const via = result.via ? { via: result.via.from, clientSource: result.via.source } : {};
    if (remote || placeError) {
      // Nothing runs here: a compromised worker asking for a session or a
      // forward anyway is told what the client would be.
      this.remote = remote;
      const why = placeError ?? new VeshError(ErrorCodes.VE_ELSEWHERE, `VE ${result.account.ve} lives on node ${remote!.node}: this connection is carried there`, { userMessage: 'This connection is carried to another node.' });
      this.login = Promise.reject(why);
      this.login.catch(() => undefined);
      if (remote) grant.remote = { node: remote.node };
      this.log.info({ event: 'ssh.login', method: result.method, fingerprint: key?.fingerprint, source: this.source, ...(remote ? { node: remote.node } : { placeError: errorMessage(placeError) }) });
      return grant;
    }
    // A login carried from another node: the session's SSH_CLIENT names the client, not that node.
    const connection = result.via
      ? { clientIp: result.via.source, clientPort: result.via.port, serverIp: this.local.address, serverPort: this.local.port }
      : { clientIp: this.source, clientPort: this.port, serverIp: this.local.address, serverPort: this.local.port };
    // The VE boots while the client is still opening its first channel.
    this.login = prepareLogin(this.deps.ves, result.account, connection, this.log);
    this.login.catch(() => undefined);
    this.log.info({ event: 'ssh.login', method: result.method, fingerprint: key?.fingerprint, source: this.source, ...via });
    return grant;
  }

  private holdAgainstSource(user: string): void {
    this.recordedFailures += 1;
    this.deps.authenticator.recordFailure(this.source, user);
  }

  /** Count a failed attempt; true when MaxAuthTries is used up (the worker disconnects, and we stop answering). */
  private countFailure(): boolean {
    this.failures += 1;
    if (this.failures >= this.deps.maxAuthTries) {
      if (!this.authDone) this.log.warn({ event: 'ssh.auth_too_many', source: this.source, failures: this.failures }, 'too many authentication failures: disconnecting');
      this.authDone = true;
      // A worker that does not disconnect is not obeyed: we cut it ourselves.
      this.timers.push(setTimeout(() => this.cut(), 2_000).unref());
      return true;
    }
    return false;
  }

  private audit(result: string, method: string, user: string, extra: Record<string, unknown>): void {
    countLogin(result, method);
    // A node's vouch is long; the account it names is logged beside it.
    this.log.info({ event: 'ssh.auth', method, user: user.length > 64 ? `${user.slice(0, 64)}…` : user, source: this.source, result, ...extra });
  }

  // ------------------------------------------------------------ carried to another node

  /** cluster.connect: the connection to the node this login's VE lives on (once per connection). */
  async clusterConnect(): Promise<{ body: Record<string, unknown>; fd: number }> {
    const result = this.authenticated();
    const remote = this.remote;
    const routes = this.deps.routes;
    if (!remote || !routes) throw new Refused('this connection is not carried to another node');
    const started = Date.now();
    try {
      const link = await routes.connect(remote.node, result.account.ve);
      if (this.state !== 'authenticated') {
        closeFd(link.fd);
        throw new Refused('the connection is closing');
      }
      this.log.info({ event: 'cluster.route', node: remote.node, ms: Date.now() - started }, `carrying the connection to node ${remote.node}`);
      return { body: { node: remote.node, user: remote.user, nodeKey: routes.nodeKey.line, hostKeys: link.hostKeys }, fd: link.fd };
    } catch (err) {
      if (!(err instanceof Refused)) this.log.warn({ event: 'cluster.route_failed', node: remote.node, ms: Date.now() - started, err: errorMessage(err) });
      throw err;
    }
  }

  /**
   * cluster.sign: the node key's signature over the login the worker makes
   * on the other node, and only that one: the blob must be a publickey
   * userauth request for the vouching user name we wrote, the
   * ssh-connection service and our node key. (Its session id is the other
   * node's, which we cannot know; it binds the signature to that one
   * connection there.)
   */
  clusterSign(r: Request<'cluster.sign'>): { signature: string } {
    this.authenticated();
    const remote = this.remote;
    const routes = this.deps.routes;
    if (!remote || !routes) throw new ProtocolViolation('cluster.sign for a connection that is not carried to another node');
    const data = Buffer.from(r.data, 'base64');
    const parsed = parseUserauthBlob(data);
    if (!parsed || parsed.user !== remote.user || parsed.service !== 'ssh-connection' || parsed.algo !== 'ssh-ed25519' || !parsed.key.equals(routes.nodeKey.blob) || parsed.sessionId.length < 20 || parsed.sessionId.length > 64) {
      throw new ProtocolViolation('cluster.sign over data that is not this connection\'s login to its node');
    }
    if (this.nodeSignsLeft <= 0) throw new ProtocolViolation(`cluster.sign more than ${NODE_SIGNS_PER_CONNECTION} times for one connection`);
    this.nodeSignsLeft -= 1;
    return { signature: routes.sign(data).toString('base64') };
  }

  /**
   * A node moving a VE here (vesh ve move): authenticated without an
   * account. No login is prepared and nothing runs in a VE; its sessions
   * are vesh-receive-ve or vesh-discard-ve for the vouch's VE, answered by
   * the receiver (openMoveSession); everything else is refused.
   */
  private moveAccepted(move: MoveVouch, user: string): { success: boolean; grant: AuthGrant } {
    this.authDone = true;
    this.move = move;
    this.state = 'authenticated';
    this.deps.onAuthenticated();
    this.log = this.log.child({ via: move.from, ve: move.ve, purpose: 'move' });
    this.audit('success', 'publickey', user, { via: move.from, ve: move.ve, purpose: 'move' });
    const no = `this connection moves VE ${move.ve} from node ${move.from}: nothing but its transfer`;
    return { success: true, grant: { account: `vesh-node:${move.from}`, ve: move.ve, forwardingRefusal: no, agentForwardingRefusal: no, noPty: true, timeouts: NO_TIMEOUTS } };
  }

  /** A move connection's session: one of the receiver's two commands, one at a time. */
  private openMoveSession(move: MoveVouch, r: Request<'session.open'>): { fds: number[]; pid: number } {
    if (this.sessionIds.has(r.session)) throw new ProtocolViolation(`session id ${r.session} used twice`);
    const receiver = this.deps.veReceiver;
    if (!receiver || this.state !== 'authenticated' || this.sessions.size > 0) throw new Refused('a connection moving a VE has one transfer at a time');
    const cmd = parseMoveCommand(move, r);
    if ('refusal' in cmd) {
      this.log.warn({ event: 'cluster.move_session_refused', kind: r.kind, reason: cmd.refusal });
      throw new Refused(cmd.refusal);
    }
    this.sessionIds.add(r.session);
    this.log.info({ event: 'ssh.session_start', kind: r.kind, command: r.command });
    const s = receiver.open(move, cmd, (report) => {
      this.sessions.delete(r.session);
      this.log.info({ event: 'ssh.session_end', kind: r.kind, ...(report.kind === 'status' ? { exitStatus: report.code } : { exitSignal: report.signal }) });
      this.deps.send({ ev: 'session.exit', conn: this.id, session: r.session, report });
    });
    this.sessions.set(r.session, s);
    return { fds: s.fds, pid: s.pid };
  }

  // ------------------------------------------------------------ sessions

  private authenticated(): AuthResult {
    if (this.move) throw new Refused(`this connection moves VE ${this.move.ve}: nothing but its transfer`);
    if (!this.result || this.state !== 'authenticated') throw new Error('not authenticated');
    if (this.capRefusal) throw new Refused(this.capRefusal.userMessage);
    if (this.silenced) throw new Refused('the connection is closing');
    return this.result;
  }

  /** Open a session for this connection's account; resolves with the worker's descriptors. */
  async openSession(r: Request<'session.open'>): Promise<{ fds: number[]; pid: number; replay?: Buffer; tapped?: boolean }> {
    if (this.move) return this.openMoveSession(this.move, r);
    const result = this.authenticated();
    if (this.sessionIds.has(r.session)) throw new ProtocolViolation(`session id ${r.session} used twice`);
    const maxSessions = this.deps.maxSessions ?? MAX_SESSIONS_PER_CONNECTION;
    // Counted from the request on, not from the start: requests sent all at
    // once would otherwise each see the sessions not yet started.
    if (this.sessionsHeld >= maxSessions) throw new Refused(`too many sessions on this connection (sessions.maxSessions ${maxSessions})`);
    if (r.kind === 'subsystem' && r.subsystem !== 'sftp') throw new Refused(`unknown subsystem ${JSON.stringify(r.subsystem ?? '').slice(0, 66)}`);
    if (r.kind === 'exec' && (r.command === undefined || r.command.includes('\0'))) throw new Refused('empty command or one with NUL');
    if (r.pty && result.key?.options.noPty) throw new Refused('no-pty key option');
    this.sessionIds.add(r.session);
    // Terminal sessions of an account with persistentShells: a shell held
    // from a dropped connection is taken up again (LC_VESH_SHELL=new asks
    // for a fresh one); it brings its place in the account's caps along.
    const persist = this.persistence(result);
    // A recorded account takes up no held shell: it would reach the worker past the broker's tap.
    const taken = persist && r.pty && r.kind === 'shell' && result.key?.options.command === undefined && !wantsNewShell(r.env) && !this.deps.recordings?.records(result.account)
      ? this.deps.heldShells!.take(result.account.name, result.account.ve)
      : null;
    if (!taken) {
      const refused = this.deps.caps.admit('session', result.account.name);
      if (refused) throw new Refused(refused.userMessage);
    }
    this.sessionsHeld += 1;
    let counted = true;
    /** This session's place in the caps went to a held shell: not ours to free any more. */
    let handedOver = false;
    /** The taken held shell was asked for (from then on it is this session's, or hung up). */
    let tookUp = false;
    const release = () => {
      if (!counted) return;
      counted = false;
      this.sessionsHeld -= 1;
      if (taken) taken.release();
      else this.deps.caps.release('session', result.account.name);
    };
    try {
      let login: LoginContext;
      try {
        login = await this.login!;
      } catch (err) {
        throw new Refused(isVeshError(err) ? err.userMessage : 'The server could not prepare your environment.', { cause: err });
      }
      if (this.state !== 'authenticated') throw new Refused('the connection is closing');
      const forced = result.key?.options.command;
      const shell = login.user.shell || '/bin/sh';
      let argv: string[];
      let original: string | undefined;
      if (forced !== undefined) {
        argv = [shell, '-c', forced];
        original = r.kind === 'exec' ? r.command : r.kind === 'subsystem' ? SFTP_SERVER_PATH : undefined;
      } else if (r.kind === 'exec') {
        argv = [shell, '-c', r.command!];
      } else if (r.kind === 'subsystem') {
        argv = sftpServerArgv();
      } else if (r.pty) {
        // The message of the day is shown by the VE itself unless ~/.hushlogin
        // asks for quiet (the server never reads VE files); then the login shell.
        argv = ['/bin/sh', '-c', '[ -e "$HOME/.hushlogin" ] || cat /etc/motd 2>/dev/null; exec "$0" -l', shell];
      } else {
        argv = [shell, '-l'];
      }
      const term = r.pty ? sanitizeTerm(r.pty.term) : undefined;
      // The worker already filtered the client's env requests; checked again here, where it counts.
      const clientEnv = new Map(Object.entries(r.env).filter(([k, v]) => acceptClientEnv(k, v)).slice(0, ENV_LIMITS.maxVars));
      const env = sessionEnvironment({ user: login.user, clientEnv, term, connection: login.connection, originalCommand: original });
      // Every session after an agent request gets the socket, as OpenSSH does.
      const agent = await this.agent?.catch(() => null);
      if (agent) env.SSH_AUTH_SOCK = agent.path;
      const size = r.pty ? clampPtySize(r.pty.cols, r.pty.rows) : undefined;
      this.log.info({
        event: 'ssh.session_start', kind: r.kind, pty: !!r.pty,
        ...(r.kind === 'exec' ? { command: r.command } : {}),
        ...(r.kind === 'subsystem' ? { subsystem: r.subsystem } : {}),
        ...(forced !== undefined ? { forcedCommand: forced } : {}),
      });
      const spec: VeProcessSpec = {
        user: login.user, argv, env, cwd: login.user.home, tty: !!r.pty,
        ...(size ? { consoleSize: { rows: size.rows, cols: size.cols } } : {}),
      };
      const startedAt = Date.now();
      // A recorded account's session: the broker keeps what it must see (session-recording.ts).
      const rec = this.recordingFor(result);
      if (rec) {
        try {
          rec.event('session.start', {
            session: r.session, kind: r.kind, argv,
            ...(r.kind === 'exec' ? { command: r.command } : {}), ...(r.kind === 'subsystem' ? { subsystem: r.subsystem } : {}),
            ...(forced !== undefined ? { forcedCommand: forced } : {}), ...(size ? { term, cols: size.cols, rows: size.rows } : {}),
          });
          rec.sessionBegan();
        } catch (err) {
          this.log.error({ event: 'recording.open_failed', err: errorMessage(err) }, 'a recorded session was refused: its recording could not be written');
          throw new Refused('your sessions are recorded and the recording could not be written: the session was refused (tell the admin)', { cause: err });
        }
      }
      let recorded: ReturnType<typeof recordSession> | null = null;
      let recordedExit: ExitReport | null = null;
      const onExit = (report: ExitReport) => {
        if (rec && !recorded) {
          // Ended before its recording was set up: finished there.
          recordedExit = report;
          return;
        }
        if (recorded) {
          const done = recorded;
          recorded = null;
          this.taps.delete(r.session);
          void done.finish(report).catch((err: unknown) => this.log.error({ event: 'recording.finish_failed', err: errorMessage(err) })).then(() => endSession(report));
          return;
        }
        endSession(report);
      };
      const endSession = (report: ExitReport) => {
        this.sessions.delete(r.session);
        this.holdable.delete(r.session);
        this.clearSessionTimer(r.session);
        release();
        // Logged here, by the process that ran it, whether or not the client is still there to be told.
        this.log.info({ event: 'ssh.session_end', kind: r.kind, durationMs: Date.now() - startedAt, ...(report.kind === 'status' ? { exitStatus: report.code } : { exitSignal: report.signal }) });
        this.deps.send({ ev: 'session.exit', conn: this.id, session: r.session, report });
      };
      // A new terminal session of an account with persistentShells starts holdable.
      // Not for a recorded account: a held terminal goes to the next login without the broker's tap.
      const hold = !!persist && !!r.pty && r.kind !== 'subsystem' && forced === undefined && !rec;
      let notice = '';
      if (persist && taken && size) {
        const held = taken.session;
        if (held.holdable) {
          try {
            tookUp = true;
            const { fd, replay } = await held.holdable.attach(size.cols, size.rows, persist.bufferBytes);
            if (this.state !== 'authenticated') {
              closeFd(fd);
              // Gone again before it was handed over: held again, not lost.
              held.holdable.detach(persist.bufferBytes);
              this.deps.heldShells!.hold(result.account.name, result.account.ve, held, persist, release);
              handedOver = true;
              throw new Refused('the connection is closing');
            }
            held.holdable.onExit = onExit;
            this.sessions.set(r.session, held);
            this.holdable.set(r.session, release);
            this.limitSessionTime(r.session, held);
            this.log.info({ event: 'ssh.shell_reattached', pid: held.pid, replayBytes: replay.length });
            return { fds: [fd], pid: held.pid, replay };
          } catch (err) {
            if (err instanceof Refused) throw err;
            // The agent did not hand it back as it must (it is hung up): a new shell, and the client told why.
            this.log.warn({ event: 'ssh.shell_reattach_refused', pid: held.pid, err: errorMessage(err) });
            notice = `vesh: your held shell could not be re-attached (${errorMessage(err)}); this is a new one.\r\n`;
          }
        }
      }
      let s: SpawnedSession;
      try {
        s = await this.startProcess(login.account.ve, spec, r.pty && size ? { term: term!, cols: size.cols, rows: size.rows } : null, onExit, hold);
      } catch (err) {
        if (rec) {
          rec.event('session.failed', { session: r.session, error: errorMessage(err).slice(0, 300) });
          rec.sessionEnded();
        }
        throw err;
      }
      let fds = s.fds;
      if (rec) {
        try {
          const made = recordSession(rec, { session: r.session, kind: r.kind, shell, ...(r.pty && size ? { pty: { term: term!, cols: size.cols, rows: size.rows } } : {}) }, s, this.log);
          recorded = made;
          fds = made.fds;
          if (made.tap) this.taps.set(r.session, made.tap);
        } catch (err) {
          for (const fd of s.fds) closeFd(fd);
          s.hangup();
          rec.sessionEnded();
          this.log.error({ event: 'recording.open_failed', err: errorMessage(err) }, 'a recorded session was hung up: its recording could not be written');
          throw new Refused('your sessions are recorded and the recording could not be written: the session was refused (tell the admin)', { cause: err });
        }
        if (recordedExit) onExit(recordedExit);
      }
      this.sessions.set(r.session, s);
      if (s.holdable) this.holdable.set(r.session, release);
      this.limitSessionTime(r.session, s);
      return { fds, pid: s.pid, ...(notice ? { replay: Buffer.from(notice) } : {}), ...(this.taps.has(r.session) ? { tapped: true } : {}) };
    } catch (err) {
      if (taken && !tookUp && !handedOver && persist) {
        // Not taken up after all (the VE could not be prepared, the connection went): held again as it was.
        counted = false;
        this.sessionsHeld -= 1;
        this.deps.heldShells!.hold(result.account.name, result.account.ve, taken.session, persist, taken.release);
      } else if (!handedOver) {
        release();
      }
      throw err;
    }
  }

  /**
   * Start the session's process in the VE: through the VE's session agent,
   * asked by us (agent-session.ts: no host process), when one runs; else, or
   * when it no longer answers, through a host relay (session-spawn.ts), which
   * falls back to `runc exec` itself.
   */
  private async startProcess(
    ve: string,
    spec: VeProcessSpec,
    pty: { term: string; cols: number; rows: number } | null,
    onExit: (report: ExitReport) => void,
    hold = false,
  ): Promise<SpawnedSession> {
    let route = await this.deps.ves.agentRoute?.(ve, spec).catch(() => null);
    let early: Awaited<ReturnType<VeAccess['processCommand']>> | null = null;
    if (!route && hold && this.deps.ves.agentRoute && this.deps.heldShells?.mayWaitForAgent(ve)) {
      // Only the VE's session agent can hold a terminal, and the first session
      // of a VE without one starts it (a second later, session-agents.ts):
      // ask as that session would, then wait a moment for the agent rather
      // than give a shell that should survive a drop a relay that cannot.
      try {
        early = await this.deps.ves.processCommand(ve, spec);
      } catch (err) {
        this.log.error({ event: 'ssh.session_spawn_failed', err: errorMessage(err) });
        throw new Refused(isVeshError(err) ? err.userMessage : 'The server could not start your session.', { cause: err });
      }
      for (const until = Date.now() + HOLD_AGENT_WAIT_MS; !route && Date.now() < until && this.state === 'authenticated';) {
        await new Promise((r) => setTimeout(r, 100));
        route = await this.deps.ves.agentRoute(ve, spec).catch(() => null);
      }
      if (!route) {
        this.deps.heldShells.agentDidNotCome(ve);
        this.log.info({ event: 'ssh.shell_not_holdable', reason: `the VE's session agent did not start within ${HOLD_AGENT_WAIT_MS} ms` });
      }
    }
    if (route) {
      if (this.state !== 'authenticated') throw new Refused('the connection is closing');
      let s: SpawnedSession | null = null;
      try {
        s = await startAgentSession(route, onExit, hold);
      } catch (err) {
        if (!(err instanceof AgentUnavailable)) {
          this.log.warn({ event: 'ssh.session_spawn_failed', via: 'agent', err: errorMessage(err) });
          throw new Refused(`${errorMessage(err)}`, { cause: err });
        }
        this.log.debug({ event: 'ssh.session_agent_unavailable', err: errorMessage(err) });
      }
      if (s) {
        if (this.state === 'authenticated') return s;
        // The connection went while the agent started it: hung up like the connection's others.
        for (const fd of s.fds) closeFd(fd);
        s.hangup();
        throw new Refused('the connection is closing');
      }
    }
    let cmd;
    try {
      cmd = early ?? await this.deps.ves.processCommand(ve, spec);
    } catch (err) {
      this.log.error({ event: 'ssh.session_spawn_failed', err: errorMessage(err) });
      throw new Refused(isVeshError(err) ? err.userMessage : 'The server could not start your session.', { cause: err });
    }
    if (this.state !== 'authenticated') throw new Refused('the connection is closing');
    return spawnSession(cmd, pty, onExit);
  }

  signalSession(r: Request<'session.signal'>): void {
    this.authenticated();
    const sig = r.signal.replace(/^SIG/, '');
    const s = this.sessions.get(r.session);
    if (!s || !CLIENT_SIGNALS.has(sig)) throw new Refused('no such session or signal');
    s.signal(`SIG${sig}` as NodeJS.Signals);
  }

  /** The recording of `result`'s sessions on this connection, made at the first; null when the account is not recorded. */
  private recordingFor(result: AuthResult): ConnectionRecording | null {
    const recordings = this.deps.recordings;
    if (!recordings || !recordings.records(result.account)) return null;
    this.recording ??= recordings.connection({ account: result.account.name, ve: result.account.ve, conn: this.id, source: this.source });
    return this.recording;
  }

  /** A window change of a recorded terminal session: the broker holds its master (unrecorded, the worker sets it itself). */
  resizeSession(r: Request<'session.resize'>): void {
    this.authenticated();
    const size = clampPtySize(r.cols, r.rows);
    this.taps.get(r.session)?.resize(size.cols, size.rows);
  }

  closeSession(r: Request<'session.close'>): void {
    if (this.state !== 'authenticated') return;
    // The worker says the channel went with the connection (TCP gone, dead
    // client): a holdable shell is detached. A worker that lies only keeps
    // or ends its own account's shell, which the account could do anyway.
    if (r.dropped && this.detach(r.session)) return;
    this.sessions.get(r.session)?.hangup();
  }

  // ------------------------------------------------------------ forwarding

  private forwardingAllowed(): AuthResult {
    const result = this.authenticated();
    const refusal = forwardingRefusal(result.account, result.key);
    if (refusal) throw new Refused(refusal);
    return result;
  }

  private relayClient(): Promise<ForwardRelayClient> {
    if (!this.relay) {
      const account = this.result!.account.name;
      this.relay = (async () => {
        const login = await this.login!;
        if (!this.helperCounted) {
          const refused = this.deps.caps.admit('forwardHelper', account);
          if (refused) throw new VeshError(ErrorCodes.LIMIT_REACHED, `${refused.setting} (${refused.limit}) reached for account ${account}: no forward helper for this connection`, { userMessage: refused.userMessage });
          this.helperCounted = true;
        }
        const cmd = await this.deps.ves.forwardCommand(login.account.ve, login.user);
        if (this.state !== 'authenticated') throw new Refused('the connection is closing');
        return ForwardRelayClient.start(cmd, login.account.ve, {
          accepted: (listener, fd, remoteAddress, remotePort) => {
            if (this.state !== 'authenticated' || !this.listeners.has(listener)) {
              closeFd(fd);
              return;
            }
            this.deps.send({ ev: 'forward.accepted', conn: this.id, listener, remoteAddress, remotePort }, [fd]);
            closeFd(fd);
          },
          // The relay kept it from us; worth an admin's look: the tenant is tampering with its helper.
          rejected: (count, reason) => this.log.warn({ event: 'forward.helper_rejected', ve: login.account.ve, count, reason }),
          // Gone by itself: a later request starts another.
          ended: (err) => {
            this.log.warn({ event: 'forward.helper_ended', ve: login.account.ve, err: errorMessage(err) });
            this.relay = null;
            this.agent = null;
          },
        });
      })();
      this.relay.catch((err: unknown) => {
        this.log.error({ event: 'forward.helper_failed', err: errorMessage(err) });
        this.relay = null;
      });
    }
    return this.relay;
  }

  async forwardConnect(r: Request<'forward.connect'>): Promise<number> {
    const login = this.forwardingAllowed();
    if (!isValidHost(r.host) || !isValidPort(r.port, false)) throw new Refused('invalid target');
    const rule = permitOpenRefusal(login.account, login.key, r.host, r.port);
    if (rule) {
      this.log.info({ event: 'forward.refused', kind: 'local', target: { host: r.host, port: r.port }, rule }, `forward to ${r.host}:${r.port} refused by ${rule}`);
      throw new Refused(`${r.host}:${r.port} is not allowed by ${rule}`);
    }
    let fd: number;
    try {
      fd = await (await this.relayClient()).connect(r.host, r.port);
    } catch (err) {
      // The worker logs its side; this line has the VE's own words (a failed lookup, a refused port).
      this.log.info({ event: 'forward.failed', kind: 'local', target: { host: r.host, port: r.port }, err: errorMessage(err) });
      throw err;
    }
    if (this.state !== 'authenticated') {
      closeFd(fd);
      throw new Refused('the connection is closing');
    }
    return fd;
  }

  async forwardListen(r: Request<'forward.listen'>): Promise<{ listener: number; port: number }> {
    const login = this.forwardingAllowed();
    if (!isValidHost(r.host) || !isValidPort(r.port, true)) throw new Refused('invalid bind address');
    const rule = permitListenRefusal(login.account, login.key, r.host, r.port);
    if (rule) {
      this.log.info({ event: 'forward.refused', kind: 'remote', bind: { address: r.host, port: r.port }, rule }, `listening on ${r.host}:${r.port} refused by ${rule}`);
      throw new Refused(`listening on ${r.host}:${r.port} is not allowed by ${rule}`);
    }
    if (this.listeners.size + this.listensPending >= MAX_REMOTE_FORWARDS_PER_CONNECTION) throw new Refused('too many remote forwards');
    let l: { id: number; port: number };
    this.listensPending += 1;
    try {
      l = await (await this.relayClient()).listen(r.host, r.port);
    } catch (err) {
      this.log.info({ event: 'forward.failed', kind: 'remote', bind: { address: r.host, port: r.port }, err: errorMessage(err) });
      throw err;
    } finally {
      this.listensPending -= 1;
    }
    this.listeners.add(l.id);
    return { listener: l.id, port: l.port };
  }

  /** direct-streamlocal: a socket connected, from inside the VE as its user, to the Unix socket at r.path. */
  async forwardConnectUnix(r: Request<'forward.connect_unix'>): Promise<number> {
    this.forwardingAllowed();
    if (!isValidSocketPath(r.path)) throw new Refused('invalid socket path (an absolute path of printable ASCII, at most 107 bytes)');
    let fd: number;
    try {
      fd = await (await this.relayClient()).connectUnix(r.path);
    } catch (err) {
      this.log.info({ event: 'forward.failed', kind: 'local-unix', target: { path: r.path }, err: errorMessage(err) });
      throw err;
    }
    if (this.state !== 'authenticated') {
      closeFd(fd);
      throw new Refused('the connection is closing');
    }
    return fd;
  }

  /** streamlocal-forward: a Unix socket listening at r.path inside the VE, bound by its user under vesh.yaml's mask. */
  async forwardListenUnix(r: Request<'forward.listen_unix'>): Promise<{ listener: number }> {
    this.forwardingAllowed();
    if (!isValidSocketPath(r.path)) throw new Refused('invalid socket path (an absolute path of printable ASCII, at most 107 bytes)');
    if (this.listeners.size + this.listensPending >= MAX_REMOTE_FORWARDS_PER_CONNECTION) throw new Refused('too many remote forwards');
    const f = this.deps.features ?? {};
    let id: number;
    this.listensPending += 1;
    try {
      id = await (await this.relayClient()).listenUnix(r.path, f.streamLocalBindMask ?? 0o177, f.streamLocalBindUnlink ?? false);
    } catch (err) {
      this.log.info({ event: 'forward.failed', kind: 'remote-unix', bind: { path: r.path }, err: errorMessage(err) });
      throw err;
    } finally {
      this.listensPending -= 1;
    }
    this.listeners.add(id);
    return { listener: id };
  }

  /** Why ssh -A is refused for this login (server, account, key), or null. */
  private agentRefusal(result: AuthResult): string | null {
    if (this.deps.features?.agentForwarding === false) return 'agent forwarding is off on this server (sessions.agentForwarding)';
    if (result.account.agentForwarding === false) return 'agent forwarding is off for this account (agentForwarding: false)';
    if (result.key?.certificate?.extensions.has('permit-agent-forwarding') === false) return 'certificate without permit-agent-forwarding';
    if (result.key?.options.noAgentForwarding) return 'no-agent-forwarding key option';
    return null;
  }

  /**
   * The connection's agent socket inside the VE (ssh -A): made once by the
   * forward helper as the session's user, in a fresh 0700 directory in the
   * VE's /tmp, and removed with the connection. Connections to it arrive as
   * 'forward.accepted' for its listener; the worker relays each to the
   * client's agent over an auth-agent@openssh.com channel.
   */
  async agentListen(_r: Request<'agent.listen'>): Promise<{ listener: number; path: string }> {
    const result = this.authenticated();
    const why = this.agentRefusal(result);
    if (why) {
      this.log.info({ event: 'agent.refused', reason: why });
      throw new Refused(`agent forwarding refused: ${why}`);
    }
    if (!this.agent) {
      const made = (async () => {
        const a = await (await this.relayClient()).listenAgent(AGENT_SOCKET_MASK);
        if (this.state !== 'authenticated') throw new Refused('the connection is closing');
        this.listeners.add(a.id);
        this.log.info({ event: 'agent.listen', path: a.path });
        return { listener: a.id, path: a.path };
      })();
      this.agent = made;
      made.catch((err: unknown) => {
        this.log.info({ event: 'agent.failed', err: errorMessage(err) });
        if (this.agent === made) this.agent = null;
      });
    }
    return this.agent;
  }

  forwardUnlisten(r: Request<'forward.unlisten'>): void {
    this.authenticated();
    if (!this.listeners.delete(r.listener)) throw new Refused('no such listener');
    void this.relay?.then((c) => c.unlisten(r.listener)).catch(() => undefined);
  }

  // ------------------------------------------------------------ ending

  /** End the client's TCP connection from our side, whatever the worker does. */
  cut(): void {
    if (this.cutFd < 0) return;
    try {
      shutdownFd(this.cutFd, 'both');
    } catch { /* already gone */ }
  }

  /**
   * timeouts.maxSessionTime, kept here and not in the worker: a session
   * holds a process, a pty and a per-account slot on the host, and the
   * hang-up must not depend on a process that parses client bytes.
   */
  private limitSessionTime(id: number, s: SpawnedSession): void {
    const limit = this.timeouts.maxSessionTimeMs;
    if (limit <= 0) return;
    const t = setTimeout(() => {
      this.sessionTimers.delete(id);
      if (this.sessions.get(id) !== s) return;
      this.log.info({ event: 'ssh.session_time_limit', session: id, limitMs: limit }, `hanging up a session that reached timeouts.maxSessionTime (${formatDuration(limit)})`);
      // Before the hang-up, so the user reads why ahead of the exit it causes.
      this.deps.send({ ev: 'session.notice', conn: this.id, session: id, text: `\r\nvesh: this session reached its time limit of ${formatDuration(limit)} (timeouts.maxSessionTime): hanging up.\r\n` });
      s.hangup();
    }, limit);
    t.unref();
    this.sessionTimers.set(id, t);
  }

  private clearSessionTimer(id: number): void {
    const t = this.sessionTimers.get(id);
    if (t) clearTimeout(t);
    this.sessionTimers.delete(id);
  }

  /**
   * No data from the client for longer than keepalives allow, and the
   * worker has not ended the connection: we do, and free what it holds on
   * the host now rather than when (or if) the worker reports it closed.
   */
  private onClientSilent(silentMs: number, limitMs: number): void {
    if (this.state !== 'authenticated' || this.silenced) return;
    this.silenced = true;
    this.log.warn({ event: 'ssh.client_silent_cut', silentMs, limitMs }, `no data from the client for ${formatDuration(silentMs)} with keepalives on (${formatDuration(this.timeouts.clientAliveIntervalMs)} x ${this.timeouts.clientAliveCountMax}) and the worker did not end the connection: the broker ends it`);
    this.cut();
    // A dead client is a dropped connection: holdable shells are held.
    for (const id of [...this.holdable.keys()]) this.detach(id);
    this.hangupAll();
    this.releaseCaps();
  }

  /** Hang up every session and stop forwarding (admin lock, server stop). */
  hangupAll(): void {
    // Hung up on purpose (lock, server stop): none of them is held after.
    this.holdable.clear();
    for (const s of this.sessions.values()) s.hangup();
    const relay = this.relay;
    this.relay = null;
    void relay?.then((c) => c.stop()).catch(() => undefined);
  }

  /** The account's persistentShells, or null when off (or this broker holds no shells). */
  private persistence(result: AuthResult): PersistentShells | null {
    return this.deps.heldShells ? result.account.persistentShells ?? null : null;
  }

  /** Hand a holdable session to the held-shell registry; false if it is not one. */
  private detach(session: number): boolean {
    const s = this.sessions.get(session);
    const release = this.holdable.get(session);
    const persist = this.result ? this.persistence(this.result) : null;
    if (!s?.holdable || !release || !persist) return false;
    this.sessions.delete(session);
    this.holdable.delete(session);
    this.clearSessionTimer(session);
    s.holdable.detach(persist.bufferBytes);
    this.deps.heldShells!.hold(this.result!.account.name, this.result!.account.ve, s, persist, release);
    return true;
  }

  /** The connection is gone (the worker said so, or the worker died): release everything it held. */
  dispose(): void {
    if (this.state === 'closed') return;
    // A dropped connection (or a dead worker): holdable shells are held, the rest hung up below.
    for (const id of [...this.holdable.keys()]) this.detach(id);
    this.state = 'closed';
    for (const t of this.timers) clearTimeout(t);
    this.timers = [];
    for (const t of this.sessionTimers.values()) clearTimeout(t);
    this.sessionTimers.clear();
    this.hangupAll();
    this.recording?.connectionGone();
    this.listeners.clear();
    if (this.cutFd >= 0) {
      closeFd(this.cutFd);
      this.cutFd = -1;
    }
    this.releaseCaps();
  }

  /** Give back this connection's per-account slots (once). */
  private releaseCaps(): void {
    if (this.countedAccount !== null) {
      this.deps.caps.release('connection', this.countedAccount);
      if (this.helperCounted) this.deps.caps.release('forwardHelper', this.countedAccount);
      this.countedAccount = null;
    }
  }
}

/**
 * The client asked for a new shell rather than its held one: LC_VESH_SHELL=new
 * (an LC_* variable, which OpenSSH clients send by default with SendEnv LC_*
 * and vesh accepts, as `LC_VESH_SHELL=new ssh host`).
 */
function wantsNewShell(env: Record<string, string>): boolean {
  return env.LC_VESH_SHELL === 'new';
}

/** A request that no honest worker sends in this state: the worker is ended. */
export class ProtocolViolation extends Error {}
