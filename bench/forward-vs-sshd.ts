/**
 * Port forwarding throughput, vesh beside OpenSSH's sshd (Debian) in one run,
 * with the real OpenSSH client (`ssh -N -L … -R …`, curve25519, the client's
 * default cipher): one TCP stream of --mib MiB through the forward, timed by
 * the program at its ends (bench/forward-endpoint.c, a static binary):
 *   -L  a client on the host connects to ssh's local port; the far end
 *       listens on 127.0.0.1 INSIDE the VE for vesh (the VE's loopback, which
 *       is where vesh's -L connects from) and on the host's 127.0.0.1 for
 *       sshd; upload (client → far end) and download (far end → client);
 *   -R  a client at the server's side (inside the VE for vesh, run through an
 *       SSH session; on the host for sshd, the same way) connects to the
 *       remote-forwarded port, which ssh carries back to a listener on the
 *       host's 127.0.0.1; both directions.
 * For vesh each stream passes vesh serve (ssh2) and the host relay
 * (vesh-forward-relay, which copies between the VE's socket and a
 * socketpair the server holds); for sshd, its per-connection process.
 * Rounds are interleaved (each round: every kind of transfer, vesh then
 * sshd), so a slow spell of the machine falls on both. Also the server
 * side's CPU time per transfer: vesh serve's process tree (node plus the
 * relay, shown apart) and sshd's (the per-connection processes); the
 * endpoint programs are left out of both.
 *
 *   npx vite-node bench/forward-vs-sshd.ts -- [--mib 512] [--rounds 3] [--ve-memory 1G] [--cipher NAME] [--json]
 *
 * Traffic goes only over 127.0.0.1 (the host's, and the VE's own loopback).
 * Not a test: shared, noisy machines; read the figures side by side.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, promises as fs, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { loadServerConfig } from '../src/config/server-config.js';
import { removeInstance } from '../test/helpers/ve-env.js';
import { sharedTemplate } from '../test/helpers/templates.js';
import { median, sleep, freePort, waitForPort } from './lib.js';

const { values: args } = parseArgs({
  options: {
    mib: { type: 'string', default: '512' },
    rounds: { type: 'string', default: '3' },
    've-memory': { type: 'string', default: '1G' },
    // The client's cipher for both targets (default: the client's own choice, chacha20-poly1305 for OpenSSH 9.2).
    cipher: { type: 'string' },
    json: { type: 'boolean', default: false },
  },
  allowPositionals: true,
});
const MIB = Number(args.mib);
const ROUNDS = Math.max(1, Number(args.rounds));
const BYTES = MIB * 1024 * 1024;
const REPO = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
/** Inside the VE: where the endpoint program goes, the -L far end's port and the -R listener's port (the VE's own loopback). */
const VE_PROGRAM = '/usr/local/bin/forward-endpoint';
const VE_SERVE_PORT = 5001;
const VE_REMOTE_PORT = 5002;

type Kind = 'L-up' | 'L-down' | 'R-up' | 'R-down';
const KINDS: Array<{ kind: Kind; label: string }> = [
  { kind: 'L-up', label: '-L client → far end' },
  { kind: 'L-down', label: '-L far end → client' },
  { kind: 'R-up', label: '-R server side → client' },
  { kind: 'R-down', label: '-R client → server side' },
];

interface Target {
  key: 'vesh' | 'sshd';
  name: string;
  port: number;
  user: string;
  /** The endpoint program as the server side runs it. */
  program: string;
  /** Where the -L far end listens, as the server side sees it (127.0.0.1:PORT). */
  serveFarPort: number;
  /** The -R port the server listens on, as the server side sees it. */
  remotePort: number;
  /** ssh's -L port on the host. */
  localPort: number;
  /** Root of the server's process tree, for CPU time. */
  pid: () => number;
}

