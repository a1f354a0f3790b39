import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeArena, type Arena } from '../adversarial/kit.js';
import { keyAuthArgs, sshBaseArgs } from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';
import { readChain, type SealEntry } from '../../src/audit/recording-chain.js';
import { closeFd, openPty } from '../../src/system/fdpass.js';
import { readPtyMaster } from '../../src/system/pty-reader.js';

/**
 * A terminal session's last output reaches the client, before its exit
 * status (the bug: with `ssh -tt`, a few KiB at the end of a big output were
 * lost in most sessions, recorded or not). The cause was the reading of the
 * pty master, in the worker and in the broker's recording tap: libuv 1.46
 * takes POLLHUP after a partial read as EOF, and a master's reads are
 * always partial (src/system/pty-reader.ts). Checked with the real OpenSSH
 * client against a real VE, byte for byte, over several sessions each:
 * through the VE's session agent (bob), recorded (alice: the cast holds the
 * same bytes), through `runc exec` (carol's first session, before her VE's
 * agent runs), without a terminal, and with a client that stops reading
 * across the process's exit. And the reader itself against a real pty.
 */

const LINES = 400_000;
/** `seq 1 N` as a terminal shows it (ONLCR) or as a pipe carries it. */
const seqText = (n: number, eol: string) => {
  const parts: string[] = [];
  for (let i = 1; i <= n; i++) parts.push(`${i}${eol}`);
  return parts.join('');
};
const PTY_SEQ = seqText(LINES, '\r\n');
const PIPE_SEQ = seqText(LINES, '\n');
/**
 * The session's process writes `seq 1 n` in big blocks and ends right after
 * the last one went into the terminal's queue (cat, exec'd): the queue is
 * full as the VE side closes, which is where the tail was lost (`seq` alone
 * writes a line at a time, and lost it in some sessions only).
 */
const bulk = (n: number) => `seq 1 ${n} >/tmp/tail-src; exec cat /tmp/tail-src`;

interface SshRun {
  code: number | null;
  out: string;
  child: ChildProcess;
  done: Promise<void>;
}

