import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';

/**
 * Take a vesh VE backup apart and put it back together with a valid
 * whole-file checksum (see src/ve/backup.ts for the layout): what an
 * attacker who writes the file can do, so tests reach the checks behind the
 * checksum.
 */
export function resealBackup(src: string, dst: string, change: { manifest?: (m: Record<string, any>) => Record<string, any>; body?: (b: Buffer) => Buffer }): void {
  const all = readFileSync(src);
  const end = all.length - 40;
  const len = Number(all.readBigUInt64BE(end - 8));
  const manifestAt = end - 8 - len;
  let body: Buffer = all.subarray(0, manifestAt);
  let manifest = JSON.parse(all.subarray(manifestAt, end - 8).toString('utf8')) as Record<string, any>;
  if (change.manifest) manifest = change.manifest(manifest);
  if (change.body) body = change.body(Buffer.from(body));
  const json = Buffer.from(JSON.stringify(manifest));
  const lenBuf = Buffer.alloc(8);
  lenBuf.writeBigUInt64BE(BigInt(json.length));
  const head = Buffer.concat([body, json, lenBuf]);
  writeFileSync(dst, Buffer.concat([head, createHash('sha256').update(head).digest(), Buffer.from('VESHEND1')]));
}

/** The manifest of a backup file. */
export function backupManifest(file: string): Record<string, any> {
  const all = readFileSync(file);
  const end = all.length - 40;
  const len = Number(all.readBigUInt64BE(end - 8));
  return JSON.parse(all.subarray(end - 8 - len, end - 8).toString('utf8')) as Record<string, any>;
}
