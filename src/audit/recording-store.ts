import { randomBytes, createHash } from 'node:crypto';
import {
  chmodSync, closeSync, lstatSync, mkdirSync, openSync, readSync, readdirSync, realpathSync, statSync, unlinkSync, writeSync, constants as fsc,
} from 'node:fs';
import path from 'node:path';
import type { RecordingConfig } from '../config/server-config.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import type { Logger } from './logger.js';
import { CHAIN_FILE, ChainWriter, readChain, type SealEntry, type SealReason } from './recording-chain.js';
import { CastWriter, EventsWriter, type CastHeader } from './recording-files.js';

/**
 * Where recordings live and how they are opened, sealed, recovered and
 * pruned (vesh.yaml `recording:`). Only the root broker writes here: the
 * directory is root's, 0700, refused when it lies where a VE's files or
 * mounts are, and hidden from the SSH workers (serve.ts). Recording files
 * are named `STAMP+ACCOUNT+VE+CONN.events.jsonl` (one per connection) and
 * `STAMP+ACCOUNT+VE+CONN+sN.cast` (one per terminal session): `+` is in
 * neither an account, a VE name nor a connection id, so a name parses back.
 */

export const CHAIN_KEY_FILE = 'recording-chain.key';
const CAST_EXT = '.cast';
const EVENTS_EXT = '.events.jsonl';
const DAY_MS = 24 * 60 * 60 * 1000;
/** How often retention is applied while the server runs. */
const PRUNE_INTERVAL_MS = 60 * 60 * 1000;

/** What a recording file's name says. */
export interface RecordingName {
  id: string;
  file: string;
  kind: 'cast' | 'events';
  startedAt: string;
  account: string;
  ve: string;
  conn: string;
  session?: number;
}

export function parseRecordingName(file: string): RecordingName | null {
  const kind = file.endsWith(CAST_EXT) ? 'cast' : file.endsWith(EVENTS_EXT) ? 'events' : null;
  if (!kind) return null;
  const id = file.slice(0, -(kind === 'cast' ? CAST_EXT : EVENTS_EXT).length);
  const m = /^(\d{8}T\d{6}Z)\+([a-z_][a-z0-9_.-]{0,31})\+([a-z0-9-]{1,32})\+([0-9a-f]{8,16})(?:\+s(\d{1,10}))?$/.exec(id);
  if (!m || (kind === 'cast') !== (m[5] !== undefined)) return null;
  const s = m[1]!;
  const startedAt = `${s.slice(0, 4)}-${s.slice(4, 6)}-${s.slice(6, 8)}T${s.slice(9, 11)}:${s.slice(11, 13)}:${s.slice(13, 15)}Z`;
  return { id, file, kind, startedAt, account: m[2]!, ve: m[3]!, conn: m[4]!, ...(m[5] ? { session: Number(m[5]) } : {}) };
}

function stamp(d: Date): string {
  return d.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
}

/**
 * Refuse a recordings directory a VE could reach: inside the VEs' or the
 * templates' trees, the runtime's state, LXCFS, or any of the host's pseudo
 * file systems, or the data directory itself (which holds them). Checked on
 * the real path, so a symlink does not lead around it; that the directory
 * is root's (prepareRecordingDir) keeps anyone who could have made it first,
 * in /tmp say, from owning it.
 */
export function unsafeRecordingDir(real: string, dataDir: string): string | null {
  const within = (p: string, root: string) => p === root || p.startsWith(`${root.replace(/\/$/, '')}/`);
  let data = dataDir;
  try {
    data = realpathSync(dataDir);
  } catch { /* not made yet */ }
  if (real === '/' || real === data) return 'it is / or the data directory itself, which holds the VEs\' files';
  for (const [root, what] of [
    [path.join(data, 'ves'), 'the VEs\' own files'], [path.join(data, 'templates'), 'the templates VEs are built on'],
    ['/run/vesh', 'the runtime\'s state'], ['/var/lib/lxcfs', 'LXCFS, which every VE mounts'],
    ['/proc', 'a kernel file system'], ['/sys', 'a kernel file system'], ['/dev', 'device nodes'],
  ] as const) {
    if (within(real, root)) return `it is inside ${root} (${what})`;
  }
  return null;
}

/** Make (or check) the recordings directory: root's, 0700, not a link, not where a VE reaches. Returns its real path. */
export function prepareRecordingDir(dir: string, dataDir: string): string {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = lstatSync(dir);
  if (!st.isDirectory()) throw new VeshError(ErrorCodes.CONFIG_INVALID, `recording.dir ${dir} is not a directory (a link or a file): point recording.dir at a directory of its own`);
  const real = realpathSync(dir);
  const why = unsafeRecordingDir(real, dataDir);
  if (why) throw new VeshError(ErrorCodes.CONFIG_INVALID, `recording.dir ${dir} cannot hold recordings: ${why}; choose a root-only directory outside the VEs' reach (the default is DATADIR/recordings)`);
  if (process.getuid?.() === 0 && st.uid !== 0) throw new VeshError(ErrorCodes.CONFIG_INVALID, `recording.dir ${dir} belongs to uid ${st.uid}, not root: whoever owns it could rewrite recordings; chown root it or pick another`);
  // Whoever may rename entries of a directory above it could swap the whole directory.
  for (let up = path.dirname(real); ; up = path.dirname(up)) {
    const a = statSync(up);
    const sticky = (a.mode & 0o1000) !== 0;
    if (process.getuid?.() === 0 && (a.uid !== 0 || ((a.mode & 0o022) !== 0 && !sticky))) {
      throw new VeshError(ErrorCodes.CONFIG_INVALID, `recording.dir ${dir} lies under ${up}, which someone other than root can change (owner uid ${a.uid}, mode ${(a.mode & 0o7777).toString(8)}): they could put another directory in its place; choose a directory whose parents are root's`);
    }
    if (up === '/') break;
  }
  chmodSync(real, 0o700);
  return real;
}

