import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, type VeTestEnv } from '../helpers/ve-env.js';
import { MSG, ScriptedClient, kexInit } from '../helpers/kex-script.js';
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
async function crossingKexinit(port: number): Promise<void> {
  const c = await ScriptedClient.connect(port);
  try {
    await c.readIdent();
    const theirs = await c.readPacket('KEXINIT');
    if (theirs[0] !== MSG.KEXINIT) throw new Error(`the server's first packet is type ${theirs[0]}, not KEXINIT`);
    c.send(kexInit(['curve25519-sha256'], ['ssh-ed25519'], false));
    await new Promise((resolve) => setTimeout(resolve, 150));
  } finally {
    c.close();
  }
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
