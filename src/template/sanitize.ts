import { promises as fs } from 'node:fs';
import path from 'node:path';

/** What sanitizeTree changed in an unpacked root filesystem, for the import's log line and the admin. */
export interface SanitizeReport {
  /** Character and block devices, FIFOs and sockets removed (paths relative to the root, first few). */
  removed: string[];
  removedCount: number;
  /** Files and directories whose mode was narrowed (world-writable, setuid/setgid where not allowed). */
  clampedCount: number;
  clamped: string[];
}

const KEEP_NAMES = 20;

/**
 * Make an unpacked, not yet shared root filesystem safe to be every VE's
 * lower layer. Walked with lstat, never following a symlink; no one else
 * can change the tree meanwhile (it sits in a root-only build directory
 * until it is renamed into place), so path-based calls see what lstat saw.
 *
 * - Devices, FIFOs and sockets go: a VE gets its /dev from the engine, so
 *   a template needs none, and a FIFO or a device is what would make host
 *   code that reads template files block or touch hardware.
 * - Nothing is world-writable except directories with the sticky bit (/tmp):
 *   a world-writable file in the shared layer would let any user of a VE
 *   change what its root runs.
 * - setuid/setgid stay only on regular files owned by the template's root
 *   (sudo, su, passwd, crontab: a VE needs them for its plain users). On
 *   disk they are host root's setuid files, reachable by host root only
 *   (templates/ is 0700); a VE sees them through an idmapped mount in its
 *   own range, so inside a VE they yield VE root at most, and every host
 *   view of VE files is nosuid.
 *   setgid stays on directories too (group inheritance, no privilege).
 */
export async function sanitizeTree(root: string): Promise<SanitizeReport> {
  const report: SanitizeReport = { removed: [], removedCount: 0, clampedCount: 0, clamped: [] };
  const visit = async (rel: string): Promise<void> => {
    const p = path.join(root, rel);
    const st = await fs.lstat(p);
    if (st.isSymbolicLink()) return;
    if (st.isCharacterDevice() || st.isBlockDevice() || st.isFIFO() || st.isSocket()) {
      await fs.unlink(p);
      report.removedCount++;
      if (report.removed.length < KEEP_NAMES) report.removed.push(rel || '.');
      return;
    }
    const mode = st.mode & 0o7777;
    const want = allowedMode(mode, st.isDirectory(), st.uid);
    if (want !== mode) {
      // chmod follows symlinks: p was just seen not to be one, and nothing else writes this tree.
      await fs.chmod(p, want);
      report.clampedCount++;
      if (report.clamped.length < KEEP_NAMES) report.clamped.push(`${rel || '.'} (${mode.toString(8)} -> ${want.toString(8)})`);
    }
    if (st.isDirectory()) {
      for (const e of (await fs.readdir(p)).sort()) await visit(rel ? `${rel}/${e}` : e);
    }
  };
  await visit('');
  return report;
}

/** The mode a template entry may keep (see sanitizeTree); `uid` is the owner as unpacked. */
export function allowedMode(mode: number, isDirectory: boolean, uid: number): number {
  let m = mode & 0o7777;
  if (isDirectory) {
    m &= ~0o4000;
    if ((m & 0o002) !== 0 && (m & 0o1000) === 0) m &= ~0o002;
    return m;
  }
  m &= ~0o002;
  if (uid !== 0) m &= ~0o6000;
  return m;
}