/** The chain's HMAC key (made on first use, 0600, in the host keys directory), or null when recording.hmac is off. */
export function chainKey(keysDir: string, create: boolean): Buffer | null {
  const file = path.join(keysDir, CHAIN_KEY_FILE);
  try {
    const fd = openSync(file, fsc.O_RDONLY | fsc.O_NOFOLLOW);
    try {
      const buf = Buffer.alloc(64);
      const n = readSync(fd, buf, 0, 64, 0);
      if (n < 32) throw new VeshError(ErrorCodes.CONFIG_INVALID, `${file} is shorter than 32 bytes: restore it from a backup (the chain cannot be checked without it)`);
      return buf.subarray(0, n);
    } finally {
      closeSync(fd);
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || !create) throw err;
  }
  mkdirSync(keysDir, { recursive: true, mode: 0o700 });
  const key = randomBytes(32);
  const fd = openSync(file, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
  try {
    writeSync(fd, key);
  } finally {
    closeSync(fd);
  }
  return key;
}

/** SHA-256 and size of a file, read in pieces (a recording may be large). */
export function hashFile(file: string): { sha256: string; size: number } {
  const fd = openSync(file, fsc.O_RDONLY | fsc.O_NOFOLLOW);
  try {
    const h = createHash('sha256');
    const buf = Buffer.alloc(1024 * 1024);
    let size = 0;
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, null);
      if (n <= 0) break;
      h.update(buf.subarray(0, n));
      size += n;
    }
    return { sha256: h.digest('hex'), size };
  } finally {
    closeSync(fd);
  }
}

/** Who a connection's recording is about: from the broker's own authentication, never from a worker. */
export interface RecordingSubject {
  account: string;
  ve: string;
  conn: string;
  source: string;
}

/** The recordings of one connection: its events file (opened at the first event) and its terminal sessions' casts. */
export class ConnectionRecording {
  private events: EventsWriter | null = null;
  private readonly startedAt = new Date();
  private readonly casts = new Set<CastWriter>();
  private ended = false;
  /** Sessions started and not yet recorded as ended: the events file is sealed only after the last. */
  private active = 0;
  private gone = false;

  constructor(private readonly store: Recordings, readonly subject: RecordingSubject) {}

  /** Append an event; opening the events file can fail (disk full, dir gone): the caller refuses the session then. */
  event(event: string, fields: Record<string, unknown>): void {
    if (this.ended) return;
    if (!this.events) {
      const name = `${stamp(this.startedAt)}+${this.subject.account}+${this.subject.ve}+${this.subject.conn}${EVENTS_EXT}`;
      this.events = new EventsWriter(path.join(this.store.dir, name), this.store.config.maxBytes, {
        account: this.subject.account, ve: this.subject.ve, conn: this.subject.conn, source: this.subject.source,
      });
      this.store.opened(this.events, this);
    }
    this.events.write(event, fields);
  }

  /** A cast file for terminal session `session`; its name goes into the events too. */
  cast(session: number, header: Omit<CastHeader, 'title' | 'timestamp'>): CastWriter {
    const now = new Date();
    const name = `${stamp(now)}+${this.subject.account}+${this.subject.ve}+${this.subject.conn}+s${session}${CAST_EXT}`;
    const w = new CastWriter(path.join(this.store.dir, name), this.store.config.maxBytes, {
      ...header, timestamp: Math.floor(now.getTime() / 1000),
      title: `vesh: ${this.subject.account} in VE ${this.subject.ve}, connection ${this.subject.conn} from ${this.subject.source}, session ${session}`,
    });
    this.casts.add(w);
    this.store.opened(w, this);
    return w;
  }

  /** Seal a cast once its session ended and its last bytes were written. */
  sealCast(w: CastWriter, reason: SealReason = 'ended'): void {
    if (!this.casts.delete(w)) return;
    this.store.seal(w, this, 'cast', reason);
  }

  sessionBegan(): void {
    this.active += 1;
  }

  sessionEnded(): void {
    this.active = Math.max(0, this.active - 1);
    if (this.gone && this.active === 0) this.end();
  }

  /** The connection is gone: sealed now, or once its last session's end is recorded. */
  connectionGone(): void {
    this.gone = true;
    if (this.active === 0) this.end();
  }

