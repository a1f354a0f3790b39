/**
 * vesh beside OpenSSH's sshd (Debian), a bare ssh2 server and, optionally,
 * another build of vesh (--baseline-tree: the code before a change, e.g.
 * the single-process server before privilege separation), in one run, with
 * the same OpenSSH client, key and key exchange (curve25519-sha256):
 *   - login + `true` latency p50/p95, warm VE (running, in use: its session
 *     agent is up), and once at the end cold VE (stopped: boot on demand,
 *     the session goes through `runc exec`);
 *   - logins per second with 8 clients in parallel, made two ways: OpenSSH
 *     `ssh` processes started by `xargs -P 8`, and 8 connections at a time
 *     from one light ssh2 client process (login-load.ts), whose CPU per
 *     login is a third of ssh's, so that the servers' own costs show;
 *   - SFTP upload and download of one file (1 GiB by default) in MB/s, the
 *     download written to /dev/null by the client.
 * Before the first round every target gets untimed warm-up logins and one
 * warm-up transfer each way: servers measured as they run after a while.
 * Every figure is taken in --rounds rounds, each round one measurement per
 * target in turn (the order rotating), so that a slow spell of the machine
 * falls on all of them; the report gives the median of the per-round
 * figures, their spread, and the ratios round by round with the worst one.
 * sshd runs with its own port, config and host key; the bare ssh2 server
 * runs in this process and spawns `true` on the host (no VE): the floor for
 * any ssh2-based server. The baseline vesh gets its own data dir, port,
 * bridge and VE, like the main one.
 *
 *   npx vite-node bench/ssh-vs-sshd.ts -- [--rounds 3] [--logins 30] [--parallel-logins 200] [--warmup-logins 200] [--spawn-from-bench] [--login-clients openssh,ssh2]
 *     [--baseline-tree DIR] [--workers N] [--sftp-mib 1024] [--sftp-rounds N] [--sftp-only | --logins-only]
 *     [--ve-memory 1G] [--ve-read-ahead-kb KB[,KB…]] [--cipher NAME] [--cpu] [--json]
 *
 * --baseline-tree DIR: a built checkout of another commit, e.g.
 *   git worktree add /var/tmp/vesh-baseline 3f64454 && ln -s $PWD/node_modules /var/tmp/vesh-baseline/ &&
 *   (cd /var/tmp/vesh-baseline && ./node_modules/.bin/tsc -p tsconfig.json && sh scripts/build-native.sh)
 * --workers N: vesh's workers.count (default: the config's default, one per CPU).
 * --cpu: CPU seconds per process during each SFTP transfer and each logins/s
 *   run (client ssh, worker, broker, sftp-server, sshd…) and how busy the
 *   host's CPUs were, read from /proc every 100 ms by this process, which
 *   also hosts the bare ssh2 server: its own figures are then a little low.
 *   Where cgroup v1 cpuacct is there (this host), also CPU per login of
 *   every process, short-lived clients included, by group: clients, this
 *   process, server tree, VE, rest of the host (login-cpu.ts), and the
 *   logins/s those costs allow.
 *
 * Not a test: shared, noisy machines; read the figures side by side.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, closeSync, existsSync, mkdirSync, mkdtempSync, openSync, promises as fs, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import ssh2 from 'ssh2';
import { loadServerConfig } from '../src/config/server-config.js';
import { ackShortRead, socketFd } from '../src/system/fdpass.js';
import { makeLayout } from '../src/system/layout.js';
import { removeInstance } from '../test/helpers/ve-env.js';
import { sharedTemplate } from '../test/helpers/templates.js';
import { pct, median, sleep, freePort, waitForPort, spread, sampleProcessCpu, hostCpuTicks, busyShare, type ProcessCpu } from './lib.js';
import { LoginCpuGroups, formatLoginCpu, loginCeiling, type LoginCpu } from './login-cpu.js';
import { LoginLoadChild } from './login-load.js';

const { values: args } = parseArgs({
  options: {
    rounds: { type: 'string', default: '3' },
    logins: { type: 'string', default: '30' },
    'parallel-logins': { type: 'string', default: '200' },
    // Untimed logins (8 at a time) per target before the first round: every
    // server measured as it runs after a while (JIT-compiled, caches warm),
    // not in its first second. 1000 since 2026-12-04 17:30: after 200, vesh
    // (a broker and two workers, each worker JIT-compiling its own ~100
    // logins) still took 4.8-5.0 ms of server CPU per login in round 1 and
    // 3.6-4.0 in later rounds (17:07, 17:21); after 1000, 4.1 and 3.2-3.7.
    // The single-process baseline's round 1 was no slower than its others.
    'warmup-logins': { type: 'string', default: '1000' },
    // Fork each parallel login's client from this process, as before 2026-12-03 17:00.
    'spawn-from-bench': { type: 'boolean', default: false },
    // Who makes the logins/s load: OpenSSH's ssh (a process per login) and/or
    // a light ssh2 client in one process (login-load.ts); both by default.
    'login-clients': { type: 'string', default: 'openssh,ssh2' },
    'baseline-tree': { type: 'string' },
    workers: { type: 'string' },
    'sftp-mib': { type: 'string', default: '1024' },
    // Default: --rounds.
    'sftp-rounds': { type: 'string' },
    // Skip the login figures (for looking at SFTP alone), or SFTP.
    'sftp-only': { type: 'boolean', default: false },
    'logins-only': { type: 'boolean', default: false },
    // The VE's memory limit; its page cache counts against it, so whether the
    // transferred file stays cached (as it does for sshd) depends on it.
    // Default: the SFTP file plus 1 GiB, so that the file stays in the VE's
    // page cache between upload and download as it stays in the host's for
    // sshd (with less, vesh's download reads the VE's disk and sshd's RAM;
    // bench/README.md has figures of both).
    've-memory': { type: 'string' },
    // The client's cipher for every target (default: the client's own choice,
    // chacha20-poly1305 for OpenSSH 9.2).
    cipher: { type: 'string' },
    // Read-ahead (KiB) of the warm VE's disk (its loop device) for vesh's
    // transfers, a comma list taken in turn round by round (round r uses
    // item r mod n): two settings compared against the same sshd rounds.
    // Default: what vesh set when it attached the disk.
    've-read-ahead-kb': { type: 'string' },
    cpu: { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
  },
  allowPositionals: true,
});
const ROUNDS = Math.max(1, Number(args.rounds));
const LOGINS = Number(args.logins);
const PAR_LOGINS = Number(args['parallel-logins']);
const WARMUP_LOGINS = Number(args['warmup-logins']);
const SFTP_MIB = Number(args['sftp-mib']);
const VE_MEMORY = args['ve-memory'] ?? `${SFTP_MIB + 1024}M`;
const SFTP_ROUNDS = Math.max(1, Number(args['sftp-rounds'] ?? ROUNDS));
const SFTP_ONLY = args['sftp-only'];
const LOGINS_ONLY = args['logins-only'];
const WORKERS = args.workers === undefined ? null : Number(args.workers);
const LOGIN_CLIENTS = new Set(args['login-clients'].split(',').map((c) => c.trim()));
if (![...LOGIN_CLIENTS].every((c) => c === 'openssh' || c === 'ssh2') || LOGIN_CLIENTS.size === 0) {
  throw new Error(`--login-clients ${args['login-clients']}: openssh, ssh2 or both (comma between)`);
}
const REPO = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const BASELINE = args['baseline-tree'] ? path.resolve(args['baseline-tree']) : null;
const VE_READ_AHEAD = args['ve-read-ahead-kb']?.split(',').map(Number) ?? [];
if (VE_READ_AHEAD.some((x) => !(Number.isInteger(x) && x >= 0))) throw new Error(`--ve-read-ahead-kb ${args['ve-read-ahead-kb']}: KiB, a whole number or a comma list of them`);
if (SFTP_ONLY && LOGINS_ONLY) throw new Error('--sftp-only and --logins-only leave nothing to measure');
if (WORKERS !== null && !(Number.isInteger(WORKERS) && WORKERS >= 0)) throw new Error(`--workers ${args.workers}: a whole number of workers (0 = one per CPU)`);
if (BASELINE && !existsSync(path.join(BASELINE, 'dist', 'cli'))) {
  throw new Error(`--baseline-tree ${BASELINE}: no dist/cli there; build that checkout first (tsc -p tsconfig.json && sh scripts/build-native.sh)`);
}

type Key = 'vesh' | 'baseline' | 'sshd' | 'bare';
interface Target { key: Key; name: string; port: number; user: string; remoteDir: string }

function sshArgs(dir: string, t: Target): string[] {
  return [
    '-p', String(t.port), '-i', path.join(dir, 'id_ed25519'), '-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=no',
    '-o', `UserKnownHostsFile=/dev/null`, '-o', 'LogLevel=ERROR', '-o', 'KexAlgorithms=curve25519-sha256',
    '-o', 'ControlMaster=no', '-o', 'ControlPath=none', '-F', '/dev/null',
    ...(args.cipher ? ['-o', `Ciphers=${args.cipher}`] : []),
  ];
}

function loginOnce(dir: string, t: Target): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const c = spawn('ssh', [...sshArgs(dir, t), `${t.user}@127.0.0.1`, 'true'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr.on('data', (d) => { err += d; });
    c.on('close', (code) => (code === 0 ? resolve(performance.now() - t0) : reject(new Error(`${t.name}: ssh exited ${code}: ${err}`))));
  });
}

async function loginLatency(dir: string, t: Target, n: number, before?: () => void): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    before?.();
    out.push(await loginOnce(dir, t));
  }
  return out;
}

/** Until sessions in the warm VE are started by its session agent (their parent is vesh-agent). */
async function waitForAgent(dir: string, t: Target): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const r = spawnSync('ssh', [...sshArgs(dir, t), `${t.user}@127.0.0.1`, 'cat /proc/$PPID/comm 2>/dev/null'], { encoding: 'utf8' });
    if (r.stdout.trim() === 'vesh-agent') return;
    await sleep(200);
  }
  throw new Error(`${t.name}: the warm VE has no session agent after 20 s: is dist/vesh-session built (npm run build)?`);
}

