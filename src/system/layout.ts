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
 * Make dataDir and ves/ traversable by everyone (mode 0711, not listable):
 * runc's init runs as the VE's unprivileged host uid while it mounts the
 * VE's rootfs, so every directory above a VE must let that uid pass.
 */
export async function prepareDataDir(layout: Layout): Promise<void> {
  await assertAncestorsSearchable(layout.dataDir);
  for (const d of [layout.dataDir, layout.vesDir]) {
    await fs.mkdir(d, { recursive: true, mode: 0o711 });
    const st = await fs.stat(d);
    if ((st.mode & 0o011) !== 0o011) await fs.chmod(d, (st.mode & 0o7777) | 0o011);
  }
  await fs.mkdir(layout.locksDir, { recursive: true, mode: 0o700 });
}

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
