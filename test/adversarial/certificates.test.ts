import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import ssh2 from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeClientKey, type ClientKey } from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';
import { makeArena, runAttack as runAttackFrom, serverAlive, type Arena } from './kit.js';

/**
 * "A compromised worker cannot log in with a certificate the broker would
 * not take from a client, nor forward past the rules." The SSH worker of
 * this `vesh serve` is test/adversarial/hostile-worker.mjs; on a
 * connection from 127.0.0.2 it presents the certificate the test hands it
 * (attack "cert-login"), signing the login with the tenant's own key over
 * the session id the broker signed, so only the certificate's checks stand
 * between it and the account. alice trusts the test CA (vesh.yaml) and may
 * forward only to 127.0.0.1:8081 (account permitOpen).
 */

const HOSTILE = path.join(path.dirname(new URL(import.meta.url).pathname), 'hostile-worker.mjs');
const ATTACKER = '127.0.0.2';
const CERT_ALGO = 'ssh-ed25519-cert-v01@openssh.com';

type Step = Record<string, unknown> & { step: string };

const str = (b: Buffer | string) => {
  const buf = Buffer.from(b);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(buf.length);
  return Buffer.concat([len, buf]);
};

/** The cert's fields up to (not with) its CA key, and its CA key: the blob is body + string(ca) + string(signature). */
function splitCert(blob: Buffer, caBlob: Buffer): { body: Buffer; signatureAt: number } {
  const at = blob.indexOf(str(caBlob));
  if (at < 0) throw new Error('CA key not found in the certificate');
  return { body: blob.subarray(0, at), signatureAt: at + 4 + caBlob.length };
}

