import { parseCpus, parsePids, parseSize } from './units.js';

/** Resource limits of one VE, resolved to numbers. disk 0 means "no disk limit". */
export interface Limits {
  memory: number; // bytes
  pids: number;
  cpus: number;
  disk: number; // bytes
}

/** Limits as written in YAML or on the command line, every field optional. */
export interface LimitsInput {
  memory?: string | number;
  pids?: string | number;
  cpus?: string | number;
  disk?: string | number;
}

export function resolveLimits(input: LimitsInput | undefined, base: Limits): Limits {
  const out: Limits = { ...base };
  if (!input) return out;
  if (input.memory !== undefined) out.memory = parseSize(input.memory, 'memory limit');
  if (input.pids !== undefined) out.pids = parsePids(input.pids);
  if (input.cpus !== undefined) out.cpus = parseCpus(input.cpus);
  if (input.disk !== undefined) out.disk = parseSize(input.disk, 'disk limit');
  return out;
}
