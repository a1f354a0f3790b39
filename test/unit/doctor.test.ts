import { describe, expect, it } from 'vitest';
import { doctorExitCode, formatCheck, runChecks, type CheckResult } from '../../src/system/doctor-checks.js';

describe('vesh doctor results', () => {
  it('prints ok lines bare and failures with their fix', () => {
    expect(formatCheck({ name: 'runtime', status: 'ok', detail: 'runc 1.1.5' })).toBe('ok   runtime: runc 1.1.5');
    expect(formatCheck({ name: 'runtime', status: 'fail', detail: '"x" cannot be run', fix: 'apt-get install runc' })).toBe('FAIL runtime: "x" cannot be run — fix: apt-get install runc');
  });

  it('exits 1 on any failure, 0 with only warnings', () => {
    const w: CheckResult = { name: 'a', status: 'warn', detail: 'd', fix: 'f' };
    const f: CheckResult = { name: 'b', status: 'fail', detail: 'd', fix: 'f' };
    expect(doctorExitCode([w])).toBe(0);
    expect(doctorExitCode([w, f])).toBe(1);
  });

  it('reports a check that throws as failed and runs the rest', async () => {
    const boom = async function checkBoom(): Promise<CheckResult> { throw new Error('no such file'); };
    const fine = async (): Promise<CheckResult> => ({ name: 'fine', status: 'ok', detail: 'yes' });
    const results = await runChecks({} as never, [boom, fine]);
    expect(results.map((r) => [r.name, r.status])).toEqual([['boom', 'fail'], ['fine', 'ok']]);
  });
});
