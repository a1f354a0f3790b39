import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  Cleanup, FakeAuthenticator, HostFakeVes, makeClientKey, serverBugRecords, sshWithKey, startInProcessServer, tempDir,
  type ClientKey, type FakeAccount, type InProcessServer,
} from '../helpers/ssh-harness.js';
import { MSG, ScriptedClient, guessedExchange, kexInit, sshString, x25519 } from '../helpers/kex-script.js';

/**
 * An unauthenticated client abusing the guessed first key-exchange packet
 * (RFC 4253 §7.1), which src/ssh/kex-guess.ts now lets through to ssh2 when
 * the guess is right and drops when it is wrong. Against the real broker and
 * SSH workers (host-fake VEs): the attacker may try
 * - a "right" guess carrying a malformed or low-order ECDH point, to make the
 *   worker compute with it (or crash on it) before any authentication;
 * - a wrong guess carrying another message (a USERAUTH_REQUEST), to have it
 *   read before the keys are set, which the RFC says must be ignored.
 * Each must end or leave only the attacker's own connection, and the worker
 * must serve the next login.
 */
describe('hostile guessed key-exchange packets', () => {
  const cleanup = new Cleanup();
  let srv: InProcessServer;
  let key: ClientKey;

  beforeAll(async () => {
    const dir = tempDir(cleanup);
    const home = path.join(dir, 'home');
    mkdirSync(home);
    key = makeClientKey(dir, 'ed25519');
    const accounts = new Map<string, FakeAccount>([
      ['alice', { name: 'alice', ve: 'alice', user: 'root', forwarding: true, keys: [{ algo: key.type, blob: key.blob, fingerprint: key.fingerprint, comment: '', options: { noPty: false, noPortForwarding: false } }] }],
    ]);
    srv = await startInProcessServer(cleanup, { authenticator: new FakeAuthenticator(accounts), ves: new HostFakeVes(home) });
    cleanup.addCheck(() => {
      const bad = [...serverBugRecords(srv.logs.records), ...srv.logs.records.filter((r) => r.event === 'broker.worker_exit')];
      if (bad.length > 0) throw new Error(`the SSH worker hit a bug or died: ${JSON.stringify(bad).slice(0, 2000)}`);
    });
  });

  afterAll(() => cleanup.run());

  it('a right guess is answered through the real worker (the correction is hooked where each connection is made)', async () => {
    const r = await guessedExchange(srv.port, { kex: ['curve25519-sha256'], hostKey: ['ssh-ed25519'], follows: true, keys: { guess: x25519() } });
    expect(r).toEqual({ used: 'guess', next: MSG.NEWKEYS });
  });

  it('a right guess with a malformed or low-order ECDH point ends only that connection, before any authentication', async () => {
    const points = [Buffer.alloc(31, 7), Buffer.alloc(0), Buffer.alloc(32, 0), Buffer.alloc(4096, 1)];
    for (const point of points) {
      const c = await ScriptedClient.connect(srv.port);
      try {
        await c.readIdent();
        c.serverKexInit = await c.readPacket('KEXINIT');
        c.send(kexInit(['curve25519-sha256'], ['ssh-ed25519'], true), Buffer.concat([Buffer.from([MSG.KEX_ECDH_INIT]), sshString(point)]));
        // Whatever the server says (a DISCONNECT), it must close: no reply signed over the attacker's point.
        const first = await c.readPacket('DISCONNECT').catch(() => null);
        if (first) expect(first[0], `a ${point.length}-byte point was answered`).toBe(MSG.DISCONNECT);
        await c.waitClosed();
      } finally {
        c.close();
      }
    }
    const ok = await sshWithKey(srv.port, 'alice', key, ['echo still-served']);
    expect(ok.stdout).toBe('still-served\n');
  });

  it('a wrong guess cannot smuggle a message in before the keys are set: it is ignored and the exchange goes on', async () => {
    // Our first kex algorithm, another first host key algorithm: a wrong guess by RFC 4253 §7.1.
    const real = x25519();
    const userauth = Buffer.concat([Buffer.from([MSG.USERAUTH_REQUEST]), sshString('alice'), sshString('ssh-connection'), sshString('none')]);
    const r = await guessedExchange(srv.port, {
      kex: ['curve25519-sha256'], hostKey: ['ecdsa-sha2-nistp256', 'ssh-ed25519'], follows: true,
      keys: { real }, after: [userauth, Buffer.concat([Buffer.from([MSG.KEX_ECDH_INIT]), sshString(real.pub)])],
    });
    expect(r).toEqual({ used: 'real', next: MSG.NEWKEYS });
    const ok = await sshWithKey(srv.port, 'alice', key, ['echo still-served']);
    expect(ok.stdout).toBe('still-served\n');
  });
});
