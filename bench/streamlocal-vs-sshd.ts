/**
 * Unix-socket forwarding throughput, vesh beside OpenSSH's sshd in one run:
 * one upload of MIB MiB per round through `ssh -L /local.sock:/remote.sock`
 * (the far end in the VE for vesh, on the host for sshd), rounds interleaved.
 * The far end (perl, IO::Socket::UNIX) counts the bytes and answers with the
 * count once the client half-closes; timed on the client, and a short count
 * fails the run.
 *
 *   MIB=256 ROUNDS=7 flock /tmp/vesh-bench.lock npx vite-node bench/streamlocal-vs-sshd.ts
 *
 * Not a test: shared, noisy machines; read the figures side by side.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, promises as fs, readFileSync, chmodSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { loadServerConfig } from '../src/config/server-config.js';
import { removeInstance } from '../test/helpers/ve-env.js';
import { median, sleep, freePort } from './lib.js';
import { startSshd, startVeshServe } from './peers.js';

const MIB = Number(process.env.MIB ?? 256);
const ROUNDS = Number(process.env.ROUNDS ?? 5);
const SINK = (sock: string) => `rm -f ${sock}; setsid perl -MIO::Socket::UNIX -e '$s=IO::Socket::UNIX->new(Local=>"${sock}",Listen=>5) or die; while($c=$s->accept){my $n=0; my $b; while(my $r=sysread($c,$b,1<<20)){$n+=$r} print $c "$n\\n"; close $c}' >/dev/null 2>&1 </dev/null & for i in $(seq 50); do [ -S ${sock} ] && break; sleep 0.1; done; echo ok`;

function upload(sock: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const chunk = Buffer.alloc(1 << 20, 7);
    const s = net.connect(sock);
    let sent = 0; let answer = '';
    const t0 = process.hrtime.bigint();
    const pump = () => { while (sent < MIB) { sent++; if (!s.write(chunk)) { s.once('drain', pump); return; } } s.end(); };
    s.on('connect', pump);
    s.on('data', (d: Buffer) => { answer += d.toString(); });
    s.on('error', reject);
    s.on('close', () => {
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      if (Number(answer.trim()) !== MIB * 1048576) reject(new Error(`far end got ${answer.trim()}`));
      else resolve(MIB / secs);
    });
  });
}

async function main(): Promise<void> {
  const dir = mkdtempSync('/var/tmp/vesh-sl-bench-');
  chmodSync(dir, 0o711);
  const children: ChildProcess[] = [];
  try {
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'id')]);
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(dir, 'hostkey')]);
    const pub = readFileSync(path.join(dir, 'id.pub'), 'utf8').trim();
    const [pVesh, pSshd] = [await freePort(), await freePort()];
    children.push(await startVeshServe(dir, {
      port: pVesh, limits: 'memory: 1G, pids: 512, cpus: 2, disk: 1G', accounts: `slb:\n  keys:\n    - ${pub}\n`,
      bridge: `vsb${process.pid % 10000}`, subnet: `10.${200 + (process.pid % 40)}.${(process.pid >> 3) % 250}.0/24`,
    }));
    children.push(await startSshd(dir, { port: pSshd, hostKey: path.join(dir, 'hostkey'), authorizedKey: pub, extra: ['KexAlgorithms curve25519-sha256', 'AllowStreamLocalForwarding yes'] }));
    const env = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: dir };
    const base = (port: number, user: string) => ['-F', '/dev/null', '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR',
      '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes', '-o', 'IdentityAgent=none', '-i', path.join(dir, 'id'), '-p', String(port), `${user}@127.0.0.1`];
    execFileSync('ssh', [...base(pVesh, 'slb'), SINK('/tmp/sink.sock')], { env });
    const hostSink = path.join(dir, 'sink.sock');
    const sinkProgram = '$s=IO::Socket::UNIX->new(Local=>$ARGV[0],Listen=>5) or die; while($c=$s->accept){my $n=0; my $b; while(my $r=sysread($c,$b,1<<20)){$n+=$r} print $c "$n\\n"; close $c}';
    children.push(spawn('perl', ['-MIO::Socket::UNIX', '-e', sinkProgram, hostSink], { stdio: 'ignore' }));
    for (let i = 0; i < 50 && !existsSync(hostSink); i++) await sleep(100);
    const fwd = (port: number, user: string, local: string, remote: string) => {
      const c = spawn('ssh', [...base(port, user).slice(0, -1), '-N', '-o', 'ExitOnForwardFailure=yes', '-L', `${local}:${remote}`, base(port, user).at(-1)!], { env, stdio: 'ignore' });
      children.push(c);
    };
    const lVesh = path.join(dir, 'l-vesh.sock'); const lSshd = path.join(dir, 'l-sshd.sock');
    fwd(pVesh, 'slb', lVesh, '/tmp/sink.sock');
    fwd(pSshd, 'root', lSshd, hostSink);
    for (let i = 0; i < 100 && !(existsSync(lVesh) && existsSync(lSshd)); i++) await sleep(100);
    const res: Record<string, number[]> = { vesh: [], sshd: [] };
    for (let r = 0; r < ROUNDS; r++) {
      res.vesh!.push(await upload(lVesh));
      res.sshd!.push(await upload(lSshd));
    }
    const f = (v: number[]) => `${median(v).toFixed(0)} MiB/s (${Math.min(...v).toFixed(0)}-${Math.max(...v).toFixed(0)})`;
    console.log(`ssh -L sock:sock upload, ${MIB} MiB, ${ROUNDS} rounds interleaved: vesh ${f(res.vesh!)}, OpenSSH sshd ${f(res.sshd!)}, ratio ${(median(res.vesh!) / median(res.sshd!)).toFixed(2)}; per round vesh/sshd: ${res.vesh!.map((v, i) => (v / res.sshd![i]!).toFixed(2)).join(' ')}`);
  } finally {
    for (const c of [...children].reverse()) c.kill('SIGTERM');
    await sleep(1500);
    await removeInstance(loadServerConfig(path.join(dir, 'vesh.yaml'))).catch((e) => console.error('cleanup', e));
    await fs.rm(dir, { recursive: true, force: true });
  }
}
void main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
