import { readFileSync, writeFileSync } from 'node:fs';
import { clusterSchema, resolveClusterConfig } from '../src/config/cluster.js';
import { connectEtcd } from '../src/cluster/etcd.js';
import { Cleanup, makeClientKey, sshWithKey, startVeshServe, tempDir, writeAccounts, type ServeProcess } from '../test/helpers/ssh-harness.js';
import { makeVeTestEnv } from '../test/helpers/ve-env.js';
import { startEtcdCluster } from '../test/helpers/etcd-cluster.js';
import { freePort, median, pct } from './lib.js';

/**
 * What cluster mode costs a login to a VE on the node itself: login + `true`
 * with OpenSSH against two `vesh serve` instances in the same run, one with
 * cluster mode off and one on (a one-node cluster on three etcd members on
 * loopback), each with its own running busybox VE; rounds interleaved.
 * And the etcd writes a login makes: the etcd revision before and after
 * (load updates set to every 300 s, so none fall in between).
 * Run under the bench lock: flock /tmp/vesh-bench.lock npx vite-node bench/cluster-login.ts -- [rounds]
 */

const ROUNDS = Number(process.argv[2] ?? 30);

async function main(): Promise<void> {
  const cleanup = new Cleanup();
  try {
    const etcd = await startEtcdCluster(cleanup);
    const dir = tempDir(cleanup);
    const key = makeClientKey(dir, 'ed25519', 'bench');
    const serve = async (cluster: boolean): Promise<ServeProcess> => {
      const port = await freePort();
      const env = await makeVeTestEnv({
        template: 'busybox',
        extraYaml: cluster ? `cluster: { enabled: true, name: bench, clusterName: bench, advertise: "127.0.0.1:${port}", loadInterval: 300, etcd: { endpoints: ${JSON.stringify(etcd.endpoints)} } }` : '',
      });
      cleanup.add(() => env.cleanup());
      writeFileSync(env.configFile, readFileSync(env.configFile, 'utf8').replace('listen: "127.0.0.1:0"', `listen: "127.0.0.1:${port}"`));
      writeAccounts(env.config.accountsFile, `u:\n  keys:\n    - ${key.publicLine}\n`);
      return startVeshServe(cleanup, env.configFile);
    };
    const off = await serve(false);
    const on = await serve(true);
    const client = await connectEtcd(resolveClusterConfig(clusterSchema.parse({ enabled: true, etcd: { endpoints: etcd.endpoints } }), '/', { host: '127.0.0.1', port: 1 }));
    cleanup.add(() => client.close());
    const revision = async () => Number((await client.get('/vesh/bench/ves/u').exec()).header.revision);

    const login = async (s: ServeProcess) => {
      const t0 = process.hrtime.bigint();
      const r = await sshWithKey(s.port, 'u', key, ['true'], { timeoutMs: 60_000 });
      if (r.code !== 0) throw new Error(`login failed: ${r.stderr}`);
      return Number(process.hrtime.bigint() - t0) / 1e6;
    };
    // First logins create and start the VEs; the cluster one places its VE (its only write).
    const r0 = await revision();
    await login(on);
    const r1 = await revision();
    await login(off);
    const times: Record<'off' | 'on', number[]> = { off: [], on: [] };
    const rBefore = await revision();
    for (let i = 0; i < ROUNDS; i++) {
      const order: Array<'off' | 'on'> = i % 2 === 0 ? ['off', 'on'] : ['on', 'off'];
      for (const which of order) times[which].push(await login(which === 'on' ? on : off));
    }
    const rAfter = await revision();
    const fmt = (xs: number[]) => `median ${median(xs).toFixed(1)} ms (p10 ${pct(xs, 10).toFixed(1)}, p90 ${pct(xs, 90).toFixed(1)}, min ${Math.min(...xs).toFixed(1)}, max ${Math.max(...xs).toFixed(1)})`;
    console.log(`login + true, OpenSSH client, ${ROUNDS} interleaved rounds, busybox VE already running:`);
    console.log(`  cluster off: ${fmt(times.off)}`);
    console.log(`  cluster on:  ${fmt(times.on)}`);
    console.log(`  difference of medians: ${(median(times.on) - median(times.off)).toFixed(1)} ms`);
    console.log(`etcd writes (revisions): first login of a new VE ${r1 - r0}; ${ROUNDS} logins to the placed VE ${rAfter - rBefore} (${((rAfter - rBefore) / ROUNDS).toFixed(2)} per login)`);
  } finally {
    await cleanup.run();
  }
}

await main();
