/**
 * One account holding many sessions at once, with vesh's default caps
 * (sessions.maxConnectionsPerAccount and maxSessionsPerAccount, 500 each):
 *   - opens --sessions connections (default 500) of account `heavy`, one
 *     `sleep` session each (ssh2 clients in this process, from ten 127.0.0.x
 *     sources so the per-source connection rate does not pace them), and
 *     checks that every one is held;
 *   - while they are held: probe logins (OpenSSH client, key, `true`) of
 *     another account, p50/p95; the server's RSS;
 *   - then one more connection of `heavy` (the OpenSSH client): with the
 *     default caps it must be refused with the message naming the cap.
 *
 *   npx vite-node bench/account-sessions.ts -- [--sessions 500] [--probes 20] [--json]
 *
 * Issue 9's measurement at c6bb4cc: 500 held, probe logins 20–60 ms,
 * server RSS 114 MB. Not a test: read the figures.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, promises as fs, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import ssh2 from 'ssh2';
import { loadServerConfig } from '../src/config/server-config.js';
import { removeInstance } from '../test/helpers/ve-env.js';
import { sharedTemplate } from '../test/helpers/templates.js';
import { pct, sleep, freePort, waitForPort } from './lib.js';

const { values: args } = parseArgs({
  options: {
    sessions: { type: 'string', default: '500' },
    probes: { type: 'string', default: '20' },
    json: { type: 'boolean', default: false },
  },
  allowPositionals: true,
});
const SESSIONS = Number(args.sessions);
const PROBES = Number(args.probes);
const REPO = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');

function sshArgs(dir: string, port: number): string[] {
  return ['-p', String(port), '-i', path.join(dir, 'id_ed25519'), '-o', 'BatchMode=yes', '-o', 'IdentitiesOnly=yes', '-o', 'StrictHostKeyChecking=no',
    '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR', '-o', 'KexAlgorithms=curve25519-sha256', '-o', 'ControlMaster=no', '-o', 'ControlPath=none', '-F', '/dev/null'];
}

function ssh(dir: string, port: number, user: string, cmd: string): Promise<{ code: number | null; ms: number; stderr: string }> {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const c = spawn('ssh', [...sshArgs(dir, port), `${user}@127.0.0.1`, cmd], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    c.stderr.on('data', (d) => { stderr += d; });
    c.on('close', (code) => resolve({ code, ms: performance.now() - t0, stderr }));
  });
}

/** One ssh2 connection of `user` running `sleep` in one session; resolves once the session runs (its first output). */
function holdSession(port: number, key: Buffer, user: string, source: string): Promise<ssh2.Client> {
  return new Promise((resolve, reject) => {
    const c = new ssh2.Client();
    c.on('error', reject);
    c.on('ready', () => {
      c.exec('echo up; exec sleep 3600', (err, stream) => {
        if (err) return reject(err);
        stream.stderr.resume();
        stream.once('data', () => resolve(c));
        stream.on('close', () => reject(new Error('a held session ended early')));
      });
    });
    c.connect({ host: '127.0.0.1', port, localAddress: source, username: user, privateKey: key, readyTimeout: 120_000, algorithms: { kex: ['curve25519-sha256'] } });
  });
}

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

