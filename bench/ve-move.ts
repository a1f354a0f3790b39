/**
 * vesh ve move of a stopped VE with DATA MiB of incompressible data between
 * two nodes on one machine (etcd of three members, two vesh serve), beside
 * two peers moving the same backup file: `cp` (a local copy: the disk's
 * own speed) and OpenSSH (ssh -> Debian's sshd, `cat > FILE`: the same
 * bytes through an SSH channel). Reported for vesh: the whole move (the
 * CLI's run: checks, backup, transfer, restore on the other node, flip,
 * local destroy), its transfer-and-restore part (the CLI's "restored on
 * node ... in S s") and the stream alone (the receiving broker's
 * cluster.move_received). The VE goes back and forth; rounds interleaved;
 * medians and min-max. Run as root under the bench lock:
 *   flock /tmp/vesh-bench.lock ./node_modules/.bin/vite-node bench/ve-move.ts -- [rounds] [dataMiB]
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, rmSync, statSync } from 'node:fs';
import path from 'node:path';
import { Cleanup, freePort, makeClientKey, startVeshServe, tempDir } from '../test/helpers/ssh-harness.js';
import { shInVe, waitFor, type VeTestEnv } from '../test/helpers/ve-env.js';
import { startEtcdCluster } from '../test/helpers/etcd-cluster.js';
import { clusterNodeEnv } from '../test/helpers/cluster-node.js';
import { startSshd } from './peers.js';
import { spread } from './lib.js';

const rounds = Number(process.argv[2] ?? 5);
const dataMiB = Number(process.argv[3] ?? 64);
const cleanup = new Cleanup();

const cli = (env: VeTestEnv, args: string[]): string => execFileSync(process.execPath, [path.resolve('bin/vesh.js'), '--config', env.configFile, ...args], { encoding: 'utf8' });

try {
  const etcd = await startEtcdCluster(cleanup);
  const node = (name: string) => clusterNodeEnv(cleanup, { name, clusterName: 'bm', endpoints: etcd.endpoints, leaseSeconds: 5, timeoutMs: 2000 });
  const a = await node('na');
  const b = await node('nb');
  const [serveA, serveB] = await Promise.all([startVeshServe(cleanup, a.configFile), startVeshServe(cleanup, b.configFile)]);
  await waitFor('template digests on both nodes', async () => {
    const s = JSON.parse(cli(a, ['cluster', 'status', '--json'])) as { nodes: Array<{ templates: Array<{ digest: string | null }> }> };
    return s.nodes.length === 2 && s.nodes.every((n) => n.templates.every((t) => t.digest !== null));
  }, 60_000);

  cli(a, ['ve', 'create', 'mv', '--disk', '1G']);
  await a.ves.start('mv');
  await shInVe(a, 'mv', `dd if=/dev/urandom of=/root/blob bs=1M count=${dataMiB} 2>/dev/null; sync`, { timeoutMs: 300_000 });
  await a.ves.stop('mv');

  // The peers' file: the VE's own backup, so all three move the same bytes.
  const work = tempDir(cleanup, 'vesh-bench-move-');
  const file = path.join(work, 'mv.vbk');
  cli(a, ['ve', 'backup', 'mv', file]);
  const bytes = statSync(file).size;
  const dest = path.join(b.dir, 'peer-copy.vbk');
  const sshdPort = await freePort();
  const hostKey = path.join(work, 'sshd_host_key');
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', hostKey]);
  const key = makeClientKey(work, 'ed25519', 'peer');
  const sshd = await startSshd(work, { port: sshdPort, hostKey, authorizedKey: key.publicLine });
  cleanup.add(() => { sshd.kill('SIGTERM'); });
  const sshArgs = ['-F', '/dev/null', '-p', String(sshdPort), '-i', key.file, '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'BatchMode=yes', '-o', 'LogLevel=ERROR', 'root@127.0.0.1'];

  const whole: number[] = [];
  const transfer: number[] = [];
  const stream: number[] = [];
  const received = new Map<unknown, number>();
  const cp: number[] = [];
  const ssh: number[] = [];
  let here = a;
  let there = b;
  for (let i = 0; i < rounds; i++) {
    const t0 = performance.now();
    const out = cli(here, ['ve', 'move', 'mv', '--to', there === a ? 'na' : 'nb']);
    whole.push((performance.now() - t0) / 1000);
    const m = /restored on node \S+ in ([0-9.]+) s/.exec(out);
    if (!m) throw new Error(`no transfer time in: ${out}`);
    transfer.push(Number(m[1]));
    // The stream alone, as the receiving broker timed it (the restore follows it).
    const receiver = there === a ? serveA : serveB;
    const lines = () => receiver.logs.filter((l) => l.event === 'cluster.move_received');
    // Its log reaches us through a pipe, maybe after the CLI ended.
    await waitFor('the receiver\'s cluster.move_received line', async () => lines().length > (received.get(receiver) ?? 0), 10_000);
    received.set(receiver, lines().length);
    stream.push(Number(lines().pop()!.ms) / 1000);
    [here, there] = [there, here];

    const t1 = performance.now();
    execFileSync('cp', [file, dest]);
    execFileSync('sync', ['-f', dest]);
    cp.push((performance.now() - t1) / 1000);
    rmSync(dest, { force: true });

    const t2 = performance.now();
    const r = spawnSync('ssh', [...sshArgs, `cat > ${dest} && sync -f ${dest}`], { input: readFileSync(file), stdio: ['pipe', 'ignore', 'inherit'] });
    if (r.status !== 0) throw new Error('ssh peer failed');
    ssh.push((performance.now() - t2) / 1000);
    rmSync(dest, { force: true });
  }
  const mib = bytes / 1048576;
  const show = (what: string, xs: number[]) => {
    const s = spread(xs);
    console.log(`${what.padEnd(44)} ${s.median.toFixed(2)} s (${s.min.toFixed(2)}-${s.max.toFixed(2)})  ${(mib / s.median).toFixed(0)} MiB/s (${(mib / s.max).toFixed(0)}-${(mib / s.min).toFixed(0)})`);
  };
  console.log(`a ${dataMiB} MiB VE (backup ${mib.toFixed(1)} MiB), ${rounds} interleaved rounds, medians (min-max):`);
  show('vesh ve move, whole', whole);
  show('vesh ve move, transfer + restore on the node', transfer);
  show('vesh ve move, the stream alone (receiver)', stream);
  show('peer: cp of the backup file (+ sync)', cp);
  show('peer: OpenSSH ssh -> sshd, cat > file (+ sync)', ssh);
} finally {
  await cleanup.run();
}
