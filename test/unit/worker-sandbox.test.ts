import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCodes, isVeshError } from '../../src/errors.js';
import { appRoot, workerSandboxCommand } from '../../src/broker/worker-sandbox.js';
import { workerSandboxPath } from '../../src/system/native-helpers.js';

// Real sandboxed node processes (the suite runs as root): each reports what it
// sees as one JSON line on a kept descriptor (fd 3).

const ROOT = appRoot();
const PROBE = path.join(ROOT, 'test/fixtures/worker-sandbox-probe.cjs');
const LAUNCHER = workerSandboxPath();
const TEST_DIR = path.join(ROOT, '.vesh-test');
// A uid of its own per run: hidepid shows a worker every process of its uid, so a shared one would let two runs see each other.
const UID = 200_000 + Math.floor(Math.random() * 100_000);
const GID = UID + 1;

const children = new Set<ChildProcess>();
const strayPids = new Set<number>();

function killAll(): void {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  children.clear();
  for (const pid of strayPids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  strayPids.clear();
}
afterEach(killAll);
afterAll(killAll);

interface Run {
  report: Record<string, unknown> | null;
  code: number | null;
  stdout: string;
  stderr: string;
  /** ms from spawn to the first report line */
  reportMs: number;
}

function firstLine(stream: Readable, deadlineMs: number): Promise<string | null> {
  return new Promise((resolve) => {
    let buf = '';
    const done = (v: string | null) => {
      clearTimeout(timer);
      stream.off('data', onData);
      stream.off('end', onEnd);
      resolve(v);
    };
    const onData = (d: Buffer) => {
      buf += d.toString();
      const i = buf.indexOf('\n');
      if (i >= 0) done(buf.slice(0, i));
    };
    const onEnd = () => done(null);
    const timer = setTimeout(() => done(null), deadlineMs);
    stream.on('data', onData);
    stream.on('end', onEnd);
  });
}

/** Spawns file/args with a socketpair at fd 3 and `extra` at fds 4..; resolves when it has exited. */
async function runReporting(file: string, args: string[], extra: number[] = [], env: NodeJS.ProcessEnv = { PATH: process.env.PATH }): Promise<Run> {
  const start = process.hrtime.bigint();
  const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe', 'pipe', ...extra], env });
  children.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  const line = await firstLine(child.stdio[3] as Readable, 30_000);
  const reportMs = Number(process.hrtime.bigint() - start) / 1e6;
  // A probe that hangs must not hold the test until its hook timeout: it has 30 s to report and 30 s more to exit.
  const killer = setTimeout(() => child.kill('SIGKILL'), line === null ? 0 : 30_000);
  const code = await exited;
  clearTimeout(killer);
  return { report: line === null ? null : (JSON.parse(line) as Record<string, unknown>), code, stdout, stderr, reportMs };
}

function probeCommand(cfg: Record<string, unknown>, extra: Partial<Parameters<typeof workerSandboxCommand>[0]> = {}) {
  return workerSandboxCommand({ uid: UID, gid: GID, appRoot: ROOT, script: PROBE, args: [JSON.stringify({ reportFd: 3, ...cfg })], keepFds: [3], hide: [], ...extra });
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

describe('vesh-worker-sandbox: what a worker sees and may do', () => {
  let hiddenInside: string;
  let hiddenOutside: string;
  let fileDir: string;
  let server: net.Server;
  let port: number;
  let keptFd = -1;
  let strayFd = -1;
  let run: Run;
  let r: Record<string, any>;
  const ancestors = ROOT.split('/').slice(1, -1).map((_, i, parts) => '/' + parts.slice(0, i + 1).join('/'));

  beforeAll(async () => {
    fs.mkdirSync(TEST_DIR, { recursive: true });
    // The data directory inside the app root (app root /work/main, dataDir /work/main/data): the case --hide exists for.
    hiddenInside = fs.mkdtempSync(path.join(TEST_DIR, 'worker-sandbox-hide-'));
    fs.writeFileSync(path.join(hiddenInside, 'secret.txt'), 'host key');
    hiddenOutside = fs.mkdtempSync(path.join(os.tmpdir(), 'vesh-worker-sandbox-hide-'));
    fs.writeFileSync(path.join(hiddenOutside, 'secret.txt'), 'password hash');
    fileDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vesh-worker-sandbox-files-'));
    fs.writeFileSync(path.join(fileDir, 'kept.txt'), 'kept-content');
    fs.writeFileSync(path.join(fileDir, 'stray.txt'), 'stray-content');
    keptFd = fs.openSync(path.join(fileDir, 'kept.txt'), 'r');
    strayFd = fs.openSync(path.join(fileDir, 'stray.txt'), 'r');
    server = net.createServer((s) => s.end());
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = (server.address() as net.AddressInfo).port;

    // fd 4 is inherited but not kept (the launcher must close it), fd 5 is kept.
    const { file, args } = probeCommand(
      {
        mode: 'probe',
        tcpPort: port,
        appRoot: ROOT,
        keptFiles: [5],
        hidden: [hiddenInside, hiddenOutside],
        list: ancestors,
        absent: ['/root', '/etc', '/etc/passwd', '/var', '/run', '/home', '/tmp', '/sys', '/work/shared', '/proc/sys', '/proc/meminfo', '/proc/1',
          '/dev/vda', '/dev/shm', '/dev/pts', hiddenOutside, path.join(hiddenInside, 'secret.txt'), path.join(fileDir, 'kept.txt')],
      },
      { keepFds: [3, 5], nofile: 4096, hide: [hiddenInside, hiddenOutside] },
    );
    run = await runReporting(file, args, [strayFd, keptFd], { PATH: process.env.PATH, VESH_TEST_MARK: '1', NOT_PASSED_ON: '1' });
    r = run.report ?? {};
    if (run.report === null || r.error) throw new Error(`the probe did not report (exit ${run.code}): ${run.stderr}${r.error ?? ''}`);
  });

  afterAll(async () => {
    if (keptFd >= 0) fs.closeSync(keptFd);
    if (strayFd >= 0) fs.closeSync(strayFd);
    if (server) await new Promise((resolve) => server.close(resolve));
    for (const dir of [hiddenInside, hiddenOutside, fileDir]) if (dir) fs.rmSync(dir, { recursive: true, force: true });
    fs.rmSync(path.join(ROOT, '.worker-sandbox-write-test'), { force: true });
  });

  it('ran the program and it exited cleanly', () => {
    expect(run.stderr).toBe('');
    expect(run.code).toBe(0);
  });

  it('runs as the uid and gid given, in all slots, with no supplementary groups', () => {
    expect([r.uid, r.euid, r.gid, r.egid]).toEqual([UID, UID, GID, GID]);
    expect(r.status.Uid.split(/\s+/)).toEqual([UID, UID, UID, UID].map(String));
    expect(r.status.Gid.split(/\s+/)).toEqual([GID, GID, GID, GID].map(String));
    expect(r.status.Groups).toBe('');
    expect(r.setuid0).toBe('EPERM');
  });

  it('has no capabilities in any set, and no_new_privs', () => {
    for (const set of ['CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb']) expect(r.status[set], set).toBe('0000000000000000');
    expect(r.status.NoNewPrivs).toBe('1');
  });

  it('has RLIMIT_NOFILE as given and no core dumps', () => {
    expect(r.nofile).toEqual(['4096', '4096']);
    expect(r.core).toEqual(['0', '0']);
  });

  it('has its own mount, network, IPC and UTS namespaces, and the host pid namespace', () => {
    for (const ns of ['mnt', 'net', 'ipc', 'uts']) expect(r.ns[ns], ns).not.toBe(fs.readlinkSync(`/proc/self/ns/${ns}`));
    expect(r.ns.pid).toBe(fs.readlinkSync('/proc/self/ns/pid'));
    expect(r.hostname).toBe('vesh-worker');
  });

  it('has no network but its own loopback, and cannot reach a server on the host', () => {
    expect(r.netdev).toEqual(['lo']);
    for (const name of r.interfaces) expect(name).toBe('lo');
    expect(r.tcp).not.toBe('connected');
    expect(r.tcp).not.toBe('timeout');
  });

  it('sees only /usr, the app root, /dev and /proc; nothing else of the host', () => {
    const allowed = ['bin', 'sbin', 'lib', 'lib64', 'usr', 'dev', 'proc', ROOT.split('/')[1]];
    for (const name of r.root) expect(allowed).toContain(name);
    expect(r.root).toContain('usr');
    // Each directory above the app root holds only the way down to it.
    ancestors.forEach((dir, i) => expect(r.listings[dir], dir).toEqual([(ancestors[i + 1] ?? ROOT).split('/').pop()]));
    for (const [p, present] of Object.entries(r.exists)) expect(present, p).toBe(false);
    expect(r.dev).toEqual(['null', 'random', 'urandom', 'zero']);
  });

  it('hides a --hide directory inside the app root, and one outside it is absent anyway', () => {
    expect(r.hidden[hiddenInside]).toEqual([]);
    expect(r.hidden[hiddenOutside]).toBe('error ENOENT');
  });

  it('sees only its own process in /proc', () => {
    expect(r.proc).toEqual([String(r.pid)]);
  });

  it('cannot write anywhere: the app root, / and /dev are read-only, the device nodes still work', () => {
    expect(r.writeAppRoot).toBe('EROFS');
    expect(r.writeRoot).toBe('EROFS');
    expect(r.writeDev).toBe('ok');
    expect(r.readUrandom).toBe('ok');
    expect(fs.existsSync(path.join(ROOT, '.worker-sandbox-write-test'))).toBe(false);
    for (const m of r.mounts as { point: string; options: string[]; fstype: string }[]) {
      expect(m.options, m.point).toContain('ro');
      expect(m.options, m.point).toContain('nosuid');
      if (m.point.startsWith('/dev/')) expect(m.options, m.point).toContain('noexec');
      else expect(m.options, m.point).toContain('nodev');
    }
  });

  it('loads ssh2 and signs with node:crypto', () => {
    expect(r.ssh2).toBe('loaded');
    expect(r.signature).toBe('verified');
  });

  it('keeps the --keep-fd descriptors and closes every other inherited one', () => {
    expect(r.kept).toEqual({ 5: 'kept-content' });
    const open = r.fds as { fd: number; dev: number; ino: number }[];
    const isFile = (f: { dev: number; ino: number }, name: string) => {
      const st = fs.statSync(path.join(fileDir, name));
      return f.dev === st.dev && f.ino === st.ino;
    };
    expect(open.map((f) => f.fd)).toEqual(expect.arrayContaining([0, 1, 2, 3, 5]));
    expect(open.filter((f) => isFile(f, 'kept.txt')).map((f) => f.fd)).toEqual([5]);
    // The stray file was the launcher's fd 4; node reuses that number for its own descriptors, so look for the file itself.
    expect(open.filter((f) => isFile(f, 'stray.txt'))).toEqual([]);
  });

  it('passes on only PATH, LANG and VESH_* variables', () => {
    expect(r.env).toEqual(['LANG', 'PATH', 'VESH_TEST_MARK']);
  });

  it('reports what dumpable looks like after execve (informational: the kernel resets it for a readable binary)', () => {
    // Dumpable 0 makes /proc/self/* root-owned; node resets nothing, the kernel sets 1 at execve when uid == euid.
    console.log(`worker /proc/self/maps owner after execve: ${r.mapsOwner} (${r.mapsOwner === 0 ? 'not dumpable' : 'dumpable: the worker must call prctl(PR_SET_DUMPABLE, 0) itself'})`);
    expect([0, UID]).toContain(r.mapsOwner);
  });
});

describe('vesh-worker-sandbox: defaults, parent death and refusals', () => {
  it('defaults RLIMIT_NOFILE to 65536 or its own hard limit if lower', async () => {
    const hard = fs.readFileSync('/proc/self/limits', 'utf8').split('\n').find((l) => l.startsWith('Max open files'))!.split(/\s+/)[4];
    const want = String(Math.min(65536, Number(hard)));
    const { file, args } = probeCommand({ mode: 'probe', tcpPort: 1, appRoot: ROOT, keptFiles: [], hidden: [], list: [], absent: [] });
    const run = await runReporting(file, args);
    expect(run.stderr).toBe('');
    expect(run.report?.nofile).toEqual([want, want]);
  });

  it('gives node the flags it is asked for, before the script, and refuses anything that is not a flag', async () => {
    const { file, args } = probeCommand({ mode: 'ping' }, { nodeFlags: ['--no-incremental-marking'] });
    const run = await runReporting(file, args);
    expect(run.stderr).toBe('');
    expect(run.report?.execArgv).toEqual(['--no-incremental-marking']);
    for (const bad of ['--eval=1;x', 'no-dashes', '--require /tmp/x.js', '--a=$(id)']) {
      expect(() => probeCommand({ mode: 'ping' }, { nodeFlags: [bad] }), bad).toThrow(/a node flag must look like/);
    }
  });

  it('kills the worker when the process that started it dies (PR_SET_PDEATHSIG)', async () => {
    const { file, args } = probeCommand({ mode: 'wait' });
    // A stand-in broker: starts the sandboxed worker with its own fd 3 (our socketpair) as the worker's fd 3, then waits.
    const broker = spawn(process.execPath, ['-e', `
      const { spawn } = require('node:child_process');
      const c = spawn(process.argv[1], JSON.parse(process.argv[2]), { stdio: ['ignore', 'inherit', 'inherit', 3] });
      c.on('exit', (code, sig) => console.error('worker exited', code, sig));
      setInterval(() => {}, 60000);
    `, file, JSON.stringify(args)], { stdio: ['ignore', 'pipe', 'pipe', 'pipe'] });
    children.add(broker);
    let stderr = '';
    broker.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const channel = broker.stdio[3] as Readable;
    const line = await firstLine(channel, 30_000);
    expect(line, stderr).not.toBeNull();
    const pid = (JSON.parse(line!) as { pid: number }).pid;
    strayPids.add(pid);
    expect(fs.existsSync(`/proc/${pid}`)).toBe(true);

    const ended = new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), 20_000);
      channel.on('end', () => { clearTimeout(timer); resolve(true); });
      channel.on('close', () => { clearTimeout(timer); resolve(true); });
      channel.resume();
    });
    broker.kill('SIGKILL');
    // The worker holds the last copy of the socket's other end: it closes only when the worker is gone.
    expect(await ended).toBe(true);
    // Its descriptors close early in exit; it may still be tearing down (its network namespace, say) for a moment after.
    const stateOf = () => {
      try {
        return fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.[0] ?? 'gone';
      } catch {
        return 'gone';
      }
    };
    let state = stateOf();
    for (let i = 0; i < 200 && !['gone', 'Z', 'X'].includes(state); i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      state = stateOf();
    }
    expect(['gone', 'Z', 'X']).toContain(state);
  });

  const node = process.execPath;
  const ran = ['-e', 'console.log("ran")'];
  const refusals: [string, string[], RegExp][] = [
    ['uid 0', ['--uid', '0', '--gid', '1000', '--app-root', ROOT, '--', node, ...ran], /^vesh-worker-sandbox: --uid: 0 is outside 1\.\.4294967294\n$/],
    ['gid 0', ['--uid', '1000', '--gid', '0', '--app-root', ROOT, '--', node, ...ran], /^vesh-worker-sandbox: --gid: 0 is outside/],
    ['a relative program', ['--uid', '1000', '--gid', '1000', '--app-root', ROOT, '--', 'node', ...ran], /^vesh-worker-sandbox: PROGRAM must be an absolute path: node\n$/],
    ['a relative app root', ['--uid', '1000', '--gid', '1000', '--app-root', path.relative('/', ROOT), '--', node, ...ran], /--app-root: must be an absolute path/],
    ['/ as the app root', ['--uid', '1000', '--gid', '1000', '--app-root', '/', '--', node, ...ran], /--app-root: \/ would show the whole host/],
    ['an app root that is not canonical', ['--uid', '1000', '--gid', '1000', '--app-root', `${ROOT}/dist/..`, '--', node, ...ran], /--app-root: give the canonical path/],
    ['an app root that is a file', ['--uid', '1000', '--gid', '1000', '--app-root', path.join(ROOT, 'package.json'), '--', node, ...ran], /--app-root: not a directory/],
    ['a --hide holding the app root', ['--uid', '1000', '--gid', '1000', '--app-root', ROOT, '--hide', path.dirname(ROOT), '--', node, ...ran], /--hide .*: it holds .*, which the worker needs/],
    ['a --keep-fd that is not open', ['--uid', '1000', '--gid', '1000', '--app-root', ROOT, '--keep-fd', '999', '--', node, ...ran], /--keep-fd 999: Bad file descriptor/],
    ['no program', ['--uid', '1000', '--gid', '1000', '--app-root', ROOT], /no program given after --/],
    ['a program the sandbox does not show', ['--uid', '1000', '--gid', '1000', '--app-root', ROOT, '--', '/root/node', ...ran], /execve \/root\/node \(the sandbox shows only \/usr and the app root\): No such file or directory/],
  ];
  it.each(refusals)('refuses %s with exit 125 and a clear message, without running the program', async (_name, args, message) => {
    const child = spawn(LAUNCHER, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(child);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    expect(code).toBe(125);
    expect(stderr).toMatch(message);
    expect(stdout).toBe('');
  });

  it('starts in a median time worth knowing (printed, not asserted)', async () => {
    const sandboxed: number[] = [];
    const bare: number[] = [];
    const { file, args } = probeCommand({ mode: 'ping' });
    for (let i = 0; i < 10; i++) {
      // Interleaved, so both see the same load.
      const s = await runReporting(file, args);
      expect(s.report?.pid, s.stderr).toEqual(expect.any(Number));
      sandboxed.push(s.reportMs);
      const b = await runReporting(process.execPath, [PROBE, JSON.stringify({ reportFd: 3, mode: 'ping' })]);
      expect(b.report?.pid, b.stderr).toEqual(expect.any(Number));
      bare.push(b.reportMs);
    }
    console.log(`worker launch to first report, median of 10: sandboxed ${median(sandboxed).toFixed(1)} ms, bare node ${median(bare).toFixed(1)} ms`);
  });
});

