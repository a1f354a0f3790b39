import { z } from 'zod';
import { ACCOUNT_NAME_PATTERN } from '../config/accounts.js';
import { CLUSTER_NAME_PATTERN } from '../config/cluster.js';
import { parsePermitListen, parsePermitOpen } from '../config/forward-rules.js';
import type { SshAuthorizedKey } from '../ssh/ports.js';
import { VE_NAME_PATTERN } from '../ve/names.js';

/**
 * A login carried from one cluster node to another. Node A authenticated
 * the client; the account's VE lives on node B. A's worker logs in to B's
 * ordinary SSH port with A's node key, under a user name that is this
 * vouch: which account, from where, and what the key the client used may
 * do (its options and certificate extensions). The user name is part of
 * the data the node key signs (RFC 4252 §7), and A's broker signs only the
 * name it wrote itself, so B can trust every field as A's word: a worker on
 * A cannot widen what the client's key allowed, and B applies those
 * restrictions exactly as if the key had logged in there.
 *
 * A ':' can never be in an account name, so the prefix cannot name one.
 */
export const VOUCH_PREFIX = 'vesh-node:';

/** How far A's clock may be from B's: a vouch is made for one login, at once. */
export const VOUCH_MAX_SKEW_MS = 5 * 60_000;

const ruleText = z.string().min(1).max(300);

const vouchSchema = z.strictObject({
  v: z.literal(1),
  /** The node that authenticated the client (its key signs). */
  from: z.string().regex(CLUSTER_NAME_PATTERN),
  /** The node the login is for. */
  to: z.string().regex(CLUSTER_NAME_PATTERN),
  account: z.string().regex(ACCOUNT_NAME_PATTERN),
  /** The client's address and port, as node A saw them (for B's logs and the session's SSH_CLIENT). */
  source: z.string().min(1).max(64).regex(/^[0-9a-fA-F.:]+$/),
  port: z.number().int().min(0).max(65535),
  /** When A wrote it (ms since the epoch). */
  at: z.number().int().min(0),
  method: z.enum(['publickey', 'password', 'keyboard-interactive']),
  /** The key the client logged in with and what it may do; null for a password login. */
  key: z.strictObject({
    algo: z.string().min(1).max(64),
    fingerprint: z.string().min(1).max(100),
    command: z.string().max(8192).optional(),
    noPty: z.boolean(),
    noPortForwarding: z.boolean(),
    noAgentForwarding: z.boolean(),
    permitOpen: z.array(ruleText).max(64).optional(),
    permitListen: z.array(ruleText).max(64).optional(),
    certificate: z.strictObject({
      keyId: z.string().max(256),
      serial: z.string().max(32),
      caFingerprint: z.string().max(100),
      extensions: z.array(z.string().max(64)).max(32),
    }).optional(),
  }).nullable(),
  /** What the vouch is for: a login (the default; vouches written before moves existed have no purpose). */
  purpose: z.literal('login').optional(),
});
export type Vouch = z.infer<typeof vouchSchema>;

/**
 * A node moving one of its VEs here (src/cluster/ve-move.ts): no account,
 * nothing runs in any VE; the connection may only stream the VE's backup
 * in, or remove a copy it streamed that never got placed here
 * (src/broker/ve-receive.ts).
 */
const moveVouchSchema = z.strictObject({
  v: z.literal(1),
  purpose: z.literal('move'),
  from: z.string().regex(CLUSTER_NAME_PATTERN),
  to: z.string().regex(CLUSTER_NAME_PATTERN),
  ve: z.string().regex(VE_NAME_PATTERN),
  at: z.number().int().min(0),
});
export type MoveVouch = z.infer<typeof moveVouchSchema>;

/** What A knows of the key a login used (AuthorizedKey carries all of it). */
export interface VouchedKeySource extends SshAuthorizedKey {
  options: SshAuthorizedKey['options'] & {
    permitOpen?: ReadonlyArray<{ text: string }>;
    permitListen?: ReadonlyArray<{ text: string }>;
  };
}

export function vouchKeyOf(key: VouchedKeySource | null): Vouch['key'] {
  if (!key) return null;
  const o = key.options;
  return {
    algo: key.algo,
    fingerprint: key.fingerprint,
    ...(o.command !== undefined ? { command: o.command } : {}),
    noPty: o.noPty,
    noPortForwarding: o.noPortForwarding,
    noAgentForwarding: !!o.noAgentForwarding,
    ...(o.permitOpen ? { permitOpen: o.permitOpen.map((r) => r.text) } : {}),
    ...(o.permitListen ? { permitListen: o.permitListen.map((r) => r.text) } : {}),
    ...(key.certificate ? {
      certificate: {
        keyId: key.certificate.keyId,
        serial: key.certificate.serial,
        caFingerprint: key.certificate.caFingerprint,
        extensions: [...key.certificate.extensions],
      },
    } : {}),
  };
}

/** The user name that carries `v`; null when it would not fit the request table's bound. */
export function encodeVouch(v: Vouch | MoveVouch, maxChars: number): string | null {
  const name = VOUCH_PREFIX + Buffer.from(JSON.stringify(v)).toString('base64url');
  return name.length <= maxChars ? name : null;
}

export function isVouchName(user: string): boolean {
  return user.startsWith(VOUCH_PREFIX);
}

/** The vouch in a user name (a login's, or a move's), or why it is not one. Never throws. */
export function decodeVouch(user: string): { ok: true; vouch: Vouch | MoveVouch } | { ok: false; why: string } {
  if (!isVouchName(user)) return { ok: false, why: 'not a node login' };
  const text = user.slice(VOUCH_PREFIX.length);
  if (!/^[A-Za-z0-9_-]+$/.test(text)) return { ok: false, why: 'not base64url' };
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(text, 'base64url').toString('utf8'));
  } catch {
    return { ok: false, why: 'not JSON' };
  }
  const move = typeof json === 'object' && json !== null && (json as { purpose?: unknown }).purpose === 'move';
  const r = (move ? moveVouchSchema : vouchSchema).safeParse(json);
  if (!r.success) return { ok: false, why: `invalid: ${r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ').slice(0, 200)}` };
  return { ok: true, vouch: r.data };
}

/**
 * The key as B's rules read it (noPty, the forced command, forwarding and
 * agent rules, permitopen/permitlisten, certificate extensions), rebuilt
 * from the vouch. A rule that does not parse here fails the login: B would
 * otherwise allow more than A's key did.
 */
export function keyFromVouch(v: Vouch): (SshAuthorizedKey & { options: { permitOpen?: ReturnType<typeof parsePermitOpen>[]; permitListen?: ReturnType<typeof parsePermitListen>[] } }) | null {
  const k = v.key;
  if (!k) return null;
  return {
    algo: k.algo,
    fingerprint: k.fingerprint,
    comment: `via node ${v.from}`,
    options: {
      ...(k.command !== undefined ? { command: k.command } : {}),
      noPty: k.noPty,
      noPortForwarding: k.noPortForwarding,
      noAgentForwarding: k.noAgentForwarding,
      ...(k.permitOpen ? { permitOpen: k.permitOpen.map((t) => parsePermitOpen(t)) } : {}),
      ...(k.permitListen ? { permitListen: k.permitListen.map((t) => parsePermitListen(t)) } : {}),
    },
    ...(k.certificate ? {
      certificate: {
        keyId: k.certificate.keyId,
        serial: k.certificate.serial,
        caFingerprint: k.certificate.caFingerprint,
        extensions: new Set(k.certificate.extensions),
      },
    } : {}),
  };
}