/**
 * `total` logins (`ssh … true`), `parallel` at a time, as logins per second.
 * The clients are started by one `xargs -P` (a small process) rather than
 * forked one by one from this process: a fork of this 150–250 MB Node
 * process cost each login 3–4 ms more in the client and 2.6–4.4 ms more in
 * this process (cpuacct, 16:45 run in bench/README.md), the same for every
 * target, which on 2 CPUs is CPU the servers being compared never get.
 * --spawn-from-bench restores the old way, to compare with earlier figures.
 */
async function loginsPerSecond(dir: string, t: Target, total: number, parallel = 8): Promise<number> {
  const t0 = performance.now();
  if (args['spawn-from-bench']) {
    let next = 0;
    await Promise.all(Array.from({ length: parallel }, async () => {
      while (next < total) {
        next++;
        await loginOnce(dir, t);
      }
    }));
  } else {
    // xargs appends one number per login: the remote command is `true N`.
    await new Promise<void>((resolve, reject) => {
      const x = spawn('xargs', ['-P', String(parallel), '-n', '1', 'ssh', ...sshArgs(dir, t), `${t.user}@127.0.0.1`, 'true'], { stdio: ['pipe', 'ignore', 'pipe'] });
      let err = '';
      x.stderr.on('data', (d) => { err += d; });
      x.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`${t.name}: a login of the parallel run failed (xargs exited ${code}): ${err.slice(0, 2000)}`))));
      x.stdin.end(Array.from({ length: total }, (_, i) => String(i)).join('\n') + '\n');
    });
  }
  return total / ((performance.now() - t0) / 1000);
}

