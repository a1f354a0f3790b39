import { createHash, createHmac } from 'node:crypto';
import { closeSync, fsyncSync, openSync, readFileSync, writeSync, constants as fsc } from 'node:fs';

/**
 * The recordings' hash chain: one append-only file of JSON lines
 * (`chain.jsonl` in the recordings directory). Each entry names one
 * recording or events file with its size and SHA-256 when it was sealed
 * (`seal`), or says it was pruned by the retention rule (`prune`), and holds
 * the hash of the entry before it. Editing, removing or reordering an entry
 * breaks the links after it; editing or removing a sealed file no longer
 * matches its entry (recording-verify.ts).
 *
 * With a key (keys/recording-chain.key) each link is an HMAC-SHA256 instead
 * of a bare SHA-256: someone who can write the recordings directory but not
 * read the key cannot recompute the chain after an edit. Neither form stops
 * host root (who can read the key) nor someone who cuts the newest entries
 * off the end together with their files: the chain then still verifies,
 * only shorter (the server's log and a copy of the chain head kept
 * elsewhere are what tell).
 */

export const CHAIN_FILE = 'chain.jsonl';

/** How a sealed file came to be sealed. */
export type SealReason = 'ended' | 'shutdown' | 'recovered';

export interface SealEntry {
  seq: number;
  time: string;
  op: 'seal';
  file: string;
  size: number;
  sha256: string;
  /** ended: its session or connection ended; shutdown: the server stopped first; recovered: found unsealed at start (a crash). */
  reason: SealReason;
  account: string;
  ve: string;
  conn: string;
  kind: 'cast' | 'events';
  startedAt: string;
  /** The byte cap cut the recording short. */
  truncated?: boolean;
  prev: string;
  hash: string;
}

export interface PruneEntry {
  seq: number;
  time: string;
  op: 'prune';
  file: string;
  /** The sealed entry this prune removes the file of. */
  sealedSeq: number;
  retentionDays: number;
  prev: string;
  hash: string;
}

export type ChainEntry = SealEntry | PruneEntry;

/** The link before the first entry. */
export const GENESIS = '0'.repeat(64);

// Node opens every file close-on-exec: no child of the broker inherits one.
type Unlinked<E> = Omit<E, 'op' | 'seq' | 'time' | 'prev' | 'hash'>;

/** The hash of an entry: over its fields but `hash`, in a fixed order, and the previous hash. */
export function entryHash(entry: Omit<ChainEntry, 'hash'>, key: Buffer | null): string {
  const body = canonical(entry as unknown as Record<string, unknown>);
  const h = key ? createHmac('sha256', key) : createHash('sha256');
  return h.update(body).digest('hex');
}

/** JSON of `o` with keys sorted, so that a re-serialised entry hashes the same. */
function canonical(o: Record<string, unknown>): string {
  return JSON.stringify(Object.fromEntries(Object.keys(o).sort().map((k) => [k, o[k]])));
}

export interface ParsedChain {
  entries: ChainEntry[];
  /** Lines that are not entries at all (line number from 1, and why). */
  bad: Array<{ line: number; why: string }>;
}

/** Read the chain file as it is (no checks of the links: recording-verify.ts does those). */
export function readChain(file: string): ParsedChain {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { entries: [], bad: [] };
    throw err;
  }
  const entries: ChainEntry[] = [];
  const bad: ParsedChain['bad'] = [];
  const lines = text.split('\n');
  if (lines.at(-1) === '') lines.pop();
  lines.forEach((line, i) => {
    try {
      const e = JSON.parse(line) as ChainEntry;
      if (typeof e !== 'object' || e === null || (e.op !== 'seal' && e.op !== 'prune') || typeof e.hash !== 'string' || typeof e.prev !== 'string' || typeof e.file !== 'string') {
        bad.push({ line: i + 1, why: 'not a chain entry' });
        return;
      }
      entries.push(e);
    } catch {
      bad.push({ line: i + 1, why: 'not JSON' });
    }
  });
  return { entries, bad };
}

/**
 * The chain as the server appends to it: entries are written one line per
 * write(2) with O_APPEND and synced, so a crash leaves whole lines.
 */
export class ChainWriter {
  private last: string;
  private seq: number;

  /** `key` is asked for at the first append (so a server that records nothing makes no key). */
  constructor(private readonly file: string, private readonly key: () => Buffer | null) {
    const { entries } = readChain(file);
    const tail = entries.at(-1);
    this.last = tail?.hash ?? GENESIS;
    this.seq = tail?.seq ?? 0;
  }

  appendSeal(e: Unlinked<SealEntry>): SealEntry {
    return this.append({ ...e, op: 'seal' }) as SealEntry;
  }

  appendPrune(e: Unlinked<PruneEntry>): PruneEntry {
    return this.append({ ...e, op: 'prune' }) as PruneEntry;
  }

  private append(fields: (Unlinked<SealEntry> & { op: 'seal' }) | (Unlinked<PruneEntry> & { op: 'prune' })): ChainEntry {
    const unhashed = { ...fields, seq: this.seq + 1, time: new Date().toISOString(), prev: this.last } as Omit<ChainEntry, 'hash'>;
    const entry = { ...unhashed, hash: entryHash(unhashed, this.key()) } as ChainEntry;
    const fd = openSync(this.file, fsc.O_WRONLY | fsc.O_APPEND | fsc.O_CREAT | fsc.O_NOFOLLOW, 0o600);
    try {
      writeSync(fd, `${JSON.stringify(entry)}\n`);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    this.last = entry.hash;
    this.seq = entry.seq;
    return entry;
  }
}