describe('workerSandboxCommand', () => {
  const base = { uid: 5000, gid: 5000, appRoot: ROOT, script: PROBE, keepFds: [3], hide: [] as string[] };

  it('builds the launcher command line with the real paths', () => {
    const hideDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vesh-worker-sandbox-cmd-'));
    try {
      const link = `${hideDir}-link`;
      fs.symlinkSync(hideDir, link);
      try {
        const { file, args } = workerSandboxCommand({ ...base, nodePath: '/usr/bin/node', args: ['a'], keepFds: [3, 7, 3], nofile: 1024, hide: [link] });
        expect(file).toBe(LAUNCHER);
        expect(args).toEqual(['--uid', '5000', '--gid', '5000', '--app-root', ROOT, '--nofile', '1024', '--keep-fd', '3', '--keep-fd', '7', '--hide', fs.realpathSync(hideDir), '--', '/usr/bin/node', PROBE, 'a']);
      } finally {
        fs.rmSync(link);
      }
    } finally {
      fs.rmSync(hideDir, { recursive: true });
    }
  });

  const bad: [string, Partial<typeof base> & Record<string, unknown>, RegExp][] = [
    ['uid 0', { uid: 0 }, /uid must be an integer from 1/],
    ['a fractional gid', { gid: 1.5 }, /gid must be an integer from 1/],
    ['a relative script', { script: 'dist/worker/main.js' }, /script must be an absolute path/],
    ['a script outside the app root', { script: '/usr/bin/env' }, /outside the app root/],
    ['a missing script', { script: path.join(ROOT, 'no-such-worker.js') }, /does not exist/],
    ['a relative node', { nodePath: 'node' }, /node binary must be an absolute path/],
    ['keeping fd 2', { keepFds: [2] }, /kept descriptor must be an integer from 3/],
    ['a tiny nofile', { nofile: 10 }, /nofile must be an integer from 64/],
    ['a hidden directory holding the app root', { hide: [path.dirname(ROOT)] }, /holds the app root/],
    ['a hidden directory that does not exist', { hide: ['/nonexistent-vesh-dir'] }, /does not exist: create it before starting workers/],
    ['/ as the app root', { appRoot: '/', script: PROBE }, /app root cannot be \//],
  ];
  it.each(bad)('refuses %s with VESH_INVALID_ARGUMENT', (_name, change, message) => {
    let err: unknown;
    try {
      workerSandboxCommand({ ...base, ...change } as Parameters<typeof workerSandboxCommand>[0]);
    } catch (e) {
      err = e;
    }
    expect(isVeshError(err, ErrorCodes.INVALID_ARGUMENT), String(err)).toBe(true);
    expect((err as Error).message).toMatch(message);
  });
});
