import { mkdtempSync, renameSync, rmSync, writeFileSync, readFileSync, statSync, chmodSync, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pino, type Logger } from 'pino';
import { parseDocument } from 'yaml';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AccountsStore } from '../../src/config/accounts-store.js';
import { addAccountTo, deleteAccountFrom, editAccountsFile, setAccountLocked, setAccountPassword } from '../../src/config/accounts-edit.js';

/** A logger whose records a test can read. */
function captureLogger(): { logger: Logger; records: Array<Record<string, unknown>> } {
  const records: Array<Record<string, unknown>> = [];
  const logger = pino({ level: 'debug' }, { write: (line: string) => void records.push(JSON.parse(line) as Record<string, unknown>) });
  return { logger, records };
}

async function waitFor(cond: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const HASH = '$argon2id$v=19$m=65536,p=4,t=3$3++FYTFh+cXYxHfdfquBdg$V0aFPC1DsbQSwsLsxd94iYJxt3dZGiNXitfwuGNx8og';

let dir: string;
let file: string;
const stores: AccountsStore[] = [];

beforeEach(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'vesh-accounts-test-'));
  file = path.join(dir, 'accounts.yaml');
});

afterEach(() => {
  for (const s of stores.splice(0)) s.close();
  rmSync(dir, { recursive: true, force: true });
});

function store(logger: Logger): AccountsStore {
  const s = new AccountsStore(file, logger, { debounceMs: 20 });
  stores.push(s);
  return s;
}

/** Replace the file the way editors and `vesh user` do: write aside, rename over. */
function replaceAtomically(text: string): void {
  const tmp = path.join(dir, '.accounts.yaml.swp');
  writeFileSync(tmp, text);
  renameSync(tmp, file);
}

describe('AccountsStore', () => {
  it('starts with no accounts, and a warning, when the file is missing', async () => {
    const { logger, records } = captureLogger();
    const s = store(logger);
    await s.load();
    expect(s.list()).toEqual([]);
    expect(records.some((r) => r.event === 'accounts.missing' && r.level === 40)).toBe(true);
  });

  it('refuses to start on an invalid file, naming file and line', async () => {
    writeFileSync(file, 'alice:\n  ve: ok\nbob:\n  locked: perhaps\n');
    await expect(store(captureLogger().logger).load()).rejects.toThrow(`${file}:4: bob.locked:`);
  });

  it('keeps the last good accounts when a reload finds the file invalid, and logs where', async () => {
    writeFileSync(file, 'alice: {}\nbob: {}\n');
    const { logger, records } = captureLogger();
    const s = store(logger);
    await s.load();
    writeFileSync(file, 'alice: {}\nbob: {}\ncarol:\n  ve: Not_A_VE\n');
    expect(await s.reload()).toBe(false);
    expect(s.list().map((a) => a.name)).toEqual(['alice', 'bob']);
    const failed = records.find((r) => r.event === 'accounts.reload_failed')!;
    expect(failed).toMatchObject({ file, line: 4, level: 50 });
    expect(failed.reason).toMatch(/^carol\.ve: ve must be a VE name/);
    expect(String(failed.msg)).toContain(`${file}:4:`);

    writeFileSync(file, 'dave: {}\n');
    expect(await s.reload()).toBe(true);
    expect(s.get('dave')).toBeDefined();
    expect(s.get('alice')).toBeUndefined();
    expect(records.some((r) => r.event === 'accounts.reloaded' && r.count === 1)).toBe(true);
  });

  it('keeps the last good accounts when the file disappears', async () => {
    writeFileSync(file, 'alice: {}\n');
    const { logger, records } = captureLogger();
    const s = store(logger);
    await s.load();
    rmSync(file);
    expect(await s.reload()).toBe(false);
    expect(s.get('alice')).toBeDefined();
    expect(records.some((r) => r.event === 'accounts.reload_failed' && /missing/.test(String(r.reason)))).toBe(true);
  });

  it('picks up an atomic rename-replace, and ignores a broken one', async () => {
    writeFileSync(file, 'alice: {}\n');
    const { logger, records } = captureLogger();
    const s = store(logger);
    await s.load();
    s.watch();
    replaceAtomically('alice: {}\nbob:\n  ve: alice\n');
    await waitFor(() => s.get('bob') !== undefined, 'bob to appear');
    expect(s.get('bob')!.ve).toBe('alice');

    replaceAtomically('alice: {}\nbob: [broken\n');
    await waitFor(() => records.some((r) => r.event === 'accounts.reload_failed'), 'the failed reload to be logged');
    expect(s.get('bob')).toBeDefined();

    replaceAtomically('carol: {}\n');
    await waitFor(() => s.get('carol') !== undefined, 'carol to appear');
    expect(s.size).toBe(1);
  });

  it('picks up an in-place write and a file created after start', async () => {
    const { logger } = captureLogger();
    const s = store(logger);
    await s.load();
    s.watch();
    writeFileSync(file, 'alice: {}\n');
    await waitFor(() => s.get('alice') !== undefined, 'alice to appear');
    writeFileSync(file, 'alice: {}\nbob: {}\n');
    await waitFor(() => s.get('bob') !== undefined, 'bob to appear');
  });

  it('stops reloading after close()', async () => {
    writeFileSync(file, 'alice: {}\n');
    const { logger, records } = captureLogger();
    const s = store(logger);
    await s.load();
    s.watch();
    s.close();
    replaceAtomically('bob: {}\n');
    // Give a live watcher ample time to have fired; nothing may happen.
    await new Promise((r) => setTimeout(r, 300));
    expect(s.get('alice')).toBeDefined();
    expect(records.some((r) => r.event === 'accounts.reloaded')).toBe(false);
  });
});

