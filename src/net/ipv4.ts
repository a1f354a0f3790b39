import { ErrorCodes, VeshError } from '../errors.js';

export function ipToInt(ip: string): number {
  const parts = ip.split('.').map(Number);
  if (parts.length !== 4 || parts.some((p) => !Number.isInteger(p) || p < 0 || p > 255)) {
    throw new VeshError(ErrorCodes.CONFIG_INVALID, `"${ip}" is not an IPv4 address`);
  }
  return ((parts[0]! << 24) | (parts[1]! << 16) | (parts[2]! << 8) | parts[3]!) >>> 0;
}

export function intToIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

export interface Subnet {
  /** Network address as an integer. */
  network: number;
  prefix: number;
  /** Number of addresses incl. network and broadcast. */
  size: number;
  /** First host address: the bridge's (the VEs' gateway). */
  gateway: string;
  cidr: string;
}

/** Parse "10.88.0.0/16"; the VEs need at least a /30 (gateway + one VE). */
export function parseSubnet(cidr: string): Subnet {
  const m = /^(\d+\.\d+\.\d+\.\d+)\/(\d+)$/.exec(cidr);
  const prefix = m ? Number(m[2]) : NaN;
  if (!m || prefix < 8 || prefix > 30) {
    throw new VeshError(ErrorCodes.CONFIG_INVALID, `network.subnet "${cidr}" must be an IPv4 CIDR from /8 to /30, for example 10.88.0.0/16`);
  }
  const size = 2 ** (32 - prefix);
  const network = (ipToInt(m[1]!) & ~(size - 1)) >>> 0;
  return { network, prefix, size, gateway: intToIp(network + 1), cidr: `${intToIp(network)}/${prefix}` };
}

/** Offset of `ip` in the subnet, or -1 if outside. */
export function offsetIn(subnet: Subnet, ip: string): number {
  const n = ipToInt(ip);
  return n >= subnet.network && n < subnet.network + subnet.size ? n - subnet.network : -1;
}

/**
 * The MAC vesh gives the interface that holds `ip` (a VE's eth0, the bridge
 * for the gateway): locally administered, unicast (first octet 0x02), 0x56
 * ("V") as a vesh mark, then the four octets of the address. Derived, not
 * stored: the same VE always has the same MAC, two addresses never share
 * one, and the anti-spoofing set, the bridge's static FDB entry and the
 * host's neighbour entry agree without a lookup.
 */
export function macForAddress(ip: string): string {
  const n = ipToInt(ip);
  return ['02', '56', ...[n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].map((b) => b.toString(16).padStart(2, '0'))].join(':');
}

/** Parse "a.b.c.d/len" (the prefix may be 0-32) into its canonical form, host bits cleared; throws CONFIG_INVALID naming `what`. */
export function canonicalCidr(cidr: string, what: string): string {
  const m = /^(\d+\.\d+\.\d+\.\d+)\/(\d+)$/.exec(cidr);
  const prefix = m ? Number(m[2]) : NaN;
  if (!m || prefix > 32) throw new VeshError(ErrorCodes.CONFIG_INVALID, `${what} "${cidr}" must be an IPv4 CIDR such as 172.16.5.0/24`);
  const mask = prefix === 0 ? 0 : (~0 << (32 - prefix)) >>> 0;
  return `${intToIp((ipToInt(m[1]!) & mask) >>> 0)}/${prefix}`;
}
