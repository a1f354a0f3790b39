import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, readdirSync, readlinkSync } from 'node:fs';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import { ForwardRelayClient, ForwardRequestError, type ForwardRelayEvents } from '../../src/broker/forward-relay-client.js';
import { closeFd, sendFrame, socketpair } from '../../src/system/fdpass.js';
import { FrameChannel } from '../../src/system/frame-channel.js';
import { forwardHelperPath, forwardRelayPath } from '../../src/system/native-helpers.js';
import type { VeUserInfo } from '../../src/ve/access.js';
import type { VeshError } from '../../src/errors.js';

const VE = 'fwd';
/** Ports inside the VE's own network namespace: nothing else there uses them. */
const BANNER_PORT = 2525;
const CLOSED_PORT = 2526;

/**
 * A TCP server in the VE that speaks first, as SMTP and SSH servers do: a
 * banner on accept, then an answer to one line. perl-base is in every Debian
 * system.
 */
const bannerServer = `setsid perl -MIO::Socket::INET -e '$|=1; $s=IO::Socket::INET->new(LocalAddr=>"127.0.0.1",LocalPort=>${BANNER_PORT},Listen=>5,ReuseAddr=>1) or die "listen: $!"; while($c=$s->accept){$c->autoflush(1); print $c "220 banner from the VE\\r\\n"; $l=<$c>; print $c "echo:$l"; close $c}' >/dev/null 2>&1 </dev/null & sleep 0.5; echo started`;

/** A TCP client in the VE: sends a line, prints the answer. */
const veClient = (port: number) => `perl -MIO::Socket::INET -e '$c=IO::Socket::INET->new("127.0.0.1:${port}") or die "connect: $!\\n"; $c->autoflush(1); print $c "ping from the VE\\n"; print scalar <$c>'`;

