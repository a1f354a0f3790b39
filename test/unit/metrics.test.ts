import { describe, expect, it } from 'vitest';
import { SourcePenalties } from '../../src/auth/penalties.js';
import { countLogin, readCgroupCpuSeconds, renderMetrics } from '../../src/audit/metrics.js';

describe('metrics', () => {
  it('counts penalties in force, not those that ran out', () => {
    let now = 1_000_000;
    const p = new SourcePenalties({ failuresBeforePenalty: 2, penaltyMs: 1_000, maxPenaltyMs: 10_000 }, { now: () => now });
    p.recordFailure('192.0.2.1', 'alice');
    expect(p.inForce()).toEqual({ sources: 0, accounts: 0 });
    p.recordFailure('192.0.2.1', 'alice');
    expect(p.inForce()).toEqual({ sources: 1, accounts: 1 });
    p.recordFailure('192.0.2.9');
    p.recordFailure('192.0.2.9');
    expect(p.inForce()).toEqual({ sources: 2, accounts: 1 });
    now += 1_001;
    expect(p.inForce()).toEqual({ sources: 0, accounts: 0 });
  });

  it('labels logins by the known methods only, and not key queries', async () => {
    countLogin('success', 'publickey');
    countLogin('failure', 'password');
    countLogin('failure', 'made-up');
    countLogin('key-refused', 'publickey');
    const text = await renderMetrics();
    expect(text).toContain('vesh_logins_total{result="success",method="publickey"} 1');
    expect(text).toContain('vesh_logins_total{result="failure",method="password"} 1');
    expect(text).toContain('vesh_logins_total{result="failure",method="other"} 1');
    expect(text).not.toContain('made-up');
    expect(text).not.toContain('key-refused');
  });

  it('reads no CPU time for a cgroup that is not there', async () => {
    expect(await readCgroupCpuSeconds('/vesh-no-such-cgroup/x', 'hybrid')).toBeNull();
    expect(await readCgroupCpuSeconds('/vesh-no-such-cgroup/x', 'v2')).toBeNull();
  });
});
