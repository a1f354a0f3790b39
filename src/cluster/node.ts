import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Logger } from '../audit/logger.js';
import type { ServerConfig } from '../config/server-config.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import type { VeAccess } from '../ve/access.js';
import type { VeManager } from '../ve/manager.js';
import type { TemplateStore } from '../template/store.js';
import { ClusterVeAccess, liveNodesReader } from './cluster-ves.js';
import { connectEtcd, withDeadline, type Etcd3 } from './etcd.js';
import { conflictKey, vesPrefix, nameUnder } from './keys.js';
import { Membership } from './membership.js';
import { loadOrCreateNodeKey } from './node-key.js';
import { Placement } from './placement.js';
import type { NodeRecord } from './records.js';
import { parseVeRecord } from './records.js';
import { NodeRouter } from './routing.js';
import { templateDigests } from './template-digest.js';
import { VE_NAME_PATTERN } from '../ve/names.js';

/** vesh's version, from the package.json two levels above this file (src/cluster/ and dist/cluster/ alike). */
export function veshVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'package.json'), 'utf8')) as { version?: unknown };
    return typeof pkg.version === 'string' ? pkg.version.slice(0, 64) : 'unknown';
  } catch {
    return 'unknown';
  }
}

/** The cluster side of one `vesh serve`: its registration, the placements, and the gate in front of its VEs. */
export interface ClusterNode {
  client: Etcd3;
  membership: Membership;
  placement: Placement;
  /** `inner` behind the placement gate (see ClusterVeAccess). */
  access(inner: VeAccess): ClusterVeAccess;
  /** The broker's way to the other nodes, for logins whose VE lives there (and theirs to here); `gate` from access(). */
  routes(gate: ClusterVeAccess): NodeRouter;
  stop(): Promise<void>;
}

/**
 * Join the cluster: node key, registration (refused when a live process
 * holds this node's name), the VEs on this node's disk claimed for it
 * (a VE that another node owns is reported as a conflict, and left alone),
 * and a watch on the placements that keeps the local cache current.
 * Throws VESH_CLUSTER_UNAVAILABLE (with what to check) when etcd does not answer.
 */
