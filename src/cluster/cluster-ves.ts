import type { Logger } from '../audit/logger.js';
import type { ClusterConfig } from '../config/cluster.js';
import type { LimitsInput } from '../config/limits.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import type { VeAccess } from '../ve/access.js';
import { readNodes, type LiveNode } from './cluster-state.js';
import type { Placement } from './placement.js';
import { chooseNode } from './placement.js';

/** The error a login gets for a VE placed on another node (routing between nodes is the next step of issue 14). */
export function veElsewhere(ve: string, node: string, live: LiveNode | undefined): VeshError {
  if (!live) {
    return new VeshError(ErrorCodes.VE_ELSEWHERE, `VE ${ve} lives on node ${node}, which is not live (no registration in etcd): its logins fail until it is back`, {
      userMessage: `Your environment ${ve} lives on cluster node ${node}, which is down right now; try again when it is back.`,
    });
  }
  return new VeshError(ErrorCodes.VE_ELSEWHERE, `VE ${ve} lives on node ${node}; routing between nodes is not built yet: the user must log in at ${live.record.address}`, {
    userMessage: `Your environment ${ve} lives on cluster node ${node}; routing between nodes is not built yet; log in at ${live.record.address} instead.`,
  });
}

/**
 * VeAccess in cluster mode: before a login's VE is made ready, its
 * placement decides where it runs. A VE known to live here (claimed at
 * start, placed here since, or read once) goes straight to the local
 * VeManager with no etcd call, so a login to it needs no etcd at all and
 * goes on while etcd is down. A VE without a placement is placed on the
 * least-loaded live node that has its template (a create-if-absent
 * transaction); one placed on another node fails fast with a message.
 * Only ensureRunning is gated: the other calls come after it in a login.
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
    if (!this.local.has(ve)) await this.placeHere(ve, opts.template);
    return this.inner.ensureRunning(ve, opts);
  }

  /** Resolves once `ve` is placed on this node; throws VESH_VE_ELSEWHERE when it is (or goes) elsewhere. */
  private async placeHere(ve: string, template: string | undefined): Promise<void> {
    const { cfg, placement, log } = this.deps;
    const me = cfg.nodeName;
    let current = await placement.get(ve);
    let nodes: LiveNode[] | null = null;
    if (!current) {
      const t = template ?? this.deps.defaultTemplate;
      nodes = await this.deps.nodes();
      const target = chooseNode(nodes, t);
      if (!target) {
        throw new VeshError(ErrorCodes.VE_ELSEWHERE, `no live node of cluster ${cfg.clusterName} has template ${t} and a free VE slot: VE ${ve} cannot be placed; build or import the template on a node ("vesh template build"), or check "vesh cluster status"`, {
          userMessage: 'Your environment cannot be created right now: no cluster node can take it; the administrator has been told.',
        });
      }
      const r = await placement.claim(ve, target.record.name);
      current = r.placement;
      if (r.won) log.info({ event: 'cluster.ve_placed', ve, node: current.node, template: t }, `placed VE ${ve} on node ${current.node}`);
    }
    if (current.node === me) {
      this.local.add(ve);
      return;
    }
    nodes ??= await this.deps.nodes().catch((err: unknown) => {
      log.warn({ event: 'cluster.nodes_unreadable', err: errorMessage(err) });
      return [];
    });
    const err = veElsewhere(ve, current.node, nodes.find((n) => n.record.name === current.node));
    log.info({ event: 'cluster.ve_elsewhere', ve, node: current.node }, err.message);
    throw err;
  }

  lookupUser: VeAccess['lookupUser'] = (ve, user) => this.inner.lookupUser(ve, user);
  processCommand: VeAccess['processCommand'] = (ve, spec) => this.inner.processCommand(ve, spec);
  forwardCommand: VeAccess['forwardCommand'] = (ve, user) => this.inner.forwardCommand(ve, user);
}

/** `readNodes` for ClusterVeAccess. */
export function liveNodesReader(client: Parameters<typeof readNodes>[0], cfg: ClusterConfig, log: Logger): () => Promise<LiveNode[]> {
  return () => readNodes(client, cfg, { log });
}
