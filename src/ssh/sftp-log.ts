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

const PATTERNS: Array<[RegExp, (m: RegExpExecArray) => SftpAuditEvent | null]> = [
  [/^open "(.*)" flags (\S+) mode \d+$/, (m) => (m[2]!.split(',').some((f) => f === 'WRITE' || f === 'APPEND' || f === 'CREATE' || f === 'TRUNCATE') ? { op: 'write', path: unvis(m[1]!), flags: m[2]! } : null)],
  [/^close "(.*)" bytes read (\d+) written (\d+)$/, (m) => (Number(m[3]) > 0 ? { op: 'close', path: unvis(m[1]!), bytesRead: Number(m[2]), bytesWritten: Number(m[3]) } : null)],
  [/^remove name "(.*)"$/, (m) => ({ op: 'remove', path: unvis(m[1]!) })],
  [/^rmdir name "(.*)"$/, (m) => ({ op: 'rmdir', path: unvis(m[1]!) })],
  [/^mkdir name "(.*)" mode \d+$/, (m) => ({ op: 'mkdir', path: unvis(m[1]!) })],
  [/^(?:posix-)?rename old "(.*)" new "(.*)"$/, (m) => ({ op: 'rename', from: unvis(m[1]!), to: unvis(m[2]!) })],
  [/^symlink old "(.*)" new "(.*)"$/, (m) => ({ op: 'symlink', target: unvis(m[1]!), path: unvis(m[2]!) })],
  [/^(?:hard)?link old "(.*)" new "(.*)"$/, (m) => ({ op: 'link', target: unvis(m[1]!), path: unvis(m[2]!) })],
  [/^set "(.*)" (.+)$/, (m) => ({ op: 'setstat', path: unvis(m[1]!), change: m[2]! })],
  [/^(?:f)?setstat: .*$/, () => null],
  [/^(error: .*|fatal: .*)$/, (m) => ({ op: 'error', message: unvis(m[1]!) })],
];

/** One stderr line of sftp-server → an audit event, or null for lines that are not one. */
export function parseSftpLogLine(line: string): SftpAuditEvent | null {
  const l = line.replace(/\r$/, '');
  for (const [re, make] of PATTERNS) {
    const m = re.exec(l);
    if (m) return make(m);
  }
  return null;
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
