import { ErrorCodes, VeshError } from '../errors.js';

const SIZE_UNITS: Record<string, number> = {
  '': 1, B: 1,
  K: 1024, KB: 1024, KIB: 1024,
  M: 1024 ** 2, MB: 1024 ** 2, MIB: 1024 ** 2,
  G: 1024 ** 3, GB: 1024 ** 3, GIB: 1024 ** 3,
  T: 1024 ** 4, TB: 1024 ** 4, TIB: 1024 ** 4,
};

/** "512M" → bytes (binary units, as memory and disk sizes are read by admins). */
export function parseSize(input: string | number, what = 'size'): number {
  if (typeof input === 'number') {
    if (Number.isFinite(input) && input >= 0) return Math.floor(input);
  } else {
    const m = /^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$/.exec(input);
    if (m) {
      const unit = SIZE_UNITS[m[2]!.toUpperCase()];
      if (unit !== undefined) return Math.floor(Number(m[1]) * unit);
    }
  }
  throw new VeshError(ErrorCodes.INVALID_LIMIT, `invalid ${what} "${input}": use a number with an optional unit K, M, G or T (for example 512M or 2G)`);
}

export function formatSize(bytes: number): string {
  const units = ['B', 'K', 'M', 'G', 'T'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1 && v % 1024 === 0) { v /= 1024; i++; }
  if (i === 0 && bytes >= 1024) {
    // not a whole unit: show one decimal of the largest unit
    let j = 0; let w = bytes;
    while (w >= 1024 && j < units.length - 1) { w /= 1024; j++; }
    return `${w.toFixed(1)}${units[j]}`;
  }
  return `${v}${units[i]}`;
}

/** "30s", "2m", "500ms", "1h" or a number of seconds → milliseconds. */
export function parseDuration(input: string | number, what = 'duration'): number {
  if (typeof input === 'number' && Number.isFinite(input) && input >= 0) return input * 1000;
  if (typeof input === 'string') {
    const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(input);
    if (m) {
      const n = Number(m[1]);
      const mult = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? 's') as 'ms' | 's' | 'm' | 'h'];
      return Math.round(n * mult);
    }
  }
  throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `invalid ${what} "${input}": use a number with a unit ms, s, m or h (for example 30s)`);
}

/** CPU count such as 1, 0.5, "1.5" → positive number. */
export function parseCpus(input: string | number): number {
  const n = typeof input === 'number' ? input : Number(input);
  if (!Number.isFinite(n) || n <= 0 || n > 1024) {
    throw new VeshError(ErrorCodes.INVALID_LIMIT, `invalid cpus "${input}": use a positive number of CPUs such as 1 or 0.5`);
  }
  return n;
}

export function parsePids(input: string | number): number {
  const n = typeof input === 'number' ? input : Number(input);
  if (!Number.isInteger(n) || n < 8 || n > 4_194_304) {
    throw new VeshError(ErrorCodes.INVALID_LIMIT, `invalid pids "${input}": use a whole number of processes of at least 8 (for example 512)`);
  }
  return n;
}
