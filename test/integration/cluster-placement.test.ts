import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/audit/logger.js';
import { resolveClusterConfig, clusterSchema, type ClusterConfig } from '../../src/config/cluster.js';
import { connectEtcd, type Etcd3 } from '../../src/cluster/etcd.js';
import { Membership } from '../../src/cluster/membership.js';
import { Placement } from '../../src/cluster/placement.js';
import { readNodes, readState } from '../../src/cluster/cluster-state.js';
import { ClusterVeAccess } from '../../src/cluster/cluster-ves.js';
import { isVeshError } from '../../src/errors.js';
import { Cleanup, freePort } from '../helpers/ssh-harness.js';
import { CountingVes, nodeRecord, startEtcdCluster, type EtcdCluster } from '../helpers/etcd-cluster.js';

/**
 * The cluster modules against a real etcd of three members on loopback:
 * the placement race many times over, the lease that keeps a node's
 * registration and drops it, a node name held by a live process, one etcd
 * member killed, and an etcd that does not answer.
 */

function clusterCfg(endpoints: string[], node: string, over: Record<string, unknown> = {}): ClusterConfig {
  return resolveClusterConfig(clusterSchema.parse({ enabled: true, name: node, clusterName: 'ptest', leaseSeconds: 2, loadInterval: 1, etcd: { endpoints, timeout: 1500 }, ...over }), '/', { host: '127.0.0.1', port: 2222 });
}