export async function startClusterNode(deps: {
  config: ServerConfig;
  logger: Logger;
  ves: VeManager;
  templates: TemplateStore;
  /** Sessions open on this node right now (the broker's count). */
  sessions: () => number;
  /** This server's SSH host keys ("ssh-ed25519 AAAA…"): published, so other nodes know who answers at our address. */
  hostKeys: string[];
}): Promise<ClusterNode> {
  const cfg = deps.config.cluster;
  if (!cfg?.enabled) throw new VeshError(ErrorCodes.CLUSTER_OFF, 'cluster mode is off');
  const log = deps.logger.child({ component: 'cluster', node: cfg.nodeName });
  const key = await loadOrCreateNodeKey(deps.config.hostKeysDir, log);
  const client = await connectEtcd(cfg);
  const version = veshVersion();
  const startedAt = new Date().toISOString();
  let templates: NodeRecord['templates'] = [];
  const refreshTemplates = async (compute: boolean) => {
    templates = (await templateDigests(deps.config.dataDir, await deps.templates.list(), { compute })).slice(0, 256);
  };
  // Digests not yet cached are computed after the node has joined (below).
  await refreshTemplates(false);
  let ticks = 0;
  const record = async (): Promise<NodeRecord> => {
    // Templates change rarely (a build or import): looked at every 12th update.
    if (++ticks % 12 === 0) await refreshTemplates(true).catch((err: unknown) => log.warn({ event: 'cluster.templates_unreadable', err: errorMessage(err) }));
    const list = await deps.ves.list().catch(() => []);
    return {
      name: cfg.nodeName,
      address: cfg.advertise,
      version,
      publicKey: key.publicKey,
      hostKeys: deps.hostKeys.slice(0, 8),
      capacity: { cpus: os.availableParallelism(), memoryBytes: os.totalmem(), veSlots: deps.config.runtime.idRanges },
      load: { runningVes: list.filter((s) => s.state === 'running').length, sessions: deps.sessions(), loadavg: os.loadavg().map((l) => Math.round(l * 100) / 100) },
      templates,
      startedAt,
      updatedAt: new Date().toISOString(),
    };
  };
  const membership = new Membership({ client, cfg, log, record });
  const placement = new Placement(client, cfg);
  const gates: ClusterVeAccess[] = [];
  try {
    await membership.join();
  } catch (err) {
    client.close();
    throw err;
  }

  if (templates.some((t) => t.digest === null)) {
    void refreshTemplates(true).then(() => membership.update(), (err: unknown) => log.warn({ event: 'cluster.templates_unreadable', err: errorMessage(err) }));
  }

  // Keep the caches current: a placement that moves away or goes is dropped.
  const prefix = vesPrefix(cfg.clusterName);
  const watcher = await withDeadline(client.watch().prefix(prefix).create(), cfg.etcd.timeoutMs, 'the placement watch', cfg);
  watcher.on('error', (err) => log.warn({ event: 'cluster.watch_error', err: errorMessage(err) }));
  watcher.on('put', (kv) => {
    const ve = nameUnder(prefix, kv.key.toString(), VE_NAME_PATTERN);
    if (!ve) return;
    let node: string | null = null;
    try { node = parseVeRecord(ve, kv.value).node; } catch { /* a bad record owns nothing here */ }
    if (node !== cfg.nodeName) for (const g of gates) g.local.delete(ve);
  });
  watcher.on('delete', (kv) => {
    const ve = nameUnder(prefix, kv.key.toString(), VE_NAME_PATTERN);
    if (ve) for (const g of gates) g.local.delete(ve);
  });

  // The VEs on this disk belong here, unless the cluster says otherwise.
  const mine = new Set<string>();
  for (const s of await deps.ves.list()) {
    const r = await placement.claim(s.name, cfg.nodeName);
    if (r.placement.node === cfg.nodeName) {
      mine.add(s.name);
      if (r.won) log.info({ event: 'cluster.ve_claimed', ve: s.name }, `VE ${s.name} on this node's disk is now placed here`);
      continue;
    }
    log.error({ event: 'cluster.placement_conflict', ve: s.name, owner: r.placement.node },
      `VE ${s.name} is on this node's disk, but the cluster places it on node ${r.placement.node}: logins to it here are refused and nothing is changed; keep one copy by hand ("vesh ve destroy ${s.name}" on the node whose copy goes; its placement goes with it if it was that node's), then restart this node to claim the copy it keeps`);
    // Listed under our lease, so it goes when we do: "vesh cluster status" shows it.
    await withDeadline(client.put(conflictKey(cfg.clusterName, s.name, cfg.nodeName)).value('').lease(membershipLease(membership)).exec(), cfg.etcd.timeoutMs, 'a conflict note', cfg)
      .catch((err: unknown) => log.warn({ event: 'cluster.conflict_note_failed', err: errorMessage(err) }));
  }

  return {
    client, membership, placement,
    access(inner) {
      const gate = new ClusterVeAccess(inner, { cfg, placement, nodes: liveNodesReader(client, cfg, log), defaultTemplate: deps.config.defaults.template, log });
      for (const ve of mine) gate.local.add(ve);
      gates.push(gate);
      return gate;
    },
    routes(gate) {
      return new NodeRouter({ cfg, gate, nodes: liveNodesReader(client, cfg, log), key, log });
    },
    async stop() {
      await watcher.cancel().catch(() => undefined);
      await membership.leave();
      client.close();
    },
  };
}

function membershipLease(m: Membership): string {
  const id = m.currentLease();
  if (!id) throw new VeshError(ErrorCodes.CLUSTER_UNAVAILABLE, 'not registered in the cluster');
  return id;
}
