/**
 * Runtime conformance: one suite for the engine interface (ContainerRuntime,
 * src/runtime/types.ts), run against every engine we have, as ContainerSSH
 * runs one backend suite against every backend. It drives real containers
 * from real OCI bundles (buildOciConfig over a busybox template on an
 * overlay), so what it checks is what the VE layer relies on, not what an
 * engine's own tests happen to cover. A new engine is one more entry in
 * ENGINES; its differences from runc belong in the engine, not in here.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, promises as fs } from 'node:fs';
import path from 'node:path';
import * as pty from 'node-pty';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/audit/logger.js';
import { ErrorCodes, isVeshError, type ErrorCode } from '../../src/errors.js';
import { cgroupDirs, removeCgroupDirs } from '../../src/runtime/cgroups.js';
import { buildOciConfig } from '../../src/runtime/oci-bundle.js';
import { RuncRuntime } from '../../src/runtime/runc.js';
import type { ContainerRuntime, HostCommand } from '../../src/runtime/types.js';
import { safeEnv } from '../../src/system/exec.js';
import { makeLayout } from '../../src/system/layout.js';
import { TemplateStore } from '../../src/template/store.js';
import type { TemplateInfo } from '../../src/template/types.js';
import { mountsUnder, mountVeFileSystems, unmount, unmountAll, vePaths, type VePaths } from '../../src/ve/storage.js';
import { waitFor } from '../helpers/ve-env.js';

/** How the suite gets an engine: its name, one keeping its state under a root, and one whose binary is absent. */
interface EngineFactory {
  name: string;
  make(stateRoot: string): ContainerRuntime;
  makeWithoutBinary(stateRoot: string): ContainerRuntime;
}

const ENGINES: EngineFactory[] = [
  {
    name: 'runc',
    make: (root) => new RuncRuntime('runc', root),
    makeWithoutBinary: (root) => new RuncRuntime('/nonexistent/vesh-conformance/runc', root),
  },
];

const IDMAP = { base: 100_000, size: 65_536 };
const LIMITS = { memory: 128 * 1024 * 1024, pids: 128, cpus: 1, disk: 0 };
const NAMESPACES = ['pid', 'mnt', 'net', 'uts', 'ipc', 'user', 'cgroup'];

/** One container's bundle on the host, and everything it may leave there. */
interface Box {
  id: string;
  paths: VePaths;
  bundleDir: string;
  pidFile: string;
  consoleFile: string;
  cgroupsPath: string;
}

interface HostResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** What the process wrote to the extra fds passed to it (3, 4, …). */
  extra: string[];
}

/** Spawn a HostCommand with pipes (plus `extraFds` more pipes at fd 3…) and collect what it says. */
function spawnHost(cmd: HostCommand, opts: { extraFds?: number } = {}): Promise<HostResult> {
  const n = opts.extraFds ?? 0;
  return new Promise((resolve, reject) => {
    const child = spawn(cmd.file, cmd.args, { stdio: ['ignore', 'pipe', 'pipe', ...Array<'pipe'>(n).fill('pipe')], env: safeEnv(), timeout: 30_000 });
    const bufs = Array.from({ length: 2 + n }, () => [] as Buffer[]);
    for (let i = 0; i < 2 + n; i++) child.stdio[i + 1]!.on('data', (d: Buffer) => bufs[i]!.push(d));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      const text = bufs.map((b) => Buffer.concat(b).toString('utf8'));
      resolve({ code, signal, stdout: text[0]!, stderr: text[1]!, extra: text.slice(2) });
    });
  });
}

/**
 * Spawn a detached HostCommand and wait for it to exit. Its stdio is
 * 'ignore': the process it leaves behind inherits the engine's stdio, so
 * pipes would stay open (and 'close' never come) until that process ends.
 */
function spawnDetached(cmd: HostCommand): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd.file, cmd.args, { stdio: 'ignore', env: safeEnv(), timeout: 30_000 });
    child.on('error', reject);
    child.on('exit', (code, signal) => resolve({ code, signal }));
  });
}

