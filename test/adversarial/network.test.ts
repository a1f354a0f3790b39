import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createSocket } from 'node:dgram';
import { promises as fs } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import { Cleanup } from '../helpers/ssh-harness.js';
import { parseServerConfig } from '../../src/config/server-config.js';
import { createVeManager, createVeNetwork } from '../../src/ve/index.js';
import { buildAttack, plantAttack } from './kit.js';

/**
 * The network a hostile VE root sees (review H5, H6, M6, L6; issue 9 point
 * 5). VE root has CAP_NET_RAW and CAP_NET_ADMIN in its own network: it
 * writes raw frames on its eth0 (attacks/net-frames.c), changes its MAC,
 * and opens connections (attacks/net-connect.c). Each test checks what the
 * host sees: its neighbour and bridge FDB entries, counters in nft tables the
 * test adds behind vesh's own (bridge prerouting after vesh's filter, the
 * host's IPv4/IPv6/ARP input before vesh's input filter), and whether the
 * host still reaches the victim VE b.
 *
 * With network.outbound on, "outside" is a network namespace this test makes:
 * a veth from the host, the metadata address 169.254.169.254 and two private
 * addresses on its side, and a policy-routing rule that sends only traffic
 * arriving from this instance's bridge to those /32s. No packet leaves the
 * machine, even on code without the guard.
 */

const CAP = 20;
const MAGIC_PORT = 47123;
const SINK_PORT = 8081;

function run(cmd: string, args: string[], input?: string): string {
  return execFileSync(cmd, args, { encoding: 'utf8', input, stdio: ['pipe', 'pipe', 'pipe'] });
}

// ----------------------------------------------------------------- frames

const hex = (bytes: number[]) => bytes.map((b) => b.toString(16).padStart(2, '0')).join('');
const macBytes = (mac: string) => mac.split(':').map((h) => parseInt(h, 16));
const ipBytes = (ip: string) => ip.split('.').map(Number);

/** Ethernet header, with an 802.1Q tag when `vlan` is a number (0 = priority tag). */
function ethernet(dst: string, src: string, type: number, vlan: number | null): number[] {
  const tag = vlan === null ? [] : [0x81, 0x00, (vlan >> 8) & 0x0f, vlan & 0xff];
  return [...macBytes(dst), ...macBytes(src), ...tag, type >> 8, type & 0xff];
}

function pad(frame: number[]): string {
  while (frame.length < 60) frame.push(0);
  return hex(frame);
}

function arpFrame(o: { vlan: number | null; op: 1 | 2; ethSrc: string; ethDst: string; senderMac: string; senderIp: string; targetMac: string; targetIp: string }): string {
  return pad([
    ...ethernet(o.ethDst, o.ethSrc, 0x0806, o.vlan),
    0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, o.op,
    ...macBytes(o.senderMac), ...ipBytes(o.senderIp), ...macBytes(o.targetMac), ...ipBytes(o.targetIp),
  ]);
}

function checksum(bytes: number[]): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i += 2) sum += (bytes[i]! << 8) + (bytes[i + 1] ?? 0);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

function udp4Frame(o: { vlan: number | null; ethSrc: string; ethDst: string; src: string; dst: string; dport: number }): string {
  const payload = [...Buffer.from('spoofed')];
  const udp = [0x9c, 0x40, o.dport >> 8, o.dport & 0xff, 0, 8 + payload.length, 0, 0, ...payload];
  const ip = [0x45, 0, 0, 20 + udp.length, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, ...ipBytes(o.src), ...ipBytes(o.dst)];
  const c = checksum(ip);
  ip[10] = c >> 8;
  ip[11] = c & 0xff;
  return pad([...ethernet(o.ethDst, o.ethSrc, 0x0800, o.vlan), ...ip, ...udp]);
}

/** IPv6 UDP from a link-local address to all nodes (ff02::1), checksum included. */
function udp6Frame(o: { vlan: number | null; ethSrc: string; dport: number }): string {
  const src = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe, 0, 0, 1];
  const dst = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
  const payload = [...Buffer.from('spoofed6')];
  const len = 8 + payload.length;
  const udp = [0x9c, 0x40, o.dport >> 8, o.dport & 0xff, 0, len, 0, 0, ...payload];
  const c = checksum([...src, ...dst, 0, 0, 0, len, 0, 0, 0, 17, ...udp]);
  udp[6] = c >> 8;
  udp[7] = c & 0xff;
  const ip6 = [0x60, 0, 0, 0, 0, len, 17, 255, ...src, ...dst];
  return pad([...ethernet('33:33:00:00:00:01', o.ethSrc, 0x86dd, o.vlan), ...ip6, ...udp]);
}

