import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { Command } from 'commander';
import { hashPassword, passwordProblem } from '../auth/passwords.js';
import { assertAccountName, parseAccounts, parseAuthorizedKeyLine, VE_NAME_PATTERN, VE_USER_PATTERN, type Account } from '../config/accounts.js';
import { addAccountTo, deleteAccountFrom, editAccountsFile, setAccountLocked, setAccountPassword } from '../config/accounts-edit.js';
import { loadServerConfig } from '../config/server-config.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import type { GlobalOptions } from './context.js';
import { printTable } from './table.js';

/** More than any password or public key file; stops `vesh user add --key - < /dev/zero`. */
const MAX_STDIN_BYTES = 256 * 1024;

function accountsFile(program: Command): string {
  return loadServerConfig(program.opts<GlobalOptions>().config).accountsFile;
}

function invalid(message: string): VeshError {
  return new VeshError(ErrorCodes.INVALID_ARGUMENT, message);
}

async function readStdin(what: string): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of process.stdin) {
    const b = typeof chunk === 'string' ? Buffer.from(chunk) : (chunk as Buffer);
    size += b.length;
    if (size > MAX_STDIN_BYTES) throw invalid(`${what} on standard input is too long`);
    chunks.push(b);
  }
  return Buffer.concat(chunks).toString('utf8');
}

/** Read one line from the terminal without echoing it. */
function promptHidden(prompt: string): Promise<string> {
  const stdin = process.stdin;
  return new Promise((resolve, reject) => {
    let value = '';
    process.stderr.write(prompt);
    stdin.setRawMode(true);
    stdin.resume();
    stdin.setEncoding('utf8');
    const done = (err: Error | null) => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write('\n');
      if (err) reject(err);
      else resolve(value);
    };
    const onData = (data: string) => {
      for (const ch of data) {
        if (ch === '\r' || ch === '\n') return done(null);
        if (ch === '\u0003' || (ch === '\u0004' && value === '')) {
          const e = new VeshError(ErrorCodes.INVALID_ARGUMENT, 'cancelled; nothing was changed');
          (e as VeshError & { exitCode: number }).exitCode = 130;
          return done(e);
        }
        if (ch === '\u007f' || ch === '\b') value = [...value].slice(0, -1).join('');
        else if (ch === '\u0015') value = ''; // Ctrl-U
        else if (ch >= ' ') value += ch;
      }
    };
    stdin.on('data', onData);
  });
}

/**
 * A new password: asked twice without echo on a terminal, else read from
 * standard input (one line; the final newline is not part of it).
 */
async function readNewPassword(forWhom: string): Promise<string> {
  let password: string;
  if (process.stdin.isTTY) {
    password = await promptHidden(`New password${forWhom ? ` for ${forWhom}` : ''}: `);
    if (!passwordProblem(password)) {
      const again = await promptHidden('Retype the password: ');
      if (again !== password) throw invalid('the passwords do not match; nothing was changed');
    }
  } else {
    password = (await readStdin('the password')).replace(/\r?\n$/, '');
  }
  const problem = passwordProblem(password);
  if (problem) throw invalid(`${problem}${problem.includes('line break') ? ' (give one line on standard input)' : ''}; nothing was changed`);
  return password;
}

/** authorized_keys lines from a public key file (or "-" for standard input), each checked. */
async function readKeyFile(file: string): Promise<string[]> {
  let text: string;
  try {
    text = file === '-' ? await readStdin('the key') : await readFile(file, 'utf8');
  } catch (err) {
    if (err instanceof VeshError) throw err;
    throw invalid(`cannot read key file ${file}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : errorMessage(err)}`);
  }
  const name = file === '-' ? 'standard input' : file;
  if (/PRIVATE KEY-----/.test(text)) throw invalid(`bad key file ${name}: it holds a private key; give the public key (${file === '-' ? 'the .pub file' : `${path.basename(file)}.pub`}) instead`);
  const lines: string[] = [];
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    try {
      parseAuthorizedKeyLine(line);
    } catch (err) {
      throw invalid(`bad key file ${name}:${i + 1}: ${errorMessage(err)}`);
    }
    lines.push(line);
  });
  if (lines.length === 0) throw invalid(`bad key file ${name}: it holds no public key`);
  return lines;
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function describe(a: Account): string {
  const ways = [a.keys.length > 0 ? `${a.keys.length} key${a.keys.length === 1 ? '' : 's'}` : '', a.password ? 'password' : ''].filter(Boolean);
  return `VE ${a.ve}, user ${a.user}; ${ways.length > 0 ? ways.join(', ') : 'no way to log in yet'}`;
}

async function listAccounts(file: string): Promise<Account[]> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new VeshError(ErrorCodes.ACCOUNTS_INVALID, `cannot read ${file}: ${errorMessage(err)}`);
  }
  return [...parseAccounts(file, text).values()];
}

