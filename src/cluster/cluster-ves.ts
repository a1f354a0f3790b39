import type { Logger } from '../audit/logger.js';
import type { ClusterConfig } from '../config/cluster.js';
import type { LimitsInput } from '../config/limits.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import type { VeAccess } from '../ve/access.js';
import { readNodes, type LiveNode } from './cluster-state.js';
import type { Placement } from './placement.js';
import { chooseNode } from './placement.js';

/** The error for a VE placed on another node, where the caller acts on this node's VEs only (logins are carried there instead: routing.ts). */
export function veElsewhere(ve: string, node: string, live: LiveNode | undefined): VeshError {
  if (!live) return nodeDown(ve, node);
  return new VeshError(ErrorCodes.VE_ELSEWHERE, `VE ${ve} lives on node ${node} (${live.record.address}): run this there`, {
    userMessage: `Your environment ${ve} lives on cluster node ${node}.`,
  });
}

/** A login to a VE whose node is not live (no registration) or does not answer. */
export function nodeDown(ve: string, node: string, why = 'not live (no registration in etcd)'): VeshError {
  return new VeshError(ErrorCodes.VE_ELSEWHERE, `VE ${ve} lives on node ${node}, which is ${why}: its logins fail until it is back`, {
    userMessage: `Your environment ${ve} lives on cluster node ${node}, which is down right now; try again when it is back.`,
  });
}

/**
 * VeAccess in cluster mode: before a login's VE is made ready, its
 * placement decides where it runs. A VE known to live here (claimed at
 * start, placed here since, or read once) goes straight to the local
 * VeManager with no etcd call, so a login to it needs no etcd at all and
 * goes on while etcd is down. A VE without a placement is placed on the
 * least-loaded live node that has its template (a create-if-absent
 * transaction). A login to a VE on another node is carried there by the
 * broker (it asks `locate` first); what still reaches ensureRunning for
 * such a VE fails fast with a message. Only ensureRunning is gated: the
 * other calls come after it.
 */
export class ClusterVeAccess implements VeAccess {
  /** VEs whose placement names this node, as last seen (kept current by the placement watch). */
  readonly local = new Set<string>();

  constructor(private readonly inner: VeAccess, private readonly deps: {
    cfg: ClusterConfig;
    placement: Placement;
    nodes: () => Promise<LiveNode[]>;
    defaultTemplate: string;
    log: Logger;
  }) {
    if (inner.agentRoute) this.agentRoute = (ve, spec) => inner.agentRoute!(ve, spec);
  }

  agentRoute?: VeAccess['agentRoute'];

  async ensureRunning(ve: string, opts: { template?: string; limits?: LimitsInput; reason?: string } = {}): Promise<void> {
    if (!this.local.has(ve)) {
      const node = await this.locate(ve, opts.template);
      if (node !== this.deps.cfg.nodeName) throw await this.elsewhere(ve, node);
    }
    return this.inner.ensureRunning(ve, opts);
  }

  /**
   * The node `ve` lives on: read from its placement, or placed now on the
   * least-loaded live node that has the template (which may be another
   * node) when it has none. A VE known to live here needs no etcd call.
   */
  async locate(ve: string, template?: string): Promise<string> {
    const { cfg, placement, log } = this.deps;
    const me = cfg.nodeName;
    if (this.local.has(ve)) return me;
    let current = await placement.get(ve);
    if (!current) {
      const t = template ?? this.deps.defaultTemplate;
      const target = chooseNode(await this.deps.nodes(), t);
      if (!target) {
        throw new VeshError(ErrorCodes.VE_ELSEWHERE, `no live node of cluster ${cfg.clusterName} has template ${t} and a free VE slot: VE ${ve} cannot be placed; build or import the template on a node ("vesh template build"), or check "vesh cluster status"`, {
          userMessage: 'Your environment cannot be created right now: no cluster node can take it; the administrator has been told.',
        });
      }
      const r = await placement.claim(ve, target.record.name);
      current = r.placement;
      if (r.won) log.info({ event: 'cluster.ve_placed', ve, node: current.node, template: t }, `placed VE ${ve} on node ${current.node}`);
    }
    if (current.node === me) this.local.add(ve);
    return current.node;
  }

  /** Whether `ve` is placed on this node: read, never placed (a login another node carries here). */
  async placedHere(ve: string): Promise<boolean> {
    if (this.local.has(ve)) return true;
    const p = await this.deps.placement.get(ve);
    if (p?.node !== this.deps.cfg.nodeName) return false;
    this.local.add(ve);
    return true;
  }

  /** The error for a VE that lives on `node`, for callers that cannot carry it there (vesh ve exec and the like). */
  private async elsewhere(ve: string, node: string): Promise<VeshError> {
    const nodes = await this.deps.nodes().catch((err: unknown) => {
      this.deps.log.warn({ event: 'cluster.nodes_unreadable', err: errorMessage(err) });
      return [];
    });
    const err = veElsewhere(ve, node, nodes.find((n) => n.record.name === node));
    this.deps.log.info({ event: 'cluster.ve_elsewhere', ve, node }, err.message);
    return err;
  }

  lookupUser: VeAccess['lookupUser'] = (ve, user) => this.inner.lookupUser(ve, user);
  processCommand: VeAccess['processCommand'] = (ve, spec) => this.inner.processCommand(ve, spec);
  forwardCommand: VeAccess['forwardCommand'] = (ve, user) => this.inner.forwardCommand(ve, user);
}

/** `readNodes` for ClusterVeAccess. */
export function liveNodesReader(client: Parameters<typeof readNodes>[0], cfg: ClusterConfig, log: Logger): () => Promise<LiveNode[]> {
  return () => readNodes(client, cfg, { log });
}
