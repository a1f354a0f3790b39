import type { AccountTimeouts } from '../config/accounts.js';
import type { LimitsInput } from '../config/limits.js';

/**
 * What the SSH layer needs from accounts and authentication, stated as
 * narrow structural types. The SSH side parses untrusted input and is meant
 * to run unprivileged one day (design.md, privilege separation); these are
 * the questions it may ask, and the shapes of the answers. The real
 * Authenticator (src/auth/authenticator.ts) and Account
 * (src/config/accounts.ts) satisfy them as they are.
 */

export interface SshKeyOptions {
  /** Source patterns (from="…"); checked by the authenticator in findKey. */
  from?: string[];
  /** Forced command (command="…"): replaces whatever the client asked to run. */
  command?: string;
  noPty: boolean;
  noPortForwarding: boolean;
  /** no-agent-forwarding: ssh -A refused for logins with this key. */
  noAgentForwarding?: boolean;
}

export interface SshAuthorizedKey {
  algo: string;
  /** "SHA256:…" */
  fingerprint: string;
  comment: string;
  options: SshKeyOptions;
  /** Set when the login was a user certificate (src/auth/certificates.ts): what it carried. */
  certificate?: { keyId: string; serial: string; caFingerprint: string; extensions: ReadonlySet<string> };
}

export interface SshAccount {
  name: string;
  /** VE the account logs into. */
  ve: string;
  /** User inside the VE. */
  user: string;
  limits?: LimitsInput;
  /** Whether -L/-R are allowed for this account at all. */
  forwarding: boolean;
  /** This account's overrides of vesh.yaml's `timeouts:` (milliseconds, 0 = off). */
  timeouts?: AccountTimeouts;
  /** Whether ssh -A is allowed for this account (absent: yes). */
  agentForwarding?: boolean;
  /** Shells that survive a dropped connection (accounts.yaml persistentShells); absent: off. */
  persistentShells?: { idleLimitMs: number; bufferBytes: number };
  /** Sessions of this account are recorded (accounts.yaml record: true). */
  record?: boolean;
}

export type PasswordResult<A extends SshAccount> = { ok: true; account: A } | { ok: false };

export interface SshAuthenticator<A extends SshAccount = SshAccount, K extends SshAuthorizedKey = SshAuthorizedKey> {
  /** Checks a password; takes the same time for unknown and locked accounts. */
  verifyPassword(user: string, password: string, source: string): Promise<PasswordResult<A>>;
  /** The account's key matching this public key blob, honouring from= for `source`; null if none. */
  findKey(user: string, algo: string, blob: Buffer, source: string): { account: A; key: K } | null;
  verifySignature(key: K, data: Buffer, signature: Buffer, hashAlgo?: string): boolean;
  /** The account of this name when it exists and is not locked (a login another cluster node authenticated); null otherwise. */
  findAccount?(name: string): A | null;
  /**
   * Milliseconds this source must still wait before it may try again (0 =
   * none): the whole source, or with `account` its attempts at that account.
   */
  penaltyRemaining(source: string, account?: string): number;
  /** A failure of `source`, aimed at `account` when there was one (none for connections that never tried). */
  recordFailure(source: string, account?: string): void;
  /** `source` logged in to `account`: only its failures against that account are forgiven. */
  recordSuccess(source: string, account: string): void;
}
