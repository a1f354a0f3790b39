import { promises as fs } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import client from 'prom-client';
import type { Logger } from './logger.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import type { CgroupLayout } from '../runtime/cgroups.js';

/**
 * The Prometheus metrics of `vesh serve` (vesh.yaml `metrics.listen`).
 *
 * Everything here is what the broker itself sees: its own accept loop,
 * the authentication checks it makes, the sessions and listeners it holds,
 * the VEs' cgroups and disks. Nothing a worker reports is counted, since a
 * compromised worker could make the figures say anything.
 *
 * Labels stay bounded: reasons, results and methods come from fixed lists
 * (a client-chosen auth method name becomes "other"), and the only open
 * label is the VE name, bounded by the accounts. No client address is ever
 * a label.
 *
 * The counters are module-wide so that the broker, admission and VE manager
 * can count without being handed an object; they cost one addition each
 * whether or not the endpoint runs.
 */

const registry = new client.Registry();

/** Methods a login is counted under; any other name a client sends counts as "other". */
export const LOGIN_METHODS = ['none', 'password', 'publickey', 'keyboard-interactive', 'hostbased'] as const;

/** Results of an authentication attempt that count as a login attempt (key queries do not). */
const LOGIN_RESULTS = new Set(['success', 'failure', 'penalized']);

/** Why the broker refused a TCP connection before handing it to a worker. */
export type RefusalReason = 'penalized' | 'rate' | 'max_startups' | 'max_startups_per_source' | 'no_worker' | 'internal' | 'shutting_down';

const connectionsAccepted = new client.Counter({
  name: 'vesh_connections_accepted_total',
  help: 'TCP connections the broker took and handed to an SSH worker',
  registers: [registry],
});

const connectionsRefused = new client.Counter({
  name: 'vesh_connections_refused_total',
  help: 'TCP connections the broker refused before any SSH byte was parsed, by reason',
  labelNames: ['reason'] as const,
  registers: [registry],
});

const logins = new client.Counter({
  name: 'vesh_logins_total',
  help: 'Authentication attempts checked by the broker, by result (success, failure, penalized) and method',
  labelNames: ['result', 'method'] as const,
  registers: [registry],
});

const forwardConnections = new client.Counter({
  name: 'vesh_forward_connections_total',
  help: 'Forwarded connections (ssh -L, -W, Unix-socket -L) the broker opened into VEs, by kind',
  labelNames: ['kind'] as const,
  registers: [registry],
});