/** Async on purpose: the bare ssh2 server runs in this process and must keep serving meanwhile. */
function sftpTransfer(dir: string, t: Target, batch: string): Promise<number> {
  const file = path.join(dir, 'batch');
  writeFileSync(file, batch);
  const opts = sshArgs(dir, t).slice(4); // without -p PORT -i KEY: sftp spells the port -P
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const c = spawn('sftp', ['-P', String(t.port), '-i', path.join(dir, 'id_ed25519'), ...opts, '-b', file, `${t.user}@127.0.0.1`], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr.on('data', (d) => { err += d; });
    c.on('close', (code) => (code === 0 ? resolve(performance.now() - t0) : reject(new Error(`${t.name}: sftp exited ${code}: ${err}`))));
  });
}

/** A bare ssh2 server: any login with our key, `exec` spawns the command on the host. */
function startBareSsh2(dir: string, port: number): Promise<net.Server> {
  const hostKey = readFileSync(path.join(dir, 'bare_host_key'));
  const server = new ssh2.Server({ hostKeys: [hostKey], algorithms: { kex: ['curve25519-sha256', 'curve25519-sha256@libssh.org'] } }, (client) => {
    client.on('error', () => undefined);
    client.on('authentication', (ctx) => (ctx.method === 'publickey' ? ctx.accept() : ctx.reject(['publickey'])));
    client.on('session', (accept) => {
      const session = accept();
      session.on('exec', (acc, _rej, info) => {
        const ch = acc();
        const p = spawn('/bin/sh', ['-c', info.command], { stdio: ['pipe', 'pipe', 'pipe'] });
        p.stdout.pipe(ch, { end: false });
        p.stderr.pipe(ch.stderr);
        ch.pipe(p.stdin);
        p.on('close', (code) => { ch.exit(code ?? 1); ch.end(); });
      });
      session.on('subsystem', (acc, rej, info) => {
        if (info.name !== 'sftp') return rej();
        const ch = acc();
        const p = spawn('/usr/lib/openssh/sftp-server', [], { stdio: ['pipe', 'pipe', 'inherit'] });
        p.stdout.pipe(ch);
        ch.pipe(p.stdin);
        p.on('close', () => ch.end());
      });
    });
  });
  // Sockets accepted here with Nagle off and handed over, and short reads
  // ACKed at once, as vesh's workers do: the same footing (without the quick
  // ACK, OpenSSH's `ssh` waited ~40 ms on the delayed ACK in about half of
  // the logins, and this floor was 60 ms in such rounds).
  const tcp = net.createServer((sock) => {
    sock.setNoDelay(true);
    const fd = socketFd(sock);
    server.injectSocket(sock);
    if (fd !== null) sock.prependListener('data', (d: Buffer) => ackShortRead(fd, d.length));
  });
  return new Promise((r) => tcp.listen(port, '127.0.0.1', () => r(tcp)));
}

/** Where the CPU of one transfer went: seconds per process kind, named by the tree it belongs to. */
function cpuByRole(procs: ProcessCpu[], roots: Array<[number, string]>): Record<string, number> {
  const byPid = new Map(procs.map((p) => [p.pid, p]));
  const rootOf = (pid: number): string | null => {
    for (let p = pid, hops = 0; p > 1 && hops < 64; hops++) {
      const r = roots.find(([rp]) => rp === p);
      if (r) return r[1];
      p = byPid.get(p)?.ppid ?? 0;
    }
    return null;
  };
  const out: Record<string, number> = {};
  for (const p of procs) {
    if (p.cpuS < 0.02) continue;
    const root = rootOf(p.pid);
    // The roots' own pids: vesh serve (the broker, or the whole server before the split), sshd's listener.
    const own = roots.find(([rp]) => rp === p.pid);
    const comm = p.comm.startsWith('kworker/') ? 'kernel workers' : p.comm;
    const label = p.pid === process.pid ? 'bench (bare ssh2)' : own ? `${own[1]} serve` : root === 'bench' ? `client ${comm}` : root ? `${root} ${comm}` : comm;
    out[label] = (out[label] ?? 0) + p.cpuS;
  }
  return Object.fromEntries(Object.entries(out).sort((a, b) => b[1] - a[1]).slice(0, 8).map(([k, v]) => [k, Number(v.toFixed(2))]));
}

