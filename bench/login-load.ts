/**
 * A light SSH login load: `total` full logins, `parallel` at a time, from
 * one long-lived process with ssh2's client. Each login is what OpenSSH's
 * `ssh -i KEY user@host true N` does on the wire: TCP connect, key exchange
 * (curve25519-sha256), host key signature checked, public-key
 * authentication (the server checks the client's signature), a session
 * running `true N`, its exit status 0, channel and connection closed.
 *
 * Why beside OpenSSH's client: each `ssh` is a new process (exec, dynamic
 * linking of libcrypto, config, key file) and costs the host ~14 ms of CPU
 * per login, two thirds of everything a login costs on this 2-CPU machine;
 * the servers compared then share what the clients leave, and the figure
 * says more about the clients than about a server's capacity. This load
 * costs ~2 ms per login (1.6–2.6 ms by the bench's --cpu, "clients"; it
 * keys its own crypto once, see parsedKey and verifyHostKeysFromKeyObjects,
 * and turns Nagle off), so the servers' own costs and their use of the
 * host's CPUs show; on a real host the clients are elsewhere. The bench
 * reports both figures.
 *
 * Runs as the bench's child (`vite-node bench/login-load.ts`): one job per
 * line of JSON on stdin, one line of JSON per job on stdout.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createPublicKey, verify, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import ssh2 from 'ssh2';
import type { Connection, ParsedKey } from 'ssh2';
import { hostKeySigner } from '../src/broker/host-key-signer.js';
import { rawX25519KeyExchange } from '../src/ssh/kex-x25519.js';

export interface LoginLoadJob {
  port: number;
  user: string;
  keyFile: string;
  total: number;
  parallel: number;
}

export interface LoginLoadResult {
  /** Logins per second over the whole job (first connect to last close). */
  perSecond: number;
  /** Logins that failed, and the first failure's message. */
  failed: number;
  firstError?: string;
}

function parsedKey(file: string): ParsedKey {
  const parsed = ssh2.utils.parseKey(readFileSync(file));
  if (parsed instanceof Error) throw new Error(`${file}: ${parsed.message}`);
  const key = Array.isArray(parsed) ? parsed[0]! : parsed;
  // Signs from a key object made once: ssh2 signs from the key's PEM text,
  // which OpenSSL decodes anew for every login (a fifth of this client's CPU).
  const sign = hostKeySigner(key);
  (key as unknown as { sign: typeof sign }).sign = sign;
  return key;
}

/**
 * ssh2's client checks the server's host-key signature from the key's PEM
 * text, which OpenSSL decodes anew at every login (13% of this client's
 * CPU); an ed25519 host key is decoded here once per key instead, and the
 * signature is still checked at every login. Other key types go ssh2's way.
 */
let hostKeysFromKeyObjects = false;
function verifyHostKeysFromKeyObjects(anyParsedKey: ParsedKey): void {
  if (hostKeysFromKeyObjects) return;
  hostKeysFromKeyObjects = true;
  // The prototype that holds ssh2's verify(), shared by every parsed key.
  type Verifying = { verify(this: ParsedKey, data: Buffer, signature: Buffer, algo?: string): boolean | Error };
  let proto = Object.getPrototypeOf(anyParsedKey) as Verifying | null;
  while (proto && !Object.hasOwn(proto, 'verify')) proto = Object.getPrototypeOf(proto) as Verifying | null;
  if (!proto) throw new Error('ssh2 parsed keys have no verify() any more: drop verifyHostKeysFromKeyObjects');
  const original = proto.verify;
  const keys = new Map<string, KeyObject>();
  proto.verify = function fastVerify(this: ParsedKey, data, signature, algo) {
    if (this.type !== 'ssh-ed25519') return original.call(this, data, signature, algo);
    const pem = this.getPublicPEM();
    let key = keys.get(pem);
    if (!key) keys.set(pem, (key = createPublicKey(pem)));
    try {
      return verify(null, data, key, signature);
    } catch (err) {
      return err as Error;
    }
  };
}

/** A login not done in this long fails (a hung server, not a slow one: a login takes milliseconds). */
const LOGIN_DEADLINE_MS = 60_000;

