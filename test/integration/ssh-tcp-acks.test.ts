import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, type VeTestEnv } from '../helpers/ve-env.js';
import { Cleanup, startVeshServe, writeAccounts, type ServeProcess } from '../helpers/ssh-harness.js';

/**
 * A client that leaves Nagle on (OpenSSH's `ssh host cmd` without a
 * terminal, ssh2's client) holds its next small packet until its last one
 * is ACKed. When a client's KEXINIT crosses ours, the server has no reply
 * to it, and an ACK left to Linux's delayed-ACK timer kept the client's
 * KEXECDH_INIT waiting ~40 ms: about 40% of `ssh host true` logins here
 * took 60 ms instead of 20. The worker ACKs every short read at once
 * (TCP_QUICKACK). The kernel counts each ACK its delayed-ACK timer sends
 * (TcpExt DelayedACKs, per network namespace); this file makes the crossing
 * happen every time and counts them. Without the quick ACK: one per
 * handshake (9 and 10 of 10 here), with it none.
 */
describe('vesh serve: no delayed ACK for a login packet', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let serve: ServeProcess;

  beforeAll(async () => {
    // The handshakes here never log in: each would count as a failure of
    // 127.0.0.1 ("noauth") towards a penalty.
    env = await makeVeTestEnv({ template: 'debian', extraYaml: 'auth: { penalties: { sourceFailuresBeforePenalty: 1000 } }' });
    cleanup.add(() => env.cleanup());
    writeAccounts(env.config.accountsFile, '# no accounts: the handshakes below stop at the key exchange\n');
    serve = await startVeshServe(cleanup, env.configFile);
  });

  afterAll(async () => {
    await cleanup.run();
  });

  it('ACKs a client KEXINIT that crossed ours at once', async () => {
    const before = tcpExtCounter('DelayedACKs');
    for (let i = 0; i < 10; i++) await crossingKexinit(serve.port);
    // Nothing else on this host talks TCP in this namespace meanwhile but
    // the test's own sockets; a stray delayed ACK of another socket must
    // not fail the test, ten of ours must.
    expect(tcpExtCounter('DelayedACKs') - before).toBeLessThanOrEqual(3);
  });
});

/**
 * One connection: our identification, then, once the server's KEXINIT has
 * arrived in full (so that the server has nothing left to send), our
 * KEXINIT, and 150 ms for a delayed-ACK timer (40–200 ms) to fire.
 */
function crossingKexinit(port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1');
    let buf = Buffer.alloc(0);
    let sent = false;
    const fail = (err: Error) => {
      s.destroy();
      reject(err);
    };
    s.on('error', fail);
    s.on('close', () => {
      if (!sent) reject(new Error(`the server closed before its KEXINIT (got ${JSON.stringify(buf.toString('latin1').slice(0, 80))})`));
    });
    s.on('connect', () => s.write('SSH-2.0-OpenSSH_9.2p1 vesh-test\r\n'));
    s.on('data', (d: Buffer) => {
      if (sent) return;
      buf = Buffer.concat([buf, d]);
      const eol = buf.indexOf('\r\n');
      if (eol < 0) return;
      const packet = buf.subarray(eol + 2);
      if (packet.length < 6 || packet.length < 4 + packet.readUInt32BE(0)) return;
      if (packet[5] !== 20) return fail(new Error(`the server's first packet is type ${packet[5]}, not KEXINIT`));
      sent = true;
      s.write(clientKexinit());
      setTimeout(() => {
        s.destroy();
        resolve();
      }, 150);
    });
  });
}

/** An unencrypted SSH_MSG_KEXINIT packet (RFC 4253 §7.1) with padding. */
function clientKexinit(): Buffer {
  const nameList = (s: string) => {
    const b = Buffer.from(s);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(b.length);
    return Buffer.concat([len, b]);
  };
  const lists = ['curve25519-sha256', 'ssh-ed25519', 'aes128-ctr', 'aes128-ctr', 'hmac-sha2-256', 'hmac-sha2-256', 'none', 'none', '', ''];
  const payload = Buffer.concat([Buffer.from([20]), randomBytes(16), ...lists.map(nameList), Buffer.from([0, 0, 0, 0, 0])]);
  let padding = 8 - ((5 + payload.length) % 8);
  if (padding < 4) padding += 8;
  const head = Buffer.alloc(5);
  head.writeUInt32BE(1 + payload.length + padding);
  head[4] = padding;
  return Buffer.concat([head, payload, Buffer.alloc(padding)]);
}

/** A TcpExt counter of this network namespace, from /proc/net/netstat (a names line, then a values line). */
function tcpExtCounter(name: string): number {
  const lines = readFileSync('/proc/net/netstat', 'utf8').split('\n').filter((l) => l.startsWith('TcpExt:'));
  const names = lines[0]!.split(/\s+/);
  const values = lines[1]!.split(/\s+/);
  const i = names.indexOf(name);
  if (i < 1) throw new Error(`/proc/net/netstat has no TcpExt ${name}`);
  return Number(values[i]);
}
