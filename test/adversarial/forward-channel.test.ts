import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { waitFor } from '../helpers/ve-env.js';
import { freePort, keyAuthArgs, readFrom, serverBugRecords, sshBaseArgs } from '../helpers/ssh-harness.js';
import { makeArena, plantAttack, serverAlive, type Arena } from './kit.js';

/** Wait until a -L port relays the VE server's greeting. */
async function untilGreets(port: number, greeting: string): Promise<string> {
  let got = '';
  for (let i = 0; i < 80 && got !== greeting; i++) {
    await new Promise((r) => setTimeout(r, 250));
    got = await readFrom(port);
  }
  return got;
}

const VE_PORT = 7080;
/** Where the blocking attack listens in the VE (and never accepts). */
const TRAP_PORT = 7090;
const MALLORY_UID = 1500;
const MODES = ['file', 'unix', 'listener', 'unterminated', 'garbage'] as const;
type Mode = (typeof MODES)[number];
/** Why the relay drops the first thing VE root sends in each mode (its first report says so). */
const FIRST_REJECTED: Record<Mode, RegExp> = {
  file: /not a socket/,
  unix: /not AF_INET or AF_INET6/,
  listener: /a listening socket/,
  unterminated: /oversized/,
  garbage: /wrong size|malformed|oversized|unknown type/,
};
const WHAT: Record<Mode, string> = {
  file: 'a regular file\'s descriptor',
  unix: 'a Unix socket where a TCP one is expected',
  listener: 'a listening socket where a connected one is expected',
  unterminated: 'an 8 MiB message with no terminator',
  garbage: 'random bytes in messages of every size',
};

/**
 * H1: the port-forward helper runs in the VE as the account's user, and the
 * tenant can take its channel (pidfd_getfd) while `ssh -L/-R` is open. What
 * it sends there must never reach the SSH server as anything but checked
 * frames and connected TCP sockets: the server stays the same live process
 * with no bug logged, bob is still served, alice's other forwards work as
 * before and a new -L of hers works. VE root (CAP_SYS_PTRACE in the VE) can
 * take the channel and the host relay drops what it sends; a plain user in
 * the VE cannot take it at all.
 */
