import type { PermitListenRule, PermitOpenRule } from '../config/forward-rules.js';

/**
 * Which port forwards an authenticated login may make, decided in the
 * broker from the account and the key (or certificate) it logged in with,
 * never from what a worker says. As in OpenSSH, the account's lists
 * (PermitOpen / PermitListen) and the key's options (permitopen= /
 * permitlisten=) each restrict: a forward must pass both.
 */

/** What the rules read of an account (src/config/accounts.ts Account has it). */
export interface ForwardRuleAccount {
  forwarding: boolean;
  permitOpen?: readonly PermitOpenRule[];
  permitListen?: readonly PermitListenRule[];
}

/** What the rules read of the key a login used (AuthorizedKey has it). */
export interface ForwardRuleKey {
  options: { noPortForwarding: boolean; permitOpen?: readonly PermitOpenRule[]; permitListen?: readonly PermitListenRule[] };
  certificate?: { extensions: ReadonlySet<string> };
}

/** Why this login may not forward at all, or null. */
export function forwardingRefusal(account: ForwardRuleAccount, key: ForwardRuleKey | null): string | null {
  if (!account.forwarding) return 'forwarding is off for this account';
  if (key?.certificate && !key.certificate.extensions.has('permit-port-forwarding')) return 'certificate without permit-port-forwarding';
  if (key?.options.noPortForwarding) return 'no-port-forwarding key option';
  return null;
}

function openAllowed(rules: readonly PermitOpenRule[], host: string, port: number): boolean {
  // OpenSSH's open_match: the host literally (no patterns), "*" for any.
  return rules.some((r) => (r.port === '*' || r.port === port) && (r.host === '*' || r.host === host));
}

/**
 * The names a listen address answers to. The worker hands us the address
 * the helper binds (src/ssh/forward-protocol.ts listenHostFor: the
 * "localhost" OpenSSH sends for a bare `-R PORT:…` becomes 127.0.0.1, ""
 * and "*" become 0.0.0.0), so a rule naming what the client sent must
 * still match: loopback answers to "localhost" too, every-address to ""
 * and "*". (OpenSSH tells "localhost" from an explicit 127.0.0.1; both bind
 * the same loopback here, so matching either grants nothing more.)
 */
function listenNames(host: string): string[] {
  const h = host.toLowerCase();
  if (h === '127.0.0.1' || h === '::1' || h === 'localhost') return [h, 'localhost'];
  if (h === '0.0.0.0' || h === '::' || h === '' || h === '*') return [h, '', '*'];
  return [h];
}

function listenAllowed(rules: readonly PermitListenRule[], host: string, port: number): boolean {
  // OpenSSH's remote_open_match: the host as a pattern, case-insensitively.
  const names = listenNames(host);
  return rules.some((r) => (r.port === '*' || r.port === port) && names.some((n) => r.hostPattern.test(n)));
}

const describeOpen = (rules: readonly PermitOpenRule[]) => (rules.length === 0 ? 'none' : rules.map((r) => r.text).join(', '));
const describeListen = (rules: readonly PermitListenRule[]) => (rules.length === 0 ? 'none' : rules.map((r) => r.text).join(', '));

/** The rule that refuses a -L / -W to host:port, or null when it is allowed. */
export function permitOpenRefusal(account: ForwardRuleAccount, key: ForwardRuleKey | null, host: string, port: number): string | null {
  if (account.permitOpen && !openAllowed(account.permitOpen, host, port)) return `account permitOpen (${describeOpen(account.permitOpen)})`;
  const own = key?.options.permitOpen;
  if (own && !openAllowed(own, host, port)) return `key option permitopen (${describeOpen(own)})`;
  return null;
}

/** The rule that refuses a -R listening on host:port, or null when it is allowed. */
export function permitListenRefusal(account: ForwardRuleAccount, key: ForwardRuleKey | null, host: string, port: number): string | null {
  if (account.permitListen && !listenAllowed(account.permitListen, host, port)) return `account permitListen (${describeListen(account.permitListen)})`;
  const own = key?.options.permitListen;
  if (own && !listenAllowed(own, host, port)) return `key option permitlisten (${describeListen(own)})`;
  return null;
}
