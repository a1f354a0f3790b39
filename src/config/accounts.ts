import { createHash, createPublicKey } from 'node:crypto';
import { BlockList, isIP } from 'node:net';
import ssh2, { type ParsedKey } from 'ssh2';
import { isMap, isNode, isScalar, LineCounter, parseDocument } from 'yaml';
import { z } from 'zod';
import { ErrorCodes, VeshError, isVeshError } from '../errors.js';
import type { LimitsInput } from './limits.js';
import { accountTimeoutsSchema, limitsInputSchema } from './schema.js';
import { parseDuration, parseSize } from './units.js';
import { formatProblems, parseYamlWithSchema, type YamlProblem } from './yaml-validate.js';
import {
  parseExpiryTime, parsePermitListen, parsePermitOpen, parseRuleList, type PermitListenRule, type PermitOpenRule,
} from './forward-rules.js';

// ssh2 is CommonJS: Node's ESM loader gives it only a default export.
const { utils } = ssh2;

/**
 * config/accounts.yaml: one entry per account, mapping an SSH user name to a
 * VE, a user inside it, and the credentials that let it in. This module only
 * parses and validates (and compiles what the authenticator needs, such as
 * parsed public keys and from= patterns); deciding who gets in is src/auth's.
 */

/** SSH user names as OpenSSH and useradd accept them (lower case, at most 32). */
export const ACCOUNT_NAME_PATTERN = /^[a-z_][a-z0-9_.-]{0,31}$/;
/** Same as src/ve/names.ts; repeated here because config sits below ve. */
export const VE_NAME_PATTERN = /^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$/;
/** A user inside the VE: a POSIX user name. */
export const VE_USER_PATTERN = /^[a-z_][a-z0-9_.-]{0,31}$/;

