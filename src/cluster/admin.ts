import type { ServerConfig } from '../config/server-config.js';
import type { ClusterConfig } from '../config/cluster.js';
import { ErrorCodes, VeshError } from '../errors.js';
import { connectEtcd, type Etcd3 } from './etcd.js';

/** The cluster settings, or a VESH_CLUSTER_OFF error that says how to turn it on. */
export function clusterConfigOf(config: ServerConfig, what: string): ClusterConfig {
  if (!config.cluster?.enabled) {
    throw new VeshError(ErrorCodes.CLUSTER_OFF, `${what} needs cluster mode, which is off in ${config.configFile}: set cluster.enabled: true and cluster.etcd.endpoints there (see the "Cluster (preview)" section of the README)`);
  }
  return config.cluster;
}

/** Run `fn` with an etcd client for an admin verb, closing it after. */
export async function withEtcd<T>(cfg: ClusterConfig, fn: (client: Etcd3) => Promise<T>): Promise<T> {
  const client = await connectEtcd(cfg);
  try {
    return await fn(client);
  } finally {
    client.close();
  }
}

/**
 * `vesh ve create NAME [--node N]` in cluster mode: place the VE on N (this
 * node by default) with the create-if-absent transaction, then, if N is
 * this node, create it here (`createHere`); a failed create removes the
 * placement again. On another node only the placement is written: that
 * node creates the VE at its first login. Returns the node it went to.
 */
export async function createPlaced(config: ServerConfig, ve: string, opts: { node?: string; template: string }, createHere: () => Promise<void>): Promise<{ node: string; here: boolean }> {
  if (!config.cluster?.enabled && opts.node === undefined) {
    await createHere();
    return { node: '', here: true };
  }
  const cfg = clusterConfigOf(config, '--node');
  const { Placement, chooseNode } = await import('./placement.js');
  const { readNodes } = await import('./cluster-state.js');
  const { CLUSTER_NAME_PATTERN } = await import('../config/cluster.js');
  const target = opts.node ?? cfg.nodeName;
  if (!CLUSTER_NAME_PATTERN.test(target)) throw new VeshError(ErrorCodes.INVALID_NAME, `--node "${target.slice(0, 64)}" is not a node name: see "vesh cluster status" for the nodes`);
  return withEtcd(cfg, async (client) => {
    const placement = new Placement(client, cfg);
    if (target !== cfg.nodeName) {
      const nodes = await readNodes(client, cfg);
      const node = nodes.find((n) => n.record.name === target);
      if (!node) throw new VeshError(ErrorCodes.VE_ELSEWHERE, `node ${target} is not a live member of cluster ${cfg.clusterName}: see "vesh cluster status" for the live nodes`);
      if (!chooseNode([node], opts.template)) throw new VeshError(ErrorCodes.TEMPLATE_NOT_FOUND, `node ${target} has no template ${opts.template} (or no free VE slot): build or import it there first`);
    }
    const r = await placement.claim(ve, target);
    if (!r.won) throw new VeshError(ErrorCodes.VE_EXISTS, `VE ${ve} is already placed on node ${r.placement.node} (since ${r.placement.created}): choose another name`);
    if (target !== cfg.nodeName) return { node: target, here: false };
    try {
      await createHere();
    } catch (err) {
      await placement.release(ve, r.placement.modRevision).catch(() => undefined);
      throw err;
    }
    return { node: target, here: true };
  });
}

/** After `vesh ve destroy` in cluster mode: the placement goes too, if it names this node. Returns whether it went. */
export async function releaseDestroyed(config: ServerConfig, ve: string): Promise<boolean> {
  if (!config.cluster?.enabled) return false;
  const cfg = config.cluster;
  const { Placement } = await import('./placement.js');
  return withEtcd(cfg, async (client) => {
    const placement = new Placement(client, cfg);
    const p = await placement.get(ve);
    if (!p || p.node !== cfg.nodeName) return false;
    return placement.release(ve, p.modRevision);
  });
}

/**
 * Before `vesh ve start|restart|enter` in cluster mode: a VE whose placement
 * names another node is not started here (that would run a second copy
 * beside the owner's); one with no placement is placed here first.
 */
export async function assertPlacedHere(config: ServerConfig, ve: string): Promise<void> {
  if (!config.cluster?.enabled) return;
  const cfg = config.cluster;
  const { Placement } = await import('./placement.js');
  await withEtcd(cfg, async (client) => {
    const { placement } = await new Placement(client, cfg).claim(ve, cfg.nodeName);
    if (placement.node !== cfg.nodeName) {
      throw new VeshError(ErrorCodes.VE_ELSEWHERE, `VE ${ve} is placed on node ${placement.node}, not on this node (${cfg.nodeName}): start it there; a copy on this node's disk is a conflict to resolve by hand ("vesh ve destroy ${ve}" on the node whose copy goes)`);
    }
  });
}
