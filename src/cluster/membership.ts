import type { Lease } from 'etcd3';
import type { Logger } from '../audit/logger.js';
import type { ClusterConfig } from '../config/cluster.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import { withDeadline, type Etcd3 } from './etcd.js';
import { nodeKey } from './keys.js';
import type { NodeRecord } from './records.js';

/**
 * This node's registration: `/vesh/<cluster>/nodes/<name>` under a lease
 * that the etcd client keeps alive (a third of the TTL apart). A node that
 * stops renewing (killed, cut off) drops out when the lease runs out; its
 * VE placements stay, so its VEs are known to live there while it is down.
 *
 * The key is created only if it does not exist (a revision-checked
 * transaction): two live processes never hold one node name. A key still
 * there at start may be this node's previous run, killed before its lease
 * ran out: we wait for that lease (up to its TTL and a margin) before
 * refusing to start.
 */
export class Membership {
  private lease: Lease | null = null;
  private leaseId: string | null = null;
  private timer: NodeJS.Timeout | null = null;
  private closed = false;
  private rejoining: Promise<void> | null = null;
  /** Node-record writes made since start (load updates, re-joins): for the measurements in the README. */
  writes = 0;

  constructor(private readonly deps: {
    client: Etcd3;
    cfg: ClusterConfig;
    log: Logger;
    /** This node's record as it stands now (load figures fresh). */
    record: () => Promise<NodeRecord>;
  }) {}

  private get key(): string {
    return nodeKey(this.deps.cfg.clusterName, this.deps.cfg.nodeName);
  }

  /** Register, waiting out a dead previous run's lease; throws VESH_CLUSTER_NODE_TAKEN if a live process holds the name. */
  async join(): Promise<void> {
    const { cfg } = this.deps;
    const giveUpAt = Date.now() + (cfg.leaseSeconds + 3) * 1000;
    for (;;) {
      if (await this.tryCreate()) break;
      if (Date.now() > giveUpAt) {
        throw new VeshError(ErrorCodes.CLUSTER_NODE_TAKEN, `node name "${cfg.nodeName}" is registered in cluster "${cfg.clusterName}" by another live vesh process (it kept renewing for ${cfg.leaseSeconds + 3} s): stop that server, or give this one another cluster.name in vesh.yaml`);
      }
      this.deps.log.info({ event: 'cluster.node_name_held', node: cfg.nodeName }, `node name ${cfg.nodeName} is still registered (a previous run whose lease has not run out yet?): waiting`);
      await new Promise((r) => setTimeout(r, 500));
    }
    this.timer = setInterval(() => void this.refresh(), cfg.loadIntervalMs);
    this.timer.unref();
  }

  private async tryCreate(): Promise<boolean> {
    const { client, cfg, log } = this.deps;
    const lease = client.lease(cfg.leaseSeconds);
    // An unhandled 'lost' would be an uncaught error; a lost lease means re-join.
    lease.on('lost', (err) => {
      if (this.closed || lease !== this.lease) return;
      log.warn({ event: 'cluster.lease_lost', err: errorMessage(err) }, 'the cluster lease was lost (etcd unreachable for longer than cluster.leaseSeconds?): registering again');
      this.lease = null;
      void this.rejoin();
    });
    let id: string;
    try {
      id = await withDeadline(lease.grant(), cfg.etcd.timeoutMs, 'a lease grant', cfg);
    } catch (err) {
      lease.release();
      throw err;
    }
    const value = JSON.stringify(await this.deps.record());
    const res = await withDeadline(
      client.if(this.key, 'Create', '==', 0).then(client.put(this.key).value(value).lease(id)).commit(),
      cfg.etcd.timeoutMs, 'the node registration', cfg,
    ).catch(async (err: unknown) => {
      await lease.revoke().catch(() => undefined);
      throw err;
    });
    if (!res.succeeded) {
      await lease.revoke().catch(() => lease.release());
      return false;
    }
    this.writes += 1;
    this.lease = lease;
    this.leaseId = id;
    log.info({ event: 'cluster.joined', node: cfg.nodeName, cluster: cfg.clusterName, lease: id, ttl: cfg.leaseSeconds });
    return true;
  }

  private rejoin(): Promise<void> {
    if (this.rejoining) return this.rejoining;
    this.rejoining = (async () => {
      while (!this.closed) {
        try {
          if (await this.tryCreate()) return;
        } catch (err) {
          this.deps.log.warn({ event: 'cluster.rejoin_failed', err: errorMessage(err) });
        }
        await new Promise((r) => setTimeout(r, 1000).unref());
      }
    })().finally(() => { this.rejoining = null; });
    return this.rejoining;
  }

  /** Publish this node's record now rather than at the next load update (e.g. template digests just computed). */
  update(): Promise<void> {
    return this.refresh();
  }

  /** Write the current load, only while the key is still ours (same lease): never over another process's record. */
  private async refresh(): Promise<void> {
    const { client, cfg, log } = this.deps;
    if (this.closed || !this.lease || !this.leaseId) return;
    try {
      const value = JSON.stringify(await this.deps.record());
      const res = await withDeadline(
        client.if(this.key, 'Lease', '==', this.leaseId).then(client.put(this.key).value(value).lease(this.leaseId)).commit(),
        cfg.etcd.timeoutMs, 'the node load update', cfg,
      );
      if (res.succeeded) this.writes += 1;
      else log.warn({ event: 'cluster.record_not_ours' }, 'this node\'s record in etcd is no longer under our lease: registering again');
      if (!res.succeeded && !this.closed) {
        // Its keepalives would otherwise go on for a lease that holds nothing.
        this.lease?.release();
        this.lease = null;
        void this.rejoin();
      }
    } catch (err) {
      log.warn({ event: 'cluster.load_update_failed', err: errorMessage(err) });
    }
  }

  /** The lease this node's record lives under, or null while it is not registered. */
  currentLease(): string | null {
    return this.lease ? this.leaseId : null;
  }

  /** Leave at once (revoking the lease removes the record), rather than after the TTL. */
  async leave(): Promise<void> {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    const lease = this.lease;
    this.lease = null;
    if (lease) await withDeadline(lease.revoke(), this.deps.cfg.etcd.timeoutMs, 'the lease revoke', this.deps.cfg).catch(() => lease.release());
  }
}
