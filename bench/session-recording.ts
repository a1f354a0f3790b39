/**
 * Cost of session recording (issue 13): CPU of the broker and of the SSH
 * workers per MiB of terminal output through a recorded session (the broker
 * holds the pty master, copies both ways and writes the asciicast) beside
 * the peer, an unrecorded session of the same VE in the same run (the
 * worker holds the master; the broker sees no byte). One `ssh -tt` per
 * round prints MIB MiB (`head -c | tr`) to a client that discards it; wall
 * time from the client. recording.maxBytes is set past the output so all of
 * it is recorded. Rounds interleaved; medians and min–max. Run as root under
 * the bench lock:
 *   flock /tmp/vesh-bench.lock ./node_modules/.bin/vite-node bench/session-recording.ts -- [rounds] [MiB]
 */
import { spawn } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Cleanup, keyAuthArgs, makeClientKey, sshBaseArgs, startVeshServe, tempDir, writeAccounts } from '../test/helpers/ssh-harness.js';
import { makeVeTestEnv } from '../test/helpers/ve-env.js';
import { median } from './lib.js';

const rounds = Number(process.argv[2] ?? 5);
const mib = Number(process.argv[3] ?? 64);
const TICK_MS = 1000 / 100;

/** utime + stime of `pid`, ms. */
function cpuMs(pid: number): number {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return (Number(f[11]) + Number(f[12])) * TICK_MS;
  } catch {
    return 0;
  }
}

/** The broker's descendants (the SSH workers and their launchers). */
function descendants(root: number): number[] {
  const parent = new Map<number, number>();
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const f = readFileSync(`/proc/${d}/stat`, 'utf8').split(') ')[1]!.split(' ');
      parent.set(Number(d), Number(f[1]));
    } catch { /* gone */ }
  }
  const out: number[] = [];
  for (const [pid] of parent) {
    for (let p = parent.get(pid); p !== undefined && p > 1; p = parent.get(p)) {
      if (p === root) {
        out.push(pid);
        break;
      }
    }
  }
  return out;
}

function floodOnce(port: number, account: string, keyFile: string): Promise<{ ms: number; bytes: number }> {
  return new Promise((resolve, reject) => {
    const t = performance.now();
    const c = spawn('ssh', [...sshBaseArgs(port), ...keyAuthArgs({ file: keyFile } as never), '-tt', `${account}@127.0.0.1`, `head -c ${mib * 1024 * 1024} /dev/zero | tr '\\0' a`], {
      stdio: ['pipe', 'pipe', 'ignore'], env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir() },
    });
    let bytes = 0;
    c.stdout.on('data', (d: Buffer) => { bytes += d.length; });
    c.on('error', reject);
    c.on('close', () => resolve({ ms: performance.now() - t, bytes }));
  });
}

const env = await makeVeTestEnv({ template: 'busybox', extraYaml: 'recording: { maxBytes: 1T, hmac: true }\nworkers: { count: 1 }' });
const cleanup = new Cleanup();
try {
  const dir = tempDir(cleanup);
  const rec = makeClientKey(dir, 'ed25519', 'rec');
  const plain = makeClientKey(dir, 'ed25519', 'plain');
  writeAccounts(env.config.accountsFile, `rec:\n  ve: benchve\n  record: true\n  keys:\n    - ${rec.publicLine}\nplain:\n  ve: benchve\n  keys:\n    - ${plain.publicLine}\n`);
  const serve = await startVeshServe(cleanup, env.configFile);
  const broker = serve.child.pid!;
  // Warm: the VE boots and its session agent comes up.
  for (let i = 0; i < 3; i++) await floodOnce(serve.port, 'plain', plain.file);
  const res: Record<string, { broker: number[]; workers: number[]; wall: number[] }> = { rec: { broker: [], workers: [], wall: [] }, plain: { broker: [], workers: [], wall: [] } };
  for (let r = 0; r < rounds; r++) {
    for (const [who, key] of (r % 2 ? [['plain', plain], ['rec', rec]] : [['rec', rec], ['plain', plain]]) as Array<[string, { file: string }]>) {
      const workers = descendants(broker);
      const b0 = cpuMs(broker);
      const w0 = workers.reduce((s, p) => s + cpuMs(p), 0);
      const out = await floodOnce(serve.port, who, key.file);
      const b1 = cpuMs(broker);
      const w1 = workers.reduce((s, p) => s + cpuMs(p), 0);
      const got = out.bytes / (1024 * 1024);
      // A few KiB of a terminal's last output can go missing at its end, recorded or not: measured
      // here on both paths alike (the recording holds what the broker read from the master).
      if (out.bytes < (mib - 1) * 1024 * 1024) throw new Error(`${who}: only ${out.bytes} of ${mib * 1024 * 1024} bytes arrived`);
      res[who]!.broker.push((b1 - b0) / got);
      res[who]!.workers.push((w1 - w0) / got);
      res[who]!.wall.push(out.ms);
    }
  }
  const fmt = (xs: number[], d = 2) => `${median(xs).toFixed(d)} (${Math.min(...xs).toFixed(d)}–${Math.max(...xs).toFixed(d)})`;
  console.log(`session recording cost: ${rounds} interleaved rounds of ${mib} MiB terminal output per session (medians, min–max)`);
  console.log(`                 broker CPU ms/MiB    worker CPU ms/MiB    wall ms`);
  for (const who of ['rec', 'plain']) {
    const x = res[who]!;
    console.log(`${who === 'rec' ? 'recorded  ' : 'unrecorded'}       ${fmt(x.broker).padEnd(20)} ${fmt(x.workers).padEnd(20)} ${fmt(x.wall, 0)}`);
  }
  const casts = readdirSync(env.config.recording!.dir).filter((f) => f.endsWith('.cast'));
  console.log(`(${casts.length} casts written; recordings in ${path.basename(env.config.recording!.dir)})`);
} finally {
  await cleanup.run();
  await env.cleanup();
}
