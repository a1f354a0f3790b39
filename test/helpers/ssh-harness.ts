import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, promises as fs, readdirSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { spawn as ptySpawn, type IPty } from 'node-pty';
import { pino, type Logger } from 'pino';
import { utils } from 'ssh2';
import { Broker } from '../../src/broker/broker.js';
import { loadOrCreateHostKeys } from '../../src/ssh/host-keys.js';
import type { SshAccount, SshAuthenticator, SshAuthorizedKey, PasswordResult } from '../../src/ssh/ports.js';
import type { VeAccess, VeProcessSpec, VeUserInfo } from '../../src/ve/access.js';
import type { HostCommand } from '../../src/runtime/types.js';
import { forwardHelperPath, forwardRelayPath } from '../../src/system/native-helpers.js';

/**
 * Test harness for the SSH server: temp dirs and client keys, the real
 * OpenSSH client with options that never touch the user's ~/.ssh, an
 * in-process server for unit tests (with fakes) and `vesh serve` as a child
 * process for integration tests (real VEs). Everything it makes is listed in
 * a Cleanup and removed by `cleanup()`, which tests call from afterAll/finally.
 */

const REPO = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..', '..');

export class Cleanup {
  private readonly steps: Array<() => Promise<void> | void> = [];
  private readonly checks: Array<() => void> = [];
  add(step: () => Promise<void> | void): void {
    this.steps.push(step);
  }
  /**
   * A check that runs after every cleanup step (so after the servers
   * stopped and flushed their logs); when one throws, run() rejects once all
   * steps are done, which fails the test file calling it from afterAll.
   */
  addCheck(check: () => void): void {
    this.checks.push(check);
  }
  async run(): Promise<void> {
    while (this.steps.length > 0) {
      const step = this.steps.pop()!;
      try {
        await step();
      } catch { /* keep cleaning */ }
    }
    const failures: unknown[] = [];
    for (const check of this.checks.splice(0)) {
      try {
        check();
      } catch (err) {
        failures.push(err);
      }
    }
    if (failures.length === 1) throw failures[0];
    if (failures.length > 1) throw new AggregateError(failures, failures.map((f) => (f as Error).message).join('\n'));
  }
}

/** Log events by which `vesh serve` says it hit a bug it survived (src/cli/serve.ts): any one fails the test file. */
export const SERVER_BUG_EVENTS: readonly string[] = ['serve.uncaught_exception', 'serve.unhandled_rejection'];

/** The records among `logs` that report a bug in the server, for failing a test file on them. */
export function serverBugRecords(logs: ReadonlyArray<Record<string, unknown>>): Array<Record<string, unknown>> {
  return logs.filter((r) => SERVER_BUG_EVENTS.includes(String(r.event)));
}

