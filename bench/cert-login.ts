/**
 * What a user certificate costs at login, beside a plain key, in vesh and in
 * OpenSSH's sshd (Debian), measured in one run:
 *  - warm login latency (`ssh host true`, OpenSSH client, curve25519) with a
 *    plain ed25519 key and with an ed25519 certificate of an ed25519 CA, for
 *    vesh (busybox VE, session agent up) and sshd (TrustedUserCAKeys);
 *  - the broker's own CPU per check in-process (Authenticator.findKey as
 *    the query and the signed request each call it, plus the signature
 *    check): it runs on the root broker's one event loop.
 * Rounds interleave the four targets in turned order; printed: the median
 * of the round medians and the spread (min-max) of the round medians.
 *
 *   flock /tmp/vesh-bench.lock npx vite-node bench/cert-login.ts -- [--rounds 5] [--logins 20]
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import ssh2 from 'ssh2';
import { Authenticator } from '../src/auth/authenticator.js';
import { parseAccounts } from '../src/config/accounts.js';
import { makeVeTestEnv } from '../test/helpers/ve-env.js';
import { Cleanup, freePort, startVeshServe, writeAccounts } from '../test/helpers/ssh-harness.js';

const argv = process.argv.slice(2);
const opt = (name: string, dflt: number) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? Number(argv[i + 1]) : dflt;
};
const ROUNDS = opt('rounds', 5);
const LOGINS = opt('logins', 20);

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

interface Target { name: string; port: number; user: string; cert: string | null }

function loginOnce(dir: string, t: Target): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const c = spawn('ssh', [
      '-F', '/dev/null', '-p', String(t.port), '-i', path.join(dir, 'user'), '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes',
      '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR', '-o', 'KexAlgorithms=curve25519-sha256',
      '-o', 'IdentityAgent=none', ...(t.cert ? ['-o', `CertificateFile=${t.cert}`] : []), `${t.user}@127.0.0.1`, 'true',
    ], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr.on('data', (d) => { err += d; });
    c.on('close', (code) => (code === 0 ? resolve(performance.now() - t0) : reject(new Error(`${t.name}: ssh exited ${code}: ${err}`))));
  });
}

const str = (b: Buffer | string) => {
  const buf = Buffer.from(b);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(buf.length);
  return Buffer.concat([len, buf]);
};

/** Broker CPU per login check, in µs: plain key and certificate, interleaved in blocks. */
function brokerCheckCost(dir: string, pub: string, caPub: string, cert: Buffer): { plain: number[]; cert: number[] } {
  const accounts = parseAccounts('accounts.yaml', `alice:\n  keys:\n    - ${pub}\n`);
  const auth = new Authenticator({ get: (n: string) => accounts.get(n) }, {
    penalties: { failuresBeforePenalty: 10, sourceFailuresBeforePenalty: 20, penaltyMs: 1000, maxPenaltyMs: 1000 },
    trustedUserCAKeys: { lines: [caPub] },
  } as never, pino({ level: 'silent' }));
  const key = ssh2.utils.parseKey(readFileSync(path.join(dir, 'user'), 'utf8')) as ssh2.ParsedKey;
  const data = Buffer.from('session id and userauth request, about this long');
  const rawSig = key.sign(data);
  const wireSig = Buffer.concat([str('ssh-ed25519'), str(rawSig)]);
  const blob = Buffer.from(pub.split(' ')[1]!, 'base64');
  const algo = 'ssh-ed25519-cert-v01@openssh.com';
  const once = {
    plain: () => {
      auth.findKey('alice', 'ssh-ed25519', blob, '127.0.0.1');
      const f = auth.findKey('alice', 'ssh-ed25519', blob, '127.0.0.1')!;
      if (!auth.verifySignature(f.key, data, rawSig)) throw new Error('plain check failed');
    },
    cert: () => {
      auth.findKey('alice', algo, cert, '127.0.0.1');
      const f = auth.findKey('alice', algo, cert, '127.0.0.1')!;
      if (!auth.verifySignature(f.key, data, wireSig)) throw new Error('certificate check failed');
    },
  };
  const out = { plain: [] as number[], cert: [] as number[] };
  for (let r = 0; r < 20; r++) {
    for (const k of (r % 2 ? ['cert', 'plain'] : ['plain', 'cert']) as Array<'plain' | 'cert'>) {
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < 200; i++) once[k]();
      out[k].push(Number(process.hrtime.bigint() - t0) / 1000 / 200);
    }
  }
  return out;
}

