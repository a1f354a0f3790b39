import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { allowedElement, hostTables, replaceTablesScript, type RulesetOptions } from '../../src/net/firewall.js';
import { canonicalCidr, macForAddress } from '../../src/net/ipv4.js';
import { parseServerConfig } from '../../src/config/server-config.js';

const base: RulesetOptions = {
  table: 'vesh_unit0',
  bridge: 'vunit0',
  subnet: '10.88.0.0/16',
  subnetSize: 65536,
  vethPrefix: 'vunit0',
  outbound: false,
  outboundAllow: [],
  nameServers: [],
  maxConnectionsPerVe: 4096,
};

/** nft's own check (-c: parsed and validated by the kernel, nothing applied). */
function nftAccepts(script: string): void {
  execFileSync('nft', ['-c', '-f', '-'], { input: script, stdio: ['pipe', 'pipe', 'pipe'] });
}

describe('network identity and firewall rules', () => {
  it('derives a locally administered unicast MAC from a VE address, one per address', () => {
    expect(macForAddress('10.88.0.5')).toBe('02:56:0a:58:00:05');
    expect(macForAddress('10.88.1.5')).not.toBe(macForAddress('10.88.0.5'));
    expect(parseInt(macForAddress('192.168.255.254').slice(0, 2), 16) & 0b11).toBe(0b10);
  });

  it('canonicalises allow-list CIDRs and refuses what is not one', () => {
    expect(canonicalCidr('10.20.3.4/16', 'x')).toBe('10.20.0.0/16');
    expect(canonicalCidr('0.0.0.0/0', 'x')).toBe('0.0.0.0/0');
    expect(() => canonicalCidr('10.20.0.0/33', 'x')).toThrow(/IPv4 CIDR/);
    expect(() => canonicalCidr('fd00::/8', 'x')).toThrow(/IPv4 CIDR/);
  });

  it('declares rulesets nft accepts, with outbound off and on (allow-list, name servers, connection cap) and the set filled', () => {
    const fill = [`add element bridge ${base.table} allowed ${allowedElement('vunit02', macForAddress('10.88.0.2'), '10.88.0.2')}`];
    nftAccepts(replaceTablesScript(hostTables(base), fill));
    nftAccepts(replaceTablesScript(hostTables({ ...base, outbound: true, outboundAllow: ['172.31.0.0/16', '172.31.5.0/24'], nameServers: ['10.255.255.53'], maxConnectionsPerVe: 100 }), fill));
    nftAccepts(replaceTablesScript(hostTables({ ...base, outbound: true }), fill));
  });

  it('pins port, MAC and address together and allows only untagged ARP and IPv4 from a VE port', () => {
    const bridge = hostTables(base).find((t) => t.family === 'bridge')!.text;
    expect(bridge).toContain('type ifname . ether_addr . ipv4_addr');
    expect(bridge).toMatch(/iifname \. ether saddr \. arp saddr ip @allowed iifname \. arp saddr ether \. arp saddr ip @allowed accept/);
    expect(bridge).toMatch(/ether type ip iifname \. ether saddr \. ip saddr @allowed accept/);
    expect(bridge).toMatch(/counter drop\n\s*\}/);
    expect(bridge).toContain('hook input');
  });

  it('blocks link-local and private ranges only with outbound on, and names the allow-list and cap', () => {
    const off = hostTables(base).find((t) => t.family === 'inet')!.text;
    expect(off).not.toContain('169.254.0.0/16');
    const on = hostTables({ ...base, outbound: true, outboundAllow: ['172.31.5.0/24'], maxConnectionsPerVe: 77 }).find((t) => t.family === 'inet')!;
    expect(on.text).toContain('169.254.0.0/16');
    expect(on.text).toContain('172.31.5.0/24');
    expect(on.text).toContain('ct count over 77');
    // A changed allow-list or cap is another ruleset: the table is replaced, not kept.
    const other = hostTables({ ...base, outbound: true, outboundAllow: [], maxConnectionsPerVe: 77 }).find((t) => t.family === 'inet')!;
    expect(other.comment).not.toBe(on.comment);
  });

  it('reads network.outboundAllow and network.maxConnectionsPerVe from vesh.yaml, with defaults, and refuses bad values', () => {
    const cfg = (network: string) => parseServerConfig('/tmp/vesh.yaml', `network: ${network}\n`).network;
    expect(cfg('{}')).toMatchObject({ outboundAllow: [], maxConnectionsPerVe: 4096 });
    expect(cfg('{ outboundAllow: [10.20.0.0/16], maxConnectionsPerVe: 100 }')).toMatchObject({ outboundAllow: ['10.20.0.0/16'], maxConnectionsPerVe: 100 });
    expect(() => cfg('{ outboundAllow: [10.20.0.0/40] }')).toThrow(/outboundAllow/);
    expect(() => cfg('{ outboundAllow: [300.1.1.1/8] }')).toThrow(/outboundAllow/);
    expect(() => cfg('{ maxConnectionsPerVe: 3 }')).toThrow(/maxConnectionsPerVe/);
  });
});