export function tempDir(cleanup: Cleanup, prefix = 'vesh-ssh-test-'): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
  cleanup.add(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

export interface ClientKey {
  /** Private key file for `ssh -i`. */
  file: string;
  /** authorized_keys line (without options). */
  publicLine: string;
  type: string;
  blob: Buffer;
  fingerprint: string;
}

/** Make a client key pair with ssh-keygen (the real tool, as a user would). */
export function makeClientKey(dir: string, type: 'ed25519' | 'ecdsa' | 'rsa' = 'ed25519', name = `id_${type}`): ClientKey {
  const file = path.join(dir, name);
  const args = ['-q', '-t', type, '-N', '', '-C', `test-${name}`, '-f', file];
  if (type === 'rsa') args.push('-b', '2048');
  execFileSync('ssh-keygen', args);
  const publicLine = execFileSync('ssh-keygen', ['-y', '-f', file], { encoding: 'utf8' }).trim();
  const fp = execFileSync('ssh-keygen', ['-l', '-E', 'sha256', '-f', `${file}.pub`], { encoding: 'utf8' }).split(' ')[1]!;
  const blob = Buffer.from(publicLine.split(' ')[1]!, 'base64');
  return { file, publicLine, type: publicLine.split(' ')[0]!, blob, fingerprint: fp };
}

/** OpenSSH client options for tests: no agent, no known_hosts, no config, no prompts. */
export function sshBaseArgs(port: number, extra: string[] = []): string[] {
  return [
    '-F', '/dev/null',
    '-o', 'StrictHostKeyChecking=no',
    '-o', 'UserKnownHostsFile=/dev/null',
    '-o', 'LogLevel=ERROR',
    '-o', 'IdentityAgent=none',
    '-o', 'ConnectTimeout=20',
    '-o', 'KexAlgorithms=curve25519-sha256',
    '-p', String(port),
    ...extra,
  ];
}

export function keyAuthArgs(key: ClientKey): string[] {
  return ['-o', 'BatchMode=yes', '-o', 'IdentitiesOnly=yes', '-o', 'PreferredAuthentications=publickey', '-i', key.file];
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Connect to HOST:PORT, half-close, and resolve with everything read (or "ERR:CODE"); gives up after 10 s of silence. */
export function readFrom(port: number, host = '127.0.0.1'): Promise<string> {
  return new Promise((resolve) => {
    const s = net.connect(port, host);
    let out = '';
    s.setTimeout(10_000, () => s.destroy());
    s.on('data', (d: Buffer) => { out += d.toString(); });
    s.on('error', (err: NodeJS.ErrnoException) => resolve(`ERR:${err.code}`));
    s.on('close', () => resolve(out));
    s.end();
  });
}

/** A TCP port on 127.0.0.1 that nothing listens on right now (for ssh -L/-R). */
export async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const p = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return p;
}

/** Run a program to its end with a timeout (killed and reported when it hangs). */
export function runProgram(file: string, args: string[], opts: { input?: string | Buffer; env?: Record<string, string>; timeoutMs?: number; cwd?: string } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { env: opts.env ?? { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir() }, cwd: opts.cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    child.stdin.on('error', () => undefined);
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() });
    });
    child.stdin.end(opts.input ?? '');
  });
}

/** `ssh` with a key. */
export function sshWithKey(port: number, user: string, key: ClientKey, command: string[], opts: { extra?: string[]; input?: string | Buffer; timeoutMs?: number } = {}): Promise<RunResult> {
  return runProgram('ssh', [...sshBaseArgs(port, opts.extra), ...keyAuthArgs(key), `${user}@127.0.0.1`, ...command], { input: opts.input, timeoutMs: opts.timeoutMs });
}

/** `ssh` with a password through sshpass (password or keyboard-interactive, as the client picks). */
export function sshWithPassword(port: number, user: string, password: string, command: string[], opts: { extra?: string[]; method?: 'password' | 'keyboard-interactive'; input?: string; timeoutMs?: number } = {}): Promise<RunResult> {
  const method = opts.method ?? 'password';
  const args = ['-e', 'ssh', ...sshBaseArgs(port, opts.extra), '-o', `PreferredAuthentications=${method}`, '-o', 'PubkeyAuthentication=no', '-o', 'NumberOfPasswordPrompts=1', `${user}@127.0.0.1`, ...command];
  return runProgram('sshpass', args, { input: opts.input, env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir(), SSHPASS: password }, timeoutMs: opts.timeoutMs });
}

/** A pino logger that keeps every record in memory, for asserting on audit events. */
export class LogCapture {
  readonly records: Array<Record<string, unknown>> = [];
  readonly logger: Logger;
  constructor(level = 'debug') {
    const records = this.records;
    const sink = new Writable({
      write(chunk: Buffer, _enc, cb) {
        for (const line of chunk.toString().split('\n')) {
          if (line.trim()) {
            try {
              records.push(JSON.parse(line) as Record<string, unknown>);
            } catch { /* not JSON */ }
          }
        }
        cb();
      },
    });
    this.logger = pino({ level }, sink);
    this.sink = sink;
  }
  /** Where the SSH workers' log lines go (they are separate processes): one JSON line each, split across chunks. */
  readonly sink: Writable;
  private pendingWorkerText = '';
  workerOutput = (chunk: Buffer): void => {
    const text = this.pendingWorkerText + chunk.toString();
    const cut = text.lastIndexOf('\n');
    this.pendingWorkerText = text.slice(cut + 1);
    if (cut >= 0) this.sink.write(text.slice(0, cut + 1));
  };
  events(name: string): Array<Record<string, unknown>> {
    return this.records.filter((r) => r.event === name);
  }
  async waitFor(pred: (r: Record<string, unknown>) => boolean, timeoutMs = 10_000): Promise<Record<string, unknown>> {
    const end = Date.now() + timeoutMs;
    while (Date.now() < end) {
      const r = this.records.find(pred);
      if (r) return r;
      await new Promise((res) => setTimeout(res, 50));
    }
    throw new Error(`no log record matched within ${timeoutMs} ms; last events: ${this.records.slice(-15).map((r) => String(r.event)).join(', ')}`);
  }
}

