/**
 * Cluster routing (issue 14): a login node A authenticated and carries to
 * node B under a vouch (src/broker/node-vouch.ts), attacked from both ends.
 *
 * B side: what a hostile client, or a compromised worker on A, would send
 * B's broker to get in without A's broker having vouched, or with more than
 * the client's key allowed. A side: what a compromised worker would ask A's
 * broker to sign with the node key, or to run here.
 *
 * No VEs, no etcd: BrokerConnection is driven as the broker drives it, with
 * a NodeRoutes stand-in over real ed25519 keys, the real Authenticator, and
 * userauth blobs built by hand (RFC 4252 §7).
 */
import { createPublicKey, generateKeyPairSync, randomBytes, sign, verify, type KeyObject } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino, type Logger } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { Authenticator } from '../../src/auth/authenticator.js';
import { BrokerConnection, ProtocolViolation, Refused } from '../../src/broker/broker-connection.js';
import type { NodeRoutes } from '../../src/broker/node-routes.js';
import { VOUCH_PREFIX, decodeVouch, encodeVouch, keyFromVouch, type Vouch } from '../../src/broker/node-vouch.js';
import { MAX_USER_NAME_CHARS, REQUESTS, parseRequest, type AuthGrant } from '../../src/broker/request-table.js';
import { NodeRouter } from '../../src/cluster/routing.js';
import type { LiveNode } from '../../src/cluster/cluster-state.js';
import { parseAuthorizedKeyLine, type Account } from '../../src/config/accounts.js';
import type { AccountSource } from '../../src/config/accounts-store.js';
import { ErrorCodes, VeshError } from '../../src/errors.js';
import { sshFingerprint } from '../../src/ssh/host-keys.js';
import { generateKeyPair } from '../../src/ssh/keygen.js';
import { DEFAULT_SESSION_LIMITS, UsageCaps } from '../../src/ssh/usage-caps.js';
import type { VeAccess, VeProcessSpec, VeUserInfo } from '../../src/ve/access.js';

// ---------------------------------------------------------------- wire helpers

function sshString(b: Buffer | string): Buffer {
  const body = typeof b === 'string' ? Buffer.from(b, 'utf8') : b;
  const len = Buffer.alloc(4);
  len.writeUInt32BE(body.length);
  return Buffer.concat([len, body]);
}

/** An ed25519 key pair and its SSH wire blob: string "ssh-ed25519", string 32-byte key. */
interface NodeKey { priv: KeyObject; pub: KeyObject; blob: Buffer; line: string }
function ed25519(): NodeKey {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  // The DER's last 32 bytes (Node 20's JWK export of a generated key can deadlock: src/ssh/kex-x25519.ts).
  const raw = publicKey.export({ format: 'der', type: 'spki' }).subarray(-32);
  const blob = Buffer.concat([sshString('ssh-ed25519'), sshString(raw)]);
  return { priv: privateKey, pub: publicKey, blob, line: `ssh-ed25519 ${blob.toString('base64')}` };
}

/** The data a publickey userauth request signs (RFC 4252 §7), with every field open to attack. */
function userauthBlob(o: { sessionId: Buffer; user: string; key: Buffer; service?: string; method?: string; algo?: string; trailing?: Buffer }): Buffer {
  return Buffer.concat([
    sshString(o.sessionId), Buffer.from([50]), sshString(o.user), sshString(o.service ?? 'ssh-connection'),
    sshString(o.method ?? 'publickey'), Buffer.from([1]), sshString(o.algo ?? 'ssh-ed25519'), sshString(o.key),
    o.trailing ?? Buffer.alloc(0),
  ]);
}

/** A vouch user name written by hand (so malformed ones can be made too). */
const vouchName = (v: unknown): string => VOUCH_PREFIX + Buffer.from(JSON.stringify(v)).toString('base64url');

// ---------------------------------------------------------------- fixtures

function captureLogger(): { logger: Logger; records: Array<Record<string, unknown>> } {
  const records: Array<Record<string, unknown>> = [];
  const logger = pino({ level: 'debug' }, { write: (line: string) => void records.push(JSON.parse(line) as Record<string, unknown>) });
  return { logger, records };
}

class MapSource implements AccountSource {
  readonly accounts = new Map<string, Account>();
  get(name: string): Account | undefined {
    return this.accounts.get(name);
  }
  list(): Account[] {
    return [...this.accounts.values()];
  }
  set(a: Partial<Account> & { name: string }): Account {
    const account: Account = { ve: a.name, user: 'root', locked: false, keys: [], forwarding: true, agentForwarding: true, ...a };
    this.accounts.set(a.name, account);
    return account;
  }
}

