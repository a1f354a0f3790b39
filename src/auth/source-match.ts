import { isIP } from 'node:net';
import type { SourcePattern } from '../config/accounts.js';

/** The address as patterns see it: IPv4-mapped IPv6 ("::ffff:192.0.2.1") as plain IPv4, lower case. */
export function normalizeSourceAddress(source: string): string {
  const s = source.toLowerCase();
  const mapped = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/.exec(s);
  return mapped ? mapped[1]! : s;
}

/**
 * Whether `source` passes a key's from= list, with OpenSSH's rules
 * (match_host_and_ip): a matching negated pattern refuses outright, else at
 * least one plain pattern must match. No list (undefined) lets everyone in.
 */
export function sourceAllowed(patterns: readonly SourcePattern[] | undefined, source: string): boolean {
  if (!patterns) return true;
  const addr = normalizeSourceAddress(source);
  const family = isIP(addr) === 4 ? 'ipv4' : isIP(addr) === 6 ? 'ipv6' : null;
  let allowed = false;
  for (const p of patterns) {
    const hit = p.kind === 'cidr' ? family === p.family && p.subnet.check(addr, family) : p.regex.test(addr);
    if (!hit) continue;
    if (p.negated) return false;
    allowed = true;
  }
  return allowed;
}

/**
 * Leading bits of an IPv6 address that make one source. OpenSSH's
 * PerSourceNetBlockSize counts single IPv6 addresses by default, but one
 * host or LAN commonly holds a whole /64 and can pick a fresh address from
 * it for every connection.
 */
export const IPV6_SOURCE_PREFIX_BITS = 64;

/** The 8 groups of an IPv6 address (zone id dropped, an IPv4 tail folded in), or null if it is not one. */
function ipv6Groups(address: string): number[] | null {
  let a = address.toLowerCase();
  const zone = a.indexOf('%');
  if (zone >= 0) a = a.slice(0, zone);
  if (isIP(a) !== 6) return null;
  const v4 = /(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(a);
  if (v4) {
    const [b0, b1, b2, b3] = v4.slice(1).map(Number) as [number, number, number, number];
    a = `${a.slice(0, v4.index)}${((b0 << 8) | b1).toString(16)}:${((b2 << 8) | b3).toString(16)}`;
  }
  const [head, tail] = a.includes('::') ? a.split('::') as [string, string] : [a, null];
  const parse = (s: string) => (s === '' ? [] : s.split(':').map((g) => parseInt(g, 16)));
  const h = parse(head);
  if (tail === null) return h;
  const t = parse(tail);
  return [...h, ...new Array<number>(8 - h.length - t.length).fill(0), ...t];
}

/**
 * The source a connection is counted under for per-source caps and
 * penalties: an IPv4 address (IPv4-mapped IPv6 is IPv4) as it is, an IPv6
 * address by its /64, since whoever holds one address of a /64 can use all
 * 2^64 of them to dodge a per-address count.
 */
export function sourceBlock(address: string): string {
  const s = normalizeSourceAddress(address);
  const groups = ipv6Groups(s);
  if (!groups) return s;
  // ::ffff:7f00:1 is 127.0.0.1 too.
  if (groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff) {
    return [groups[6]! >> 8, groups[6]! & 0xff, groups[7]! >> 8, groups[7]! & 0xff].join('.');
  }
  const keep = IPV6_SOURCE_PREFIX_BITS / 16;
  return `${groups.slice(0, keep).map((g) => g.toString(16)).join(':')}::/${IPV6_SOURCE_PREFIX_BITS}`;
}
