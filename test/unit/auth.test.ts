import argon2 from 'argon2';
import { pino, type Logger } from 'pino';
import ssh2 from 'ssh2';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { Authenticator, hashPassword } from '../../src/auth/authenticator.js';
import { costClassOf, FairSemaphore, MAX_PASSWORD_BYTES, Semaphore, type PasswordHashCost } from '../../src/auth/passwords.js';
import { SourcePenalties } from '../../src/auth/penalties.js';
import { parseServerConfig } from '../../src/config/server-config.js';
import { BrokerConnection } from '../../src/broker/broker-connection.js';
import { DEFAULT_SESSION_LIMITS, UsageCaps } from '../../src/ssh/usage-caps.js';
import { sourceBlock } from '../../src/auth/source-match.js';
import type { SshAuthenticator } from '../../src/ssh/ports.js';
import { parseAuthorizedKeyLine, type Account } from '../../src/config/accounts.js';
import type { AccountSource } from '../../src/config/accounts-store.js';
import { generateKeyPair } from '../../src/ssh/keygen.js';

const { utils } = ssh2;

/** Cheap hashes keep the tests quick; the cost of a hash does not change what verify answers. */
const CHEAP: PasswordHashCost = { memoryCost: 1024, timeCost: 1, parallelism: 1 };
const cheapHash = (pw: string) => argon2.hash(pw, { type: argon2.argon2id, ...CHEAP });

function captureLogger(): { logger: Logger; records: Array<Record<string, unknown>> } {
  const records: Array<Record<string, unknown>> = [];
  const logger = pino({ level: 'debug' }, { write: (line: string) => void records.push(JSON.parse(line) as Record<string, unknown>) });
  return { logger, records };
}

