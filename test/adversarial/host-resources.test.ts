import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync, renameSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostSysctlNeeds } from '../../src/system/host-tuning.js';
import { sessionHelperPath } from '../../src/system/native-helpers.js';
import { keyAuthArgs, runProgram, sshBaseArgs } from '../helpers/ssh-harness.js';
import { waitFor } from '../helpers/ve-env.js';
import { buildAttack, makeArena, plantAttack, serverAlive, type Arena } from './kit.js';

/**
 * Host resources a tenant can consume (review H4, M1, M2, N1, N2, L1): every
 * one is capped per VE or charged to the VE, so that exhausting it hurts only
 * the tenant who did. alice attacks from her VE (as VE root, with static
 * attack programs), bob is the victim; each test asserts that the host, bob
 * and the server still have what they need, and that alice got no more than
 * her own limit.
 */

/** Small per-VE limits, so that the tests reach them quickly (the defaults are 2048 relay tasks and 1024 terminals). */
const RELAY_PIDS = 32;
const PTYS_PER_VE = 64;
/** The test VEs' memory limit (test/helpers/ve-env.ts): kernelTCP is as large. */
const VE_MEMORY = 128 * 1024 * 1024;

const hostPidNs = readlinkSync('/proc/self/ns/pid');

/** Host processes (in the host's pid namespace, not in a VE) and their command lines. */
function hostProcesses(): Array<{ pid: number; args: string }> {
  const out: Array<{ pid: number; args: string }> = [];
  for (const name of readdirSync('/proc')) {
    const pid = Number(name);
    if (!Number.isInteger(pid) || pid <= 0) continue;
    try {
      if (readlinkSync(`/proc/${pid}/ns/pid`) !== hostPidNs) continue;
      out.push({ pid, args: readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ') });
    } catch { /* gone meanwhile */ }
  }
  return out;
}

function processState(pid: number): string | null {
  try {
    return /^\d+ \(.*\) (\S)/.exec(readFileSync(`/proc/${pid}/stat`, 'utf8'))?.[1] ?? null;
  } catch {
    return null;
  }
}

function tcpMemPages(): number {
  const m = /^TCP: .* mem (\d+)/m.exec(readFileSync('/proc/net/sockstat', 'utf8'));
  return m ? Number(m[1]) : 0;
}

const INOTIFY_INSTANCES = '/proc/sys/fs/inotify/max_user_instances';

describe('host resources: each capped per VE or charged to it', () => {
  let arena: Arena;
  let cgroupParent: string;
  const held: ChildProcess[] = [];

  /** A long-running `ssh ACCOUNT CMD` the test ends itself; resolves once it printed `ready` or ended. */
  function holdSession(account: string, cmd: string, ready: string): Promise<{ child: ChildProcess; up: boolean; stderr: () => string }> {
    const key = arena.keys[account]!;
    const child = spawn('ssh', [...sshBaseArgs(arena.serve.port), ...keyAuthArgs(key), `${account}@127.0.0.1`, cmd], {
      stdio: ['pipe', 'pipe', 'pipe'], env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir() },
    });
    held.push(child);
    let out = '';
    let err = '';
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve({ child, up: false, stderr: () => err }), 30_000);
      child.stdout!.on('data', (d: Buffer) => {
        out += d.toString();
        if (out.includes(ready)) {
          clearTimeout(timer);
          resolve({ child, up: true, stderr: () => err });
        }
      });
      child.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
      child.on('close', () => {
        clearTimeout(timer);
        resolve({ child, up: false, stderr: () => err });
      });
    });
  }

  function endHeldSessions(): void {
    for (const c of held.splice(0)) {
      if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    }
  }

  /** The pid of alice's session agent inside her VE (as her VE sees it), or null. */
  async function agentPid(ve: string): Promise<string | null> {
    // A killed agent the VE's init has not reaped yet keeps its name: only a live one counts.
    const r = await arena.sh(ve, 'for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = vesh-agent ] && ! grep -q ") Z" $p/stat && echo ${p#/proc/}; done; true');
    return r.stdout.trim().split('\n')[0] || null;
  }

  async function waitForAgent(account: string): Promise<void> {
    await waitFor(`the session agent of ${account}'s VE`, async () => {
      if (await agentPid(account)) return true;
      await arena.ssh(account, ['true']);
      return false;
    }, 60_000);
  }

  /** The host's inotify instance limit before this file lowered it (restored at the end). */
  let inotifyInstancesBefore: string | null = null;

  beforeAll(async () => {
    // Start from Debian's default (128), as on a fresh host: vesh must raise it
    // itself, or one VE takes every instance that host root and all VEs share (M2).
    inotifyInstancesBefore = readFileSync(INOTIFY_INSTANCES, 'utf8');
    writeFileSync(INOTIFY_INSTANCES, '128');
    arena = await makeArena({ template: 'busybox', runtime: `relayPids: ${RELAY_PIDS}, ptysPerVe: ${PTYS_PER_VE}` });
    arena.cleanup.add(async () => endHeldSessions());
    cgroupParent = arena.env.layout.cgroupParent.replace(/^\/+/, '');
    for (const a of ['alice', 'bob']) {
      const r = await arena.ssh(a, ['true']);
      expect(r.code, r.stderr).toBe(0);
    }
    for (const attack of ['res-ptys', 'res-inotify', 'res-tcp-pin', 'res-fake-agent']) await plantAttack(arena.env, 'alice', attack);
    await plantAttack(arena.env, 'bob', 'res-inotify');
  }, 300_000);

  afterAll(async () => {
    endHeldSessions();
    try {
      await arena?.cleanup.run();
    } finally {
      if (inotifyInstancesBefore !== null) writeFileSync(INOTIFY_INSTANCES, inotifyInstancesBefore);
    }
  });

  it('shows no session command or client address in the host process list, through the agent or through runc exec (N2)', async () => {
    // Host processes of this vesh (its runc root or agents dir on their command line) or naming the secret; not the ssh clients.
    const ours = arena.env.layout.instanceId;
    const leaks = (secret: string) => hostProcesses()
      .filter((p) => !held.some((c) => c.pid === p.pid))
      .filter((p) => p.args.includes(secret) || (p.args.includes(ours) && p.args.includes('SSH_CONNECTION')));
    // Through the VE's session agent.
    await waitForAgent('alice');
    const viaAgent = await holdSession('alice', 'echo started; sleep 30 # S3cretAgent', 'started');
    expect(viaAgent.up, viaAgent.stderr()).toBe(true);
    expect(leaks('S3cretAgent')).toEqual([]);
    // Through the engine, as when VE root killed the agent.
    await arena.sh('alice', `kill -9 ${await agentPid('alice')}`);
    const viaRunc = await holdSession('alice', 'echo started; sleep 30 # S3cretRunc', 'started');
    expect(viaRunc.up, viaRunc.stderr()).toBe(true);
    expect(leaks('S3cretRunc')).toEqual([]);
    endHeldSessions();
  }, 180_000);

  it('ends the host relay with an exit status when an impersonated agent reports "stopped by SIGSTOP" (L1)', async () => {
    await waitForAgent('alice');
    await arena.sh('alice', 'rm -f /tmp/fake.out; nohup /usr/local/bin/res-fake-agent 40 > /tmp/fake.out 2>&1 < /dev/null &');
    let staged = '';
    await waitFor('the fake agent to start', async () => {
      staged = (await arena.sh('alice', 'cat /tmp/fake.out 2>/dev/null; true')).stdout;
      return staged.trim() !== '';
    }, 20_000);
    expect(staged, 'VE root could not take the agent\'s place').toContain('impersonating');
    const r = await arena.ssh('alice', ['echo', 'never-runs'], { timeoutMs: 30_000 });
    const said = (await arena.sh('alice', 'cat /tmp/fake.out; true')).stdout;
    expect(said).toContain('answered SIGSTOP');
    // The relay did not stop itself: the session ended, with 128+SIGSTOP, and no relay sits stopped on the host.
    expect(r.signal, 'the session hung: the relay stopped itself').toBeNull();
    expect(r.code).toBe(128 + os.constants.signals.SIGSTOP);
    const stopped = hostProcesses().filter((p) => p.args.includes('vesh-session') && p.args.includes(arena.env.layout.agentsDir) && processState(p.pid) === 'T');
    expect(stopped).toEqual([]);
    await arena.expectServes('alice');
  }, 120_000);

  it('gives a VE at most its devpts max= of terminals; bob still gets one (M1)', async () => {
    await arena.sh('alice', 'rm -f /tmp/ptys.out; nohup /usr/local/bin/res-ptys 5000 120 > /tmp/ptys.out 2>&1 < /dev/null &');
    await waitFor('the pty hog', async () => (await arena.sh('alice', 'cat /tmp/ptys.out 2>/dev/null; true')).stdout.includes('opened'), 60_000);
    const said = (await arena.sh('alice', 'cat /tmp/ptys.out')).stdout;
    const got = Number(/opened (\d+)/.exec(said)?.[1]);
    expect(got, said).toBeGreaterThan(0);
    expect(got, said).toBeLessThanOrEqual(PTYS_PER_VE);
    const bob = await arena.ssh('bob', ['tty'], { extra: ['-tt'] });
    expect(bob.code, bob.stderr).toBe(0);
    expect(bob.stdout.trim()).toMatch(/^\/dev\/pts\/\d+$/);
    await arena.sh('alice', 'killall res-ptys 2>/dev/null; true');
  }, 120_000);

  it('leaves host root and other VEs inotify instances while one VE takes all it can (M2)', async () => {
    // vesh raised the host-wide limit, which every VE's instances count against as host root's too.
    const need = hostSysctlNeeds({ pidsPerVe: 128, ptysPerVe: PTYS_PER_VE }).find((n) => n.key === 'fs.inotify.max_user_instances')!;
    expect(Number(readFileSync(INOTIFY_INSTANCES, 'utf8'))).toBeGreaterThanOrEqual(need.want);
    await arena.sh('alice', 'rm -f /tmp/ino.out; nohup /usr/local/bin/res-inotify 20000 120 > /tmp/ino.out 2>&1 < /dev/null &');
    await waitFor('the inotify hog', async () => (await arena.sh('alice', 'cat /tmp/ino.out 2>/dev/null; true')).stdout.includes('took'), 60_000);
    const said = (await arena.sh('alice', 'cat /tmp/ino.out')).stdout;
    expect(Number(/took (\d+)/.exec(said)?.[1]), said).toBeGreaterThan(0);
    // Host root, as systemd or vesh's own accounts watcher would.
    const host = await runProgram(buildAttack('res-inotify'), ['1', '0']);
    expect(host.stdout).toMatch(/^took 1 /);
    const bob = await arena.sh('bob', '/usr/local/bin/res-inotify 1 0');
    expect(bob.stdout).toMatch(/^took 1 /);
    await arena.sh('alice', 'killall res-inotify 2>/dev/null; true');
  }, 120_000);

  it('charges the TCP buffers a VE pins on its loopback to that VE, held to its limit (N1)', async () => {
    const tcpDir = path.join('/sys/fs/cgroup/memory', cgroupParent, 'alice');
    const before = tcpMemPages();
    // 300 MiB at most, so that on a host without the guard it stays harmless.
    await arena.sh('alice', 'rm -f /tmp/tcp.out; nohup /usr/local/bin/res-tcp-pin 64 300 120 > /tmp/tcp.out 2>&1 < /dev/null &');
    await waitFor('the TCP pinner', async () => (await arena.sh('alice', 'cat /tmp/tcp.out 2>/dev/null; true')).stdout.includes('wrote'), 90_000);
    const said = (await arena.sh('alice', 'cat /tmp/tcp.out')).stdout;
    const grewBytes = (tcpMemPages() - before) * 4096;
    const charged = Number(readFileSync(path.join(tcpDir, 'memory.kmem.tcp.usage_in_bytes'), 'utf8'));
    await arena.sh('alice', 'killall res-tcp-pin 2>/dev/null; true');
    // Host-wide TCP memory grew by no more than her limit (plus other tests' traffic meanwhile), and her cgroup holds it.
    expect(grewBytes, said).toBeLessThanOrEqual(VE_MEMORY + 16 * 1024 * 1024);
    expect(charged, said).toBeGreaterThan(VE_MEMORY / 2);
    // The kernel lets a few forced charges (a socket's minimum, ACKs) pass the limit.
    expect(charged).toBeLessThanOrEqual(VE_MEMORY + 4 * 1024 * 1024);
    await arena.expectServes('bob');
  }, 180_000);

  it('holds no host process for a session through the agent; runs the relays that remain in the VE\'s relay cgroup, which refuses one past its pids limit; bob still served (H4)', async () => {
    await waitForAgent('alice');
    const pidsDir = path.join('/sys/fs/cgroup/pids', cgroupParent, 'alice.relays');
    const memoryDir = path.join('/sys/fs/cgroup/memory', cgroupParent, 'alice.relays');
    const sock = path.join(arena.env.layout.agentsDir, 'alice.sock');
    const relaysOf = () => hostProcesses().filter((p) => p.args.includes('vesh-session') && p.args.includes(` attach ${sock} `));
    const pidsNow = () => Number(readFileSync(path.join(pidsDir, 'pids.current'), 'utf8'));
    // Through the agent, the broker asks it itself: the session holds no host
    // process, only a socket in the broker (capped by sessions.maxSessionsPerAccount).
    const first = await holdSession('alice', 'echo up; sleep 120', 'up');
    expect(first.up, first.stderr()).toBe(true);
    expect(relaysOf()).toEqual([]);
    // With the agent not answering (its socket moved away), a session takes a
    // host relay, charged to alice's relay cgroup, pids and memory alike.
    renameSync(sock, `${sock}.away`);
    let viaRelay;
    try {
      viaRelay = await holdSession('alice', 'echo up; sleep 120', 'up');
    } finally {
      renameSync(`${sock}.away`, sock);
    }
    expect(viaRelay.up, viaRelay.stderr()).toBe(true);
    const relays = relaysOf();
    expect(relays.length).toBeGreaterThan(0);
    for (const r of relays) {
      const cg = readFileSync(`/proc/${r.pid}/cgroup`, 'utf8');
      expect(cg).toMatch(new RegExp(`:pids:/${cgroupParent}/alice\\.relays$`, 'm'));
      expect(cg).toMatch(new RegExp(`:memory:/${cgroupParent}/alice\\.relays$`, 'm'));
    }
    expect(readFileSync(path.join(pidsDir, 'pids.max'), 'utf8').trim()).toBe(String(RELAY_PIDS));

    // Past its pids limit the relay cgroup takes no more relay, and says why:
    // filled with stand-ins that join it as every relay does, one more is refused.
    const helper = sessionHelperPath();
    const memory = readFileSync(path.join(memoryDir, 'memory.limit_in_bytes'), 'utf8').trim();
    const join = (cmd: string[]) => [helper, ['join', String(RELAY_PIDS), memory, `${pidsDir}:${memoryDir}`, ...cmd]] as const;
    const fillers: ChildProcess[] = [];
    try {
      const room = RELAY_PIDS - pidsNow();
      for (let i = 0; i < room; i++) {
        const [file, args] = join(['/bin/sleep', '120']);
        fillers.push(spawn(file, args, { stdio: 'ignore' }));
      }
      await waitFor('alice\'s relay cgroup full', async () => pidsNow() >= RELAY_PIDS, 20_000);
      const [file, args] = join(['/bin/true']);
      const over = await runProgram(file, [...args]);
      expect(over.code).toBe(255);
      expect(over.stderr).toMatch(/as many host processes serving its sessions as it may/);
      expect(pidsNow()).toBeLessThanOrEqual(RELAY_PIDS);
    } finally {
      for (const f of fillers) f.kill('SIGKILL');
    }
    // Her session through the agent still runs, bob is served, and so is the server.
    expect(first.child.exitCode).toBeNull();
    await arena.expectServes('bob');
    expect(serverAlive(arena)).toBe(true);
    endHeldSessions();
    await waitFor('alice\'s relays to end', async () => pidsNow() === 0, 30_000);
    await arena.expectServes('alice');
  }, 300_000);
});
