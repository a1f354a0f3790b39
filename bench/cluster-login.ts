import { readFileSync, writeFileSync } from 'node:fs';
import { clusterSchema, resolveClusterConfig } from '../src/config/cluster.js';
import { connectEtcd } from '../src/cluster/etcd.js';
import { Cleanup, makeClientKey, sshWithKey, startVeshServe, tempDir, writeAccounts, type ServeProcess } from '../test/helpers/ssh-harness.js';
import { makeVeTestEnv } from '../test/helpers/ve-env.js';
import { startEtcdCluster } from '../test/helpers/etcd-cluster.js';
import { freePort, median, pct } from './lib.js';

/**
 * What cluster mode costs a login: login + `true` with OpenSSH against
 * three `vesh serve` instances in the same run, rounds interleaved:
 *  - `off`: cluster mode off, its own running busybox VE;
 *  - `on`: node nb of a two-node cluster (three etcd members on loopback),
 *    the account's VE placed and running on it, logged in there;
 *  - `carried`: node na of that cluster, the same account: na authenticates
 *    the login and carries it to nb (node key, nb's SSH port).
 * `on` against `off` is what cluster mode costs a local login; `carried`
 * against `on` is the extra latency of logging in through another node.
 * And the etcd writes logins make: the etcd revision before and after
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
    const serve = async (node: string | null): Promise<ServeProcess> => {
      const port = await freePort();
      const env = await makeVeTestEnv({
        template: 'busybox',
        extraYaml: node ? `cluster: { enabled: true, name: ${node}, clusterName: bench, advertise: "127.0.0.1:${port}", loadInterval: 300, etcd: { endpoints: ${JSON.stringify(etcd.endpoints)} } }` : '',
      });
      cleanup.add(() => env.cleanup());
      writeFileSync(env.configFile, readFileSync(env.configFile, 'utf8').replace('listen: "127.0.0.1:0"', `listen: "127.0.0.1:${port}"`));
      writeAccounts(env.config.accountsFile, `u:\n  keys:\n    - ${key.publicLine}\n`);
      return startVeshServe(cleanup, env.configFile);
    };
    const off = await serve(null);
    const on = await serve('nb');
    const client = await connectEtcd(resolveClusterConfig(clusterSchema.parse({ enabled: true, etcd: { endpoints: etcd.endpoints } }), '/', { host: '127.0.0.1', port: 1 }));
    cleanup.add(() => client.close());
    const revision = async () => Number((await client.get('/vesh/bench/ves/u').exec()).header.revision);

    const login = async (s: ServeProcess) => {
      const t0 = process.hrtime.bigint();
      const r = await sshWithKey(s.port, 'u', key, ['true'], { timeoutMs: 60_000 });
      if (r.code !== 0) throw new Error(`login failed: ${r.stderr}`);
      return Number(process.hrtime.bigint() - t0) / 1e6;
    };
    // First logins create and start the VEs; the cluster's places its VE on nb (its only write).
    const r0 = await revision();
    await login(on);
    const r1 = await revision();
    await login(off);
    // na joins after the VE is placed on nb (the only live node then).
    const carried = await serve('na');
    await login(carried);
    const servers = { off, on, carried };
    type Which = keyof typeof servers;
    const times: Record<Which, number[]> = { off: [], on: [], carried: [] };
    const rBefore = await revision();
    const orders: Which[][] = [['off', 'on', 'carried'], ['carried', 'on', 'off'], ['on', 'carried', 'off'], ['off', 'carried', 'on'], ['on', 'off', 'carried'], ['carried', 'off', 'on']];
    for (let i = 0; i < ROUNDS; i++) {
      for (const which of orders[i % orders.length]!) times[which].push(await login(servers[which]));
    }
    const rAfter = await revision();
    const fmt = (xs: number[]) => `median ${median(xs).toFixed(1)} ms (p10 ${pct(xs, 10).toFixed(1)}, p90 ${pct(xs, 90).toFixed(1)}, min ${Math.min(...xs).toFixed(1)}, max ${Math.max(...xs).toFixed(1)})`;
    console.log(`login + true, OpenSSH client, ${ROUNDS} interleaved rounds, busybox VE already running:`);
    console.log(`  cluster off:                  ${fmt(times.off)}`);
    console.log(`  cluster on, VE on this node:  ${fmt(times.on)}`);
    console.log(`  carried from another node:    ${fmt(times.carried)}`);
    console.log(`  cluster on - off (medians): ${(median(times.on) - median(times.off)).toFixed(1)} ms`);
    console.log(`  carried - on (medians): ${(median(times.carried) - median(times.on)).toFixed(1)} ms; per-round differences: median ${median(times.carried.map((t, i) => t - times.on[i]!)).toFixed(1)} ms, p10 ${pct(times.carried.map((t, i) => t - times.on[i]!), 10).toFixed(1)}, p90 ${pct(times.carried.map((t, i) => t - times.on[i]!), 90).toFixed(1)}`);
    console.log(`etcd writes (revisions): first login of a new VE ${r1 - r0}; ${ROUNDS * 2} logins to the placed VE (half of them carried) ${rAfter - rBefore} (${((rAfter - rBefore) / (ROUNDS * 2)).toFixed(2)} per login)`);
  } finally {
    await cleanup.run();
  }
}

await main();
