import { promises as fs } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { ErrorCodes, VeshError } from '../errors.js';

/** What a VE is, kept in ves/NAME/ve.json. Runtime state (running or not) is asked of the engine, never stored. */
export const veRecordSchema = z.object({
  name: z.string(),
  template: z.string(),
  limits: z.object({ memory: z.number(), pids: z.number(), cpus: z.number(), disk: z.number() }),
  address: z.string(),
  hostVeth: z.string(),
  onBoot: z.boolean().default(false),
  createdAt: z.string(),
  /**
   * The VE's own host uid/gid range (its root is `base`), chosen at create,
   * kept while the VE exists. Absent in a record of a VE made when all VEs
   * shared runtime.idmapBase: it gets one at its next start (see VeManager).
   */
  ids: z.object({ base: z.number().int().min(1), size: z.number().int().min(65_536) }).optional(),
  /** Present while the VE's files are being moved from this base (the old shared range) to `ids`. */
  idsFrom: z.number().int().min(1).optional(),
});
export type VeRecord = z.infer<typeof veRecordSchema>;

export async function readRecord(file: string): Promise<VeRecord | null> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  const parsed = veRecordSchema.safeParse(JSON.parse(text));
  if (!parsed.success) {
    throw new VeshError(ErrorCodes.INTERNAL, `the VE state file ${file} is damaged (${parsed.error.issues[0]?.message}): restore it from a backup or destroy the VE with --force`);
  }
  return parsed.data;
}

/** Write a JSON file atomically: temp file in the same directory, fsync, rename. */
export async function writeJsonAtomic(file: string, value: unknown): Promise<void> {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  const fh = await fs.open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(JSON.stringify(value, null, 2) + '\n');
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.rename(tmp, file);
}
