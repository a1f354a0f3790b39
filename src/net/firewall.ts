import { createHash } from 'node:crypto';

/** nftables table name of one vesh instance (one per dataDir). */
export function tableName(instanceId: string): string {
  return `vesh_${instanceId}`;
}

/** The bridge table's set of (port, address) pairs a VE may send from. */
export const ALLOWED_SET = 'allowed';

/** One element of ALLOWED_SET, in nft syntax: the VE's host-side veth and its address. */
export function allowedElement(hostVeth: string, address: string): string {
  return `{ "${hostVeth}" . ${address} }`;
}

export interface RulesetOptions {
  table: string;
  bridge: string;
  subnet: string;
  /** Every host-side veth of this instance starts with it. */
  vethPrefix: string;
  outbound: boolean;
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

/**
 * Two tables per instance. `bridge` checks frames as they enter the bridge
 * from a VE's veth: only the VE's own IPv4 address (set `allowed`, one
 * element per VE), no IPv6, and nothing from one VE's port to another's
 * (port isolation in one static rule, no per-port setting). `inet` keeps
 * VEs off the host's own services and, unless outbound is on, off every
 * other network.
 */
export function hostTables(o: RulesetOptions): HostTable[] {
  const ves = `"${o.vethPrefix}*"`;
  const bridgeBody = `
  set ${ALLOWED_SET} { type ifname . ipv4_addr; }
  chain prerouting {
    type filter hook prerouting priority -200; policy accept;
    iifname ${ves} ether type ip6 drop
    iifname ${ves} ether type ip iifname . ip saddr != @${ALLOWED_SET} drop
    iifname ${ves} ether type arp iifname . arp saddr ip != @${ALLOWED_SET} drop
  }
  chain forward {
    type filter hook forward priority -200; policy accept;
    iifname ${ves} oifname ${ves} drop
  }
`;
  const inetBody = `
  chain input {
    type filter hook input priority -10; policy accept;
    iifname "${o.bridge}" ct state established,related accept
    iifname "${o.bridge}" drop
  }
  chain forward {
    type filter hook forward priority -10; policy accept;
    iifname "${o.bridge}" oifname "${o.bridge}" drop
    oifname "${o.bridge}" ct state established,related accept
    oifname "${o.bridge}" drop
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
