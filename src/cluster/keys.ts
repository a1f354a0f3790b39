import { CLUSTER_NAME_PATTERN } from '../config/cluster.js';
import { ErrorCodes, VeshError } from '../errors.js';
import { VE_NAME_PATTERN } from '../ve/names.js';

/**
 * Every etcd key vesh uses, built here and only here, from names checked
 * against the name patterns: a VE, node or cluster name holds no "/" and no
 * ".", so no key can leave `/vesh/<cluster>/`, and a key read back maps to
 * exactly one name (or to none: then it is skipped, never guessed at).
 */

function checked(what: string, name: string, pattern: RegExp): string {
  if (typeof name !== 'string' || !pattern.test(name)) {
    throw new VeshError(ErrorCodes.INVALID_NAME, `invalid ${what} name ${JSON.stringify(String(name).slice(0, 64))} for a cluster key: only lower-case letters, digits and inner hyphens`);
  }
  return name;
}

export function clusterPrefix(cluster: string): string {
  return `/vesh/${checked('cluster', cluster, CLUSTER_NAME_PATTERN)}/`;
}

export function nodesPrefix(cluster: string): string {
  return `${clusterPrefix(cluster)}nodes/`;
}

export function nodeKey(cluster: string, node: string): string {
  return `${nodesPrefix(cluster)}${checked('node', node, CLUSTER_NAME_PATTERN)}`;
}

export function vesPrefix(cluster: string): string {
  return `${clusterPrefix(cluster)}ves/`;
}

export function veKey(cluster: string, ve: string): string {
  return `${vesPrefix(cluster)}${checked('VE', ve, VE_NAME_PATTERN)}`;
}

/** Where a node says it has a VE on disk that the placement gives to another node (never resolved by itself). */
export function conflictsPrefix(cluster: string): string {
  return `${clusterPrefix(cluster)}conflicts/`;
}

export function conflictKey(cluster: string, ve: string, node: string): string {
  return `${conflictsPrefix(cluster)}${checked('VE', ve, VE_NAME_PATTERN)}/${checked('node', node, CLUSTER_NAME_PATTERN)}`;
}

/** The name a key under `prefix` stands for, or null when the rest is not one valid name. */
export function nameUnder(prefix: string, key: string, pattern: RegExp): string | null {
  if (!key.startsWith(prefix)) return null;
  const rest = key.slice(prefix.length);
  return pattern.test(rest) ? rest : null;
}
