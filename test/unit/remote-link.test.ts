import { generateKeyPairSync, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { createRequire } from 'node:module';
import ssh2, { type ClientChannel, type Connection, type ParsedKey, type ServerChannel } from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AuthGrant } from '../../src/broker/request-table.js';
import { parseUserauthBlob, type UserauthBlob } from '../../src/broker/userauth-blob.js';
import { SshConnection } from '../../src/ssh/connection.js';
import { generateKeyPair } from '../../src/ssh/keygen.js';
import { dupFd } from '../../src/system/fdpass.js';
import { BrokerRefusal, type ConnectionBroker } from '../../src/worker/broker-client.js';
import {
  Cleanup, LogCapture, freePort, keyAuthArgs, makeClientKey, sshBaseArgs, sshWithKey, tempDir, type ClientKey, type RunResult,
} from '../helpers/ssh-harness.js';

const { Server, Client, utils } = ssh2;
const requireCjs = createRequire(import.meta.url);

/**
 * The worker side of node-to-node routing (src/ssh/remote-link.ts), in one
 * process: node A is our SshConnection on an ssh2 server with a fake broker
 * (whose cluster.sign really signs with a node key and checks the blob as
 * the real broker does); node B is a real ssh2 server that accepts only
 * that node key for the vouching user name and runs a tiny fake shell. The
 * user is the real OpenSSH client (ssh2's client where OpenSSH cannot show
 * a detail: window changes, signal names).
 */

/** The user name A's broker writes (a vouch, in the real thing); long, as vouches are. */
const VOUCH = `vouch-alice-${'x'.repeat(600)}`;

/** "ssh-ed25519 AAAA…" for an ed25519 KeyObject. */
function ed25519Line(pub: KeyObject): { line: string; blob: Buffer } {
  const raw = Buffer.from(pub.export({ format: 'jwk' }).x!, 'base64url');
  const str = (b: Buffer) => Buffer.concat([Buffer.from([0, 0, 0, b.length]), b]);
  const blob = Buffer.concat([str(Buffer.from('ssh-ed25519')), str(raw)]);
  return { line: `ssh-ed25519 ${blob.toString('base64')}`, blob };
}

/** Send SSH_MSG_CHANNEL_REQUEST "exit-signal" with any name (ssh2's server only sends RFC 4254's). */
function sendRawExitSignal(conn: Connection, channel: ServerChannel, name: string): void {
  const { sendPacket } = requireCjs('ssh2/lib/protocol/utils.js') as { sendPacket(p: unknown, b: Buffer): void };
  const proto = (conn as unknown as { _protocol: { _packetRW: { write: { allocStart: number; alloc(n: number): Buffer; finalize(b: Buffer): Buffer } } } })._protocol;
  const recipient = (channel as unknown as { outgoing: { id: number } }).outgoing.id;
  const str = (s: string) => Buffer.concat([Buffer.from([0, 0, 0, Buffer.byteLength(s)]), Buffer.from(s)]);
  const body = Buffer.concat([Buffer.from([98, 0, 0, 0, 0]), str('exit-signal'), Buffer.from([0]), str(name), Buffer.from([0]), str('made up'), str('')]);
  body.writeUInt32BE(recipient, 1);
  const w = proto._packetRW.write;
  const packet = w.alloc(body.length);
  body.copy(packet, w.allocStart);
  sendPacket(proto, w.finalize(packet));
}

interface NodeB {
  port: number;
  /** The userauth blobs B verified a node-key signature over. */
  verified: Buffer[];
  /** Every request B's sessions saw, as text ("exec cat", "signal INT", "env LANG=C"…). */
  seen: string[];
  /** Bytes of the last `flood` that ssh2 took from B's side (within the window A gave). */
  flooded: number;
  conns: Set<Connection>;
  hostKeyLine: string;
}

