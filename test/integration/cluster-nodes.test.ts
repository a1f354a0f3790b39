import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { clusterSchema, resolveClusterConfig } from '../../src/config/cluster.js';
import { connectEtcd, type Etcd3 } from '../../src/cluster/etcd.js';
import {
  Cleanup, freePort, keyAuthArgs, makeClientKey, readFrom, runProgram, sshBaseArgs, sshWithKey, startVeshServe, tempDir, writeAccounts, type ClientKey, type ServeProcess,
} from '../helpers/ssh-harness.js';
import { waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import { clusterNodeEnv } from '../helpers/cluster-node.js';
import { startEtcdCluster, type EtcdCluster } from '../helpers/etcd-cluster.js';

/**
 * Three real `vesh serve` nodes (own data dirs, bridges, subnets, ports) on
 * a real etcd of three members: what an admin and a user see of cluster
 * mode. The same accounts file on every node. Node na owns alice's VE, node
 * nb bob's (placed by hand from na); nc owns none and only takes logins.
 * A login at any node reaches its VE wherever it lives: the node that takes
 * it carries it to the owner with its node key.
 */

/** A TCP server inside the VE (debian template: perl), greeting each connection. */
const veServer = (port: number, greeting: string) =>
  `setsid perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalAddr=>"127.0.0.1",LocalPort=>${port},Listen=>5,ReuseAddr=>1) or die "listen: $!"; while($c=$s->accept){print $c "${greeting}\\n"; close $c}' >/dev/null 2>&1 </dev/null & sleep 0.5; echo started`;
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

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
  let c: VeTestEnv;
  let serveA: ServeProcess;
  let serveB: ServeProcess;
  let serveC: ServeProcess;
  let work: string;
  let client: Etcd3;
  const keys: Record<string, ClientKey> = {};

  const status = async (env: VeTestEnv): Promise<StatusJson> => {
    const r = await cliAsync(env, ['cluster', 'status', '--json']);
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as StatusJson;
  };
  const ssh = (user: string, cmd: string[]) => sshWithKey(serveA.port, user, keys[user]!, cmd, { timeoutMs: 60_000 });
  const sshAt = (serve: ServeProcess, user: string, cmd: string[], key = keys[user]!) => sshWithKey(serve.port, user, key, cmd, { timeoutMs: 60_000 });
  const sftpAt = (serve: ServeProcess, user: string, batch: string) => {
    const f = path.join(work, `batch-${randomBytes(4).toString('hex')}`);
    writeFileSync(f, batch);
    return runProgram('sftp', [...sshBaseArgs(serve.port).map((x) => (x === '-p' ? '-P' : x)), ...keyAuthArgs(keys[user]!), '-b', f, `${user}@127.0.0.1`], { cwd: work, timeoutMs: 60_000 });
  };
  const forwardAt = (serve: ServeProcess, user: string, fwd: string[], key = keys[user]!): ChildProcess => {
    const child = spawn('ssh', [...sshBaseArgs(serve.port), ...keyAuthArgs(key), '-N', '-o', 'ExitOnForwardFailure=yes', ...fwd, `${user}@127.0.0.1`], { stdio: ['ignore', 'ignore', 'pipe'] });
    cleanup.add(() => { child.kill('SIGKILL'); });
    return child;
  };
  /** The VE's own view: host name, eth0's address, and the marker file. */
  const identity = 'hostname; ip -4 -o addr show dev eth0 | awk \'{print $4}\'; cat /root/marker 2>/dev/null || echo no-marker';

  beforeAll(async () => {
    try {
      etcd = await startEtcdCluster(cleanup);
      // Debian's template: sftp-server, perl and iproute2 for what is carried between nodes.
      const node = (name: string) => clusterNodeEnv(cleanup, { name, clusterName: 't2', endpoints: etcd.endpoints, template: 'debian' });
      a = await node('na');
      b = await node('nb');
      c = await node('nc');
      const dir = tempDir(cleanup);
      work = tempDir(cleanup);
      const lines: string[] = [];
      for (const user of ['alice', 'bob', 'carol', 'dave']) {
        keys[user] = makeClientKey(dir, 'ed25519', user);
        lines.push(`${user}:`, '  keys:', `    - ${keys[user].publicLine}`);
      }
      // A second key of bob's that may run only one command and forward nothing.
      keys.bobForced = makeClientKey(dir, 'ed25519', 'bob-forced');
      lines.splice(lines.indexOf(`    - ${keys.bob!.publicLine}`) + 1, 0, `    - 'no-port-forwarding,command="echo forced-$SSH_ORIGINAL_COMMAND" ${keys.bobForced.publicLine}'`);
      for (const env of [a, b, c]) writeAccounts(env.config.accountsFile, `${lines.join('\n')}\n`);
      [serveA, serveB, serveC] = await Promise.all([startVeshServe(cleanup, a.configFile), startVeshServe(cleanup, b.configFile), startVeshServe(cleanup, c.configFile)]);
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

  it('vesh cluster status lists the nodes with address, lease, capacity and templates; each node made its key', async () => {
    // Template digests are computed once the node has joined, then published.
    let s = await status(a);
    await waitFor('the nodes to publish their template digests', async () => {
      s = await status(a);
      return s.nodes.length === 3 && s.nodes.every((n) => n.templates.every((t) => t.digest !== null));
    }, 60_000);
    expect(s.nodes.map((n) => n.name).sort()).toEqual(['na', 'nb', 'nc']);
    const na = s.nodes.find((n) => n.name === 'na')!;
    expect(na.address).toBe(`127.0.0.1:${serveA.port}`);
    expect(na.alive).toBe(true);
    expect(na.leaseRemaining).toBeGreaterThan(0);
    expect(na.capacity.veSlots).toBe(a.config.runtime.idRanges);
    expect(na.templates).toEqual(expect.arrayContaining([{ name: 'debian', digest: expect.stringMatching(/^sha256:[0-9a-f]{64}$/) }]));
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
  }, 90_000);

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
    expect((await status(a)).nodes.map((n) => n.name).sort()).toEqual(['na', 'nb', 'nc']);
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

  it('first logins of one account on two nodes at once place its VE once, and both land in that one VE', async () => {
    const [ra, rb] = await Promise.all([
      ssh('dave', ['hostname']),
      sshAt(serveB, 'dave', ['hostname']),
    ]);
    const kvs = (await client.getAll().prefix('/vesh/t2/ves/dave').exec()).kvs;
    expect(kvs.length).toBe(1);
    expect(String(kvs[0]!.version)).toBe('1');
    expect(ra.stdout.trim(), ra.stderr).toBe('dave');
    expect(rb.stdout.trim(), rb.stderr).toBe('dave');
    // One VE made, on the placed node only.
    const owner = JSON.parse(kvs[0]!.value.toString()).node as string;
    const envs: Record<string, VeTestEnv> = { na: a, nb: b, nc: c };
    for (const [name, env] of Object.entries(envs)) {
      const has = (await env.ves.list()).map((v) => v.name).includes('dave');
      expect(has, `dave's VE on ${name} (placed on ${owner})`).toBe(name === owner);
    }
  }, 120_000);

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

  it('a login on na (or nc) to an account whose VE is placed on nb gets a shell in that VE: its host name, files and address; no etcd writes', async () => {
    const placed = await cliAsync(a, ['ve', 'create', 'bob', '--node', 'nb']);
    expect(placed.stdout, placed.stderr).toMatch(/placed VE bob on node nb; it is created there at its first login/);
    // The first login, at na, creates bob's VE on nb.
    const first = await ssh('bob', ['echo from-na > /root/marker; echo $SSH_CLIENT']);
    expect(first.code, first.stderr).toBe(0);
    // SSH_CLIENT in the VE names the client, not the node that carried the login.
    expect(first.stdout).toMatch(/^127\.0\.0\.1 \d+ \d+$/m);
    expect((await b.ves.list()).map((v) => v.name)).toContain('bob');
    expect((await a.ves.list()).map((v) => v.name)).not.toContain('bob');
    const direct = await sshAt(serveB, 'bob', [identity]);
    const [host, addr, marker] = direct.stdout.trim().split('\n');
    expect(host, direct.stderr).toBe('bob');
    expect(addr).toMatch(/^10\.\d+\.\d+\.\d+\/24$/);
    expect(marker).toBe('from-na');
    const before = (await client.get('/vesh/t2/ves/bob').exec()).header.revision;
    for (const via of [serveA, serveC]) {
      const r = await sshAt(via, 'bob', [identity]);
      expect(r.stdout, r.stderr).toBe(direct.stdout);
      expect(r.code).toBe(0);
    }
    // The exit status comes back through the carrying node.
    expect((await ssh('bob', ['exit 7'])).code).toBe(7);
    const after = (await client.get('/vesh/t2/ves/bob').exec()).header.revision;
    expect(Number(after) - Number(before)).toBe(0);
    expect(serveA.logs.some((l) => l.event === 'cluster.route' && l.node === 'nb')).toBe(true);
    expect(serveB.logs.some((l) => l.event === 'ssh.auth' && l.result === 'success' && l.via === 'na' && l.account === 'bob')).toBe(true);
    const s = await status(a);
    expect(s.ves).toEqual(expect.arrayContaining([expect.objectContaining({ ve: 'bob', node: 'nb' })]));
  }, 120_000);

  it('SFTP through na to bob\'s VE on nb: a file put there is read back byte for byte at nb', async () => {
    const payload = randomBytes(3 * 1024 * 1024 + 17);
    const local = path.join(work, 'up.bin');
    writeFileSync(local, payload);
    const up = await sftpAt(serveA, 'bob', `put ${local} /root/up.bin\nget /root/up.bin ${local}.back\n`);
    expect(up.code, up.stderr).toBe(0);
    expect(sha256(readFileSync(`${local}.back`))).toBe(sha256(payload));
    const there = await sshAt(serveB, 'bob', ['sha256sum /root/up.bin']);
    expect(there.stdout.split(' ')[0]).toBe(sha256(payload));
  }, 120_000);

  it('ssh -L through na reaches a server on the loopback of bob\'s VE on nb', async () => {
    const port = 20000 + Math.floor(Math.random() * 20000);
    expect((await sshAt(serveB, 'bob', [veServer(port, 'from-bob-ve')])).stdout).toContain('started');
    const local = await freePort();
    const child = forwardAt(serveA, 'bob', ['-L', `${local}:localhost:${port}`]);
    let got = '';
    for (let i = 0; i < 80 && got !== 'from-bob-ve\n'; i++) {
      await new Promise((r) => setTimeout(r, 250));
      got = await readFrom(local).catch(() => '');
    }
    expect(got).toBe('from-bob-ve\n');
    child.kill();
  }, 60_000);

  it('ssh -A through na: ssh-add -l in bob\'s VE on nb lists the key of the client\'s own agent', async () => {
    const agentSock = path.join(work, 'agent.sock');
    const agent = spawn('ssh-agent', ['-D', '-a', agentSock], { stdio: 'ignore' });
    cleanup.add(() => { agent.kill('SIGKILL'); });
    await waitFor('ssh-agent to listen', async () => existsSync(agentSock), 10_000);
    const env = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: work, SSH_AUTH_SOCK: agentSock };
    const added = await runProgram('ssh-add', [keys.carol!.file], { env });
    expect(added.code, added.stderr).toBe(0);
    const r = await runProgram('ssh', [
      ...sshBaseArgs(serveA.port).filter((x, i, all) => x !== 'IdentityAgent=none' && !(x === '-o' && all[i + 1] === 'IdentityAgent=none')),
      ...keyAuthArgs(keys.bob!), '-A', 'bob@127.0.0.1', 'hostname; ssh-add -l',
    ], { env, timeoutMs: 60_000 });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('bob\n');
    expect(r.stdout).toContain(keys.carol!.fingerprint);
    agent.kill('SIGKILL');
  }, 60_000);

  it('a key\'s restrictions hold on the node its login is carried to: its forced command runs there, and -L is refused', async () => {
    const r = await sshAt(serveA, 'bob', ['hostname'], keys.bobForced!);
    expect(r.stdout.trim(), r.stderr).toBe('forced-hostname');
    // OpenSSH opens a -L channel only when something connects: that open is refused, the connection closed.
    const port = 20000 + Math.floor(Math.random() * 20000);
    expect((await sshAt(serveB, 'bob', [veServer(port, 'not-for-forced')])).stdout).toContain('started');
    const local = await freePort();
    const child = forwardAt(serveA, 'bob', ['-L', `${local}:localhost:${port}`], keys.bobForced!);
    await waitFor('the refused forward', async () => {
      // Not listening yet (ERR:…), or closed without a byte.
      expect(await readFrom(local)).toMatch(/^(ERR:.*)?$/);
      return serveA.logs.some((l) => l.event === 'forward.refused' && /no-port-forwarding/.test(String(l.reason)));
    }, 30_000);
    child.kill();
  }, 60_000);

  it('a client that sends a node\'s vouching user name with its own key is refused by the owning node', async () => {
    const vouch = { v: 1, from: 'na', to: 'nb', account: 'bob', source: '127.0.0.1', port: 1, at: Date.now(), method: 'publickey', key: null };
    const name = `vesh-node:${Buffer.from(JSON.stringify(vouch)).toString('base64url')}`;
    const r = await sshWithKey(serveB.port, name, keys.bob!, ['hostname'], { timeoutMs: 30_000 });
    expect(r.code).not.toBe(0);
    expect(r.stdout).toBe('');
    await serveB.waitForLog((l) => l.event === 'cluster.vouch_refused' && /not the node key of a live node/.test(String(l.reason)));
  }, 60_000);

  it('one etcd member killed: logins (here and carried), status and the nodes\' renewals go on', async () => {
    await etcd.kill(2);
    expect((await ssh('alice', ['echo', 'still'])).stdout.trim()).toBe('still');
    expect((await ssh('bob', ['echo', 'carried'])).stdout.trim()).toBe('carried');
    // Two lease lengths later every node is still registered.
    await new Promise((r) => setTimeout(r, 6500));
    const s = await status(a);
    expect(s.nodes.map((n) => n.name).sort()).toEqual(['na', 'nb', 'nc']);
  }, 60_000);

  it('node nb killed (SIGKILL): logins to its VEs fail at once saying it is down, before and after it drops out; others go on', async () => {
    await serveB.stop('SIGKILL');
    const down = 'Your environment bob lives on cluster node nb, which is down right now; try again when it is back.';
    // Still registered (its lease runs out in 3 s): the connection to it is refused.
    const r = await ssh('bob', ['hostname']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain(down);
    await waitFor('nb to drop out of the cluster', async () => !(await status(a)).nodes.some((n) => n.name === 'nb'), 20_000);
    const gone = await sshAt(serveC, 'bob', ['hostname']);
    expect(gone.code).not.toBe(0);
    expect(gone.stderr).toContain(down);
    // alice's VE lives on na: through nc too, logins go on.
    expect((await sshAt(serveC, 'alice', ['hostname'])).stdout.trim()).toBe('alice');
  }, 60_000);

  it('node nb back: its VEs log in again there, and a copy of na\'s VE on its disk is reported as a conflict, not taken', async () => {
    // A copy of alice's VE (placed on na) made on nb's disk behind the cluster's back.
    await b.ves.create('alice');
    serveB = await startVeshServe(cleanup, b.configFile);
    const conflict = await serveB.waitForLog((r) => r.event === 'cluster.placement_conflict');
    expect(conflict).toMatchObject({ ve: 'alice', owner: 'na' });
    const back = await sshAt(serveB, 'bob', ['hostname']);
    expect(back.stdout.trim(), back.stderr).toBe('bob');
    // Carried again from na, to the VE that kept its files.
    const carried = await ssh('bob', ['cat /root/marker']);
    expect(carried.stdout.trim(), carried.stderr).toBe('from-na');
    // alice at nb is carried to na's VE, not to the copy on nb's disk.
    expect((await ssh('alice', ['echo on-na > /root/marker'])).code).toBe(0);
    const atB = await sshAt(serveB, 'alice', ['cat /root/marker']);
    expect(atB.stdout.trim(), atB.stderr).toBe('on-na');
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
