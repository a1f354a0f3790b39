/**
 * vesh beside OpenSSH's sshd (Debian) and a bare ssh2 server, in one run,
 * with the same OpenSSH client, key and key exchange (curve25519-sha256):
 *   - login + `true` latency p50/p95, warm VE (running, in use: its session
 *     agent is up) and cold VE (stopped: boot on demand, the session goes
 *     through `runc exec`);
 *   - logins per second with 8 clients in parallel;
 *   - SFTP upload and download of one file (1 GiB by default) in MB/s: the
 *     median of --sftp-rounds rounds, each round one transfer per target in
 *     turn, so that a slow spell of the machine falls on all of them.
 * sshd runs with its own port, config and host key; the bare ssh2 server
 * spawns `true` on the host (no VE): the floor for any ssh2-based server.
 *
 *   npx vite-node bench/ssh-vs-sshd.ts -- [--logins 30] [--parallel-logins 80] [--sftp-mib 1024] [--sftp-rounds 3] [--sftp-only] [--ve-memory 1G] [--cipher NAME] [--json]
 *
 * Not a test: shared, noisy machines; read the figures side by side.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, promises as fs, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { parseArgs } from 'node:util';
import ssh2 from 'ssh2';
import { loadServerConfig } from '../src/config/server-config.js';
import { makeLayout } from '../src/system/layout.js';
import { removeInstance } from '../test/helpers/ve-env.js';
import { sharedTemplate } from '../test/helpers/templates.js';
import { pct, median, sleep, freePort, waitForPort } from './lib.js';

const { values: args } = parseArgs({
  options: {
    logins: { type: 'string', default: '30' },
    'parallel-logins': { type: 'string', default: '80' },
    'sftp-mib': { type: 'string', default: '1024' },
    'sftp-rounds': { type: 'string', default: '3' },
    // Skip the login figures (for looking at SFTP alone).
    'sftp-only': { type: 'boolean', default: false },
    // The VE's memory limit; its page cache counts against it, so whether the
    // transferred file stays cached (as it does for sshd) depends on it.
    've-memory': { type: 'string', default: '1G' },
    // The client's cipher for every target (default: the client's own choice,
    // chacha20-poly1305 for OpenSSH 9.2).
    cipher: { type: 'string' },
    json: { type: 'boolean', default: false },
  },
  allowPositionals: true,
});
const LOGINS = Number(args.logins);
const PAR_LOGINS = Number(args['parallel-logins']);
const SFTP_MIB = Number(args['sftp-mib']);
const SFTP_ROUNDS = Math.max(1, Number(args['sftp-rounds']));
const SFTP_ONLY = args['sftp-only'];
const REPO = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');

interface Target { name: string; port: number; user: string; remoteDir: string }

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
  throw new Error('the warm VE has no session agent after 20 s: is dist/vesh-session built (npm run build)?');
}

async function loginsPerSecond(dir: string, t: Target, total: number, parallel = 8): Promise<number> {
  let next = 0;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: parallel }, async () => {
    while (next < total) {
      next++;
      await loginOnce(dir, t);
    }
  }));
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
  // Sockets accepted here with Nagle off and handed over, as vesh does: the same footing.
  const tcp = net.createServer((sock) => {
    sock.setNoDelay(true);
    server.injectSocket(sock);
  });
  return new Promise((r) => tcp.listen(port, '127.0.0.1', () => r(tcp)));
}

async function main(): Promise<void> {
  const dir = mkdtempSync('/var/tmp/vesh-bench-ssh-');
  chmodSync(dir, 0o711);
  const children: ChildProcess[] = [];
  let bare: net.Server | null = null;
  const vesh = (...a: string[]) => execFileSync(process.execPath, [path.join(REPO, 'bin/vesh.js'), '--config', path.join(dir, 'vesh.yaml'), ...a], { encoding: 'utf8' });
  // Ctrl-C or a timeout still removes the VEs, bridge and files this run made.
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
    for (const c of children) c.kill('SIGTERM');
    await sleep(1000);
    // vesh serve leaves VEs running by design: remove what the bench's instance made.
    const configFile = path.join(dir, 'vesh.yaml');
    if (existsSync(configFile)) await removeInstance(loadServerConfig(configFile));
    await fs.rm(dir, { recursive: true, force: true });
  };
  try {
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'id_ed25519')]);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'sshd_host_key')]);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-m', 'PEM', '-f', path.join(dir, 'bare_host_key')]);
    const pub = readFileSync(path.join(dir, 'id_ed25519.pub'), 'utf8').trim();

    // ---- vesh serve, Debian template (the shared cache the tests use), disk big enough for the SFTP file
    const [pVesh, pSshd, pBare] = [await freePort(), await freePort(), await freePort()];
    const data = path.join(dir, 'data');
    mkdirSync(path.join(data, 'templates'), { recursive: true });
    await fs.symlink((await sharedTemplate('debian')).dir, path.join(data, 'templates', 'debian'));
    writeFileSync(path.join(dir, 'vesh.yaml'), [
      `listen: "127.0.0.1:${pVesh}"`, `dataDir: ${data}`, `hostKeysDir: ${dir}/keys`, `accountsFile: ${dir}/accounts.yaml`,
      `defaults: { template: debian, limits: { memory: ${args['ve-memory']}, pids: 512, cpus: 2, disk: ${Math.ceil((SFTP_MIB * 2.2) / 1024) + 1}G } }`,
      `network: { bridge: vbs${process.pid % 10000}, subnet: 10.239.${process.pid % 250}.0/24, outbound: false }`,
      `logging: { level: warn, pretty: false }`,
    ].join('\n'));
    writeFileSync(path.join(dir, 'accounts.yaml'), `warm:\n  keys:\n    - ${pub}\ncold:\n  keys:\n    - ${pub}\n`);
    const serve = spawn(process.execPath, [path.join(REPO, 'bin/vesh.js'), '--config', path.join(dir, 'vesh.yaml'), 'serve'], { stdio: ['ignore', 'ignore', 'inherit'] });
    children.push(serve);
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
    await waitForPort(pSshd);

    bare = await startBareSsh2(dir, pBare);

    const targets: Record<string, Target> = {
      vesh: { name: 'vesh', port: pVesh, user: 'warm', remoteDir: '/root' },
      sshd: { name: 'OpenSSH sshd', port: pSshd, user: 'root', remoteDir: path.join(dir, 'sshd-home') },
      bare: { name: 'bare ssh2 (host)', port: pBare, user: 'root', remoteDir: path.join(dir, 'sshd-home') },
    };
    // Warm up: the VE's first login creates and boots it; its session agent
    // starts a second later (session-agents.ts), as on any VE in use.
    for (const t of Object.values(targets)) await loginOnce(dir, t);
    await waitForAgent(dir, targets.vesh!);

    const warm: Record<string, number[]> = {};
    const execFloor: number[] = [];
    let cold: number[] = [];
    const lps: Record<string, number> = {};
    if (!SFTP_ONLY) {
      for (const [k, t] of Object.entries(targets)) warm[k] = await loginLatency(dir, t, LOGINS);

      // What a session costs without the agent (the first login to a running VE, a cold login): one `runc exec`.
      const runcRoot = makeLayout(data).runtimeRoot;
      for (let i = 0; i < LOGINS; i++) {
        const t0 = performance.now();
        spawnSync('runc', ['--root', runcRoot, 'exec', 'warm', 'true'], { stdio: 'ignore' });
        execFloor.push(performance.now() - t0);
      }

      // Cold: the VE is stopped before every login, which boots it on demand.
      await loginOnce(dir, { ...targets.vesh!, user: 'cold' });
      cold = await loginLatency(dir, { ...targets.vesh!, user: 'cold' }, Math.max(5, Math.floor(LOGINS / 3)), () => vesh('ve', 'stop', '--kill', 'cold'));

      for (const [k, t] of Object.entries(targets)) lps[k] = await loginsPerSecond(dir, t, PAR_LOGINS);
    }

    const src = path.join(dir, 'payload');
    execFileSync('dd', ['if=/dev/urandom', `of=${src}`, 'bs=1M', `count=${SFTP_MIB}`, 'status=none']);
    const mb = (SFTP_MIB * 1024 * 1024) / 1e6;
    const rounds: Record<string, { upMBs: number[]; downMBs: number[] }> = { vesh: { upMBs: [], downMBs: [] }, sshd: { upMBs: [], downMBs: [] }, bare: { upMBs: [], downMBs: [] } };
    for (let round = 0; round < SFTP_ROUNDS; round++) {
      for (const k of ['vesh', 'sshd', 'bare'] as const) {
        const t = targets[k]!;
        const remote = `${t.remoteDir}/payload`;
        // Each transfer starts with no dirty data of an earlier one: without
        // the sync, the kernel writes a finished upload back some 30 s later,
        // in the middle of whichever transfer runs then (untimed).
        execFileSync('sync');
        const up = await sftpTransfer(dir, t, `put ${src} ${remote}\n`);
        execFileSync('sync');
        const down = await sftpTransfer(dir, t, `get ${remote} ${dir}/down\nrm ${remote}\n`);
        await fs.rm(path.join(dir, 'down'), { force: true });
        rounds[k]!.upMBs.push(mb / (up / 1000));
        rounds[k]!.downMBs.push(mb / (down / 1000));
      }
    }
    const sftp = Object.fromEntries(Object.entries(rounds).map(([k, r]) => [k, { upMBs: median(r.upMBs), downMBs: median(r.downMBs) }])) as Record<string, { upMBs: number; downMBs: number }>;

    const logins = SFTP_ONLY ? null : {
      loginMs: Object.fromEntries(Object.entries(warm).map(([k, v]) => [k, { p50: pct(v, 50), p95: pct(v, 95) }])),
      coldLoginMs: { p50: pct(cold, 50), p95: pct(cold, 95) },
      runcExecTrueMs: { p50: pct(execFloor, 50), p95: pct(execFloor, 95) },
      loginsPerSecond8: lps,
    };
    const result = {
      date: new Date().toISOString(),
      ...(logins ?? {}),
      sftpMiB: SFTP_MIB,
      sftp,
      sftpRounds: rounds,
    };
    if (args.json) {
      console.log(JSON.stringify(result, null, 2));
      return;
    }
    const f = (x: number) => x.toFixed(0).padStart(6);
    const f1 = (x: number) => x.toFixed(1).padStart(6);
    const ratio = (a: number, b: number) => (a / b).toFixed(2);
    console.log(`SSH: vesh vs OpenSSH sshd vs bare ssh2, OpenSSH client, curve25519, VE memory ${args['ve-memory']} (${result.date})`);
    const labels = [['vesh', 'vesh (warm VE)'], ['sshd', 'OpenSSH sshd'], ['bare', 'bare ssh2 on host']] as const;
    if (logins) {
      console.log('                         login p50  login p95  logins/s(8)');
      for (const [k, label] of labels) {
        console.log(`${label.padEnd(24)} ${f(logins.loginMs[k]!.p50)} ms  ${f(logins.loginMs[k]!.p95)} ms  ${f1(lps[k]!)}`);
      }
      console.log(`${'vesh (cold VE)'.padEnd(24)} ${f(logins.coldLoginMs.p50)} ms  ${f(logins.coldLoginMs.p95)} ms`);
      console.log(`${'runc exec true'.padEnd(24)} ${f(logins.runcExecTrueMs.p50)} ms  ${f(logins.runcExecTrueMs.p95)} ms`);
      console.log(`ratios: warm/bare ${ratio(logins.loginMs.vesh!.p50, logins.loginMs.bare!.p50)} (target ≤ 1.3), cold/sshd-warm ${ratio(logins.coldLoginMs.p50, logins.loginMs.sshd!.p50)} (target ≤ 0.75)`);
    }
    console.log(`SFTP of ${SFTP_MIB} MiB, MB/s, median of ${SFTP_ROUNDS} interleaved rounds (each round's figure in brackets)`);
    console.log('                         up                               down');
    const each = (xs: number[]) => `[${xs.map((x) => x.toFixed(0)).join(' ')}]`.padEnd(22);
    for (const [k, label] of labels) {
      console.log(`${label.padEnd(24)} ${f1(sftp[k]!.upMBs)} ${each(rounds[k]!.upMBs)}  ${f1(sftp[k]!.downMBs)} ${each(rounds[k]!.downMBs)}`);
    }
    console.log(`ratios: sftp up ${ratio(sftp.vesh!.upMBs, sftp.sshd!.upMBs)} down ${ratio(sftp.vesh!.downMBs, sftp.sshd!.downMBs)} (target ≥ 0.9); bare ssh2/sshd up ${ratio(sftp.bare!.upMBs, sftp.sshd!.upMBs)} down ${ratio(sftp.bare!.downMBs, sftp.sshd!.downMBs)}`);
  } finally {
    await cleanupAll();
  }
}

await main();
