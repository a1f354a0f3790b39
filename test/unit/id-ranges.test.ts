import { describe, expect, it } from 'vitest';
import { allocateIdRange, legacyRange, rangeProblems, slotOf } from '../../src/config/id-ranges.js';
import { parseServerConfig } from '../../src/config/server-config.js';
import { subIdsInRange } from '../../src/system/doctor-checks.js';

const SPAN = { idmapBase: 100_000, idmapSize: 65_536, idRanges: 4 };
const slot = (k: number) => ({ base: 100_000 + k * 65_536, size: 65_536 });

describe('VE id ranges', () => {
  it('gives the smallest slot no VE holds, and a freed slot again', () => {
    expect(allocateIdRange([], SPAN)).toEqual(slot(0));
    expect(allocateIdRange([slot(0), slot(1)], SPAN)).toEqual(slot(2));
    expect(allocateIdRange([slot(0), slot(2)], SPAN)).toEqual(slot(1));
  });

  it('counts a VE without a range of its own as holding the old shared one (slot 0)', () => {
    expect(legacyRange(SPAN)).toEqual(slot(0));
    expect(allocateIdRange([legacyRange(SPAN)], SPAN)).toEqual(slot(1));
  });

  it('keeps clear of a held range that is not one slot (made before idmapBase or idmapSize changed)', () => {
    // 130000-195535 overlaps slots 0 and 1.
    expect(allocateIdRange([{ base: 130_000, size: 65_536 }], SPAN)).toEqual(slot(2));
    // Below and above the span: no slot taken.
    expect(allocateIdRange([{ base: 1_000, size: 65_536 }, { base: 100_000 + 4 * 65_536, size: 65_536 }], SPAN)).toEqual(slot(0));
  });

  it('refuses with a clear error when every slot is held', () => {
    expect(() => allocateIdRange([slot(0), slot(1), slot(2), slot(3)], SPAN)).toThrow(/all 4 VE id ranges \(runtime\.idRanges\) are taken/);
  });

  it('knows a slot only when the range is exactly one of the span', () => {
    expect(slotOf(slot(3), SPAN)).toBe(3);
    expect(slotOf(slot(4), SPAN)).toBeNull();
    expect(slotOf({ base: 100_001, size: 65_536 }, SPAN)).toBeNull();
    expect(slotOf({ base: 100_000, size: 70_000 }, SPAN)).toBeNull();
  });

  it('names ranges outside the span and ranges two VEs share; old VEs sharing slot 0 among themselves are expected', () => {
    expect(rangeProblems([{ ve: 'b', ids: slot(1) }, { ve: 'old1', ids: null }, { ve: 'old2', ids: null }], SPAN)).toEqual([]);
    const p = rangeProblems([{ ve: 'a', ids: slot(1) }, { ve: 'b', ids: slot(1) }, { ve: 'c', ids: { base: 5, size: 65_536 } }, { ve: 'd', ids: slot(0) }, { ve: 'old', ids: null }], SPAN);
    expect(p).toHaveLength(3);
    expect(p.join('\n')).toMatch(/"c" holds ids 5-65540, which is not one of the 4 ranges/);
    expect(p.join('\n')).toMatch(/"a", "b" share ids 165536-231071/);
    expect(p.join('\n')).toMatch(/"d", "old" share ids 100000-165535/);
  });
});

describe('the VE id span in vesh.yaml', () => {
  const config = (runtime: string, workers = '') => parseServerConfig('/tmp/vesh.yaml', `dataDir: /tmp/d\nruntime: { ${runtime} }\n${workers}`);

  it('defaults to 16384 ranges, ending well below the workers\' uids', () => {
    const c = config('stopTimeout: 5s');
    expect(c.runtime.idRanges).toBe(16_384);
    expect(c.runtime.idmapBase + c.runtime.idRanges * c.runtime.idmapSize).toBeLessThan(c.workers.firstUid);
  });

  it('refuses workers.firstUid inside any VE range, not only the first', () => {
    expect(() => config('idRanges: 100', 'workers: { firstUid: 3000000 }')).toThrow(/workers\.firstUid 3000000 overlaps the VE ids \(runtime\.idmapBase 100000 to 6653599/);
    expect(() => config('idRanges: 10', 'workers: { firstUid: 3000000 }')).not.toThrow();
  });

  it('refuses a span past the largest uid', () => {
    expect(() => config('idmapBase: 3000000000, idRanges: 30000', 'workers: { firstUid: 2000 }')).toThrow(/past the largest uid 4294967294: lower runtime\.idRanges/);
  });
});

describe('doctor: subordinate ids against the VE span', () => {
  it('names /etc/subuid entries that overlap the span, and only those', () => {
    const text = 'alice:100000:65536\nbob:2000000000:65536\n# carol:1:2\nbroken line\ndave:90000:10001\n';
    expect(subIdsInRange(text, 100_000, 1_073_841_823)).toEqual(['alice (100000-165535)', 'dave (90000-100000)']);
    expect(subIdsInRange('eve:99999:1\n', 100_000, 200_000)).toEqual([]);
  });
});
