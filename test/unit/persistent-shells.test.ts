import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import type { HoldableTerminal } from '../../src/broker/agent-session.js';
import { HeldShells } from '../../src/broker/held-shells.js';
import type { SpawnedSession } from '../../src/broker/session-spawn.js';
import { parseAccounts } from '../../src/config/accounts.js';
import type { ExitReport } from '../../src/ssh/exit-status.js';
import { waitFor } from '../helpers/ve-env.js';

const log = pino({ level: 'silent' });

/** A held session as the registry sees it: hangup() ends it (its exit comes to whoever holds it then). */
function fakeHeld(pid: number): SpawnedSession & { hungUp: number; end(r: ExitReport): void } {
  const holdable: HoldableTerminal = {
    onExit: () => undefined,
    detach: () => undefined,
    attach: () => Promise.reject(new Error('not in this test')),
  };
  const s = {
    pid,
    fds: [] as number[],
    hungUp: 0,
    signal: () => undefined,
    hangup() {
      s.hungUp += 1;
      s.end({ kind: 'signal', signal: 'HUP' });
    },
    holdable,
    end: (r: ExitReport) => holdable.onExit(r),
  };
  return s;
}

describe('persistentShells in accounts.yaml', () => {
  const one = (body: string) => parseAccounts('accounts.yaml', `a:\n  persistentShells: ${body}\n`).get('a')!.persistentShells;

  it('reads true, false and a map with defaults', () => {
    expect(one('true')).toEqual({ idleLimitMs: 3_600_000, bufferBytes: 65_536 });
    expect(one('false')).toBeUndefined();
    expect(one('{ idleLimit: 10m, buffer: 8K }')).toEqual({ idleLimitMs: 600_000, bufferBytes: 8192 });
    expect(parseAccounts('accounts.yaml', 'a:\n  keys: []\n').get('a')!.persistentShells).toBeUndefined();
  });

  it('refuses what it cannot use, naming the setting', () => {
    expect(() => one('{ buffer: 1M }')).toThrow(/persistentShells\.buffer: buffer must be between 1K and 128K/);
    expect(() => one('{ idleLimit: forever }')).toThrow(/persistentShells\.idleLimit: .*idleLimit/);
    expect(() => one('{ idle: 1h }')).toThrow(/persistentShells\.idle/);
    expect(() => one('yes')).toThrow(/persistentShells must be true, false or \{ idleLimit, buffer \}/);
  });
});

describe('HeldShells', () => {
  const settings = { idleLimitMs: 60_000, bufferBytes: 4096 };

  it('gives the newest held shell back to the same account in the same VE only, with its place in the caps', () => {
    const held = new HeldShells(log);
    let released = 0;
    const older = fakeHeld(10);
    const newer = fakeHeld(11);
    held.hold('alice', 'alice', older, settings, () => { released += 1; });
    held.hold('alice', 'alice', newer, settings, () => { released += 1; });
    expect(held.take('carol', 'alice')).toBeNull();
    expect(held.take('alice', 'bob')).toBeNull();
    const first = held.take('alice', 'alice');
    expect(first?.session).toBe(newer);
    // The place goes with it: freed by whoever takes it up, not by the taking.
    expect(released).toBe(0);
    // Its end no longer reaches the registry once taken.
    newer.end({ kind: 'status', code: 0 });
    expect(released).toBe(0);
    first!.release();
    expect(released).toBe(1);
    expect(held.take('alice', 'alice')?.session).toBe(older);
    expect(held.take('alice', 'alice')).toBeNull();
  });

  it('a held shell that ends leaves the registry and frees its place', () => {
    const held = new HeldShells(log);
    let released = 0;
    const s = fakeHeld(12);
    held.hold('alice', 'alice', s, settings, () => { released += 1; });
    s.end({ kind: 'status', code: 0 });
    expect(released).toBe(1);
    expect(held.count('alice', 'alice')).toBe(0);
  });

  it('hangs up after the idle limit, and on demand by account', async () => {
    const held = new HeldShells(log);
    const idle = fakeHeld(13);
    held.hold('alice', 'alice', idle, { ...settings, idleLimitMs: 50 }, () => undefined);
    await waitFor('the idle hang-up', async () => idle.hungUp === 1, 5_000);
    expect(held.count('alice', 'alice')).toBe(0);
    const a = fakeHeld(14);
    const b = fakeHeld(15);
    held.hold('alice', 'alice', a, settings, () => undefined);
    held.hold('bob', 'bob', b, settings, () => undefined);
    expect(held.hangup((account) => account === 'bob')).toBe(1);
    expect([a.hungUp, b.hungUp]).toEqual([0, 1]);
    expect(held.count('alice', 'alice')).toBe(1);
  });
});