/** vesh's config file and accounts for one instance (its own data dir, port, bridge, subnet). */
/**
 * The Debian test template as `tree`'s own code builds and names it: the
 * template format moves with the code (VE id ranges, shifted or not), and
 * an older build refuses a newer one. The current tree's is ours.
 */
async function templateFor(tree: string): Promise<string> {
  if (tree === REPO) return (await sharedTemplate('debian')).dir;
  const theirs = (await import(path.join(tree, 'test/helpers/templates.ts'))) as { sharedTemplate: typeof sharedTemplate };
  return (await theirs.sharedTemplate('debian')).dir;
}

async function writeVeshInstance(dir: string, o: { tree: string; port: number; bridge: string; subnet: string; pub: string; accounts: string[]; workers: number | null }): Promise<string> {
  const data = path.join(dir, 'data');
  mkdirSync(path.join(data, 'templates'), { recursive: true });
  await fs.symlink(await templateFor(o.tree), path.join(data, 'templates', 'debian'));
  writeFileSync(path.join(dir, 'vesh.yaml'), [
    `listen: "127.0.0.1:${o.port}"`, `dataDir: ${data}`, `hostKeysDir: ${dir}/keys`, `accountsFile: ${dir}/accounts.yaml`,
    `defaults: { template: debian, limits: { memory: ${VE_MEMORY}, pids: 512, cpus: 2, disk: ${Math.ceil((SFTP_MIB * 2.2) / 1024) + 1}G } }`,
    `network: { bridge: ${o.bridge}, subnet: ${o.subnet}, outbound: false }`,
    `logging: { level: warn, pretty: false }`,
    // Every login comes from 127.0.0.1: the per-source admission limits
    // (20 connections a second, 10 unauthenticated) are lifted as sshd's
    // MaxStartups is below, so that they are not what is measured.
    `auth: { maxStartupsPerSource: 100, maxConnectionRatePerSource: 10000 }`,
    ...(o.workers === null ? [] : [`workers: { count: ${o.workers} }`]),
  ].join('\n'));
  writeFileSync(path.join(dir, 'accounts.yaml'), o.accounts.map((a) => `${a}:\n  keys:\n    - ${o.pub}\n`).join(''));
  return path.join(dir, 'vesh.yaml');
}

/** The same list turned by `r` places: round r starts with a different target. */
const rotate = <T>(xs: T[], r: number): T[] => xs.map((_, i) => xs[(i + r) % xs.length]!);