// ---------------------------------------------------------------- fakes for unit tests

export interface FakeAccount extends SshAccount {
  password?: string;
  keys: Array<SshAuthorizedKey & { blob: Buffer }>;
  locked?: boolean;
}

/** An in-memory authenticator with the real one's contract, for unit tests of the SSH layer. */
export class FakeAuthenticator implements SshAuthenticator<FakeAccount, FakeAccount['keys'][number]> {
  failures = new Map<string, number>();
  penaltyAfter = Infinity;
  constructor(public accounts: Map<string, FakeAccount>) {}
  async verifyPassword(user: string, password: string): Promise<PasswordResult<FakeAccount>> {
    const a = this.accounts.get(user);
    await new Promise((r) => setTimeout(r, 5));
    return a && !a.locked && a.password !== undefined && a.password === password ? { ok: true, account: a } : { ok: false };
  }
  findKey(user: string, _algo: string, blob: Buffer): { account: FakeAccount; key: FakeAccount['keys'][number] } | null {
    const a = this.accounts.get(user);
    if (!a || a.locked) return null;
    const key = a.keys.find((k) => k.blob.equals(blob));
    return key ? { account: a, key } : null;
  }
  verifySignature(key: FakeAccount['keys'][number], data: Buffer, signature: Buffer, hashAlgo?: string): boolean {
    const parsed = utils.parseKey(key.blob);
    if (parsed instanceof Error) return false;
    const k = Array.isArray(parsed) ? parsed[0]! : parsed;
    return k.verify(data, signature, hashAlgo as never) === true;
  }
  penaltyRemaining(source: string): number {
    return (this.failures.get(source) ?? 0) >= this.penaltyAfter ? 60_000 : 0;
  }
  recordFailure(source: string): void {
    this.failures.set(source, (this.failures.get(source) ?? 0) + 1);
  }
  recordSuccess(source: string): void {
    this.failures.delete(source);
  }
}

/**
 * A VeAccess that runs everything on the host, in a scratch directory, with
 * `env -i` so the process sees exactly the environment the server built.
 * For unit tests of SSH parsing and relaying only: the integration tests run
 * against the real VeManager.
 */
export class HostFakeVes implements VeAccess {
  ensureCalls: string[] = [];
  failEnsure: Error | null = null;
  constructor(private readonly home: string) {}
  async ensureRunning(ve: string): Promise<void> {
    this.ensureCalls.push(ve);
    if (this.failEnsure) throw this.failEnsure;
  }
  async lookupUser(_ve: string, user: string): Promise<VeUserInfo> {
    return { name: user, uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, groups: [], home: this.home, shell: '/bin/sh' };
  }
  async processCommand(_ve: string, spec: VeProcessSpec): Promise<HostCommand> {
    const envArgs = Object.entries(spec.env).map(([k, v]) => `${k}=${v}`);
    const cd = spec.cwd ? ['/bin/sh', '-c', 'cd -- "$1" || exit 1; shift; exec "$@"', 'fake-cd', spec.cwd] : [];
    return { file: '/usr/bin/env', args: ['-i', ...envArgs, ...cd, ...spec.argv] };
  }
  /**
   * The real relay and helper programs, run on the host. The relay's "engine"
   * is a shell that starts the helper in the background and exits 0, as
   * `runc exec --detach` does; the helper takes its channel as fd 3 and
   * ignores fd 4.
   */
  async forwardCommand(_ve: string, _user: VeUserInfo): Promise<HostCommand & { program: string }> {
    const program = forwardHelperPath();
    return { file: forwardRelayPath(), args: ['--', '/bin/sh', '-c', '"$0" &', program], program };
  }
}

export interface InProcessServer {
  port: number;
  server: Broker;
  logs: LogCapture;
  hostKeysDir: string;
}

