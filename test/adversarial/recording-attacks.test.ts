import { spawn } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeArena, runAttack, type Arena } from './kit.js';
import { keyAuthArgs, sshBaseArgs } from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';
import { readChain, type SealEntry } from '../../src/audit/recording-chain.js';
import { prepareRecordingDir } from '../../src/audit/recording-store.js';

/**
 * Session recording against the two who would rather it said something
 * else (issue 13): the SSH worker, taken for compromised, and VE root.
 * `vesh serve` runs test/adversarial/hostile-worker.mjs as its worker (it
 * serves honest clients as the real one does, and attacks on command).
 * alice is recorded (record: true), bob is not.
 *
 * - a worker that asks for alice's terminal and never reads or writes it
 *   still yields a recording of what the VE printed (the broker holds the
 *   master and taps it), and cannot put a file of its own among the
 *   recordings;
 * - VE root finds the recordings neither in its mounts nor through
 *   /proc/1/root, and a recordings directory inside a VE's tree is refused;
 * - `yes` flooding alice's terminal: the recording stops at
 *   recording.maxBytes and says so, the output still reaches her, and the
 *   broker serves bob meanwhile.
 */
const HOSTILE = path.join(path.dirname(new URL(import.meta.url).pathname), 'hostile-worker.mjs');
const ATTACKER = '127.0.0.2';
const MAX_BYTES = 64 * 1024;

describe('session recording under attack', () => {
  let arena: Arena;
  let recDir: string;

  beforeAll(async () => {
    arena = await makeArena({
      template: 'busybox',
      extraYaml: 'workers: { count: 2 }\nrecording: { maxBytes: 64K }',
      accounts: { alice: ['record: true'], bob: [] },
      serveEnv: { VESH_WORKER_SCRIPT: HOSTILE },
    });
    recDir = arena.env.config.recording!.dir;
  }, 300_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  });

  const casts = (): SealEntry[] => readChain(path.join(recDir, 'chain.jsonl')).entries.filter((e): e is SealEntry => e.op === 'seal' && e.kind === 'cast');
  const castText = (e: SealEntry) => readFileSync(path.join(recDir, e.file), 'utf8');

  it('a worker that never touches a recorded terminal still gets what the VE printed recorded, and cannot write among the recordings', async () => {
    const before = casts().length;
    const steps = await runAttack(arena.serve.port, ATTACKER, 'recorded-silent', {
      user: 'alice', privateKey: readFileSync(arena.keys.alice!.file, 'utf8'),
      command: 'echo silent-proof-$((6*7)); sleep 1', holdMs: 3000, recDir,
    });
    const step = (name: string): Record<string, unknown> => steps.find((s) => s.step === name) ?? {};
    expect(step('auth.publickey').success, JSON.stringify(steps)).toBe(true);
    expect(step('session'), JSON.stringify(steps)).toMatchObject({ ok: true, tapped: true, fds: 1 });
    expect(step('resize').ok).toBe(true);
    // Hidden from the worker's sandbox (and root's 0700 besides).
    expect(step('forge').result).not.toBe('written');
    expect(existsSync(path.join(recDir, 'forged.cast'))).toBe(false);

    await waitFor('the silent session sealed', async () => casts().length > before, 20_000);
    const cast = casts().slice(before).find((e) => e.account === 'alice')!;
    const text = castText(cast);
    expect(text).toContain('silent-proof-42');
    expect(text).toContain('"r","120x40"');
  }, 120_000);

  /** Files holding `text` anywhere in the VE's tree, seen from / and through /proc/1/root (busybox find: its grep has no --exclude-dir). */
  const search = (text: string) => {
    const pseudo = ['/proc', '/sys', '/dev', '/proc/1/root/proc', '/proc/1/root/sys', '/proc/1/root/dev'].map((p) => `-path ${p}`).join(' -o ');
    return `find / /proc/1/root/ \\( ${pseudo} \\) -prune -o -type f -exec grep -l ${text} {} + 2>/dev/null`;
  };

  it('VE root reaches no recording: not in its mounts, not through /proc/1/root; a directory in a VE tree is refused', async () => {
    expect(casts().length).toBeGreaterThan(0);
    const r = await arena.sh('alice', [
      `cat /proc/self/mountinfo /proc/1/mountinfo | grep -c -e '${recDir}' -e '${arena.env.config.dataDir}' || true`,
      `ls -d '${recDir}' '/proc/1/root${recDir}' '/proc/self/root${recDir}' 2>/dev/null | wc -l`,
      // The VE's whole file system, for the one string only a recording holds;
      // and the same search for a file of the VE's own, which it must find
      // (through / and through /proc/1/root), so that a grep that fails finds nothing by mistake.
      `${search('silent-proof-42')} | wc -l`,
      `echo own-proof-$((6*7)) > /root/own; ${search('own-proof-42')} | wc -l`,
    ].join('; '), { timeoutMs: 120_000 });
    expect(r.stdout.trim().split(/\s+/)).toEqual(['0', '0', '0', '2']);

    const data = arena.env.config.dataDir;
    for (const inside of [path.join(data, 'ves', 'alice', 'recordings'), path.join(data, 'templates', 'rec'), data]) {
      expect(() => prepareRecordingDir(inside, data)).toThrow(/cannot hold recordings/);
    }
  }, 180_000);

  it('a terminal flood stays within the byte cap, still reaches the client, and does not stall the broker for others', async () => {
    const before = casts().length;
    const flood = spawn('ssh', [...sshBaseArgs(arena.serve.port), ...keyAuthArgs(arena.keys.alice!), '-tt', 'alice@127.0.0.1', 'yes & p=$!; sleep 4; kill $p'], {
      stdio: ['pipe', 'pipe', 'ignore'], env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir() },
    });
    let received = 0;
    flood.stdout.on('data', (d: Buffer) => { received += d.length; });
    const ended = new Promise<void>((r) => flood.on('close', () => r()));
    try {
      await waitFor('the flood under way', async () => received > 4 * MAX_BYTES, 30_000);
      // bob is served by the same broker while alice's output pours through it.
      const bob = await arena.ssh('bob', ['echo', 'bob-served']);
      expect(bob.stdout.trim()).toBe('bob-served');
      expect(flood.exitCode, 'the flood was still running when bob was served').toBe(null);
      await ended;
    } finally {
      flood.kill('SIGKILL');
    }
    await waitFor('the flood\'s recording sealed', async () => casts().length > before, 20_000);
    const cast = casts().slice(before).find((e) => e.account === 'alice')!;
    expect(cast.truncated).toBe(true);
    expect(statSync(path.join(recDir, cast.file)).size).toBeLessThanOrEqual(MAX_BYTES);
    expect(cast.size).toBeLessThanOrEqual(MAX_BYTES);
    expect(castText(cast).trim().split('\n').at(-1)).toContain('recording truncated');
    // The session went on past the cap: far more reached the client than the recording holds.
    expect(received).toBeGreaterThan(10 * MAX_BYTES);
    expect(readdirSync(recDir).some((f) => f.includes('+bob+'))).toBe(false);
  }, 120_000);
});
