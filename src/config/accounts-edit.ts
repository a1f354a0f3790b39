import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import lockfile from 'proper-lockfile';
import { isMap, isScalar, Pair, parseDocument, Scalar, YAMLMap, YAMLSeq, type Document } from 'yaml';
import { ErrorCodes, VeshError, errorMessage, isVeshError } from '../errors.js';
import { assertAccountName, parseAccounts, type Account } from './accounts.js';

/**
 * Changes to accounts.yaml made by `vesh user …`: through yaml's Document
 * API so the admin's comments, order and quoting survive, validated with the
 * same schema the server loads it with, and written whole (temp file +
 * rename) under a lock, so the server's watcher and a second `vesh user`
 * never see half a file and a change that would make the file invalid writes
 * nothing.
 */

/** Mode of a new accounts file: it holds password hashes. */
const NEW_FILE_MODE = 0o600;

export interface EditResult<R> {
  value: R;
  /** Whether the file was written (false when the edit changed nothing). */
  written: boolean;
  /** The accounts as the file now holds them. */
  accounts: Map<string, Account>;
}

/**
 * Run `edit` on the parsed document of `file` (created when missing) and
 * write the result. Throws VeshError: ACCOUNTS_BUSY (another edit holds the
 * lock), ACCOUNTS_INVALID (the file is invalid already, or would be after the
 * edit: nothing written), or whatever `edit` throws (nothing written).
 */
export async function editAccountsFile<R>(file: string, edit: (doc: Document) => R | Promise<R>): Promise<EditResult<R>> {
  const abs = path.resolve(file);
  const dir = path.dirname(abs);
  try {
    await fs.access(dir);
  } catch {
    throw new VeshError(ErrorCodes.ACCOUNTS_INVALID, `the directory of the accounts file, ${dir}, does not exist: create it, or fix accountsFile in the server configuration`);
  }
  let release: () => Promise<void>;
  try {
    // realpath: false lets us lock a file that does not exist yet.
    release = await lockfile.lock(abs, { realpath: false, stale: 10_000, retries: { retries: 20, minTimeout: 50, maxTimeout: 500 } });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ELOCKED') {
      throw new VeshError(ErrorCodes.ACCOUNTS_BUSY, `${abs} is being changed by another vesh command (lock ${abs}.lock): try again`);
    }
    throw new VeshError(ErrorCodes.ACCOUNTS_BUSY, `cannot lock ${abs}: ${errorMessage(err)}`, { cause: err });
  }
  try {
    const { text, stat } = await readCurrent(abs);
    try {
      parseAccounts(abs, text);
    } catch (err) {
      if (!isVeshError(err)) throw err;
      throw new VeshError(ErrorCodes.ACCOUNTS_INVALID, `${abs} has problems; fix them first (nothing was changed):\n${err.message}`, { details: err.details, cause: err });
    }
    const doc = parseDocument(text);
    const value = await edit(doc);
    const newText = accountsText(doc);
    let accounts: Map<string, Account>;
    try {
      accounts = parseAccounts(abs, newText);
    } catch (err) {
      if (!isVeshError(err)) throw err;
      throw new VeshError(ErrorCodes.ACCOUNTS_INVALID, `the change would make ${abs} invalid, so nothing was written:\n${err.message}`, { details: err.details, cause: err });
    }
    if (stat && newText === text) return { value, written: false, accounts };
    await writeFileAtomic(abs, newText, stat);
    return { value, written: true, accounts };
  } finally {
    await release().catch(() => undefined);
  }
}

async function readCurrent(file: string): Promise<{ text: string; stat: import('node:fs').Stats | null }> {
  try {
    const [text, stat] = await Promise.all([fs.readFile(file, 'utf8'), fs.stat(file)]);
    return { text, stat };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { text: '', stat: null };
    throw new VeshError(ErrorCodes.ACCOUNTS_INVALID, `cannot read ${file}: ${errorMessage(err)}`, { cause: err });
  }
}

/** Write `text` to a temp file beside `file` with the old file's mode and owner, then rename it over. */
async function writeFileAtomic(file: string, text: string, old: import('node:fs').Stats | null): Promise<void> {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  const mode = old ? old.mode & 0o7777 : NEW_FILE_MODE;
  let handle: fs.FileHandle | null = null;
  try {
    handle = await fs.open(tmp, 'wx', mode);
    await handle.writeFile(text, 'utf8');
    // open()'s mode went through the umask; the file must keep the old one exactly.
    await handle.chmod(mode);
    if (old && process.getuid?.() === 0 && (old.uid !== 0 || old.gid !== 0)) await handle.chown(old.uid, old.gid);
    await handle.sync();
    await handle.close();
    handle = null;
    await fs.rename(tmp, file);
  } catch (err) {
    await handle?.close().catch(() => undefined);
    await fs.rm(tmp, { force: true }).catch(() => undefined);
    throw new VeshError(ErrorCodes.ACCOUNTS_INVALID, `cannot write ${file}: ${errorMessage(err)}`, { cause: err });
  }
  // The rename is durable once the directory is: best effort.
  const dirHandle = await fs.open(path.dirname(file), 'r').catch(() => null);
  await dirHandle?.sync().catch(() => undefined);
  await dirHandle?.close().catch(() => undefined);
}