/** Start the SSH server in this process on 127.0.0.1 with a random port. */
export async function startInProcessServer(cleanup: Cleanup, opts: {
  authenticator: SshAuthenticator;
  ves: VeAccess;
  auth?: Partial<{ maxAuthTries: number; loginGraceTimeMs: number; maxStartups: number; maxStartupsPerSource: number }>;
}): Promise<InProcessServer> {
  ensureBuilt();
  const dir = tempDir(cleanup);
  const logs = new LogCapture();
  const hostKeysDir = path.join(dir, 'keys');
  const hostKeys = await loadOrCreateHostKeys(hostKeysDir, logs.logger);
  const server = new Broker({
    config: {
      listen: { host: '127.0.0.1', port: 0 },
      auth: {
        maxAuthTries: opts.auth?.maxAuthTries ?? 6,
        loginGraceTimeMs: opts.auth?.loginGraceTimeMs ?? 30_000,
        maxStartups: opts.auth?.maxStartups ?? 100,
        maxStartupsPerSource: opts.auth?.maxStartupsPerSource ?? 10,
        penalties: { failuresBeforePenalty: 5, penaltyMs: 30_000, maxPenaltyMs: 600_000 },
      },
    },
    authenticator: opts.authenticator,
    ves: opts.ves,
    hostKeys,
    logger: logs.logger,
    workerOutput: logs.workerOutput,
  });
  const { port } = await server.listen();
  cleanup.add(() => server.close(2000));
  return { port, server, logs, hostKeysDir };
}

// ---------------------------------------------------------------- vesh serve as a child process

/**
 * Build dist/ when any source file is newer than its compiled output: the
 * forward helper and `vesh serve` run as separate Node processes from dist.
 */