/** A VeAccess that runs nothing: it records what was asked, and a process or helper start fails with a message. */
class RecordingVes implements VeAccess {
  readonly calls: string[] = [];
  readonly specs: VeProcessSpec[] = [];
  async ensureRunning(ve: string): Promise<void> {
    this.calls.push(`ensureRunning ${ve}`);
  }
  async lookupUser(ve: string, user: string): Promise<VeUserInfo> {
    this.calls.push(`lookupUser ${ve} ${user}`);
    return { name: user, uid: 0, gid: 0, groups: [0], home: '/root', shell: '/bin/bash' };
  }
  async processCommand(ve: string, spec: VeProcessSpec): Promise<never> {
    this.calls.push(`processCommand ${ve}`);
    this.specs.push(spec);
    throw new VeshError(ErrorCodes.INTERNAL, 'this test starts no process', { userMessage: 'test: no process started' });
  }
  async forwardCommand(ve: string): Promise<never> {
    this.calls.push(`forwardCommand ${ve}`);
    throw new VeshError(ErrorCodes.INTERNAL, 'this test starts no forward helper', { userMessage: 'test: no forward helper started' });
  }
}

const NODE_A = ed25519();
const NODE_B = ed25519();
const NODE_C = ed25519();
const CLIENT = ed25519();
const NODES: Record<string, NodeKey> = { 'node-a': NODE_A, 'node-b': NODE_B, 'node-c': NODE_C };

/** NodeRoutes as node `me` sees the cluster: every node of NODES but itself is live. */
class FakeRoutes implements NodeRoutes {
  readonly nodeKey: { blob: Buffer; line: string };
  /** Where each VE lives (absent: here); a function throws like etcd being down. */
  placements = new Map<string, string | (() => Promise<string>)>();
  readonly located: string[] = [];
  connects = 0;
  constructor(readonly nodeName: string) {
    this.nodeKey = { blob: NODES[nodeName]!.blob, line: NODES[nodeName]!.line };
  }
  async locate(ve: string): Promise<string> {
    this.located.push(ve);
    const p = this.placements.get(ve);
    if (typeof p === 'function') return p();
    return p ?? this.nodeName;
  }
  async placedHere(ve: string): Promise<boolean> {
    return (await this.locate(ve)) === this.nodeName;
  }
  async connect(_node: string, _ve: string): Promise<{ fd: number; hostKeys: string[] }> {
    this.connects += 1;
    // No socket: clusterConnect hands the descriptor on and never reads it here.
    return { fd: -1, hostKeys: [NODE_B.line] };
  }
  sign(data: Buffer): Buffer {
    return sign(null, data, NODES[this.nodeName]!.priv);
  }
  async nodeOfKey(blob: Buffer): Promise<{ name: string; key: KeyObject } | null> {
    for (const [name, k] of Object.entries(NODES)) {
      if (name !== this.nodeName && k.blob.equals(blob)) return { name, key: k.pub };
    }
    return null;
  }
}

/** alice: the client key, restricted; bob: locked; carol: her VE lives on node-c. */
const CLIENT_OPTIONS = 'command="echo forced",no-pty,no-agent-forwarding,permitopen="127.0.0.1:8080",permitlisten="localhost:9000"';
function accountsSource(): MapSource {
  const src = new MapSource();
  src.set({ name: 'alice', keys: [parseAuthorizedKeyLine(`${CLIENT_OPTIONS} ${CLIENT.line} alice@laptop`)] });
  src.set({ name: 'bob', locked: true });
  src.set({ name: 'carol' });
  return src;
}

interface Node {
  conn: BrokerConnection;
  routes: FakeRoutes;
  ves: RecordingVes;
  caps: UsageCaps;
  records: Array<Record<string, unknown>>;
}

/** A fresh pre-auth connection on node `me`, with its session id set as the broker sets it after the key exchange. */
function connectionOn(me: string, opts: { maxAuthTries?: number; routes?: FakeRoutes | null } = {}): Node {
  const { logger, records } = captureLogger();
  const routes = opts.routes ?? new FakeRoutes(me);
  const ves = new RecordingVes();
  const caps = new UsageCaps(DEFAULT_SESSION_LIMITS, logger);
  const authenticator = new Authenticator(accountsSource(), { penalties: { failuresBeforePenalty: 1000, penaltyMs: 1_000, maxPenaltyMs: 5_000 } }, logger);
  const conn = new BrokerConnection(randomBytes(4).toString('hex'), 0, me === 'node-b' ? '10.9.0.1' : '192.0.2.10', 40022, { address: '127.0.0.1', port: 22 }, -1, {
    authenticator, ves, caps, maxAuthTries: opts.maxAuthTries ?? 50,
    send: () => undefined, onAuthenticated: () => undefined,
    routes: opts.routes === null ? null : routes,
  }, logger);
  conn.sessionId = randomBytes(32);
  return { conn, routes, ves, caps, records };
}

function goodVouch(over: Partial<Vouch> = {}): Vouch {
  return {
    v: 1, from: 'node-a', to: 'node-b', account: 'alice', source: '198.51.100.7', port: 51234, at: Date.now(), method: 'publickey',
    key: { algo: 'ssh-ed25519', fingerprint: sshFingerprint(CLIENT.blob), noPty: false, noPortForwarding: false, noAgentForwarding: false },
    ...over,
  };
}