describe('adversarial: certificates and forwarding rules against a compromised worker', () => {
  let arena: Arena;
  let dir: string;
  let ca: ClientKey;
  let tenant: ClientKey;

  /** ssh-keygen -s with the test CA on a copy of the tenant's key: the certificate blob. */
  const certify = (name: string, args: string[]): Buffer => {
    const pub = path.join(dir, `${name}.pub`);
    copyFileSync(`${tenant.file}.pub`, pub);
    execFileSync('ssh-keygen', ['-q', '-s', ca.file, '-I', name, ...args, pub], { stdio: ['ignore', 'ignore', 'pipe'] });
    return Buffer.from(readFileSync(path.join(dir, `${name}-cert.pub`), 'utf8').split(' ')[1]!, 'base64');
  };

  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'vesh-adv-certs-'));
    ca = makeClientKey(dir, 'ed25519', 'ca');
    tenant = makeClientKey(dir, 'ed25519', 'tenant');
    arena = await makeArena({
      template: 'busybox',
      extraYaml: ['workers: { count: 1 }', 'auth:', `  trustedUserCAKeys: ["${ca.publicLine}"]`].join('\n'),
      accounts: { alice: ['permitOpen: ["127.0.0.1:8081"]'], bob: [] },
      serveEnv: { VESH_WORKER_SCRIPT: HOSTILE },
    });
    await waitFor('the hostile worker to serve', async () => arena.serve.logs.some((r) => r.event === 'broker.worker_serving'), 30_000);
  }, 300_000);

  afterAll(async () => {
    await arena?.cleanup.run();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const logs = () => arena.serve.logs;

  const runAttack = (name: string, args: Record<string, unknown> = {}, timeoutMs?: number): Promise<Step[]> =>
    runAttackFrom(arena.serve.port, ATTACKER, name, args, timeoutMs);

  /** Present `cert` as `user` through the hostile worker; returns its steps and the broker's refusal reason, if any. */
  async function presentCert(cert: Buffer, user: string, forwards: Array<{ host: string; port: number }> = []): Promise<{ steps: Step[]; conn: string; success: boolean; refusal?: string }> {
    const mark = logs().length;
    const steps = await runAttack('cert-login', { user, algo: CERT_ALGO, cert: cert.toString('base64'), privateKey: readFileSync(tenant.file, 'utf8'), forwards });
    const auth = steps.find((s) => s.step === 'auth.publickey');
    if (!auth) throw new Error(`no auth.publickey step: ${JSON.stringify(steps)}`);
    const conn = String(steps.find((s) => s.step === 'conn')?.conn);
    if (auth.success === true) return { steps, conn, success: true };
    // The broker's log lines come over its stdout, which may lag the worker's report.
    const refusal = await arena.serve.waitForLog((r) => logs().indexOf(r) >= mark && r.event === 'auth.certificate_refused' && r.source === ATTACKER, 10_000);
    return { steps, conn, success: false, refusal: String(refusal.reason) };
  }

  /** No login on the attack's connection (another test's connection may still log its own). */
  const expectNoLogin = (conn: string) => expect(logs().some((r) => r.event === 'ssh.login' && r.conn === conn)).toBe(false);

  it('the worker\'s honest path works: a good certificate logs alice in (so the refusals below are the checks\', not the harness\')', async () => {
    const r = await presentCert(certify('good', ['-n', 'alice']), 'alice');
    expect(r.success, JSON.stringify(r.steps)).toBe(true);
  });

  it('refuses a certificate whose CA signature was altered', async () => {
    const good = certify('altered', ['-n', 'alice']);
    const bad = Buffer.from(good);
    bad[bad.length - 3]! ^= 0x40;
    const r = await presentCert(bad, 'alice');
    expect(r.success).toBe(false);
    expect(r.refusal).toBe('the CA signature does not verify');
    expectNoLogin(r.conn);
  });

  it('refuses a certificate whose principals were changed after signing', async () => {
    // Signed for "alicf"; the worker rewrites the principal to "alice".
    const cert = certify('renamed', ['-n', 'alicf']);
    const at = cert.indexOf(Buffer.from('alicf'));
    cert[at + 4] = 'e'.charCodeAt(0);
    const r = await presentCert(cert, 'alice');
    expect(r.success).toBe(false);
    expect(r.refusal).toBe('the CA signature does not verify');
  });

  it('refuses a certificate for another principal: alice\'s certificate presented as bob', async () => {
    const r = await presentCert(certify('alice-only', ['-n', 'alice']), 'bob');
    expect(r.success).toBe(false);
    expect(r.refusal).toBe('no allowed principal among ["alice"]');
    expectNoLogin(r.conn);
  });

  it('refuses a certificate with the CA key swapped for the tenant\'s own key (self-signed)', async () => {
    const good = certify('self', ['-n', 'alice']);
    const { body } = splitCert(good, ca.blob);
    const signed = Buffer.concat([body, str(tenant.blob)]);
    const key = ssh2.utils.parseKey(readFileSync(tenant.file, 'utf8')) as ssh2.ParsedKey;
    const forged = Buffer.concat([signed, str(Buffer.concat([str('ssh-ed25519'), str(key.sign(signed))]))]);
    const r = await presentCert(forged, 'alice');
    expect(r.success).toBe(false);
    expect(r.refusal).toBe('its CA is not trusted for this account');
    expectNoLogin(r.conn);
  });

  it('refuses forward.connect outside permitOpen after a real login, naming the rule, and starts no forward helper for it', async () => {
    const mark = logs().length;
    const r = await presentCert(certify('fwd', ['-n', 'alice']), 'alice', [{ host: '127.0.0.1', port: 22 }, { host: '10.0.0.1', port: 8081 }]);
    expect(r.success, JSON.stringify(r.steps)).toBe(true);
    const forwards = r.steps.filter((s) => s.step === 'forward.connect');
    expect(forwards).toHaveLength(2);
    for (const f of forwards) {
      expect(f.ok).toBe(false);
      expect(String(f.error)).toMatch(/is not allowed by account permitOpen \(127\.0\.0\.1:8081\)/);
    }
    // The broker's log lines come over its stdout, which may lag the worker's report.
    const refusedLines = () => logs().slice(mark).filter((e) => e.event === 'forward.refused');
    await waitFor('both refusals logged', async () => refusedLines().length >= 2, 10_000);
    const refused = refusedLines();
    expect(refused.map((e) => e.rule)).toEqual(['account permitOpen (127.0.0.1:8081)', 'account permitOpen (127.0.0.1:8081)']);
    // Refused before any helper was asked for: nothing ran in the VE for it.
    expect(logs().slice(mark).some((e) => /^forward\.helper/.test(String(e.event)))).toBe(false);
    expect(serverAlive(arena)).toBe(true);
    await arena.expectServes('bob');
  });
});
