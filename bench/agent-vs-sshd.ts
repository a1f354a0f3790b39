/**
 * Agent forwarding latency, vesh beside OpenSSH's sshd in one run: one
 * `ssh -A` session per round and server runs `ssh-add -l` N times inside (the
 * VE for vesh, the host for sshd), each a new connection to the agent socket
 * and so a new auth-agent@openssh.com channel to the client's ssh-agent, and
 * prints the time per request; rounds interleaved (vesh, then sshd).
 *
 *   N=100 ROUNDS=7 flock /tmp/vesh-bench.lock npx vite-node bench/agent-vs-sshd.ts
 *
 * Not a test: shared, noisy machines; read the figures side by side.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, promises as fs, readFileSync, chmodSync } from 'node:fs';
import path from 'node:path';
import { loadServerConfig } from '../src/config/server-config.js';
import { removeInstance } from '../test/helpers/ve-env.js';
import { median, sleep, freePort } from './lib.js';
import { startSshd, startVeshServe } from './peers.js';

const N = Number(process.env.N ?? 200);
const ROUNDS = Number(process.env.ROUNDS ?? 5);

function run(args: string[], env: Record<string, string>): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = spawn('ssh', args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = ''; let err = '';
    c.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    c.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    c.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`ssh exit ${code}: ${err}`))));
  });
}

async function main(): Promise<void> {
  const dir = mkdtempSync('/var/tmp/vesh-agent-bench-');
  chmodSync(dir, 0o711);
  const children: ChildProcess[] = [];
  try {
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'id')]);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'agentkey')]);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'hostkey')]);
    const pub = readFileSync(path.join(dir, 'id.pub'), 'utf8').trim();
    const [pVesh, pSshd] = [await freePort(), await freePort()];
    children.push(await startVeshServe(dir, {
      port: pVesh, limits: 'memory: 512M, pids: 512, cpus: 2, disk: 1G', accounts: `agb:\n  keys:\n    - ${pub}\n`,
      bridge: `vab${process.pid % 10000}`, subnet: `10.${200 + (process.pid % 40)}.${process.pid % 250}.0/24`,
    }));
    children.push(await startSshd(dir, { port: pSshd, hostKey: path.join(dir, 'hostkey'), authorizedKey: pub, extra: ['KexAlgorithms curve25519-sha256', 'AllowAgentForwarding yes'] }));
    const agentSock = path.join(dir, 'agent.sock');
    const agent = spawn('ssh-agent', ['-D', '-a', agentSock], { stdio: 'ignore' });
    children.push(agent);
    await sleep(500);
    const env = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: dir, SSH_AUTH_SOCK: agentSock };
    execFileSync('ssh-add', ['-q', path.join(dir, 'agentkey')], { env });
    const base = (port: number, user: string) => ['-F', '/dev/null', '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR',
      '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes', '-i', path.join(dir, 'id'), '-A', '-p', String(port), `${user}@127.0.0.1`];
    const loop = `a=$(date +%s%N); i=0; while [ $i -lt ${N} ]; do ssh-add -l >/dev/null || exit 9; i=$((i+1)); done; b=$(date +%s%N); echo $(( (b-a)/${N} ))`;
    await run([...base(pVesh, 'agb'), 'true'], env); // boots the VE
    const res: Record<string, number[]> = { vesh: [], sshd: [] };
    for (let r = 0; r < ROUNDS; r++) {
      res.vesh!.push(Number((await run([...base(pVesh, 'agb'), loop], env)).trim()) / 1000);
      res.sshd!.push(Number((await run([...base(pSshd, 'root'), loop], env)).trim()) / 1000);
    }
    const f = (v: number[]) => `${median(v).toFixed(0)} µs (${Math.min(...v).toFixed(0)}-${Math.max(...v).toFixed(0)})`;
    console.log(`agent request through the forwarded agent (ssh-add -l, ${N} per round, ${ROUNDS} rounds interleaved): vesh ${f(res.vesh!)}, OpenSSH sshd ${f(res.sshd!)}, ratio ${(median(res.vesh!) / median(res.sshd!)).toFixed(2)}; per round vesh/sshd: ${res.vesh!.map((v, i) => (v / res.sshd![i]!).toFixed(2)).join(' ')}`);
  } finally {
    for (const c of [...children].reverse()) c.kill('SIGTERM');
    await sleep(1500);
    await removeInstance(loadServerConfig(path.join(dir, 'vesh.yaml'))).catch((e) => console.error('cleanup', e));
    await fs.rm(dir, { recursive: true, force: true });
  }
}
void main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