/** Node B: accepts only `nodeKey` for VOUCH; `exec` runs a tiny fake shell, -L connects on this host, -R listens here. */
async function startNodeB(cleanup: Cleanup, nodeKey: ParsedKey): Promise<NodeB> {
  const host = generateKeyPair('ed25519');
  const b: NodeB = { port: 0, verified: [], seen: [], flooded: 0, conns: new Set(), hostKeyLine: host.public };
  const server = new Server({ hostKeys: [host.private] }, (conn) => {
    b.conns.add(conn);
    conn.on('close', () => b.conns.delete(conn));
    conn.on('error', () => undefined);
    conn.on('authentication', (ctx) => {
      if (ctx.method !== 'publickey' || ctx.username !== VOUCH || ctx.key.algo !== 'ssh-ed25519' || !ctx.key.data.equals(nodeKey.getPublicSSH())) {
        ctx.reject(['publickey']);
        return;
      }
      if (!ctx.signature || !ctx.blob) {
        ctx.accept();
        return;
      }
      if (nodeKey.verify(ctx.blob, ctx.signature) === true) {
        b.verified.push(Buffer.from(ctx.blob));
        ctx.accept();
      } else {
        ctx.reject(['publickey']);
      }
    });
    conn.on('ready', () => {
      conn.on('session', (accept) => {
        const s = accept();
        let pty: { term: string; cols: number; rows: number } | null = null;
        let channel: ServerChannel | null = null;
        const env: string[] = [];
        s.on('env', (ok, _no, info) => {
          env.push(`${info.key}=${info.val}`);
          b.seen.push(`env ${info.key}=${info.val}`);
          ok?.();
        });
        s.on('pty', (ok, _no, info) => {
          pty = { term: info.term, cols: info.cols, rows: info.rows };
          b.seen.push(`pty ${info.term} ${info.cols}x${info.rows}`);
          ok?.();
        });
        s.on('window-change', (ok, _no, info) => {
          b.seen.push(`size ${info.cols}x${info.rows}`);
          channel?.write(`size ${info.cols}x${info.rows}\r\n`);
          ok?.();
        });
        s.on('signal', (ok, _no, info) => {
          b.seen.push(`signal ${info.name}`);
          channel?.write(`signal ${info.name}\r\n`);
          ok?.();
        });
        s.on('shell', (ok) => {
          b.seen.push('shell');
          const ch = ok();
          channel = ch;
          ch.write(`shell term=${pty?.term} cols=${pty?.cols} rows=${pty?.rows}\r\n`);
          ch.on('data', (d: Buffer) => {
            if (d.includes('q')) {
              ch.exit(0);
              ch.end();
            } else {
              ch.write(d);
            }
          });
        });
        s.on('subsystem', (ok, _no, info) => {
          b.seen.push(`subsystem ${info.name}`);
          const ch = ok();
          ch.end(`subsystem ${info.name}\n`);
        });
        s.on('exec', (ok, _no, info) => {
          b.seen.push(`exec ${info.command}`);
          const ch = ok();
          channel = ch;
          const [cmd, ...args] = info.command.split(' ');
          switch (cmd) {
            case 'echo-both':
              ch.write(`${args[0]}\n`);
              ch.stderr.write(`${args[1]}\n`);
              ch.exit(Number(args[2]));
              ch.end();
              break;
            case 'cat':
              ch.pipe(ch, { end: false });
              ch.on('end', () => {
                ch.exit(0);
                ch.end();
              });
              break;
            case 'env':
              ch.write(`${env.join(' ')}|${pty ? `${pty.term} ${pty.cols}x${pty.rows}` : 'no-pty'}\n`);
              ch.exit(0);
              ch.end();
              break;
            case 'die':
              ch.write('dying\n');
              if (args[0] === 'TERM') ch.exit('TERM', false, 'killed');
              else sendRawExitSignal(conn, ch, args[0]!);
              ch.end();
              break;
            case 'hang':
              ch.write('hanging\n');
              break;
            case 'flood': {
              // Writes as fast as the windows let it, up to 32 MiB; counts what went out.
              b.flooded = 0;
              const chunk = Buffer.alloc(64 * 1024, 'f');
              let left = 512;
              const more = () => {
                while (left > 0) {
                  left -= 1;
                  if (!ch.write(chunk, () => { b.flooded += chunk.length; })) {
                    ch.once('drain', more);
                    return;
                  }
                }
                ch.exit(0);
                ch.end();
              };
              more();
              break;
            }
            default:
              ch.stderr.write(`no such command ${cmd}\n`);
              ch.exit(127);
              ch.end();
          }
        });
      });
      // -L: connect from "inside the VE" (this host).
      conn.on('tcpip', (accept, reject, info) => {
        b.seen.push(`direct-tcpip ${info.destIP}:${info.destPort}`);
        const sock = net.connect(info.destPort, info.destIP);
        sock.on('error', () => reject());
        sock.on('connect', () => {
          const ch = accept();
          sock.pipe(ch).pipe(sock);
        });
      });
      conn.on('openssh.streamlocal', (accept, reject, info) => {
        b.seen.push(`direct-streamlocal ${info.socketPath}`);
        const sock = net.connect(info.socketPath);
        sock.on('error', () => reject());
        sock.on('connect', () => {
          const ch = accept();
          sock.pipe(ch).pipe(sock);
        });
      });
      // -R: listen here, open forwarded-tcpip back for each connection.
      conn.on('request', (accept, reject, name, info) => {
        if (name !== 'tcpip-forward') {
          reject?.();
          return;
        }
        const bind = info as { bindAddr: string; bindPort: number };
        b.seen.push(`tcpip-forward ${bind.bindAddr}:${bind.bindPort}`);
        // Half-close both ways, as vesh's forward relay does (a server channel's end() would close it).
        const l = net.createServer({ allowHalfOpen: true }, (sock) => {
          conn.forwardOut(bind.bindAddr, bind.bindPort, sock.remoteAddress ?? '127.0.0.1', sock.remotePort ?? 0, (err, ch) => {
            if (err) {
              sock.destroy();
              return;
            }
            sock.pipe(ch, { end: false });
            sock.on('end', () => ch.eof());
            ch.pipe(sock);
            sock.on('close', () => ch.close());
          });
        });
        l.on('error', () => reject?.());
        l.listen(bind.bindPort, '127.0.0.1', () => accept?.(bind.bindPort));
        conn.on('close', () => l.close());
      });
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  b.port = (server.address() as net.AddressInfo).port;
  cleanup.add(() => new Promise<void>((r) => {
    for (const c of b.conns) c.end();
    server.close(() => r());
  }));
  return b;
}

/** A TCP server that answers each connection with what it read, upper-cased, once the other side half-closed. */
async function startUpperServer(cleanup: Cleanup): Promise<number> {
  const srv = net.createServer({ allowHalfOpen: true }, (s) => {
    const chunks: Buffer[] = [];
    s.on('data', (d: Buffer) => chunks.push(d));
    s.on('end', () => s.end(Buffer.concat(chunks).toString().toUpperCase()));
    s.on('error', () => undefined);
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  cleanup.add(() => new Promise<void>((r) => srv.close(() => r())));
  return (srv.address() as net.AddressInfo).port;
}

/** Connect, send `text`, half-close, read to the end; "ERR:…" when refused. */
function exchange(target: number | string, text: string): Promise<string> {
  return new Promise((resolve) => {
    const s = typeof target === 'number' ? net.connect({ port: target, host: '127.0.0.1', allowHalfOpen: true }) : net.connect({ path: target, allowHalfOpen: true });
    let out = '';
    s.setTimeout(5_000, () => s.destroy());
    s.on('data', (d: Buffer) => { out += d.toString(); });
    s.on('error', (err: NodeJS.ErrnoException) => resolve(`ERR:${err.code}`));
    s.on('close', () => resolve(out));
    s.end(text);
  });
}

async function poll<T>(what: string, fn: () => Promise<T | null> | T | null, timeoutMs = 10_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== null) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** How A's fake broker answers, by the user the client logs in as. */
type Scenario = 'ok' | 'wrong-host-key' | 'node-down' | 'silent-node' | 'no-pty';

interface SignCall {
  data: Buffer;
  parsed: UserauthBlob | null;
  /** What the real broker would have said (it ends the worker on any of these). */
  violation: string | null;
}

describe('a login carried to the node its VE lives on (remote-link)', () => {
  const cleanup = new Cleanup();
  const logs = new LogCapture('info');
  let aPort: number;
  let b: NodeB;
  let user: ClientKey;
  let nodePriv: KeyObject;
  let nodeLine: { line: string; blob: Buffer };
  let otherHostKey: string;
  let silentPort: number;
  let downPort: number;
  let upperPort: number;
  const signs: SignCall[] = [];
  const sockets = new Set<net.Socket>();

  /** A's broker, as far as one carried connection sees it. */
  const fakeBroker = (scenario: () => Scenario): ConnectionBroker => ({
    keyQuery: async (_user: string, _algo: string, key: Buffer) => key.equals(user.blob),
    publickey: async (p: { user: string; key: Buffer }) => {
      if (!p.key.equals(user.blob)) return { success: false, disconnect: false };
      const grant: AuthGrant = { account: 'alice', ve: 'alice', forwardingRefusal: null, noPty: scenario() === 'no-pty', remote: { node: 'nb' } };
      return { success: true, grant, disconnect: false };
    },
    password: async () => ({ success: false, disconnect: false }),
    failure: async () => false,
    closed: () => undefined,
    clusterConnect: async () => {
      const s = scenario();
      const port = s === 'silent-node' ? silentPort : s === 'node-down' ? downPort : b.port;
      const sock = await new Promise<net.Socket>((resolve, reject) => {
        const c = net.connect(port, '127.0.0.1');
        c.once('connect', () => resolve(c));
        c.once('error', reject);
      }).catch(() => null);
      // What the real broker answers for a node that does not take connections (cluster-ves.ts nodeDown).
      if (!sock) throw new BrokerRefusal('Your environment alice lives on cluster node nb, which is down right now; try again when it is back.');
      const fd = dupFd((sock as unknown as { _handle: { fd: number } })._handle.fd);
      sock.destroy();
      return { fd, node: 'nb', user: VOUCH, nodeKey: nodeLine.line, hostKeys: s === 'wrong-host-key' ? [otherHostKey] : ['ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC0 not-a-key', otherHostKey, b.hostKeyLine] };
    },
    clusterSign: async (data: Buffer) => {
      // The real broker's check (broker-connection.ts clusterSign).
      const parsed = parseUserauthBlob(data);
      const violation = !parsed ? 'not a userauth blob'
        : parsed.user !== VOUCH ? 'another user' : parsed.service !== 'ssh-connection' ? 'another service'
          : parsed.algo !== 'ssh-ed25519' ? 'another algorithm' : !parsed.key.equals(nodeLine.blob) ? 'another key'
            : parsed.sessionId.length < 20 || parsed.sessionId.length > 64 ? 'no session id' : null;
      signs.push({ data: Buffer.from(data), parsed, violation });
      if (violation) throw new Error(`cluster.sign refused: ${violation}`);
      return cryptoSign(null, data, nodePriv);
    },
  }) as unknown as ConnectionBroker;

  /** Which scenario each connection gets: by the user name the client sends, read at authentication. */
  const scenarioOf = new Map<Connection, Scenario>();

  beforeAll(async () => {
    const dir = tempDir(cleanup);
    user = makeClientKey(dir, 'ed25519', 'user');
    const pair = generateKeyPairSync('ed25519');
    nodePriv = pair.privateKey;
    nodeLine = ed25519Line(pair.publicKey);
    const nodeParsed = utils.parseKey(nodeLine.line) as ParsedKey;
    b = await startNodeB(cleanup, nodeParsed);
    otherHostKey = generateKeyPair('ed25519').public;
    upperPort = await startUpperServer(cleanup);
    downPort = await freePort();
    // A node that takes the TCP connection and never says a word.
    const silent = net.createServer((s) => {
      sockets.add(s);
      s.on('error', () => undefined);
      s.resume();
    });
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', () => r()));
    silentPort = (silent.address() as net.AddressInfo).port;
    cleanup.add(() => new Promise<void>((r) => {
      for (const s of sockets) s.destroy();
      silent.close(() => r());
    }));

    const hostKey = generateKeyPair('ed25519');
    let nextId = 1;
    const a = new Server({ hostKeys: [hostKey.private], ident: 'vesh' }, (conn, info) => {
      const id = (nextId++).toString(16).padStart(8, '0');
      conn.on('authentication', (ctx) => {
        const u = ctx.username as Scenario | 'alice';
        if (!scenarioOf.has(conn)) scenarioOf.set(conn, u === 'alice' ? 'ok' : u);
      });
      const socket = (conn as unknown as { _sock: net.Socket })._sock;
      // Ours before SshConnection's: the scenario is set before its handler asks the broker.
      new SshConnection(id, conn, info, socket, { broker: fakeBroker(() => scenarioOf.get(conn) ?? 'ok'), remoteReadyTimeoutMs: 1_500 }, logs.logger.child({ conn: id }));
    });
    await new Promise<void>((r) => a.listen(0, '127.0.0.1', () => r()));
    aPort = (a.address() as net.AddressInfo).port;
    cleanup.add(() => new Promise<void>((r) => a.close(() => r())));
    // A bug in the link that throws in an event handler would surface here, not as a failed assertion.
    const onUncaught = (err: Error) => logs.records.push({ event: 'test.uncaught', err: err.message });
    process.on('uncaughtException', onUncaught);
    cleanup.add(() => { process.off('uncaughtException', onUncaught); });
    cleanup.addCheck(() => expect(logs.events('test.uncaught')).toEqual([]));
  });

  afterAll(() => cleanup.run());

  const ssh = (name: string, command: string[], opts: { input?: string | Buffer; extra?: string[] } = {}): Promise<RunResult> => sshWithKey(aPort, name, user, command, { timeoutMs: 20_000, ...opts });

  /** ssh2's client as the user, logged in to A. */
  const userClient = async (): Promise<InstanceType<typeof Client>> => {
    const c = new Client();
    await new Promise<void>((resolve, reject) => {
      c.once('ready', () => resolve());
      c.once('error', reject);
      c.connect({ host: '127.0.0.1', port: aPort, username: 'alice', privateKey: readFileSync(user.file) });
    });
    cleanup.add(() => { c.end(); });
    return c;
  };

  it('exec: stdout and stderr apart and the exit code; stdin reaches the node to its EOF; env and the node\'s signature are what the broker vouched', async () => {
    const before = signs.length;
    const r = await ssh('alice', ['echo-both out err 3'], { extra: ['-o', 'SetEnv=LANG=C.UTF-8'] });
    expect(r.stderr).toBe('err\n');
    expect(r.stdout).toBe('out\n');
    expect(r.code).toBe(3);
    expect(b.seen).toContain('env LANG=C.UTF-8');
    const ready = await logs.waitFor((e) => e.event === 'cluster.remote_ready');
    expect(ready).toMatchObject({ node: 'nb', ms: expect.any(Number) });
    // One signature per login, over exactly the blob B then verified.
    expect(signs.length).toBe(before + 1);
    const call = signs[before]!;
    expect(call.violation).toBeNull();
    expect(call.parsed).toMatchObject({ user: VOUCH, service: 'ssh-connection', algo: 'ssh-ed25519' });
    expect(call.parsed!.key.equals(nodeLine.blob)).toBe(true);
    expect(b.verified.some((v) => v.equals(call.data))).toBe(true);

    // 300 KB through two SSH windows each way, then EOF: all of it back.
    const input = Buffer.alloc(300_000, 'abcdefghij');
    const cat = await ssh('alice', ['cat'], { input });
    expect(cat.code, cat.stderr).toBe(0);
    expect(cat.stdout.length).toBe(input.length);
    expect(cat.stdout).toBe(input.toString());
    // The client is gone: so is A's connection to B.
    await poll('node B to see no connection left', () => (b.conns.size === 0 ? true : null));
  });

  it('a terminal: term and size reach the node, window changes and signals follow, input echoes, exit 0', async () => {
    const c = await userClient();
    const stream = await new Promise<ClientChannel>((resolve, reject) => c.shell({ term: 'xterm-test', cols: 100, rows: 30 }, (err, s) => (err ? reject(err) : resolve(s))));
    let out = '';
    stream.on('data', (d: Buffer) => { out += d.toString(); });
    const exit = new Promise<unknown[]>((r) => stream.on('exit', (...a: unknown[]) => r(a)));
    await poll('the shell banner', () => (out.includes('shell term=xterm-test cols=100 rows=30') ? true : null));
    stream.setWindow(40, 120, 0, 0);
    await poll('the new size', () => (out.includes('size 120x40') ? true : null));
    stream.signal('INT');
    await poll('the signal', () => (out.includes('signal INT') ? true : null));
    stream.write('hello');
    await poll('the echo', () => (out.includes('hello') ? true : null));
    stream.write('q');
    expect(await exit).toEqual([0]);
    c.end();
  });

  it('exec with a terminal carries it; a no-pty key has it refused here, as a local login would, and the node never gets one', async () => {
    const before = b.seen.filter((x) => x.startsWith('pty ')).length;
    const withPty = await ssh('alice', ['env'], { extra: ['-tt'] });
    expect(withPty.stdout).toMatch(/\|.* \d+x\d+\r?\n$/);
    const ptys = b.seen.filter((x) => x.startsWith('pty ')).length;
    expect(ptys).toBe(before + 1);
    const noPty = await ssh('no-pty', ['env'], { extra: ['-tt'] });
    // OpenSSH ends a forced (-tt) terminal session whose pty-req failed.
    expect(noPty.stderr).toMatch(/PTY allocation request failed/);
    expect(b.seen.filter((x) => x.startsWith('pty ')).length).toBe(ptys);
    const plain = await ssh('no-pty', ['env']);
    expect(plain.code).toBe(0);
    expect(plain.stdout).toMatch(/\|no-pty\n$/);
  });

  it('exit-signal: the name reaches the client; one outside RFC 4254 (which ssh2 throws on) becomes 128+N, and the client still hears the end', async () => {
    const c = await userClient();
    const run = (cmd: string) => new Promise<unknown[]>((resolve, reject) => {
      setTimeout(() => reject(new Error(`${cmd}: no exit within 10 s`)), 10_000).unref();
      c.exec(cmd, (err, s) => {
        if (err) return reject(err);
        s.resume();
        s.stderr.resume();
        s.on('exit', (...a: unknown[]) => resolve(a));
      });
    });
    expect(await run('die TERM')).toEqual([null, 'SIGTERM', false, 'killed']);
    // ssh2 throws on "BUS" (not in its list) when asked to send it: without the check the client is never told the end.
    expect(await run('die BUS')).toEqual([128 + 7]);
    c.end();
  });

  it('a subsystem (what sftp asks for) is carried by name', async () => {
    const r = await ssh('alice', ['-s', 'sftp']);
    expect(r.stdout).toBe('subsystem sftp\n');
    expect(b.seen).toContain('subsystem sftp');
  });

  it('a client opening sessions before the link is up: held up to the session cap, the rest refused at once, the held ones told why when it fails', async () => {
    const c = new Client();
    await new Promise<void>((resolve, reject) => {
      c.once('ready', () => resolve());
      c.once('error', reject);
      c.connect({ host: '127.0.0.1', port: aPort, username: 'silent-node', privateKey: readFileSync(user.file) });
    });
    cleanup.add(() => { c.end(); });
    const events: string[] = [];
    const one = () => new Promise<string>((resolve) => c.exec('echo-both a b 0', (err, s) => {
      if (err) {
        events.push('refused');
        return resolve('refused');
      }
      let text = '';
      s.resume();
      s.stderr.on('data', (d: Buffer) => { text += d.toString(); });
      s.on('close', (code: number) => {
        events.push('told');
        resolve(`${code} ${text}`);
      });
    }));
    // The link to the silent node fails after the ready timeout (1.5 s here); 12 sessions against a cap of 10.
    const results = await Promise.all(Array.from({ length: 12 }, one));
    expect(results.filter((r) => r === 'refused')).toHaveLength(2);
    const told = results.filter((r) => r !== 'refused');
    expect(told).toHaveLength(10);
    for (const t of told) expect(t).toMatch(/^1 vesh: Your environment lives on cluster node nb, which is not answering right now/);
    // The refusals came at once, before the link gave up.
    expect(events.slice(0, 2)).toEqual(['refused', 'refused']);
    c.end();
  });

  it('a VE that writes without end to a client that does not read: the node is held back by the windows, nothing piles up here', async () => {
    const c = await userClient();
    const stream = await new Promise<ClientChannel>((resolve, reject) => c.exec('flood', (err, s) => (err ? reject(err) : resolve(s))));
    // Listened for from the start: ssh2 emits exit as soon as it arrives,
    // and can emit close in the same turn.
    const exited = new Promise<number>((r) => stream.on('exit', (x: number) => r(x)));
    const closed = new Promise((r) => stream.on('close', r));
    stream.pause();
    stream.stderr.resume();
    // Wait until the node can send no more (its count stops moving).
    let last = -1;
    let still = 0;
    await poll('the flood to stall', () => {
      if (b.flooded > 0 && b.flooded === last) still += 1;
      else still = 0;
      last = b.flooded;
      return still >= 5 ? true : null;
    });
    // Windows and stream buffers of 2 MiB each on the way (node → A, A's two streams, A → client, the client's stream): a few of them, not 32 MiB.
    expect(b.flooded).toBeGreaterThan(0);
    expect(b.flooded).toBeLessThan(16 * 1024 * 1024);
    // Reading again: every byte arrives.
    let got = 0;
    stream.on('data', (d: Buffer) => { got += d.length; });
    stream.resume();
    const code = await exited;
    await closed;
    expect(code).toBe(0);
    expect(got).toBe(32 * 1024 * 1024);
    c.end();
  });

  it('-L to a TCP port and to a Unix socket: bytes both ways, EOF in order', async () => {
    const lport = await freePort();
    const dir = tempDir(cleanup);
    const sockPath = path.join(dir, 'upper.sock');
    const upperUnix = net.createServer({ allowHalfOpen: true }, (s) => {
      const chunks: Buffer[] = [];
      s.on('data', (d: Buffer) => chunks.push(d));
      s.on('end', () => s.end(`unix:${Buffer.concat(chunks).toString().toUpperCase()}`));
    });
    await new Promise<void>((r) => upperUnix.listen(sockPath, () => r()));
    cleanup.add(() => new Promise<void>((r) => upperUnix.close(() => r())));
    const localSock = path.join(dir, 'local.sock');
    const child = spawn('ssh', [...sshBaseArgs(aPort), ...keyAuthArgs(user), '-N', '-o', 'ExitOnForwardFailure=yes',
      '-L', `127.0.0.1:${lport}:127.0.0.1:${upperPort}`, '-L', `${localSock}:${sockPath}`, 'alice@127.0.0.1'], { stdio: 'ignore' });
    cleanup.add(() => { child.kill('SIGKILL'); });
    const got = await poll('the -L forward', async () => {
      const r = await exchange(lport, 'ping over -L');
      return r.startsWith('ERR:') ? null : r;
    });
    expect(got).toBe('PING OVER -L');
    const big = 'z'.repeat(200_000);
    expect(await exchange(lport, big)).toBe(big.toUpperCase());
    expect(await exchange(localSock, 'to a socket')).toBe('unix:TO A SOCKET');
    expect(b.seen).toContain(`direct-tcpip 127.0.0.1:${upperPort}`);
    expect(b.seen).toContain(`direct-streamlocal ${sockPath}`);
    child.kill('SIGTERM');
  });

  it('-R: the node listens, and a connection made there comes back through the client', async () => {
    const rport = await freePort();
    const child = spawn('ssh', [...sshBaseArgs(aPort), ...keyAuthArgs(user), '-N', '-o', 'ExitOnForwardFailure=yes',
      '-R', `127.0.0.1:${rport}:127.0.0.1:${upperPort}`, 'alice@127.0.0.1'], { stdio: 'ignore' });
    cleanup.add(() => { child.kill('SIGKILL'); });
    const got = await poll('the -R listener on the node', async () => {
      const r = await exchange(rport, 'back from the node');
      return r.startsWith('ERR:') ? null : r;
    });
    expect(got).toBe('BACK FROM THE NODE');
    expect(b.seen).toContain(`tcpip-forward 127.0.0.1:${rport}`);
    child.kill('SIGTERM');
  });

  it('ssh -A is refused (the node key must never answer an agent), logged once', async () => {
    const c = new Client();
    await new Promise<void>((resolve, reject) => {
      c.once('ready', () => resolve());
      c.once('error', reject);
      c.connect({ host: '127.0.0.1', port: aPort, username: 'alice', privateKey: readFileSync(user.file), agent: '/nonexistent/agent.sock', agentForward: true, authHandler: ['publickey'] });
    });
    cleanup.add(() => { c.end(); });
    const err = await new Promise<Error | undefined>((resolve) => c.exec('echo-both a b 0', (e, s) => {
      if (s) s.resume();
      resolve(e);
    }));
    expect(err?.message).toMatch(/agent forwarding/i);
    await logs.waitFor((e) => e.event === 'agent.refused');
    expect(logs.events('agent.refused')).toHaveLength(1);
    c.end();
  });

  it('a node whose host key the cluster does not list: refused, and the session says why', async () => {
    const before = b.verified.length;
    const r = await ssh('wrong-host-key', ['echo-both out err 0']);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/vesh: Your environment lives on cluster node nb, whose host key is not the one the cluster lists for it/);
    await logs.waitFor((e) => e.event === 'cluster.remote_failed' && /host key/.test(String(e.reason)));
    // Nothing was signed for, or shown to, that node.
    expect(b.verified.length).toBe(before);
  });

  it('a node that is down, or that takes the connection and says nothing: the broker\'s message, or "not answering" within the ready timeout', async () => {
    const down = await ssh('node-down', ['echo-both out err 0']);
    expect(down.code).toBe(1);
    expect(down.stderr).toContain('vesh: Your environment alice lives on cluster node nb, which is down right now; try again when it is back.');
    const silent = await ssh('silent-node', ['echo-both out err 0']);
    expect(silent.code).toBe(1);
    expect(silent.stderr).toMatch(/vesh: Your environment lives on cluster node nb, which is not answering right now/);
    await logs.waitFor((e) => e.event === 'cluster.remote_failed' && /no login within 1\.5 s/.test(String(e.reason)));
    // The link gave up on the silent node's socket.
    await poll('the silent node to see its connection closed', () => ([...sockets].every((s) => s.destroyed || s.readableEnded) ? true : null));
  });

  it('the node ends the connection: the client\'s ends too, and its session is told', async () => {
    const child = spawn('ssh', [...sshBaseArgs(aPort), ...keyAuthArgs(user), 'alice@127.0.0.1', 'hang'], { stdio: ['ignore', 'pipe', 'pipe'] });
    cleanup.add(() => { child.kill('SIGKILL'); });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => { out += d.toString(); });
    child.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    const code = new Promise<number | null>((r) => child.on('close', (c) => r(c)));
    await poll('the command to run on the node', () => (out.includes('hanging') ? true : null));
    for (const c of b.conns) c.end();
    expect(await code).toBe(255);
    expect(err).toContain('vesh: the connection to cluster node nb, where your environment lives, ended.');
    await logs.waitFor((e) => e.event === 'cluster.remote_closed' && e.node === 'nb');
  });
});