const veStart = new client.Histogram({
  name: 'vesh_ve_start_seconds',
  help: 'Time to start a VE (engine create and start, network, mounts), seconds',
  buckets: [0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
  registers: [registry],
});

/** A refused connection (admission.ts, broker.ts). */
export function countRefused(reason: RefusalReason): void {
  connectionsRefused.inc({ reason });
}

/** A connection taken and handed to a worker. */
export function countAccepted(): void {
  connectionsAccepted.inc();
}

/** An authentication attempt the broker decided; results that are not login attempts (key queries) are not counted. */
export function countLogin(result: string, method: string): void {
  if (!LOGIN_RESULTS.has(result)) return;
  const m = (LOGIN_METHODS as readonly string[]).includes(method) ? method : 'other';
  logins.inc({ result, method: m });
}

/** A forwarded connection opened into a VE. */
export function countForward(kind: 'tcp' | 'unix'): void {
  forwardConnections.inc({ kind });
}

/** A VE started, in `ms`. */
export function observeVeStart(ms: number): void {
  veStart.observe(ms / 1000);
}

/** One VE as a scrape reports it. */
export interface VeSample {
  name: string;
  state: string;
  memoryBytes: number | null;
  processes: number | null;
  cpuSeconds: number | null;
  disk: { used: number; total: number } | null;
}

/** What a scrape reads, all from the broker's own state and the host. */
export interface MetricsSources {
  broker(): { connections: number; unauthenticated: number; sessions: number; listeners: number; workers: number };
  penalties(): { sources: number; accounts: number };
  ves(): Promise<VeSample[]>;
}

/** States every scrape reports (0 when none), so a dashboard sees a state go to zero rather than vanish. */
const VE_STATES = ['running', 'stopped', 'paused', 'broken'];

/** A snapshot younger than this is reused: concurrent or rapid scrapes cost one VE listing, not one each. */
const SNAPSHOT_REUSE_MS = 1_000;

let sources: MetricsSources | null = null;
let snapshot: { at: number; ves: Promise<VeSample[]> } | null = null;

function veSnapshot(): Promise<VeSample[]> {
  const now = Date.now();
  if (!sources) return Promise.resolve([]);
  if (!snapshot || now - snapshot.at > SNAPSHOT_REUSE_MS) {
    const ves = sources.ves().catch(() => [] as VeSample[]);
    snapshot = { at: now, ves };
  }
  return snapshot.ves;
}

function brokerGauge(name: string, help: string, pick: (b: ReturnType<MetricsSources['broker']>) => number): void {
  new client.Gauge({
    name, help, registers: [registry],
    collect() {
      if (sources) this.set(pick(sources.broker()));
    },
  });
}

brokerGauge('vesh_connections_open', 'Client connections the broker holds now (authenticated or not)', (b) => b.connections);
brokerGauge('vesh_connections_unauthenticated', 'Connections not logged in yet (what maxStartups counts)', (b) => b.unauthenticated);
brokerGauge('vesh_sessions_open', 'Sessions (shell, exec, subsystem such as sftp) the broker has started and not seen end', (b) => b.sessions);
brokerGauge('vesh_forward_listeners_open', 'Listeners the broker holds in VEs for clients: ssh -R (TCP and Unix socket) and ssh -A agent sockets', (b) => b.listeners);
brokerGauge('vesh_workers_running', 'SSH worker processes alive', (b) => b.workers);

new client.Gauge({
  name: 'vesh_penalties_in_force',
  help: 'Per-source login penalties now in force: whole sources, and (source, account) pairs',
  labelNames: ['scope'] as const,
  registers: [registry],
  collect() {
    if (!sources) return;
    const p = sources.penalties();
    this.set({ scope: 'source' }, p.sources);
    this.set({ scope: 'account' }, p.accounts);
  },
});

new client.Gauge({
  name: 'vesh_ves',
  help: 'VEs by state',
  labelNames: ['state'] as const,
  registers: [registry],
  async collect() {
    const ves = await veSnapshot();
    this.reset();
    for (const s of VE_STATES) this.set({ state: s }, 0);
    for (const v of ves) this.inc({ state: v.state });
  },
});

/** A per-VE gauge: reset each scrape so a destroyed or stopped VE's series goes. */
function veGauge(name: string, help: string, pick: (v: VeSample) => number | null): void {
  new client.Gauge({
    name, help, labelNames: ['ve'] as const, registers: [registry],
    async collect() {
      const ves = await veSnapshot();
      this.reset();
      for (const v of ves) {
        const value = pick(v);
        if (value !== null) this.set({ ve: v.name }, value);
      }
    },
  });
}

veGauge('vesh_ve_cpu_seconds', 'CPU time the VE\'s processes used since it started, seconds (cumulative: use rate())', (v) => v.cpuSeconds);
veGauge('vesh_ve_memory_bytes', 'Memory the kernel charges the VE\'s cgroup, bytes', (v) => v.memoryBytes);
veGauge('vesh_ve_pids', 'Processes (tasks) in the VE\'s cgroup', (v) => v.processes);
veGauge('vesh_ve_disk_used_bytes', 'Bytes used on the VE\'s own disk (its writable layer)', (v) => v.disk?.used ?? null);
veGauge('vesh_ve_disk_size_bytes', 'Size of the VE\'s own disk, bytes', (v) => v.disk?.total ?? null);

let defaultsOn = false;

/**
 * CPU time of a VE's cgroup, seconds: cpuacct.usage (ns) on v1 and hybrid
 * hosts, cpu.stat's usage_usec on v2. One small read; null when the cgroup
 * is gone (the VE stopped meanwhile).
 */
export async function readCgroupCpuSeconds(cgroupsPath: string, layout: CgroupLayout): Promise<number | null> {
  const rel = cgroupsPath.replace(/^\/+/, '');
  try {
    if (layout === 'v2') {
      const text = await fs.readFile(path.join('/sys/fs/cgroup', rel, 'cpu.stat'), 'utf8');
      const m = /^usage_usec (\d+)$/m.exec(text);
      return m ? Number(m[1]) / 1e6 : null;
    }
    const ns = Number((await fs.readFile(path.join('/sys/fs/cgroup/cpuacct', rel, 'cpuacct.usage'), 'utf8')).trim());
    return Number.isFinite(ns) ? ns / 1e9 : null;
  } catch {
    return null;
  }
}

/** The text a scrape returns (also for tests and the cost measurement, without HTTP). */
export function renderMetrics(): Promise<string> {
  return registry.metrics();
}

/** Most scrapes that may be in progress at once; more wait in the kernel's backlog. */
const MAX_SCRAPE_CONNECTIONS = 16;

/**
 * Serve GET /metrics on `listen`. Off unless vesh.yaml sets metrics.listen:
 * the figures name VEs and their usage, so the address should be one only
 * the monitoring system reaches (VEs never reach the host's own services:
 * the VE firewall drops that).
 */
export async function startMetricsServer(listen: { host: string; port: number }, src: MetricsSources, logger: Logger): Promise<{ host: string; port: number; close: () => Promise<void> }> {
  const log = logger.child({ component: 'metrics' });
  sources = src;
  snapshot = null;
  if (!defaultsOn) {
    // Process CPU, memory, handles, GC and event-loop lag of the broker.
    client.collectDefaultMetrics({ register: registry, prefix: 'vesh_broker_' });
    defaultsOn = true;
  }
  const server = http.createServer((req, res) => {
    const url = (req.url ?? '').split('?')[0];
    if (url !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: the metrics are at /metrics\n');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('only GET\n');
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(req.method === 'HEAD' ? undefined : text),
      (err: unknown) => {
        log.error({ event: 'metrics.scrape_failed', err: errorMessage(err) });
        res.writeHead(500, { 'content-type': 'text/plain' }).end('the metrics could not be collected; see the vesh log\n');
      },
    );
  });
  server.maxConnections = MAX_SCRAPE_CONNECTIONS;
  server.headersTimeout = 10_000;
  server.requestTimeout = 30_000;
  server.keepAliveTimeout = 5_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => {
      const hint = err.code === 'EADDRINUSE' ? 'another program uses it: change metrics.listen in vesh.yaml'
        : err.code === 'EADDRNOTAVAIL' ? 'no interface of this host has that address: change metrics.listen in vesh.yaml' : 'check metrics.listen in vesh.yaml';
      reject(new VeshError(ErrorCodes.CONFIG_INVALID, `cannot serve metrics on ${listen.host}:${listen.port}: ${err.message}; ${hint}`, { cause: err }));
    });
    server.listen({ host: listen.host, port: listen.port }, () => resolve());
  });
  server.on('error', (err) => log.error({ event: 'metrics.listen_error', err: errorMessage(err) }));
  const a = server.address();
  const bound = a && typeof a !== 'string' ? { host: a.address, port: a.port } : listen;
  log.info({ event: 'metrics.listening', host: bound.host, port: bound.port });
  return {
    ...bound,
    close: () => new Promise<void>((r) => {
      sources = null;
      server.close(() => r());
      server.closeAllConnections();
    }),
  };
}
