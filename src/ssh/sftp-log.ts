import { StringDecoder } from 'node:string_decoder';

/**
 * Parse the log lines OpenSSH's sftp-server writes to stderr when run with
 * `-l INFO -e`, into audit events. Only operations that change files are
 * events; reads and directory listings are left out (they are not what an
 * audit asks about, and a `find` over SFTP would flood the log).
 *
 * sftp-server passes every log message through strnvis(VIS_SAFE|VIS_OCTAL)
 * before writing it to stderr, so a file name cannot contain a raw newline
 * (it arrives as \012) and cannot forge a second log line; we undo that
 * encoding so the audit log shows the real name.
 */

export type SftpAuditEvent =
  | { op: 'write'; path: string; flags: string }
  | { op: 'close'; path: string; bytesRead: number; bytesWritten: number }
  | { op: 'remove'; path: string }
  | { op: 'rmdir'; path: string }
  | { op: 'mkdir'; path: string }
  | { op: 'rename'; from: string; to: string }
  | { op: 'symlink'; target: string; path: string }
  | { op: 'link'; target: string; path: string }
  | { op: 'setstat'; path: string; change: string }
  | { op: 'error'; message: string };

/** Undo strnvis(VIS_SAFE|VIS_OCTAL): \ooo octal bytes and \\ for a backslash. */
export function unvis(s: string): string {
  const bytes: number[] = [];
  const raw = Buffer.from(s, 'utf8');
  for (let i = 0; i < raw.length; i++) {
    const b = raw[i]!;
    if (b === 0x5c && i + 1 < raw.length) {
      const next = raw[i + 1]!;
      if (next === 0x5c) {
        bytes.push(0x5c);
        i += 1;
        continue;
      }
      const oct = raw.subarray(i + 1, i + 4).toString('latin1');
      if (/^[0-7]{3}$/.test(oct)) {
        bytes.push(parseInt(oct, 8) & 0xff);
        i += 3;
        continue;
      }
    }
    bytes.push(b);
  }
  return Buffer.from(bytes).toString('utf8');
}

/**
 * The lines are written by a program the VE controls (VE root can replace
 * sftp-server), so the parser is ours and linear in the line's length: a
 * fixed prefix, then each quoted name ends at the LAST occurrence of what
 * follows it (as a greedy `(.*)` would, without its backtracking: a
 * regular expression with two greedy groups took 3.8 ms on a crafted 8 KiB
 * line, review M3). Taking the last occurrence is also what is right: a
 * name may hold `" new "` itself (strnvis leaves quotes alone), while what
 * sftp-server appends after the name comes last.
 */

/** `PREFIX"A"SEP"B"` (the whole line): [A, B], or null. */
function twoQuoted(l: string, prefix: string, sep: string): [string, string] | null {
  if (!l.startsWith(prefix) || !l.endsWith('"')) return null;
  const at = l.lastIndexOf(sep);
  if (at < prefix.length) return null;
  return [l.slice(prefix.length, at), l.slice(at + sep.length, l.length - 1)];
}

/** `PREFIX"A"` followed by `SEP` and a tail: [A, tail], or null. The name ends at the last SEP. */
function quotedThen(l: string, prefix: string, sep: string): [string, string] | null {
  if (!l.startsWith(prefix)) return null;
  const at = l.lastIndexOf(sep);
  if (at < prefix.length) return null;
  return [l.slice(prefix.length, at), l.slice(at + sep.length)];
}

const isDigits = (s: string): boolean => s.length > 0 && s.length <= 20 && /^[0-9]+$/.test(s);

function parseOpen(l: string): SftpAuditEvent | null {
  const q = quotedThen(l, 'open "', '" flags ');
  if (!q) return null;
  // tail: FLAGS mode DIGITS, FLAGS without spaces.
  const sp = q[1].indexOf(' ');
  if (sp <= 0) return null;
  const flags = q[1].slice(0, sp);
  const rest = q[1].slice(sp);
  if (!rest.startsWith(' mode ') || !isDigits(rest.slice(6))) return null;
  const writes = flags.split(',').some((f) => f === 'WRITE' || f === 'APPEND' || f === 'CREATE' || f === 'TRUNCATE');
  return writes ? { op: 'write', path: unvis(q[0]), flags } : null;
}