/** Key types we accept in authorized_keys lines (what ssh2 can verify, minus DSA). */
export const ACCEPTED_KEY_TYPES = ['ssh-ed25519', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521', 'ssh-rsa'] as const;
export type AcceptedKeyType = (typeof ACCEPTED_KEY_TYPES)[number];

/** OpenSSH 9.x refuses RSA keys shorter than this (RequiredRSASize). */
const MIN_RSA_BITS = 1024;

/** One from= pattern, compiled. Matching lives in src/auth/source-match.ts. */
export type SourcePattern =
  | { text: string; negated: boolean; kind: 'cidr'; family: 'ipv4' | 'ipv6'; subnet: BlockList }
  | { text: string; negated: boolean; kind: 'glob'; regex: RegExp };

export interface AuthorizedKeyOptions {
  /** from="…" patterns as written; `sources` holds them compiled. */
  from?: string[];
  command?: string;
  noPty: boolean;
  noPortForwarding: boolean;
  /** cert-authority: the line names a CA whose user certificates log in to the account. */
  certAuthority: boolean;
  /** principals="a,b" (cert-authority only): a certificate must list one of these instead of the account name. */
  principals?: string[];
  /** permitopen="host:port" options: the only -L / -W targets (undefined: any). */
  permitOpen?: PermitOpenRule[];
  /** permitlisten="[host:]port" options: the only -R listen addresses (undefined: any). */
  permitListen?: PermitListenRule[];
  /** expiry-time="…": the key (or CA) stops working at this moment (ms since the epoch). */
  expiresAt?: number;
  /** no-agent-forwarding (or restrict without a later agent-forwarding). */
  noAgentForwarding?: boolean;
}

/** What a user certificate that logged in carried (set on the key a certificate login made). */
export interface CertificateGrant {
  keyId: string;
  serial: string;
  /** Fingerprint of the CA that signed it. */
  caFingerprint: string;
  /** Extensions: permit-pty, permit-port-forwarding, permit-agent-forwarding, permit-user-rc, permit-X11-forwarding. */
  extensions: ReadonlySet<string>;
}

/** One parsed authorized_keys line. Satisfies SshAuthorizedKey (src/ssh/ports.ts). */
export interface AuthorizedKey {
  algo: AcceptedKeyType;
  /** The public key blob as sent on the wire. */
  blob: Buffer;
  /** "SHA256:…", as ssh-keygen -l prints it. */
  fingerprint: string;
  comment: string;
  options: AuthorizedKeyOptions;
  /** Compiled from= patterns; undefined = any source. */
  sources?: SourcePattern[];
  publicKey: ParsedKey;
  /**
   * Set only on the key of a certificate login (src/auth makes it, never
   * accounts.yaml): `blob` is then the certificate, `algo` its key's type.
   */
  certificate?: CertificateGrant;
}

/** One account, with defaults applied. Satisfies SshAccount (src/ssh/ports.ts). */
export interface Account {
  name: string;
  ve: string;
  user: string;
  locked: boolean;
  /** argon2 PHC string; absent = no password login. */
  password?: string;
  keys: AuthorizedKey[];
  limits?: LimitsInput;
  forwarding: boolean;
  /** permitOpen: the only -L / -W targets of the account (undefined: any; empty: none). */
  permitOpen?: PermitOpenRule[];
  /** permitListen: the only -R listen addresses of the account (undefined: any; empty: none). */
  permitListen?: PermitListenRule[];
  /** Overrides of vesh.yaml's `timeouts:` for this account (milliseconds, 0 = off). */
  timeouts?: AccountTimeouts;
  /** ssh -A for this account (default true, as OpenSSH's AllowAgentForwarding). */
  agentForwarding: boolean;
  /** Terminal shells survive a dropped connection (persistentShells); absent: off. */
  persistentShells?: { idleLimitMs: number; bufferBytes: number };
  /** Sessions of this account are recorded (src/audit/recording-*.ts) even when vesh.yaml's recording.enabled is off. */
  record?: boolean;
}

/** accounts.yaml `timeouts:` of one account, parsed. */
export type AccountTimeouts = z.output<typeof accountTimeoutsSchema>;

/** Accounts by name, in file order. */
export type Accounts = ReadonlyMap<string, Account>;

// ---------------------------------------------------------------- password hashes

const B64_NOPAD = /^[A-Za-z0-9+/]+$/;

/**
 * Whether `s` has the shape of an argon2 PHC string:
 * $argon2id$v=19$m=65536,t=3,p=4$SALT$HASH (the version field is optional,
 * parameters may come in any order: node-argon2 writes m,p,t).
 */
export function isArgon2Phc(s: string): boolean {
  const parts = s.split('$');
  if (parts[0] !== '' || !['argon2id', 'argon2i', 'argon2d'].includes(parts[1] ?? '')) return false;
  let i = 2;
  if (parts[i]?.startsWith('v=')) {
    if (!/^v=\d+$/.test(parts[i]!)) return false;
    i++;
  }
  if (parts.length !== i + 3) return false;
  const params = new Map<string, string>();
  for (const kv of parts[i]!.split(',')) {
    const m = /^([a-z]+)=([A-Za-z0-9+/]+)$/.exec(kv);
    if (!m || params.has(m[1]!)) return false;
    params.set(m[1]!, m[2]!);
  }
  for (const k of ['m', 't', 'p']) {
    if (!/^\d{1,10}$/.test(params.get(k) ?? '')) return false;
  }
  return B64_NOPAD.test(parts[i + 1]!) && B64_NOPAD.test(parts[i + 2]!);
}

// ---------------------------------------------------------------- from= patterns

/**
 * Compile OpenSSH-style source patterns: "!" negates, "*" and "?" are
 * wildcards matched against the address text, "a.b.c.d/n" (or IPv6/n) is a
 * CIDR block. Host names never match: like sshd with UseDNS no, we only know
 * the address.
 */
export function compileSourcePatterns(patterns: string[]): SourcePattern[] {
  return patterns.map((text) => {
    const negated = text.startsWith('!');
    const body = negated ? text.slice(1) : text;
    if (body === '') throw new Error(`empty from= pattern "${text}"`);
    if (!/^[A-Za-z0-9.:*?/_%-]+$/.test(body)) throw new Error(`from= pattern "${text}" may only hold an address, a host pattern with * and ?, or a CIDR block`);
    const slash = body.indexOf('/');
    if (slash >= 0) {
      const addr = body.slice(0, slash);
      const bitsText = body.slice(slash + 1);
      const family = isIP(addr) === 4 ? 'ipv4' : isIP(addr) === 6 ? 'ipv6' : null;
      const bits = /^\d{1,3}$/.test(bitsText) ? Number(bitsText) : NaN;
      if (!family) throw new Error(`from= pattern "${text}": "${addr}" is not an IP address (CIDR blocks look like 192.0.2.0/24)`);
      if (!(bits >= 0 && bits <= (family === 'ipv4' ? 32 : 128))) throw new Error(`from= pattern "${text}": prefix length must be 0-${family === 'ipv4' ? 32 : 128}`);
      const subnet = new BlockList();
      subnet.addSubnet(addr, bits, family);
      return { text, negated, kind: 'cidr', family, subnet };
    }
    const source = body.toLowerCase().replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
    return { text, negated, kind: 'glob', regex: new RegExp(`^${source}$`) };
  });
}

// ---------------------------------------------------------------- authorized_keys lines

const REJECTED_KEY_TYPES: Record<string, string> = {
  'ssh-dss': 'DSA keys (ssh-dss) are not accepted: they are weak and OpenSSH dropped them; use an ssh-ed25519 key',
  'sk-ssh-ed25519@openssh.com': 'security-key (FIDO, sk-) keys are not supported by vesh; use an ssh-ed25519 or ecdsa key',
  'sk-ecdsa-sha2-nistp256@openssh.com': 'security-key (FIDO, sk-) keys are not supported by vesh; use an ssh-ed25519 or ecdsa key',
};

function keyTypeProblem(type: string): string | null {
  if ((ACCEPTED_KEY_TYPES as readonly string[]).includes(type)) return null;
  if (REJECTED_KEY_TYPES[type]) return REJECTED_KEY_TYPES[type]!;
  if (type.endsWith('-cert-v01@openssh.com')) return `a certificate (${type}) is not an authorized key: list its CA's public key with cert-authority (and principals="…"), or the plain key`;
  return `unknown key type "${type.slice(0, 60)}" (accepted: ${ACCEPTED_KEY_TYPES.join(', ')})`;
}

function looksLikeKeyType(token: string): boolean {
  return keyTypeProblem(token) === null || token in REJECTED_KEY_TYPES || /^(ssh-|ecdsa-|sk-)/.test(token);
}

/** Options that restrict nothing we offer (no X11 forwarding, no ~/.ssh/rc): accepted and ignored. */
const IGNORED_FLAGS = new Set(['no-x11-forwarding', 'no-user-rc', 'x11-forwarding', 'user-rc']);
/**
 * Options we do not implement. Ignoring any of them would grant more than the
 * line says (environment=, tunnel=…), so they are errors.
 */
const UNSUPPORTED_OPTIONS = new Set(['environment', 'no-touch-required', 'tunnel', 'verify-required']);
/** Options that carry a value. */
const VALUE_OPTIONS = new Set(['command', 'from', 'principals', 'permitopen', 'permitlisten', 'expiry-time']);

interface RawOption {
  name: string;
  value?: string;
}

/** Split the options field at the front of `line`; returns the options and where the key starts. */
function splitOptions(line: string): { options: RawOption[]; rest: string } {
  const options: RawOption[] = [];
  let i = 0;
  for (;;) {
    const nameMatch = /^[A-Za-z0-9-]+/.exec(line.slice(i));
    if (!nameMatch) throw new Error(`bad option syntax near "${line.slice(i, i + 20)}"`);
    const name = nameMatch[0].toLowerCase();
    i += nameMatch[0].length;
    let value: string | undefined;
    if (line[i] === '=') {
      if (line[i + 1] !== '"') throw new Error(`option ${name}= needs a double-quoted value, as in ${name}="…"`);
      i += 2;
      let v = '';
      for (;;) {
        if (i >= line.length) throw new Error(`option ${name}=: missing closing double quote`);
        const c = line[i]!;
        if (c === '\\' && line[i + 1] === '"') {
          v += '"';
          i += 2;
        } else if (c === '"') {
          i++;
          break;
        } else {
          v += c;
          i++;
        }
      }
      value = v;
    }
    options.push({ name, value });
    if (line[i] === ',') {
      i++;
      continue;
    }
    if (i >= line.length) throw new Error('options are not followed by a key');
    if (line[i] !== ' ' && line[i] !== '\t') throw new Error(`bad option syntax near "${line.slice(i, i + 20)}"`);
    return { options, rest: line.slice(i).trimStart() };
  }
}

function applyOptions(raw: RawOption[]): { options: AuthorizedKeyOptions; sources?: SourcePattern[] } {
  const options: AuthorizedKeyOptions = { noPty: false, noPortForwarding: false, certAuthority: false };
  let sources: SourcePattern[] | undefined;
  for (const { name, value } of raw) {
    const needValue = VALUE_OPTIONS.has(name);
    if (needValue && value === undefined) throw new Error(`option ${name} needs a value: ${name}="…"`);
    if (!needValue && value !== undefined && !UNSUPPORTED_OPTIONS.has(name)) throw new Error(`option ${name} takes no value`);
    switch (name) {
      case 'restrict':
        // As in OpenSSH: everything off; later "pty" / "port-forwarding" turn things back on.
        options.noPty = true;
        options.noPortForwarding = true;
        options.noAgentForwarding = true;
        break;
      case 'no-agent-forwarding':
        options.noAgentForwarding = true;
        break;
      case 'agent-forwarding':
        options.noAgentForwarding = false;
        break;
      case 'no-pty':
        options.noPty = true;
        break;
      case 'pty':
        options.noPty = false;
        break;
      case 'no-port-forwarding':
        options.noPortForwarding = true;
        break;
      case 'port-forwarding':
        options.noPortForwarding = false;
        break;
      case 'command':
        if (options.command !== undefined) throw new Error('command= given twice');
        options.command = value!;
        break;
      case 'from': {
        if (options.from !== undefined) throw new Error('from= given twice');
        const list = value!.split(',').map((p) => p.trim());
        sources = compileSourcePatterns(list);
        options.from = list;
        break;
      }
      case 'cert-authority':
        options.certAuthority = true;
        break;
      case 'principals': {
        if (options.principals !== undefined) throw new Error('principals= given twice');
        const list = value!.split(',').map((p) => p.trim());
        if (list.some((p) => p === '')) throw new Error(`principals="${value}" has an empty name`);
        options.principals = list;
        break;
      }
      case 'permitopen':
        // Several options, each one host:port, as OpenSSH takes them.
        (options.permitOpen ??= []).push(parsePermitOpen(value!));
        break;
      case 'permitlisten':
        (options.permitListen ??= []).push(parsePermitListen(value!));
        break;
      case 'expiry-time':
        if (options.expiresAt !== undefined) throw new Error('expiry-time= given twice');
        options.expiresAt = parseExpiryTime(value!);
        break;
      default:
        if (IGNORED_FLAGS.has(name)) break;
        if (UNSUPPORTED_OPTIONS.has(name)) throw new Error(`option ${name} is not supported by vesh`);
        throw new Error(`unknown option "${name.slice(0, 40)}"`);
    }
  }
  if (options.principals && !options.certAuthority) throw new Error('principals= only applies to a cert-authority line');
  return { options, sources };
}

/** OpenSSH's fingerprint of a key blob (same as src/ssh/host-keys.ts sshFingerprint, which sits above config). */
export function keyFingerprint(blob: Buffer): string {
  return `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`;
}

/**
 * Parse one authorized_keys line: [options] keytype base64 [comment]. Throws
 * an Error whose message says what is wrong with the line (the caller adds
 * where the line is).
 */
export function parseAuthorizedKeyLine(input: string): AuthorizedKey {
  const line = input.trim();
  if (line === '') throw new Error('empty key line');
  if (line.startsWith('#')) throw new Error('a comment is not a key');
  if (/PRIVATE KEY-----/.test(line)) throw new Error('this is a private key: give the public key (the .pub file) instead');
  const first = /^\S+/.exec(line)![0];
  let rawOptions: RawOption[] = [];
  let rest = line;
  if (!looksLikeKeyType(first)) ({ options: rawOptions, rest } = splitOptions(line));
  // Options first: "hello world" is better reported as an unknown option than as key type "world".
  const { options, sources } = applyOptions(rawOptions);
  const fields = rest.split(/[ \t]+/);
  const type = fields[0] ?? '';
  const typeProblem = keyTypeProblem(type);
  if (typeProblem) throw new Error(typeProblem);
  const b64 = fields[1];
  if (!b64) throw new Error(`${type}: the base64 key data is missing`);
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(b64)) throw new Error(`${type}: the key data is not base64`);
  const comment = rest.slice(type.length).trimStart().slice(b64.length).trim();
  const blob = Buffer.from(b64, 'base64');
  const blobType = blob.length >= 4 && blob.readUInt32BE(0) <= blob.length - 4 ? blob.subarray(4, 4 + blob.readUInt32BE(0)).toString('latin1') : '';
  if (blobType !== type) throw new Error(`the line says ${type} but the key data is ${blobType ? `"${blobType.slice(0, 40)}"` : 'not an SSH public key'}`);
  const parsed = utils.parseKey(`${type} ${b64}`);
  const key = Array.isArray(parsed) ? parsed[0] : parsed;
  if (!key || key instanceof Error) throw new Error(`${type}: cannot read the key data${key instanceof Error ? ` (${key.message})` : ''}`);
  if (!key.getPublicSSH().equals(blob)) throw new Error(`${type}: the key data has trailing bytes`);
  if (type === 'ssh-rsa') {
    const bits = createPublicKey(key.getPublicPEM()).asymmetricKeyDetails?.modulusLength ?? 0;
    if (bits < MIN_RSA_BITS) throw new Error(`RSA key of ${bits} bits is too short (at least ${MIN_RSA_BITS}; better an ssh-ed25519 key)`);
  }
  return { algo: type as AcceptedKeyType, blob, fingerprint: keyFingerprint(blob), comment, options, sources, publicKey: key };
}

