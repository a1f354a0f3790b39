import { createHash } from 'node:crypto';
import { chmodSync, chownSync, closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/audit/logger.js';
import { ChainWriter, readChain } from '../../src/audit/recording-chain.js';
import { CastWriter } from '../../src/audit/recording-files.js';
import { Recordings, parseRecordingName, prepareRecordingDir } from '../../src/audit/recording-store.js';
import { verifyRecordings } from '../../src/audit/recording-verify.js';

/**
 * The pieces of session recording that need no server: the asciicast
 * writer (UTF-8 split across reads, the byte cap), recording names (only
 * ones the server makes parse), the chain (HMAC, an edited entry), and a
 * recording a crash left unsealed being sealed as `recovered` at start.
 */
const dirs: string[] = [];
function tmp(): string {
  const d = mkdtempSync('/var/tmp/vesh-rec-unit-');
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const HEADER = { width: 80, height: 24, term: 'xterm', shell: '/bin/sh', title: 't', timestamp: 1 };

describe('recording files', () => {
  it('writes an asciicast whose characters survive a read that splits them', () => {
    const f = path.join(tmp(), 'a.cast');
    const w = new CastWriter(f, 1 << 20, HEADER);
    const euro = Buffer.from('€', 'utf8');
    w.output(euro.subarray(0, 1));
    w.output(Buffer.concat([euro.subarray(1), Buffer.from('x')]));
    w.input(Buffer.from('ls\r'));
    w.resize(100, 30);
    const sha = w.close();
    const lines = readFileSync(f, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as unknown);
    expect(lines[0]).toMatchObject({ version: 2, width: 80, height: 24, env: { TERM: 'xterm', SHELL: '/bin/sh' } });
    const evs = lines.slice(1) as Array<[number, string, string]>;
    expect(evs.filter((e) => e[1] === 'o').map((e) => e[2]).join('')).toBe('€x');
    expect(evs.map((e) => e[1])).toEqual(['o', 'i', 'r']);
    expect(evs[2]![2]).toBe('100x30');
    expect(sha).toMatch(/^[0-9a-f]{64}$/);
  });

  it('stops at the byte cap with one line that says so', () => {
    const f = path.join(tmp(), 'b.cast');
    const w = new CastWriter(f, 8192, HEADER);
    for (let i = 0; i < 1000; i++) w.output(Buffer.from('y\r\n'.repeat(20)));
    expect(w.truncated).toBe(true);
    w.close();
    const text = readFileSync(f, 'utf8');
    expect(text.length).toBeLessThanOrEqual(8192);
    expect(text.trim().split('\n').at(-1)).toContain('recording truncated');
  });

  it('parses only names the server makes', () => {
    expect(parseRecordingName('20261203T160512Z+alice+alice+0a1b2c3d+s1.cast')).toMatchObject({ account: 'alice', ve: 'alice', conn: '0a1b2c3d', session: 1, kind: 'cast' });
    expect(parseRecordingName('20261203T160512Z+alice+web-1+0a1b2c3d.events.jsonl')).toMatchObject({ ve: 'web-1', kind: 'events', startedAt: '2026-12-03T16:05:12Z' });
    for (const bad of ['../x.cast', '20261203T160512Z+alice+alice+0a1b2c3d.cast', '20261203T160512Z+alice+alice+0a1b2c3d+s1.events.jsonl', '/etc/passwd', 'chain.jsonl']) {
      expect(parseRecordingName(bad)).toBe(null);
    }
  });
});

describe('recording directory', () => {
  it('is refused under a directory someone other than root could change', () => {
    const base = tmp();
    chownSync(base, 65534, 65534);
    expect(() => prepareRecordingDir(path.join(base, 'rec'), path.join(base, 'data'))).toThrow(/someone other than root can change/);
    chownSync(base, 0, 0);
    chmodSync(base, 0o700);
    expect(prepareRecordingDir(path.join(base, 'rec'), path.join(base, 'data'))).toBe(path.join(base, 'rec'));
  });
});

describe('recording chain', () => {
  it('verifies with its key only, and names an entry edited in place', () => {
    const dir = tmp();
    const key = Buffer.alloc(32, 7);
    const name = '20261203T160512Z+alice+alice+0a1b2c3d.events.jsonl';
    writeFileSync(path.join(dir, name), '{"event":"x"}\n');
    const chain = new ChainWriter(path.join(dir, 'chain.jsonl'), () => key);
    chain.appendSeal({ file: name, size: 14, sha256: 'f'.repeat(64), reason: 'ended', account: 'alice', ve: 'alice', conn: '0a1b2c3d', kind: 'events', startedAt: '2026-12-03T16:05:12Z' });
    // The sha256 above is not the file's: verify says edited.
    expect(verifyRecordings(dir, key).problems.map((p) => p.kind)).toEqual(['edited']);
    // Without the key the link does not match.
    expect(verifyRecordings(dir, null).problems.map((p) => p.kind)).toContain('chain-broken');
    // Someone without the key rewrites the entry to match the file: the hash gives it away.
    const e = readChain(path.join(dir, 'chain.jsonl')).entries[0]!;
    const forged = { ...e, sha256: createHash('sha256').update(readFileSync(path.join(dir, name))).digest('hex') };
    writeFileSync(path.join(dir, 'chain.jsonl'), `${JSON.stringify(forged)}\n`);
    const problems = verifyRecordings(dir, key).problems;
    expect(problems.map((p) => p.kind)).toEqual(['chain-broken']);
    expect(problems[0]!.message).toContain('entry 1');
  });

  it('seals a recording a crash left unsealed, marked recovered, at the next start', () => {
    const base = tmp();
    const dir = path.join(base, 'rec');
    const name = '20261203T160512Z+alice+alice+0a1b2c3d+s1.cast';
    const r1 = Recordings.open({ enabled: true, dir, retentionDays: 0, maxBytes: 1 << 20, hmac: true }, path.join(base, 'data'), path.join(base, 'keys'), silentLogger());
    r1.close();
    writeFileSync(path.join(dir, name), '{"version":2}\n[0.1,"o","cut short"]\n');
    expect(verifyRecordings(dir, null).problems.map((p) => p.kind)).toEqual(['unsealed']);
    // Held open by a process (as the server holds a recording it writes): being recorded, not a problem.
    const fd = openSync(path.join(dir, name), 'r');
    try {
      const live = verifyRecordings(dir, null);
      expect(live.problems).toEqual([]);
      expect(live.recording).toEqual([name]);
    } finally {
      closeSync(fd);
    }
    const r2 = Recordings.open({ enabled: true, dir, retentionDays: 0, maxBytes: 1 << 20, hmac: true }, path.join(base, 'data'), path.join(base, 'keys'), silentLogger());
    r2.close();
    const entries = readChain(path.join(dir, 'chain.jsonl')).entries;
    expect(entries).toHaveLength(1);
    expect(entries[0]).toMatchObject({ op: 'seal', file: name, reason: 'recovered' });
    const key = readFileSync(path.join(base, 'keys', 'recording-chain.key'));
    expect(verifyRecordings(dir, key).ok).toBe(true);
  });
});