/**
 * A node login as a worker relays it: `user` signed with `signer` over a
 * blob naming `blobOver` (default: this connection, this user, the
 * presented key); `presented` is the key the request names.
 */
function nodeLogin(n: Node, user: string, o: {
  presented?: NodeKey; signer?: NodeKey; signature?: Buffer;
  blob?: Partial<Parameters<typeof userauthBlob>[0]>;
} = {}): ReturnType<BrokerConnection['publickey']> {
  const presented = o.presented ?? NODE_A;
  const blob = userauthBlob({ sessionId: n.conn.sessionId!, user, key: presented.blob, ...o.blob });
  const signature = o.signature ?? sign(null, blob, (o.signer ?? presented).priv);
  return n.conn.publickey({
    req: 'auth.publickey', id: 1, conn: n.conn.id, user, algo: 'ssh-ed25519',
    key: presented.blob.toString('base64'), blob: blob.toString('base64'), signature: signature.toString('base64'),
  });
}

function keyQuery(n: Node, user: string, key: NodeKey = NODE_A): Promise<{ acceptable: boolean }> {
  return n.conn.keyQuery({ req: 'auth.key_query', id: 1, conn: n.conn.id, user, algo: 'ssh-ed25519', key: key.blob.toString('base64') });
}

/** Why B refused, from its cluster.vouch_refused log lines. */
const refusals = (n: Node): string[] => n.records.filter((r) => r.event === 'cluster.vouch_refused').map((r) => String(r.reason));

/** Refused at the key query and at the signed attempt, with `why` in the log both times, and nothing granted. */
async function expectRefused(user: string, why: RegExp, o: Parameters<typeof nodeLogin>[2] & { setup?: (n: Node) => void } = {}): Promise<Node> {
  const q = connectionOn('node-b');
  o.setup?.(q);
  await expect(keyQuery(q, user, o.presented)).resolves.toEqual({ acceptable: false });
  expect(refusals(q)).toEqual([expect.stringMatching(why)]);
  const n = connectionOn('node-b');
  o.setup?.(n);
  const r = await nodeLogin(n, user, o);
  expect(r.success).toBe(false);
  expect(r.grant).toBeUndefined();
  expect(n.conn.state).toBe('preauth');
  expect(n.conn.account).toBeNull();
  expect(refusals(n)).toEqual([expect.stringMatching(why)]);
  return n;
}

/** A session as a worker asks for it (session.open). */
function openSession(n: Node, o: { kind?: 'shell' | 'exec'; command?: string; pty?: boolean } = {}): ReturnType<BrokerConnection['openSession']> {
  return n.conn.openSession({
    req: 'session.open', id: 7, conn: n.conn.id, session: Math.floor(Math.random() * 1e6) + 1, kind: o.kind ?? 'exec',
    ...(o.command !== undefined ? { command: o.command } : {}),
    ...(o.pty ? { pty: { term: 'xterm', cols: 80, rows: 24 } } : {}), env: {},
  });
}

const forwardConnect = (n: Node, host: string, port: number) => n.conn.forwardConnect({ req: 'forward.connect', id: 8, conn: n.conn.id, host, port });
const forwardListen = (n: Node, host: string, port: number) => n.conn.forwardListen({ req: 'forward.listen', id: 9, conn: n.conn.id, host, port });

// ---------------------------------------------------------------- B: logins carried here

