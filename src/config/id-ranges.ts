import { ErrorCodes, VeshError } from '../errors.js';

/** Host uids and gids base..base+size-1: a VE's root is host uid base. */
export interface IdRange {
  base: number;
  size: number;
}

/** The ids every VE may be given: runtime.idRanges slots of runtime.idmapSize ids from runtime.idmapBase. */
export interface IdSpan {
  idmapBase: number;
  idmapSize: number;
  idRanges: number;
}

/**
 * The range VEs made before per-VE ranges all shared (slot 0). A record
 * without `ids` holds it: such a VE may still run with it, so no new VE
 * may be given it until every such VE has moved to a range of its own.
 */
export function legacyRange(span: IdSpan): IdRange {
  return { base: span.idmapBase, size: span.idmapSize };
}

/** Slot k of the span, or null when `range` is not exactly one slot of it. */
export function slotOf(range: IdRange, span: IdSpan): number | null {
  const off = range.base - span.idmapBase;
  if (range.size !== span.idmapSize || off < 0 || off % span.idmapSize !== 0) return null;
  const k = off / span.idmapSize;
  return k < span.idRanges ? k : null;
}

/**
 * The smallest slot no VE holds. `held` is every existing VE's range (a
 * legacy record's is legacyRange). The caller holds the lock that makes
 * choosing and recording one step (see VeManager).
 */
export function allocateIdRange(held: IdRange[], span: IdSpan): IdRange {
  // Every slot a held range overlaps, aligned or not: a VE made before
  // idmapBase or idmapSize changed keeps its ids, and no new VE may share them.
  const taken = new Set<number>();
  for (const r of held) {
    const first = Math.max(0, Math.floor((r.base - span.idmapBase) / span.idmapSize));
    const last = Math.min(span.idRanges - 1, Math.floor((r.base + r.size - 1 - span.idmapBase) / span.idmapSize));
    for (let k = first; k <= last; k++) taken.add(k);
  }
  for (let k = 0; k < span.idRanges; k++) {
    if (!taken.has(k)) return { base: span.idmapBase + k * span.idmapSize, size: span.idmapSize };
  }
  throw new VeshError(ErrorCodes.VE_ID_RANGES_EXHAUSTED,
    `all ${span.idRanges} VE id ranges (runtime.idRanges) are taken: destroy a VE you no longer need, or raise runtime.idRanges in vesh.yaml (the span must stay below workers.firstUid)`,
    { userMessage: 'Your environment cannot be created: the server has no room for another one; the administrator has been told.' });
}

/** "2 VEs share range X" or "range Y is outside the span": what is wrong with a set of recorded ranges (for vesh doctor). */
export function rangeProblems(ranges: Array<{ ve: string; ids: IdRange | null }>, span: IdSpan): string[] {
  const problems: string[] = [];
  const bySlot = new Map<number, string[]>();
  for (const { ve, ids } of ranges) {
    const r = ids ?? legacyRange(span);
    const k = slotOf(r, span);
    if (k === null) {
      problems.push(`VE "${ve}" holds ids ${r.base}-${r.base + r.size - 1}, which is not one of the ${span.idRanges} ranges of ${span.idmapSize} ids from ${span.idmapBase} (runtime.idmapBase, idmapSize, idRanges changed since it was made?)`);
      continue;
    }
    // VEs without a range of their own share the old one until their next start: that is expected.
    if (!ids) continue;
    bySlot.set(k, [...(bySlot.get(k) ?? []), ve]);
  }
  const legacy = ranges.filter((r) => !r.ids).map((r) => r.ve);
  for (const [k, ves] of bySlot) {
    const withLegacy = k === 0 && legacy.length > 0 ? [...ves, ...legacy] : ves;
    if (withLegacy.length > 1) problems.push(`VEs ${withLegacy.map((v) => `"${v}"`).join(', ')} share ids ${span.idmapBase + k * span.idmapSize}-${span.idmapBase + (k + 1) * span.idmapSize - 1}`);
  }
  return problems;
}