function sshArgs(dir: string, t: Target): string[] {
  return [
    '-p', String(t.port), '-i', path.join(dir, 'id_ed25519'), '-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=no',
    '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR', '-o', 'KexAlgorithms=curve25519-sha256',
    '-o', 'ControlMaster=no', '-o', 'ControlPath=none', '-F', '/dev/null',
    ...(args.cipher ? ['-o', `Ciphers=${args.cipher}`] : []),
  ];
}

/** Run a program to its end; its stdout, or an error with its stderr. */
function run(file: string, argv: string[], input?: Buffer, timeoutMs = 600_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = spawn(file, argv, { stdio: [input ? 'pipe' : 'ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    const timer = setTimeout(() => c.kill('SIGKILL'), timeoutMs);
    c.stdout!.on('data', (d) => { out += d; });
    c.stderr!.on('data', (d) => { err += d; });
    c.on('error', reject);
    c.on('close', (code) => {
      clearTimeout(timer);
      if (code === 0) resolve(out);
      else reject(new Error(`${path.basename(file)} ${argv.slice(-4).join(' ')} exited ${code}: ${err.trim()}`));
    });
    if (input) c.stdin!.end(input);
  });
}

/** Start a long-running program and wait for its "listening" line. */
function startListening(file: string, argv: string[], what: string): Promise<ChildProcess> {
  return new Promise((resolve, reject) => {
    const c = spawn(file, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    const timer = setTimeout(() => reject(new Error(`${what}: no "listening" after 30 s: ${err.trim()}`)), 30_000);
    c.stdout!.on('data', (d) => {
      out += d;
      if (out.includes('listening')) {
        clearTimeout(timer);
        resolve(c);
      }
    });
    c.stderr!.on('data', (d) => { err += d; });
    c.on('close', (code) => {
      clearTimeout(timer);
      reject(new Error(`${what} exited ${code}: ${err.trim()}`));
    });
  });
}

const TICK = 100; // USER_HZ: /proc/PID/stat counts CPU time in 1/100 s on Linux

/**
 * CPU seconds of the process tree under `root` (utime + stime of each
 * process alive now; processes that exited meanwhile count in their parent's
 * cutime/cstime only once reaped, so the trees here are long-lived ones).
 * The endpoint programs are left out; `relay` is the part of vesh's forward relays.
 */
function treeCpu(root: number): { total: number; relay: number } {
  const procs = new Map<number, { ppid: number; comm: string; cpu: number }>();
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    let stat: string;
    try { stat = readFileSync(`/proc/${e}/stat`, 'utf8'); } catch { continue; }
    const close = stat.lastIndexOf(')');
    const comm = stat.slice(stat.indexOf('(') + 1, close);
    const f = stat.slice(close + 2).split(' ');
    // after the comm: state(0) ppid(1) … utime(11) stime(12)
    procs.set(Number(e), { ppid: Number(f[1]), comm, cpu: (Number(f[11]) + Number(f[12])) / TICK });
  }
  let total = 0;
  let relay = 0;
  const inTree = (pid: number): boolean => {
    for (let p = pid, hops = 0; p > 1 && hops < 64; hops++) {
      if (p === root) return true;
      p = procs.get(p)?.ppid ?? 0;
    }
    return false;
  };
  for (const [pid, p] of procs) {
    if (!inTree(pid) || p.comm.startsWith('forward-endpoi')) continue;
    total += p.cpu;
    if (p.comm.startsWith('vesh-forward-re')) relay += p.cpu;
  }
  return { total, relay };
}

/** One transfer; MB/s (10^6 bytes) as the endpoint program timed it. */
async function transfer(dir: string, t: Target, kind: Kind, bytes: number): Promise<number> {
  const local = path.join(dir, 'forward-endpoint');
  let out: string;
  if (kind === 'L-up') out = await run(local, ['up', String(t.localPort), String(bytes)]);
  else if (kind === 'L-down') out = await run(local, ['down', String(t.localPort), String(bytes)]);
  else {
    // The -R client runs on the server's side, started through an SSH session of the same server.
    const mode = kind === 'R-up' ? 'up' : 'down';
    out = await run('ssh', [...sshArgs(dir, t), `${t.user}@127.0.0.1`, `${t.program} ${mode} ${t.remotePort} ${bytes}`]);
  }
  const [n, secs] = out.trim().split(/\s+/).map(Number);
  if (n !== bytes || !(secs! > 0)) throw new Error(`${t.name} ${kind}: unexpected output ${JSON.stringify(out)}`);
  return bytes / 1e6 / secs!;
}

/** A subnet for the bench's bridge that no route on this host overlaps (other benches pick theirs at random in 10.200-239). */
function pickSubnet(): string {
  const routes = execFileSync('ip', ['-4', 'route'], { encoding: 'utf8' });
  for (let i = 0; i < 40; i++) {
    const b = 230 + ((process.pid + i) % 10);
    const c = (process.pid + i * 7) % 250;
    if (!routes.includes(`10.${b}.0.0/16`) && !routes.includes(`10.${b}.${c}.`)) return `10.${b}.${c}.0/24`;
  }
  throw new Error('no free 10.230-239.x.0/24 for the bench bridge');
}

async function main(): Promise<void> {
  const dir = mkdtempSync('/var/tmp/vesh-bench-fwd-');
  chmodSync(dir, 0o711);
  const children: ChildProcess[] = [];
  const onSignal = () => {
    void cleanupAll().finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  let cleaned = false;
  const cleanupAll = async () => {
    if (cleaned) return;
    cleaned = true;
    // Clients before servers (the latest started first): the forwards close before the servers stop.
    for (const c of [...children].reverse()) {
      if (c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
      await sleep(100);
    }
    await sleep(1000);
    // vesh serve leaves VEs running by design: remove what the bench's instance made.
    const configFile = path.join(dir, 'vesh.yaml');
    if (existsSync(configFile)) await removeInstance(loadServerConfig(configFile));
    await fs.rm(dir, { recursive: true, force: true });
  };
  const load0 = os.loadavg();
  try {
    execFileSync('gcc', ['-static', '-O2', '-Wall', '-Wextra', '-Werror', '-o', path.join(dir, 'forward-endpoint'), path.join(REPO, 'bench/forward-endpoint.c')]);
    chmodSync(path.join(dir, 'forward-endpoint'), 0o755);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'id_ed25519')]);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'sshd_host_key')]);
    const pub = readFileSync(path.join(dir, 'id_ed25519.pub'), 'utf8').trim();

    // ---- vesh serve, Debian template (the shared cache the tests use)
    const [pVesh, pSshd, pHostServe, pSshdRemote, pLocalVesh, pLocalSshd] = [await freePort(), await freePort(), await freePort(), await freePort(), await freePort(), await freePort()];
    const data = path.join(dir, 'data');
    mkdirSync(path.join(data, 'templates'), { recursive: true });
    await fs.symlink((await sharedTemplate('debian')).dir, path.join(data, 'templates', 'debian'));
    writeFileSync(path.join(dir, 'vesh.yaml'), [
      `listen: "127.0.0.1:${pVesh}"`, `dataDir: ${data}`, `hostKeysDir: ${dir}/keys`, `accountsFile: ${dir}/accounts.yaml`,
      `defaults: { template: debian, limits: { memory: ${args['ve-memory']}, pids: 512, cpus: 2, disk: 2G } }`,
      `network: { bridge: vbp${process.pid % 10000}, subnet: ${pickSubnet()}, outbound: false }`,
      `logging: { level: warn, pretty: false }`,
    ].join('\n'));
    writeFileSync(path.join(dir, 'accounts.yaml'), `fwd:\n  keys:\n    - ${pub}\n`);
    const serve = spawn(process.execPath, [path.join(REPO, 'bin/vesh.js'), '--config', path.join(dir, 'vesh.yaml'), 'serve'], { stdio: ['ignore', 'ignore', 'inherit'] });
    children.push(serve);
    await waitForPort(pVesh);

    // ---- OpenSSH sshd, its own port, config and host key
    mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });
    writeFileSync(path.join(dir, 'authorized_keys'), `${pub}\n`, { mode: 0o600 });
    writeFileSync(path.join(dir, 'sshd_config'), [
      `Port ${pSshd}`, 'ListenAddress 127.0.0.1', `HostKey ${dir}/sshd_host_key`, `PidFile ${dir}/sshd.pid`,
      `AuthorizedKeysFile ${dir}/authorized_keys`, 'StrictModes no', 'UsePAM no', 'PermitRootLogin prohibit-password',
      'PasswordAuthentication no', 'KbdInteractiveAuthentication no', 'KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org',
      'AllowTcpForwarding yes', 'GatewayPorts no', 'MaxStartups 100', 'PrintMotd no', 'UseDNS no', '',
    ].join('\n'));
    const sshd = spawn('/usr/sbin/sshd', ['-D', '-e', '-f', path.join(dir, 'sshd_config')], { stdio: ['ignore', 'ignore', 'ignore'] });
    children.push(sshd);
    await waitForPort(pSshd);

    const targets: Record<'vesh' | 'sshd', Target> = {
      vesh: {
        key: 'vesh', name: 'vesh', port: pVesh, user: 'fwd', program: VE_PROGRAM, serveFarPort: VE_SERVE_PORT,
        remotePort: VE_REMOTE_PORT, localPort: pLocalVesh, pid: () => serve.pid!,
      },
      sshd: {
        key: 'sshd', name: 'OpenSSH sshd', port: pSshd, user: 'root', program: path.join(dir, 'forward-endpoint'), serveFarPort: pHostServe,
        remotePort: pSshdRemote, localPort: pLocalSshd, pid: () => sshd.pid!,
      },
    };

    // ---- the endpoints: the program copied into the VE through a session (its first login boots the VE), its listener started there; one on the host
    await run('ssh', [...sshArgs(dir, targets.vesh), 'fwd@127.0.0.1', `mkdir -p ${path.dirname(VE_PROGRAM)} && cat > ${VE_PROGRAM} && chmod 755 ${VE_PROGRAM}`], readFileSync(path.join(dir, 'forward-endpoint')), 120_000);
    children.push(await startListening('ssh', [...sshArgs(dir, targets.vesh), 'fwd@127.0.0.1', `exec ${VE_PROGRAM} serve ${VE_SERVE_PORT}`], 'the far end in the VE'));
    children.push(await startListening(path.join(dir, 'forward-endpoint'), ['serve', String(pHostServe)], 'the far end on the host'));

    // ---- the forwards: one `ssh -N` per target for the whole run, -L to its far end, -R back to the host's
    for (const t of Object.values(targets)) {
      children.push(spawn('ssh', [
        ...sshArgs(dir, t), '-N', '-o', 'ExitOnForwardFailure=yes',
        '-L', `127.0.0.1:${t.localPort}:127.0.0.1:${t.serveFarPort}`, '-R', `127.0.0.1:${t.remotePort}:127.0.0.1:${pHostServe}`,
        `${t.user}@127.0.0.1`,
      ], { stdio: ['ignore', 'ignore', 'inherit'] }));
      await waitForPort(t.localPort);
    }
    // Warm-up: a small transfer of each kind (starts vesh's forward helper in the VE, and waits out the -R listener's setup).
    for (const t of Object.values(targets)) {
      for (const { kind } of KINDS) {
        for (let tries = 0; ; tries++) {
          try {
            await transfer(dir, t, kind, 1 << 20);
            break;
          } catch (err) {
            if (tries >= 50) throw err;
            await sleep(200);
          }
        }
      }
    }

    const mbs: Record<string, Record<Kind, number[]>> = {};
    const cpu: Record<string, Record<Kind, Array<{ total: number; relay: number }>>> = {};
    for (const k of ['vesh', 'sshd']) {
      mbs[k] = { 'L-up': [], 'L-down': [], 'R-up': [], 'R-down': [] };
      cpu[k] = { 'L-up': [], 'L-down': [], 'R-up': [], 'R-down': [] };
    }
    for (let round = 0; round < ROUNDS; round++) {
      for (const { kind } of KINDS) {
        for (const t of [targets.vesh, targets.sshd]) {
          const before = treeCpu(t.pid());
          mbs[t.key]![kind].push(await transfer(dir, t, kind, BYTES));
          const after = treeCpu(t.pid());
          cpu[t.key]![kind].push({ total: after.total - before.total, relay: after.relay - before.relay });
        }
      }
    }
    const load1 = os.loadavg();

    const summary = Object.fromEntries(KINDS.map(({ kind }) => {
      const v = mbs.vesh![kind];
      const s = mbs.sshd![kind];
      const ratios = v.map((x, i) => x / s[i]!);
      return [kind, {
        veshMBs: median(v), sshdMBs: median(s), ratio: median(v) / median(s),
        roundRatios: ratios,
        veshCpuS: median(cpu.vesh![kind].map((c) => c.total)), veshRelayCpuS: median(cpu.vesh![kind].map((c) => c.relay)),
        sshdCpuS: median(cpu.sshd![kind].map((c) => c.total)),
      }];
    })) as Record<Kind, { veshMBs: number; sshdMBs: number; ratio: number; roundRatios: number[]; veshCpuS: number; veshRelayCpuS: number; sshdCpuS: number }>;
    const result = {
      date: new Date().toISOString(),
      mib: MIB,
      rounds: ROUNDS,
      cipher: args.cipher ?? 'client default',
      loadAverage: { start: load0, end: load1 },
      summary,
      perRound: { mbs, cpu },
    };
    if (args.json) {
      console.log(JSON.stringify(result, null, 2));
      return;
    }
    const f1 = (x: number) => x.toFixed(1).padStart(6);
    const each = (xs: number[]) => `[${xs.map((x) => x.toFixed(0)).join(' ')}]`.padEnd(16);
    const range = (xs: number[]) => `${Math.min(...xs).toFixed(2)}–${Math.max(...xs).toFixed(2)}`;
    console.log(`Port forwarding: vesh vs OpenSSH sshd, OpenSSH client, curve25519, cipher ${result.cipher} (${result.date})`);
    console.log(`one TCP stream of ${MIB} MiB, MB/s, median of ${ROUNDS} interleaved rounds [each round]; load average ${load0.map((x) => x.toFixed(2)).join(' ')} at start, ${load1.map((x) => x.toFixed(2)).join(' ')} at end`);
    console.log(`${''.padEnd(26)}${'vesh'.padEnd(24)}${'OpenSSH sshd'.padEnd(24)}vesh/sshd (rounds)`);
    for (const { kind, label } of KINDS) {
      const s = summary[kind];
      console.log(`${label.padEnd(26)}${f1(s.veshMBs)} ${each(mbs.vesh![kind])} ${f1(s.sshdMBs)} ${each(mbs.sshd![kind])} ${s.ratio.toFixed(2)} (${range(s.roundRatios)})`);
    }
    console.log('server CPU per transfer, s (median): vesh serve + relay (relay alone) / sshd');
    for (const { kind, label } of KINDS) {
      const s = summary[kind];
      console.log(`${label.padEnd(26)}${s.veshCpuS.toFixed(2).padStart(6)} (${s.veshRelayCpuS.toFixed(2)})  /  ${s.sshdCpuS.toFixed(2)}`);
    }
    console.log("(-R: the client at the server side is started through an SSH session per transfer; vesh's figure holds that login's share in node, tens of ms)");
  } finally {
    await cleanupAll();
  }
}

await main();