describe('node B: a login carried from another node', () => {
  it('control: node A\'s key, a vouch for B, alice here, her VE here, signed over this connection: accepted', async () => {
    const n = connectionOn('node-b');
    await expect(keyQuery(n, vouchName(goodVouch()))).resolves.toEqual({ acceptable: true });
    const r = await nodeLogin(n, vouchName(goodVouch()));
    expect(r.success).toBe(true);
    expect(r.grant).toMatchObject({ account: 'alice', ve: 'alice', noPty: false, forwardingRefusal: null });
    expect(r.grant!.remote).toBeUndefined();
    expect(refusals(n)).toEqual([]);
    expect(n.records.find((x) => x.event === 'ssh.auth' && x.result === 'success')).toMatchObject({ via: 'node-a', clientSource: '198.51.100.7', account: 'alice' });
  });

  it('1. a client\'s own key with a well-formed vouch name (alice escaping her forced command): refused at key query and at publickey, and logged why', async () => {
    // Alice's own key is in her authorized_keys with command=…; the vouch says "no restrictions".
    const user = vouchName(goodVouch({ key: null, method: 'password' }));
    const n = await expectRefused(user, /not the node key of a live node/, { presented: CLIENT });
    expect(n.records.find((x) => x.event === 'cluster.vouch_refused')).toMatchObject({ claims: 'node-a', fingerprint: sshFingerprint(CLIENT.blob), source: '10.9.0.1' });
    expect(n.records.find((x) => x.event === 'ssh.auth')).toMatchObject({ result: 'failure' });
  });

  it('2. node C\'s key vouching as node A: refused', async () => {
    await expectRefused(vouchName(goodVouch({ from: 'node-a' })), /node node-c's key vouches as node node-a/, { presented: NODE_C });
  });

  it('3. a vouch for another node, or 10 minutes old, or 10 minutes ahead: refused', async () => {
    await expectRefused(vouchName(goodVouch({ to: 'node-c' })), /for node node-c, not this one/);
    await expectRefused(vouchName(goodVouch({ at: Date.now() - 10 * 60_000 })), /more than 5 minutes/);
    await expectRefused(vouchName(goodVouch({ at: Date.now() + 10 * 60_000 })), /more than 5 minutes/);
  });

  it('4. an account missing or locked here, a VE on a third node (no second hop), or no answer where it lives: refused', async () => {
    await expectRefused(vouchName(goodVouch({ account: 'nobody' })), /account nobody does not exist here or is locked/);
    await expectRefused(vouchName(goodVouch({ account: 'bob' })), /account bob does not exist here or is locked/);
    const third = await expectRefused(vouchName(goodVouch({ account: 'carol' })), /VE carol is not placed on this node: logins are carried one hop only/, {
      setup: (n) => n.routes.placements.set('carol', 'node-c'),
    });
    expect(third.routes.connects).toBe(0);
    await expectRefused(vouchName(goodVouch({ account: 'carol' })), /cannot tell where VE carol lives: etcd down/, {
      setup: (n) => n.routes.placements.set('carol', () => Promise.reject(new Error('etcd down'))),
    });
  });

  it('5. a good vouch with a signature over another session id, user, key, service or algorithm, by another key, or malformed: refused, no throw', async () => {
    const user = vouchName(goodVouch());
    const bad: Array<[string, Parameters<typeof nodeLogin>[2]]> = [
      ['another session id', { blob: { sessionId: randomBytes(32) } }],
      ['another user name (a vouch for carol)', { blob: { user: vouchName(goodVouch({ account: 'carol' })) } }],
      ['another user name (root)', { blob: { user: 'root' } }],
      ['another key in the blob, signed by node A', { blob: { key: NODE_C.blob } }],
      ['another key in the blob, signed by it', { blob: { key: NODE_C.blob }, signer: NODE_C }],
      ['another service', { blob: { service: 'ssh-userauth' } }],
      ['another algorithm', { blob: { algo: 'ssh-rsa' } }],
      ['trailing bytes', { blob: { trailing: Buffer.from([0]) } }],
      ['signed by node C', { signer: NODE_C }],
      ['signed by the client key', { signer: CLIENT }],
      ['a 63-byte signature', { signature: randomBytes(63) }],
      ['a 65-byte signature', { signature: randomBytes(65) }],
      ['garbage of the right length', { signature: randomBytes(64) }],
      ['an empty signature', { signature: Buffer.alloc(0) }],
    ];
    for (const [what, o] of bad) {
      const n = connectionOn('node-b');
      const r = await nodeLogin(n, user, o);
      expect(r.success, what).toBe(false);
      expect(n.conn.state, what).toBe('preauth');
      expect(n.conn.account, what).toBeNull();
    }
    // The same attempt, signed over this connection: in (so each refusal above was the signature's).
    const n = connectionOn('node-b');
    expect((await nodeLogin(n, user)).success).toBe(true);
  });

  it('5b. a signature lifted from one connection does not log in another', async () => {
    const user = vouchName(goodVouch());
    const first = connectionOn('node-b');
    const blob = userauthBlob({ sessionId: first.conn.sessionId!, user, key: NODE_A.blob });
    const signature = sign(null, blob, NODE_A.priv);
    const second = connectionOn('node-b');
    const r = await second.conn.publickey({
      req: 'auth.publickey', id: 1, conn: second.conn.id, user, algo: 'ssh-ed25519',
      key: NODE_A.blob.toString('base64'), blob: blob.toString('base64'), signature: signature.toString('base64'),
    });
    expect(r.success).toBe(false);
    expect(second.records.find((x) => x.event === 'ssh.auth')).toMatchObject({ result: 'failure', reason: 'signed data does not name this connection' });
  });

  it('6. the vouch\'s key restrictions apply here: forced command, no-pty, no forwarding, no agent', async () => {
    const n = connectionOn('node-b');
    const r = await nodeLogin(n, vouchName(goodVouch({
      key: { algo: 'ssh-ed25519', fingerprint: 'SHA256:client', command: 'echo forced', noPty: true, noPortForwarding: true, noAgentForwarding: true },
    })));
    expect(r.success).toBe(true);
    const grant = r.grant!;
    expect(grant).toMatchObject({ noPty: true, forwardingRefusal: 'no-port-forwarding key option', agentForwardingRefusal: 'no-agent-forwarding key option', fingerprint: 'SHA256:client' });
    await expect(openSession(n, { kind: 'shell', pty: true })).rejects.toThrow(/no-pty key option/);
    await expect(forwardConnect(n, '127.0.0.1', 22)).rejects.toThrow(/no-port-forwarding key option/);
    await expect(n.conn.agentListen({ req: 'agent.listen', id: 3, conn: n.conn.id })).rejects.toThrow(/no-agent-forwarding/);
    // What an exec asks would run: the forced command, its own as SSH_ORIGINAL_COMMAND, the client (not node A) in SSH_CLIENT.
    await expect(openSession(n, { kind: 'exec', command: 'cat /etc/shadow' })).rejects.toThrow(/test: no process started/);
    expect(n.ves.specs).toHaveLength(1);
    expect(n.ves.specs[0]!.argv).toEqual(['/bin/bash', '-c', 'echo forced']);
    expect(n.ves.specs[0]!.env.SSH_ORIGINAL_COMMAND).toBe('cat /etc/shadow');
    expect(n.ves.specs[0]!.env.SSH_CLIENT).toBe('198.51.100.7 51234 22');
    expect(n.ves.calls).toEqual(['ensureRunning alice', 'lookupUser alice root', 'processCommand alice']);
  });

  it('6b. permitopen / permitlisten and certificate extensions carried in the vouch bound forwards here', async () => {
    const n = connectionOn('node-b');
    const r = await nodeLogin(n, vouchName(goodVouch({
      key: { algo: 'ssh-ed25519', fingerprint: 'SHA256:client', noPty: false, noPortForwarding: false, noAgentForwarding: false, permitOpen: ['127.0.0.1:8080'], permitListen: ['localhost:9000'] },
    })));
    expect(r.grant!.forwardingRefusal).toBeNull();
    await expect(forwardConnect(n, '10.0.0.1', 22)).rejects.toThrow(/key option permitopen \(127\.0\.0\.1:8080\)/);
    await expect(forwardConnect(n, '127.0.0.1', 8081)).rejects.toThrow(/permitopen/);
    await expect(forwardListen(n, '0.0.0.0', 2222)).rejects.toThrow(/key option permitlisten \(localhost:9000\)/);
    expect(n.ves.calls.filter((c) => c.startsWith('forwardCommand'))).toEqual([]);
    // The allowed target passes the rules and reaches the (absent) helper.
    await expect(forwardConnect(n, '127.0.0.1', 8080)).rejects.toThrow(/this test starts no forward helper/);
    expect(n.ves.calls).toContain('forwardCommand alice');

    const c = connectionOn('node-b');
    const cr = await nodeLogin(c, vouchName(goodVouch({
      key: {
        algo: 'ssh-ed25519', fingerprint: 'SHA256:cert', noPty: false, noPortForwarding: false, noAgentForwarding: false,
        certificate: { keyId: 'alice@ca', serial: '7', caFingerprint: 'SHA256:ca', extensions: ['permit-pty'] },
      },
    })));
    expect(cr.grant).toMatchObject({ forwardingRefusal: 'certificate without permit-port-forwarding', agentForwardingRefusal: 'certificate without permit-agent-forwarding' });
  });

  it('7. malformed vouch names (over the bound, not base64url, not JSON, extra or wrong fields): refused, nothing thrown', async () => {
    const v = goodVouch();
    const names: Array<[string, string]> = [
      ['empty', VOUCH_PREFIX],
      ['not base64url', `${VOUCH_PREFIX}eyJ2Ijox+/==`],
      ['not base64url (space)', `${VOUCH_PREFIX}eyJ2 Ijox`],
      ['not JSON', VOUCH_PREFIX + Buffer.from('{"v":1,').toString('base64url')],
      ['not UTF-8 JSON', VOUCH_PREFIX + randomBytes(40).toString('base64url')],
      ['JSON null', vouchName(null)],
      ['an array', vouchName([v])],
      ['an extra field', vouchName({ ...v, admin: true })],
      ['an extra field in the key', vouchName({ ...v, key: { ...v.key, permitAll: true } })],
      ['__proto__', VOUCH_PREFIX + Buffer.from(JSON.stringify(v).replace(/^\{/, '{"__proto__":{"admin":true},')).toString('base64url')],
      ['version 2', vouchName({ ...v, v: 2 })],
      ['at as a string', vouchName({ ...v, at: String(v.at) })],
      ['an account name that is a path', vouchName({ ...v, account: '../alice' })],
      ['a node name with a colon', vouchName({ ...v, from: 'node-a:evil' })],
      ['a source that is not an address', vouchName({ ...v, source: 'evil.example' })],
      ['a method not offered', vouchName({ ...v, method: 'hostbased' })],
      ['a certificate with extra fields', vouchName({ ...v, key: { ...v.key, certificate: { keyId: 'x', serial: '1', caFingerprint: 'y', extensions: [], critical: {} } } })],
    ];
    for (const [what, user] of names) {
      const n = connectionOn('node-b');
      await expect(keyQuery(n, user), what).resolves.toEqual({ acceptable: false });
      const r = await nodeLogin(n, user);
      expect(r.success, what).toBe(false);
      expect(refusals(n), what).toEqual([expect.stringMatching(/the user name is not a node's vouch/), expect.stringMatching(/the user name is not a node's vouch/)]);
      // Nothing asked of the cluster for a name that is not a vouch.
      expect(n.routes.located, what).toEqual([]);
    }
  });

  it('7b. a key rule B cannot parse fails the login rather than dropping the rule', async () => {
    const n = connectionOn('node-b');
    const r = await nodeLogin(n, vouchName(goodVouch({
      key: { algo: 'ssh-ed25519', fingerprint: 'SHA256:x', noPty: false, noPortForwarding: false, noAgentForwarding: false, permitOpen: ['*.internal:22'] },
    })));
    expect(r.success).toBe(false);
    expect(n.conn.state).toBe('preauth');
    expect(refusals(n)).toEqual([expect.stringMatching(/a key rule does not parse here/)]);
  });

  it('7c. a vouch name over the request table\'s bound: the frame is refused, and the worker\'s truncation of it logs nothing in', async () => {
    const big = goodVouch({ key: { algo: 'ssh-ed25519', fingerprint: 'SHA256:x', command: 'x'.repeat(4000), noPty: false, noPortForwarding: false, noAgentForwarding: false } });
    const long = vouchName(big);
    expect(long.length).toBeGreaterThan(MAX_USER_NAME_CHARS);
    // A encodes nothing it could not carry…
    expect(encodeVouch(big, MAX_USER_NAME_CHARS)).toBeNull();
    // …the broker takes no frame that carries it…
    const frame = { req: 'auth.publickey', id: 1, conn: 'c0ffee00', user: long, algo: 'ssh-ed25519', key: NODE_A.blob.toString('base64'), blob: 'AA==', signature: 'AA==' };
    const parsed = parseRequest(frame);
    expect(parsed.ok).toBe(false);
    expect(parsed.ok ? '' : parsed.why).toMatch(/user/);
    // …and what the worker passes on (src/ssh/authentication.ts cuts at the bound) is refused, signed over the full name or the cut one.
    const cut = long.slice(0, MAX_USER_NAME_CHARS);
    for (const signedUser of [long, cut]) {
      const n = connectionOn('node-b');
      const r = await nodeLogin(n, cut, { blob: { user: signedUser } });
      expect(r.success).toBe(false);
      expect(refusals(n)).toEqual([expect.stringMatching(/not a node's vouch/)]);
    }
  });

  it('a node that is not in cluster mode takes no vouch at all', async () => {
    const n = connectionOn('node-b', { routes: null });
    await expect(keyQuery(n, vouchName(goodVouch()))).resolves.toEqual({ acceptable: false });
    expect((await nodeLogin(n, vouchName(goodVouch()))).success).toBe(false);
    expect(refusals(n)).toEqual([expect.stringMatching(/cluster mode is off/), expect.stringMatching(/cluster mode is off/)]);
  });
});

// ---------------------------------------------------------------- B: which keys are node keys

describe('node B: NodeRouter\'s idea of a node key', () => {
  let dir = '';
  afterEach(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
    dir = '';
  });

  it('its own node key, a dead node\'s and a non-ed25519 record vouch for nothing; a live node\'s does', async () => {
    dir = mkdtempSync(join(tmpdir(), 'vesh-vouch-'));
    const own = generateKeyPair('ed25519');
    const file = join(dir, 'node_key');
    writeFileSync(file, own.private, { mode: 0o600 });
    const ownLine = own.public.split(' ').slice(0, 2).join(' ');
    const live = (name: string, publicKey: string): LiveNode => ({ record: { name, publicKey } as LiveNode['record'], leaseRemaining: 10 });
    const router = new NodeRouter({
      cfg: { nodeName: 'node-b' } as never,
      gate: {} as never,
      nodes: async () => [live('node-b', ownLine), live('node-a', NODE_A.line), live('node-x', 'ssh-ed25519 AAAAC3NzaC1yc2E=')],
      key: { publicKey: ownLine, file },
      log: captureLogger().logger,
    });
    expect(await router.nodeOfKey(router.nodeKey.blob)).toBeNull();
    expect(await router.nodeOfKey(NODE_C.blob)).toBeNull();
    const a = await router.nodeOfKey(NODE_A.blob);
    expect(a?.name).toBe('node-a');
    // The key it hands back checks node A's signatures, and no one else's.
    const data = randomBytes(100);
    expect(verify(null, data, a!.key, sign(null, data, NODE_A.priv))).toBe(true);
    expect(verify(null, data, a!.key, sign(null, data, NODE_C.priv))).toBe(false);
    // And its own signatures verify with its own public key (what B checks A's with).
    const ownPub = createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: router.nodeKey.blob.subarray(19).toString('base64url') }, format: 'jwk' });
    expect(verify(null, data, ownPub, router.sign(data))).toBe(true);
  });
});

// ---------------------------------------------------------------- A: logins carried away

/** Alice logs in on node A with her restricted key; her VE lives on node-b unless `placement` says otherwise. */
async function aliceOnA(placement: string | (() => Promise<string>) = 'node-b'): Promise<Node & { grant: AuthGrant }> {
  const n = connectionOn('node-a');
  n.routes.placements.set('alice', placement);
  const blob = userauthBlob({ sessionId: n.conn.sessionId!, user: 'alice', key: CLIENT.blob });
  const r = await n.conn.publickey({
    req: 'auth.publickey', id: 1, conn: n.conn.id, user: 'alice', algo: 'ssh-ed25519',
    key: CLIENT.blob.toString('base64'), blob: blob.toString('base64'), signature: sign(null, blob, CLIENT.priv).toString('base64'),
  });
  expect(r.success).toBe(true);
  return { ...n, grant: r.grant! };
}

const signReq = (n: Node, data: Buffer) => n.conn.clusterSign({ req: 'cluster.sign', id: 5, conn: n.conn.id, data: data.toString('base64') });

describe('node A: a login whose VE lives on node B', () => {
  it('9. the grant says remote, the vouch names exactly the account, the client and its key\'s restrictions; nothing runs here', async () => {
    const before = Date.now();
    const n = await aliceOnA();
    expect(n.grant).toMatchObject({ account: 'alice', remote: { node: 'node-b' }, noPty: true, forwardingRefusal: null, agentForwardingRefusal: 'no-agent-forwarding key option' });
    const link = await n.conn.clusterConnect();
    expect(link.body).toMatchObject({ node: 'node-b', nodeKey: NODE_A.line, hostKeys: [NODE_B.line] });
    const d = decodeVouch(String(link.body.user));
    expect(d.ok).toBe(true);
    const v = (d as { vouch: Vouch }).vouch;
    expect(v).toEqual({
      v: 1, from: 'node-a', to: 'node-b', account: 'alice', source: '192.0.2.10', port: 40022, at: v.at, method: 'publickey',
      key: {
        algo: 'ssh-ed25519', fingerprint: sshFingerprint(CLIENT.blob), command: 'echo forced', noPty: true, noPortForwarding: false,
        noAgentForwarding: true, permitOpen: ['127.0.0.1:8080'], permitListen: ['localhost:9000'],
      },
    });
    expect(v.at).toBeGreaterThanOrEqual(before);
    expect(v.at).toBeLessThanOrEqual(Date.now());
    // What B will make of it: the same rules.
    expect(keyFromVouch(v)!.options).toMatchObject({ command: 'echo forced', noPty: true, permitOpen: [{ host: '127.0.0.1', port: 8080 }], permitListen: [{ host: 'localhost', port: 9000 }] });

    // A worker asking to run anything here anyway is told the connection is carried, and nothing starts.
    await expect(openSession(n, { kind: 'exec', command: 'id' })).rejects.toThrow(/This connection is carried to another node/);
    await expect(forwardConnect(n, '127.0.0.1', 8080)).rejects.toSatisfy((e: unknown) => e instanceof VeshError && /carried to another node/.test(e.userMessage));
    expect(n.ves.calls).toEqual([]);
    expect(REQUESTS['cluster.connect'].once).toBe(true);
    expect(REQUESTS['cluster.connect'].states).toEqual(['authenticated']);
  });

  it('8. cluster.sign signs only the login it wrote, for its node key, three times; anything else is a protocol violation', async () => {
    // Not carried: a local login, and a login carried here from node B.
    const local = await aliceOnA('node-a');
    expect(() => signReq(local, userauthBlob({ sessionId: randomBytes(32), user: 'alice', key: NODE_A.blob }))).toThrow(ProtocolViolation);
    const carriedHere = connectionOn('node-b');
    expect((await nodeLogin(carriedHere, vouchName(goodVouch()))).success).toBe(true);
    expect(() => signReq(carriedHere, userauthBlob({ sessionId: randomBytes(32), user: vouchName(goodVouch()), key: NODE_B.blob }))).toThrow(ProtocolViolation);
    // Nor before login.
    expect(() => signReq(connectionOn('node-a'), userauthBlob({ sessionId: randomBytes(32), user: 'alice', key: NODE_A.blob }))).toThrow();

    const n = await aliceOnA();
    const user = String((await n.conn.clusterConnect()).body.user);
    const v = (decodeVouch(user) as { vouch: Vouch }).vouch;
    const sid = randomBytes(32);
    const passwordBlob = Buffer.concat([sshString(sid), Buffer.from([50]), sshString(user), sshString('ssh-connection'), sshString('password'), Buffer.from([0]), sshString('hunter2')]);
    const bad: Array<[string, Buffer]> = [
      ['plain root', userauthBlob({ sessionId: sid, user: 'root', key: NODE_A.blob })],
      ['a vouch for another account', userauthBlob({ sessionId: sid, user: vouchName({ ...v, account: 'carol' }), key: NODE_A.blob })],
      ['the vouch without its restrictions', userauthBlob({ sessionId: sid, user: vouchName({ ...v, key: null }), key: NODE_A.blob })],
      ['the vouch for another node', userauthBlob({ sessionId: sid, user: vouchName({ ...v, to: 'node-c' }), key: NODE_A.blob })],
      ['another service', userauthBlob({ sessionId: sid, user, key: NODE_A.blob, service: 'ssh-userauth' })],
      ['another key (the client\'s)', userauthBlob({ sessionId: sid, user, key: CLIENT.blob })],
      ['another algorithm', userauthBlob({ sessionId: sid, user, key: NODE_A.blob, algo: 'rsa-sha2-512' })],
      ['a password request', passwordBlob],
      ['a non-publickey method name', userauthBlob({ sessionId: sid, user, key: NODE_A.blob, method: 'hostbased' })],
      ['trailing bytes', userauthBlob({ sessionId: sid, user, key: NODE_A.blob, trailing: Buffer.from('x') })],
      ['a short session id', userauthBlob({ sessionId: randomBytes(8), user, key: NODE_A.blob })],
      ['arbitrary data', randomBytes(200)],
    ];
    for (const [what, data] of bad) expect(() => signReq(n, data), what).toThrow(ProtocolViolation);
    // The one it wrote: signed, and B checks it with A's public node key.
    for (let i = 0; i < 3; i++) {
      const good = userauthBlob({ sessionId: randomBytes(32), user, key: NODE_A.blob });
      const s = Buffer.from(signReq(n, good).signature, 'base64');
      expect(verify(null, good, NODE_A.pub, s)).toBe(true);
      expect(verify(null, good, NODE_C.pub, s)).toBe(false);
    }
    expect(() => signReq(n, userauthBlob({ sessionId: randomBytes(32), user, key: NODE_A.blob }))).toThrow(/more than 3 times/);
  });

  it('8b. what A signs logs in on B, and B applies the restrictions A wrote', async () => {
    const a = await aliceOnA();
    const user = String((await a.conn.clusterConnect()).body.user);
    const b = connectionOn('node-b');
    const blob = userauthBlob({ sessionId: b.conn.sessionId!, user, key: NODE_A.blob });
    const r = await b.conn.publickey({
      req: 'auth.publickey', id: 1, conn: b.conn.id, user, algo: 'ssh-ed25519', key: NODE_A.blob.toString('base64'),
      blob: blob.toString('base64'), signature: signReq(a, blob).signature,
    });
    expect(r.success).toBe(true);
    expect(r.grant).toMatchObject({ account: 'alice', noPty: true, agentForwardingRefusal: 'no-agent-forwarding key option' });
    await expect(forwardConnect(b, '10.0.0.1', 22)).rejects.toThrow(/permitopen/);
    await expect(openSession(b, { kind: 'exec', command: 'id' })).rejects.toThrow(/test: no process started/);
    expect(b.ves.specs[0]!.argv).toEqual(['/bin/bash', '-c', 'echo forced']);
  });

  it('11. a client gone while A asks where its VE lives leaves no connection counted against the caps, and no login behind', async () => {
    // The attack: log in with valid credentials and drop the TCP connection
    // at once, many times. The worker relays the signature then "closed";
    // the broker forgets the connection during the etcd read of the
    // placement. A slot counted after that would never be given back, and
    // sessions.maxConnections (server-wide) would fill up.
    let answer!: (node: string) => void;
    const n = connectionOn('node-a');
    n.routes.placements.set('alice', () => new Promise<string>((resolve) => { answer = resolve; }));
    const blob = userauthBlob({ sessionId: n.conn.sessionId!, user: 'alice', key: CLIENT.blob });
    const pending = n.conn.publickey({
      req: 'auth.publickey', id: 1, conn: n.conn.id, user: 'alice', algo: 'ssh-ed25519',
      key: CLIENT.blob.toString('base64'), blob: blob.toString('base64'), signature: sign(null, blob, CLIENT.priv).toString('base64'),
    });
    pending.catch(() => undefined);
    await new Promise((r) => setImmediate(r));
    expect(n.routes.located).toEqual(['alice']);
    n.conn.dispose();
    answer('node-b');
    const r = await pending.catch((err: unknown) => err);
    expect(r instanceof Refused || (r as { success?: boolean }).success === false).toBe(true);
    expect(n.conn.state).toBe('closed');
    expect(n.caps.usage('alice')).toEqual({ account: null, total: { connection: 0, session: 0, forwardHelper: 0 } });
    expect(n.ves.calls).toEqual([]);
  });

  it('10. etcd down at login: the login succeeds, its first session is refused with the error\'s message, nothing carried or run', async () => {
    const n = await aliceOnA(() => Promise.reject(new VeshError(ErrorCodes.CLUSTER_UNAVAILABLE, 'etcd: connection refused', { userMessage: 'The cluster cannot be asked where your environment lives; try again shortly.' })));
    expect(n.grant.remote).toBeUndefined();
    expect(n.conn.state).toBe('authenticated');
    await expect(openSession(n, { kind: 'exec', command: 'id' })).rejects.toThrow(/^The cluster cannot be asked where your environment lives; try again shortly\.$/);
    await expect(n.conn.clusterConnect()).rejects.toThrow(Refused);
    expect(() => signReq(n, userauthBlob({ sessionId: randomBytes(32), user: 'alice', key: NODE_A.blob }))).toThrow(ProtocolViolation);
    expect(n.ves.calls).toEqual([]);
    expect(n.routes.connects).toBe(0);
  });
});