async function main(): Promise<void> {
  const cleanup = new Cleanup();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'vesh-bench-cert-'));
  cleanup.add(() => rmSync(dir, { recursive: true, force: true }));
  const children: ChildProcess[] = [];
  cleanup.add(() => { for (const c of children) c.kill('SIGTERM'); });
  try {
    for (const k of ['user', 'ca', 'host']) execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, k)]);
    execFileSync('ssh-keygen', ['-q', '-s', path.join(dir, 'ca'), '-I', 'bench', '-n', 'alice,root', path.join(dir, 'user.pub')], { stdio: 'ignore' });
    // ssh-keygen wrote user-cert.pub; the client would load it for plain runs too, so it moves.
    execFileSync('mv', [path.join(dir, 'user-cert.pub'), path.join(dir, 'cert.pub')]);
    const pub = readFileSync(path.join(dir, 'user.pub'), 'utf8').trim();
    const caPub = readFileSync(path.join(dir, 'ca.pub'), 'utf8').trim();
    const certFile = path.join(dir, 'cert.pub');
    const certBlob = Buffer.from(readFileSync(certFile, 'utf8').split(' ')[1]!, 'base64');

    const env = await makeVeTestEnv({ template: 'busybox', extraYaml: `auth:\n  trustedUserCAKeys: ["${caPub}"]` });
    cleanup.add(() => env.cleanup());
    writeAccounts(env.config.accountsFile, `alice:\n  keys:\n    - ${pub}\n`);
    const serve = await startVeshServe(cleanup, env.configFile);

    const pSshd = await freePort();
    mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });
    writeFileSync(path.join(dir, 'authorized_keys'), `${pub}\n`, { mode: 0o600 });
    writeFileSync(path.join(dir, 'sshd_config'), [
      `Port ${pSshd}`, 'ListenAddress 127.0.0.1', `HostKey ${dir}/host`, `PidFile ${dir}/sshd.pid`,
      `AuthorizedKeysFile ${dir}/authorized_keys`, `TrustedUserCAKeys ${dir}/ca.pub`, 'StrictModes no', 'UsePAM no',
      'PermitRootLogin prohibit-password', 'PasswordAuthentication no', 'KbdInteractiveAuthentication no',
      'KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org', 'PrintMotd no', 'UseDNS no', '',
    ].join('\n'));
    const sshd = spawn('/usr/sbin/sshd', ['-D', '-e', '-f', path.join(dir, 'sshd_config')], { stdio: ['ignore', 'ignore', 'ignore'] });
    children.push(sshd);

    const targets: Target[] = [
      { name: 'vesh key', port: serve.port, user: 'alice', cert: null },
      { name: 'vesh cert', port: serve.port, user: 'alice', cert: certFile },
      { name: 'sshd key', port: pSshd, user: 'root', cert: null },
      { name: 'sshd cert', port: pSshd, user: 'root', cert: certFile },
    ];
    // Warm-up: the VE boots at its first login; its session agent comes with the second.
    for (let i = 0; i < 3; i++) for (const t of targets) await loginOnce(dir, t).catch(async (err: Error) => {
      await new Promise((r) => setTimeout(r, 500));
      if (i === 2) throw err;
    });
    await new Promise((r) => setTimeout(r, 2000));
    const rounds = Object.fromEntries(targets.map((t) => [t.name, [] as number[]]));
    for (let r = 0; r < ROUNDS; r++) {
      const order = targets.map((_, i) => targets[(i + r) % targets.length]!);
      for (const t of order) {
        const xs: number[] = [];
        for (let i = 0; i < LOGINS; i++) xs.push(await loginOnce(dir, t));
        rounds[t.name]!.push(median(xs));
      }
    }
    const micro = brokerCheckCost(dir, pub, caPub, certBlob);
    const line = (name: string, xs: number[], unit: string) => console.log(`${name.padEnd(34)} median ${median(xs).toFixed(2)} ${unit}  (round medians ${Math.min(...xs).toFixed(2)}-${Math.max(...xs).toFixed(2)})`);
    console.log(`cert-login: ${ROUNDS} rounds x ${LOGINS} warm logins per target, ed25519 key / ed25519 cert of an ed25519 CA (${new Date().toISOString()}, load ${os.loadavg()[0]!.toFixed(2)})`);
    for (const t of targets) line(`login ${t.name}`, rounds[t.name]!, 'ms');
    line('broker check, plain key', micro.plain, 'µs');
    line('broker check, certificate', micro.cert, 'µs');
  } finally {
    await cleanup.run();
  }
}

await main();
