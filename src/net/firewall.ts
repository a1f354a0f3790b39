import { createHash } from 'node:crypto';

/** nftables table name of one vesh instance (one per dataDir). */
export function tableName(instanceId: string): string {
  return `vesh_${instanceId}`;
}

/** The bridge table's set of (port, MAC, address) triples a VE may send from. */
export const ALLOWED_SET = 'allowed';

/** One element of ALLOWED_SET, in nft syntax: the VE's host-side veth, the MAC vesh gave its eth0, and its address. */
export function allowedElement(hostVeth: string, mac: string, address: string): string {
  return `{ "${hostVeth}" . ${mac} . ${address} }`;
}

/**
 * Destinations a VE may not reach even with network.outbound on, unless
 * network.outboundAllow names them: the places a host's own credentials and
 * neighbours live, and addresses that are not the internet. Link-local holds
 * cloud metadata services (169.254.169.254); RFC 1918, CGNAT and the
 * benchmark range hold the host's LAN, other bridges (docker0) and VPC
 * internals; the rest is this host (0/8, 127/8), IETF protocol space,
 * documentation ranges, multicast and the reserved/broadcast block.
 */
export const OUTBOUND_BLOCKED: readonly string[] = [
  '0.0.0.0/8', '10.0.0.0/8', '100.64.0.0/10', '127.0.0.0/8', '169.254.0.0/16', '172.16.0.0/12',
  '192.0.0.0/24', '192.0.2.0/24', '192.168.0.0/16', '198.18.0.0/15', '198.51.100.0/24', '203.0.113.0/24',
  '224.0.0.0/3',
];

export interface RulesetOptions {
  table: string;
  bridge: string;
  subnet: string;
  /** Addresses in the subnet: the size of the per-VE connection-count set. */
  subnetSize: number;
  /** Every host-side veth of this instance starts with it. */
  vethPrefix: string;
  outbound: boolean;
  /** CIDRs VEs may reach with outbound on although OUTBOUND_BLOCKED covers them. */
  outboundAllow: readonly string[];
  /** The host's name servers (IPv4): with outbound on, VEs may reach them on port 53 even in a blocked range. */
  nameServers: readonly string[];
  /** Connections (conntrack entries) one VE address may hold through the host at once. */
  maxConnectionsPerVe: number;
}

/** One table of an instance's ruleset, as vesh declares it. */
export interface HostTable {
  family: 'bridge' | 'inet';
  name: string;
  /**
   * The table's comment: what it enforces and a hash of its rules. A table
   * on the host whose comment differs was made from another configuration
   * (network.outbound flipped, another bridge or subnet) or by another
   * version of vesh, and is replaced.
   */
  comment: string;
  /** The full `table … { … }` declaration, comment included. */
  text: string;
}

function elements(list: readonly string[]): string {
  return list.length > 0 ? ` elements = { ${list.join(', ')} };` : '';
}

/**
 * Two tables per instance.
 *
 * `bridge` checks every frame as it enters the bridge from a VE's veth, before
 * the bridge learns from it: it passes only untagged ARP (Ethernet/IPv4 form)
 * and IPv4 whose Ethernet source, ARP sender MAC and sender/source address are
 * the VE's own (set `allowed`: port . MAC . address, one element per VE).
 * Everything else is dropped: another address or MAC, IPv6 (vesh gives VEs no
 * IPv6 address), 802.1Q/802.1ad-tagged frames (nft's `ether type` reads the
 * tag's type, so a tag — even VID 0, which the host treats as untagged —
 * never matches the allow-list) and unknown ether types, which would
 * otherwise be learned (MAC flooding). Frames to the IEEE 802.1D link-local
 * group (01:80:c2:00:00:0X) are dropped whatever they carry: the bridge does
 * not forward most of them but hands them, past the prerouting hook, to the
 * receiving port's own stack, where the host's filters for the bridge do not
 * apply (an IPv4 datagram sent that way reached a host service on the
 * gateway address); the `input` hook catches them. Nothing passes from one
 * VE's port to another's (port isolation; the net hook also marks each port
 * isolated).
 *
 * `inet` keeps VEs off the host's own services and, unless outbound is on,
 * off every other network; anything that arrives on a VE port's own device
 * rather than through the bridge is dropped too (a second line behind the
 * link-local rule above). With outbound on, a VE's new connections may go
 * to the internet but not to OUTBOUND_BLOCKED (unless outboundAllow names the
 * destination, or it is a host name server on port 53), and each VE address
 * may hold at most maxConnectionsPerVe tracked connections, so one VE cannot
 * fill the host's conntrack table (new flows of every VE and the host are
 * dropped when it is full).
 */