async function main(): Promise<void> {
  const dir = mkdtempSync('/var/tmp/vesh-bench-sessions-');
  chmodSync(dir, 0o711);
  const children: ChildProcess[] = [];
  const clients: ssh2.Client[] = [];
  let cleaned = false;
  const cleanupAll = async () => {
    if (cleaned) return;
    cleaned = true;
    for (const c of clients) c.end();
    for (const c of children) c.kill('SIGTERM');
    await sleep(2000);
    const configFile = path.join(dir, 'vesh.yaml');
    if (existsSync(configFile)) await removeInstance(loadServerConfig(configFile));
    await fs.rm(dir, { recursive: true, force: true });
  };
  const onSignal = () => { void cleanupAll().finally(() => process.exit(130)); };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'id_ed25519')]);
    const pub = readFileSync(path.join(dir, 'id_ed25519.pub'), 'utf8').trim();
    const key = readFileSync(path.join(dir, 'id_ed25519'));
    const port = await freePort();
    const data = path.join(dir, 'data');
    mkdirSync(path.join(data, 'templates'), { recursive: true });
    await fs.symlink((await sharedTemplate('debian')).dir, path.join(data, 'templates', 'debian'));
    // Default auth and sessions caps; the VE's pids limit leaves room for the sleeps.
    writeFileSync(path.join(dir, 'vesh.yaml'), [
      `listen: "127.0.0.1:${port}"`, `dataDir: ${data}`, `hostKeysDir: ${dir}/keys`, `accountsFile: ${dir}/accounts.yaml`,
      `defaults: { template: debian, limits: { memory: 1G, pids: ${SESSIONS * 2 + 200}, cpus: 2, disk: 1G } }`,
      `network: { bridge: vbh${process.pid % 10000}, subnet: 10.237.${process.pid % 250}.0/24, outbound: false }`,
      `logging: { level: warn, pretty: false }`,
    ].join('\n'));
    writeFileSync(path.join(dir, 'accounts.yaml'), `heavy:\n  keys:\n    - ${pub}\nprobe:\n  keys:\n    - ${pub}\n`);
    const serve = spawn(process.execPath, [path.join(REPO, 'bin/vesh.js'), '--config', path.join(dir, 'vesh.yaml'), 'serve'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let serveLog = '';
    serve.stderr!.on('data', (d) => { if (serveLog.length < 1_000_000) serveLog += d; });
    children.push(serve);
    await waitForPort(port);
    // Boot both VEs first.
    for (const u of ['heavy', 'probe']) {
      const r = await ssh(dir, port, u, 'true');
      if (r.code !== 0) throw new Error(`warm-up login of ${u} failed: ${r.stderr}`);
    }

    const t0 = performance.now();
    // Ten sources, 25 connections in flight at a time.
    let next = 0;
    await Promise.all(Array.from({ length: 25 }, async () => {
      while (next < SESSIONS) {
        const i = next++;
        clients.push(await holdSession(port, key, 'heavy', `127.0.0.${10 + (i % 10)}`));
      }
    }));
    const openS = (performance.now() - t0) / 1000;
    await sleep(2000);
    const held = clients.length;

    const probeMs: number[] = [];
    for (let i = 0; i < PROBES; i++) {
      const r = await ssh(dir, port, 'probe', 'true');
      if (r.code !== 0) throw new Error(`probe login failed while ${held} sessions are held: ${r.stderr}`);
      probeMs.push(r.ms);
    }
    const rss = rssMiB(serve.pid!);
    const over = await ssh(dir, port, 'heavy', 'echo should-not-run');
    const result = {
      date: new Date().toISOString(),
      asked: SESSIONS, held, secondsToOpen: openS,
      probeLoginMs: { p50: pct(probeMs, 50), p95: pct(probeMs, 95), min: Math.min(...probeMs), max: Math.max(...probeMs) },
      serverRssMiB: rss,
      oneMore: { refused: over.code !== 0, exit: over.code, message: over.stderr.trim().slice(0, 200) },
    };
    if (args.json) {
      console.log(JSON.stringify(result, null, 2));
    } else {
      console.log(`One account holding sessions (vesh defaults: maxConnectionsPerAccount 500, maxSessionsPerAccount 500) (${result.date})`);
      console.log(`held ${held}/${SESSIONS} sessions, opened in ${openS.toFixed(1)} s; probe logins of another account p50 ${result.probeLoginMs.p50.toFixed(0)} ms p95 ${result.probeLoginMs.p95.toFixed(0)} ms (${result.probeLoginMs.min.toFixed(0)}–${result.probeLoginMs.max.toFixed(0)}); server RSS ${rss.toFixed(0)} MiB`);
      console.log(`one more connection of the same account: ${result.oneMore.refused ? 'refused' : 'ACCEPTED'} (exit ${String(over.code)}): ${JSON.stringify(result.oneMore.message)}`);
    }
  } finally {
    await cleanupAll();
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
