import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { Client } from 'ssh2';
import { makeVeTestEnv, shInVe, type VeTestEnv } from '../helpers/ve-env.js';
import {
  Cleanup, makeClientKey, sshWithKey, startVeshServe, tempDir, writeAccounts, type ClientKey, type RunResult, type ServeProcess,
} from '../helpers/ssh-harness.js';

/**
 * The adversarial suite's kit: a real `vesh serve` with real VEs and two
 * tenants (alice, the attacker, and bob, the victim), plus the means to run
 * an attack inside a VE the way a tenant would — as VE root or as a plain
 * user there — including compiled static attack programs (attacks/*.c) for
 * what the VE's template has no tool for.
 */

const HERE = path.dirname(new URL(import.meta.url).pathname);
const ATTACK_CACHE = '/var/tmp/vesh-attacks';

/**
 * Compile attacks/NAME.c into a static binary (cached by the source's mtime)
 * and return its host path. Static, so it runs in any template.
 */
export function buildAttack(name: string): string {
  const src = path.join(HERE, 'attacks', `${name}.c`);
  mkdirSync(ATTACK_CACHE, { recursive: true, mode: 0o700 });
  const out = path.join(ATTACK_CACHE, name);
  if (!existsSync(out) || statSync(out).mtimeMs < statSync(src).mtimeMs) {
    execFileSync('gcc', ['-static', '-O2', '-Wall', '-o', `${out}.tmp`, src], { stdio: ['ignore', 'inherit', 'inherit'] });
    execFileSync('mv', ['-f', `${out}.tmp`, out]);
  }
  return out;
}

/**
 * Copy a host file into a running VE at `vePath` (mode 0755), written by a
 * process inside the VE from its stdin: the host never opens a path in the
 * VE's tree, as the rules for host code demand of tests too.
 */
export async function putInVe(env: VeTestEnv, ve: string, hostFile: string, vePath: string, mode = '0755'): Promise<void> {
  const cmd = await env.ves.execCommand(ve, {
    argv: ['/bin/sh', '-c', 'cat > "$1" && chmod "$2" "$1"', 'put', vePath, mode], uid: 0, gid: 0, tty: false,
    env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' },
  });
  await new Promise<void>((resolve, reject) => {
    const child = spawn(cmd.file, cmd.args, { stdio: ['pipe', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`copying ${hostFile} into ${ve}:${vePath} failed (${code}): ${err}`))));
    child.stdin.end(readFileSync(hostFile));
  });
}

/** Build attacks/NAME.c and place it in the VE at /usr/local/bin/NAME; returns that path. */
export async function plantAttack(env: VeTestEnv, ve: string, name: string): Promise<string> {
  const vePath = `/usr/local/bin/${name}`;
  await shInVe(env, ve, 'mkdir -p /usr/local/bin');
  await putInVe(env, ve, buildAttack(name), vePath);
  return vePath;
}

export interface Arena {
  env: VeTestEnv;
  serve: ServeProcess;
  cleanup: Cleanup;
  /** Client keys by account name. */
  keys: Record<string, ClientKey>;
  /** `ssh ACCOUNT@127.0.0.1 CMD…` with that account's key (the real OpenSSH client). */
  ssh(account: string, cmd: string[], opts?: { extra?: string[]; input?: string | Buffer; timeoutMs?: number }): Promise<RunResult>;
  /** A script as root inside a VE (through the engine, not SSH). */
  sh(ve: string, script: string, opts?: { allowFailure?: boolean; timeoutMs?: number }): Promise<RunResult>;
  /** The victim still gets served: a fresh login of `account` runs a command and answers. */
  expectServes(account?: string): Promise<void>;
}

/**
 * A vesh instance for one adversarial test file: its own data dir, bridge
 * and subnet (makeVeTestEnv), accounts `alice` (attacker) and `bob` (victim)
 * plus any `extraAccounts` (YAML lines under the accounts file's top level),
 * and `vesh serve` running. Call `arena.cleanup.run()` from afterAll.
 */