/** A process is gone once /proc has no entry for it, or only a zombie waiting for its reaper. */
async function processGone(pid: number): Promise<boolean> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => null);
  return stat === null || /^\d+ \(.*\) Z/.test(stat);
}

async function nsOf(pid: number | 'self', ns: string): Promise<string> {
  return fs.readlink(`/proc/${pid}/ns/${ns}`);
}

/** Resolve to the VeshError code the promise rejects with (fails the test when it resolves, or rejects with something else). */
async function errorOf(p: Promise<unknown>): Promise<{ code: ErrorCode; message: string }> {
  try {
    await p;
  } catch (err) {
    if (!isVeshError(err)) throw new Error(`expected a VeshError, got: ${String(err)}`, { cause: err });
    return { code: err.code, message: err.message };
  }
  throw new Error('expected a rejection, but it resolved');
}

/**
 * A prepare step exactly as the interface describes one: its own arguments
 * (here the file it records the engine line in), then `--console FILE`, then
 * `--` and the engine's command line. It does its work (records), makes the
 * console file the engine's stdio and execs the engine line in its place
 * (as src/native/vesh-setup.c does after mounting a VE's file systems).
 */
const PREPARE_SCRIPT = `#!/bin/sh
record=$1; shift
console=
while [ $# -gt 0 ]; do
  case $1 in
    --console) console=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "prepare: unexpected argument $1" >&2; exit 2 ;;
  esac
done
printf '%s\\n' "$@" > "$record"
if [ -n "$console" ]; then exec >"$console" 2>&1; fi
exec "$@"
`;

/** A prepare step that fails before it runs the engine, saying why on its stderr. */
const FAILING_PREPARE_SCRIPT = `#!/bin/sh
echo "prepare: first line" >&2
echo "prepare: cannot mount the test disk" >&2
exit 3
`;

/** An init that reports the signal it gets in its ctl dir and exits: proves a signal reached init. */
const SIGNAL_INIT = ['/bin/sh', '-c', "trap 'echo USR1 > /run/vesh/signalled; exit 0' USR1; echo up > /run/vesh/ready; while :; do sleep 1000 & wait $!; done"];

