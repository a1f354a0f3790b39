import { cpSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeArena, type Arena } from '../adversarial/kit.js';
import { ClientTerminal, keyAuthArgs, runProgram, sshBaseArgs, startVeshServe } from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';
import { Recordings } from '../../src/audit/recording-store.js';
import { readChain, type SealEntry } from '../../src/audit/recording-chain.js';
import { silentLogger } from '../../src/audit/logger.js';

/**
 * Issue 13, session recording, end to end with the real OpenSSH client:
 * alice is recorded (accounts.yaml record: true), bob is not. Her terminal
 * session becomes an asciicast (header, output, input, a resize) that
 * asciinema plays back; her exec and SFTP put/rm become events; bob leaves
 * nothing. `vesh recordings verify` passes, and fails with the right line
 * for an edited byte, a removed file and a removed chain entry; retention
 * pruning is told apart from removal. A server killed mid-session leaves
 * its recordings unsealed (verify says so); the next start seals them as
 * `recovered`.
 */
const RECORDING_LINE = 'recording: { maxBytes: 256K }';

describe('vesh serve: session recording', () => {
  let arena: Arena;
  let recDir: string;
  const terms: ClientTerminal[] = [];
  const scratch: string[] = [];

  beforeAll(async () => {
    arena = await makeArena({ template: 'debian', extraYaml: RECORDING_LINE, accounts: { alice: ['record: true'], bob: [] } });
    recDir = arena.env.config.recording!.dir;
  }, 300_000);

  afterAll(async () => {
    for (const t of terms) t.kill();
    for (const d of scratch) rmSync(d, { recursive: true, force: true });
    await arena?.cleanup.run();
  });

  const seals = (): SealEntry[] => readChain(path.join(recDir, 'chain.jsonl')).entries.filter((e): e is SealEntry => e.op === 'seal');

  /** Events of alice's recorded connections, once sealed, parsed. */
  function sealedEvents(): Array<Record<string, unknown>> {
    return seals().filter((e) => e.kind === 'events')
      .flatMap((e) => readFileSync(path.join(recDir, e.file), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>));
  }

  it('records a terminal session as an asciicast that asciinema plays back', async () => {
    const t = new ClientTerminal([...sshBaseArgs(arena.serve.port), ...keyAuthArgs(arena.keys.alice!), '-tt', 'alice@127.0.0.1']);
    terms.push(t);
    const marker = `rec-${Math.random().toString(36).slice(2, 8)}`;
    // The shell computes the number: the echo of what was typed does not hold it.
    t.write(`echo ${marker}-$((6*7))\r`);
    await t.expect(new RegExp(`${marker}-42`));
    t.proc.resize(100, 30);
    // ssh sends the window change when its loop comes round: ask until the size has arrived.
    for (let i = 0; ; i++) {
      t.write('stty size\r');
      try {
        await t.expect(/30 100/, 1000);
        break;
      } catch (err) {
        if (i === 10) throw err;
      }
    }
    t.write('exit\r');
    await t.waitExit();

    await waitFor('the cast sealed', async () => seals().some((e) => e.kind === 'cast' && e.account === 'alice'), 15_000);
    const cast = seals().find((e) => e.kind === 'cast')!;
    expect(cast.reason).toBe('ended');
    const lines = readFileSync(path.join(recDir, cast.file), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as unknown);
    const header = lines[0] as Record<string, unknown>;
    expect(header).toMatchObject({ version: 2, width: 80, height: 24, env: { TERM: 'xterm' } });
    expect(String(header.title)).toContain('alice');
    const events = lines.slice(1) as Array<[number, string, string]>;
    const out = events.filter((e) => e[1] === 'o').map((e) => e[2]).join('');
    const inp = events.filter((e) => e[1] === 'i').map((e) => e[2]).join('');
    expect(out).toContain(`${marker}-42`);
    expect(inp).toContain(`echo ${marker}-$((6*7))`);
    expect(events.filter((e) => e[1] === 'r').map((e) => e[2])).toContain('100x30');
    // Times never go back.
    for (let i = 1; i < events.length; i++) expect(events[i]![0]).toBeGreaterThanOrEqual(events[i - 1]![0]);

    // asciinema cat reads its terminal (/dev/tty): util-linux script gives it one.
    const played = await runProgram('script', ['-qec', `asciinema cat ${path.join(recDir, cast.file)}`, '/dev/null'], { env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: '/var/tmp', LANG: 'C.UTF-8' } });
    expect(played.code, played.stderr).toBe(0);
    expect(played.stdout).toContain(`${marker}-42`);

    const shown = arena.env.cli(['recordings', 'show', cast.file.replace(/\.cast$/, '')]);
    expect(shown.stdout).toContain(`${marker}-42`);
  }, 120_000);

  it('records an exec command and SFTP changes as events, and nothing of an unrecorded account', async () => {
    const r = await arena.ssh('alice', ['echo exec-marker; exit 3']);
    expect(r.code).toBe(3);
    expect(r.stdout).toContain('exec-marker');

    const work = mkdtempSync('/var/tmp/vesh-rec-sftp-');
    scratch.push(work);
    writeFileSync(path.join(work, 'up.txt'), 'recorded upload\n');
    const batch = path.join(work, 'batch');
    writeFileSync(batch, 'put up.txt /root/rec-up.txt\nrm /root/rec-up.txt\nbye\n');
    const sftp = await runProgram('sftp', [...sshBaseArgs(arena.serve.port).map((a) => (a === '-p' ? '-P' : a)), ...keyAuthArgs(arena.keys.alice!), '-b', batch, 'alice@127.0.0.1'], { cwd: work, timeoutMs: 120_000 });
    expect(sftp.code, sftp.stderr).toBe(0);

    const before = readdirSync(recDir).length;
    const bob = await arena.ssh('bob', ['echo bob-was-here']);
    expect(bob.stdout).toContain('bob-was-here');

    await waitFor('the exec and SFTP events sealed', async () => {
      const ev = sealedEvents();
      return ev.some((e) => e.event === 'session.end' && e.exitStatus === 3) && ev.some((e) => e.event === 'sftp.remove');
    }, 15_000);
    const ev = sealedEvents();
    const start = ev.find((e) => e.event === 'session.start' && e.kind === 'exec' && e.command === 'echo exec-marker; exit 3');
    expect(start).toMatchObject({ account: 'alice', ve: 'alice', source: '127.0.0.1' });
    expect(start!.argv).toEqual(expect.arrayContaining(['-c', 'echo exec-marker; exit 3']));
    expect(typeof start!.conn).toBe('string');
    expect(ev.some((e) => e.event === 'sftp.write' && e.path === '/root/rec-up.txt')).toBe(true);
    expect(ev.some((e) => e.event === 'sftp.remove' && e.path === '/root/rec-up.txt')).toBe(true);
    // The broker logged the SFTP changes too (the worker no longer sees sftp-server's log for alice).
    expect(arena.serve.logs.some((l) => l.event === 'sftp.remove' && l.path === '/root/rec-up.txt')).toBe(true);

    // bob is not recorded: no file of his, nothing new for his login.
    expect(readdirSync(recDir).some((f) => f.includes('+bob+'))).toBe(false);
    expect(seals().some((e) => e.account === 'bob')).toBe(false);
    expect(readdirSync(recDir).length).toBe(before);
  }, 180_000);

  it('lists recordings by account', () => {
    const listed = JSON.parse(arena.env.cli(['recordings', 'list', '--account', 'alice', '--json']).stdout) as Array<{ kind: string; status: string }>;
    expect(listed.some((l) => l.kind === 'cast' && l.status === 'sealed')).toBe(true);
    expect(listed.some((l) => l.kind === 'events' && l.status === 'sealed')).toBe(true);
    expect(JSON.parse(arena.env.cli(['recordings', 'list', '--account', 'bob', '--json']).stdout)).toEqual([]);
  });

  /** A copy of the recordings as they are now, and a config naming it (the live directory is left alone). */
  function copyRecordings(): { dir: string; verify: () => { code: number; stdout: string } } {
    const base = mkdtempSync('/var/tmp/vesh-rec-copy-');
    scratch.push(base);
    const dir = path.join(base, 'rec');
    cpSync(recDir, dir, { recursive: true });
    const yaml = readFileSync(arena.env.configFile, 'utf8').replace(RECORDING_LINE, `recording: { dir: ${dir}, maxBytes: 256K, retentionDays: 30 }`);
    const configFile = path.join(base, 'vesh.yaml');
    writeFileSync(configFile, yaml);
    return {
      dir,
      verify: () => {
        const r = arena.env.cli(['--config', configFile, 'recordings', 'verify'], { allowFailure: true });
        return { code: r.code, stdout: r.stdout };
      },
    };
  }

  it('verify passes, and names an edited byte, a removed file and a removed chain entry', () => {
    const ok = copyRecordings();
    const good = ok.verify();
    expect(good.code, good.stdout).toBe(0);
    expect(good.stdout).toMatch(/^ok: /m);
    const cast = seals().find((e) => e.kind === 'cast')!;

    const edited = copyRecordings();
    const f = path.join(edited.dir, cast.file);
    const bytes = readFileSync(f);
    bytes[bytes.length - 3] ^= 0x01;
    writeFileSync(f, bytes);
    const e = edited.verify();
    expect(e.code).not.toBe(0);
    expect(e.stdout).toContain(`edited: ${cast.file}`);

    const removed = copyRecordings();
    rmSync(path.join(removed.dir, cast.file));
    const r = removed.verify();
    expect(r.code).not.toBe(0);
    expect(r.stdout).toContain(`removed: ${cast.file}`);

    const unchained = copyRecordings();
    const chainFile = path.join(unchained.dir, 'chain.jsonl');
    const chain = readFileSync(chainFile, 'utf8').trim().split('\n');
    expect(chain.length).toBeGreaterThanOrEqual(3);
    writeFileSync(chainFile, `${[chain[0], ...chain.slice(2)].join('\n')}\n`);
    const c = unchained.verify();
    expect(c.code).not.toBe(0);
    expect(c.stdout).toMatch(/chain broken before entry 3/);
    // The file whose entry went is in no entry now.
    expect(c.stdout).toMatch(/unsealed: /);
  });

  it('retention pruning is chained and told apart from removal', () => {
    const copy = copyRecordings();
    const config = { ...arena.env.config.recording!, dir: copy.dir, retentionDays: 30 };
    const rec = Recordings.open(config, arena.env.config.dataDir, arena.env.config.hostKeysDir, silentLogger());
    try {
      // 31 days from now every recording made today is past retention.
      const n = rec.prune(Date.now() + 31 * 24 * 60 * 60 * 1000);
      expect(n).toBeGreaterThan(0);
    } finally {
      rec.close();
    }
    expect(readdirSync(copy.dir).filter((f) => f !== 'chain.jsonl')).toEqual([]);
    const v = copy.verify();
    expect(v.code, v.stdout).toBe(0);
    expect(v.stdout).toMatch(/\((\d+) pruned by retention\)/);
    expect(v.stdout).not.toMatch(/removed:/);
  });

  // Last: it replaces the server.
  it('a server killed mid-session leaves the recording unsealed, the next start seals it as recovered, and a stop seals what is open', async () => {
    const t = new ClientTerminal([...sshBaseArgs(arena.serve.port), ...keyAuthArgs(arena.keys.alice!), '-tt', 'alice@127.0.0.1']);
    terms.push(t);
    t.write('echo crash-$((6*7))\r');
    await t.expect(/crash-42/);
    const sealedBefore = new Set(seals().map((e) => e.file));
    const open = () => readdirSync(recDir).filter((f) => f !== 'chain.jsonl' && !sealedBefore.has(f));
    expect(open().some((f) => f.endsWith('.cast'))).toBe(true);
    // A crash: nothing gets to seal.
    await arena.serve.stop('SIGKILL');
    const v = arena.env.cli(['recordings', 'verify'], { allowFailure: true });
    expect(v.code).not.toBe(0);
    for (const f of open()) expect(v.stdout).toContain(`unsealed: ${f}`);

    const again = await startVeshServe(arena.cleanup, arena.env.configFile);
    await again.waitForLog((r) => r.event === 'recording.recovered', 30_000);
    const recovered = seals().filter((e) => e.reason === 'recovered').map((e) => e.file);
    expect(recovered.sort()).toEqual(open().sort());
    expect(readFileSync(path.join(recDir, recovered.find((f) => f.endsWith('.cast'))!), 'utf8')).toContain('crash-42');
    const ok = arena.env.cli(['recordings', 'verify']);
    expect(ok.stdout).toMatch(/^ok: /m);
    expect(arena.env.cli(['recordings', 'list']).stdout).toContain('(recovered)');

    // A stop (SIGTERM) with a recorded terminal open: it is sealed before the server exits.
    const t2 = new ClientTerminal([...sshBaseArgs(again.port), ...keyAuthArgs(arena.keys.alice!), '-tt', 'alice@127.0.0.1']);
    terms.push(t2);
    t2.write('echo stop-$((6*7))\r');
    await t2.expect(/stop-42/);
    const beforeStop = new Set(seals().map((e) => e.file));
    expect(arena.env.cli(['recordings', 'verify']).stdout).toMatch(/^recording: .*\.cast is being written now/m);
    await again.stop('SIGTERM');
    const stopped = seals().filter((e) => !beforeStop.has(e.file));
    expect(stopped.map((e) => e.kind).sort()).toEqual(['cast', 'events']);
    expect(['ended', 'shutdown']).toContain(stopped[0]!.reason);
    expect(readFileSync(path.join(recDir, stopped.find((e) => e.kind === 'cast')!.file), 'utf8')).toContain('stop-42');
    expect(arena.env.cli(['recordings', 'verify']).stdout).toMatch(/^ok: /m);
  }, 120_000);
});