// ------------------------------------------------------------------- test

interface Ve {
  name: string;
  address: string;
  veth: string;
  /** The MAC its eth0 has (vesh's pinned one on the fixed code). */
  mac: string;
}

describe('network: a VE sends only its own untagged IPv4 and ARP, and reaches only what it may (busybox template, real runc)', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  let bridge: string;
  let gateway: string;
  let bridgeMac: string;
  let a: Ve;
  let b: Ve;
  const tag = randomBytes(2).toString('hex');
  const obs = `vesh_obs_${tag}`;
  // "Outside": 172.31.R.0/24 is private, so blocked by default; .10 stays blocked, .20 goes in network.outboundAllow.
  const r = Math.floor(Math.random() * 250);
  const outside = { ns: `vtns${tag}`, hostVeth: `vto${tag}`, hostAddr: `172.31.${r}.1`, blocked: `172.31.${r}.10`, allowed: `172.31.${r}.20`, metadata: '169.254.169.254', table: 20000 + Math.floor(Math.random() * 10000) };
  let ipForward = '';

  const sh = (ve: string, script: string, allowFailure = false) => shInVe(env, ve, script, { allowFailure });
  const counter = (family: string, name: string) => Number(/packets (\d+)/.exec(run('nft', ['list', 'counter', family, obs, name]))?.[1] ?? NaN);
  const neighMac = (ip: string) => /lladdr (\S+)/.exec(run('ip', ['neigh', 'show', ip, 'dev', bridge]))?.[1] ?? null;
  const fdbOn = (port: string) => run('bridge', ['fdb', 'show', 'br', bridge]).split('\n').filter((l) => l.includes(` dev ${port} `));
  const httpGet = (ip: string) => fetch(`http://${ip}:8080/`, { signal: AbortSignal.timeout(4000) }).then((res) => res.text(), () => null);
  const frames = (ve: Ve, count: number, frame: string, random = false) =>
    sh(ve.name, `/usr/local/bin/net-frames eth0 ${count} ${frame}${random ? ' random-src' : ''}`);
  /** The VE's connections to ADDR:SINK_PORT: how many got through and what the far end said. */
  const connect = async (ve: Ve, addr: string, count = 1, timeoutMs = 3000) => {
    const out = (await sh(ve.name, `/usr/local/bin/net-connect ${addr} ${SINK_PORT} ${count} ${timeoutMs} 0`)).stdout;
    return { connected: Number(/connected (\d+)/.exec(out)?.[1] ?? NaN), banner: /banner (.*)/.exec(out)?.[1] ?? null };
  };

  beforeAll(async () => {
    ipForward = await fs.readFile('/proc/sys/net/ipv4/ip_forward', 'utf8');
    cleanup.add(() => fs.writeFile('/proc/sys/net/ipv4/ip_forward', ipForward));
    const base = await makeVeTestEnv({ template: 'busybox' });
    cleanup.add(() => base.cleanup());
    // Outbound on, one private address allowed, a small connection cap.
    const yaml = (await fs.readFile(base.configFile, 'utf8')).replace('outbound: false }', `outbound: true, outboundAllow: [${outside.allowed}/32], maxConnectionsPerVe: ${CAP} }`);
    await fs.writeFile(base.configFile, yaml);
    const config = parseServerConfig(base.configFile, yaml);
    env = { ...base, config, ves: createVeManager(config, base.logger) };
    bridge = config.network.bridge;
    const net = createVeNetwork(config, base.layout, base.logger);

    // The outside namespace, reachable only from this instance's bridge.
    cleanup.add(() => { spawnSync('ip', ['netns', 'del', outside.ns]); });
    cleanup.add(() => { spawnSync('ip', ['link', 'del', outside.hostVeth]); });
    run('ip', ['netns', 'add', outside.ns]);
    run('ip', ['link', 'add', outside.hostVeth, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', outside.ns]);
    run('ip', ['addr', 'add', `${outside.hostAddr}/32`, 'dev', outside.hostVeth]);
    run('ip', ['link', 'set', outside.hostVeth, 'up']);
    run('ip', ['-n', outside.ns, 'link', 'set', 'lo', 'up']);
    run('ip', ['-n', outside.ns, 'link', 'set', 'eth0', 'up']);
    for (const addr of [outside.metadata, outside.blocked, outside.allowed]) {
      run('ip', ['-n', outside.ns, 'addr', 'add', `${addr}/32`, 'dev', 'eth0']);
      run('ip', ['route', 'add', `${addr}/32`, 'dev', outside.hostVeth, 'table', String(outside.table)]);
    }
    run('ip', ['-n', outside.ns, 'route', 'add', `${outside.hostAddr}/32`, 'dev', 'eth0']);
    cleanup.add(() => { spawnSync('ip', ['route', 'flush', 'table', String(outside.table)]); });
    cleanup.add(() => { spawnSync('ip', ['rule', 'del', 'iif', bridge, 'lookup', String(outside.table)]); });
    run('ip', ['rule', 'add', 'iif', bridge, 'lookup', String(outside.table)]);
    const sink = spawn('ip', ['netns', 'exec', outside.ns, buildAttack('net-sink'), String(SINK_PORT), '900'], { stdio: ['ignore', 'pipe', 'inherit'] });
    cleanup.add(() => { sink.kill('SIGKILL'); });
    await new Promise<void>((resolve, reject) => {
      sink.stdout.once('data', () => resolve());
      sink.once('exit', (code) => reject(new Error(`net-sink exited ${String(code)}`)));
    });

    const start = async (name: string): Promise<Ve> => {
      await env.ves.create(name);
      await env.ves.start(name);
      const { address } = await env.ves.status(name);
      await plantAttack(env, name, 'net-frames');
      await plantAttack(env, name, 'net-connect');
      await sh(name, `mkdir -p /www && echo ${name}-ve > /www/index.html && httpd -p 8080 -h /www`);
      const mac = (await sh(name, 'cat /sys/class/net/eth0/address')).stdout.trim();
      return { name, address, veth: net.vethNameFor(address), mac };
    };
    a = await start('a');
    b = await start('b');
    gateway = env.config.network.subnet.replace(/\.0\/24$/, '.1');
    bridgeMac = (await fs.readFile(`/sys/class/net/${bridge}/address`, 'utf8')).trim();

    // Observers behind vesh's own rules: what got past the bridge filter
    // from a's port, and what reached the host's IPv4, IPv6 and ARP input.
    cleanup.add(() => {
      for (const family of ['bridge', 'inet', 'arp']) spawnSync('nft', ['delete', 'table', family, obs]);
    });
    run('nft', ['-f', '-'], `
table bridge ${obs} {
  counter tagged {}
  counter ipv6 {}
  counter foreign_mac {}
  counter foreign_ip {}
  chain seen {
    type filter hook prerouting priority 100; policy accept;
    iifname "${a.veth}" ether type { vlan, 0x88a8 } counter name tagged
    iifname "${a.veth}" ether type ip6 counter name ipv6
    iifname "${a.veth}" ether saddr != ${a.mac} counter name foreign_mac
    iifname "${a.veth}" ether type ip ip saddr != ${a.address} counter name foreign_ip
  }
}
table inet ${obs} {
  counter spoofed4 {}
  counter any6 {}
  chain seen {
    type filter hook prerouting priority -300; policy accept;
    iifname "${bridge}" meta nfproto ipv4 udp dport ${MAGIC_PORT} ip saddr != ${a.address} counter name spoofed4
    iifname "${bridge}" meta nfproto ipv6 udp dport ${MAGIC_PORT} counter name any6
  }
}
table arp ${obs} {
  counter claims_b {}
  chain seen {
    type filter hook input priority -300; policy accept;
    arp saddr ip ${b.address} arp saddr ether != ${b.mac} counter name claims_b
  }
}
`);
  }, 300_000);

  afterAll(async () => {
    await cleanup.run();
  });

  it('gives each VE a fixed MAC the host pins: static FDB entry on its port, permanent neighbour entry, no learning', async () => {
    for (const ve of [a, b]) {
      expect(ve.mac).toMatch(/^02:56:/);
      expect(fdbOn(ve.veth).some((l) => l.startsWith(`${ve.mac} `) && / static/.test(l))).toBe(true);
      expect(run('ip', ['neigh', 'show', ve.address, 'dev', bridge])).toMatch(new RegExp(`lladdr ${ve.mac} PERMANENT`));
      expect(run('bridge', ['-d', 'link', 'show', 'dev', ve.veth])).toMatch(/learning off .*isolated on/);
    }
  });

  it('drops a VE\'s traffic once it changes its own MAC: the host neither learns the new MAC nor sends a\'s traffic there; vesh\'s MAC back, a is reachable again', async () => {
    const other = '02:00:00:c0:ff:ee';
    expect(await httpGet(a.address)).toBe('a-ve\n');
    try {
      // VE root takes another MAC and makes itself heard from it (ARP to the gateway).
      await sh(a.name, `ip link set eth0 address ${other} && arping -c 2 -w 3 -I eth0 ${gateway}`, true);
      expect(run('bridge', ['fdb', 'show', 'br', bridge])).not.toContain(other);
      expect(neighMac(a.address)).toBe(a.mac);
      expect(await httpGet(a.address)).toBeNull();
    } finally {
      await sh(a.name, `ip link set eth0 address ${a.mac}; arping -c 1 -w 2 -I eth0 ${gateway}`, true);
    }
    await waitFor('a to answer the host again', async () => (await httpGet(a.address)) === 'a-ve\n', 20_000);
  });

  it('keeps a\'s VLAN-tagged ARP (VID 0 and 5) claiming b\'s address from the host: b\'s neighbour entry stays, the host still reaches b', async () => {
    expect(await httpGet(b.address)).toBe('b-ve\n');
    expect(neighMac(b.address)).toBe(b.mac);
    for (const vlan of [0, 5]) {
      for (const op of [1, 2] as const) {
        // "b's address is at a's MAC", as a request to the gateway and as a reply.
        await frames(a, 3, arpFrame({ vlan, op, ethSrc: a.mac, ethDst: op === 1 ? 'ff:ff:ff:ff:ff:ff' : bridgeMac, senderMac: a.mac, senderIp: b.address, targetMac: op === 1 ? '00:00:00:00:00:00' : bridgeMac, targetIp: gateway }));
      }
    }
    expect(neighMac(b.address)).toBe(b.mac);
    expect(await httpGet(b.address)).toBe('b-ve\n');
    expect(counter('arp', 'claims_b')).toBe(0);
    expect(counter('bridge', 'tagged')).toBe(0);
  });

  it('drops a\'s untagged ARP with another sender address or MAC: the bridge still sends b\'s MAC to b\'s port, the host still reaches b', async () => {
    // b's address with a's MAC; and b's MAC (Ethernet and ARP sender) with a's own address, which would move b's FDB entry to a's port.
    await frames(a, 3, arpFrame({ vlan: null, op: 1, ethSrc: a.mac, ethDst: 'ff:ff:ff:ff:ff:ff', senderMac: a.mac, senderIp: b.address, targetMac: '00:00:00:00:00:00', targetIp: gateway }));
    await frames(a, 3, arpFrame({ vlan: null, op: 1, ethSrc: b.mac, ethDst: 'ff:ff:ff:ff:ff:ff', senderMac: b.mac, senderIp: a.address, targetMac: '00:00:00:00:00:00', targetIp: gateway }));
    await frames(a, 3, arpFrame({ vlan: null, op: 2, ethSrc: a.mac, ethDst: bridgeMac, senderMac: b.mac, senderIp: a.address, targetMac: bridgeMac, targetIp: gateway }));
    expect(fdbOn(a.veth).some((l) => l.startsWith(`${b.mac} `))).toBe(false);
    expect(await httpGet(b.address)).toBe('b-ve\n');
    expect(neighMac(b.address)).toBe(b.mac);
    expect(neighMac(a.address)).toBe(a.mac);
    expect(counter('arp', 'claims_b')).toBe(0);
    expect(counter('bridge', 'foreign_mac')).toBe(0);
  });

  it('learns nothing from a MAC flood: 5000 random source MACs leave the bridge\'s FDB for a\'s port as it was', async () => {
    const before = fdbOn(a.veth).length;
    const sent = await frames(a, 5000, hex([...ethernet('ff:ff:ff:ff:ff:ff', a.mac, 0x88b5, null), ...Buffer.from('flood')]).padEnd(120, '0'), true);
    expect(sent.stdout).toContain('sent 5000');
    expect(fdbOn(a.veth).length).toBeLessThanOrEqual(before);
    expect(run('bridge', ['fdb', 'show', 'br', bridge]).split('\n').length).toBeLessThan(50);
    expect(counter('bridge', 'foreign_mac')).toBe(0);
    expect(await httpGet(b.address)).toBe('b-ve\n');
  });

  it('drops IPv4 from another source address and all IPv6, tagged (VID 0) or not: none of it reaches the host', async () => {
    for (const vlan of [null, 0]) {
      await frames(a, 5, udp4Frame({ vlan, ethSrc: a.mac, ethDst: bridgeMac, src: b.address, dst: gateway, dport: MAGIC_PORT }));
      await frames(a, 5, udp6Frame({ vlan, ethSrc: a.mac, dport: MAGIC_PORT }));
    }
    expect(counter('inet', 'spoofed4')).toBe(0);
    expect(counter('inet', 'any6')).toBe(0);
    expect(counter('bridge', 'tagged')).toBe(0);
    expect(counter('bridge', 'ipv6')).toBe(0);
    expect(counter('bridge', 'foreign_ip')).toBe(0);
  });

  it('keeps a VE off host services through frames to the 802.1D link-local group addresses, which a bridge hands to the port\'s own stack', async () => {
    // A host service on the gateway address, which VEs must not reach (only replies to the host's own connections pass).
    const port = MAGIC_PORT + 1;
    const got: string[] = [];
    const server = createSocket('udp4');
    server.on('message', (m) => got.push(m.toString()));
    await new Promise<void>((resolve) => server.bind(port, gateway, resolve));
    try {
      // Control: the service answers the host itself.
      const local = createSocket('udp4');
      await new Promise<void>((resolve) => local.send('control', port, gateway, () => resolve()));
      local.close();
      await waitFor('the control datagram', async () => got.includes('control'), 5000);
      // The bridge does not forward 01:80:c2:00:00:0X (STP, LACP, LLDP…): it passes them to the
      // receiving port's own stack, where the host's input filter for the bridge does not apply.
      for (const dst of ['01:80:c2:00:00:02', '01:80:c2:00:00:03', '01:80:c2:00:00:0e']) {
        await frames(a, 3, udp4Frame({ vlan: null, ethSrc: a.mac, ethDst: dst, src: a.address, dst: gateway, dport: port }));
      }
      await new Promise((resolve) => setTimeout(resolve, 1500));
      expect(got.filter((m) => m === 'spoofed')).toEqual([]);
    } finally {
      server.close();
    }
  });

  it('does not tell a VE the host\'s other addresses: ARP for an address the host holds off the bridge gets no answer', async () => {
    // Control: the gateway answers.
    expect((await sh(a.name, `arping -c 2 -w 3 -I eth0 ${gateway}`, true)).code).toBe(0);
    const r = await sh(a.name, `arping -c 2 -w 3 -I eth0 ${outside.hostAddr}`, true);
    expect(r.code).not.toBe(0);
  });

  it('with outbound on, keeps a VE off cloud metadata (169.254.169.254), private ranges and the host\'s own addresses, but reaches an outboundAllow entry', async () => {
    // Control first: the allowed private address answers, so the path works.
    expect(await connect(a, outside.allowed)).toEqual({ connected: 1, banner: `sink ${outside.allowed}` });
    expect((await connect(a, outside.metadata)).connected).toBe(0);
    expect((await connect(a, outside.blocked)).connected).toBe(0);
    expect((await connect(a, outside.hostAddr)).connected).toBe(0);
  });

  it(`caps the connections one VE holds through the host at network.maxConnectionsPerVe (${CAP}); another VE still connects`, async () => {
    // a holds as many as it can get for a while, in the background.
    await sh(a.name, `/usr/local/bin/net-connect ${outside.allowed} ${SINK_PORT} ${CAP * 2} 4000 30000 > /tmp/flood.out 2>&1 &`);
    let held = NaN;
    await waitFor('a\'s connections to settle', async () => {
      const m = /connected (\d+)/.exec((await sh(a.name, 'cat /tmp/flood.out', true)).stdout);
      held = Number(m?.[1] ?? NaN);
      return m !== null;
    }, 20_000);
    expect(held).toBeLessThanOrEqual(CAP);
    expect(held).toBeGreaterThanOrEqual(CAP / 2);
    expect((await connect(b, outside.allowed, 5)).connected).toBe(5);
    await sh(a.name, 'pkill net-connect || killall net-connect', true);
  });
});
