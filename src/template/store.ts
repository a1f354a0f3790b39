import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import type { Logger } from '../audit/logger.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import { run } from '../system/exec.js';
import { TEMPLATES_DIR_MODE, type Layout } from '../system/layout.js';
import { buildBusyboxRootfs } from './busybox.js';
import { buildDebianRootfs } from './debian.js';
import { shiftOwnership, treeSize } from './shift.js';
import type { BuildProgress, TemplateInfo, TemplateKind } from './types.js';

export const TEMPLATE_NAME_PATTERN = /^[a-z0-9]([a-z0-9._-]{0,30}[a-z0-9])?$/;

const templateFileSchema = z.object({
  name: z.string(),
  kind: z.string(),
  createdAt: z.string(),
  init: z.array(z.string()).min(1),
  stopSignal: z.string(),
  idmapBase: z.number().int(),
  sizeBytes: z.number().int().nonnegative(),
});

export interface TemplateStoreOptions {
  layout: Layout;
  logger: Logger;
  idmapBase: number;
  idmapSize: number;
}

export interface BuildOptions {
  /** Store under another name than the kind. */
  name?: string;
  onProgress?: (p: BuildProgress) => void;
}

/**
 * Templates: read-only root filesystems shared by every VE built on them
 * (the overlay lower layer), under dataDir/templates/NAME/{rootfs,template.json}.
 * Each is built or imported into a hidden temporary directory, shifted into
 * the VE id range, and only then renamed into place: an interrupted build
 * leaves no half template that VEs could be created on.
 */
export class TemplateStore {
  private readonly layout: Layout;
  private readonly log: Logger;
  private readonly idmapBase: number;
  private readonly idmapSize: number;

  constructor(opts: TemplateStoreOptions) {
    this.layout = opts.layout;
    this.log = opts.logger.child({ component: 'template' });
    this.idmapBase = opts.idmapBase;
    this.idmapSize = opts.idmapSize;
  }

  async get(name: string): Promise<TemplateInfo> {
    assertTemplateName(name);
    const dir = this.layout.templateDir(name);
    let raw: string;
    try {
      raw = await fs.readFile(path.join(dir, 'template.json'), 'utf8');
    } catch {
      const known = (await this.list()).map((t) => t.name);
      throw new VeshError(ErrorCodes.TEMPLATE_NOT_FOUND,
        `template "${name}" does not exist${known.length ? ` (have: ${known.join(', ')})` : ''}: build it with "vesh template build debian|busybox" or import one with "vesh template import ${name} FILE.tar"`,
        { userMessage: 'The environment template is not available; the administrator has been told.' });
    }
    let file: z.infer<typeof templateFileSchema>;
    try {
      file = templateFileSchema.parse(JSON.parse(raw));
    } catch (err) {
      throw new VeshError(ErrorCodes.TEMPLATE_NOT_FOUND, `template "${name}" has a damaged template.json (${errorMessage(err)}): rebuild or re-import it`);
    }
    if (file.idmapBase !== this.idmapBase) {
      throw new VeshError(ErrorCodes.TEMPLATE_NOT_FOUND, `template "${name}" was made for VE ids from ${file.idmapBase}, but runtime.idmapBase is ${this.idmapBase}: rebuild it ("vesh template build") or set idmapBase back`);
    }
    // The rootfs is always the directory next to template.json (a template dir may be a symlink to a shared cache).
    const rootfs = await fs.realpath(path.join(dir, 'rootfs'));
    return { ...file, name, rootfs };
  }

  async list(): Promise<TemplateInfo[]> {
    const entries = await fs.readdir(this.layout.templatesDir).catch(() => [] as string[]);
    const out: TemplateInfo[] = [];
    for (const e of entries.sort()) {
      if (e.startsWith('.') || !TEMPLATE_NAME_PATTERN.test(e)) continue;
      try {
        out.push(await this.get(e));
      } catch (err) {
        this.log.warn({ event: 'template.unreadable', template: e, err: errorMessage(err) });
      }
    }
    return out;
  }

  async build(kind: TemplateKind, opts: BuildOptions = {}): Promise<TemplateInfo> {
    const name = opts.name ?? kind;
    const progress = opts.onProgress ?? (() => undefined);
    const started = Date.now();
    const info = await this.install(name, kind, async (rootfs) => {
      if (kind === 'busybox') {
        progress({ fraction: 0.1, message: 'copying busybox' });
        await fs.mkdir(rootfs, { mode: 0o755 });
        await buildBusyboxRootfs(rootfs);
        return { init: ['/sbin/init'], stopSignal: 'SIGUSR2' };
      }
      await buildDebianRootfs(rootfs, progress);
      return { init: ['/sbin/init'], stopSignal: 'SIGINT' };
    }, progress);
    this.log.info({ event: 'template.built', template: name, kind, ms: Date.now() - started, sizeBytes: info.sizeBytes });
    return info;
  }