describe('cluster placement and membership on a real etcd', () => {
  const cleanup = new Cleanup();
  let etcd: EtcdCluster;
  const clients: Etcd3[] = [];
  const client = async (cfg: ClusterConfig) => {
    const c = await connectEtcd(cfg);
    clients.push(c);
    return c;
  };

  beforeAll(async () => {
    etcd = await startEtcdCluster(cleanup);
    cleanup.add(() => { for (const c of clients) c.close(); });
  }, 60_000);

  afterAll(async () => {
    await cleanup.run();
  });

  it('two nodes racing to place the same VE leave exactly one record, 40 times over', async () => {
    const a = clusterCfg(etcd.endpoints, 'a');
    const b = clusterCfg(etcd.endpoints, 'b');
    // Separate clients on different members: the race goes through the Raft log, not one connection.
    const pa = new Placement(await client({ ...a, etcd: { ...a.etcd, endpoints: [etcd.endpoint(0)] } }), a);
    const pb = new Placement(await client({ ...b, etcd: { ...b.etcd, endpoints: [etcd.endpoint(1)] } }), b);
    const check = await client(a);
    let aWon = 0;
    for (let i = 0; i < 40; i++) {
      const ve = `race-${i}`;
      const [ra, rb] = await Promise.all([pa.claim(ve, 'a'), pb.claim(ve, 'b')]);
      expect(Number(ra.won) + Number(rb.won)).toBe(1);
      expect(ra.placement.node).toBe(rb.placement.node);
      const kvs = (await check.getAll().prefix(`/vesh/ptest/ves/${ve}`).exec()).kvs;
      expect(kvs.length).toBe(1);
      // Written once, never overwritten by the loser.
      expect(String(kvs[0]!.version)).toBe('1');
      if (ra.won) aWon += 1;
    }
    console.log(`placement race: node a won ${aWon} of 40, node b ${40 - aWon}`);
  });

  it('keeps a node registered while it renews, refuses its name to a second live process, and frees it when the node leaves', async () => {
    const cfg = clusterCfg(etcd.endpoints, 'held');
    const c1 = await client(cfg);
    const m1 = new Membership({ client: c1, cfg, log: silentLogger(), record: async () => nodeRecord('held') });
    await m1.join();
    // Past two lease lengths: still there, renewed by the client's keepalive.
    await new Promise((r) => setTimeout(r, 4500));
    const seen = await readNodes(await client(cfg), cfg, { ttl: true });
    const mine = seen.find((n) => n.record.name === 'held');
    expect(mine).toBeDefined();
    expect(mine!.leaseRemaining).toBeGreaterThan(0);

    const m2 = new Membership({ client: await client(cfg), cfg, log: silentLogger(), record: async () => nodeRecord('held') });
    const err = await m2.join().then(() => null, (e: unknown) => e);
    expect(isVeshError(err, 'VESH_CLUSTER_NODE_TAKEN'), String(err)).toBe(true);
    expect(String((err as Error).message)).toMatch(/registered .* by another live vesh process/);

    // Leaving revokes the lease: the record goes at once, and the name is free for a new process.
    await m1.leave();
    expect((await readNodes(await client(cfg), cfg)).map((n) => n.record.name)).not.toContain('held');
    const m3 = new Membership({ client: await client(cfg), cfg, log: silentLogger(), record: async () => nodeRecord('held') });
    await m3.join();
    await m3.leave();
  }, 40_000);

  it('a VE placed here logs in with no etcd call at all, even with etcd unreachable; a new one fails fast with a message', async () => {
    const dead = clusterCfg([`http://127.0.0.1:${await freePort()}`], 'a', { etcd: { endpoints: [`http://127.0.0.1:${await freePort()}`], timeout: 500 } });
    const inner = new CountingVes();
    const gate = new ClusterVeAccess(inner, {
      cfg: dead, placement: new Placement(await client(dead), dead), nodes: async () => [], defaultTemplate: 'busybox', log: silentLogger(),
    });
    gate.local.add('cached');
    await gate.ensureRunning('cached');
    expect(inner.ensured).toEqual(['cached']);
    const err = await gate.ensureRunning('fresh').then(() => null, (e: unknown) => e);
    expect(isVeshError(err, 'VESH_CLUSTER_UNAVAILABLE'), String(err)).toBe(true);
    expect((err as { userMessage: string }).userMessage).toMatch(/cluster database does not answer/);
    expect((err as Error).message).toMatch(/etcdctl --endpoints=.* endpoint health/);
    expect(inner.ensured).toEqual(['cached']);
  }, 20_000);

  it('places a new VE on the least-loaded live node (locate names it), and refuses to run here a VE placed there', async () => {
    const a = clusterCfg(etcd.endpoints, 'pa');
    const nodes = [
      { record: nodeRecord('pa', { load: { runningVes: 9, sessions: 0, loadavg: [0, 0, 0] } }), leaseRemaining: 2 },
      { record: nodeRecord('pb', { address: '127.0.0.2:2222' }), leaseRemaining: 2 },
    ];
    const inner = new CountingVes();
    const gate = new ClusterVeAccess(inner, { cfg: a, placement: new Placement(await client(a), a), nodes: async () => nodes, defaultTemplate: 'busybox', log: silentLogger() });
    expect(await gate.locate('newve')).toBe('pb');
    const err = await gate.ensureRunning('newve').then(() => null, (e: unknown) => e);
    expect(isVeshError(err, 'VESH_VE_ELSEWHERE'), String(err)).toBe(true);
    expect((err as Error).message).toBe('VE newve lives on node pb (127.0.0.2:2222): run this there');
    expect(inner.ensured).toEqual([]);
    // pb gets busier: the next new VE comes here.
    nodes[1]!.record.load.runningVes = 50;
    await gate.ensureRunning('second');
    expect(inner.ensured).toEqual(['second']);
  });

  it('goes on when one etcd member of three is killed: renewal, placement and status', async () => {
    const cfg = clusterCfg(etcd.endpoints, 'survivor');
    const m = new Membership({ client: await client(cfg), cfg, log: silentLogger(), record: async () => nodeRecord('survivor') });
    await m.join();
    await etcd.kill(2);
    expect(await etcd.healthy(2)).toBe(false);
    // Past two lease lengths with a member gone: still registered.
    await new Promise((r) => setTimeout(r, 4500));
    const reader = await client(cfg);
    const state = await readState(reader, cfg);
    expect(state.nodes.map((n) => n.record.name)).toContain('survivor');
    const p = new Placement(reader, cfg);
    expect((await p.claim('after-kill', 'survivor')).won).toBe(true);
    expect((await readState(reader, cfg)).ves.find((v) => v.ve === 'after-kill')?.node).toBe('survivor');
    await m.leave();
  }, 30_000);
});
