import { readFileSync } from 'node:fs';
import type { Etcd3 } from 'etcd3';
import type { ClusterConfig } from '../config/cluster.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';

export type { Etcd3 } from 'etcd3';

/** What an admin checks when etcd does not answer. */
export function etcdHint(cfg: ClusterConfig): string {
  return `check that the etcd members run and answer ("etcdctl --endpoints=${cfg.etcd.endpoints.join(',')} endpoint health"), that cluster.etcd.endpoints in vesh.yaml lists them, and the TLS and auth settings`;
}

/**
 * The etcd client, loaded only here and only in cluster mode: a single node
 * never loads etcd3 or gRPC (about 40 ms of start-up and some MiB).
 * Every unary call carries a deadline (cluster.etcd.timeout), so a call to
 * an etcd that is gone fails instead of waiting for gRPC's reconnects.
 */
export async function connectEtcd(cfg: ClusterConfig): Promise<Etcd3> {
  const { Etcd3: Client } = await import('etcd3');
  const read = (file: string, what: string) => {
    try {
      return readFileSync(file);
    } catch (err) {
      throw new VeshError(ErrorCodes.CONFIG_INVALID, `cluster.etcd.tls.${what} ${file} cannot be read (${errorMessage(err)}): fix the path in vesh.yaml`);
    }
  };
  const tls = cfg.etcd.tls;
  const timeout = cfg.etcd.timeoutMs;
  return new Client({
    hosts: cfg.etcd.endpoints,
    dialTimeout: timeout,
    ...(tls ? { credentials: { rootCertificate: read(tls.ca, 'ca'), ...(tls.key ? { privateKey: read(tls.key, 'key') } : {}), ...(tls.cert ? { certChain: read(tls.cert, 'cert') } : {}) } } : {}),
    ...(cfg.etcd.auth ? { auth: { ...cfg.etcd.auth, callOptions: { deadline: Date.now() + timeout } } } : {}),
    defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + timeout }),
  });
}

/**
 * `p`, or a VESH_CLUSTER_UNAVAILABLE error once `ms` have passed (the gRPC
 * deadline covers one call; this covers the client's retries around it).
 */
export async function withDeadline<T>(p: Promise<T>, ms: number, what: string, cfg: ClusterConfig): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new VeshError(ErrorCodes.CLUSTER_UNAVAILABLE, `etcd did not answer ${what} within ${ms} ms: ${etcdHint(cfg)}`, {
      userMessage: 'The cluster database does not answer; try again in a moment (the administrator has been told).',
    })), ms);
    timer.unref();
  });
  try {
    return await Promise.race([p, late]);
  } catch (err) {
    if (err instanceof VeshError) throw err;
    throw new VeshError(ErrorCodes.CLUSTER_UNAVAILABLE, `etcd failed ${what}: ${errorMessage(err)}; ${etcdHint(cfg)}`, {
      cause: err, userMessage: 'The cluster database does not answer; try again in a moment (the administrator has been told).',
    });
  } finally {
    clearTimeout(timer);
  }
}