  /**
   * Import a root filesystem from a tar archive (as made by `tar -C root -c .`
   * or `docker export`). It must have an init: /sbin/init (busybox or
   * sysvinit are recognised for clean shutdown; anything else gets SIGTERM).
   */
  async importTar(name: string, file: string, opts: { onProgress?: (p: BuildProgress) => void } = {}): Promise<TemplateInfo> {
    const progress = opts.onProgress ?? (() => undefined);
    const st = await fs.stat(file).catch(() => null);
    if (!st?.isFile()) {
      throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `${file} is not a readable file: give the path of a tar archive of a root filesystem`);
    }
    const info = await this.install(name, 'import', async (rootfs) => {
      await fs.mkdir(rootfs, { mode: 0o755 });
      progress({ fraction: 0.1, message: 'unpacking' });
      const res = await run('tar', ['--numeric-owner', '--same-permissions', '--xattrs', '--xattrs-include=*', '-xf', path.resolve(file), '-C', rootfs], { allowFailure: true });
      if (res.code !== 0) {
        throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `${file} could not be unpacked as a tar archive (${res.stderr.trim().split('\n').slice(-1)[0] ?? `exit ${res.code}`}): give a tar of a root filesystem`);
      }
      return detectInit(rootfs, file);
    }, progress);
    this.log.info({ event: 'template.imported', template: name, file, sizeBytes: info.sizeBytes });
    return info;
  }

  /** Remove a template no VE uses. `usersOf` names the VEs built on it. */
  async remove(name: string, usersOf: (template: string) => Promise<string[]>): Promise<void> {
    await this.get(name);
    const users = await usersOf(name);
    if (users.length > 0) {
      throw new VeshError(ErrorCodes.TEMPLATE_IN_USE, `template "${name}" is used by ${users.length} VE(s) (${users.slice(0, 5).join(', ')}${users.length > 5 ? ', …' : ''}): destroy them first`);
    }
    const dir = this.layout.templateDir(name);
    const lst = await fs.lstat(dir);
    const trash = path.join(this.layout.templatesDir, `.removing-${name}-${randomBytes(3).toString('hex')}`);
    await fs.rename(dir, trash);
    await fs.rm(trash, { recursive: !lst.isSymbolicLink(), force: true });
    this.log.info({ event: 'template.removed', template: name });
  }

  private async install(
    name: string,
    kind: string,
    make: (rootfs: string) => Promise<{ init: string[]; stopSignal: string }>,
    progress: (p: BuildProgress) => void,
  ): Promise<TemplateInfo> {
    assertTemplateName(name);
    const final = this.layout.templateDir(name);
    if (await fs.lstat(final).catch(() => null)) {
      throw new VeshError(ErrorCodes.TEMPLATE_EXISTS, `template "${name}" already exists: remove it first ("vesh template remove ${name}") or choose another name`);
    }
    // Root only (see prepareDataDir): a template's setuid files belong to VE root's host uid.
    await fs.mkdir(this.layout.templatesDir, { recursive: true, mode: TEMPLATES_DIR_MODE });
    await fs.chmod(this.layout.templatesDir, TEMPLATES_DIR_MODE);
    const tmp = path.join(this.layout.templatesDir, `.build-${name}-${randomBytes(4).toString('hex')}`);
    await fs.mkdir(tmp, { mode: TEMPLATES_DIR_MODE });
    try {
      const rootfs = path.join(tmp, 'rootfs');
      const { init, stopSignal } = await make(rootfs);
      progress({ fraction: 0.97, message: 'shifting ownership into the VE id range' });
      await shiftOwnership(rootfs, this.idmapBase, this.idmapSize);
      const sizeBytes = await treeSize(rootfs);
      const file = { name, kind, createdAt: new Date().toISOString(), init, stopSignal, idmapBase: this.idmapBase, sizeBytes };
      await fs.writeFile(path.join(tmp, 'template.json'), `${JSON.stringify(file, null, 2)}\n`);
      if (await fs.lstat(final).catch(() => null)) {
        throw new VeshError(ErrorCodes.TEMPLATE_EXISTS, `template "${name}" was made by someone else meanwhile: nothing changed`);
      }
      await fs.rename(tmp, final);
      progress({ fraction: 1, message: 'done' });
      return { ...file, rootfs: path.join(final, 'rootfs') };
    } catch (err) {
      await fs.rm(tmp, { recursive: true, force: true }).catch(() => undefined);
      if (err instanceof VeshError) throw err;
      throw new VeshError(ErrorCodes.TEMPLATE_BUILD_FAILED, `template "${name}" could not be made: ${errorMessage(err)}`, { cause: err });
    }
  }
}

export function assertTemplateName(name: string): void {
  if (!TEMPLATE_NAME_PATTERN.test(name)) {
    throw new VeshError(ErrorCodes.INVALID_NAME, `"${name}" is not a valid template name: use 1-32 lower-case letters, digits, ".", "_" or "-", starting and ending with a letter or digit`);
  }
}

async function detectInit(rootfs: string, file: string): Promise<{ init: string[]; stopSignal: string }> {
  const init = path.join(rootfs, 'sbin/init');
  const lst = await fs.lstat(init).catch(() => null);
  if (!lst) {
    throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `${file} has no /sbin/init: a VE needs an init as PID 1 (install sysvinit-core, busybox or systemd in it before exporting)`);
  }
  const target = lst.isSymbolicLink() ? await fs.readlink(init) : '';
  if (target.includes('busybox')) return { init: ['/sbin/init'], stopSignal: 'SIGUSR2' };
  if (target.includes('systemd')) return { init: ['/sbin/init'], stopSignal: 'SIGRTMIN+3' };
  const inittab = await fs.readFile(path.join(rootfs, 'etc/inittab'), 'utf8').catch(() => '');
  if (/ctrlaltdel/.test(inittab)) return { init: ['/sbin/init'], stopSignal: 'SIGINT' };
  return { init: ['/sbin/init'], stopSignal: 'SIGTERM' };
}
