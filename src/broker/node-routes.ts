import type { KeyObject } from 'node:crypto';

/**
 * What the broker needs of the cluster to carry logins between nodes
 * (src/cluster/routing.ts implements it; absent on a single node).
 *
 * A login to a VE on another node: the broker authenticates it here, then
 * hands the worker a TCP connection to that node's SSH port
 * (`cluster.connect`) and signs, with this node's key, the one login there
 * that names the account and what the client's key may do
 * (`cluster.sign`, node-vouch.ts). A login carried here from another
 * node: the key must be a live node's key, and the VE must live here.
 */
export interface NodeRoutes {
  readonly nodeName: string;
  /** This node's key: the "ssh-ed25519 AAAA…" line and its wire blob. */
  readonly nodeKey: { blob: Buffer; line: string };
  /** The node `ve` lives on (placed now, maybe on another node, when it has no placement). */
  locate(ve: string): Promise<string>;
  /** Whether `ve` is placed on this node; never places it (for logins other nodes carry here). */
  placedHere(ve: string): Promise<boolean>;
  /**
   * A descriptor of a TCP connection to `node`'s SSH port (the caller owns
   * it) and the host keys the cluster lists for that node. Throws a
   * VeshError whose userMessage says the node is down when it is not live
   * or does not answer.
   */
  connect(node: string, ve: string): Promise<{ fd: number; hostKeys: string[] }>;
  /** An ed25519 signature with this node's key. */
  sign(data: Buffer): Buffer;
  /** The live node (not this one) whose node key has this wire blob, or null. */
  nodeOfKey(blob: Buffer): Promise<{ name: string; key: KeyObject } | null>;
}
