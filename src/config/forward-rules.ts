/**
 * The forwarding rules of accounts.yaml, as OpenSSH reads them: the key
 * options permitopen="host:port" and permitlisten="[host:]port", the
 * account lists permitOpen / permitListen (OpenSSH's PermitOpen and
 * PermitListen), and the key option expiry-time="YYYYMMDD[HHMM[SS]]".
 * Parsing only; src/auth/forward-rules.ts applies them.
 */

/** A -L / -W target a rule allows: a literal host (no patterns, as OpenSSH) or "*", a port or "*". */
export interface PermitOpenRule {
  text: string;
  host: string;
  port: number | '*';
}

/** A -R listen address a rule allows: a host pattern (* and ?), a port or "*". */
export interface PermitListenRule {
  text: string;
  host: string;
  hostPattern: RegExp;
  port: number | '*';
}

const HOST_TEXT = /^[A-Za-z0-9._-]{1,255}$/;

/** Split "host:port" or "[v6]:port"; `hostOptional` lets a bare port through (host then "*"). */
function splitHostPort(text: string, what: string, hostOptional: boolean): { host: string; port: number | '*' } {
  let host: string;
  let portText: string;
  if (text.startsWith('[')) {
    const end = text.indexOf(']');
    if (end < 0 || text[end + 1] !== ':') throw new Error(`${what}="${text}": an IPv6 address goes in brackets followed by :PORT, as in [2001:db8::1]:80`);
    host = text.slice(1, end);
    portText = text.slice(end + 2);
  } else {
    const colon = text.indexOf(':');
    if (colon < 0) {
      if (!hostOptional) throw new Error(`${what}="${text}" needs HOST:PORT (PORT may be *)`);
      host = '*';
      portText = text;
    } else {
      host = text.slice(0, colon);
      portText = text.slice(colon + 1);
      if (portText.includes(':')) throw new Error(`${what}="${text}": put an IPv6 address in brackets, as in [2001:db8::1]:80`);
    }
  }
  if (host === '') throw new Error(`${what}="${text}": the host is empty`);
  let port: number | '*';
  if (portText === '*') port = '*';
  else if (/^\d{1,5}$/.test(portText) && Number(portText) >= 1 && Number(portText) <= 65535) port = Number(portText);
  else throw new Error(`${what}="${text}": the port must be 1-65535 or *`);
  return { host, port };
}

export function parsePermitOpen(text: string, what = 'permitopen'): PermitOpenRule {
  const { host, port } = splitHostPort(text.trim(), what, false);
  if (host !== '*' && !HOST_TEXT.test(host) && !(host.includes(':') && /^[0-9A-Fa-f:.]+$/.test(host))) {
    throw new Error(`${what}="${text}": the host must be a literal name or address (no patterns, only * alone)`);
  }
  return { text, host, port };
}

export function parsePermitListen(text: string, what = 'permitlisten'): PermitListenRule {
  const { host, port } = splitHostPort(text.trim(), what, true);
  if (!/^[A-Za-z0-9._*?:-]{1,255}$/.test(host)) throw new Error(`${what}="${text}": the host must be a name, an address or a pattern with * and ?`);
  // Host patterns match case-insensitively, as OpenSSH's match_pattern on a lower-cased name.
  const source = host.toLowerCase().replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  return { text, host, hostPattern: new RegExp(`^${source}$`), port };
}

/**
 * An account-level list: rules, or one of the words "any" (no restriction:
 * undefined) and "none" (nothing allowed: an empty list), alone.
 */
export function parseRuleList<R>(list: string[], what: string, parse: (text: string, what: string) => R): R[] | undefined {
  if (list.length === 1 && list[0] === 'any') return undefined;
  if (list.length === 1 && list[0] === 'none') return [];
  if (list.includes('any') || list.includes('none')) throw new Error(`${what}: "any" and "none" must stand alone in the list`);
  return list.map((t) => parse(t, what));
}

/**
 * expiry-time="YYYYMMDD[HHMM[SS]]": the moment the key stops working, in
 * the server's local time zone as OpenSSH reads it, or in UTC with a
 * trailing "Z" (OpenSSH 9.2+). Returns milliseconds since the epoch.
 */
export function parseExpiryTime(text: string): number {
  const m = /^(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?)?(Z?)$/.exec(text.trim());
  if (!m) throw new Error(`expiry-time="${text}" must be YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS (local time; add Z for UTC)`);
  const [y, mo, d, h, mi, s] = m.slice(1, 7).map((v) => Number(v ?? 0)) as [number, number, number, number, number, number];
  const utc = m[7] === 'Z';
  const date = utc ? new Date(Date.UTC(y, mo - 1, d, h, mi, s)) : new Date(y, mo - 1, d, h, mi, s);
  const back = utc
    ? [date.getUTCFullYear(), date.getUTCMonth() + 1, date.getUTCDate(), date.getUTCHours(), date.getUTCMinutes(), date.getUTCSeconds()]
    : [date.getFullYear(), date.getMonth() + 1, date.getDate(), date.getHours(), date.getMinutes(), date.getSeconds()];
  // Date rolls 20250231 over into March; OpenSSH's strptime refuses it.
  if (back.join(',') !== [y, mo, d, h, mi, s].join(',')) throw new Error(`expiry-time="${text}" is not a real date and time`);
  return date.getTime();
}