  /** Seal what is still open. */
  end(reason: SealReason = 'ended'): void {
    if (this.ended) return;
    for (const w of [...this.casts]) this.sealCast(w, reason);
    if (this.events) this.store.seal(this.events, this, 'events', reason);
    this.ended = true;
  }
}

/**
 * The recordings directory and its chain, as the broker uses them. Built
 * once by `vesh serve` (`open`): it checks the directory, seals what a crash
 * left unsealed (`recovered`), applies retention, and keeps doing so hourly.
 */
export class Recordings {
  private readonly chain: ChainWriter;
  private readonly live = new Map<CastWriter | EventsWriter, ConnectionRecording>();
  private timer: NodeJS.Timeout | null = null;

  private constructor(readonly config: RecordingConfig, readonly dir: string, keysDir: string, private readonly log: Logger) {
    let key: Buffer | null | undefined;
    this.chain = new ChainWriter(path.join(dir, CHAIN_FILE), () => (key === undefined ? (key = config.hmac ? chainKey(keysDir, true) : null) : key));
  }

  static open(config: RecordingConfig, dataDir: string, keysDir: string, log: Logger): Recordings {
    const dir = prepareRecordingDir(config.dir, dataDir);
    const r = new Recordings(config, dir, keysDir, log.child({ component: 'recording' }));
    r.recoverUnsealed();
    r.prune();
    r.timer = setInterval(() => r.prune(), PRUNE_INTERVAL_MS);
    r.timer.unref();
    return r;
  }

  /** Whether `account`'s sessions are recorded. */
  records(account: { record?: boolean }): boolean {
    return this.config.enabled || account.record === true;
  }

  connection(subject: RecordingSubject): ConnectionRecording {
    return new ConnectionRecording(this, subject);
  }

  /** @internal A file began: remembered so a shutdown seals it. */
  opened(w: CastWriter | EventsWriter, owner: ConnectionRecording): void {
    this.live.set(w, owner);
  }

  /** @internal Close `w` and chain its hash. */
  seal(w: CastWriter | EventsWriter, owner: ConnectionRecording, kind: 'cast' | 'events', reason: SealReason): void {
    if (!this.live.delete(w)) return;
    const sha256 = w.close();
    const file = path.basename(w.path);
    const name = parseRecordingName(file);
    try {
      this.chain.appendSeal({
        file, size: w.size, sha256, reason, account: owner.subject.account, ve: owner.subject.ve, conn: owner.subject.conn,
        kind, startedAt: name?.startedAt ?? new Date().toISOString(), ...(w.truncated ? { truncated: true } : {}),
      });
      this.log.info({ event: 'recording.sealed', file, size: w.size, reason, ...(w.truncated ? { truncated: true } : {}) });
    } catch (err) {
      this.log.error({ event: 'recording.seal_failed', file, err: errorMessage(err) }, `could not seal ${file}: it stays unsealed and is sealed as recovered at the next start`);
    }
  }

  /** Files in the directory that no chain entry names: left by a crash. Sealed now, marked `recovered`. */
  private recoverUnsealed(): void {
    const { entries } = readChain(path.join(this.dir, CHAIN_FILE));
    const named = new Set(entries.map((e) => e.file));
    for (const file of readdirSync(this.dir).sort()) {
      const name = parseRecordingName(file);
      if (!name || named.has(file)) continue;
      try {
        const { sha256, size } = hashFile(path.join(this.dir, file));
        this.chain.appendSeal({ file, size, sha256, reason: 'recovered', account: name.account, ve: name.ve, conn: name.conn, kind: name.kind, startedAt: name.startedAt });
        this.log.warn({ event: 'recording.recovered', file, size }, `sealed ${file}, left unsealed by a server that stopped without sealing it (a crash): it may end abruptly`);
      } catch (err) {
        this.log.error({ event: 'recording.recover_failed', file, err: errorMessage(err) });
      }
    }
  }

  /** Remove sealed files older than retentionDays, each with a chain entry saying so. Returns how many. */
  prune(now = Date.now()): number {
    const days = this.config.retentionDays;
    if (days <= 0) return 0;
    const { entries } = readChain(path.join(this.dir, CHAIN_FILE));
    const pruned = new Set(entries.filter((e) => e.op === 'prune').map((e) => e.file));
    let n = 0;
    for (const e of entries) {
      if (e.op !== 'seal' || pruned.has(e.file)) continue;
      if (now - Date.parse((e as SealEntry).startedAt) < days * DAY_MS) continue;
      try {
        unlinkSync(path.join(this.dir, e.file));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
          this.log.error({ event: 'recording.prune_failed', file: e.file, err: errorMessage(err) });
          continue;
        }
      }
      this.chain.appendPrune({ file: e.file, sealedSeq: e.seq, retentionDays: days });
      pruned.add(e.file);
      n++;
    }
    if (n > 0) this.log.info({ event: 'recording.pruned', count: n, retentionDays: days });
    return n;
  }

  /** Server stop: seal every recording still open, marked `shutdown`. */
  close(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    for (const owner of new Set(this.live.values())) owner.end('shutdown');
  }
}
