import { existsSync, readdirSync, readlinkSync, statSync } from 'node:fs';
import path from 'node:path';
import { CHAIN_FILE, GENESIS, entryHash, readChain, type ChainEntry, type SealEntry } from './recording-chain.js';
import { hashFile, parseRecordingName } from './recording-store.js';

/**
 * `vesh recordings verify` and `list`: the chain checked link by link, then
 * every sealed file against its entry, then the directory for files no
 * entry names. Each problem is one line a person can act on.
 */

export type ProblemKind = 'chain-broken' | 'edited' | 'removed' | 'unsealed';

export interface Problem {
  kind: ProblemKind;
  file?: string;
  seq?: number;
  message: string;
}

export interface VerifyReport {
  ok: boolean;
  entries: number;
  sealed: number;
  pruned: number;
  /** Unsealed files a running process (the server) has open: being recorded now, not a problem. */
  recording: string[];
  problems: Problem[];
}

/** Files under `dir` some process has open now (read from /proc as root; what it cannot read it skips). */
export function filesOpenIn(dir: string): Set<string> {
  const open = new Set<string>();
  const prefix = `${dir.replace(/\/$/, '')}/`;
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        const target = readlinkSync(`/proc/${pid}/fd/${fd}`);
        if (target.startsWith(prefix)) open.add(target.slice(prefix.length));
      } catch { /* closed meanwhile */ }
    }
  }
  return open;
}

export function verifyRecordings(dir: string, key: Buffer | null, openNow: Set<string> = filesOpenIn(dir)): VerifyReport {
  const { entries, bad } = readChain(path.join(dir, CHAIN_FILE));
  const problems: Problem[] = [];
  for (const b of bad) problems.push({ kind: 'chain-broken', message: `chain broken: line ${b.line} of ${CHAIN_FILE} is ${b.why}: the chain file was edited` });
  let prev = GENESIS;
  let prevSeq = 0;
  let hashMismatches = 0;
  for (const e of entries) {
    const { hash, ...rest } = e;
    if (e.prev !== prev || e.seq !== prevSeq + 1) {
      problems.push({ kind: 'chain-broken', seq: e.seq, file: e.file, message: `chain broken before entry ${e.seq} (${e.file}): it does not follow entry ${prevSeq}; an entry was removed, inserted or reordered` });
    }
    if (entryHash(rest, key) !== hash) {
      hashMismatches++;
      problems.push({ kind: 'chain-broken', seq: e.seq, file: e.file, message: `chain broken at entry ${e.seq} (${e.file}): its hash does not match its contents; the entry was edited` });
    }
    prev = hash;
    prevSeq = e.seq;
  }
  if (entries.length > 1 && hashMismatches === entries.length) {
    problems.push({ kind: 'chain-broken', message: `no entry's hash matches: if nothing was edited, the chain was made ${key ? 'without' : 'with'} an HMAC key; check recording.hmac and ${key ? 'that keys/recording-chain.key is the one the chain was made with' : 'that keys/recording-chain.key is there'}` });
  }

  const pruned = new Map<string, ChainEntry>();
  for (const e of entries) if (e.op === 'prune') pruned.set(e.file, e);
  const seals = entries.filter((e): e is SealEntry => e.op === 'seal');
  const named = new Set(entries.map((e) => e.file));
  for (const e of seals) {
    if (pruned.has(e.file)) continue;
    const file = path.join(dir, e.file);
    if (!existsSync(file)) {
      problems.push({ kind: 'removed', seq: e.seq, file: e.file, message: `removed: ${e.file} was sealed (entry ${e.seq}) and is gone, and no prune entry says retention removed it` });
      continue;
    }
    const now = hashFile(file);
    if (now.sha256 !== e.sha256 || now.size !== e.size) {
      problems.push({ kind: 'edited', seq: e.seq, file: e.file, message: `edited: ${e.file} no longer matches its seal (entry ${e.seq}): ${now.size === e.size ? 'same size, other bytes' : `${e.size} bytes sealed, ${now.size} now`}` });
    }
  }
  const recording: string[] = [];
  for (const f of readdirSync(dir).sort()) {
    if (!parseRecordingName(f) || named.has(f)) continue;
    if (openNow.has(f)) recording.push(f);
    else problems.push({ kind: 'unsealed', file: f, message: `unsealed: ${f} is in no chain entry and no process is writing it: the server stopped without sealing it and has not started since (it seals such files at start), or it was put here` });
  }
  return { ok: problems.length === 0, entries: entries.length, sealed: seals.length, pruned: pruned.size, recording, problems };
}

export interface RecordingListing {
  id: string;
  file: string;
  kind: 'cast' | 'events';
  account: string;
  ve: string;
  conn: string;
  startedAt: string;
  size: number | null;
  status: 'sealed' | 'pruned' | 'unsealed';
  sealReason?: string;
  truncated?: boolean;
}

/** Every recording the chain or the directory knows of, oldest first. */
export function listRecordings(dir: string): RecordingListing[] {
  const { entries } = readChain(path.join(dir, CHAIN_FILE));
  const out = new Map<string, RecordingListing>();
  for (const e of entries) {
    const name = parseRecordingName(e.file);
    if (!name) continue;
    if (e.op === 'seal') {
      out.set(e.file, {
        id: name.id, file: e.file, kind: e.kind, account: e.account, ve: e.ve, conn: e.conn, startedAt: e.startedAt, size: e.size,
        status: 'sealed', sealReason: e.reason, ...(e.truncated ? { truncated: true } : {}),
      });
    } else {
      const l = out.get(e.file);
      if (l) {
        l.status = 'pruned';
        l.size = null;
      }
    }
  }
  for (const f of readdirSync(dir)) {
    const name = parseRecordingName(f);
    if (!name || out.has(f)) continue;
    let size: number | null = null;
    try {
      size = statSync(path.join(dir, f)).size;
    } catch { /* gone meanwhile */ }
    out.set(f, { id: name.id, file: f, kind: name.kind, account: name.account, ve: name.ve, conn: name.conn, startedAt: name.startedAt, size, status: 'unsealed' });
  }
  return [...out.values()].sort((a, b) => (a.startedAt === b.startedAt ? a.file.localeCompare(b.file) : a.startedAt.localeCompare(b.startedAt)));
}
