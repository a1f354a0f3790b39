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

/**
 * Two tables per instance. `bridge` checks frames as they enter the bridge
 * from a VE's veth: only the VE's own IPv4 address (set `allowed`, one
 * element per running VE), no IPv6, and nothing from one VE's port to
 * another's (port isolation in one static rule, no per-port setting). `inet` keeps VEs off the host's own
 * services and, unless outbound is on, off every other network.
 */
export function hostRuleset(o: RulesetOptions): string {
  const ves = `"${o.vethPrefix}*"`;
  return `
table bridge ${o.table} {
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
}
table inet ${o.table} {
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
}
`;
}