/**
 * A plain public key line without options, as in OpenSSH's TrustedUserCAKeys
 * and RevokedKeys files ("type base64 [comment]"). Throws an Error saying
 * what is wrong.
 */
export function parsePublicKeyLine(input: string): AuthorizedKey {
  const first = /^\S*/.exec(input.trim())![0];
  if (first !== '' && !looksLikeKeyType(first)) throw new Error(`"${first.slice(0, 40)}" is not a key type: a key line here takes no options`);
  return parseAuthorizedKeyLine(input);
}

// ---------------------------------------------------------------- the file's schema

/** Defaults of persistentShells: true. */
const HELD_IDLE_DEFAULT_MS = 60 * 60 * 1000;
const HELD_BUFFER_DEFAULT = 64 * 1024;
/** The agent's ring and the replay (base64 in one broker frame) must fit: 128 KiB. */
const HELD_BUFFER_MAX = 128 * 1024;
const HELD_IDLE_MAX_MS = 30 * 24 * 60 * 60 * 1000;

/** A duration or size setting read with its parser, whose message names the setting. */
function convert<T>(f: (v: string | number) => T) {
  return z.union([z.string(), z.number()]).transform((v, ctx) => {
    try {
      return f(v);
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: (err as Error).message });
      return z.NEVER;
    }
  });
}