export async function makeArena(opts: {
  template?: 'busybox' | 'debian';
  extraYaml?: string;
  runtime?: string;
  /** Account name → extra YAML lines for that account (indented by two spaces). */
  accounts?: Record<string, string[]>;
  /** Extra environment for `vesh serve` (VESH_WORKER_SCRIPT: a hostile stand-in for the SSH worker). */
  serveEnv?: Record<string, string>;
} = {}): Promise<Arena> {
  const cleanup = new Cleanup();
  try {
    const env = await makeVeTestEnv({ template: opts.template ?? 'debian', extraYaml: opts.extraYaml, runtime: opts.runtime });
    cleanup.add(() => env.cleanup());
    const dir = tempDir(cleanup);
    const accounts = opts.accounts ?? { alice: [], bob: [] };
    const keys: Record<string, ClientKey> = {};
    const lines: string[] = [];
    for (const [name, extra] of Object.entries(accounts)) {
      keys[name] = makeClientKey(dir, 'ed25519', name);
      lines.push(`${name}:`, '  keys:', `    - ${keys[name]!.publicLine} ${name}@test`, ...extra.map((l) => `  ${l}`));
    }
    writeAccounts(env.config.accountsFile, `${lines.join('\n')}\n`);
    const serve = await startVeshServe(cleanup, env.configFile, undefined, opts.serveEnv);
    const ssh: Arena['ssh'] = (account, cmd, o = {}) => {
      const key = keys[account];
      if (!key) throw new Error(`no key for account ${account}`);
      return sshWithKey(serve.port, account, key, cmd, { extra: o.extra, input: o.input, timeoutMs: o.timeoutMs ?? 120_000 });
    };
    const sh: Arena['sh'] = async (ve, script, o = {}) => {
      const r = await shInVe(env, ve, script, { allowFailure: o.allowFailure, timeoutMs: o.timeoutMs, shell: '/bin/sh' });
      return { code: r.code, signal: null, stdout: r.stdout, stderr: r.stderr };
    };
    const expectServes: Arena['expectServes'] = async (account = 'bob') => {
      const tag = `alive-${Math.random().toString(36).slice(2, 8)}`;
      const r = await ssh(account, ['echo', tag]);
      if (r.code !== 0 || r.stdout.trim() !== tag) {
        throw new Error(`${account} is no longer served: exit ${String(r.code)}, stdout ${JSON.stringify(r.stdout)}, stderr ${JSON.stringify(r.stderr)}`);
      }
    };
    return { env, serve, cleanup, keys, ssh, sh, expectServes };
  } catch (err) {
    await cleanup.run().catch(() => undefined);
    throw err;
  }
}

/** Whether the `vesh serve` of an arena is still the same live process. */
export function serverAlive(arena: Arena): boolean {
  return arena.serve.child.exitCode === null && arena.serve.child.signalCode === null;
}

/**
 * An ssh2 client logged in as `account` with its key, for requests the
 * OpenSSH client will not send on demand; ended at the arena's cleanup.
 */
export async function ssh2Login(arena: Arena, account: string): Promise<Client> {
  const key = arena.keys[account];
  if (!key) throw new Error(`no key for account ${account}`);
  const c = new Client();
  c.on('error', () => undefined);
  arena.cleanup.add(() => { c.end(); });
  await new Promise<void>((resolve, reject) => {
    c.once('ready', () => resolve());
    c.once('error', reject);
    c.connect({ host: '127.0.0.1', port: arena.serve.port, username: account, privateKey: readFileSync(key.file), readyTimeout: 60_000 });
  });
  return c;
}

/** One report line of the hostile worker stand-in (hostile-worker.mjs). */
export type AttackStep = Record<string, unknown> & { step: string };

/**
 * Connect to the server at `port` from `from` (the attacker's address the
 * stand-in worker recognises), tell the hostile worker to run attack `name`
 * with `args`, and collect its report lines until it hangs up (it finished,
 * or the broker ended it and with it the connection).
 */
export function runAttack(port: number, from: string, name: string, args: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<AttackStep[]> {
  return new Promise((resolve, reject) => {
    const steps: AttackStep[] = [];
    let buf = '';
    const s = net.connect({ host: '127.0.0.1', port, localAddress: from });
    const t = setTimeout(() => { s.destroy(); reject(new Error(`attack ${name}: no end within ${timeoutMs} ms; steps so far: ${JSON.stringify(steps)}`)); }, timeoutMs);
    s.on('connect', () => s.write(`ATTACK ${name} ${JSON.stringify(args)}\n`));
    s.on('data', (d: Buffer) => {
      buf += d.toString();
      const lines = buf.split('\n');
      buf = lines.pop() ?? '';
      for (const l of lines) if (l.trim()) steps.push(JSON.parse(l) as AttackStep);
    });
    s.on('error', () => undefined);
    s.on('close', () => { clearTimeout(t); resolve(steps); });
  });
}