// ---------------------------------------------------------------- edits on the document

/** The top-level map, made when the file held nothing (or only comments). */
function topMap(doc: Document): YAMLMap {
  if (doc.contents === null || (isScalar(doc.contents) && doc.contents.value === null)) {
    doc.contents = new YAMLMap() as never;
  }
  if (!isMap(doc.contents)) throw new VeshError(ErrorCodes.ACCOUNTS_INVALID, 'the accounts file must be a map of account names');
  return doc.contents as YAMLMap;
}

function findPair(map: YAMLMap, name: string): Pair | undefined {
  return map.items.find((p) => (isScalar(p.key) ? p.key.value : p.key) === name) as Pair | undefined;
}

function accountPair(doc: Document, name: string): Pair {
  const pair = findPair(topMap(doc), name);
  if (!pair) throw new VeshError(ErrorCodes.ACCOUNT_NOT_FOUND, `there is no account "${name.slice(0, 64)}" (vesh user list shows them)`);
  return pair;
}

/** The account's map; an empty entry (`bob:`) becomes one. */
function accountMap(doc: Document, name: string): YAMLMap {
  const pair = accountPair(doc, name);
  if (pair.value === null || (isScalar(pair.value) && pair.value.value === null)) pair.value = new YAMLMap();
  if (!isMap(pair.value)) throw new VeshError(ErrorCodes.ACCOUNTS_INVALID, `account "${name}" is not a map of settings`);
  return pair.value as YAMLMap;
}

/** Set a scalar field, keeping the old node (its comment and quoting) when there is one. */
function setScalar(map: YAMLMap, key: string, value: string | boolean, type?: Scalar.Type): void {
  const node = map.get(key, true);
  if (isScalar(node)) {
    node.value = value;
    return;
  }
  const scalar = new Scalar(value);
  if (type) scalar.type = type;
  map.set(key, scalar);
}

export interface NewAccount {
  password?: string;
  /** authorized_keys lines, as given. */
  keys?: string[];
  ve?: string;
  user?: string;
}

export function addAccountTo(doc: Document, name: string, a: NewAccount): void {
  assertAccountName(name);
  const map = topMap(doc);
  if (findPair(map, name)) throw new VeshError(ErrorCodes.ACCOUNT_EXISTS, `account "${name}" exists already (vesh user passwd ${name} changes its password)`);
  const body = new YAMLMap();
  if (a.password !== undefined) {
    const s = new Scalar(a.password);
    s.type = 'QUOTE_DOUBLE';
    body.set('password', s);
  }
  if (a.keys && a.keys.length > 0) {
    const seq = new YAMLSeq();
    for (const k of a.keys) seq.add(new Scalar(k));
    body.set('keys', seq);
  }
  if (a.ve !== undefined) body.set('ve', a.ve);
  if (a.user !== undefined) body.set('user', a.user);
  const key = new Scalar(name);
  // A blank line between accounts, as people write the file.
  key.spaceBefore = map.items.length > 0;
  // `alice: {}` reads better than a dangling `alice:` for an account without settings yet.
  if (body.items.length === 0) body.flow = true;
  map.add(new Pair(key, body));
}

export function setAccountPassword(doc: Document, name: string, hash: string): void {
  setScalar(accountMap(doc, name), 'password', hash, 'QUOTE_DOUBLE');
}

export function setAccountLocked(doc: Document, name: string, locked: boolean): void {
  const map = accountMap(doc, name);
  if (!locked && !map.has('locked')) return;
  setScalar(map, 'locked', locked);
}

export function deleteAccountFrom(doc: Document, name: string): void {
  const map = topMap(doc);
  const pair = accountPair(doc, name);
  const index = map.items.indexOf(pair);
  // yaml hangs the file's header on the first account's name unless a blank
  // line follows it. Deleting the first account keeps all but the paragraph
  // right above it; a lone paragraph is kept too (it may be the header).
  const before = index === 0 && !doc.commentBefore && isScalar(pair.key) ? pair.key.commentBefore : undefined;
  map.items.splice(index, 1);
  if (before) {
    const paragraphs = before.split(/\n\n+/);
    doc.commentBefore = (paragraphs.length > 1 ? paragraphs.slice(0, -1) : paragraphs).join('\n\n');
  }
  const first = map.items[0];
  // The document's header is followed by a blank line of its own.
  if (index === 0 && first && isScalar(first.key)) first.key.spaceBefore = false;
}

/** The document as text: long lines unfolded, and no "{}" for a file left with comments only. */
export function accountsText(doc: Document): string {
  // lineWidth 0: never fold long lines (hashes, keys) across lines.
  const text = doc.toString({ lineWidth: 0 });
  if (!isMap(doc.contents) || doc.contents.items.length > 0) return text;
  return `${text.replace(/^\{\}\n/m, '').replace(/\n{3,}/g, '\n\n').replace(/^\n+/, '').replace(/\n+$/, '')}\n`.replace(/^\n$/, '');
}
