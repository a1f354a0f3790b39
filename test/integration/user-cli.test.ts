import { spawnSync, execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import argon2 from 'argon2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { generateKeyPair } from '../../src/ssh/keygen.js';

/**
 * `vesh user …` and `vesh hash-password` as an admin runs them: the built
 * CLI, a temp vesh.yaml, and an accounts.yaml with comments that must
 * survive every edit. Needs no root and no VE.
 */

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const VESH = path.join(REPO, 'bin', 'vesh.js');

/** Compile when a source file is newer than the build (others' type errors do not stop tsc emitting). */
function ensureBuilt(): void {
  const newest = (dir: string): number => {
    let t = 0;
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      t = Math.max(t, e.isDirectory() ? newest(p) : e.name.endsWith('.ts') ? statSync(p).mtimeMs : 0);
    }
    return t;
  };
  let built = 0;
  try {
    built = statSync(path.join(REPO, 'dist', 'cli', 'user.js')).mtimeMs;
  } catch { /* not built */ }
  if (newest(path.join(REPO, 'src')) > built) {
    try {
      execFileSync(process.execPath, [path.join(REPO, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', path.join(REPO, 'tsconfig.json')], { stdio: 'pipe' });
    } catch { /* type errors elsewhere: the JavaScript is still written */ }
  }
  if (!readFileSync(path.join(REPO, 'dist', 'cli', 'user.js'), 'utf8').includes('registerHashPassword')) throw new Error('dist/cli/user.js is stale: run npm run build');
}

let dir: string;
let config: string;
let accounts: string;

function vesh(args: string[], input = ''): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [VESH, '--config', config, ...args], { input, encoding: 'utf8', timeout: 60_000, env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: dir } });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

const ORIGINAL = [
  '# Accounts of the test server.',
  '# Keep this header.',
  '',
  '# Alice runs the place.',
  'alice:',
  '  ve: alice # her own VE',
  '  keys: []',
  '',
  '# end of accounts',
  '',
].join('\n');

const key = generateKeyPair('ed25519', { comment: 'bob@laptop' });

beforeAll(() => {
  ensureBuilt();
  dir = mkdtempSync(path.join(os.tmpdir(), 'vesh-user-cli-'));
  config = path.join(dir, 'vesh.yaml');
  accounts = path.join(dir, 'accounts.yaml');
  writeFileSync(config, `listen: "127.0.0.1:0"\ndataDir: ${dir}/data\nhostKeysDir: ${dir}/keys\naccountsFile: accounts.yaml\n`);
  writeFileSync(accounts, ORIGINAL);
  writeFileSync(path.join(dir, 'bob.pub'), `${key.public}\n`);
  writeFileSync(path.join(dir, 'bad.pub'), `${key.public}\nssh-ed25519 AAAAnot-a-key\n`);
  writeFileSync(path.join(dir, 'bob'), key.private);
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('vesh user', () => {
  it('adds an account with a key and a password, keeping the comments', async () => {
    const r = vesh(['user', 'add', 'bob', '--key', path.join(dir, 'bob.pub'), '--password-stdin', '--ve', 'alice', '--user', 'bob'], 'bob-secret\n');
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/added account bob \(VE alice, user bob; 1 key, password\)/);
    const text = readFileSync(accounts, 'utf8');
    for (const c of ['# Accounts of the test server.', '# Keep this header.', '# Alice runs the place.', '# her own VE', '# end of accounts']) expect(text).toContain(c);
    expect(text.indexOf('alice:')).toBeLessThan(text.indexOf('bob:'));
    const hash = /password: "(\$argon2id\$[^"]+)"/.exec(text)![1]!;
    expect(hash).toContain('m=65536');
    expect(await argon2.verify(hash, 'bob-secret')).toBe(true);
    expect(text).toContain(`    - ${key.public}\n`);
  });

  it('lists accounts as a table and as JSON', () => {
    const table = vesh(['user', 'list']);
    expect(table.code).toBe(0);
    expect(table.stdout.split('\n')[0]).toMatch(/^NAME\s+VE\s+USER\s+LOCKED\s+KEYS\s+PASSWORD$/);
    expect(table.stdout).toMatch(/\nbob\s+alice\s+bob\s+no\s+1\s+yes\n/);
    const json = vesh(['user', 'list', '--json']);
    expect(json.code).toBe(0);
    const list = JSON.parse(json.stdout) as Array<Record<string, unknown>>;
    expect(list.map((a) => a.name)).toEqual(['alice', 'bob']);
    expect(list[1]).toMatchObject({ name: 'bob', ve: 'alice', user: 'bob', locked: false, password: true, forwarding: true, keys: [{ algo: 'ssh-ed25519', comment: 'bob@laptop' }] });
    expect(json.stdout).not.toContain('$argon2');
  });

  it('changes a password from standard input', async () => {
    const r = vesh(['user', 'passwd', 'alice'], 'alice-new\n');
    expect(r.code).toBe(0);
    const hash = /alice:\n {2}ve: alice # her own VE\n {2}keys: \[\]\n {2}password: "([^"]+)"/.exec(readFileSync(accounts, 'utf8'))?.[1];
    expect(hash && (await argon2.verify(hash, 'alice-new'))).toBe(true);
  });

  it('locks and unlocks', () => {
    expect(vesh(['user', 'lock', 'bob']).stdout).toBe('bob is now locked\n');
    expect(readFileSync(accounts, 'utf8')).toMatch(/bob:\n[^]*locked: true/);
    expect(vesh(['user', 'list']).stdout).toMatch(/\nbob\s+alice\s+bob\s+yes\s/);
    expect(vesh(['user', 'unlock', 'bob']).stdout).toBe('bob is now unlocked\n');
    expect(vesh(['user', 'unlock', 'bob']).stdout).toBe('bob was already unlocked\n');
  });

  it('hashes a password for the file by hand', async () => {
    const r = vesh(['hash-password'], 'example\n');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^\$argon2id\$v=19\$\S+\n$/);
    expect(await argon2.verify(r.stdout.trim(), 'example')).toBe(true);
    expect(vesh(['hash-password'], '').stderr).toMatch(/^vesh: the password is empty/);
  });

  it('fails with one clear line, a non-zero status and an unchanged file', () => {
    const before = readFileSync(accounts, 'utf8');
    const cases: Array<[string[], string, RegExp]> = [
      [['user', 'passwd', 'nobody'], 'pw\n', /^vesh: there is no account "nobody"/],
      [['user', 'lock', 'nobody'], '', /^vesh: there is no account "nobody"/],
      [['user', 'del', 'nobody'], '', /^vesh: there is no account "nobody"/],
      [['user', 'add', 'bob'], '', /^vesh: account "bob" exists already/],
      [['user', 'add', 'carol', '--key', path.join(dir, 'bad.pub')], '', /^vesh: bad key file .*bad\.pub:2: /],
      [['user', 'add', 'carol', '--key', path.join(dir, 'bob')], '', /^vesh: bad key file .*: it holds a private key/],
      [['user', 'add', 'carol', '--key', path.join(dir, 'missing.pub')], '', /^vesh: cannot read key file .*missing\.pub: no such file/],
      [['user', 'add', 'carol', '--password-stdin'], '\n', /^vesh: the password is empty/],
      [['user', 'add', 'carol', '--password-stdin', '--key', '-'], 'pw\n', /^vesh: --key - and --password-stdin both want standard input/],
      [['user', 'add', 'Carol'], '', /^vesh: invalid account name "Carol"/],
      [['user', 'add', 'carol', '--ve', 'Bad_VE'], '', /^vesh: invalid VE name "Bad_VE"/],
      [['user', 'passwd', 'alice'], 'one\ntwo\n', /^vesh: the password holds a line break/],
    ];
    for (const [args, input, message] of cases) {
      const r = vesh(args, input);
      expect(r.code, args.join(' ')).toBe(1);
      expect(r.stderr, args.join(' ')).toMatch(message);
      expect(r.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
      expect(readFileSync(accounts, 'utf8')).toBe(before);
    }
  });

  it('refuses to edit a file an admin broke, and leaves it as it was', () => {
    const good = readFileSync(accounts, 'utf8');
    const broken = `${good}eve:\n  locked: sometimes\n`;
    writeFileSync(accounts, broken);
    const r = vesh(['user', 'add', 'carol']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/has problems; fix them first \(nothing was changed\):\n.*accounts\.yaml:\d+: eve\.locked: /);
    expect(readFileSync(accounts, 'utf8')).toBe(broken);
    expect(vesh(['user', 'list']).stderr).toMatch(/eve\.locked/);
    writeFileSync(accounts, good);
  });

  it('deletes an account, keeping the other comments, and leaves no temp or lock files', () => {
    expect(vesh(['user', 'del', 'alice']).code).toBe(0);
    const text = readFileSync(accounts, 'utf8');
    expect(text).not.toMatch(/^alice:/m);
    expect(text.startsWith('# Accounts of the test server.\n# Keep this header.\n')).toBe(true);
    expect(text).toContain('# end of accounts');
    expect(text).toMatch(/^bob:/m);
    expect(readdirSync(dir).sort()).toEqual(['accounts.yaml', 'bad.pub', 'bob', 'bob.pub', 'vesh.yaml']);
  });
});