/**
 * persistentShells: true, or { idleLimit, buffer }: a terminal shell whose
 * connection drops keeps running, held by the VE's session agent, and the
 * account's next terminal login takes it up again (src/broker/held-shells.ts).
 */
const persistentShellsSchema = z.preprocess((v) => (v === true ? {} : v === false ? null : v), z.strictObject({
  idleLimit: convert((v) => parseDuration(v, 'idleLimit')).refine((ms) => ms >= 1000 && ms <= HELD_IDLE_MAX_MS, {
    message: 'idleLimit must be between 1s and 720h (how long a detached shell waits for its account before it is hung up)',
  }).optional(),
  buffer: convert((v) => parseSize(v, 'buffer')).refine((n) => n >= 1024 && n <= HELD_BUFFER_MAX, {
    message: 'buffer must be between 1K and 128K (the newest output of a detached shell kept for its next login)',
  }).optional(),
}, { error: 'persistentShells must be true, false or { idleLimit, buffer }' }).nullable()).transform((v) => (v === null ? undefined : {
  idleLimitMs: v.idleLimit ?? HELD_IDLE_DEFAULT_MS,
  bufferBytes: v.buffer ?? HELD_BUFFER_DEFAULT,
}));

/** An account-level rule list: rules as in the key options, or "any" / "none" alone. */
function ruleListSchema<R>(what: string, parse: (text: string, what: string) => R) {
  return z.array(z.string().max(300)).max(1000).transform((list, ctx) => {
    try {
      return { rules: parseRuleList(list, what, parse) };
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: (err as Error).message });
      return z.NEVER;
    }
  }).optional();
}

