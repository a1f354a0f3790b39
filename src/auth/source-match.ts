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
