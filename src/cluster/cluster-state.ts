import type { Logger } from '../audit/logger.js';
import type { ClusterConfig } from '../config/cluster.js';
import { CLUSTER_NAME_PATTERN } from '../config/cluster.js';
import { errorMessage } from '../errors.js';
import { VE_NAME_PATTERN } from '../ve/names.js';
import { withDeadline, type Etcd3 } from './etcd.js';
import { conflictsPrefix, nameUnder, nodesPrefix, vesPrefix } from './keys.js';
import { parseNodeRecord, parseVeRecord, type NodeRecord, type VePlacement } from './records.js';

/** A node as the cluster sees it: its record, and how long its lease has left. */
export interface LiveNode {
  record: NodeRecord;
  /** Seconds until the node drops out unless it renews; null when etcd did not say. */
  leaseRemaining: number | null;
}

/** Keys whose values failed their checks: reported, never used. */
export interface BadRecord {
  key: string;
  problem: string;
}

export interface ClusterState {
  nodes: LiveNode[];
  ves: VePlacement[];
  /** VEs that a node has on disk while the placement gives them to another node. */
  conflicts: Array<{ ve: string; node: string }>;
  bad: BadRecord[];
}

/** Keys are listed in bounded pages: a hostile writer's millions of keys cost a bounded read. */
const MAX_KEYS = 100_000;

/** The registered nodes (only live ones have a key: the lease removes the others). */
export async function readNodes(client: Etcd3, cfg: ClusterConfig, opts: { ttl?: boolean; bad?: BadRecord[]; log?: Logger } = {}): Promise<LiveNode[]> {
  const prefix = nodesPrefix(cfg.clusterName);
  const res = await withDeadline(client.getAll().prefix(prefix).limit(MAX_KEYS).exec(), cfg.etcd.timeoutMs, 'the node list', cfg);
  const out: LiveNode[] = [];
  for (const kv of res.kvs) {
    const key = kv.key.toString();
    const name = nameUnder(prefix, key, CLUSTER_NAME_PATTERN);
    if (name === null) {
      opts.bad?.push({ key: JSON.stringify(key.slice(0, 200)), problem: 'not a node name' });
      continue;
    }
    try {
      const record = parseNodeRecord(name, kv.value);
      let leaseRemaining: number | null = null;
      if (opts.ttl && kv.lease && kv.lease !== '0') {
        const t = await withDeadline(client.leaseClient.leaseTimeToLive({ ID: kv.lease }), cfg.etcd.timeoutMs, 'a lease TTL', cfg).catch(() => null);
        leaseRemaining = t ? Number(t.TTL) : null;
      }
      out.push({ record, leaseRemaining });
    } catch (err) {
      opts.bad?.push({ key, problem: errorMessage(err) });
      opts.log?.warn({ event: 'cluster.bad_node_record', key, err: errorMessage(err) });
    }
  }
  return out;
}

export async function readState(client: Etcd3, cfg: ClusterConfig): Promise<ClusterState> {
  const bad: BadRecord[] = [];
  const nodes = await readNodes(client, cfg, { ttl: true, bad });
  const vp = vesPrefix(cfg.clusterName);
  const vres = await withDeadline(client.getAll().prefix(vp).limit(MAX_KEYS).exec(), cfg.etcd.timeoutMs, 'the VE placements', cfg);
  const ves: VePlacement[] = [];
  for (const kv of vres.kvs) {
    const key = kv.key.toString();
    const ve = nameUnder(vp, key, VE_NAME_PATTERN);
    if (ve === null) {
      bad.push({ key: JSON.stringify(key.slice(0, 200)), problem: 'not a VE name' });
      continue;
    }
    try {
      ves.push({ ve, ...parseVeRecord(ve, kv.value), createRevision: String(kv.create_revision), modRevision: String(kv.mod_revision) });
    } catch (err) {
      bad.push({ key, problem: errorMessage(err) });
    }
  }
  const cp = conflictsPrefix(cfg.clusterName);
  const cres = await withDeadline(client.getAll().prefix(cp).limit(MAX_KEYS).keys(), cfg.etcd.timeoutMs, 'the conflicts', cfg);
  const conflicts: ClusterState['conflicts'] = [];
  for (const key of cres) {
    const [ve, node] = key.slice(cp.length).split('/');
    if (ve && node && VE_NAME_PATTERN.test(ve) && CLUSTER_NAME_PATTERN.test(node) && key === `${cp}${ve}/${node}`) conflicts.push({ ve, node });
    else bad.push({ key: JSON.stringify(key.slice(0, 200)), problem: 'not a conflict key' });
  }
  return { nodes, ves, conflicts, bad };
}
