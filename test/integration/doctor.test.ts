import { execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

/** `vesh doctor` on this host, which has everything installed, and with a runtime binary that does not exist. */
describe('vesh doctor', () => {
  const dir = mkdtempSync('/var/tmp/vesh-doctor-test-');
  chmodSync(dir, 0o711);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const doctor = (extraYaml: string, args: string[] = []) => {
    const file = path.join(dir, `vesh-${Math.random().toString(16).slice(2)}.yaml`);
    writeFileSync(file, [`dataDir: ${dir}/data`, `hostKeysDir: ${dir}/keys`, `accountsFile: ${dir}/accounts.yaml`, 'network: { bridge: vdoc0, subnet: 10.250.1.0/24 }', extraYaml].join('\n'));
    try {
      return { code: 0, out: execFileSync(process.execPath, [path.resolve('bin/vesh.js'), '--config', file, 'doctor', ...args], { encoding: 'utf8' }) };
    } catch (err) {
      const e = err as { status: number; stdout: string };
      return { code: e.status, out: e.stdout };
    }
  };

  it('passes every needed check here (templates may still be missing: a warning)', () => {
    const r = doctor('', ['--json']);
    const results = JSON.parse(r.out) as Array<{ name: string; status: string }>;
    expect(results.filter((x) => x.status === 'fail')).toEqual([]);
    expect(r.code).toBe(0);
    for (const kind of ['user', 'pid', 'mount', 'uts', 'ipc', 'net', 'cgroup']) {
      expect(results.find((x) => x.name === `${kind} namespace`)?.status).toBe('ok');
    }
    expect(results.find((x) => x.name === 'templates')?.status).toBe('warn');
  });

  it('fails, naming runc and the fix, when the runtime binary is missing', () => {
    const r = doctor('runtime: { binary: /nonexistent/runc }');
    expect(r.code).toBe(1);
    expect(r.out).toMatch(/^FAIL runtime: "\/nonexistent\/runc" cannot be run — fix: apt-get install runc/m);
  });
});
