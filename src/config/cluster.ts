import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import { ErrorCodes, VeshError } from '../errors.js';

/**
 * Names that become one segment of an etcd key (`/vesh/<cluster>/nodes/<node>`):
 * no "/", no ".", nothing a shell or a path would read twice, so a name can
 * never step out of its prefix. The same shape as a VE name.
 */
export const CLUSTER_NAME_PATTERN = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

const nameMessage = 'must be 1-63 lower-case letters, digits and inner hyphens';

/** The default node name: the host name, lower-cased, cut at its first dot. */
export function defaultNodeName(): string {
  return os.hostname().toLowerCase().split('.')[0]!.replace(/[^a-z0-9-]/g, '-').replace(/^-+|-+$/g, '').slice(0, 63) || 'node';
}

const endpointSchema = z.string().regex(/^https?:\/\/(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/, 'each cluster.etcd.endpoints entry must be a URL such as "http://10.0.0.1:2379" or "https://etcd1:2379" (no path)');

/**
 * vesh.yaml `cluster:` — off unless `enabled: true`; a single node then
 * needs no etcd and loads none of the client's code.
 */
export const clusterSchema = z.preprocess((v) => v ?? {}, z.strictObject({
  enabled: z.boolean().default(false),
  /** This node's name in the cluster; default: the host name. */
  name: z.string().regex(CLUSTER_NAME_PATTERN, `cluster.name ${nameMessage}`).optional(),
  /** Which cluster in the etcd (several may share one): keys live under /vesh/<clusterName>/. */
  clusterName: z.string().regex(CLUSTER_NAME_PATTERN, `cluster.clusterName ${nameMessage}`).default('default'),
  /** The address other nodes reach this node at ("HOST:PORT"); default: this server's listen address. */
  advertise: z.string().max(300).regex(/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/, 'cluster.advertise must be "HOST:PORT", for example "10.0.0.5:2222"').optional(),
  /** Seconds a node's registration outlives its last renewal: a dead node drops out after this. */
  leaseSeconds: z.number().int().min(2, 'cluster.leaseSeconds must be at least 2').max(300, 'cluster.leaseSeconds must be at most 300').default(10),
  /** Seconds between updates of this node's load (running VEs, sessions, load average) in etcd. */
  loadInterval: z.number().int().min(1).max(300).default(5),
  etcd: z.strictObject({
    endpoints: z.array(endpointSchema).min(1, 'cluster.etcd.endpoints must list at least one etcd member').max(32),
    /** A deadline (ms) for every etcd call a login or a verb waits on: past it, the login fails with a message instead of hanging. */
    timeout: z.number().int().min(100).max(60_000).default(3000),
    /** PEM files for TLS to etcd: the CA that signed the members' certificates, and this node's client certificate and key. */
    tls: z.strictObject({
      ca: z.string().min(1),
      cert: z.string().min(1).optional(),
      key: z.string().min(1).optional(),
    }).refine((t) => (t.cert === undefined) === (t.key === undefined), 'cluster.etcd.tls: give cert and key together (or neither)').optional(),
    /** etcd user name and password (etcd's own auth, `etcdctl user add`). */
    auth: z.strictObject({
      username: z.string().min(1).max(256),
      password: z.string().min(1).max(1024),
    }).optional(),
  }).optional(),
}).refine((c) => !c.enabled || c.etcd !== undefined, { message: 'cluster.enabled is true but cluster.etcd.endpoints is not set: list the etcd members, e.g. etcd: { endpoints: ["http://127.0.0.1:2379"] }' })
  .refine((c) => !c.etcd?.tls || c.etcd.endpoints.every((e) => e.startsWith('https://')), { message: 'cluster.etcd.tls is set but an endpoint is http://: use https:// endpoints with TLS' }));

export type ClusterConfigFile = z.infer<typeof clusterSchema>;

/** The cluster settings, resolved: paths absolute, the node name and address filled in. */
export interface ClusterConfig {
  enabled: boolean;
  clusterName: string;
  nodeName: string;
  advertise: string;
  leaseSeconds: number;
  loadIntervalMs: number;
  etcd: {
    endpoints: string[];
    timeoutMs: number;
    tls: { ca: string; cert?: string; key?: string } | null;
    auth: { username: string; password: string } | null;
  };
}

/** Resolve the parsed block; `dir` is vesh.yaml's directory, `listen` the server's listen address. */
export function resolveClusterConfig(value: ClusterConfigFile, dir: string, listen: { host: string; port: number }): ClusterConfig {
  const rel = (p: string) => path.resolve(dir, p);
  if (value.enabled && value.advertise === undefined && listen.port === 0) {
    // Port 0 is picked at bind time: other nodes could not be told it.
    throw new VeshError(ErrorCodes.CONFIG_INVALID, 'cluster mode with listen port 0 needs cluster.advertise ("HOST:PORT" other nodes reach this node at), or a fixed listen port');
  }
  const host = listen.host === '0.0.0.0' || listen.host === '::' ? os.hostname() : listen.host;
  const tls = value.etcd?.tls;
  return {
    enabled: value.enabled,
    clusterName: value.clusterName,
    nodeName: value.name ?? defaultNodeName(),
    advertise: value.advertise ?? `${host.includes(':') ? `[${host}]` : host}:${listen.port}`,
    leaseSeconds: value.leaseSeconds,
    loadIntervalMs: value.loadInterval * 1000,
    etcd: {
      endpoints: value.etcd?.endpoints ?? [],
      timeoutMs: value.etcd?.timeout ?? 3000,
      tls: tls ? { ca: rel(tls.ca), ...(tls.cert ? { cert: rel(tls.cert) } : {}), ...(tls.key ? { key: rel(tls.key) } : {}) } : null,
      auth: value.etcd?.auth ?? null,
    },
  };
}