/** Run a shell script as root in the VE without blocking the event loop (the relay's frames must get through meanwhile). */
async function shInVeAsync(env: VeTestEnv, script: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const cmd = await env.ves.execCommand(VE, {
    argv: ['/bin/sh', '-c', script], uid: 0, gid: 0, tty: false,
    env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', HOME: '/root' },
  });
  return new Promise((resolve, reject) => {
    const child = spawn(cmd.file, cmd.args, { stdio: ['ignore', 'pipe', 'pipe'], env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', ...cmd.env } });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** Read from a socket until it has `n` lines or ends; gives up after 10 s. */
function readLines(s: net.Socket, n: number): Promise<string> {
  return new Promise((resolve, reject) => {
    let got = '';
    const timer = setTimeout(() => done(new Error(`timed out with ${JSON.stringify(got)}`)), 10_000);
    const onData = (d: Buffer) => {
      got += d.toString();
      if (got.split('\n').length > n) done();
    };
    const done = (err?: Error) => {
      clearTimeout(timer);
      s.off('data', onData);
      s.off('end', onEnd);
      if (err) reject(err);
      else resolve(got);
    };
    const onEnd = () => done();
    s.on('data', onData);
    s.on('end', onEnd);
  });
}

/** The descriptors this process holds now. */
const openFds = (): string[] => readdirSync('/proc/self/fd');

/** Host pids of live (not zombie) port-forward helpers in the VE: the ones in its init's pid namespace. */
async function forwardHelpers(env: VeTestEnv): Promise<string[]> {
  const init = (await env.ves.status(VE)).pid!;
  const initNs = readlinkSync(`/proc/${init}/ns/pid`);
  return readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
    try {
      return !/^State:\s*Z/m.test(readFileSync(`/proc/${p}/status`, 'utf8'))
        && readFileSync(`/proc/${p}/comm`, 'utf8').trim() === 'vesh-forward'
        && readlinkSync(`/proc/${p}/ns/pid`) === initNs;
    } catch { return false; }
  });
}

/** Whether `pid` is still a process (a zombie counts: it has not been reaped). */
const alive = (pid: number): boolean => existsSync(`/proc/${pid}`);

/**
 * The broker's port-forward client against a real VE: the relay on the host,
 * the helper in the VE, and every socket handed back as a raw descriptor
 * over our own SEQPACKET frames, never Node's IPC.
 */
describe('ForwardRelayClient: port forwarding in a VE, sockets handed back as raw fds', () => {
  let env: VeTestEnv | undefined;
  let user: VeUserInfo;
  const clients: ForwardRelayClient[] = [];
  const sockets: net.Socket[] = [];

  /** Events a test looks at: every accepted fd, every end. */
  const makeEvents = () => {
    const accepted: Array<{ id: number; fd: number; remoteAddress: string; remotePort: number }> = [];
    const ended: VeshError[] = [];
    const events: ForwardRelayEvents = {
      accepted: (id, fd, remoteAddress, remotePort) => accepted.push({ id, fd, remoteAddress, remotePort }),
      rejected: () => undefined,
      ended: (err) => ended.push(err),
    };
    return { events, accepted, ended };
  };

  const startClient = async (events: ForwardRelayEvents): Promise<ForwardRelayClient> => {
    const cmd = await env!.ves.forwardCommand(VE, user);
    const client = await ForwardRelayClient.start(cmd, VE, events);
    clients.push(client);
    return client;
  };

  /** A socket over a descriptor we were given; destroyed (closing the fd) in afterAll at the latest. */
  const socketOf = (fd: number): net.Socket => {
    const s = new net.Socket({ fd, readable: true, writable: true });
    s.on('error', () => undefined);
    sockets.push(s);
    return s;
  };

  beforeAll(async () => {
    for (const f of [forwardRelayPath(), forwardHelperPath()]) {
      if (!existsSync(f)) throw new Error(`${f} is not built: run "npm run build"`);
    }
    env = await makeVeTestEnv({ template: 'debian' });
    await env.ves.create(VE);
    await env.ves.start(VE);
    user = await env.ves.lookupUser(VE, 'root');
    expect((await shInVeAsync(env, bannerServer)).stdout).toContain('started');
  }, 300_000);

  afterAll(async () => {
    for (const s of sockets) s.destroy();
    for (const c of clients) c.stop();
    // Relays exit once their channel closes; wait so the VE's removal finds no helper left.
    for (const c of clients) {
      if (c.pid) await waitFor(`relay ${c.pid} to exit`, async () => !alive(c.pid!), 10_000).catch(() => undefined);
    }
    await env?.cleanup();
  }, 120_000);

  it('a VE service that speaks first: its banner arrives intact on the fd, and data goes both ways', async () => {
    const client = await startClient(makeEvents().events);
    const fd = await client.connect('localhost', BANNER_PORT);
    expect(Number.isInteger(fd) && fd > 2).toBe(true);
    // Nothing in this process reads the fd until we do: the banner, sent on
    // accept, waits in the socket however long we take to look.
    await new Promise((r) => setTimeout(r, 500));
    const s = socketOf(fd);
    expect(await readLines(s, 1)).toBe('220 banner from the VE\r\n');
    s.write('hello from the client\n');
    expect(await readLines(s, 1)).toBe('echo:hello from the client\n');
    // The server closed after answering: EOF reaches us through the relay.
    await new Promise<void>((resolve) => {
      s.on('end', () => resolve());
      s.resume();
    });
    s.destroy();
  });

  it('a connection to a closed port in the VE fails with ECONNREFUSED, and the client goes on working', async () => {
    const client = await startClient(makeEvents().events);
    const err = await client.connect('127.0.0.1', CLOSED_PORT).then(() => null, (e: unknown) => e);
    expect(err).toBeInstanceOf(ForwardRequestError);
    expect((err as ForwardRequestError).errno).toBe('ECONNREFUSED');
    expect((err as ForwardRequestError).code).toBe('VESH_NETWORK_FAILED');
    const s = socketOf(await client.connect('127.0.0.1', BANNER_PORT));
    expect(await readLines(s, 1)).toBe('220 banner from the VE\r\n');
    s.destroy();
  });

  it('listen inside the VE: a connection from inside arrives as accepted with a working fd, and unlisten closes the listener', async () => {
    const { events, accepted } = makeEvents();
    const client = await startClient(events);
    const l = await client.listen('127.0.0.1', 0);
    expect(l.port).toBeGreaterThan(0);
    const inVe = shInVeAsync(env!, veClient(l.port));
    await waitFor('the connection from inside the VE to arrive', async () => accepted.length === 1, 30_000);
    const a = accepted[0]!;
    expect(a.id).toBe(l.id);
    expect(a.remoteAddress).toBe('127.0.0.1');
    expect(a.remotePort).toBeGreaterThan(0);
    const s = socketOf(a.fd);
    expect(await readLines(s, 1)).toBe('ping from the VE\n');
    s.end('pong from the client\n');
    const out = await inVe;
    expect(out.stdout).toBe('pong from the client\n');
    s.destroy();

    client.unlisten(l.id);
    await waitFor('the listener in the VE to close', async () => (await shInVeAsync(env!, veClient(l.port))).stderr.includes('connect:'), 10_000);
    expect(accepted).toHaveLength(1);
  });

  it('stop() ends the relay and the helper in the VE, without an "ended" event, and leaves no descriptor here', async () => {
    // Helpers of the earlier tests' clients are still running: stop those first.
    for (const c of clients.splice(0)) c.stop();
    await waitFor('earlier helpers to exit', async () => (await forwardHelpers(env!)).length === 0, 20_000);
    const fdsBefore = openFds();
    const { events, ended } = makeEvents();
    const client = await startClient(events);
    const relay = client.pid!;
    expect(readFileSync(`/proc/${relay}/comm`, 'utf8').trim()).toBe('vesh-forward-re');
    // As before the change of channel: once the helper runs, the relay is nobody with no_new_privs.
    const relayStatus = readFileSync(`/proc/${relay}/status`, 'utf8');
    expect(relayStatus).toMatch(/^Uid:\s+65534\s+65534\s+65534\s+65534$/m);
    expect(relayStatus).toMatch(/^NoNewPrivs:\s+1$/m);
    expect(await forwardHelpers(env!)).toHaveLength(1);
    const s = socketOf(await client.connect('127.0.0.1', BANNER_PORT));
    expect(await readLines(s, 1)).toBe('220 banner from the VE\r\n');
    s.destroy();

    client.stop();
    await waitFor('the relay to exit', async () => !alive(relay), 10_000);
    await waitFor('the helper in the VE to exit', async () => (await forwardHelpers(env!)).length === 0, 20_000);
    await expect(client.connect('127.0.0.1', BANNER_PORT)).rejects.toThrow(/stopped/);
    expect(ended).toHaveLength(0);
    // The channel, the relay's stderr pipe and the connection's fd are all closed.
    await waitFor('descriptors to be closed', async () => openFds().length <= fdsBefore.length, 5_000);
  });

  it('a relay that dies ends the client: "ended" once, requests fail at once, the helper goes too', async () => {
    const { events, ended } = makeEvents();
    const client = await startClient(events);
    const relay = client.pid!;
    process.kill(relay, 'SIGKILL');
    await waitFor('the client to see its relay gone', async () => ended.length === 1, 10_000);
    expect(ended[0]!.code).toBe('VESH_COMMAND_FAILED');
    expect(ended[0]!.message).toMatch(/SIGKILL|closed its channel/);
    await expect(client.connect('127.0.0.1', BANNER_PORT)).rejects.toThrow(new RegExp(`relay of VE "${VE}"`));
    await waitFor('the helper in the VE to exit', async () => (await forwardHelpers(env!)).length === 0, 20_000);
    expect(ended).toHaveLength(1);
  });

  it('the relay ignores a request frame that carries a descriptor (closing it), is over 4 KiB, holds a NUL, has text after the object or is not JSON, and goes on', async () => {
    // The relay driven by hand, without the client, to send what the client never would.
    const cmd = await env!.ves.forwardCommand(VE, user);
    const [mine, theirs] = socketpair('seqpacket');
    const program = openSync(cmd.program, 'r');
    const relay = spawn(cmd.file, cmd.args, { stdio: ['ignore', 'ignore', 'ignore', theirs, program], env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', ...cmd.env } });
    closeFd(theirs);
    closeSync(program);
    const channel = new FrameChannel(mine, { maxFrameBytes: 4096, name: 'relay under test' });
    const frames: Array<{ msg: Record<string, unknown>; fds: number[] }> = [];
    channel.on('frame', (msg: Record<string, unknown>, fds: number[]) => frames.push({ msg, fds }));
    channel.on('error', () => undefined);
    const [probe, probePeer] = socketpair('stream');
    const probeSocket = socketOf(probePeer);
    try {
      await waitFor('the relay to be ready', async () => frames.some((f) => f.msg.t === 'ready'), 30_000);
      const connect = (id: number) => ({ t: 'connect', id, host: '127.0.0.1', port: BANNER_PORT });
      const raw = (text: string) => expect(sendFrame(mine, Buffer.from(text, 'latin1'), [])).toBe(true);
      expect(sendFrame(mine, Buffer.from(JSON.stringify(connect(1))), [probe])).toBe(true);
      closeFd(probe);
      raw(JSON.stringify(connect(2)).replace('}', `,"pad":"${'x'.repeat(5000)}"}`));
      raw(`${JSON.stringify(connect(3))}\0`);
      raw(`${JSON.stringify(connect(4))} {}`);
      raw('connect 5');
      channel.send(connect(6));
      // The relay dropped its copy of the descriptor it was sent: ours was the last, so its peer sees EOF.
      await new Promise<void>((resolve) => {
        probeSocket.on('end', () => resolve());
        probeSocket.resume();
      });
      await waitFor('the answer to the one good request', async () => frames.some((f) => f.msg.t === 'connected'), 30_000);
      // One more round trip through the helper: an answer to 1-4 would be in by now.
      channel.send({ t: 'connect', id: 7, host: '127.0.0.1', port: CLOSED_PORT });
      await waitFor('the answer to the second good request', async () => frames.some((f) => f.msg.t === 'failed'), 30_000);
      const answers = frames.filter((f) => f.msg.t !== 'ready').map((f) => ({ t: f.msg.t, id: f.msg.id, fds: f.fds.length }));
      expect(answers).toEqual([{ t: 'connected', id: 6, fds: 1 }, { t: 'failed', id: 7, fds: 0 }]);
      expect(relay.exitCode).toBeNull();
    } finally {
      for (const f of frames) for (const fd of f.fds) closeFd(fd);
      channel.close();
      await waitFor('the relay to exit with its channel', async () => relay.exitCode !== null || relay.signalCode !== null, 10_000).catch(() => relay.kill('SIGKILL'));
    }
  });

  // Last: it stops the VE.
  it('a start that fails (the VE stopped after the command was made) rejects with what the engine said and leaves nothing running', async () => {
    const cmd = await env!.ves.forwardCommand(VE, user);
    await env!.ves.stop(VE);
    const fdsBefore = openFds();
    const relaysOfOurs = () => readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
      try {
        return readFileSync(`/proc/${p}/comm`, 'utf8').trim() === 'vesh-forward-re' && new RegExp(`^PPid:\\s*${process.pid}$`, 'm').test(readFileSync(`/proc/${p}/status`, 'utf8'));
      } catch { return false; }
    });
    const { events, ended } = makeEvents();
    const err = await ForwardRelayClient.start(cmd, VE, events).then((c) => { clients.push(c); return null; }, (e: unknown) => e as VeshError);
    expect(err?.code).toBe('VESH_COMMAND_FAILED');
    expect(err?.message).toContain(`relay of VE "${VE}"`);
    // The relay's and the engine's own words, read from the relay's stderr.
    expect(err?.message).toMatch(/the engine exited with status \d+: .*container does not exist/);
    expect(ended).toHaveLength(0);
    expect(relaysOfOurs()).toEqual([]);
    expect(openFds().length).toBeLessThanOrEqual(fdsBefore.length);
  });
});
