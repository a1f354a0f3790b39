import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/audit/logger.js';
import { clusterSchema, resolveClusterConfig, type ClusterConfig } from '../../src/config/cluster.js';
import { connectEtcd, type Etcd3 } from '../../src/cluster/etcd.js';
import { ClusterVeAccess, liveNodesReader } from '../../src/cluster/cluster-ves.js';
import { Placement } from '../../src/cluster/placement.js';
import { isVeshError } from '../../src/errors.js';
import { Cleanup, ensureBuilt, tempDir } from '../helpers/ssh-harness.js';
import { CountingVes, nodeRecord, startEtcdCluster, type EtcdCluster } from '../helpers/etcd-cluster.js';

/**
 * What a hostile party tries against the cluster's records. Every node can
 * write every key (etcd has no per-node rights here), so a compromised node
 * writes whatever it likes; and a client or an accounts file could bring a
 * name built to leave its key prefix. The records must be bounded in size,
 * strictly parsed, never used as a path or a key, and one bad record must
 * not take down status, placement or logins to other VEs.
 *
 * Checked against the guards removed: with parseBounded in
 * src/cluster/records.ts returning the JSON unchecked, status lists the
 * forged nodes "escape" and "huge" as live, and alice's login is taken as
 * placed on node "../../etc" (VESH_VE_ELSEWHERE naming it) instead of
 * VESH_CLUSTER_RECORD_INVALID; with the name check in src/cluster/keys.ts
 * removed, "../nodes/na" and the other names go on to placement instead of
 * VESH_INVALID_NAME.
 */

describe('adversarial: hostile cluster records and names', () => {
  const cleanup = new Cleanup();
  let etcd: EtcdCluster;
  let cfg: ClusterConfig;
  let client: Etcd3;
  let configFile: string;

  beforeAll(async () => {
    ensureBuilt();
    etcd = await startEtcdCluster(cleanup);
    cfg = resolveClusterConfig(clusterSchema.parse({ enabled: true, name: 'na', clusterName: 'adv', etcd: { endpoints: etcd.endpoints } }), '/', { host: '127.0.0.1', port: 2222 });
    client = await connectEtcd(cfg);
    cleanup.add(() => client.close());
    const dir = tempDir(cleanup);
    configFile = path.join(dir, 'vesh.yaml');
    writeFileSync(configFile, `listen: "127.0.0.1:2222"\ndataDir: ${dir}/data\ncluster: { enabled: true, name: na, clusterName: adv, etcd: { endpoints: ${JSON.stringify(etcd.endpoints)} } }\n`);
    // What a compromised node writes.
    const now = new Date().toISOString();
    await client.put('/vesh/adv/nodes/honest').value(JSON.stringify(nodeRecord('honest'))).exec();
    await client.put('/vesh/adv/nodes/escape').value(JSON.stringify(nodeRecord('escape', { address: '\u001b]0;owned\u0007:22' }))).exec();
    await client.put('/vesh/adv/nodes/huge').value(JSON.stringify(nodeRecord('huge')).replace('"name"', `"pad":"${'x'.repeat(200_000)}","name"`)).exec();
    await client.put('/vesh/adv/nodes/liar').value(JSON.stringify(nodeRecord('other'))).exec();
    await client.put('/vesh/adv/nodes/../ves/x').value(JSON.stringify(nodeRecord('x'))).exec();
    await client.put('/vesh/adv/nodes/a/b').value('{}').exec();
    await client.put('/vesh/adv/ves/alice').value(JSON.stringify({ node: '../../etc', created: now, placedBy: 'escape' })).exec();
    await client.put('/vesh/adv/ves/mallory').value('{"node":"na","created":"' + now + '","placedBy":"na","x":"' + 'y'.repeat(5000) + '"}').exec();
    await client.put('/vesh/adv/ves/bob').value(JSON.stringify({ node: 'honest', created: now, placedBy: 'honest' })).exec();
  }, 60_000);

  afterAll(async () => {
    await cleanup.run();
  });

  it('vesh cluster status lists the honest records and reports each forged one, printing no escape sequence', async () => {
    const run = (args: string[]) => new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
      execFile(process.execPath, [path.resolve('bin/vesh.js'), '--config', configFile, 'cluster', 'status', ...args], { encoding: 'utf8' }, (err, stdout, stderr) => resolve({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stdout, stderr }));
    });
    const r = await run(['--json']);
    expect(r.code, r.stderr).toBe(0);
    const s = JSON.parse(r.stdout) as { nodes: Array<{ name: string }>; ves: Array<{ ve: string; node: string }>; invalidRecords: Array<{ key: string; problem: string }> };
    expect(s.nodes.map((n) => n.name)).toEqual(['honest']);
    expect(s.ves).toEqual([expect.objectContaining({ ve: 'bob', node: 'honest' })]);
    const problems = s.invalidRecords.map((b) => `${b.key}: ${b.problem}`).join('\n');
    expect(problems).toMatch(/nodes\/escape: .*address/);
    expect(problems).toMatch(/nodes\/huge: .*over the 32768 allowed/);
    expect(problems).toMatch(/nodes\/liar: .*names node other/);
    expect(problems).toMatch(/nodes\/\.\.\/ves\/x.*not a node name/);
    expect(problems).toMatch(/nodes\/a\/b.*not a node name/);
    expect(problems).toMatch(/ves\/alice: .*node/);
    expect(problems).toMatch(/ves\/mallory: .*over the 1024 allowed/);
    const text = await run([]);
    expect(text.code, text.stderr).toBe(0);
    // eslint-disable-next-line no-control-regex
    expect(text.stdout).not.toMatch(/\u001b|\u0007/);
  });

  it('a login whose VE has a forged placement is refused as invalid, neither created here nor sent anywhere', async () => {
    const inner = new CountingVes();
    const gate = new ClusterVeAccess(inner, { cfg, placement: new Placement(client, cfg), nodes: liveNodesReader(client, cfg, silentLogger()), defaultTemplate: 'busybox', log: silentLogger() });
    for (const ve of ['alice', 'mallory']) {
      const err = await gate.ensureRunning(ve).then(() => null, (e: unknown) => e);
      expect(isVeshError(err, 'VESH_CLUSTER_RECORD_INVALID'), `${ve}: ${String(err)}`).toBe(true);
    }
    expect(inner.ensured).toEqual([]);
    // The forged nodes are never chosen for a new VE: only the honest one is live.
    const err = await gate.ensureRunning('newve').then(() => null, (e: unknown) => e);
    expect((err as { userMessage?: string }).userMessage).toMatch(/lives on cluster node honest/);
  });

  it.each(['../nodes/na', 'a/b', '..', 'x\u0000y', 'ALICE'])('a VE name that tries to leave its key prefix (%j) writes no key', async (ve) => {
    const before = (await client.getAll().prefix('/').keys()).sort();
    const gate = new ClusterVeAccess(new CountingVes(), { cfg, placement: new Placement(client, cfg), nodes: async () => [], defaultTemplate: 'busybox', log: silentLogger() });
    const err = await gate.ensureRunning(ve).then(() => null, (e: unknown) => e);
    expect(isVeshError(err, 'VESH_INVALID_NAME'), String(err)).toBe(true);
    expect(await new Placement(client, cfg).claim(ve, 'na').then(() => null, (e: unknown) => e)).toBeInstanceOf(Error);
    expect((await client.getAll().prefix('/').keys()).sort()).toEqual(before);
  });
});
