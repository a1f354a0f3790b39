import { execFileSync } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, type VeTestEnv } from '../helpers/ve-env.js';
import {
  Cleanup, makeClientKey, runProgram, sshBaseArgs, startVeshServe, tempDir, writeAccounts, type ClientKey, type RunResult, type ServeProcess,
} from '../helpers/ssh-harness.js';

/**
 * User certificates with the real OpenSSH client: a test CA signs them with
 * `ssh-keygen -s`, as an admin's CA would. vesh.yaml trusts the CA for any
 * account the certificate names (auth.trustedUserCAKeys); carol's account
 * trusts a team CA for the principal "ops" only (a cert-authority line).
 */
describe('vesh serve: SSH user certificates', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let serve: ServeProcess;
  let dir: string;
  let user: ClientKey;
  let ca: ClientKey;
  let teamCa: ClientKey;
  let rsaCa: ClientKey;
  let revokedFile: string;

  /** ssh-keygen -s CA -I NAME ARGS on a copy of the user's public key; returns the certificate file. */
  const certify = (signer: ClientKey, name: string, args: string[], key: ClientKey = user): string => {
    const pub = path.join(dir, `${name}.pub`);
    copyFileSync(`${key.file}.pub`, pub);
    execFileSync('ssh-keygen', ['-q', '-s', signer.file, '-I', name, ...args, pub], { stdio: ['ignore', 'ignore', 'pipe'] });
    return path.join(dir, `${name}-cert.pub`);
  };

  /** `ssh` offering only this certificate (and its key). */
  const sshCert = (account: string, cert: string, command: string[], extra: string[] = [], key: ClientKey = user): Promise<RunResult> => runProgram('ssh', [
    ...sshBaseArgs(serve.port, extra),
    '-o', 'BatchMode=yes', '-o', 'IdentitiesOnly=yes', '-o', 'PreferredAuthentications=publickey',
    '-i', key.file, '-o', `CertificateFile=${cert}`, `${account}@127.0.0.1`, ...command,
  ], { timeoutMs: 120_000 });

  /** The refusal the broker logged for certificate `keyId` (after `mark`). */
  const refusal = async (keyId: string, mark: number): Promise<string> => {
    const r = await serve.waitForLog((e) => serve.logs.indexOf(e) >= mark && e.event === 'auth.certificate_refused' && e.keyId === keyId);
    return String(r.reason);
  };

  const expectRefused = async (account: string, cert: string, keyId: string): Promise<string> => {
    const mark = serve.logs.length;
    const r = await sshCert(account, cert, ['echo', 'in']);
    expect(r.code, r.stdout).toBe(255);
    expect(r.stdout).not.toContain('in');
    expect(r.stderr).toMatch(/Permission denied/);
    expect(serve.logs.slice(mark).some((e) => e.event === 'ssh.login')).toBe(false);
    return refusal(keyId, mark);
  };

  beforeAll(async () => {
    dir = tempDir(cleanup, 'vesh-certs-');
    user = makeClientKey(dir, 'ed25519', 'user');
    ca = makeClientKey(dir, 'ed25519', 'ca');
    teamCa = makeClientKey(dir, 'ecdsa', 'team-ca');
    rsaCa = makeClientKey(dir, 'rsa', 'rsa-ca');
    revokedFile = path.join(dir, 'revoked.txt');
    writeFileSync(revokedFile, '# revoked certificates\nserial: 666\n');
    env = await makeVeTestEnv({
      template: 'busybox',
      extraYaml: ['auth:', `  trustedUserCAKeys: ["${ca.publicLine}"]`, `  revokedKeys: ${revokedFile}`].join('\n'),
    });
    cleanup.add(() => env.cleanup());
    writeAccounts(env.config.accountsFile, [
      'alice: {}',
      'carol:',
      '  ve: alice',
      '  keys:',
      `    - cert-authority,principals="ops" ${teamCa.publicLine}`,
      'dora:',
      '  ve: alice',
      '  keys:',
      `    - cert-authority ${rsaCa.publicLine}`,
      '',
    ].join('\n'));
    serve = await startVeshServe(cleanup, env.configFile);
  }, 300_000);

  afterAll(() => cleanup.run());

  it('logs in with a certificate of a trusted CA that names the account, and logs its key id, serial and CA', async () => {
    const cert = certify(ca, 'good', ['-n', 'alice', '-z', '5', '-V', '-5m:+1h']);
    const mark = serve.logs.length;
    const r = await sshCert('alice', cert, ['echo', 'hello-cert']);
    expect(r.stdout.trim(), r.stderr).toBe('hello-cert');
    const ok = serve.logs.slice(mark).find((e) => e.event === 'ssh.auth' && e.result === 'success');
    expect(ok, JSON.stringify(ok)).toMatchObject({ algo: 'ssh-ed25519-cert-v01@openssh.com', keyId: 'good', serial: '5', ca: ca.fingerprint, fingerprint: user.fingerprint });
  });

  it('logs in with RSA (SHA-2) and ECDSA certificates, signed by an RSA CA', async () => {
    const rsaUser = makeClientKey(dir, 'rsa', 'rsa-user');
    const ecUser = makeClientKey(dir, 'ecdsa', 'ec-user');
    for (const [name, key] of [['rsa-cert', rsaUser], ['ec-cert', ecUser]] as const) {
      const cert = certify(rsaCa, name, ['-t', 'rsa-sha2-512', '-n', 'dora'], key);
      const mark = serve.logs.length;
      const r = await sshCert('dora', cert, ['echo', name], [], key);
      expect(r.stdout.trim(), r.stderr).toBe(name);
      expect(serve.logs.slice(mark).find((e) => e.event === 'ssh.auth' && e.result === 'success')?.keyId).toBe(name);
    }
  });

  it('refuses an expired certificate and one not valid yet', async () => {
    expect(await expectRefused('alice', certify(ca, 'expired', ['-n', 'alice', '-V', '20200101:20200102']), 'expired')).toMatch(/^expired/);
    expect(await expectRefused('alice', certify(ca, 'future', ['-n', 'alice', '-V', '+1d:+2d']), 'future')).toMatch(/^not valid yet/);
  });

  it('refuses a certificate for another principal', async () => {
    expect(await expectRefused('alice', certify(ca, 'mallory', ['-n', 'mallory']), 'mallory')).toMatch(/no allowed principal among \["mallory"\]/);
  });

  it('refuses a revoked certificate (auth.revokedKeys, read again when edited)', async () => {
    expect(await expectRefused('alice', certify(ca, 'revoked', ['-n', 'alice', '-z', '666']), 'revoked')).toBe('serial 666 is revoked');
    const byId = certify(ca, 'lost-laptop', ['-n', 'alice', '-z', '700']);
    expect((await sshCert('alice', byId, ['echo', 'before'])).stdout.trim()).toBe('before');
    writeFileSync(revokedFile, `${readFileSync(revokedFile, 'utf8')}id: lost-laptop\n`);
    expect(await expectRefused('alice', byId, 'lost-laptop')).toBe('key id "lost-laptop" is revoked');
  });

  it('lets a cert-authority line\'s principals= in, and not the account name or another CA', async () => {
    const ops = certify(teamCa, 'ops', ['-n', 'ops']);
    const r = await sshCert('carol', ops, ['echo', 'carol-in']);
    expect(r.stdout.trim(), r.stderr).toBe('carol-in');
    expect(await expectRefused('carol', certify(teamCa, 'carol-name', ['-n', 'carol']), 'carol-name')).toMatch(/no allowed principal among \["carol"\]/);
    // The team CA is trusted by carol's line only, not for alice.
    expect(await expectRefused('alice', certify(teamCa, 'team-alice', ['-n', 'alice,ops']), 'team-alice')).toBe('its CA is not trusted for this account');
  });

  it('runs the certificate\'s force-command instead of the client\'s, with SSH_ORIGINAL_COMMAND set', async () => {
    const cert = certify(ca, 'forced', ['-n', 'alice', '-O', 'force-command=echo "forced:$SSH_ORIGINAL_COMMAND"']);
    const r = await sshCert('alice', cert, ['echo', 'asked']);
    expect(r.stdout.trim(), r.stderr).toBe('forced:echo asked');
  });

  it('honours source-address: refused from 127.0.0.1, let in from 127.0.0.2', async () => {
    const cert = certify(ca, 'from-two', ['-n', 'alice', '-O', 'source-address=127.0.0.2/32']);
    expect(await expectRefused('alice', cert, 'from-two')).toBe('source-address 127.0.0.2/32 does not allow 127.0.0.1');
    const r = await sshCert('alice', cert, ['echo', 'from-two-in'], ['-o', 'BindAddress=127.0.0.2']);
    expect(r.stdout.trim(), r.stderr).toBe('from-two-in');
  });

  it('gives no terminal to a certificate without permit-pty', async () => {
    const cert = certify(ca, 'no-pty', ['-n', 'alice', '-O', 'no-pty']);
    const mark = serve.logs.length;
    const r = await sshCert('alice', cert, ['true'], ['-tt']);
    expect(r.stderr).toMatch(/PTY allocation request failed/);
    await serve.waitForLog((e) => serve.logs.indexOf(e) >= mark && e.event === 'ssh.pty_refused');
    // OpenSSH closes a -tt session whose pty was refused; the command it
    // sent with it may or may not have started by then, but never on a terminal.
    await serve.waitForLog((e) => serve.logs.indexOf(e) >= mark && e.event === 'ssh.connection_closed');
    const starts = serve.logs.slice(mark).filter((e) => e.event === 'ssh.session_start');
    expect(starts.every((e) => e.pty === false), JSON.stringify(starts)).toBe(true);
  });
});
