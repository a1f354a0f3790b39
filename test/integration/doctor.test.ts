import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const REPO = path.resolve(__dirname, '../..');

/** `vesh doctor` runs from dist/: compile when doctor's sources are newer (others' type errors do not stop tsc emitting). */
function ensureDoctorBuilt(): void {
  const pairs = [['src/system/doctor-checks.ts', 'dist/system/doctor-checks.js'], ['src/cli/doctor.ts', 'dist/cli/doctor.js']];
  const stale = pairs.some(([src, out]) => !existsSync(path.join(REPO, out!)) || statSync(path.join(REPO, src!)).mtimeMs > statSync(path.join(REPO, out!)).mtimeMs);
  if (!stale) return;
  try {
    execFileSync(process.execPath, [path.join(REPO, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', path.join(REPO, 'tsconfig.json')], { stdio: 'pipe' });
  } catch { /* type errors elsewhere; tsc still emitted */ }
}

interface Result { name: string; status: 'ok' | 'warn' | 'fail'; detail: string; fix?: string }

/** Things doctor makes for a moment and must remove: scratch overlays under /var/tmp and its bridge/veth links. */
function leftovers(): string[] {
  const dirs = readdirSync('/var/tmp').filter((n) => n.startsWith('vesh-doctor-overlay-'));
  const links = execFileSync('ip', ['-o', 'link', 'show'], { encoding: 'utf8' }).split('\n')
    .map((l) => l.split(': ')[1]?.split('@')[0] ?? '').filter((n) => /^vd[bvp][0-9a-f]{6}$/.test(n));
  return [...dirs, ...links];
}

/** `vesh doctor` on this host (root, everything installed), and with a runtime binary that does not exist. */
describe('vesh doctor', () => {
  let dir = '';
  beforeAll(() => {
    ensureDoctorBuilt();
    dir = mkdtempSync('/var/tmp/vesh-doctest-');
    chmodSync(dir, 0o711);
  });
  afterAll(() => { if (dir) rmSync(dir, { recursive: true, force: true }); });

  const doctor = (extraYaml: string, args: string[] = []): { code: number; out: string } => {
    const file = path.join(dir, `vesh-${Math.random().toString(16).slice(2)}.yaml`);
    writeFileSync(file, [
      `dataDir: ${dir}/data`, `hostKeysDir: ${dir}/keys`, `accountsFile: ${dir}/accounts.yaml`,
      'network: { bridge: vdoc0, subnet: 10.250.1.0/24 }', extraYaml,
    ].join('\n'));
    try {
      return { code: 0, out: execFileSync(process.execPath, [path.join(REPO, 'bin', 'vesh.js'), '--config', file, 'doctor', ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }) };
    } catch (err) {
      const e = err as { status: number; stdout: string; stderr: string };
      if (typeof e.status !== 'number') throw err;
      return { code: e.status, out: e.stdout };
    }
  };

  it('passes every needed check here; only the not yet built default template is a warning', () => {
    const before = leftovers();
    const r = doctor('', ['--json']);
    const results = JSON.parse(r.out) as Result[];
    expect(results.filter((x) => x.status === 'fail')).toEqual([]);
    expect(r.code).toBe(0);
    for (const kind of ['user', 'pid', 'mount', 'uts', 'ipc', 'net', 'cgroup']) {
      expect(results.find((x) => x.name === `${kind} namespace`)?.status).toBe('ok');
    }
    for (const name of ['root', 'user namespaces enabled', 'overlayfs', 'cgroups', 'runtime', 'bridge and veth', 'nftables', 'disk tools', 'loop devices', 'dataDir', 'host keys', 'setup helper', 'session helper', 'forward helper']) {
      expect(results.find((x) => x.name === name)?.status, name).toBe('ok');
    }
    expect(results.find((x) => x.name === 'runtime')?.detail).toMatch(/^runc 1\.\d+\.\d+/);
    expect(results.find((x) => x.name === 'cgroups')?.detail).toMatch(/^layout (v1|hybrid|v2);/);
    // A fresh dataDir has no templates: a warning with the command that builds one.
    expect(results.find((x) => x.name === 'templates')).toMatchObject({ status: 'warn', fix: 'vesh template build debian' });
    for (const x of results) if (x.status !== 'ok') expect(x.fix, x.name).toBeTruthy();

    // Doctor leaves the host as it found it: no scratch overlay or links, and neither hostKeysDir nor dataDir made.
    expect(leftovers()).toEqual(before);
    expect(existsSync(path.join(dir, 'keys'))).toBe(false);
    expect(existsSync(path.join(dir, 'data'))).toBe(false);
  });

  it('prints one ok/warn/FAIL line per check without --json', () => {
    const r = doctor('');
    expect(r.code).toBe(0);
    const lines = r.out.trim().split('\n');
    for (const l of lines) expect(l).toMatch(/^(ok {3}|warn |FAIL )\S/);
    expect(lines).toContain('warn templates: default template "debian" is not built yet: logins to new VEs would fail — fix: vesh template build debian');
  });

  it('fails, naming runc and the fix, when the runtime binary is missing', () => {
    const r = doctor('runtime: { binary: /nonexistent/runc }');
    expect(r.code).toBe(1);
    expect(r.out).toMatch(/^FAIL runtime: runc binary "\/nonexistent\/runc" is not installed — fix: apt-get install runc/m);
    // Only that check fails.
    expect(r.out.split('\n').filter((l) => l.startsWith('FAIL'))).toHaveLength(1);
  });
});
