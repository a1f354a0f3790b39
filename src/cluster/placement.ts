import type { ClusterConfig } from '../config/cluster.js';
import { ErrorCodes, VeshError } from '../errors.js';
import { withDeadline, type Etcd3 } from './etcd.js';
import type { LiveNode } from './cluster-state.js';
import { veKey } from './keys.js';
import { parseVeRecord, type VePlacement, type VeRecord } from './records.js';

/**
 * Where each VE lives: `/vesh/<cluster>/ves/<ve>` = {node, created,
 * placedBy}. A record is only ever created by a transaction that succeeds
 * if the key does not exist yet, so two nodes racing for one VE leave one
 * record, and the loser reads the winner's.
 */
export class Placement {
  /** Writes this process made to VE records (for the measurements: a login to a placed VE makes none). */
  writes = 0;

  constructor(private readonly client: Etcd3, private readonly cfg: ClusterConfig) {}

  /** The VE's placement, or null when it has none. */
  async get(ve: string): Promise<VePlacement | null> {
    const res = await withDeadline(this.client.get(veKey(this.cfg.clusterName, ve)).exec(), this.cfg.etcd.timeoutMs, `the placement of VE ${ve}`, this.cfg);
    const kv = res.kvs[0];
    if (!kv) return null;
    return { ve, ...parseVeRecord(ve, kv.value), createRevision: String(kv.create_revision), modRevision: String(kv.mod_revision) };
  }

  /**
   * Place `ve` on `node` unless it is placed already. Resolves with the
   * placement in force and whether this call made it.
   */
  async claim(ve: string, node: string): Promise<{ placement: VePlacement; won: boolean }> {
    const key = veKey(this.cfg.clusterName, ve);
    const record: VeRecord = { node, created: new Date().toISOString(), placedBy: this.cfg.nodeName };
    const res = await withDeadline(
      this.client.if(key, 'Create', '==', 0).then(this.client.put(key).value(JSON.stringify(record))).commit(),
      this.cfg.etcd.timeoutMs, `the placement of VE ${ve}`, this.cfg,
    );
    if (res.succeeded) {
      this.writes += 1;
      const rev = String(res.header.revision);
      return { placement: { ve, ...record, createRevision: rev, modRevision: rev }, won: true };
    }
    const now = await this.get(ve);
    // Created and removed again between our two calls: rare; the caller may try again.
    if (!now) throw new VeshError(ErrorCodes.VE_BUSY, `the placement of VE ${ve} changed while it was being read: try again`, { userMessage: 'Your environment is being changed; try again in a moment.' });
    return { placement: now, won: false };
  }

  /** Remove the placement, only if it is still the one read (`modRevision`): a VE destroyed on its node. */
  async release(ve: string, modRevision: string): Promise<boolean> {
    const key = veKey(this.cfg.clusterName, ve);
    const res = await withDeadline(
      this.client.if(key, 'Mod', '==', modRevision).then(this.client.delete().key(key)).commit(),
      this.cfg.etcd.timeoutMs, `the removal of VE ${ve}'s placement`, this.cfg,
    );
    if (res.succeeded) this.writes += 1;
    return res.succeeded;
  }
}

/**
 * The live node a new VE goes to: among those that have the template, the
 * one with the most free VE slots in proportion (running VEs / slots), then
 * the lower load average, then the name (so every node picks the same one
 * from the same records). null when no live node has the template.
 */
export function chooseNode(nodes: LiveNode[], template: string): LiveNode | null {
  const fit = nodes.filter((n) => n.record.templates.some((t) => t.name === template) && n.record.load.runningVes < n.record.capacity.veSlots);
  fit.sort((a, b) => {
    const la = a.record.load.runningVes / Math.max(1, a.record.capacity.veSlots);
    const lb = b.record.load.runningVes / Math.max(1, b.record.capacity.veSlots);
    if (la !== lb) return la - lb;
    const ca = a.record.load.loadavg[0]! / Math.max(1, a.record.capacity.cpus);
    const cb = b.record.load.loadavg[0]! / Math.max(1, b.record.capacity.cpus);
    if (Math.abs(ca - cb) > 0.05) return ca - cb;
    return a.record.name < b.record.name ? -1 : a.record.name > b.record.name ? 1 : 0;
  });
  return fit[0] ?? null;
}