describe('editing accounts.yaml', () => {
  const original = [
    '# vesh accounts',
    '# (header)',
    '',
    '# the admin',
    'alice:',
    `  password: "${HASH}" # set 2024`,
    '  ve: alice',
    '',
    '# bob shares alice\'s VE',
    'bob:',
    '  ve: alice',
    '  locked: false # until further notice',
    '',
    '# end of file',
    '',
  ].join('\n');

  it('keeps comments and order through add, passwd, lock, unlock and del', async () => {
    writeFileSync(file, original);
    chmodSync(file, 0o640);
    await editAccountsFile(file, (doc) => addAccountTo(doc, 'carol', { password: HASH, keys: [], ve: 'shared', user: 'www' }));
    await editAccountsFile(file, (doc) => setAccountPassword(doc, 'alice', HASH.replace('3++F', '4++F')));
    await editAccountsFile(file, (doc) => setAccountLocked(doc, 'bob', true));
    await editAccountsFile(file, (doc) => setAccountLocked(doc, 'carol', true));
    const { accounts } = await editAccountsFile(file, (doc) => setAccountLocked(doc, 'carol', false));
    expect([...accounts.keys()]).toEqual(['alice', 'bob', 'carol']);
    const text = readFileSync(file, 'utf8');
    for (const c of ['# vesh accounts', '# (header)', '# the admin', '# set 2024', "# bob shares alice's VE", '# until further notice', '# end of file']) expect(text).toContain(c);
    expect(text).toContain(`password: "${HASH.replace('3++F', '4++F')}" # set 2024`);
    expect(text).toContain('locked: true # until further notice');
    expect(text.indexOf('alice:')).toBeLessThan(text.indexOf('bob:'));
    expect(text.indexOf('bob:')).toBeLessThan(text.indexOf('carol:'));
    expect(text).toMatch(/\n\ncarol:\n {2}password: "\$argon2id\$[^"\n]+"\n {2}ve: shared\n {2}user: www\n {2}locked: false\n/);
    expect(statSync(file).mode & 0o777).toBe(0o640);

    await editAccountsFile(file, (doc) => deleteAccountFrom(doc, 'alice'));
    const after = readFileSync(file, 'utf8');
    expect(after.startsWith('# vesh accounts\n# (header)\n\n')).toBe(true);
    expect(after).not.toContain('alice:');
    expect(after).not.toContain('# the admin');
    expect(after).toContain('# end of file');
    // No temp files or lock left behind.
    expect(readdirSync(dir)).toEqual(['accounts.yaml']);
  });

  it('writes nothing when the edit would make the file invalid, or throws', async () => {
    writeFileSync(file, original);
    await expect(editAccountsFile(file, (doc) => addAccountTo(doc, 'dave', { keys: ['ssh-ed25519 AAAA'] }))).rejects.toThrow(/would make .* invalid, so nothing was written:\n.*dave\.keys\.0: bad key/);
    await expect(editAccountsFile(file, (doc) => addAccountTo(doc, 'bob', {}))).rejects.toMatchObject({ code: 'VESH_ACCOUNT_EXISTS' });
    await expect(editAccountsFile(file, (doc) => setAccountLocked(doc, 'nobody', true))).rejects.toMatchObject({ code: 'VESH_ACCOUNT_NOT_FOUND' });
    expect(readFileSync(file, 'utf8')).toBe(original);
    expect(readdirSync(dir)).toEqual(['accounts.yaml']);
  });

  it('refuses to edit a file that is invalid already, naming the problem', async () => {
    const broken = `${original}eve:\n  locked: sometimes\n`;
    writeFileSync(file, broken);
    await expect(editAccountsFile(file, (doc) => addAccountTo(doc, 'dave', {}))).rejects.toThrow(/has problems; fix them first[^]*:16: eve\.locked:/);
    expect(readFileSync(file, 'utf8')).toBe(broken);
  });

  it('creates a missing file with mode 0600, and fills a file of comments only', async () => {
    await editAccountsFile(file, (doc) => addAccountTo(doc, 'alice', {}));
    expect(readFileSync(file, 'utf8')).toBe('alice: {}\n');
    expect(statSync(file).mode & 0o777).toBe(0o600);

    writeFileSync(file, '# nobody yet\n');
    await editAccountsFile(file, (doc) => addAccountTo(doc, 'alice', { keys: [] }));
    expect(readFileSync(file, 'utf8')).toBe('# nobody yet\n\nalice: {}\n');
    await editAccountsFile(file, (doc) => deleteAccountFrom(doc, 'alice'));
    expect(readFileSync(file, 'utf8')).toBe('# nobody yet\n');
  });

  it('turns an empty entry into settings when locking it', async () => {
    writeFileSync(file, 'bob:\n');
    await editAccountsFile(file, (doc) => setAccountLocked(doc, 'bob', true));
    expect(parseDocument(readFileSync(file, 'utf8')).toJS()).toEqual({ bob: { locked: true } });
  });
});