function runtimeConformance(engine: EngineFactory): void {
  describe(`runtime conformance: ${engine.name}`, () => {
    const tag = randomBytes(3).toString('hex');
    const stateRoot = `/run/vesh-rtconf-${tag}/${engine.name}`;
    const cgroupParent = `/vesh-rtconf-${tag}`;
    let work = '';
    let template: TemplateInfo;
    let rt: ContainerRuntime;
    let seq = 0;
    /** Containers of the test that runs now (removed after each test), and of a whole describe block (removed after it). */
    const perTest: Box[] = [];
    const perBlock: Box[] = [];

    /** Make a container's bundle: an overlay on the template (unless mount: false) and its config.json. */
    async function makeBox(owner: Box[], opts: { init?: string[]; mount?: boolean; edit?: (oci: Record<string, unknown>) => void } = {}): Promise<Box> {
      const id = `rc${tag}-${++seq}`;
      const dir = path.join(work, id);
      const paths = vePaths(dir);
      const box: Box = { id, paths, bundleDir: dir, pidFile: paths.pidFile, consoleFile: path.join(dir, 'console.log'), cgroupsPath: `${cgroupParent}/${id}` };
      owner.push(box); // before the first step that leaves something on the host
      await fs.mkdir(dir, { mode: 0o711 });
      if (opts.mount !== false) await mountVeFileSystems(paths, { hasImage: false, lowerdir: template.rootfs, ids: IDMAP, templateBase: template.idmapBase });
      const oci = buildOciConfig({
        name: id, hostname: id, rootfs: paths.rootfs, init: opts.init ?? template.init, limits: LIMITS,
        cgroupsPath: box.cgroupsPath, idmap: IDMAP, ctlDir: paths.ctl,
      });
      opts.edit?.(oci);
      await fs.writeFile(path.join(dir, 'config.json'), JSON.stringify(oci));
      return box;
    }

    /** Remove boxes whatever state they are in: the container (forced), its cgroups, its mounts, its files. */
    async function removeBoxes(boxes: Box[]): Promise<void> {
      for (const box of boxes.splice(0)) {
        await rt.delete(box.id, true).catch(() => undefined);
        await removeCgroupDirs(cgroupDirs(box.cgroupsPath));
        await unmountAll(box.paths).catch(() => undefined);
        await fs.rm(box.bundleDir, { recursive: true, force: true });
      }
    }

    async function started(owner: Box[], opts: { init?: string[] } = {}): Promise<Box> {
      const box = await makeBox(owner, opts);
      await rt.run(box.id, { bundleDir: box.bundleDir, pidFile: box.pidFile, consoleFile: box.consoleFile });
      return box;
    }

    async function statusOf(id: string) {
      return (await rt.state(id))?.status ?? null;
    }

    beforeAll(async () => {
      work = mkdtempSync('/var/tmp/vesh-rtconf-');
      // The container's init (an unprivileged host uid) must pass through every directory above its root.
      await fs.chmod(work, 0o711);
      const store = new TemplateStore({ layout: makeLayout(path.join(work, 'data')), logger: silentLogger(), idmapSize: IDMAP.size });
      template = await store.build('busybox', {});
      rt = engine.make(stateRoot);
    });

    afterEach(async () => {
      await removeBoxes(perTest);
    });

    afterAll(async () => {
      await removeBoxes(perTest);
      await removeBoxes(perBlock);
      await removeCgroupDirs(cgroupDirs(cgroupParent));
      await fs.rm(path.dirname(stateRoot), { recursive: true, force: true });
      if (work) {
        for (const m of await mountsUnder(work)) await unmount(m).catch(() => undefined);
        await fs.rm(work, { recursive: true, force: true });
      }
    });

    it('version() names the engine and its version', async () => {
      const v = await rt.version();
      expect(v.startsWith(`${engine.name} `)).toBe(true);
      expect(v).toMatch(/\d+\.\d+/);
    });

    it('state() of an id the engine does not know is null', async () => {
      expect(await rt.state(`rc${tag}-unknown`)).toBeNull();
    });

    it('create: state "created" with the bundle and a pid; start: "running", the init in namespaces of its own', async () => {
      const box = await makeBox(perTest, { init: ['/bin/sh', '-c', `echo console-ok; exec ${template.init.join(' ')}`] });
      // The console file is truncated, not appended to.
      await fs.writeFile(box.consoleFile, 'stale output of a previous run\n');
      await rt.create(box.id, { bundleDir: box.bundleDir, pidFile: box.pidFile, consoleFile: box.consoleFile });

      const created = await rt.state(box.id);
      expect(created).toMatchObject({ id: box.id, status: 'created', bundle: box.bundleDir });
      expect(created!.pid).toBeGreaterThan(0);
      expect(Number((await fs.readFile(box.pidFile, 'utf8')).trim())).toBe(created!.pid);
      // Not started: the init has not run yet, so nothing reached the console.
      expect(await fs.readFile(box.consoleFile, 'utf8')).not.toContain('console-ok');

      await rt.start(box.id);
      const running = await rt.state(box.id);
      expect(running).toMatchObject({ id: box.id, status: 'running', pid: created!.pid });
      for (const ns of NAMESPACES) {
        expect(await nsOf(running!.pid, ns), `${ns} namespace`).not.toBe(await nsOf('self', ns));
      }
      // The bundle's id map holds: container root is the unprivileged base uid on the host.
      expect((await fs.readFile(`/proc/${running!.pid}/uid_map`, 'utf8')).trim().split(/\s+/)).toEqual(['0', String(IDMAP.base), String(IDMAP.size)]);
      await waitFor('the init to write to the console file', async () => (await fs.readFile(box.consoleFile, 'utf8')).includes('console-ok'), 10_000);
      expect(await fs.readFile(box.consoleFile, 'utf8')).not.toContain('stale output');
    });

    it('run: create and start in one step', async () => {
      const box = await makeBox(perTest);
      await rt.run(box.id, { bundleDir: box.bundleDir, pidFile: box.pidFile, consoleFile: box.consoleFile });
      const st = await rt.state(box.id);
      expect(st).toMatchObject({ id: box.id, status: 'running', bundle: box.bundleDir });
      expect(Number((await fs.readFile(box.pidFile, 'utf8')).trim())).toBe(st!.pid);
      expect(await nsOf(st!.pid, 'pid')).not.toBe(await nsOf('self', 'pid'));
    });

    it('run with prepare: the step is spawned in the engine\'s place, does its work and execs the engine line after "--"', async () => {
      const box = await makeBox(perTest, { init: ['/bin/sh', '-c', `echo init-via-prepare; exec ${template.init.join(' ')}`] });
      const script = path.join(box.bundleDir, 'prepare.sh');
      await fs.writeFile(script, PREPARE_SCRIPT, { mode: 0o755 });
      const record = path.join(box.bundleDir, 'engine-line');
      await rt.run(box.id, { bundleDir: box.bundleDir, pidFile: box.pidFile, consoleFile: box.consoleFile, prepare: { file: script, args: [record] } });

      // The step ran (its own argument came first) and what it exec'd was the engine, for this container.
      const line = (await fs.readFile(record, 'utf8')).trim().split('\n');
      expect(line.length).toBeGreaterThan(1);
      expect(line).toContain(box.id);
      expect(await statusOf(box.id)).toBe('running');
      // The step made the console file the engine's stdio, so the init writes there.
      await waitFor('the init to write to the console file', async () => (await fs.readFile(box.consoleFile, 'utf8').catch(() => '')).includes('init-via-prepare'), 10_000);
    });

    it('run with a prepare step that fails before the engine runs: a VeshError with the step\'s last line, no container', async () => {
      const box = await makeBox(perTest);
      const script = path.join(box.bundleDir, 'prepare-fails.sh');
      await fs.writeFile(script, FAILING_PREPARE_SCRIPT, { mode: 0o755 });
      const err = await errorOf(rt.run(box.id, { bundleDir: box.bundleDir, pidFile: box.pidFile, consoleFile: box.consoleFile, prepare: { file: script, args: [] } }));
      expect(err.code).toBe(ErrorCodes.COMMAND_FAILED);
      expect(err.message).toContain('prepare: cannot mount the test disk');
      expect(err.message).not.toContain('first line');
      expect(await rt.state(box.id)).toBeNull();
    });

    it('run with a prepare step that does not exist: a VeshError, not a bare spawn error', async () => {
      const box = await makeBox(perTest);
      const err = await errorOf(rt.run(box.id, { bundleDir: box.bundleDir, pidFile: box.pidFile, consoleFile: box.consoleFile, prepare: { file: path.join(box.bundleDir, 'no-such-step'), args: [] } }));
      expect(err.code).toBe(ErrorCodes.COMMAND_MISSING);
      expect(err.message).toContain('no-such-step');
      expect(await rt.state(box.id)).toBeNull();
    });

    it('list() contains our running container, and no longer once it is deleted', async () => {
      const box = await started(perTest);
      const st = await rt.state(box.id);
      const listed = (await rt.list()).find((c) => c.id === box.id);
      expect(listed).toMatchObject({ id: box.id, status: 'running', pid: st!.pid, bundle: box.bundleDir });
      await rt.delete(box.id, true);
      expect((await rt.list()).map((c) => c.id)).not.toContain(box.id);
    });

    describe('execCommand (a HostCommand spawned by the caller)', () => {
      let box: Box;
      beforeAll(async () => {
        box = await started(perBlock);
      });
      afterAll(async () => {
        await removeBoxes(perBlock);
      });

      const exec = (argv: string[], extra: Partial<Parameters<ContainerRuntime['execCommand']>[1]> = {}) =>
        rt.execCommand(box.id, { argv, uid: 0, gid: 0, tty: false, ...extra });

      it('runs in the container: stdout and stderr kept apart, the container\'s hostname and pid namespace', async () => {
        const init = (await rt.state(box.id))!.pid;
        const res = await spawnHost(await exec(['/bin/sh', '-c', 'echo out; echo err >&2; hostname; readlink /proc/1/exe']));
        expect(res.code).toBe(0);
        expect(res.stderr).toBe('err\n');
        const [out, hostname, pid1] = res.stdout.trim().split('\n');
        expect(out).toBe('out');
        expect(hostname).toBe(box.id);
        // PID 1 in the process's pid namespace is the container's init (busybox), not the host's.
        expect(pid1).toBe('/bin/busybox');
        expect(init).toBeGreaterThan(0);
      });

      it('passes the exit status through, and reports death by a signal as the HostCommand says it does', async () => {
        expect((await spawnHost(await exec(['/bin/sh', '-c', 'exit 7']))).code).toBe(7);
        const cmd = await exec(['/bin/sh', '-c', 'kill -TERM $$']);
        const res = await spawnHost(cmd);
        if (cmd.exitReporting === 'exact') expect(res.signal).toBe('SIGTERM');
        else expect(res.code).toBe(128 + 15);
      });

      it('runs as the given uid, gid and additional gids', async () => {
        const res = await spawnHost(await exec(['/bin/sh', '-c', 'id -u; id -g; id -G'], { uid: 1000, gid: 1001, additionalGids: [2000, 2001] }));
        expect(res.code).toBe(0);
        expect(res.stdout.trim().split('\n')).toEqual(['1000', '1001', '1001 2000 2001']);
      });

      it('runs in the given cwd with the given env', async () => {
        const res = await spawnHost(await exec(['/bin/sh', '-c', 'pwd; printf "%s|" "$GREETING"'], { cwd: '/tmp', env: { GREETING: 'hello, with spaces', PATH: '/bin:/sbin' } }));
        expect(res.code).toBe(0);
        expect(res.stdout).toBe('/tmp\nhello, with spaces|');
      });

      it('preserveFds: the caller\'s fds 3..3+N-1 reach the process, and no more', async () => {
        const res = await spawnHost(await exec(['/bin/sh', '-c', 'echo via-fd3 >&3; if { true >&4; } 2>/dev/null; then echo fd4-open; else echo fd4-closed; fi'], { preserveFds: 1 }), { extraFds: 2 });
        expect(res.code).toBe(0);
        expect(res.extra[0]).toBe('via-fd3\n');
        expect(res.stdout).toBe('fd4-closed\n');
      });

      it('tty: a terminal from the container\'s own devpts, with our window size', async () => {
        // The size is there from the start: stty runs at once, before any
        // relay could copy node-pty's size over.
        const cmd = await exec(['/bin/sh', '-c', 'tty; stty size'], { tty: true, consoleSize: { rows: 40, cols: 100 }, env: { TERM: 'xterm', PATH: '/bin:/sbin' } });
        const term = pty.spawn(cmd.file, cmd.args, { name: 'xterm', cols: 100, rows: 40, env: safeEnv() });
        let screen = '';
        term.onData((d) => { screen += d; });
        const exitCode = await new Promise<number>((resolve) => term.onExit((e) => resolve(e.exitCode)));
        expect(exitCode).toBe(0);
        expect(screen).toMatch(/\/dev\/pts\/\d+/);
        expect(screen).toContain('40 100');
      });

      it('detach: returns once the process runs, leaving it in the container with its host pid in pidFile', async () => {
        const pidFile = path.join(box.bundleDir, 'detached.pid');
        const res = await spawnDetached(await exec(['/bin/sleep', '1000'], { detach: true, pidFile }));
        expect(res).toEqual({ code: 0, signal: null });
        const pid = Number((await fs.readFile(pidFile, 'utf8')).trim());
        expect(pid).toBeGreaterThan(0);
        expect(await processGone(pid)).toBe(false);
        expect(await nsOf(pid, 'pid')).toBe(await nsOf((await rt.state(box.id))!.pid, 'pid'));
        expect((await fs.readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0')[0]).toBe('/bin/sleep');
      });
    });

    it('kill: the signal reaches the container\'s init', async () => {
      const box = await started(perTest, { init: SIGNAL_INIT });
      await waitFor('the init to set its trap', async () => existsSync(path.join(box.paths.ctl, 'ready')), 10_000);
      await rt.kill(box.id, 'USR1');
      await waitFor('the init to report the signal', async () => existsSync(path.join(box.paths.ctl, 'signalled')), 10_000);
      expect((await fs.readFile(path.join(box.paths.ctl, 'signalled'), 'utf8')).trim()).toBe('USR1');
      await waitFor('the container to stop', async () => (await statusOf(box.id)) === 'stopped', 10_000);
      expect((await rt.state(box.id))!.pid).toBe(0);
    });

    it('kill with all=true: every process of the container gets it, not only init', async () => {
      const box = await started(perTest);
      const pidFile = path.join(box.bundleDir, 'detached.pid');
      expect((await spawnDetached(await rt.execCommand(box.id, { argv: ['/bin/sleep', '1000'], uid: 0, gid: 0, tty: false, detach: true, pidFile }))).code).toBe(0);
      const sleeper = Number((await fs.readFile(pidFile, 'utf8')).trim());
      const init = (await rt.state(box.id))!.pid;
      await rt.kill(box.id, 'KILL', true);
      await waitFor('the exec\'d process to die', () => processGone(sleeper), 10_000);
      await waitFor('the init to die', () => processGone(init), 10_000);
      await waitFor('the container to stop', async () => (await statusOf(box.id)) === 'stopped', 10_000);
    });

    it('delete: a stopped container without force; its state and cgroups are gone', async () => {
      const box = await started(perTest, { init: SIGNAL_INIT });
      await waitFor('the init to set its trap', async () => existsSync(path.join(box.paths.ctl, 'ready')), 10_000);
      await rt.kill(box.id, 'USR1');
      await waitFor('the container to stop', async () => (await statusOf(box.id)) === 'stopped', 10_000);
      await rt.delete(box.id);
      expect(await rt.state(box.id)).toBeNull();
      expect(cgroupDirs(box.cgroupsPath).filter((d) => existsSync(d))).toEqual([]);
    });

    it('delete with force: kills a running container and removes it', async () => {
      const box = await started(perTest);
      const pid = (await rt.state(box.id))!.pid;
      expect(cgroupDirs(box.cgroupsPath).some((d) => existsSync(d))).toBe(true);
      await rt.delete(box.id, true);
      expect(await rt.state(box.id)).toBeNull();
      await waitFor('the init to die', () => processGone(pid), 10_000);
      expect(cgroupDirs(box.cgroupsPath).filter((d) => existsSync(d))).toEqual([]);
    });

    it('delete of an id the engine does not know does not throw', async () => {
      await expect(rt.delete(`rc${tag}-unknown`)).resolves.toBeUndefined();
      await expect(rt.delete(`rc${tag}-unknown`, true)).resolves.toBeUndefined();
    });

    describe('RUNTIME_FAILED: the engine refuses, and says why in its own last line', () => {
      it.each(['create', 'run'] as const)('%s from a bundle whose rootfs does not exist', async (verb) => {
        const missingRoot = path.join(work, `no-rootfs-${verb}`);
        const box = await makeBox(perTest, { mount: false, edit: (oci) => { (oci.root as { path: string }).path = missingRoot; } });
        const err = await errorOf(rt[verb](box.id, { bundleDir: box.bundleDir, pidFile: box.pidFile, consoleFile: box.consoleFile }));
        expect(err.code).toBe(ErrorCodes.RUNTIME_FAILED);
        expect(err.message).toContain(missingRoot);
        // The engine's message, not its log-line wrapping.
        expect(err.message).not.toMatch(/level=|time="/);
        expect(await rt.state(box.id)).toBeNull();
      });

      it('create from a bundle without config.json', async () => {
        const box = await makeBox(perTest, { mount: false });
        await fs.rm(path.join(box.bundleDir, 'config.json'));
        const err = await errorOf(rt.create(box.id, { bundleDir: box.bundleDir, pidFile: box.pidFile, consoleFile: box.consoleFile }));
        expect(err.code).toBe(ErrorCodes.RUNTIME_FAILED);
        expect(err.message).toContain('config.json');
        expect(await rt.state(box.id)).toBeNull();
      });

      it('create with an id already in use', async () => {
        const first = await started(perTest);
        const second = await makeBox(perTest);
        const err = await errorOf(rt.create(first.id, { bundleDir: second.bundleDir, pidFile: second.pidFile, consoleFile: second.consoleFile }));
        expect(err.code).toBe(ErrorCodes.RUNTIME_FAILED);
        expect(err.message).toContain(first.id);
        expect(await statusOf(first.id)).toBe('running');
      });

      it('start and kill of an id the engine does not know', async () => {
        const unknown = `rc${tag}-unknown`;
        for (const call of [() => rt.start(unknown), () => rt.kill(unknown, 'TERM')]) {
          const err = await errorOf(call());
          expect(err.code).toBe(ErrorCodes.RUNTIME_FAILED);
          expect(err.message).not.toMatch(/level=|time="/);
        }
      });
    });

    describe('RUNTIME_MISSING: every method that runs the binary, when it does not exist', () => {
      let live: Box;
      let missing: ContainerRuntime;
      beforeAll(async () => {
        // A real container in the same state root, so that state/kill/delete have one to ask about.
        live = await started(perBlock);
        missing = engine.makeWithoutBinary(stateRoot);
      });
      afterAll(async () => {
        await removeBoxes(perBlock);
      });

      const scratch = (name: string) => ({ bundleDir: live.bundleDir, pidFile: path.join(work, `${name}.pid`), consoleFile: path.join(work, `${name}.console`) });
      const calls: Array<[string, () => Promise<unknown>]> = [
        ['version', () => missing.version()],
        ['create', () => missing.create(`rc${tag}-m-create`, scratch('m-create'))],
        ['run', () => missing.run(`rc${tag}-m-run`, scratch('m-run'))],
        ['run with prepare (the step exits 127)', async () => {
          const script = path.join(work, 'prepare-missing.sh');
          await fs.writeFile(script, PREPARE_SCRIPT, { mode: 0o755 });
          return missing.run(`rc${tag}-m-prep`, { ...scratch('m-prep'), prepare: { file: script, args: [path.join(work, 'm-prep.record')] } });
        }],
        ['start', () => missing.start(live.id)],
        ['state', () => missing.state(live.id)],
        ['list', () => missing.list()],
        ['kill', () => missing.kill(live.id, 'KILL')],
        ['delete', () => missing.delete(live.id, true)],
      ];
      it.each(calls)('%s', async (_name, call) => {
        const err = await errorOf(call());
        expect(err.code).toBe(ErrorCodes.RUNTIME_MISSING);
        expect(err.message.length).toBeGreaterThan(0);
        // Nothing was done to the container the real engine runs.
        expect(await statusOf(live.id)).toBe('running');
      });

      it('execCommand builds a command without running anything; spawning it fails', async () => {
        const cmd = await missing.execCommand(live.id, { argv: ['/bin/true'], uid: 0, gid: 0, tty: false });
        const outcome = await spawnHost(cmd).then((r) => `exit ${r.code}`, (e: NodeJS.ErrnoException) => e.code);
        expect(['ENOENT', 'exit 127']).toContain(outcome);
      });
    });
  });
}

for (const engine of ENGINES) runtimeConformance(engine);