export function hostTables(o: RulesetOptions): HostTable[] {
  const ves = `"${o.vethPrefix}*"`;
  const bridgeBody = `
  set ${ALLOWED_SET} { type ifname . ether_addr . ipv4_addr; }
  chain prerouting {
    type filter hook prerouting priority -200; policy accept;
    iifname ${ves} jump from_ve
  }
  chain input {
    type filter hook input priority -200; policy accept;
    iifname ${ves} jump from_ve
  }
  chain from_ve {
    ether daddr 01:80:c2:00:00:00-01:80:c2:00:00:0f drop
    ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . ether saddr . arp saddr ip @${ALLOWED_SET} iifname . arp saddr ether . arp saddr ip @${ALLOWED_SET} accept
    ether type ip iifname . ether saddr . ip saddr @${ALLOWED_SET} accept
    counter drop
  }
  chain forward {
    type filter hook forward priority -200; policy accept;
    iifname ${ves} oifname ${ves} drop
  }
`;
  const egress = o.outbound ? `
  set outbound_allow { type ipv4_addr; flags interval; auto-merge;${elements(o.outboundAllow)} }
  set outbound_blocked { type ipv4_addr; flags interval;${elements(OUTBOUND_BLOCKED)} }
  set name_servers { type ipv4_addr;${elements(o.nameServers)} }
  set ve_connections { type ipv4_addr; size ${o.subnetSize}; flags dynamic; }
  chain ve_egress {
    meta nfproto != ipv4 drop
    ct state established,related return
    ct state != new drop
    ip daddr @name_servers meta l4proto { tcp, udp } th dport 53 goto ve_new_connection
    ip daddr @outbound_allow goto ve_new_connection
    ip daddr @outbound_blocked counter drop
    fib daddr type != unicast drop
    goto ve_new_connection
  }
  chain ve_new_connection {
    add @ve_connections { ip saddr ct count over ${o.maxConnectionsPerVe} } counter drop
  }` : '';
  const inetBody = `
  chain input {
    type filter hook input priority -10; policy accept;
    iifname ${ves} drop
    iifname "${o.bridge}" ct state established,related accept
    iifname "${o.bridge}" drop
  }${egress}
  chain forward {
    type filter hook forward priority -10; policy accept;
    iifname ${ves} drop
    iifname "${o.bridge}" oifname "${o.bridge}" drop
    oifname "${o.bridge}" ct state established,related accept
    oifname "${o.bridge}" drop${o.outbound ? `
    iifname "${o.bridge}" jump ve_egress` : ''}
    iifname "${o.bridge}" ${o.outbound ? 'accept' : 'drop'}
  }${o.outbound ? `
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    ip saddr ${o.subnet} oifname != "${o.bridge}" masquerade
  }` : ''}
`;
  const table = (family: HostTable['family'], what: string, body: string): HostTable => {
    const comment = `vesh: ${what}; rules ${createHash('sha256').update(`${family}\n${body}`).digest('hex').slice(0, 12)}`;
    return { family, name: o.table, comment, text: `table ${family} ${o.table} {\n  comment "${comment}"${body}}\n` };
  };
  return [
    table('bridge', `anti-spoofing and VE isolation on ${o.bridge}`, bridgeBody),
    table('inet', `VEs off host services; outbound ${o.outbound ? 'on' : 'off'}`, inetBody),
  ];
}

/**
 * An nft script that replaces `tables` in one transaction: declaring a table
 * before deleting it makes the delete valid whether or not it existed, and
 * nothing sees the state in between. `extra` (set elements) goes in the same
 * transaction, so a replaced anti-spoofing set is never seen empty.
 */
export function replaceTablesScript(tables: HostTable[], extra: string[] = []): string {
  const parts = tables.map((t) => `table ${t.family} ${t.name}\ndelete table ${t.family} ${t.name}\n${t.text}`);
  return [...parts, ...extra.map((l) => `${l}\n`)].join('');
}

/** Comments of the tables in an `nft list` output: "family name" → comment ('' for a table without one). */
export function tableComments(listing: string): Map<string, string> {
  const out = new Map<string, string>();
  const re = /^table (\S+) (\S+) \{\n(?:\s*comment "((?:[^"\\]|\\.)*)")?/gm;
  for (const m of listing.matchAll(re)) out.set(`${m[1]} ${m[2]}`, m[3] ?? '');
  return out;
}