/** The real ssh client with stdout a pipe read whole (stdin at EOF: -tt still asks for a terminal). */
function startSsh(arena: Arena, account: string, args: string[], command: string): SshRun {
  const child = spawn('ssh', [...sshBaseArgs(arena.serve.port), ...keyAuthArgs(arena.keys[account]!), ...args, `${account}@127.0.0.1`, command], {
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir() },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const run: SshRun = { code: null, out: '', child, done: Promise.resolve() };
  const chunks: Buffer[] = [];
  child.stdout!.on('data', (d: Buffer) => chunks.push(d));
  child.stderr!.on('data', () => undefined);
  child.stdin!.end();
  const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
  run.done = new Promise((resolve) => child.on('close', (code) => {
    clearTimeout(timer);
    run.code = code;
    run.out = Buffer.concat(chunks).toString('latin1');
    resolve();
  }));
  return run;
}

async function ssh(arena: Arena, account: string, args: string[], command: string): Promise<SshRun> {
  const r = startSsh(arena, account, args, command);
  await r.done;
  return r;
}

/** Empty when `got` is `want`; else how it falls short, for the assertion message. */
function shortfall(got: string, want: string): string {
  if (got === want) return '';
  const lastLine = got.trimEnd().split(/\r?\n/).pop();
  return `${want.length - got.length} bytes short of ${want.length}; last line received ${JSON.stringify(lastLine)}`;
}

describe('vesh serve: a terminal session\'s last output reaches the client', () => {
  let arena: Arena;
  let recDir: string;
  const running: ChildProcess[] = [];

  beforeAll(async () => {
    arena = await makeArena({
      template: 'busybox',
      extraYaml: 'recording: { maxBytes: 64M }',
      accounts: { bob: [], alice: ['record: true'], carol: [] },
    });
    recDir = arena.env.config.recording!.dir;
  }, 300_000);

  afterAll(async () => {
    for (const c of running) c.kill('SIGKILL');
    await arena?.cleanup.run();
  });

  it('through runc exec (a VE\'s first session, before its agent runs): the whole output, then the exit status', async () => {
    // PPID 0: the session's parent is outside the VE's pid namespace (runc), not the VE's agent.
    const r = await ssh(arena, 'carol', ['-tt'], `echo "ppid=$PPID="; ${bulk(LINES)}`);
    expect(r.out.slice(0, r.out.indexOf('\n') + 1)).toBe('ppid=0=\r\n');
    expect(shortfall(r.out.slice(r.out.indexOf('\n') + 1), PTY_SEQ)).toBe('');
    expect(r.code).toBe(0);
  }, 120_000);

  it('through the VE\'s session agent: every session gets its last line, then the exit status', async () => {
    await waitFor('bob\'s session agent', async () => (await arena.ssh('bob', ['cat /proc/$PPID/comm'])).stdout.trim() === 'vesh-agent', 60_000);
    const short: string[] = [];
    for (let i = 0; i < 5; i++) {
      const r = await ssh(arena, 'bob', ['-tt'], bulk(LINES));
      const why = shortfall(r.out, PTY_SEQ);
      if (why || r.code !== 0) short.push(`session ${i + 1}: ${why || 'whole'}, exit ${String(r.code)}`);
    }
    expect(short).toEqual([]);
  }, 180_000);

  it('a recorded terminal: the client and the cast both get every byte', async () => {
    await waitFor('alice\'s session agent', async () => (await arena.ssh('alice', ['cat /proc/$PPID/comm'])).stdout.trim() === 'vesh-agent', 60_000);
    const casts = () => readChain(path.join(recDir, 'chain.jsonl')).entries.filter((e): e is SealEntry => e.op === 'seal' && e.kind === 'cast');
    const short: string[] = [];
    for (let i = 0; i < 4; i++) {
      const before = casts().length;
      const r = await ssh(arena, 'alice', ['-tt'], bulk(LINES));
      const why = shortfall(r.out, PTY_SEQ);
      if (why || r.code !== 0) short.push(`session ${i + 1}: ${why || 'whole'}, exit ${String(r.code)}`);
      await waitFor('the cast sealed', async () => casts().length > before, 15_000);
      const cast = casts().at(-1)!;
      const events = readFileSync(path.join(recDir, cast.file), 'utf8').trim().split('\n').slice(1).map((l) => JSON.parse(l) as [number, string, string]);
      const recorded = events.filter((e) => e[1] === 'o').map((e) => e[2]).join('');
      const castWhy = shortfall(recorded, PTY_SEQ);
      if (castWhy) short.push(`cast ${i + 1}: ${castWhy}`);
    }
    expect(short).toEqual([]);
  }, 240_000);

  it('a client that stops reading across the process\'s exit still gets the tail once it reads again', async () => {
    for (const [account, label] of [['bob', 'unrecorded'], ['alice', 'recorded']] as const) {
      // Enough that the client's window fills and the rest waits in the
      // terminal; little enough that the process can end meanwhile, which it
      // marks in its VE (the broker logs the end of a recorded session only
      // once its tap copied the tail, which now waits for the client).
      const n = 100_000;
      const mark = `/tmp/tail-done-${Math.random().toString(36).slice(2, 8)}`;
      const r = startSsh(arena, account, ['-tt'], `seq 1 ${n}; touch ${mark}; exit 3`);
      running.push(r.child);
      await new Promise<void>((resolve) => r.child.stdout!.once('data', () => resolve()));
      r.child.kill('SIGSTOP');
      try {
        // The process ends while its client reads nothing; then longer than
        // the server waits for a silent terminal after an exit.
        await waitFor(`${label}: the process ended`, async () => (await arena.sh(account, `test -e ${mark}`, { allowFailure: true })).code === 0, 20_000);
        await new Promise((res) => setTimeout(res, 3_000));
      } finally {
        r.child.kill('SIGCONT');
      }
      await r.done;
      expect(shortfall(r.out, seqText(n, '\r\n')), label).toBe('');
      expect(r.code, label).toBe(3);
    }
  }, 120_000);

  it('without a terminal: stdout whole, then the exit status', async () => {
    const short: string[] = [];
    for (let i = 0; i < 3; i++) {
      const r = await ssh(arena, 'bob', [], `seq 1 ${LINES}; exit 3`);
      const why = shortfall(r.out, PIPE_SEQ);
      if (why || r.code !== 3) short.push(`session ${i + 1}: ${why || 'whole'}, exit ${String(r.code)}`);
    }
    expect(short).toEqual([]);
  }, 120_000);

  it('the pty reader: what the VE side wrote before it closed is read whole after a pause, then the end', async () => {
    const { master, slave } = openPty();
    // 12000 bytes fit the terminal's queue (18 KiB on kernel 6.18), so the
    // writer ends while the reader is paused, leaving them all queued behind
    // a hang-up: tty.ReadStream read 4095 of them, then took the end (10 of
    // 10 runs here).
    const want = 12_000;
    const writer = spawn('/bin/sh', ['-c', `stty raw -echo; head -c ${want} /dev/zero | tr '\\0' x`], { stdio: [slave, slave, slave] });
    closeFd(slave);
    let got = '';
    let ended = false;
    const reader = readPtyMaster(master, (d) => { got += d.toString('latin1'); }, () => { ended = true; });
    try {
      reader.pause();
      await new Promise<void>((resolve) => writer.on('exit', () => resolve()));
      reader.resume();
      await waitFor('the reader ended', async () => ended, 10_000);
      expect(got.length).toBe(want);
      expect(got).toBe('x'.repeat(want));
    } finally {
      reader.stop();
      closeFd(master);
    }
  }, 30_000);
});
