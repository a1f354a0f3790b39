import { createHash, type Hash } from 'node:crypto';
import { closeSync, openSync, writeSync, constants as fsc } from 'node:fs';
import { StringDecoder } from 'node:string_decoder';

/**
 * The two kinds of file a recording is made of, written by the broker only:
 * an asciicast v2 file per terminal session, and a JSON-lines events file
 * per connection (exec commands, SFTP changes, session starts and ends).
 *
 * Each keeps the SHA-256 of what it wrote as it writes, so the seal
 * (recording-chain.ts) holds the hash of what the broker wrote, and an edit
 * made to the file while the session ran already fails `verify`. Each has a
 * byte cap: past it nothing more is written but one line saying so, and the
 * session itself goes on.
 */

/** Room kept under the cap for the line that says the recording was truncated. */
const NOTE_RESERVE = 256;

class CappedFile {
  readonly hash: Hash = createHash('sha256');
  size = 0;
  truncated = false;
  closed = false;
  private readonly fd: number;

  constructor(readonly path: string, private readonly maxBytes: number) {
    // O_EXCL and O_NOFOLLOW: a name that exists (or a planted link) is never written through.
    this.fd = openSync(path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
  }

  /** Write one line (no newline in `line`); false once the cap was reached. */
  protected line(line: string, note: () => string): boolean {
    if (this.closed || this.truncated) return false;
    const buf = Buffer.from(`${line}\n`, 'utf8');
    if (this.size + buf.length > this.maxBytes - NOTE_RESERVE) {
      this.truncated = true;
      this.raw(Buffer.from(`${note()}\n`, 'utf8'));
      return false;
    }
    this.raw(buf);
    return true;
  }

  private raw(buf: Buffer): void {
    let off = 0;
    while (off < buf.length) off += writeSync(this.fd, buf, off, buf.length - off);
    this.hash.update(buf);
    this.size += buf.length;
  }

  /** Close the file; the SHA-256 of everything written. */
  close(): string {
    if (this.closed) return '';
    this.closed = true;
    closeSync(this.fd);
    return this.hash.digest('hex');
  }
}

export interface CastHeader {
  width: number;
  height: number;
  /** Unix seconds of the start. */
  timestamp: number;
  term: string;
  shell: string;
  title: string;
}

/**
 * asciicast v2 (https://docs.asciinema.org/manual/asciicast/v2/): a header
 * object, then `[seconds, "o"|"i"|"r", data]` lines. Bytes are decoded as
 * UTF-8 with a decoder per direction, so a character split across two reads
 * is not mangled; bytes that are not UTF-8 become U+FFFD, as asciinema's own
 * recorder does.
 */
export class CastWriter extends CappedFile {
  private readonly start = process.hrtime.bigint();
  private readonly out = new StringDecoder('utf8');
  private readonly inp = new StringDecoder('utf8');

  constructor(path: string, maxBytes: number, header: CastHeader) {
    super(path, maxBytes);
    this.line(JSON.stringify({
      version: 2, width: header.width, height: header.height, timestamp: header.timestamp,
      env: { TERM: header.term, SHELL: header.shell }, title: header.title,
    }), () => '');
  }

  private at(): number {
    return Math.round(Number(process.hrtime.bigint() - this.start) / 1000) / 1e6;
  }

  private event(code: 'o' | 'i' | 'r', data: string): void {
    if (data === '' || !this.open) return;
    const t = this.at();
    this.line(JSON.stringify([t, code, data]), () => JSON.stringify([t, 'o', `\r\n[vesh: recording truncated here: it reached recording.maxBytes; the session went on unrecorded]\r\n`]));
  }

  // Past the cap nothing is decoded: a flood costs the broker only the copy.
  output(buf: Buffer): void {
    if (this.open) this.event('o', this.out.write(buf));
  }

  input(buf: Buffer): void {
    if (this.open) this.event('i', this.inp.write(buf));
  }

  resize(cols: number, rows: number): void {
    this.event('r', `${cols}x${rows}`);
  }

  /** True while the cap has not been reached (the tap may stop decoding once it has). */
  get open(): boolean {
    return !this.closed && !this.truncated;
  }
}

/** One JSON object per line: what happened on one connection. */
export class EventsWriter extends CappedFile {
  constructor(path: string, maxBytes: number, private readonly base: Record<string, unknown>) {
    super(path, maxBytes);
  }

  write(event: string, fields: Record<string, unknown>): void {
    this.line(JSON.stringify({ time: new Date().toISOString(), event, ...this.base, ...fields }),
      () => JSON.stringify({ time: new Date().toISOString(), event: 'recording.truncated', ...this.base, why: 'the events file reached recording.maxBytes' }));
  }
}
