import { z } from 'zod';
import { CLUSTER_NAME_PATTERN } from '../config/cluster.js';
import { ErrorCodes, VeshError } from '../errors.js';
import { VE_NAME_PATTERN } from '../ve/names.js';

/**
 * The values vesh keeps in etcd, with their schemas. Every node can write
 * every key (etcd has no per-node prefix rights here), so a value read back
 * is another node's word, possibly a compromised one's: each is bounded in
 * size before it is parsed, parsed strictly, and only ever displayed or
 * compared — no field is used as a path, a command or a key.
 */

/** Largest node record accepted (a node with 256 templates stays far below). */
export const MAX_NODE_RECORD_BYTES = 32 * 1024;
/** Largest VE placement record accepted. */
export const MAX_VE_RECORD_BYTES = 1024;

const count = z.number().int().min(0).max(1e12);
/** A time as we write it (toISOString): also keeps escape sequences out of what status prints. */
const time = z.string().regex(/^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{1,20}Z$/);

export const nodeRecordSchema = z.strictObject({
  name: z.string().regex(CLUSTER_NAME_PATTERN),
  /** HOST:PORT other nodes reach this node at: its SSH port, where logins carried from other nodes arrive. */
  address: z.string().max(300).regex(/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/),
  version: z.string().regex(/^[0-9A-Za-z.+-]{1,64}$/),
  /** The node's public key, "ssh-ed25519 AAAA…" (keys/vesh_node_ed25519_key). */
  publicKey: z.string().max(200).regex(/^ssh-ed25519 [A-Za-z0-9+/]+=*$/),
  /**
   * The node's SSH host keys ("ssh-ed25519 AAAA…", "ssh-rsa AAAA…"): another
   * node carrying a login here accepts only these, so the cluster, not the
   * network, says who answers at `address`.
   */
  hostKeys: z.array(z.string().max(1024).regex(/^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+=*$/)).max(8).default([]),
  capacity: z.strictObject({ cpus: count, memoryBytes: count, veSlots: count }),
  load: z.strictObject({
    runningVes: count,
    sessions: count,
    loadavg: z.array(z.number().min(0).max(1e6)).length(3),
  }),
  templates: z.array(z.strictObject({
    name: z.string().regex(/^[a-z0-9][a-z0-9._-]{0,63}$/),
    /** sha256 over the template's tree (src/cluster/template-digest.ts), or null while it is computed. */
    digest: z.string().regex(/^sha256:[0-9a-f]{64}$/).nullable(),
  })).max(256),
  startedAt: time,
  updatedAt: time,
});
export type NodeRecord = z.infer<typeof nodeRecordSchema>;

export const veRecordSchema = z.strictObject({
  node: z.string().regex(CLUSTER_NAME_PATTERN),
  created: time,
  /** Which node wrote the placement (itself, or the node that placed it on `node`). */
  placedBy: z.string().regex(CLUSTER_NAME_PATTERN),
});
export type VeRecord = z.infer<typeof veRecordSchema>;

/** A placement as read: the record, the VE it is for, and etcd's revision of it (create and last change). */
export interface VePlacement extends VeRecord {
  ve: string;
  createRevision: string;
  modRevision: string;
}

function parseBounded<T>(schema: z.ZodType<T>, raw: Buffer | string, max: number, what: string): T {
  const size = typeof raw === 'string' ? Buffer.byteLength(raw) : raw.length;
  if (size > max) throw new VeshError(ErrorCodes.CLUSTER_RECORD_INVALID, `${what} in etcd is ${size} bytes, over the ${max} allowed: a damaged or hostile writer; remove the key with etcdctl`);
  let json: unknown;
  try {
    json = JSON.parse(typeof raw === 'string' ? raw : raw.toString('utf8'));
  } catch {
    throw new VeshError(ErrorCodes.CLUSTER_RECORD_INVALID, `${what} in etcd is not JSON: a damaged or hostile writer; remove the key with etcdctl`);
  }
  const res = schema.safeParse(json);
  if (!res.success) {
    const issue = res.error.issues[0]!;
    throw new VeshError(ErrorCodes.CLUSTER_RECORD_INVALID, `${what} in etcd is invalid (${issue.path.join('.') || 'value'}: ${issue.message.slice(0, 120)}): a damaged or hostile writer; remove the key with etcdctl`);
  }
  return res.data;
}

/** A node record for `name`, or an error when its value is oversized, malformed or names another node. */
export function parseNodeRecord(name: string, raw: Buffer | string): NodeRecord {
  const rec = parseBounded(nodeRecordSchema, raw, MAX_NODE_RECORD_BYTES, `the record of node ${name}`);
  if (rec.name !== name) throw new VeshError(ErrorCodes.CLUSTER_RECORD_INVALID, `the record of node ${name} in etcd names node ${rec.name}: a damaged or hostile writer; remove the key with etcdctl`);
  return rec;
}

export function parseVeRecord(ve: string, raw: Buffer | string): VeRecord {
  if (!VE_NAME_PATTERN.test(ve)) throw new VeshError(ErrorCodes.CLUSTER_RECORD_INVALID, 'a placement record under an invalid VE name');
  return parseBounded(veRecordSchema, raw, MAX_VE_RECORD_BYTES, `the placement of VE ${ve}`);
}
