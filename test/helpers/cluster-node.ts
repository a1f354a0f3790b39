import { readFileSync, writeFileSync } from 'node:fs';
import { freePort, type Cleanup } from './ssh-harness.js';
import { makeVeTestEnv, type VeTestEnv } from './ve-env.js';

/**
 * One vesh node of a test cluster: its own data dir, bridge, subnet and a
 * fixed SSH port it advertises to the other nodes (a port picked at bind
 * time could not be told them), in cluster mode on `endpoints`.
 */
export async function clusterNodeEnv(cleanup: Cleanup, opts: {
  name: string;
  clusterName: string;
  endpoints: string[];
  template?: 'busybox' | 'debian';
  leaseSeconds?: number;
  loadInterval?: number;
  timeoutMs?: number;
}): Promise<VeTestEnv> {
  const port = await freePort();
  const env = await makeVeTestEnv({
    template: opts.template ?? 'busybox',
    extraYaml: `cluster: { enabled: true, name: ${opts.name}, clusterName: ${opts.clusterName}, advertise: "127.0.0.1:${port}", leaseSeconds: ${opts.leaseSeconds ?? 3}, loadInterval: ${opts.loadInterval ?? 60}, etcd: { endpoints: ${JSON.stringify(opts.endpoints)}, timeout: ${opts.timeoutMs ?? 1500} } }`,
  });
  cleanup.add(() => env.cleanup());
  writeFileSync(env.configFile, readFileSync(env.configFile, 'utf8').replace('listen: "127.0.0.1:0"', `listen: "127.0.0.1:${port}"`));
  return env;
}