describe('adversarial: the port-forward helper\'s channel taken over from inside the VE', () => {
  let arena: Arena;
  let hostPort: number;
  let hostServer: net.Server;
  const children: ChildProcess[] = [];

  /** ssh -N with forwards, as `account`; killed by afterAll if the test does not. */
  const sshN = (account: string, fwd: string[]): ChildProcess => {
    const child = spawn('ssh', [...sshBaseArgs(arena.serve.port), ...keyAuthArgs(arena.keys[account]!), '-N', '-o', 'ExitOnForwardFailure=yes', ...fwd, `${account}@127.0.0.1`], { stdio: ['ignore', 'ignore', 'pipe'] });
    children.push(child);
    return child;
  };

  /** Host pids of the forward helpers (and their lookup children) in alice's VE; zombies have exited (the VE's init reaps them in its time). */
  const forwardHelpers = async (): Promise<string[]> => {
    const init = (await arena.env.ves.status('alice')).pid!;
    const initNs = readlinkSync(`/proc/${init}/ns/pid`);
    return readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
      try {
        const zombie = /^State:\s*Z/m.test(readFileSync(`/proc/${p}/status`, 'utf8'));
        return !zombie && readFileSync(`/proc/${p}/comm`, 'utf8').trim() === 'vesh-forward' && readlinkSync(`/proc/${p}/ns/pid`) === initNs;
      } catch { return false; }
    });
  };

  /** What a client inside the VE reads from 127.0.0.1:port there (the -R listener). */
  const veRead = async (account: string, port: number): Promise<string> =>
    (await arena.ssh(account, [`perl -MIO::Socket::INET -e '$c=IO::Socket::INET->new("127.0.0.1:${port}") or die "connect: $!\\n"; print <$c>'`])).stdout;

  beforeAll(async () => {
    arena = await makeArena({
      template: 'debian',
      accounts: { alice: [], bob: [], mallory: ['ve: alice', 'user: mallory'] },
    });
    arena.cleanup.add(() => {
      for (const c of children) c.kill('SIGKILL');
    });
    // The far side of alice's -R: a server on the host's loopback, where her ssh client runs.
    hostPort = await freePort();
    hostServer = net.createServer((s) => s.end('from-client-side\n'));
    await new Promise<void>((r) => hostServer.listen(hostPort, '127.0.0.1', () => r()));
    arena.cleanup.add(() => new Promise<void>((r) => hostServer.close(() => r())));
    // A plain user in alice's VE, for the account mallory; a TCP server in the VE for the -L.
    await arena.expectServes('alice');
    await arena.sh('alice', `useradd -m -u ${MALLORY_UID} -s /bin/sh mallory`);
    const started = await arena.ssh('alice', [`setsid perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalAddr=>"127.0.0.1",LocalPort=>${VE_PORT},Listen=>5,ReuseAddr=>1) or die "listen: $!"; while($c=$s->accept){print $c "from-ve\\n"; close $c}' >/dev/null 2>&1 </dev/null & sleep 0.5; echo started`]);
    expect(started.stdout).toContain('started');
    await plantAttack(arena.env, 'alice', 'forward-hijack');
  }, 600_000);

  afterAll(() => arena?.cleanup.run(), 300_000);

  const attackers = [
    { who: 'VE root', account: 'alice', uid: 0 },
    { who: 'a plain user in the VE', account: 'mallory', uid: MALLORY_UID },
  ];

  it('the forward relay runs on the host as nobody with no_new_privs, outside the VE, charged to alice\'s relay cgroup', async () => {
    await waitFor('earlier forward helpers to exit', async () => (await forwardHelpers()).length === 0, 20_000);
    const local = await freePort();
    const child = sshN('alice', ['-L', `${local}:127.0.0.1:${VE_PORT}`]);
    try {
      expect(await untilGreets(local, 'from-ve\n')).toBe('from-ve\n');
      // The server's children that are forward relays (comm is cut to 15 characters).
      const servePid = String(arena.serve.child.pid);
      const stat = (pid: string, field: string) => new RegExp(`^${field}:\\s*(.*)$`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
      const relays = readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
        try { return readFileSync(`/proc/${p}/comm`, 'utf8').trim() === 'vesh-forward-re' && stat(p, 'PPid') === servePid; } catch { return false; }
      });
      expect(relays).toHaveLength(1);
      const r = relays[0]!;
      expect(stat(r, 'Uid')).toBe('65534\t65534\t65534\t65534');
      expect(stat(r, 'NoNewPrivs')).toBe('1');
      expect(stat(r, 'CapEff')).toBe('0000000000000000');
      // Host namespaces, not the VE's: nothing in the VE can see or trace it.
      expect(readlinkSync(`/proc/${r}/ns/pid`)).toBe(readlinkSync('/proc/self/ns/pid'));
      expect(readlinkSync(`/proc/${r}/ns/user`)).toBe(readlinkSync('/proc/self/ns/user'));
      const parent = arena.env.layout.cgroupParent.replace(/^\/+/, '');
      const cg = readFileSync(`/proc/${r}/cgroup`, 'utf8');
      expect(cg).toMatch(new RegExp(`:pids:/${parent}/alice\\.relays$`, 'm'));
      expect(cg).toMatch(new RegExp(`:memory:/${parent}/alice\\.relays$`, 'm'));
    } finally {
      child.kill();
    }
  }, 240_000);

  it('L11: VE root writes 256 MiB to the forward helper\'s stderr once it runs: nothing on the host reads it any more (EPIPE), the server lives', async () => {
    await waitFor('earlier forward helpers to exit', async () => (await forwardHelpers()).length === 0, 20_000);
    const servePid = arena.serve.child.pid;
    const local = await freePort();
    const child = sshN('alice', ['-L', `${local}:127.0.0.1:${VE_PORT}`]);
    try {
      expect(await untilGreets(local, 'from-ve\n')).toBe('from-ve\n');
      const attack = await arena.ssh('alice', ['/usr/local/bin/forward-hijack', '0', 'stderr']);
      expect(attack.stdout).toMatch(/^stderr: EPIPE after \d+ bytes$/m);
      expect(serverAlive(arena)).toBe(true);
      expect(arena.serve.child.pid).toBe(servePid);
      expect(serverBugRecords(arena.serve.logs)).toEqual([]);
      expect(await readFrom(local)).toBe('from-ve\n');
      await arena.expectServes('bob');
    } finally {
      child.kill();
    }
  }, 240_000);

  it('VE root answers a -L connect with a socket it keeps and switches to blocking, its peer never reading: the server keeps serving everyone', async () => {
    await waitFor('earlier forward helpers to exit', async () => (await forwardHelpers()).length === 0, 20_000);
    const servePid = arena.serve.child.pid;
    const local = await freePort();
    const child = sshN('alice', ['-L', `${local}:127.0.0.1:${VE_PORT}`]);
    expect(await untilGreets(local, 'from-ve\n')).toBe('from-ve\n');
    await plantAttack(arena.env, 'alice', 'forward-blocking');
    // Bounded: the attack gives up by itself after 90 s, and is told to stop below.
    const started = await arena.sh('alice', `rm -f /tmp/fb.out; setsid /usr/local/bin/forward-blocking 0 ${TRAP_PORT} 90 >/tmp/fb.out 2>&1 </dev/null & echo $! > /tmp/fb.pid; for i in $(seq 100); do grep -q waiting /tmp/fb.out && break; sleep 0.1; done; cat /tmp/fb.out`);
    expect(started.stdout).toContain('waiting');
    const attackOut = async () => (await arena.sh('alice', 'cat /tmp/fb.out')).stdout;
    const conn = net.connect(local, '127.0.0.1');
    conn.on('error', () => undefined);
    try {
      // A new -L connection: its connect request is answered by the attack, and the client pushes 8 MiB at it.
      const chunk = Buffer.alloc(64 * 1024, 0x61);
      for (let i = 0; i < 128; i++) conn.write(chunk);
      await waitFor('the attack to answer the connect', async () => (await attackOut()).includes('answered'), 30_000);
      await new Promise((r) => setTimeout(r, 3_000));
      // The server still answers: bob logs in and runs a command (a stuck event loop would not, for as long as the attack holds).
      const tag = `alive-${Math.random().toString(36).slice(2, 8)}`;
      const bob = await arena.ssh('bob', ['echo', tag], { timeoutMs: 45_000 });
      expect(bob.stdout.trim()).toBe(tag);
      expect(serverAlive(arena)).toBe(true);
      expect(arena.serve.child.pid).toBe(servePid);
      expect(serverBugRecords(arena.serve.logs)).toEqual([]);
    } finally {
      conn.destroy();
      child.kill();
      await arena.sh('alice', 'kill -TERM "$(cat /tmp/fb.pid)" 2>/dev/null; for i in $(seq 50); do grep -q "done\\|no connect\\|getfd" /tmp/fb.out && break; sleep 0.1; done; true', { allowFailure: true });
    }
    // And a new -L of alice's works.
    const local2 = await freePort();
    const child2 = sshN('alice', ['-L', `${local2}:127.0.0.1:${VE_PORT}`]);
    expect(await untilGreets(local2, 'from-ve\n')).toBe('from-ve\n');
    child2.kill();
  }, 300_000);

  for (const a of attackers) {
    for (const mode of MODES) {
      it(`${a.who} sends ${WHAT[mode]} on the forward helper's channel: the server lives, nothing unchecked reaches it, forwards keep working`, async () => {
        await waitFor('earlier forward helpers to exit', async () => (await forwardHelpers()).length === 0, 20_000);
        const servePid = arena.serve.child.pid;
        const local = await freePort();
        const remote = 30_000 + Math.floor(Math.random() * 20_000);
        const child = sshN(a.account, ['-L', `${local}:127.0.0.1:${VE_PORT}`, '-R', `${remote}:127.0.0.1:${hostPort}`]);
        expect(await untilGreets(local, 'from-ve\n')).toBe('from-ve\n');
        expect(await veRead(a.account, remote)).toBe('from-client-side\n');
        const rejectedBefore = arena.serve.logs.filter((r) => r.event === 'forward.helper_rejected').length;

        const attack = await arena.ssh(a.account, ['/usr/local/bin/forward-hijack', String(a.uid), mode]);
        // The same server process, no bug it survived, bob served.
        expect(serverAlive(arena)).toBe(true);
        expect(arena.serve.child.pid).toBe(servePid);
        expect(serverBugRecords(arena.serve.logs)).toEqual([]);
        await arena.expectServes('bob');
        // The Unix socket never became a forwarded connection, nor the listener a server in the host's process.
        expect(attack.stdout).not.toContain('relayed:');
        expect(attack.stdout).not.toContain('accepted-by-server');
        // alice's forwards of that connection work as before, both ways.
        expect(await readFrom(local)).toBe('from-ve\n');
        expect(await veRead(a.account, remote)).toBe('from-client-side\n');
        child.kill();
        // And a new -L of hers works.
        const local2 = await freePort();
        const child2 = sshN(a.account, ['-L', `${local2}:127.0.0.1:${VE_PORT}`]);
        expect(await untilGreets(local2, 'from-ve\n')).toBe('from-ve\n');
        child2.kill();
        if (a.uid === 0) {
          // VE root held the channel and sent it all; the relay on the host dropped it and said why.
          expect(attack.stdout).toContain('taken');
          expect(attack.stdout).toContain('sent');
          await waitFor('the relay to report what it dropped', async () => arena.serve.logs.filter((r) => r.event === 'forward.helper_rejected').length > rejectedBefore, 15_000);
          const report = arena.serve.logs.filter((r) => r.event === 'forward.helper_rejected')[rejectedBefore]!;
          expect(String(report.reason)).toMatch(FIRST_REJECTED[mode]);
          expect(report.ve).toBe('alice');
        } else {
          // The helper is not dumpable: the account's own user cannot take its channel.
          expect(attack.stdout).toContain('getfd: EPERM');
        }
        expect(serverBugRecords(arena.serve.logs)).toEqual([]);
      }, 240_000);
    }
  }
});