class MapSource implements AccountSource {
  constructor(public accounts = new Map<string, Account>()) {}
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

const PENALTIES = { penalties: { failuresBeforePenalty: 3, penaltyMs: 1_000, maxPenaltyMs: 5_000 } };

function makeAuth(source: AccountSource, opts: { now?: () => number; logger?: Logger } = {}): Authenticator {
  return new Authenticator(source, PENALTIES, opts.logger ?? captureLogger().logger, { dummyHashCost: CHEAP, now: opts.now });
}

afterEach(() => {
  vi.restoreAllMocks();
});

describe('passwords', () => {
  it('accepts the right password and refuses a wrong one', async () => {
    const src = new MapSource();
    const alice = src.set({ name: 'alice', password: await cheapHash('correct horse') });
    const auth = makeAuth(src);
    await expect(auth.verifyPassword('alice', 'correct horse', '192.0.2.1')).resolves.toEqual({ ok: true, account: alice });
    await expect(auth.verifyPassword('alice', 'correct hors', '192.0.2.1')).resolves.toEqual({ ok: false });
    await expect(auth.verifyPassword('alice', '', '192.0.2.1')).resolves.toEqual({ ok: false });
  });

  it('verifies hashes made with other parameters and argon2 variants', async () => {
    const src = new MapSource();
    src.set({ name: 'owasp', password: await argon2.hash('pw', { type: argon2.argon2id, memoryCost: 19456, timeCost: 2, parallelism: 1 }) });
    src.set({ name: 'old', password: await argon2.hash('pw', { type: argon2.argon2i, ...CHEAP }) });
    const auth = makeAuth(src);
    expect((await auth.verifyPassword('owasp', 'pw', '192.0.2.1')).ok).toBe(true);
    expect((await auth.verifyPassword('old', 'pw', '192.0.2.1')).ok).toBe(true);
  });

  it('refuses unknown, locked and password-less accounts, spending one verify of the dummy hash each', async () => {
    const src = new MapSource();
    const hash = await cheapHash('pw');
    src.set({ name: 'locked', password: hash, locked: true });
    src.set({ name: 'keyonly' });
    const auth = makeAuth(src);
    const verify = vi.spyOn(argon2, 'verify');
    for (const user of ['nobody', 'locked', 'keyonly']) {
      verify.mockClear();
      await expect(auth.verifyPassword(user, 'pw', '192.0.2.1')).resolves.toEqual({ ok: false });
      expect(verify).toHaveBeenCalledTimes(1);
      expect(verify.mock.calls[0]![0]).not.toBe(hash);
      expect(verify.mock.calls[0]![0]).toMatch(/^\$argon2id\$v=19\$m=1024,/);
    }
  });

  it('refuses a password over 1024 bytes without checking it, after a dummy verify', async () => {
    const long = 'é'.repeat(513); // 1026 bytes
    const src = new MapSource();
    src.set({ name: 'alice', password: await cheapHash(long) });
    const auth = makeAuth(src);
    const verify = vi.spyOn(argon2, 'verify');
    await expect(auth.verifyPassword('alice', long, '192.0.2.1')).resolves.toEqual({ ok: false });
    expect(verify).toHaveBeenCalledTimes(1);
    expect(verify.mock.calls[0]![0]).not.toBe(src.get('alice')!.password);
    // Exactly at the limit is still checked.
    const edge = 'a'.repeat(MAX_PASSWORD_BYTES);
    src.set({ name: 'bob', password: await cheapHash(edge) });
    expect((await auth.verifyPassword('bob', edge, '192.0.2.1')).ok).toBe(true);
  });

  it('applies a lock that arrives while the check runs', async () => {
    const src = new MapSource();
    src.set({ name: 'alice', password: await cheapHash('pw') });
    const auth = makeAuth(src);
    const real = argon2.verify;
    vi.spyOn(argon2, 'verify').mockImplementation(async (hash, pw) => {
      const ok = await real(hash, pw);
      src.set({ ...src.get('alice')!, locked: true });
      return ok;
    });
    await expect(auth.verifyPassword('alice', 'pw', '192.0.2.1')).resolves.toEqual({ ok: false });
  });

  it('runs at most two argon2 operations at once', async () => {
    const src = new MapSource();
    src.set({ name: 'alice', password: await cheapHash('pw') });
    const auth = makeAuth(src);
    const real = argon2.verify;
    let inFlight = 0;
    let most = 0;
    vi.spyOn(argon2, 'verify').mockImplementation(async (hash, pw) => {
      inFlight++;
      most = Math.max(most, inFlight);
      try {
        return await real(hash, pw);
      } finally {
        inFlight--;
      }
    });
    // From eight sources: one source may have only two checks in at once.
    const results = await Promise.all(Array.from({ length: 8 }, (_, i) => auth.verifyPassword(i % 2 ? 'alice' : 'nobody', 'pw', `192.0.2.${i + 1}`)));
    expect(results.map((r) => r.ok)).toEqual([false, true, false, true, false, true, false, true]);
    expect(most).toBe(2);
  });

  it('never logs a password', async () => {
    const { logger, records } = captureLogger();
    const src = new MapSource();
    src.set({ name: 'alice', password: 'not-a-valid-hash' });
    const auth = makeAuth(src, { logger });
    await expect(auth.verifyPassword('alice', 'sekrit-value', '192.0.2.1')).resolves.toEqual({ ok: false });
    expect(records.some((r) => r.event === 'auth.bad_hash')).toBe(true);
    expect(JSON.stringify(records)).not.toContain('sekrit-value');
  });

  it('hashPassword makes argon2id at m=65536,t=3,p=4 and refuses empty or oversized passwords', async () => {
    const h = await hashPassword('example');
    expect(h).toMatch(/^\$argon2id\$v=19\$/);
    expect(h).toContain('m=65536');
    expect(h).toContain('t=3');
    expect(h).toContain('p=4');
    expect(await argon2.verify(h, 'example')).toBe(true);
    await expect(hashPassword('')).rejects.toThrow(/empty/);
    await expect(hashPassword('x'.repeat(1025))).rejects.toThrow(/longer than 1024 bytes/);
  });
});

describe('public keys', () => {
  const ed = generateKeyPair('ed25519');
  const rsa = generateKeyPair('rsa', { bits: 2048 });
  const other = generateKeyPair('ed25519');
  const blobOf = (pub: string) => Buffer.from(pub.split(' ')[1]!, 'base64');

  function setup(lines: string[], extra: Partial<Account> = {}) {
    const src = new MapSource();
    const alice = src.set({ name: 'alice', keys: lines.map(parseAuthorizedKeyLine), ...extra });
    return { src, alice, auth: makeAuth(src) };
  }

  it('finds the key by type and blob', () => {
    const { auth, alice } = setup([`${other.public}`, `no-pty ${ed.public}`]);
    const found = auth.findKey('alice', 'ssh-ed25519', blobOf(ed.public), '192.0.2.1');
    expect(found?.account).toBe(alice);
    expect(found?.key.options.noPty).toBe(true);
    expect(auth.findKey('alice', 'ssh-rsa', blobOf(ed.public), '192.0.2.1')).toBeNull();
    expect(auth.findKey('bob', 'ssh-ed25519', blobOf(ed.public), '192.0.2.1')).toBeNull();
    expect(auth.findKey('alice', 'ssh-ed25519', blobOf(generateKeyPair('ed25519').public), '192.0.2.1')).toBeNull();
  });

  it('finds nothing for a locked account', () => {
    const { auth } = setup([ed.public], { locked: true });
    expect(auth.findKey('alice', 'ssh-ed25519', blobOf(ed.public), '192.0.2.1')).toBeNull();
  });

  it('honours from=, with negation and CIDR, and logs the refusal', () => {
    const { logger, records } = captureLogger();
    const src = new MapSource();
    src.set({ name: 'alice', keys: [parseAuthorizedKeyLine(`from="10.0.0.0/8,!10.6.6.6" ${ed.public}`)] });
    const auth = new Authenticator(src, PENALTIES, logger, { dummyHashCost: CHEAP });
    const blob = blobOf(ed.public);
    expect(auth.findKey('alice', 'ssh-ed25519', blob, '10.1.2.3')).not.toBeNull();
    expect(auth.findKey('alice', 'ssh-ed25519', blob, '::ffff:10.1.2.3')).not.toBeNull();
    expect(auth.findKey('alice', 'ssh-ed25519', blob, '10.6.6.6')).toBeNull();
    expect(auth.findKey('alice', 'ssh-ed25519', blob, '192.0.2.1')).toBeNull();
    expect(records.filter((r) => r.event === 'auth.key_source_refused')).toHaveLength(2);
  });

  it('verifies signatures with the key, and refuses SHA-1 RSA signatures', () => {
    const { auth } = setup([ed.public, rsa.public]);
    const data = Buffer.from('session id and userauth request');
    const edKey = auth.findKey('alice', 'ssh-ed25519', blobOf(ed.public), '192.0.2.1')!.key;
    const edPriv = utils.parseKey(ed.private) as ssh2.ParsedKey;
    expect(auth.verifySignature(edKey, data, edPriv.sign(data))).toBe(true);
    expect(auth.verifySignature(edKey, Buffer.from('other data'), edPriv.sign(data))).toBe(false);

    // Clients sign with rsa-sha2-512; ssh2 reports the key as ssh-rsa, but take either name.
    const rsaKey = auth.findKey('alice', 'rsa-sha2-512', blobOf(rsa.public), '192.0.2.1')!.key;
    const rsaPriv = utils.parseKey(rsa.private) as ssh2.ParsedKey;
    expect(auth.verifySignature(rsaKey, data, rsaPriv.sign(data, 'sha512'), 'sha512')).toBe(true);
    expect(auth.verifySignature(rsaKey, data, rsaPriv.sign(data, 'sha1'))).toBe(false);
    expect(auth.verifySignature(rsaKey, data, Buffer.alloc(256), 'sha256')).toBe(false);
  });
});

describe('per-source penalties', () => {
  const cfg = { failuresBeforePenalty: 3, penaltyMs: 1_000, maxPenaltyMs: 5_000 };

  it('starts after N failures, doubles up to the maximum', () => {
    let now = 1_000_000;
    const p = new SourcePenalties(cfg, { now: () => now });
    const ms = (r: Array<{ ms: number }>) => r.reduce((m, x) => Math.max(m, x.ms), 0);
    expect(ms(p.recordFailure('192.0.2.1'))).toBe(0);
    expect(ms(p.recordFailure('192.0.2.1'))).toBe(0);
    expect(p.remaining('192.0.2.1')).toBe(0);
    expect(p.recordFailure('192.0.2.1')).toEqual([{ scope: { kind: 'source' }, ms: 1_000 }]);
    expect(p.remaining('192.0.2.1')).toBe(1_000);
    now += 400;
    expect(p.remaining('192.0.2.1')).toBe(600);
    expect(ms(p.recordFailure('192.0.2.1'))).toBe(2_000);
    expect(ms(p.recordFailure('192.0.2.1'))).toBe(4_000);
    expect(ms(p.recordFailure('192.0.2.1'))).toBe(5_000);
    expect(ms(p.recordFailure('192.0.2.1'))).toBe(5_000);
    expect(p.remaining('192.0.2.1')).toBe(5_000);
    // Other sources are not affected.
    expect(p.remaining('192.0.2.2')).toBe(0);
    now += 5_000;
    expect(p.remaining('192.0.2.1')).toBe(0);
  });

  it('counts per (source, account) and per source; a login clears only its own account\'s failures (review M5)', () => {
    let now = 0;
    const p = new SourcePenalties({ failuresBeforePenalty: 3, sourceFailuresBeforePenalty: 8, penaltyMs: 1_000, maxPenaltyMs: 5_000 }, { now: () => now });
    // Two wrong passwords for bob, then a good login to alice, again and again: bob's count is not reset.
    p.recordFailure('192.0.2.1', 'bob');
    p.recordFailure('192.0.2.1', 'bob');
    p.recordSuccess('192.0.2.1', 'alice');
    expect(p.remaining('192.0.2.1', 'bob')).toBe(0);
    expect(p.recordFailure('192.0.2.1', 'bob')).toEqual([{ scope: { kind: 'account', account: 'bob' }, ms: 1_000 }]);
    p.recordSuccess('192.0.2.1', 'alice');
    expect(p.remaining('192.0.2.1', 'bob')).toBe(1_000);
    // Only bob's guesser waits: alice from the same source, and bob from elsewhere, do not.
    expect(p.remaining('192.0.2.1', 'alice')).toBe(0);
    expect(p.remaining('192.0.2.1')).toBe(0);
    expect(p.remaining('192.0.2.2', 'bob')).toBe(0);
    // A login to bob from that source (his own, say) clears bob's count there.
    now += 1_000;
    p.recordSuccess('192.0.2.1', 'bob');
    expect(p.remaining('192.0.2.1', 'bob')).toBe(0);
    // Moving on to other accounts: the source as a whole reaches its threshold (8 failures in all), and logins never clear that.
    for (const a of ['carol', 'dave', 'erin', 'frank']) p.recordFailure('192.0.2.1', a);
    expect(p.remaining('192.0.2.1')).toBe(0);
    const started = p.recordFailure('192.0.2.1', 'grace');
    expect(started).toEqual([{ scope: { kind: 'source' }, ms: 1_000 }]);
    p.recordSuccess('192.0.2.1', 'alice');
    expect(p.remaining('192.0.2.1')).toBe(1_000);
    expect(p.remaining('192.0.2.1', 'alice')).toBe(1_000);
  });

  it('counts an IPv4-mapped IPv6 source as its IPv4 address', () => {
    const p = new SourcePenalties(cfg, { now: () => 0 });
    p.recordFailure('::ffff:192.0.2.9');
    p.recordFailure('192.0.2.9');
    p.recordFailure('::FFFF:192.0.2.9');
    expect(p.remaining('192.0.2.9')).toBe(1_000);
    expect(p.size).toBe(1);
  });

  it('forgets a source that stayed quiet long after its penalty', () => {
    let now = 0;
    const p = new SourcePenalties(cfg, { now: () => now });
    for (let i = 0; i < 3; i++) p.recordFailure('192.0.2.1');
    now += 60 * 60_000;
    expect(p.remaining('192.0.2.1')).toBe(0);
    expect(p.size).toBe(0);
    expect(p.recordFailure('192.0.2.1')).toEqual([]);
  });

  it('keeps a bounded table, forgetting the source that failed longest ago', () => {
    const p = new SourcePenalties({ ...cfg, failuresBeforePenalty: 1 }, { maxSources: 3, now: () => 0 });
    for (const s of ['10.0.0.1', '10.0.0.2', '10.0.0.3', '10.0.0.4']) p.recordFailure(s);
    expect(p.size).toBe(3);
    expect(p.remaining('10.0.0.1')).toBe(0);
    expect(p.remaining('10.0.0.4')).toBe(1_000);
    // A new failure moves a source to the young end.
    p.recordFailure('10.0.0.2');
    p.recordFailure('10.0.0.5');
    expect(p.remaining('10.0.0.2')).toBeGreaterThan(0);
    expect(p.remaining('10.0.0.3')).toBe(0);
  });

  it('is what the Authenticator reports, and it logs a penalty when one starts', () => {
    let now = 0;
    const { logger, records } = captureLogger();
    const auth = new Authenticator(new MapSource(), PENALTIES, logger, { dummyHashCost: CHEAP, now: () => now });
    for (let i = 0; i < 3; i++) auth.recordFailure('198.51.100.7');
    expect(auth.penaltyRemaining('198.51.100.7')).toBe(1_000);
    expect(records.filter((r) => r.event === 'auth.penalty')).toHaveLength(1);
    now += 250;
    expect(auth.penaltyRemaining('198.51.100.7')).toBe(750);
    // A login does not lift a penalty of the whole source.
    auth.recordSuccess('198.51.100.7', 'alice');
    expect(auth.penaltyRemaining('198.51.100.7')).toBe(750);
    // A penalty on one account says which.
    const perAccount = new Authenticator(new MapSource(), { penalties: { ...PENALTIES.penalties, sourceFailuresBeforePenalty: 10 } }, logger, { dummyHashCost: CHEAP, now: () => now });
    for (let i = 0; i < 3; i++) perAccount.recordFailure('198.51.100.8', 'bob');
    expect(records.filter((r) => r.event === 'auth.penalty' && r.scope === 'account' && r.account === 'bob' && r.source === '198.51.100.8')).toHaveLength(1);
    expect(perAccount.penaltyRemaining('198.51.100.8', 'bob')).toBe(1_000);
    expect(perAccount.penaltyRemaining('198.51.100.8', 'alice')).toBe(0);
  });
});

describe('FairSemaphore (the password-check queue)', () => {
  it('gives each source at most its share, and serves waiting sources in turn', async () => {
    const sem = new FairSemaphore(1, 4, 100);
    const order: string[] = [];
    const gates: Array<() => void> = [];
    const task = (name: string) => () => new Promise<string>((r) => gates.push(() => {
      order.push(name);
      r(name);
    }));
    // The flooder gets one running and three waiting; its fifth is refused at once.
    const f = [sem.run('flood', task('f1')), sem.run('flood', task('f2')), sem.run('flood', task('f3')), sem.run('flood', task('f4'))];
    await expect(sem.run('flood', task('f5'))).resolves.toEqual({ refused: 'key' });
    // The victim arrives last; it waits for one more of the flooder's tasks
    // (keys take turns), not for the flooder's whole backlog.
    const v = sem.run('victim', task('v1'));
    expect(sem.pending).toBe(4);
    while (order.length < 5) {
      await new Promise((r) => setTimeout(r, 1));
      gates.shift()?.();
    }
    await Promise.all([...f, v]);
    expect(order).toEqual(['f1', 'f2', 'v1', 'f3', 'f4']);
  });

  it('never gives one source every running slot: another source\'s check starts at once', async () => {
    const sem = new FairSemaphore(2, 4, 100);
    const releases: Array<() => void> = [];
    const hold = () => new Promise<void>((r) => releases.push(r));
    const f = [sem.run('flood', hold), sem.run('flood', hold), sem.run('flood', hold)];
    // Two slots, but the flooder runs only one; its others wait.
    expect(sem.running).toBe(1);
    expect(sem.pending).toBe(2);
    let started = false;
    const v = sem.run('victim', async () => { started = true; });
    await v;
    expect(started).toBe(true);
    while (releases.length > 0) {
      releases.shift()!();
      await new Promise((r) => setTimeout(r, 1));
    }
    await Promise.all(f);
    expect(sem.running).toBe(0);
    expect(sem.pending).toBe(0);
  });

  it('refuses when the whole queue is full', async () => {
    const sem = new FairSemaphore(1, 10, 1);
    let release!: () => void;
    const first = sem.run('a', () => new Promise<void>((r) => (release = r)));
    const second = sem.run('b', async () => 'b');
    await expect(sem.run('c', async () => 'c')).resolves.toEqual({ refused: 'queue' });
    release();
    await first;
    await expect(second).resolves.toEqual({ value: 'b' });
  });
});

describe('Semaphore', () => {
  it('queues past the limit and turns work away past the queue limit', async () => {
    const sem = new Semaphore(1, 1);
    let release!: () => void;
    const first = sem.run(() => new Promise<string>((r) => (release = () => r('first'))));
    const second = sem.run(async () => 'second');
    await expect(sem.run(async () => 'third')).resolves.toBeNull();
    expect(sem.pending).toBe(1);
    release();
    await expect(first).resolves.toEqual({ value: 'first' });
    await expect(second).resolves.toEqual({ value: 'second' });
    expect(sem.running).toBe(0);
  });
});

/** A second cheap cost class, distinguishable from CHEAP (and from the dummyHashCost the tests pass). */
const OTHER: PasswordHashCost = { memoryCost: 2048, timeCost: 1, parallelism: 1 };
const hashIn = (cost: PasswordHashCost, pw = 'pw') => argon2.hash(pw, { type: argon2.argon2id, ...cost });
const classOfCall = (call: unknown[]) => {
  const c = costClassOf(String(call[0]));
  return c ? `m=${c.memoryCost},t=${c.timeCost},p=${c.parallelism}` : null;
};

describe('answer time does not tell unknown or locked accounts from real ones', () => {
  it('checks an unknown name in the cost class of the accounts\' hashes, not in a fixed one', async () => {
    // Every hash is OTHER, the configured fallback is CHEAP: an unknown name must cost what a real check costs.
    const src = new MapSource();
    src.set({ name: 'alice', password: await hashIn(OTHER) });
    src.set({ name: 'bob', password: await hashIn(OTHER) });
    const auth = makeAuth(src);
    const verify = vi.spyOn(argon2, 'verify');
    for (const user of ['nobody', 'root', 'admin', 'alice']) {
      verify.mockClear();
      await expect(auth.verifyPassword(user, 'wrong', '192.0.2.1')).resolves.toEqual({ ok: false });
      expect(verify).toHaveBeenCalledTimes(1);
      expect(classOfCall(verify.mock.calls[0]!)).toBe('m=2048,t=1,p=1');
    }
  });

  it('draws each unknown name\'s class from the accounts\' classes, weighted, and keeps it for that name', async () => {
    const src = new MapSource();
    for (const n of ['a1', 'a2', 'a3']) src.set({ name: n, password: await hashIn(OTHER) });
    src.set({ name: 'cheap', password: await hashIn(CHEAP) });
    const secret = Buffer.alloc(32, 7);
    const auth = new Authenticator(src, PENALTIES, captureLogger().logger, { dummyHashCost: { memoryCost: 4096, timeCost: 1, parallelism: 1 }, dummySecret: secret });
    const counts = new Map<string, number>();
    for (let i = 0; i < 400; i++) {
      const c = auth.classForName(`user${i}`);
      const k = `m=${c.memoryCost}`;
      counts.set(k, (counts.get(k) ?? 0) + 1);
    }
    // Only the classes real accounts use, roughly three to one (the draw is a keyed hash: fixed for this secret).
    expect([...counts.keys()].sort()).toEqual(['m=1024', 'm=2048']);
    expect(counts.get('m=2048')!).toBeGreaterThan(2 * counts.get('m=1024')!);
    // The same name always lands in the same class, also in another instance with the same secret (a restart).
    const again = new Authenticator(src, PENALTIES, captureLogger().logger, { dummySecret: secret });
    for (let i = 0; i < 50; i++) expect(again.classForName(`user${i}`)).toEqual(auth.classForName(`user${i}`));
    // And the check really runs in the drawn class.
    const verify = vi.spyOn(argon2, 'verify');
    const drawn = auth.classForName('someone');
    await auth.verifyPassword('someone', 'x', '192.0.2.1');
    expect(classOfCall(verify.mock.calls[0]!)).toBe(`m=${drawn.memoryCost},t=${drawn.timeCost},p=${drawn.parallelism}`);
  });

  it('checks a locked account, and a too-long password, against a dummy in that account\'s own class', async () => {
    const src = new MapSource();
    src.set({ name: 'everyone', password: await hashIn(CHEAP) });
    const lockedHash = await hashIn(OTHER, 'right');
    src.set({ name: 'locked', password: lockedHash, locked: true });
    src.set({ name: 'long', password: await hashIn(OTHER) });
    const auth = makeAuth(src);
    const verify = vi.spyOn(argon2, 'verify');
    await expect(auth.verifyPassword('locked', 'right', '192.0.2.1')).resolves.toEqual({ ok: false });
    await expect(auth.verifyPassword('long', 'x'.repeat(MAX_PASSWORD_BYTES + 1), '192.0.2.1')).resolves.toEqual({ ok: false });
    expect(verify).toHaveBeenCalledTimes(2);
    for (const call of verify.mock.calls) {
      expect(call[0]).not.toBe(lockedHash);
      expect(classOfCall(call)).toBe('m=2048,t=1,p=1');
    }
  });

  it('follows a reload: a class that came in with new accounts is used for unknown names', async () => {
    const src = new MapSource();
    src.set({ name: 'alice', password: await hashIn(CHEAP) });
    const auth = makeAuth(src);
    expect(auth.classForName('nobody').memoryCost).toBe(1024);
    src.accounts.clear();
    src.set({ name: 'bob', password: await hashIn(OTHER) });
    const verify = vi.spyOn(argon2, 'verify');
    await auth.verifyPassword('nobody', 'x', '192.0.2.1');
    expect(classOfCall(verify.mock.calls[0]!)).toBe('m=2048,t=1,p=1');
  });

  it('spends a dummy check after a stored hash argon2 cannot use, and warns about weak hashes once', async () => {
    const { logger, records } = captureLogger();
    const src = new MapSource();
    src.set({ name: 'alice', password: await hashIn(CHEAP) });
    // A PHC string argon2 refuses (salt too short) while the shape passes.
    src.set({ name: 'broken', password: '$argon2id$v=19$m=1024,t=1,p=1$YQ$YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXo' });
    const auth = new Authenticator(src, PENALTIES, logger, { dummyHashCost: CHEAP });
    const verify = vi.spyOn(argon2, 'verify');
    await expect(auth.verifyPassword('broken', 'pw', '192.0.2.1')).resolves.toEqual({ ok: false });
    expect(records.some((r) => r.event === 'auth.bad_hash')).toBe(true);
    expect(verify).toHaveBeenCalledTimes(2);
    expect(verify.mock.results[1]!.type).toBe('return');
    await auth.verifyPassword('alice', 'pw', '192.0.2.1');
    expect(records.filter((r) => r.event === 'auth.weak_hash' && r.account === 'alice')).toHaveLength(1);
  });
});

describe('authentication phase of a connection', () => {
  const failingAuthenticator = (err: () => Promise<never>): SshAuthenticator => ({
    verifyPassword: err,
    findKey: () => null,
    verifySignature: () => false,
    penaltyRemaining: () => 0,
    recordFailure: () => undefined,
    recordSuccess: () => undefined,
  });

  /** n password attempts on one connection, as the broker sees them from a worker. */
  async function attempts(authenticator: SshAuthenticator, user: string, n: number, maxAuthTries: number) {
    let dropped = 0;
    const logger = captureLogger().logger;
    const conn = new BrokerConnection('0a0b0c0d', 0, '192.0.2.1', 40000, { address: '127.0.0.1', port: 22 }, -1, {
      authenticator, ves: {} as never, caps: new UsageCaps(DEFAULT_SESSION_LIMITS, logger), maxAuthTries,
      send: () => undefined, onAuthenticated: () => undefined,
    }, logger);
    const answers: string[][] = [];
    for (let i = 0; i < n; i++) {
      const a = await conn.password({ req: 'auth.password', id: i + 1, conn: '0a0b0c0d', user, password: `guess-${i}`, method: 'password' });
      answers.push([a.success ? 'accept' : 'reject']);
      if (a.disconnect) dropped++;
    }
    return { dropped, answers };
  }

  it('counts a check that failed inside the server (argon2 threw) against MaxAuthTries', async () => {
    const r = await attempts(failingAuthenticator(() => Promise.reject(new Error('argon2: internal error'))), 'alice', 3, 3);
    expect(r.answers).toEqual([['reject'], ['reject'], ['reject']]);
    expect(r.dropped).toBe(1);
  });

  it('counts it with the real Authenticator when argon2 itself fails, for known and unknown users', async () => {
    const src = new MapSource();
    src.set({ name: 'alice', password: await cheapHash('pw') });
    const auth = makeAuth(src);
    await auth.verifyPassword('nobody', 'warm-up', '192.0.2.1');
    vi.spyOn(argon2, 'verify').mockRejectedValue(new Error('argon2: out of memory'));
    for (const user of ['alice', 'nobody']) {
      const r = await attempts(auth, user, 2, 2);
      expect(r.answers, user).toEqual([['reject'], ['reject']]);
      expect(r.dropped, user).toBe(1);
    }
  });
});

describe('sources: IPv4 addresses, IPv6 /64s', () => {
  it('groups IPv6 addresses by their /64 and leaves IPv4 addresses alone', () => {
    expect(sourceBlock('192.0.2.7')).toBe('192.0.2.7');
    expect(sourceBlock('::ffff:192.0.2.7')).toBe('192.0.2.7');
    expect(sourceBlock('::FFFF:c000:207')).toBe('192.0.2.7');
    expect(sourceBlock('2001:db8:1:2::1')).toBe('2001:db8:1:2::/64');
    expect(sourceBlock('2001:DB8:1:2:ffff:eeee:dddd:cccc')).toBe('2001:db8:1:2::/64');
    expect(sourceBlock('2001:0db8:0001:0002:0:0:0:9')).toBe('2001:db8:1:2::/64');
    expect(sourceBlock('fe80::1%eth0')).toBe('fe80:0:0:0::/64');
    expect(sourceBlock('::1')).toBe('0:0:0:0::/64');
    expect(sourceBlock('2001:db8::192.0.2.1')).toBe('2001:db8:0:0::/64');
    expect(sourceBlock('2001:db8:1:3::1')).not.toBe(sourceBlock('2001:db8:1:2::1'));
  });

  it('penalises a whole IPv6 /64 together, and only it', () => {
    const p = new SourcePenalties({ failuresBeforePenalty: 3, penaltyMs: 1_000, maxPenaltyMs: 5_000 }, { now: () => 0 });
    p.recordFailure('2001:db8:1:2::1');
    p.recordFailure('2001:db8:1:2::2');
    expect(p.remaining('2001:db8:1:2:abcd::99')).toBe(0);
    p.recordFailure('2001:db8:1:2:abcd::99');
    expect(p.remaining('2001:db8:1:2::1')).toBe(1_000);
    expect(p.remaining('2001:db8:1:2:ffff:ffff:ffff:ffff')).toBe(1_000);
    expect(p.remaining('2001:db8:1:3::1')).toBe(0);
    expect(p.size).toBe(1);
  });
});

describe('auth settings in vesh.yaml', () => {
  it('caps unauthenticated connections per source: 10 by default, settable, at least 1', () => {
    expect(parseServerConfig('/tmp/vesh.yaml', 'listen: "127.0.0.1:2222"\n').auth.maxStartupsPerSource).toBe(10);
    expect(parseServerConfig('/tmp/vesh.yaml', 'auth: { maxStartupsPerSource: 3 }\n').auth.maxStartupsPerSource).toBe(3);
    expect(() => parseServerConfig('/tmp/vesh.yaml', 'auth: { maxStartupsPerSource: 0 }\n')).toThrow(/maxStartupsPerSource/);
  });
});