/** One login: connect, authenticate, `true n`, exit status 0, close. */
function loginOnce(job: LoginLoadJob, key: ParsedKey, n: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const c = new ssh2.Client();
    let status: number | null = null;
    const fail = (err: Error) => {
      clearTimeout(deadline);
      c.destroy();
      reject(err);
    };
    // A login that hangs fails (and with it the run) instead of holding the bench for good.
    const deadline = setTimeout(() => fail(new Error(`login ${n} did not finish in ${LOGIN_DEADLINE_MS / 1000} s`)), LOGIN_DEADLINE_MS);
    c.on('ready', () => {
      c.exec(`true ${n}`, (err, ch) => {
        if (err) return fail(err);
        ch.on('exit', (code: number | null) => { status = code; });
        ch.on('close', () => c.end());
        ch.resume();
        ch.stderr.resume();
      });
    });
    c.on('error', fail);
    c.on('close', () => {
      clearTimeout(deadline);
      if (status === 0) resolve();
      else reject(new Error(status === null ? 'the connection closed before an exit status' : `exit status ${status}`));
    });
    c.connect({
      host: '127.0.0.1',
      port: job.port,
      username: job.user,
      // The parsed key, handed over as is: no per-login key file parsing.
      authHandler: (_methods, _partial, next) => next({ type: 'publickey', username: job.user, key }),
      algorithms: { kex: ['curve25519-sha256'] },
      readyTimeout: 60_000,
    });
    // Nagle off, as every server here has it: with it on, the key exchange's
    // second small packet (KEXECDH_INIT) waits behind the unacknowledged
    // KEXINIT for the server's delayed ACK, ~40 ms, whenever the server is
    // a little late (measured: the reply's median wait at 8 in flight went
    // from 43.7 ms to 4.9 ms). Idle waits that no server can avoid.
    c.setNoDelay(true);
    // The same X25519 as vesh's server uses (raw keys instead of ssh2's DER):
    // the client's own share of the host's CPU, not the server's.
    rawX25519KeyExchange(c as unknown as Connection);
  });
}

export async function runJob(job: LoginLoadJob): Promise<LoginLoadResult> {
  const key = parsedKey(job.keyFile);
  verifyHostKeysFromKeyObjects(key);
  let next = 0;
  let failed = 0;
  let firstError: string | undefined;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: job.parallel }, async () => {
    while (next < job.total) {
      const n = next++;
      try {
        await loginOnce(job, key, n);
      } catch (err) {
        failed++;
        firstError ??= (err as Error).message;
      }
    }
  }));
  return { perSecond: job.total / ((performance.now() - t0) / 1000), failed, ...(firstError ? { firstError } : {}) };
}

// As the bench's child: jobs in, results out, until stdin closes.
if (process.argv.includes('--login-load-child')) {
  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    const result = await runJob(JSON.parse(line) as LoginLoadJob).catch((err: Error) => ({ perSecond: 0, failed: -1, firstError: err.message }));
    process.stdout.write(`${JSON.stringify(result)}\n`);
  }
}

/** The bench's side: the load process, started once (its start-up is outside every timed run), a job at a time. */
export class LoginLoadChild {
  private readonly child: ChildProcess;
  private readonly lines: AsyncIterator<string>;

  private constructor() {
    // Run as `vite-node bench/login-load.ts -- --login-load-child`, like the bench itself.
    this.child = spawn(process.execPath, [process.argv[1]!, new URL(import.meta.url).pathname, '--', '--login-load-child'], { stdio: ['pipe', 'pipe', 'inherit'] });
    this.lines = createInterface({ input: this.child.stdout! })[Symbol.asyncIterator]();
  }

  static start(): LoginLoadChild {
    return new LoginLoadChild();
  }

  async run(job: LoginLoadJob): Promise<LoginLoadResult> {
    this.child.stdin!.write(`${JSON.stringify(job)}\n`);
    const line = await this.lines.next();
    if (line.done) throw new Error(`the login load process ended (exit ${this.child.exitCode ?? 'unknown'}) before answering`);
    return JSON.parse(line.value) as LoginLoadResult;
  }

  stop(): void {
    this.child.stdin!.end();
    this.child.kill('SIGTERM');
  }
}
