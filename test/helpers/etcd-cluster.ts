import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, promises as fs, openSync, closeSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { NodeRecord } from '../../src/cluster/records.js';
import type { VeAccess } from '../../src/ve/access.js';
import type { Cleanup } from './ssh-harness.js';

/**
 * Three etcd members (Debian's etcd-server) on loopback ports that were free
 * a moment ago, never the default 2379/2380, each with its own data dir in
 * one temp dir and a cluster token of its own, so two test files never join
 * each other's cluster. Everything (processes, data) goes at `cleanup`,
 * even when a test failed; `stop(i)` kills one member to test the quorum.
 */
export interface EtcdCluster {
  /** Client URLs of all members, as vesh.yaml `cluster.etcd.endpoints` takes them. */
  endpoints: string[];
  /** The client URL of member i. */
  endpoint(i: number): string;
  /** SIGKILL member i (it stays down). */
  kill(i: number): Promise<void>;
  /** Whether member i answers its health endpoint. */
  healthy(i: number): Promise<boolean>;
}

async function freePorts(n: number): Promise<number[]> {
  const servers: net.Server[] = [];
  const ports: number[] = [];
  // All held open together, so the n ports differ from each other.
  for (let i = 0; i < n; i++) {
    const s = net.createServer();
    await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
    servers.push(s);
    const p = (s.address() as net.AddressInfo).port;
    if (p === 2379 || p === 2380) i--; else ports.push(p);
  }
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  return ports;
}

function healthOf(url: string): Promise<boolean> {
  return new Promise((resolve) => {
    const req = http.get(`${url}/health`, { timeout: 1000 }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => { body += d.toString(); });
      res.on('end', () => resolve(res.statusCode === 200 && /"health":\s*"true"/.test(body)));
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(false));
  });
}

export async function startEtcdCluster(cleanup: Cleanup, members = 3): Promise<EtcdCluster> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'vesh-etcd-'));
  cleanup.add(() => fs.rm(dir, { recursive: true, force: true }));
  const ports = await freePorts(members * 2);
  const token = `vesh-test-${randomBytes(6).toString('hex')}`;
  const names = Array.from({ length: members }, (_, i) => `m${i}`);
  const clientUrl = (i: number) => `http://127.0.0.1:${ports[2 * i]}`;
  const peerUrl = (i: number) => `http://127.0.0.1:${ports[2 * i + 1]}`;
  const initial = names.map((n, i) => `${n}=${peerUrl(i)}`).join(',');
  const procs: Array<ChildProcess | null> = [];
  for (let i = 0; i < members; i++) {
    const log = openSync(path.join(dir, `${names[i]}.log`), 'a');
    const child = spawn('etcd', [
      '--name', names[i]!,
      '--data-dir', path.join(dir, names[i]!),
      '--listen-client-urls', clientUrl(i), '--advertise-client-urls', clientUrl(i),
      '--listen-peer-urls', peerUrl(i), '--initial-advertise-peer-urls', peerUrl(i),
      '--initial-cluster', initial, '--initial-cluster-token', token, '--initial-cluster-state', 'new',
      // Fast elections: a killed member's leadership moves within a second.
      '--heartbeat-interval', '50', '--election-timeout', '500',
      '--log-level', 'warn', '--logger', 'zap',
    ], { stdio: ['ignore', log, log], env: { PATH: process.env.PATH ?? '/usr/bin:/bin' } });
    closeSync(log);
    procs.push(child);
    cleanup.add(async () => {
      if (child.exitCode === null && child.signalCode === null) {
        const gone = new Promise((r) => child.once('exit', r));
        child.kill('SIGKILL');
        await gone;
      }
    });
  }
  const deadline = Date.now() + 30_000;
  for (let i = 0; i < members; i++) {
    while (!(await healthOf(clientUrl(i)))) {
      if (Date.now() > deadline) {
        const logs = await Promise.all(names.map((n) => fs.readFile(path.join(dir, `${n}.log`), 'utf8').catch(() => '')));
        throw new Error(`etcd member ${names[i]} did not become healthy in 30 s (is etcd-server installed? scripts/ensure-system.sh installs it):\n${logs.join('\n').slice(-4000)}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return {
    endpoints: names.map((_, i) => clientUrl(i)),
    endpoint: clientUrl,
    async kill(i) {
      const child = procs[i];
      if (!child || child.exitCode !== null || child.signalCode !== null) return;
      const gone = new Promise((r) => child.once('exit', r));
      child.kill('SIGKILL');
      await gone;
    },
    healthy: (i) => healthOf(clientUrl(i)),
  };
}

/** A valid node record for `name` (tests override what they look at). */
export function nodeRecord(name: string, over: Partial<NodeRecord> = {}): NodeRecord {
  const now = new Date().toISOString();
  return {
    name, address: '127.0.0.1:2222', version: '0.1.0', publicKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1mZXhhbXBsZQ', hostKeys: [],
    capacity: { cpus: 2, memoryBytes: 2 ** 34, veSlots: 100 }, load: { runningVes: 0, sessions: 0, loadavg: [0, 0, 0] },
    templates: [{ name: 'busybox', digest: null }], startedAt: now, updatedAt: now, ...over,
  };
}

/** A VeAccess that only counts the VEs it is asked to run, standing in for the VE manager. */
export class CountingVes implements VeAccess {
  ensured: string[] = [];
  async ensureRunning(ve: string): Promise<void> { this.ensured.push(ve); }
  async lookupUser(): Promise<never> { throw new Error('not used'); }
  async processCommand(): Promise<never> { throw new Error('not used'); }
  async forwardCommand(): Promise<never> { throw new Error('not used'); }
}
