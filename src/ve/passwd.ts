/** Parsers for a VE's /etc/passwd and /etc/group, which VE root controls: malformed lines are skipped. */

export interface PasswdEntry {
  name: string;
  uid: number;
  gid: number;
  home: string;
  shell: string;
}

export interface GroupEntry {
  name: string;
  gid: number;
  members: string[];
}

const MAX_ID = 2 ** 32 - 2;

function id(s: string | undefined): number | null {
  if (s === undefined || !/^\d{1,10}$/.test(s)) return null;
  const n = Number(s);
  return n <= MAX_ID ? n : null;
}

export function parsePasswd(text: string): PasswdEntry[] {
  const out: PasswdEntry[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(':');
    if (f.length < 7 || !f[0]) continue;
    const uid = id(f[2]);
    const gid = id(f[3]);
    if (uid === null || gid === null) continue;
    out.push({ name: f[0], uid, gid, home: f[5] ?? '/', shell: f[6] ?? '/bin/sh' });
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
