import { spawn } from 'node:child_process';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { clusterSchema, resolveClusterConfig } from '../../src/config/cluster.js';
import { connectEtcd, type Etcd3 } from '../../src/cluster/etcd.js';
import {
  Cleanup, freePort, makeClientKey, sshWithKey, startVeshServe, tempDir, writeAccounts, type ClientKey, type ServeProcess,
} from '../helpers/ssh-harness.js';
import { makeVeTestEnv, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import { startEtcdCluster, type EtcdCluster } from '../helpers/etcd-cluster.js';

/**
 * Two real `vesh serve` nodes (own data dirs, bridges, subnets, ports) on a
 * real etcd of three members: what an admin and a user see of cluster mode.
 * The same accounts file on both nodes. Node na owns alice's VE, node nb
 * bob's (placed by hand from na); logins go to na.
 */

interface StatusJson {
  nodes: Array<{ name: string; address: string; alive: boolean; leaseRemaining: number | null; templates: Array<{ name: string; digest: string | null }>; capacity: { veSlots: number }; load: { runningVes: number } }>;
  ves: Array<{ ve: string; node: string }>;
  conflicts: unknown[];
  invalidRecords: unknown[];
}

function cliAsync(env: VeTestEnv, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [path.resolve('bin/vesh.js'), '--config', env.configFile, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

describe('a vesh cluster of two nodes on etcd', () => {
  const cleanup = new Cleanup();
  let etcd: EtcdCluster;
  let a: VeTestEnv;
  let b: VeTestEnv;
  let serveA: ServeProcess;
  let serveB: ServeProcess;
  let client: Etcd3;
  const keys: Record<string, ClientKey> = {};

  const status = async (env: VeTestEnv): Promise<StatusJson> => {
    const r = await cliAsync(env, ['cluster', 'status', '--json']);
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as StatusJson;
  };
  const ssh = (user: string, cmd: string[]) => sshWithKey(serveA.port, user, keys[user]!, cmd, { timeoutMs: 30_000 });

  beforeAll(async () => {
    try {
      etcd = await startEtcdCluster(cleanup);
      const node = async (name: string) => {
        // A fixed port, so that the address the node advertises is the one it listens on.
        const port = await freePort();
        const env = await makeVeTestEnv({
          template: 'busybox',
          extraYaml: `cluster: { enabled: true, name: ${name}, clusterName: t2, advertise: "127.0.0.1:${port}", leaseSeconds: 3, loadInterval: 60, etcd: { endpoints: ${JSON.stringify(etcd.endpoints)}, timeout: 1500 } }`,
        });
        cleanup.add(() => env.cleanup());
        writeFileSync(env.configFile, readFileSync(env.configFile, 'utf8').replace('listen: "127.0.0.1:0"', `listen: "127.0.0.1:${port}"`));
        return env;
      };
      a = await node('na');
      b = await node('nb');
      const dir = tempDir(cleanup);
      const lines: string[] = [];
      for (const user of ['alice', 'bob', 'carol', 'dave']) {
        keys[user] = makeClientKey(dir, 'ed25519', user);
        lines.push(`${user}:`, '  keys:', `    - ${keys[user].publicLine}`);
      }
      writeAccounts(a.config.accountsFile, `${lines.join('\n')}\n`);
      writeAccounts(b.config.accountsFile, `${lines.join('\n')}\n`);
      [serveA, serveB] = await Promise.all([startVeshServe(cleanup, a.configFile), startVeshServe(cleanup, b.configFile)]);
      client = await connectEtcd(resolveClusterConfig(clusterSchema.parse({ enabled: true, etcd: { endpoints: etcd.endpoints } }), '/', { host: '127.0.0.1', port: 1 }));
      cleanup.add(() => client.close());
    } catch (err) {
      await cleanup.run().catch(() => undefined);
      throw err;
    }
  }, 180_000);

  afterAll(async () => {
    await cleanup.run();
  }, 120_000);

  it('vesh cluster status lists both nodes with address, lease, capacity and templates; each node made its key', async () => {
    // Template digests are computed once the node has joined, then published.
    let s = await status(a);
    await waitFor('both nodes to publish their template digests', async () => {
      s = await status(a);
      return s.nodes.length === 2 && s.nodes.every((n) => n.templates.every((t) => t.digest !== null));
    }, 20_000);
    expect(s.nodes.map((n) => n.name).sort()).toEqual(['na', 'nb']);
    const na = s.nodes.find((n) => n.name === 'na')!;
    expect(na.address).toBe(`127.0.0.1:${serveA.port}`);
    expect(na.alive).toBe(true);
    expect(na.leaseRemaining).toBeGreaterThan(0);
    expect(na.capacity.veSlots).toBe(a.config.runtime.idRanges);
    expect(na.templates).toEqual([{ name: 'busybox', digest: expect.stringMatching(/^sha256:[0-9a-f]{64}$/) }]);
    // The same template on both nodes: the same digest.
    expect(s.nodes.find((n) => n.name === 'nb')!.templates).toEqual(na.templates);
    expect(statSync(path.join(a.config.hostKeysDir, 'vesh_node_ed25519_key')).mode & 0o777).toBe(0o600);
    const text = await cliAsync(a, ['cluster', 'status']);
    expect(text.stdout).toMatch(/^na\s+127\.0\.0\.1:\d+\s+alive \d+s/m);
    // The same verb with cluster mode off says what to set.
    const offFile = path.join(a.dir, 'off.yaml');
    writeFileSync(offFile, readFileSync(a.configFile, 'utf8').replace('enabled: true', 'enabled: false'));
    const off = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, [path.resolve('bin/vesh.js'), '--config', offFile, 'cluster', 'status'], { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
      child.on('close', (code) => resolve({ code, stderr }));
    });
    expect(off.code).toBe(1);
    expect(off.stderr).toMatch(/cluster mode, which is off in .*off\.yaml: set cluster\.enabled: true .*VESH_CLUSTER_OFF/);
  });

  it('a second vesh serve with a node name that a live node holds refuses to start, saying why', async () => {
    const twin = path.join(b.dir, 'twin.yaml');
    writeFileSync(twin, readFileSync(b.configFile, 'utf8').replace('name: nb', 'name: na').replace(/listen: "127\.0\.0\.1:\d+"/, `listen: "127.0.0.1:${await freePort()}"`));
    const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, [path.resolve('bin/vesh.js'), '--config', twin, 'serve'], { stdio: ['ignore', 'ignore', 'pipe'] });
      const kill = setTimeout(() => child.kill('SIGKILL'), 30_000);
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
      child.on('close', (code) => { clearTimeout(kill); resolve({ code, stderr }); });
    });
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/node name "na" is registered in cluster "t2" by another live vesh process .*give this one another cluster.name .*VESH_CLUSTER_NODE_TAKEN/);
    // na itself is untouched.
    expect((await status(a)).nodes.map((n) => n.name).sort()).toEqual(['na', 'nb']);
  }, 40_000);

  it('two nodes creating the same VE at once leave exactly one placement', async () => {
    const [ra, rb] = await Promise.all([cliAsync(a, ['ve', 'create', 'dup']), cliAsync(b, ['ve', 'create', 'dup'])]);
    expect([ra.code, rb.code].sort()).toEqual([0, 1]);
    const loser = ra.code === 0 ? rb : ra;
    expect(loser.stderr).toMatch(/VE dup is already placed on node n[ab] .*VESH_VE_EXISTS/);
    const kvs = (await client.getAll().prefix('/vesh/t2/ves/dup').exec()).kvs;
    expect(kvs.length).toBe(1);
    const winner = ra.code === 0 ? a : b;
    expect(JSON.parse(kvs[0]!.value.toString()).node).toBe(winner === a ? 'na' : 'nb');
    // Destroyed on its node, the placement goes too.
    const d = await cliAsync(winner, ['ve', 'destroy', 'dup']);
    expect(d.stdout).toMatch(/removed VE dup's placement/);
    expect((await client.getAll().prefix('/vesh/t2/ves/dup').exec()).kvs.length).toBe(0);
  }, 60_000);

  it('first logins of one account on both nodes at once place its VE once: one gets a shell, the other is told where it lives', async () => {
    const [ra, rb] = await Promise.all([
      ssh('dave', ['hostname']),
      sshWithKey(serveB.port, 'dave', keys.dave!, ['hostname'], { timeoutMs: 30_000 }),
    ]);
    const kvs = (await client.getAll().prefix('/vesh/t2/ves/dave').exec()).kvs;
    expect(kvs.length).toBe(1);
    expect(String(kvs[0]!.version)).toBe('1');
    const owner = JSON.parse(kvs[0]!.value.toString()).node as string;
    const [won, lost] = owner === 'na' ? [ra, rb] : [rb, ra];
    expect(won.stdout.trim(), won.stderr).toBe('dave');
    expect(lost.code).not.toBe(0);
    expect(lost.stderr).toContain(`Your environment dave lives on cluster node ${owner}`);
  }, 60_000);

  it('a login to a VE placed on this node works, and a second one writes nothing to etcd', async () => {
    expect((await cliAsync(a, ['ve', 'create', 'alice'])).code).toBe(0);
    const first = await ssh('alice', ['hostname']);
    expect(first.stdout.trim(), first.stderr).toBe('alice');
    const before = (await client.get('/vesh/t2/ves/alice').exec()).header.revision;
    const again = await ssh('alice', ['echo', 'ok']);
    expect(again.stdout.trim(), again.stderr).toBe('ok');
    const after = (await client.get('/vesh/t2/ves/alice').exec()).header.revision;
    // loadInterval is 60 s here, so no load update falls in between either.
    expect(Number(after) - Number(before)).toBe(0);
  }, 60_000);

  it('a login on na to an account whose VE is placed on nb fails at once with a message that says where it lives', async () => {
    const placed = await cliAsync(a, ['ve', 'create', 'bob', '--node', 'nb']);
    expect(placed.stdout, placed.stderr).toMatch(/placed VE bob on node nb; it is created there at its first login/);
    const r = await ssh('bob', ['hostname']);
    expect(r.code).not.toBe(0);
    expect(r.stdout).toBe('');
    expect(r.stderr).toContain(`Your environment bob lives on cluster node nb; routing between nodes is not built yet; log in at 127.0.0.1:${serveB.port} instead.`);
    // At nb, bob's VE is created on his first login.
    const there = await sshWithKey(serveB.port, 'bob', keys.bob!, ['hostname'], { timeoutMs: 30_000 });
    expect(there.stdout.trim(), there.stderr).toBe('bob');
    const s = await status(a);
    expect(s.ves).toEqual(expect.arrayContaining([expect.objectContaining({ ve: 'alice', node: 'na' }), expect.objectContaining({ ve: 'bob', node: 'nb' })]));
  }, 60_000);

  it('one etcd member killed: logins, status and the nodes\' renewals go on', async () => {
    await etcd.kill(2);
    expect((await ssh('alice', ['echo', 'still'])).stdout.trim()).toBe('still');
    // Two lease lengths later both nodes are still registered.
    await new Promise((r) => setTimeout(r, 6500));
    const s = await status(a);
    expect(s.nodes.map((n) => n.name).sort()).toEqual(['na', 'nb']);
  }, 60_000);

  it('node nb killed (SIGKILL) drops out after its lease, and logins to its VEs say it is down', async () => {
    await serveB.stop('SIGKILL');
    await waitFor('nb to drop out of the cluster', async () => !(await status(a)).nodes.some((n) => n.name === 'nb'), 20_000);
    const r = await ssh('bob', ['hostname']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('Your environment bob lives on cluster node nb, which is down right now; try again when it is back.');
  }, 60_000);

  it('node nb back: its VEs log in again there, and a copy of na\'s VE on its disk is reported as a conflict, not taken', async () => {
    // A copy of alice's VE (placed on na) made on nb's disk behind the cluster's back.
    await b.ves.create('alice');
    serveB = await startVeshServe(cleanup, b.configFile);
    const conflict = await serveB.waitForLog((r) => r.event === 'cluster.placement_conflict');
    expect(conflict).toMatchObject({ ve: 'alice', owner: 'na' });
    const back = await sshWithKey(serveB.port, 'bob', keys.bob!, ['hostname'], { timeoutMs: 30_000 });
    expect(back.stdout.trim(), back.stderr).toBe('bob');
    const refused = await sshWithKey(serveB.port, 'alice', keys.alice!, ['hostname'], { timeoutMs: 30_000 });
    expect(refused.stderr).toContain('Your environment alice lives on cluster node na');
    // Nor does the admin start nb's copy by hand.
    const start = await cliAsync(b, ['ve', 'start', 'alice']);
    expect(start.code).toBe(1);
    expect(start.stderr).toMatch(/VE alice is placed on node na, not on this node \(nb\): start it there.*VESH_VE_ELSEWHERE/);
    const s = await status(a);
    expect(s.conflicts).toEqual([{ ve: 'alice', node: 'nb' }]);
    expect(s.ves.find((v) => v.ve === 'alice')?.node).toBe('na');
  }, 60_000);

  it('etcd without quorum: a login to a VE placed here still works, a new VE fails fast with a message', async () => {
    await etcd.kill(1);
    const r = await ssh('alice', ['echo', 'cached']);
    expect(r.stdout.trim(), r.stderr).toBe('cached');
    const fresh = await ssh('carol', ['hostname']);
    expect(fresh.code).not.toBe(0);
    expect(fresh.stderr).toContain('The cluster database does not answer; try again in a moment');
    const s = await cliAsync(a, ['cluster', 'status']);
    expect(s.code).not.toBe(0);
    expect(s.stderr).toMatch(/etcd did not answer .* endpoint health.*VESH_CLUSTER_UNAVAILABLE/s);
  }, 60_000);
});