const accountSchema = z.strictObject({
  password: z.string().refine(isArgon2Phc, {
    message: 'password must be an argon2 hash in PHC form, such as "$argon2id$v=19$m=65536,t=3,p=4$…": make one with `vesh hash-password` or set it with `vesh user passwd NAME`',
  }).optional(),
  keys: z.array(z.string().transform((line, ctx) => {
    try {
      return parseAuthorizedKeyLine(line);
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: `bad key: ${(err as Error).message}` });
      return z.NEVER;
    }
  })).nullable().optional(),
  ve: z.string().regex(VE_NAME_PATTERN, 've must be a VE name: lower-case letters, digits and inner hyphens, at most 32').optional(),
  user: z.string().regex(VE_USER_PATTERN, 'user must be a user name such as "root" or "alice"').optional(),
  locked: z.boolean().optional(),
  limits: limitsInputSchema.optional(),
  timeouts: accountTimeoutsSchema.optional(),
  forwarding: z.boolean().optional(),
  permitOpen: ruleListSchema('permitOpen', parsePermitOpen),
  permitListen: ruleListSchema('permitListen', parsePermitListen),
  agentForwarding: z.boolean().optional(),
  persistentShells: persistentShellsSchema.optional(),
  record: z.boolean({ error: 'record must be true or false (record this account\'s sessions)' }).optional(),
});

