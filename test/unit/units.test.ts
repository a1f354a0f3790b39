import { describe, expect, it } from 'vitest';
import { parseCpus, parseDuration, parsePids, parseSize, formatSize } from '../../src/config/units.js';
import { parseServerConfig } from '../../src/config/server-config.js';

describe('size, duration and limit parsing', () => {
  it('reads binary units', () => {
    expect(parseSize('512M')).toBe(512 * 1024 ** 2);
    expect(parseSize('2G')).toBe(2 * 1024 ** 3);
    expect(parseSize('1.5k')).toBe(1536);
    expect(parseSize(4096)).toBe(4096);
    expect(formatSize(512 * 1024 ** 2)).toBe('512M');
  });
  it('rejects malformed sizes with a message naming the value and the fix', () => {
    expect(() => parseSize('12XB', 'memory limit')).toThrow(/invalid memory limit "12XB".*K, M, G or T/);
    expect(() => parseSize('-1G')).toThrow(/invalid size/);
    expect(() => parseSize('')).toThrow();
  });
  it('reads durations, cpus and pids', () => {
    expect(parseDuration('30s')).toBe(30_000);
    expect(parseDuration('500ms')).toBe(500);
    expect(parseDuration('2m')).toBe(120_000);
    expect(() => parseDuration('soon')).toThrow(/invalid duration/);
    expect(parseCpus('0.5')).toBe(0.5);
    expect(() => parseCpus('0')).toThrow(/positive/);
    expect(parsePids(64)).toBe(64);
    expect(() => parsePids('1.5')).toThrow(/whole number/);
  });
});

describe('vesh.yaml', () => {
  it('fills defaults and resolves paths against the file', () => {
    const cfg = parseServerConfig('/etc/vesh/vesh.yaml', 'listen: "127.0.0.1:2022"\n');
    expect(cfg.listen).toEqual({ host: '127.0.0.1', port: 2022 });
    expect(cfg.hostKeysDir).toBe('/etc/keys');
    expect(cfg.accountsFile).toBe('/etc/vesh/accounts.yaml');
    expect(cfg.defaults.limits).toEqual({ memory: 512 * 1024 ** 2, pids: 512, cpus: 1, disk: 2 * 1024 ** 3 });
    expect(cfg.auth.loginGraceTimeMs).toBe(30_000);
    expect(cfg.network.outbound).toBe(false);
  });
  it('names file, line and problem for a bad value', () => {
    const text = 'listen: "0.0.0.0:2222"\ndefaults:\n  limits:\n    memory: 12XB\n';
    expect(() => parseServerConfig('/x/vesh.yaml', text)).toThrow(/\/x\/vesh\.yaml:4: defaults\.limits\.memory: invalid memory limit "12XB"/);
  });
  it('rejects unknown keys and YAML syntax errors with a line', () => {
    expect(() => parseServerConfig('/x/v.yaml', 'listen: "0.0.0.0:1"\nlisen: 3\n')).toThrow(/v\.yaml:\d+: .*lisen/);
    expect(() => parseServerConfig('/x/v.yaml', 'a: [\n')).toThrow(/v\.yaml:\d+: YAML syntax/);
  });
});