function parseClose(l: string): SftpAuditEvent | null {
  const q = quotedThen(l, 'close "', '" bytes read ');
  if (!q) return null;
  const parts = q[1].split(' ');
  if (parts.length !== 3 || parts[1] !== 'written' || !isDigits(parts[0]!) || !isDigits(parts[2]!)) return null;
  const written = Number(parts[2]);
  return written > 0 ? { op: 'close', path: unvis(q[0]), bytesRead: Number(parts[0]), bytesWritten: written } : null;
}

/** `PREFIX"NAME"` as the whole line → NAME. */
function oneQuoted(l: string, prefix: string): string | null {
  return l.startsWith(prefix) && l.endsWith('"') && l.length > prefix.length ? l.slice(prefix.length, -1) : null;
}

/** One stderr line of sftp-server → an audit event, or null for lines that are not one. */
export function parseSftpLogLine(line: string): SftpAuditEvent | null {
  const l = line.endsWith('\r') ? line.slice(0, -1) : line;
  let two: [string, string] | null;
  let one: string | null;
  switch (l.slice(0, l.indexOf(' ') + 1)) {
    case 'open ':
      return parseOpen(l);
    case 'close ':
      return parseClose(l);
    case 'remove ':
      one = oneQuoted(l, 'remove name "');
      return one === null ? null : { op: 'remove', path: unvis(one) };
    case 'rmdir ':
      one = oneQuoted(l, 'rmdir name "');
      return one === null ? null : { op: 'rmdir', path: unvis(one) };
    case 'mkdir ': {
      const q = quotedThen(l, 'mkdir name "', '" mode ');
      return q && isDigits(q[1]) ? { op: 'mkdir', path: unvis(q[0]) } : null;
    }
    case 'rename ':
    case 'posix-rename ':
      two = twoQuoted(l, l.startsWith('posix-') ? 'posix-rename old "' : 'rename old "', '" new "');
      return two ? { op: 'rename', from: unvis(two[0]), to: unvis(two[1]) } : null;
    case 'symlink ':
      two = twoQuoted(l, 'symlink old "', '" new "');
      return two ? { op: 'symlink', target: unvis(two[0]), path: unvis(two[1]) } : null;
    case 'link ':
    case 'hardlink ':
      two = twoQuoted(l, l.startsWith('hard') ? 'hardlink old "' : 'link old "', '" new "');
      return two ? { op: 'link', target: unvis(two[0]), path: unvis(two[1]) } : null;
    case 'set ': {
      // set "NAME" CHANGE: the name ends at the last '" ' with something after it.
      if (!l.startsWith('set "')) return null;
      const at = l.lastIndexOf('" ');
      if (at < 5 || at + 2 >= l.length) return null;
      return { op: 'setstat', path: unvis(l.slice(5, at)), change: l.slice(at + 2) };
    }
    case 'error: ':
    case 'fatal: ':
      return { op: 'error', message: unvis(l) };
    default:
      return null;
  }
}

/** Split a stream of stderr chunks into lines, keeping a partial last line; lines are capped so a flood cannot grow memory. */
export class LineSplitter {
  private rest = '';
  // A multi-byte character may be split across two chunks.
  private readonly decoder = new StringDecoder('utf8');
  constructor(private readonly onLine: (line: string) => void, private readonly maxLine = 8192) {}

  push(chunk: Buffer | string): void {
    const text = this.rest + (typeof chunk === 'string' ? chunk : this.decoder.write(chunk));
    const lines = text.split('\n');
    this.rest = lines.pop() ?? '';
    if (this.rest.length > this.maxLine) this.rest = this.rest.slice(0, this.maxLine);
    for (const l of lines) this.onLine(l.slice(0, this.maxLine));
  }

  end(): void {
    if (this.rest) this.onLine(this.rest);
    this.rest = '';
  }
}
