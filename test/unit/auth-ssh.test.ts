import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import argon2 from 'argon2';
import net from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { Authenticator } from '../../src/auth/authenticator.js';
import { costClassOf } from '../../src/auth/passwords.js';
import { AccountsStore } from '../../src/config/accounts-store.js';
import {
  Cleanup, HostFakeVes, LogCapture, makeClientKey, sshWithKey, sshWithPassword, startInProcessServer, tempDir, writeAccounts,
  type ClientKey, type InProcessServer,
} from '../helpers/ssh-harness.js';

/**
 * The real AccountsStore and Authenticator behind the SSH server, against
 * the OpenSSH client: the shapes the SSH layer relies on (ports.ts), key
 * types and signature algorithms as OpenSSH sends them, from= with the
 * address the server sees, and hot reload. VEs are host fakes here.
 */

const CHEAP = { memoryCost: 1024, timeCost: 1, parallelism: 1 };

async function waitFor(cond: () => Promise<boolean> | boolean, what: string, timeoutMs = 15_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('Authenticator behind the SSH server (OpenSSH client)', () => {
  const cleanup = new Cleanup();
  let srv: InProcessServer;
  let store: AccountsStore;
  let file: string;
  let ed: ClientKey;
  let ecdsa: ClientKey;
  let rsa: ClientKey;
  let elsewhere: ClientKey;
  let later: ClientKey;
  let base: string;

  beforeAll(async () => {
    const dir = tempDir(cleanup, 'vesh-auth-ssh-');
    const home = path.join(dir, 'home');
    mkdirSync(home);
    ed = makeClientKey(dir, 'ed25519');
    ecdsa = makeClientKey(dir, 'ecdsa');
    rsa = makeClientKey(dir, 'rsa');
    elsewhere = makeClientKey(dir, 'ed25519', 'elsewhere');
    later = makeClientKey(dir, 'ed25519', 'later');
    const hash = await argon2.hash('correct horse', { type: argon2.argon2id, ...CHEAP });
    file = path.join(dir, 'accounts.yaml');
    base = [
      '# test accounts',
      'alice:',
      `  password: "${hash}"`,
      '  keys:',
      `    - ${ed.publicLine}`,
      `    - ${ecdsa.publicLine}`,
      `    - from="127.0.0.0/8,!10.0.0.1" ${rsa.publicLine}`,
      `    - from="10.0.0.0/8" ${elsewhere.publicLine}`,
      'carol:',
      `  password: "${hash}"`,
      '  locked: true',
      '  keys:',
      `    - ${ed.publicLine}`,
      '',
    ].join('\n');
    writeFileSync(file, base);
    const logs = new LogCapture();
    store = new AccountsStore(file, logs.logger, { debounceMs: 20 });
    await store.load();
    store.watch();
    cleanup.add(() => store.close());
    const authenticator = new Authenticator(store, { penalties: { failuresBeforePenalty: 100, penaltyMs: 60_000, maxPenaltyMs: 600_000 } }, logs.logger, { dummyHashCost: CHEAP });
    srv = await startInProcessServer(cleanup, { authenticator, ves: new HostFakeVes(home), auth: { maxAuthTries: 3, loginGraceTimeMs: 20_000, maxStartups: 10 } });
  });

  afterAll(() => cleanup.run());

  it('logs in with ed25519, ecdsa and rsa (rsa-sha2) keys', async () => {
    for (const k of [ed, ecdsa, rsa]) {
      const r = await sshWithKey(srv.port, 'alice', k, ['echo', 'in']);
      expect(r.stdout, k.type).toBe('in\n');
      expect(r.code).toBe(0);
    }
    const ok = srv.logs.records.filter((e) => e.event === 'ssh.auth' && e.result === 'success' && e.method === 'publickey');
    expect(ok.map((e) => e.fingerprint)).toEqual(expect.arrayContaining([ed.fingerprint, ecdsa.fingerprint, rsa.fingerprint]));
  });

  it('refuses a key whose from= does not match the address', async () => {
    const r = await sshWithKey(srv.port, 'alice', elsewhere, ['true']);
    expect(r.code).toBe(255);
    expect(r.stderr).toMatch(/Permission denied/);
  });

  it('logs in with the right password (password and keyboard-interactive), not a wrong one', async () => {
    expect((await sshWithPassword(srv.port, 'alice', 'correct horse', ['echo', 'pw'])).stdout).toBe('pw\n');
    expect((await sshWithPassword(srv.port, 'alice', 'correct horse', ['echo', 'kbd'], { method: 'keyboard-interactive' })).stdout).toBe('kbd\n');
    const bad = await sshWithPassword(srv.port, 'alice', 'wrong', ['true']);
    expect(bad.code).not.toBe(0);
    expect((await sshWithPassword(srv.port, 'nobody', 'correct horse', ['true'])).code).not.toBe(0);
  });

  it('refuses a locked account with its right password and key', async () => {
    expect((await sshWithPassword(srv.port, 'carol', 'correct horse', ['true'])).code).not.toBe(0);
    expect((await sshWithKey(srv.port, 'carol', ed, ['true'])).code).toBe(255);
  });

  it('applies an edit of accounts.yaml without restart', async () => {
    writeAccounts(file, `${base}dave:\n  ve: alice\n  keys:\n    - ${later.publicLine}\n`);
    await waitFor(() => store.get('dave') !== undefined, 'the reload');
    const r = await sshWithKey(srv.port, 'dave', later, ['echo', 'dave']);
    expect(r.stdout).toBe('dave\n');
  });
});

describe('per-source penalties at the SSH server', () => {
  const cleanup = new Cleanup();
  let srv: InProcessServer;

  beforeAll(async () => {
    const dir = tempDir(cleanup, 'vesh-auth-penalty-');
    const home = path.join(dir, 'home');
    mkdirSync(home);
    const file = path.join(dir, 'accounts.yaml');
    writeFileSync(file, `alice:\n  password: "${await argon2.hash('right', { type: argon2.argon2id, ...CHEAP })}"\n`);
    const logs = new LogCapture();
    const store = new AccountsStore(file, logs.logger);
    await store.load();
    const authenticator = new Authenticator(store, { penalties: { failuresBeforePenalty: 2, penaltyMs: 600_000, maxPenaltyMs: 600_000 } }, logs.logger, { dummyHashCost: CHEAP });
    srv = await startInProcessServer(cleanup, { authenticator, ves: new HostFakeVes(home) });
  });

  afterAll(() => cleanup.run());

  it('turns a source away after repeated failures, even with the right password', async () => {
    expect((await sshWithPassword(srv.port, 'alice', 'right', ['echo', 'ok'])).stdout).toBe('ok\n');
    expect((await sshWithPassword(srv.port, 'alice', 'wrong', ['true'])).code).not.toBe(0);
    expect((await sshWithPassword(srv.port, 'alice', 'wrong', ['true'])).code).not.toBe(0);
    const r = await sshWithPassword(srv.port, 'alice', 'right', ['echo', 'ok']);
    expect(r.code).not.toBe(0);
    expect(r.stdout).toBe('');
  });
});

describe('wrong password, locked account and unknown user alike, with the real Authenticator', () => {
  const cleanup = new Cleanup();
  let srv: InProcessServer;
  // The accounts' hashes are in another cost class than the configured
  // fallback (CHEAP): an unknown user checked at a fixed cost would stand out.
  const ACCOUNT_COST = { memoryCost: 2048, timeCost: 1, parallelism: 1 };

  beforeAll(async () => {
    const dir = tempDir(cleanup, 'vesh-auth-alike-');
    const home = path.join(dir, 'home');
    mkdirSync(home);
    const hash = (pw: string) => argon2.hash(pw, { type: argon2.argon2id, ...ACCOUNT_COST });
    const file = path.join(dir, 'accounts.yaml');
    writeFileSync(file, `alice:\n  password: "${await hash('right')}"\ncarol:\n  password: "${await hash('carols')}"\n  locked: true\nkeyonly:\n  keys: []\n`);
    const logs = new LogCapture();
    const store = new AccountsStore(file, logs.logger);
    await store.load();
    const authenticator = new Authenticator(store, { penalties: { failuresBeforePenalty: 100, penaltyMs: 60_000, maxPenaltyMs: 600_000 } }, logs.logger, { dummyHashCost: CHEAP });
    srv = await startInProcessServer(cleanup, { authenticator, ves: new HostFakeVes(home) });
    // The first check of a class may wait for its dummy hash to be made; not part of what is compared.
    await authenticator.verifyPassword('warm-up', 'x', '192.0.2.1');
  });

  afterEach(() => {
    vi.restoreAllMocks();
  });
  afterAll(() => cleanup.run());

  it('answers each with the same refusal after exactly one argon2 check in the accounts\' cost class', async () => {
    const seen: Array<{ user: string; code: number | null; stderr: string; checks: string[] }> = [];
    const verify = vi.spyOn(argon2, 'verify');
    for (const [user, pw] of [['alice', 'wrong'], ['carol', 'carols'], ['nobody', 'right'], ['keyonly', 'right']] as const) {
      verify.mockClear();
      const r = await sshWithPassword(srv.port, user, pw, ['echo', 'should-not-run']);
      const checks = verify.mock.calls.map((c) => {
        const cls = costClassOf(String(c[0]));
        return cls ? `${cls.variant}:m=${cls.memoryCost},t=${cls.timeCost},p=${cls.parallelism}` : 'not argon2';
      });
      seen.push({ user, code: r.code, stderr: r.stderr.replace(user, 'USER'), checks });
    }
    for (const s of seen) {
      expect(s.code, s.user).toBe(seen[0]!.code);
      expect(s.stderr, s.user).toBe(seen[0]!.stderr);
      expect(s.checks, s.user).toEqual(['argon2id:m=2048,t=1,p=1']);
    }
    expect(seen[0]!.stderr).toMatch(/Permission denied/);
    expect(srv.logs.events('ssh.auth').filter((e) => e.result === 'failure' && e.method === 'password').map((e) => e.user)).toEqual(['alice', 'carol', 'nobody', 'keyonly']);
  });
});

describe('per-source penalties for connections that never log in (real Authenticator)', () => {
  const cleanup = new Cleanup();
  let srv: InProcessServer;
  let key: ClientKey;
  let authLogs: LogCapture;

  beforeAll(async () => {
    const dir = tempDir(cleanup, 'vesh-auth-preauth-');
    const home = path.join(dir, 'home');
    mkdirSync(home);
    key = makeClientKey(dir, 'ed25519');
    const file = path.join(dir, 'accounts.yaml');
    writeFileSync(file, `alice:\n  keys:\n    - ${key.publicLine}\n`);
    authLogs = new LogCapture();
    const store = new AccountsStore(file, authLogs.logger);
    await store.load();
    const authenticator = new Authenticator(store, { penalties: { failuresBeforePenalty: 2, penaltyMs: 600_000, maxPenaltyMs: 600_000 } }, authLogs.logger, { dummyHashCost: CHEAP });
    srv = await startInProcessServer(cleanup, { authenticator, ves: new HostFakeVes(home) });
  });

  afterAll(() => cleanup.run());

  const garbageFrom = (local: string) => new Promise<void>((resolve) => {
    const s = net.connect({ port: srv.port, host: '127.0.0.1', localAddress: local }, () => s.write('NOT SSH AT ALL\r\n\r\n'));
    cleanup.add(() => { s.destroy(); });
    s.on('error', () => resolve());
    s.on('close', () => resolve());
    s.resume();
  });

  it('turns away a source that sent garbage twice, and nobody else', async () => {
    await garbageFrom('127.0.0.21');
    await garbageFrom('127.0.0.21');
    await authLogs.waitFor((e) => e.event === 'auth.penalty' && e.source === '127.0.0.21');
    // The next connection from it is refused before a byte is parsed, even one that would log in.
    await garbageFrom('127.0.0.21');
    await srv.logs.waitFor((e) => e.event === 'ssh.connection_refused' && e.source === '127.0.0.21' && String(e.reason).includes('penalized'));
    // Another address logs in as before.
    const r = await sshWithKey(srv.port, 'alice', key, ['echo', 'in']);
    expect(r.stdout).toBe('in\n');
  });
});