async function main(): Promise<void> {
  const dir = mkdtempSync('/var/tmp/vesh-bench-ssh-');
  chmodSync(dir, 0o711);
  const children: ChildProcess[] = [];
  const configs: string[] = [];
  let bare: net.Server | null = null;
  let lightLoad: LoginLoadChild | null = null;
  // --cpu: every process's CPU per login, clients included (login-cpu.ts).
  let cpuGroups: LoginCpuGroups | null = null;
  // Ctrl-C or a timeout still removes the VEs, bridges and files this run made.
  const onSignal = () => {
    void cleanupAll().finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  let cleaned = false;
  const cleanupAll = async () => {
    if (cleaned) return;
    cleaned = true;
    bare?.close();
    lightLoad?.stop();
    for (const c of children) c.kill('SIGTERM');
    await sleep(1000);
    // vesh serve leaves VEs running by design: remove what the bench's instances made.
    for (const configFile of configs) {
      if (existsSync(configFile)) await removeInstance(loadServerConfig(configFile)).catch((err: Error) => console.error(`cleanup of ${configFile}: ${err.message}`));
    }
    await fs.rm(dir, { recursive: true, force: true });
    const left = cpuGroups?.remove() ?? [];
    if (left.length) console.error(`cgroups left with processes in them (rmdir them later): ${left.join(' ')}`);
  };
  try {
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'id_ed25519')]);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'sshd_host_key')]);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-m', 'PEM', '-f', path.join(dir, 'bare_host_key')]);
    const pub = readFileSync(path.join(dir, 'id_ed25519.pub'), 'utf8').trim();
    const [pVesh, pBase, pSshd, pBare] = [await freePort(), await freePort(), await freePort(), await freePort()];
    const id = process.pid % 10000;

    // ---- vesh serve (this tree), Debian template (the shared cache the tests use), disk big enough for the SFTP file
    const veshConfig = await writeVeshInstance(path.join(dir, 'vesh'), { tree: REPO, port: pVesh, bridge: `vbs${id}`, subnet: `10.239.${process.pid % 250}.0/24`, pub, accounts: ['warm', 'cold'], workers: WORKERS });
    configs.push(veshConfig);
    cpuGroups = args.cpu ? LoginCpuGroups.create() : null;
    // Its log (warnings up) goes to a file, shown if the run fails.
    const serveLog = openSync(path.join(dir, 'vesh-serve.log'), 'a');
    const serve = spawn(process.execPath, [path.join(REPO, 'bin/vesh.js'), '--config', veshConfig, 'serve'], { stdio: ['ignore', serveLog, 'inherit'] });
    closeSync(serveLog);
    children.push(serve);
    cpuGroups?.server('vesh', serve.pid!);
    cpuGroups?.ve('vesh', `${makeLayout(loadServerConfig(veshConfig).dataDir).cgroupParent}/warm`);
    const vesh = (...a: string[]) => execFileSync(process.execPath, [path.join(REPO, 'bin/vesh.js'), '--config', veshConfig, ...a], { encoding: 'utf8' });

    // ---- the baseline build of vesh: its own everything, its own code
    let baseServe: ChildProcess | null = null;
    let baseLabel = '';
    if (BASELINE) {
      const baseConfig = await writeVeshInstance(path.join(dir, 'baseline'), { tree: BASELINE, port: pBase, bridge: `vbb${id}`, subnet: `10.238.${process.pid % 250}.0/24`, pub, accounts: ['warm'], workers: null });
      configs.push(baseConfig);
      baseServe = spawn(process.execPath, [path.join(BASELINE, 'bin/vesh.js'), '--config', baseConfig, 'serve'], { stdio: ['ignore', 'ignore', 'inherit'] });
      children.push(baseServe);
      cpuGroups?.server('baseline', baseServe.pid!);
      // 3f64454 names its VEs' cgroups as this tree does.
      cpuGroups?.ve('baseline', `${makeLayout(loadServerConfig(baseConfig).dataDir).cgroupParent}/warm`);
      baseLabel = execFileSync('git', ['-C', BASELINE, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim();
      await waitForPort(pBase);
    }
    await waitForPort(pVesh);

    // ---- OpenSSH sshd, its own port, config and host key
    mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });
    mkdirSync(path.join(dir, 'sshd-home'), { mode: 0o700 });
    writeFileSync(path.join(dir, 'authorized_keys'), `${pub}\n`, { mode: 0o600 });
    writeFileSync(path.join(dir, 'sshd_config'), [
      `Port ${pSshd}`, 'ListenAddress 127.0.0.1', `HostKey ${dir}/sshd_host_key`, `PidFile ${dir}/sshd.pid`,
      `AuthorizedKeysFile ${dir}/authorized_keys`, 'StrictModes no', 'UsePAM no', 'PermitRootLogin prohibit-password',
      'PasswordAuthentication no', 'KbdInteractiveAuthentication no', 'KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org',
      'Subsystem sftp /usr/lib/openssh/sftp-server', 'MaxStartups 100', 'PrintMotd no', 'UseDNS no', '',
    ].join('\n'));
    const sshd = spawn('/usr/sbin/sshd', ['-D', '-e', '-f', path.join(dir, 'sshd_config')], { stdio: ['ignore', 'ignore', 'ignore'] });
    children.push(sshd);
    cpuGroups?.server('sshd', sshd.pid!);
    await waitForPort(pSshd);

    bare = await startBareSsh2(dir, pBare);

    const targets: Partial<Record<Key, Target>> = {
      vesh: { key: 'vesh', name: 'vesh', port: pVesh, user: 'warm', remoteDir: '/root' },
      ...(BASELINE ? { baseline: { key: 'baseline' as const, name: `vesh ${baseLabel}`, port: pBase, user: 'warm', remoteDir: '/root' } } : {}),
      sshd: { key: 'sshd', name: 'OpenSSH sshd', port: pSshd, user: 'root', remoteDir: path.join(dir, 'sshd-home') },
      bare: { key: 'bare', name: 'bare ssh2 (host)', port: pBare, user: 'root', remoteDir: path.join(dir, 'sshd-home') },
    };
    const keys = Object.keys(targets) as Key[];
    // Warm up: the VE's first login creates and boots it; its session agent
    // starts a second later (session-agents.ts), as on any VE in use.
    for (const t of Object.values(targets)) await loginOnce(dir, t);
    await waitForAgent(dir, targets.vesh!);
    if (targets.baseline) await waitForAgent(dir, targets.baseline);

    // Per round and target: warm login p50/p95 and logins/s with 8 clients.
    const loginRounds = Object.fromEntries(keys.map((k) => [k, { p50: [] as number[], p95: [] as number[], lps: [] as number[], lpsLight: [] as number[] }])) as Record<Key, { p50: number[]; p95: number[]; lps: number[]; lpsLight: number[] }>;
    const execFloor: number[] = [];
    let cold: number[] = [];
    // Whose CPU a phase used: the processes of each server's tree, the clients, the rest of the host.
    const roots: Array<[number, string]> = [[serve.pid!, 'vesh'], [sshd.pid!, 'sshd'], [process.pid, 'bench'], ...(baseServe ? [[baseServe.pid!, 'baseline'] as [number, string]] : [])];
    type LoginClient = 'openssh' | 'ssh2';
    const loginCpu: Array<{ target: Key; client: LoginClient; round: number; wallS: number; busyShare: number; cpuS: Record<string, number> }> = [];
    const loginGroupCpu: Array<{ target: Key; client: LoginClient; round: number } & LoginCpu> = [];
    if (!SFTP_ONLY && LOGIN_CLIENTS.has('ssh2')) lightLoad = LoginLoadChild.start();
    /** `total` logins to `k` from the ssh2 load, 8 at a time, as logins per second; any failed login fails the run. */
    const lightLogins = async (k: Key, total: number, what: string): Promise<number> => {
      const r = await lightLoad!.run({ port: targets[k]!.port, user: targets[k]!.user, keyFile: path.join(dir, 'id_ed25519'), total, parallel: 8 });
      if (r.failed) throw new Error(`${targets[k]!.name}: ${r.failed} of ${total} ${what} logins of the ssh2 client failed: ${r.firstError}`);
      return r.perSecond;
    };
    if (!SFTP_ONLY && WARMUP_LOGINS > 0) {
      // Untimed: WARMUP_LOGINS logins per target, from the light client where it runs (quicker), else ssh.
      for (const k of keys) {
        if (lightLoad) {
          await lightLogins(k, WARMUP_LOGINS, 'warm-up');
        } else {
          await loginsPerSecond(dir, targets[k]!, WARMUP_LOGINS);
        }
      }
    }
    if (!SFTP_ONLY) {
      for (let round = 0; round < ROUNDS; round++) {
        for (const k of rotate(keys, round)) {
          const v = await loginLatency(dir, targets[k]!, LOGINS);
          loginRounds[k].p50.push(pct(v, 50));
          loginRounds[k].p95.push(pct(v, 95));
        }
        for (const k of rotate(keys, round)) {
          for (const client of (['openssh', 'ssh2'] as const).filter((c) => LOGIN_CLIENTS.has(c))) {
            const sampler = args.cpu ? sampleProcessCpu() : null;
            const [t0, ticks0] = [performance.now(), hostCpuTicks()];
            const groupRun = cpuGroups?.start(k, PAR_LOGINS);
            if (client === 'openssh') {
              loginRounds[k].lps.push(await loginsPerSecond(dir, targets[k]!, PAR_LOGINS));
            } else {
              loginRounds[k].lpsLight.push(await lightLogins(k, PAR_LOGINS, 'timed'));
            }
            if (groupRun) loginGroupCpu.push({ target: k, client, round, ...groupRun() });
            if (sampler) {
              const busy = busyShare(ticks0, hostCpuTicks());
              loginCpu.push({ target: k, client, round, wallS: Number(((performance.now() - t0) / 1000).toFixed(2)), busyShare: Number(busy.toFixed(2)), cpuS: cpuByRole(sampler.stop(), roots) });
            }
          }
        }
      }

      // What a session costs without the agent (the first login to a running VE, a cold login): one `runc exec`.
      const runcRoot = makeLayout(loadServerConfig(veshConfig).dataDir).runtimeRoot;
      for (let i = 0; i < LOGINS; i++) {
        const t0 = performance.now();
        spawnSync('runc', ['--root', runcRoot, 'exec', 'warm', 'true'], { stdio: 'ignore' });
        execFloor.push(performance.now() - t0);
      }

      // Cold: the VE is stopped before every login, which boots it on demand.
      await loginOnce(dir, { ...targets.vesh!, user: 'cold' });
      cold = await loginLatency(dir, { ...targets.vesh!, user: 'cold' }, Math.max(5, Math.floor(LOGINS / 3)), () => vesh('ve', 'stop', '--kill', 'cold'));
    }

    const sftpRounds = Object.fromEntries(keys.map((k) => [k, { upMBs: [] as number[], downMBs: [] as number[] }])) as Record<Key, { upMBs: number[]; downMBs: number[] }>;
    const cpu: Array<{ target: Key; round: number; dir: 'up' | 'down'; wallS: number; cpuS: Record<string, number> }> = [];
    const readAheadRounds: number[] = [];
    if (!LOGINS_ONLY) {
      const src = path.join(dir, 'payload');
      execFileSync('dd', ['if=/dev/urandom', `of=${src}`, 'bs=1M', `count=${SFTP_MIB}`, 'status=none']);
      const mb = (SFTP_MIB * 1024 * 1024) / 1e6;
      const timed = async (k: Key, round: number, d: 'up' | 'down', batch: string): Promise<number> => {
        const sampler = args.cpu ? sampleProcessCpu() : null;
        const ms = await sftpTransfer(dir, targets[k]!, batch);
        if (sampler) cpu.push({ target: k, round, dir: d, wallS: Number((ms / 1000).toFixed(2)), cpuS: cpuByRole(sampler.stop(), roots) });
        return ms;
      };
      // The warm VE's disk: its loop device's read-ahead, set per round when asked.
      const veLoop = (): string => {
        const image = path.join(makeLayout(loadServerConfig(veshConfig).dataDir).veDir('warm'), 'disk.img');
        const dev = execFileSync('losetup', ['-n', '-O', 'NAME', '-j', image], { encoding: 'utf8' }).trim().split('\n')[0];
        if (!dev) throw new Error(`no loop device holds ${image}: is the warm VE running?`);
        return path.join('/sys/block', path.basename(dev), 'queue', 'read_ahead_kb');
      };
      // Downloads go to /dev/null: writing a 1 GiB file on the client's side
      // (its sftp took 1.0 to 3.5 CPU-s per download to /var/tmp or tmpfs,
      // 2026-12-03 23:10-23:30) is the same work whichever server sent it,
      // and only blurred the comparison.
      const down = '/dev/null';
      // Untimed, once per target: the whole file each way, so that the
      // rounds measure the servers' data paths warm (in the 23:10 run vesh's
      // worker took 2.3 CPU-s for its first upload and 1.5-1.7 for the next
      // ones), and so that the first timed upload, like every later one,
      // follows the removal of a whole file. On this VM (Firecracker, free
      // page reporting of 8 MiB blocks) memory the kernel left free for a
      // few seconds goes back to the hypervisor, and the first write to such
      // a page costs 3-6 us instead of under 2: 0.4 to 1.5 s more for 1 GiB
      // of page cache (2026-12-04 17:12). With a quarter-size warm-up the
      // first target of round 1 paid that alone (vesh's sftp-server 2.36
      // CPU-s for that upload, 1.09-1.10 in the next rounds, 17:07).
      for (const k of keys) {
        const remote = `${targets[k]!.remoteDir}/warmup`;
        await sftpTransfer(dir, targets[k]!, `put ${src} ${remote}\nget ${remote} ${down}\nrm ${remote}\n`);
      }
      for (let round = 0; round < SFTP_ROUNDS; round++) {
        const raFile = veLoop();
        if (VE_READ_AHEAD.length) writeFileSync(raFile, String(VE_READ_AHEAD[round % VE_READ_AHEAD.length]));
        readAheadRounds.push(Number(readFileSync(raFile, 'utf8')));
        for (const k of rotate(keys, round)) {
          const remote = `${targets[k]!.remoteDir}/payload`;
          // Each transfer starts with no dirty data of an earlier one: without
          // the sync, the kernel writes a finished upload back some 30 s later,
          // in the middle of whichever transfer runs then (untimed).
          execFileSync('sync');
          const up = await timed(k, round, 'up', `put ${src} ${remote}\n`);
          execFileSync('sync');
          const downMs = await timed(k, round, 'down', `get ${remote} ${down}\nrm ${remote}\n`);
          sftpRounds[k].upMBs.push(mb / (up / 1000));
          sftpRounds[k].downMBs.push(mb / (downMs / 1000));
        }
      }
    }

    // Ratios round by round (the same round's figures), and the worst round against its target.
    const perRound = (a: number[], b: number[]) => a.map((x, i) => x / b[i]!);
    const ratios = {
      ...(SFTP_ONLY ? {} : {
        warmP50VeshOverBare: perRound(loginRounds.vesh.p50, loginRounds.bare.p50),
        ...(BASELINE && LOGIN_CLIENTS.has('openssh') ? { loginsPerSecondVeshOverBaseline: perRound(loginRounds.vesh.lps, loginRounds.baseline.lps) } : {}),
        ...(BASELINE && LOGIN_CLIENTS.has('ssh2') ? { loginsPerSecondSsh2ClientVeshOverBaseline: perRound(loginRounds.vesh.lpsLight, loginRounds.baseline.lpsLight) } : {}),
      }),
      ...(LOGINS_ONLY ? {} : {
        sftpUpVeshOverSshd: perRound(sftpRounds.vesh.upMBs, sftpRounds.sshd.upMBs),
        sftpDownVeshOverSshd: perRound(sftpRounds.vesh.downMBs, sftpRounds.sshd.downMBs),
      }),
    };
    const result = {
      date: new Date().toISOString(),
      load: readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' '),
      workers: WORKERS ?? 'default',
      baseline: BASELINE ? { tree: BASELINE, commit: baseLabel } : null,
      rounds: ROUNDS,
      ...(SFTP_ONLY ? {} : {
        logins: Object.fromEntries(keys.map((k) => [k, { p50Ms: spread(loginRounds[k].p50), p95Ms: spread(loginRounds[k].p95), perSecond8: spread(loginRounds[k].lps), perSecond8Ssh2Client: spread(loginRounds[k].lpsLight) }])),
        loginRounds,
        coldLoginMs: { p50: pct(cold, 50), p95: pct(cold, 95) },
        runcExecTrueMs: { p50: pct(execFloor, 50), p95: pct(execFloor, 95) },
        ...(args.cpu ? { loginsPerSecondCpu: loginCpu, loginCpuMsPerLogin: loginGroupCpu } : {}),
      }),
      ...(LOGINS_ONLY ? {} : {
        sftpMiB: SFTP_MIB,
        sftp: Object.fromEntries(keys.map((k) => [k, { upMBs: median(sftpRounds[k].upMBs), downMBs: median(sftpRounds[k].downMBs) }])),
        sftpRounds,
        veReadAheadKbRounds: readAheadRounds,
        ...(args.cpu ? { sftpCpu: cpu } : {}),
      }),
      ratios: Object.fromEntries(Object.entries(ratios).map(([k, v]) => [k, { median: median(v), perRound: v.map((x) => Number(x.toFixed(3))) }])),
    };
    if (args.json) {
      console.log(JSON.stringify(result, null, 2));
      return;
    }
    const f = (x: number) => x.toFixed(0);
    const f1 = (x: number) => x.toFixed(1);
    const sp = (xs: number[], fmt: (x: number) => string) => {
      if (!xs.length) return '–'.padEnd(18);
      const s = spread(xs);
      return `${fmt(s.median)} [${fmt(s.min)}–${fmt(s.max)}]`.padEnd(18);
    };
    const rr = (xs: number[], worst: 'min' | 'max') => `${median(xs).toFixed(2)} (rounds ${xs.map((x) => x.toFixed(2)).join(' ')}; worst ${(worst === 'min' ? Math.min(...xs) : Math.max(...xs)).toFixed(2)})`;
    const labels: Array<[Key, string]> = [
      ['vesh', `vesh, warm VE (${WORKERS === null ? 'default' : WORKERS} workers)`],
      ...(BASELINE ? [['baseline', `vesh ${baseLabel}, warm VE`] as [Key, string]] : []),
      ['sshd', 'OpenSSH sshd'], ['bare', 'bare ssh2 on host'],
    ];
    console.log(`SSH: vesh vs OpenSSH sshd vs bare ssh2${BASELINE ? ` vs vesh ${baseLabel}` : ''}, OpenSSH client, curve25519${args.cipher ? `, ${args.cipher}` : ''}, VE memory ${VE_MEMORY} (${result.date}, load ${result.load})`);
    if (!SFTP_ONLY) {
      console.log(`Logins: median of ${ROUNDS} interleaved rounds [lowest–highest round]; ${LOGINS} logins per round for p50/p95, ${PAR_LOGINS} for logins/s, after ${WARMUP_LOGINS} untimed logins per target`);
      console.log(`${''.padEnd(34)} ${'login p50, ms'.padEnd(18)} ${'login p95, ms'.padEnd(18)} ${'logins/s, 8 ssh'.padEnd(18)} logins/s, 8 ssh2 clients`);
      for (const [k, label] of labels) {
        console.log(`${label.padEnd(34)} ${sp(loginRounds[k].p50, f)} ${sp(loginRounds[k].p95, f)} ${sp(loginRounds[k].lps, f1)} ${sp(loginRounds[k].lpsLight, f1)}`);
      }
      console.log(`${'vesh, cold VE (once)'.padEnd(34)} ${f(pct(cold, 50)).padEnd(18)} ${f(pct(cold, 95)).padEnd(18)}`);
      console.log(`${'runc exec true (once)'.padEnd(34)} ${f(pct(execFloor, 50)).padEnd(18)} ${f(pct(execFloor, 95)).padEnd(18)}`);
      console.log(`ratio vesh/bare ssh2 warm p50: ${rr(ratios.warmP50VeshOverBare!, 'max')}, target ≤ 1.3`);
      if (ratios.loginsPerSecondVeshOverBaseline) console.log(`ratio vesh/${baseLabel} logins/s, OpenSSH ssh clients: ${rr(ratios.loginsPerSecondVeshOverBaseline, 'min')}, target ≥ 1.5`);
      if (ratios.loginsPerSecondSsh2ClientVeshOverBaseline) console.log(`ratio vesh/${baseLabel} logins/s, ssh2 clients (login-load.ts): ${rr(ratios.loginsPerSecondSsh2ClientVeshOverBaseline, 'min')}, target ≥ 1.5`);
      if (args.cpu) {
        console.log(`CPU during each logins/s run: busy = the host's busy share of its ${availableParallelism()} CPUs (/proc/stat); CPU seconds of the longer-lived processes (a client ssh lives ~0.1 s and mostly escapes the 100 ms sampling)`);
        for (const c of loginCpu) console.log(`  ${c.target}, ${c.client} clients, round ${c.round + 1}, ${c.wallS} s, busy ${c.busyShare}: ${Object.entries(c.cpuS).map(([l, s]) => `${l} ${s}`).join(', ')}`);
        if (loginGroupCpu.length) {
          console.log('CPU per login, ms, every process counted (cpuacct groups; login-cpu.ts): clients = the ssh processes or the ssh2 load process; bench = this process (spawning them, the sampler; for bare, its ssh2 server); VE = the session agent and `sh -c true`; rest = the host\'s other busy time');
          for (const c of loginGroupCpu) console.log(`  ${c.target}, ${c.client} clients, round ${c.round + 1}: ${formatLoginCpu(c)}`);
          console.log(`logins/s the host's ${availableParallelism()} CPUs would allow at these costs, were they all this run's (median of rounds): ceiling / with a server that cost nothing`);
          for (const k of keys) {
            for (const client of ['openssh', 'ssh2'] as const) {
              const runs = loginGroupCpu.filter((c) => c.target === k && c.client === client).map(loginCeiling);
              if (runs.length) console.log(`  ${k}, ${client} clients: ${median(runs.map((r) => r.ceiling)).toFixed(1)} / ${median(runs.map((r) => r.freeServer)).toFixed(1)}`);
            }
          }
        }
      }
    }
    if (!LOGINS_ONLY) {
      console.log(`SFTP of ${SFTP_MIB} MiB, MB/s: median of ${SFTP_ROUNDS} interleaved rounds [lowest–highest round]`);
      console.log(`${''.padEnd(34)} ${'up'.padEnd(18)} down`);
      for (const [k, label] of labels) console.log(`${label.padEnd(34)} ${sp(sftpRounds[k].upMBs, f)} ${sp(sftpRounds[k].downMBs, f)}`);
      console.log(`read-ahead of the VE's disk per round, KiB: ${readAheadRounds.join(' ')}`);
      console.log(`ratio vesh/sshd SFTP up: ${rr(ratios.sftpUpVeshOverSshd!, 'min')}, target ≥ 1.2`);
      console.log(`ratio vesh/sshd SFTP down: ${rr(ratios.sftpDownVeshOverSshd!, 'min')}, target ≥ 1.2`);
      if (args.cpu) {
        console.log('CPU seconds per process during each transfer (processes over 0.02 s; "client" = the sftp client and its ssh):');
        for (const c of cpu) console.log(`  ${c.target} ${c.dir} round ${c.round + 1}, ${c.wallS} s: ${Object.entries(c.cpuS).map(([l, s]) => `${l} ${s}`).join(', ')}`);
      }
    }
  } catch (err) {
    // What vesh logged (warnings and errors) before the failure, before the cleanup removes it.
    const log = path.join(dir, 'vesh-serve.log');
    if (existsSync(log)) console.error(`vesh serve's last log lines:\n${readFileSync(log, 'utf8').trim().split('\n').slice(-20).join('\n')}`);
    throw err;
  } finally {
    await cleanupAll();
  }
}

await main();