export function ensureBuilt(): void {
  const newest = (dir: string, ext: string): number => {
    let t = 0;
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) t = Math.max(t, newest(p, ext));
      else if (e.name.endsWith(ext)) t = Math.max(t, statSync(p).mtimeMs);
    }
    return t;
  };
  let built = 0;
  try {
    built = statSync(path.join(REPO, 'dist', 'ssh', 'server.js')).mtimeMs;
  } catch { /* not built */ }
  if (newest(path.join(REPO, 'src'), '.ts') > built) {
    execFileSync(process.execPath, [path.join(REPO, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', path.join(REPO, 'tsconfig.json')], { stdio: 'inherit' });
  }
}

export interface ServeProcess {
  port: number;
  child: ChildProcess;
  /** Every JSON log line `vesh serve` printed so far. */
  logs: Array<Record<string, unknown>>;
  /** Everything it printed that is not a JSON log line (the start-up banner). */
  text: () => string;
  waitForLog(pred: (r: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
  /** SIGTERM and wait for exit; resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Start `vesh serve --config FILE` (listen must say port 0 or a free port) and wait until it listens. */
export async function startVeshServe(cleanup: Cleanup, configFile: string, timeoutMs = 120_000, env: Record<string, string> = {}): Promise<ServeProcess> {
  ensureBuilt();
  const child = spawn(process.execPath, [path.join(REPO, 'bin', 'vesh.js'), '--config', configFile, 'serve'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    // `env`: e.g. VESH_WORKER_SCRIPT, for a test that stands a hostile worker in.
    env: { PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin', HOME: os.tmpdir(), LANG: 'C.UTF-8', ...env },
  });
  const logs: Array<Record<string, unknown>> = [];
  let text = '';
  let pending = '';
  const onData = (d: Buffer) => {
    pending += d.toString();
    const lines = pending.split('\n');
    pending = lines.pop() ?? '';
    for (const l of lines) {
      if (l.startsWith('{')) {
        try {
          logs.push(JSON.parse(l) as Record<string, unknown>);
          continue;
        } catch { /* fall through */ }
      }
      text += `${l}\n`;
    }
  };
  child.stdout!.on('data', onData);
  child.stderr!.on('data', onData);
  let exited: number | null | undefined;
  let stopRequested = false;
  let exitedUnasked = false;
  const exit = new Promise<number | null>((r) => child.on('exit', (code) => {
    exited = code;
    exitedUnasked = !stopRequested;
    r(code);
  }));
  const stop = async (signal: NodeJS.Signals = 'SIGTERM') => {
    stopRequested = true;
    if (exited !== undefined) return exited;
    child.kill(signal);
    const t = setTimeout(() => child.kill('SIGKILL'), 15_000);
    const code = await exit;
    clearTimeout(t);
    return code;
  };
  // After the stop below (steps run last-in first-out): the output pipes
  // drained, so the check sees the server's last log lines.
  const outputClosed = new Promise<void>((r) => child.once('close', () => r()));
  cleanup.add(() => Promise.race([outputClosed, new Promise<void>((r) => setTimeout(r, 5_000).unref())]));
  cleanup.add(() => stop().then(() => undefined));
  // "The server never crashes": serve survives a bug by logging it
  // (uncaughtException), so a passing test could hide one. Every file that
  // runs a server fails on such a record, or on a server that died by itself.
  cleanup.addCheck(() => {
    const bugs = serverBugRecords(logs);
    if (bugs.length > 0) {
      throw new Error(`vesh serve hit ${bugs.length} bug(s) it survived:\n${bugs.map((b) => `${String(b.event)}: ${String(b.err ?? b.msg ?? '')}\n${String(b.stack ?? '')}`).join('\n')}`);
    }
    if (exitedUnasked && exited !== 0) throw new Error(`vesh serve exited by itself (code ${String(exited)}); output:\n${text.slice(-2000)}`);
  });

  const waitForLog = async (pred: (r: Record<string, unknown>) => boolean, ms = 15_000) => {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      const r = logs.find(pred);
      if (r) return r;
      if (exited !== undefined) break;
      await new Promise((res) => setTimeout(res, 50));
    }
    throw new Error(`vesh serve: no log record matched (exited: ${exited}); output:\n${text.slice(-2000)}\nlast events: ${logs.slice(-20).map((r) => `${String(r.event)} ${String(r.msg ?? '')} ${String(r.err ?? '')}`).join('\n')}`);
  };
  const listening = await waitForLog((r) => r.event === 'ssh.listening', timeoutMs);
  return { port: Number(listening.port), child, logs, text: () => text, waitForLog, stop };
}

/** Write an accounts.yaml (text as given) atomically, so the watcher never sees half a file. */
export function writeAccounts(file: string, yaml: string): void {
  const tmp = `${file}.tmp-${process.pid}`;
  writeFileSync(tmp, yaml);
  execFileSync('mv', ['-f', tmp, file]);
}

// ---------------------------------------------------------------- a terminal for the client

/**
 * The OpenSSH client running in a real terminal (node-pty), as a person would
 * run it: what the remote side prints lands in a screen buffer tests wait on,
 * and resizing this terminal makes ssh send window-change.
 */
export class ClientTerminal {
  private buf = '';
  private exited: number | null = null;
  readonly proc: IPty;
  constructor(args: string[], env: Record<string, string> = {}) {
    this.proc = ptySpawn('ssh', args, { name: 'xterm', cols: 80, rows: 24, env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir(), TERM: 'xterm', ...env } });
    this.proc.onData((d) => {
      this.buf += d;
      if (this.buf.length > 1_000_000) this.buf = this.buf.slice(-500_000);
    });
    this.proc.onExit(({ exitCode }) => {
      this.exited = exitCode;
    });
  }
  write(s: string): void {
    this.proc.write(s);
  }
  /** Wait until output since the last match matches `re`; returns the match and moves past it. */
  async expect(re: RegExp, timeoutMs = 30_000): Promise<RegExpExecArray> {
    const end = Date.now() + timeoutMs;
    while (Date.now() < end) {
      const m = re.exec(this.buf);
      if (m) {
        this.buf = this.buf.slice(m.index + m[0].length);
        return m;
      }
      if (this.exited !== null && !re.exec(this.buf)) break;
      await new Promise((r) => setTimeout(r, 30));
    }
    throw new Error(`terminal: timed out waiting for ${re}; exited=${this.exited}; screen tail: ${JSON.stringify(this.buf.slice(-600))}`);
  }
  async waitExit(timeoutMs = 20_000): Promise<number> {
    const end = Date.now() + timeoutMs;
    while (this.exited === null && Date.now() < end) await new Promise((r) => setTimeout(r, 30));
    if (this.exited === null) throw new Error('terminal: ssh did not exit');
    return this.exited;
  }
  kill(): void {
    try {
      this.proc.kill('SIGKILL');
    } catch { /* gone */ }
  }
}
