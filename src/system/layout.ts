import { promises as fs } from 'node:fs';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { ErrorCodes, VeshError } from '../errors.js';

/**
 * Where everything lives. One dataDir holds templates, VEs and state; the
 * short instance id derived from it keeps runtime state, cgroups, veths and
 * firewall tables of two vesh instances (a test's and the real one) apart.
 */
export interface Layout {
  dataDir: string;
  instanceId: string;
  templatesDir: string;
  vesDir: string;
  locksDir: string;
  /** runc --root: tmpfs, so engine state disappears with a host reboot as containers do. */
  runtimeRoot: string;
  /** Sockets and pid files of the VEs' session agents: root-only, on the host, never inside a VE. */
  agentsDir: string;
  /** Parent cgroup path of every VE of this instance. */
  cgroupParent: string;
  templateDir(name: string): string;
  templateRootfs(name: string): string;
  veDir(name: string): string;
}

export function makeLayout(dataDir: string): Layout {
  const abs = path.resolve(dataDir);
  const instanceId = createHash('sha256').update(abs).digest('hex').slice(0, 6);
  return {
    dataDir: abs,
    instanceId,
    templatesDir: path.join(abs, 'templates'),
    vesDir: path.join(abs, 'ves'),
    locksDir: path.join(abs, 'locks'),
    runtimeRoot: path.join('/run/vesh', instanceId, 'runc'),
    agentsDir: path.join('/run/vesh', instanceId, 'agents'),
    cgroupParent: `/vesh-${instanceId}`,
    templateDir: (name) => path.join(abs, 'templates', name),
    templateRootfs: (name) => path.join(abs, 'templates', name, 'rootfs'),
    veDir: (name) => path.join(abs, 'ves', name),
  };
}

/**
 * Mode of the directory that holds a VE's tree (ves/NAME/): owner root,
 * group the VE's host gid (VE root's), 0710. runc's init runs
 * as VE root's unprivileged host uid/gid while it mounts the VE's rootfs
 * and /run/vesh, so that group must pass through; no other host user may,
 * so none can reach a file VE root made (a setuid copy of a shell, say).
 */
export const VE_TREE_DIR_MODE = 0o710;

/**
 * Give `dir` (made by us, root's) owner root, group `veGid` and `mode`
 * (VE_TREE_DIR_MODE unless said) when it has anything else: a directory
 * from an older vesh (other modes, the one shared VE group) is fixed at
 * its next use.
 */
export async function secureVeTreeDir(dir: string, veGid: number, mode: number = VE_TREE_DIR_MODE): Promise<void> {
  const st = await fs.lstat(dir);
  if (!st.isDirectory()) {
    throw new VeshError(ErrorCodes.CONFIG_INVALID, `${dir} is not a directory (a symlink or a file is there): vesh keeps VE trees in it; move that away`);
  }
  if (st.uid !== 0 || st.gid !== veGid) await fs.lchown(dir, 0, veGid);
  if ((st.mode & 0o7777) !== mode) await fs.chmod(dir, mode);
}

/**
 * Mode of dataDir and ves/: every VE's init (each VE has host ids of its
 * own) passes through them to its ves/NAME, so they cannot be closed to one
 * group; search only, no listing. What holds VE files is closed below them:
 * ves/NAME (VE_TREE_DIR_MODE, the VE's own group), templates/ and locks/
 * (root only).
 */
export const VE_AREA_DIR_MODE = 0o711;

/**
 * Make dataDir and ves/ (see VE_AREA_DIR_MODE) and templates/ (root only:
 * the overlay reads its lower layer with the mounting process's, root's,
 * credentials, and a template is owned by host root's ids on disk, its
 * setuid files included, so no other host user may reach them).
 */
export async function prepareDataDir(layout: Layout): Promise<void> {
  await assertAncestorsSearchable(layout.dataDir);
  for (const d of [layout.dataDir, layout.vesDir]) {
    await fs.mkdir(d, { recursive: true, mode: VE_AREA_DIR_MODE });
    await secureVeTreeDir(d, 0, VE_AREA_DIR_MODE);
  }
  const templates = await fs.lstat(layout.templatesDir).catch(() => null);
  if (templates?.isDirectory() && (templates.mode & 0o077) !== 0) await fs.chmod(layout.templatesDir, TEMPLATES_DIR_MODE);
  await fs.mkdir(layout.locksDir, { recursive: true, mode: 0o700 });
}

/** templates/ and every template's directory: root only (see prepareDataDir). */
export const TEMPLATES_DIR_MODE = 0o700;

/**
 * Every directory above dataDir must be searchable by others: the VE's init
 * (an unprivileged host uid) walks through them to its root filesystem.
 * A private temp dir (mode 0700) above dataDir would fail every start with a
 * bare "permission denied" from the runtime; say what to fix instead.
 */
async function assertAncestorsSearchable(dataDir: string): Promise<void> {
  const blocked = await firstUnsearchableAncestor(dataDir);
  if (blocked) {
    throw new VeshError(ErrorCodes.CONFIG_INVALID, `${blocked.dir} (above dataDir ${dataDir}) is not searchable by other users (mode ${blocked.mode.toString(8)}): VE inits run as unprivileged host users and must pass through it; run "chmod o+x ${blocked.dir}" or choose another dataDir`);
  }
}

/** The first directory above `dataDir` that others may not pass through, if any. */
export async function firstUnsearchableAncestor(dataDir: string): Promise<{ dir: string; mode: number } | null> {
  let dir = path.dirname(path.resolve(dataDir));
  for (;;) {
    const st = await fs.stat(dir).catch(() => null);
    if (st && (st.mode & 0o001) === 0) return { dir, mode: st.mode & 0o777 };
    const up = path.dirname(dir);
    if (up === dir) return null;
    dir = up;
  }
}