/** Registers `vesh user add|passwd|lock|unlock|del|list`: they edit accounts.yaml in place, keeping its comments. */
export function register(program: Command): void {
  const user = program.command('user').description('manage accounts (config/accounts.yaml); the running server picks changes up by itself');

  user.command('add <name>')
    .description('add an account; its VE is made at its first login')
    .option('--key <file>', 'public key file (e.g. id_ed25519.pub), or - for standard input; may be repeated', collect, [] as string[])
    .option('--password-stdin', 'read the password from standard input (asked twice, hidden, on a terminal)')
    .option('--ve <ve>', 'VE the account logs into (default: the account name)')
    .option('--user <user>', 'user inside the VE (default: root)')
    .action(async (name: string, o: { key: string[]; passwordStdin?: boolean; ve?: string; user?: string }) => {
      assertAccountName(name);
      if (o.ve !== undefined && !VE_NAME_PATTERN.test(o.ve)) throw new VeshError(ErrorCodes.INVALID_NAME, `invalid VE name "${o.ve.slice(0, 64)}": lower-case letters, digits and inner hyphens, at most 32 characters`);
      if (o.ve === undefined && !VE_NAME_PATTERN.test(name)) throw new VeshError(ErrorCodes.INVALID_NAME, `"${name}" cannot be a VE name, so the account needs --ve NAME (lower-case letters, digits and inner hyphens)`);
      if (o.user !== undefined && !VE_USER_PATTERN.test(o.user)) throw invalid(`invalid user name "${o.user.slice(0, 64)}" for --user`);
      if (o.passwordStdin && o.key.includes('-')) throw invalid('--key - and --password-stdin both want standard input: put the key in a file');
      if (o.key.filter((k) => k === '-').length > 1) throw invalid('--key - can be given once');
      const file = accountsFile(program);
      const keys: string[] = [];
      for (const k of o.key) keys.push(...(await readKeyFile(k)));
      const password = o.passwordStdin ? await hashPassword(await readNewPassword(name)) : undefined;
      const { accounts } = await editAccountsFile(file, (doc) => addAccountTo(doc, name, { password, keys, ve: o.ve, user: o.user }));
      const a = accounts.get(name)!;
      console.log(`added account ${name} (${describe(a)})`);
      if (!a.password && a.keys.length === 0) process.stderr.write(`vesh: note: ${name} has neither a password nor a key: set one with "vesh user passwd ${name}", or add keys to ${file}\n`);
    });

  user.command('passwd <name>')
    .description('set the account\'s password (from standard input; asked twice, hidden, on a terminal)')
    .action(async (name: string) => {
      const file = accountsFile(program);
      // Fail on an unknown account before asking for a password.
      if (!(await listAccounts(file)).some((a) => a.name === name)) throw new VeshError(ErrorCodes.ACCOUNT_NOT_FOUND, `there is no account "${name.slice(0, 64)}" (vesh user list shows them)`);
      const hash = await hashPassword(await readNewPassword(name));
      await editAccountsFile(file, (doc) => setAccountPassword(doc, name, hash));
      console.log(`password of ${name} changed`);
    });

  for (const [verb, locked, what] of [['lock', true, 'refuse every login of the account (its sessions keep running)'], ['unlock', false, 'allow the account to log in again']] as const) {
    user.command(`${verb} <name>`).description(what).action(async (name: string) => {
      const { written } = await editAccountsFile(accountsFile(program), (doc) => setAccountLocked(doc, name, locked));
      console.log(`${name} ${written ? 'is now' : 'was already'} ${locked ? 'locked' : 'unlocked'}`);
    });
  }

  user.command('del <name>')
    .description('delete the account (its VE stays: vesh ve destroy removes it)')
    .action(async (name: string) => {
      await editAccountsFile(accountsFile(program), (doc) => deleteAccountFrom(doc, name));
      console.log(`deleted account ${name}`);
    });

  user.command('list')
    .description('list accounts')
    .option('--json', 'machine-readable output')
    .action(async (o: { json?: boolean }) => {
      const accounts = await listAccounts(accountsFile(program));
      if (o.json || program.opts<GlobalOptions>().json) {
        const out = accounts.map((a) => ({
          name: a.name,
          ve: a.ve,
          user: a.user,
          locked: a.locked,
          password: a.password !== undefined,
          keys: a.keys.map((k) => ({ algo: k.algo, fingerprint: k.fingerprint, comment: k.comment, options: k.options })),
          forwarding: a.forwarding,
          ...(a.limits ? { limits: a.limits } : {}),
        }));
        console.log(JSON.stringify(out, null, 2));
        return;
      }
      printTable(['NAME', 'VE', 'USER', 'LOCKED', 'KEYS', 'PASSWORD'], accounts.map((a) => [a.name, a.ve, a.user, a.locked ? 'yes' : 'no', String(a.keys.length), a.password ? 'yes' : 'no']));
    });
}

/** Registers `vesh hash-password`: a password on standard input → its argon2id PHC string on standard output. */
export function registerHashPassword(program: Command): void {
  program.command('hash-password')
    .description('print the argon2id hash (PHC string) of a password read from standard input, for accounts.yaml')
    .action(async () => {
      console.log(await hashPassword(await readNewPassword('')));
    });
}