/**
 * The whole file: account name → account (an empty entry `bob:` is an
 * account with no way in yet). Names are checked by parseAccounts on the
 * YAML nodes, so that their problems point at the name's line rather than
 * at the account's body.
 */
export const accountsFileSchema = z.record(z.string(), accountSchema.nullable());

/**
 * Problems that yaml and the schema do not place well: syntax errors (which
 * parseYamlWithSchema puts on line 1, as it turns yaml's line positions
 * off) and account names (placed on the name's own line).
 */
function structuralProblems(file: string, text: string): { syntax: YamlProblem[]; names: YamlProblem[] } {
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, prettyErrors: false, uniqueKeys: true });
  const at = (offset: number | undefined) => (offset === undefined ? 1 : lc.linePos(offset).line);
  const syntax = doc.errors.map((e) => ({ file, line: at(e.pos[0]), path: '', message: `YAML syntax: ${e.message.split('\n')[0]}` }));
  const names: YamlProblem[] = [];
  if (syntax.length === 0 && isMap(doc.contents)) {
    for (const pair of doc.contents.items) {
      const name = String(isScalar(pair.key) ? pair.key.value : pair.key);
      const line = at(isNode(pair.key) ? pair.key.range?.[0] : undefined);
      if (name === '__proto__') {
        // Would vanish into a JavaScript object's prototype instead of being an account.
        names.push({ file, line, path: name, message: 'the name "__proto__" is reserved: choose another' });
      } else if (!ACCOUNT_NAME_PATTERN.test(name)) {
        names.push({ file, line, path: name.slice(0, 64), message: 'account names must be SSH user names: lower-case letters, digits, "_", "." and "-", starting with a letter or "_", at most 32' });
      } else if (!VE_NAME_PATTERN.test(name) && !(isMap(pair.value) && pair.value.has('ve'))) {
        names.push({ file, line, path: name, message: `"${name}" is not a valid VE name, so the default VE cannot be used: set ve: to a name of lower-case letters, digits and inner hyphens` });
      }
    }
  }
  return { syntax, names };
}

