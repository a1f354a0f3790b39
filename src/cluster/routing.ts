import { createPublicKey, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import ssh2 from 'ssh2';
import type { Logger } from '../audit/logger.js';
import type { NodeRoutes } from '../broker/node-routes.js';
import type { ClusterConfig } from '../config/cluster.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import { dupFd, socketFd } from '../system/fdpass.js';
import type { LiveNode } from './cluster-state.js';
import { nodeDown, type ClusterVeAccess } from './cluster-ves.js';

const { utils } = ssh2;

/** How long connecting to another node's SSH port may take before the login is told the node is down. */
const CONNECT_TIMEOUT_MS = 3_000;
/** The node list, read again at most this often when a node key is looked up (node keys change only with a node's key file). */
const NODES_FRESH_MS = 2_000;

/** "host:port" or "[v6]:port" (the record's schema checked the form). */
function splitAddress(address: string): { host: string; port: number } {
  const i = address.lastIndexOf(':');
  const host = address.slice(0, i).replace(/^\[(.*)\]$/, '$1');
  return { host, port: Number(address.slice(i + 1)) };
}

/** The raw ed25519 public key in an "ssh-ed25519 AAAA…" line. */
function ed25519Of(line: string): { blob: Buffer; key: KeyObject } {
  const blob = Buffer.from(line.split(' ')[1] ?? '', 'base64');
  // string "ssh-ed25519" (4 + 11), string key (4 + 32)
  if (blob.length !== 51 || blob.readUInt32BE(0) !== 11 || blob.subarray(4, 15).toString('latin1') !== 'ssh-ed25519' || blob.readUInt32BE(15) !== 32) {
    throw new VeshError(ErrorCodes.CLUSTER_RECORD_INVALID, 'a node key that is not an ed25519 public key');
  }
  return { blob, key: createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: blob.subarray(19).toString('base64url') }, format: 'jwk' }) };
}

/**
 * The broker's way to other nodes (NodeRoutes): where a login's VE lives,
 * a TCP connection to that node's SSH port with the host keys the cluster
 * lists for it, signatures with this node's key, and, for logins carried
 * here, which live node a key belongs to.
 */
export class NodeRouter implements NodeRoutes {
  readonly nodeName: string;
  readonly nodeKey: { blob: Buffer; line: string };
  private readonly signer: ssh2.ParsedKey;
  private cache: { at: number; nodes: LiveNode[] } | null = null;
  private reading: Promise<LiveNode[]> | null = null;

  constructor(private readonly deps: {
    cfg: ClusterConfig;
    gate: ClusterVeAccess;
    nodes: () => Promise<LiveNode[]>;
    key: { publicKey: string; file: string };
    log: Logger;
  }) {
    this.nodeName = deps.cfg.nodeName;
    this.nodeKey = { blob: ed25519Of(deps.key.publicKey).blob, line: deps.key.publicKey };
    const parsed = utils.parseKey(readFileSync(deps.key.file));
    if (parsed instanceof Error || Array.isArray(parsed) || parsed.type !== 'ssh-ed25519') {
      throw new VeshError(ErrorCodes.CONFIG_INVALID, `the node key ${deps.key.file} is not an ed25519 private key: move it away and restart to make a new one`);
    }
    this.signer = parsed;
  }

  locate(ve: string): Promise<string> {
    return this.deps.gate.locate(ve);
  }

  placedHere(ve: string): Promise<boolean> {
    return this.deps.gate.placedHere(ve);
  }

  sign(data: Buffer): Buffer {
    const sig = this.signer.sign(data);
    if (sig instanceof Error) throw sig;
    return sig;
  }

  /** The live nodes, read at most every NODES_FRESH_MS unless `fresh` (one read at a time). */
  private async liveNodes(fresh: boolean): Promise<LiveNode[]> {
    if (!fresh && this.cache && Date.now() - this.cache.at < NODES_FRESH_MS) return this.cache.nodes;
    this.reading ??= this.deps.nodes().then((nodes) => {
      this.cache = { at: Date.now(), nodes };
      return nodes;
    }).finally(() => {
      this.reading = null;
    });
    return this.reading;
  }

  async nodeOfKey(blob: Buffer): Promise<{ name: string; key: KeyObject } | null> {
    for (const n of await this.liveNodes(false)) {
      if (n.record.name === this.nodeName) continue;
      try {
        const k = ed25519Of(n.record.publicKey);
        if (k.blob.equals(blob)) return { name: n.record.name, key: k.key };
      } catch { /* a record whose key is not ed25519 vouches for nothing */ }
    }
    return null;
  }

  async connect(node: string, ve: string): Promise<{ fd: number; hostKeys: string[] }> {
    let nodes: LiveNode[];
    try {
      nodes = await this.liveNodes(true);
    } catch (err) {
      throw new VeshError(ErrorCodes.CLUSTER_UNAVAILABLE, `cannot read the cluster's nodes to carry a login to VE ${ve} on node ${node}: ${errorMessage(err)}`, {
        userMessage: `Your environment ${ve} lives on cluster node ${node}, and the cluster cannot be asked where that node is right now; try again shortly.`,
      });
    }
    const live = nodes.find((n) => n.record.name === node);
    if (!live) throw nodeDown(ve, node);
    if (live.record.hostKeys.length === 0) throw nodeDown(ve, node, 'registered without host keys (an older vesh)');
    const { host, port } = splitAddress(live.record.address);
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect({ host, port });
      const timer = setTimeout(() => {
        s.destroy();
        reject(nodeDown(ve, node, `not answering at ${live.record.address} (no connection in ${CONNECT_TIMEOUT_MS / 1000} s)`));
      }, CONNECT_TIMEOUT_MS);
      s.once('connect', () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once('error', (err) => {
        clearTimeout(timer);
        s.destroy();
        reject(nodeDown(ve, node, `not answering at ${live.record.address} (${errorMessage(err)})`));
      });
    });
    const fd = socketFd(socket);
    try {
      if (fd === null) throw new Error('no descriptor');
      // Ours to hand over; the socket object goes (closing its copy only).
      return { fd: dupFd(fd), hostKeys: live.record.hostKeys };
    } catch (err) {
      throw new VeshError(ErrorCodes.INTERNAL, `cannot hand over the connection to node ${node}: ${errorMessage(err)}`, { userMessage: 'The server could not reach the node your environment lives on.' });
    } finally {
      socket.destroy();
    }
  }
}
