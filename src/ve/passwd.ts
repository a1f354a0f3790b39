/**
 * Parsers for a VE's /etc/passwd and /etc/group, which VE root controls:
 * linear, strict, never throwing. Malformed lines are skipped; a line that
 * names a user but carries a field no process could be started with (a NUL
 * byte, an over-long path) is kept with `invalid` saying why, so a login of
 * that user fails with that reason instead of "no such user" or a throw
 * deep in process start-up.
 */

export interface PasswdEntry {
  name: string;
  uid: number;
  gid: number;
  home: string;
  shell: string;
  /** Why this entry cannot be used (e.g. "a NUL byte in its home directory"); absent when it can. */
  invalid?: string;
}

export interface GroupEntry {
  name: string;
  gid: number;
  members: string[];
}

const MAX_ID = 2 ** 32 - 2;
/** PATH_MAX: a longer home or shell cannot name a file anyway. */
const MAX_PATH_BYTES = 4096;

function id(s: string | undefined): number | null {
  if (s === undefined || !/^\d{1,10}$/.test(s)) return null;
  const n = Number(s);
  return n <= MAX_ID ? n : null;
}

/** Why `value` cannot be a path handed to a process start (argv, env, cwd), or null. */
function pathProblem(what: string, value: string): string | null {
  if (value.includes('\0')) return `a NUL byte in its ${what}`;
  if (Buffer.byteLength(value) > MAX_PATH_BYTES) return `its ${what} is longer than ${MAX_PATH_BYTES} bytes`;
  return null;
}

export function parsePasswd(text: string): PasswdEntry[] {
  const out: PasswdEntry[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(':');
    if (f.length < 7 || !f[0]) continue;
    const uid = id(f[2]);
    const gid = id(f[3]);
    if (uid === null || gid === null) continue;
    const entry: PasswdEntry = { name: f[0], uid, gid, home: f[5] ?? '/', shell: f[6] ?? '/bin/sh' };
    const invalid = f[0].includes('\0') ? 'a NUL byte in its name' : (pathProblem('home directory', entry.home) ?? pathProblem('shell', entry.shell));
    if (invalid) entry.invalid = invalid;
    out.push(entry);
  }
  return out;
}

export function parseGroup(text: string): GroupEntry[] {
  const out: GroupEntry[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(':');
    if (f.length < 4 || !f[0]) continue;
    const gid = id(f[2]);
    if (gid === null) continue;
    out.push({ name: f[0], gid, members: (f[3] ?? '').split(',').filter(Boolean) });
  }
  return out;
}