function invalidAccounts(problems: YamlProblem[]): VeshError {
  const sorted = [...problems].sort((x, y) => x.line - y.line);
  return new VeshError(ErrorCodes.ACCOUNTS_INVALID, formatProblems(sorted), { details: { problems: sorted } });
}

/**
 * Parse and validate accounts.yaml text. Throws VeshError ACCOUNTS_INVALID
 * whose message lists every problem as "file:line: path: message" (details.problems
 * holds them one by one).
 */
export function parseAccounts(file: string, text: string): Map<string, Account> {
  const { syntax, names } = structuralProblems(file, text);
  if (syntax.length > 0) throw invalidAccounts(syntax);
  let value: z.output<typeof accountsFileSchema>;
  try {
    ({ value } = parseYamlWithSchema(file, text, accountsFileSchema, ErrorCodes.ACCOUNTS_INVALID));
  } catch (err) {
    if (!isVeshError(err) || names.length === 0) throw err;
    throw invalidAccounts([...((err.details?.problems as YamlProblem[] | undefined) ?? []), ...names]);
  }
  if (names.length > 0) throw invalidAccounts(names);
  const out = new Map<string, Account>();
  for (const [name, a] of Object.entries(value)) {
    const account: Account = {
      name,
      ve: a?.ve ?? name,
      user: a?.user ?? 'root',
      locked: a?.locked ?? false,
      keys: a?.keys ?? [],
      forwarding: a?.forwarding ?? true,
      agentForwarding: a?.agentForwarding ?? true,
    };
    if (a?.password !== undefined) account.password = a.password;
    if (a?.limits !== undefined) account.limits = a.limits;
    if (a?.permitOpen?.rules !== undefined) account.permitOpen = a.permitOpen.rules;
    if (a?.permitListen?.rules !== undefined) account.permitListen = a.permitListen.rules;
    if (a?.timeouts) account.timeouts = a.timeouts;
    if (a?.persistentShells) account.persistentShells = a.persistentShells;
    if (a?.record) account.record = true;
    out.set(name, account);
  }
  return out;
}

/** Throws VeshError INVALID_NAME unless `name` can be an account name. */
export function assertAccountName(name: string): void {
  if (!ACCOUNT_NAME_PATTERN.test(name) || name === '__proto__') {
    throw new VeshError(ErrorCodes.INVALID_NAME, `invalid account name "${name.slice(0, 64)}": use an SSH user name of lower-case letters, digits, "_", "." and "-", starting with a letter or "_", at most 32 characters`);
  }
}
