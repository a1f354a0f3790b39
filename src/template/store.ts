import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import type { Logger } from '../audit/logger.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import { run, safeEnv } from '../system/exec.js';
import { requireSetupHelper } from '../system/native-helpers.js';
import { readBeneathNoFollow, resolveInRoot } from '../system/tree-read.js';
import { TEMPLATES_DIR_MODE, type Layout } from '../system/layout.js';
import { buildBusyboxRootfs } from './busybox.js';
import { buildDebianRootfs } from './debian.js';
import { sanitizeTree, type SanitizeReport } from './sanitize.js';
import { assertIdsInRange, treeSize } from './ownership.js';
import type { BuildProgress, ImportedTemplateInfo, TemplateInfo, TemplateKind } from './types.js';

export const TEMPLATE_NAME_PATTERN = /^[a-z0-9]([a-z0-9._-]{0,30}[a-z0-9])?$/;

const templateFileSchema = z.object({
  name: z.string(),
  kind: z.string(),
  createdAt: z.string(),
  init: z.array(z.string()).min(1),
  stopSignal: z.string(),
  /** Host id of the template's root on disk: 0 as built; an older vesh shifted templates to its one VE range. */
  idmapBase: z.number().int().nonnegative(),
  /** Present while the files are being shifted back from this base to 0 (see unshift). */
  unshiftFrom: z.number().int().positive().optional(),
  sizeBytes: z.number().int().nonnegative(),
});

export interface TemplateStoreOptions {
  layout: Layout;
  logger: Logger;
  /** Ids a VE has (runtime.idmapSize): a template's files must be owned by 0..idmapSize-1. */
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
 * Each is built or imported into a hidden temporary directory, checked to
 * be owned by ids a VE has, and only then renamed into place: an
 * interrupted build leaves no half template that VEs could be created on.
 * Templates stay unshifted (owned by 0..65535 as built, on disk): every VE
 * sees one through an idmapped mount in its own id range.
 */
export class TemplateStore {
  private readonly layout: Layout;
  private readonly log: Logger;
  private readonly idmapSize: number;

  constructor(opts: TemplateStoreOptions) {
    this.layout = opts.layout;
    this.log = opts.logger.child({ component: 'template' });
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
    // A template an older vesh shifted to its one VE range (idmapBase > 0) keeps working: the idmapped
    // mount maps from there (see VeMountOptions.templateBase) until unshift() moves it back.
    if (file.unshiftFrom !== undefined) {
      throw new VeshError(ErrorCodes.TEMPLATE_NOT_FOUND, `template "${name}" was being shifted back to host root's ids when vesh stopped: start "vesh serve" again, which finishes it`,
        { userMessage: 'The environment template is not available; the administrator has been told.' });
    }
    // The rootfs is always the directory next to template.json (a template dir may be a symlink to a shared cache).
    // Gone between the two reads: a "vesh template remove" renamed it away meanwhile.
    const rootfs = await fs.realpath(path.join(dir, 'rootfs')).catch(() => null);
    if (!rootfs) {
      throw new VeshError(ErrorCodes.TEMPLATE_NOT_FOUND, `template "${name}" does not exist any more (it was being removed): build or import it again`,
        { userMessage: 'The environment template is not available; the administrator has been told.' });
    }
    return { ...file, name, rootfs };
  }

  /** Templates an older vesh shifted to its one VE range (or whose shift back was cut short). */
  async shifted(): Promise<string[]> {
    const out: string[] = [];
    for (const e of (await fs.readdir(this.layout.templatesDir).catch(() => [] as string[])).sort()) {
      if (e.startsWith('.') || !TEMPLATE_NAME_PATTERN.test(e)) continue;
      const file = await this.readFile(e).catch(() => null);
      if (file && (file.idmapBase !== 0 || file.unshiftFrom !== undefined)) out.push(e);
    }
    return out;
  }

  /**
   * Shift a template an older vesh shifted to its one VE range back to ids
   * 0..idmapSize-1, in place, as templates are now kept (every VE sees it
   * in its own range through an idmapped mount). The caller guarantees that
   * no VE has it mounted meanwhile (VeManager.unshiftTemplates holds every
   * user's lock). template.json says so first (`unshiftFrom`), so a shift
   * cut short is finished by the next call, and get() refuses the template
   * until then. The tree is root's (templates/ is root-only), walked by the
   * setup helper by descriptor all the same. Returns how many entries changed.
   */
  async unshift(name: string): Promise<number> {
    assertTemplateName(name);
    const file = await this.readFile(name);
    const from = file.unshiftFrom ?? file.idmapBase;
    if (from === 0) return 0;
    const dir = await fs.realpath(this.layout.templateDir(name));
    const started = Date.now();
    await writeTemplateFile(dir, { ...file, idmapBase: 0, unshiftFrom: from });
    const res = await run(requireSetupHelper(), ['shift', path.join(dir, 'rootfs'), String(from), '0', String(this.idmapSize)], { timeoutMs: UNSHIFT_TIMEOUT_MS });
    const done: z.infer<typeof templateFileSchema> = { ...file, idmapBase: 0 };
    delete done.unshiftFrom;
    await writeTemplateFile(dir, done);
    const changed = Number(res.stdout.trim());
    this.log.info({ event: 'template.unshifted', template: name, from, changed, ms: Date.now() - started },
      `template "${name}" moved back from the VE ids ${from}.. to host root's 0..${this.idmapSize - 1} (${changed} files)`);
    return changed;
  }

  private async readFile(name: string): Promise<z.infer<typeof templateFileSchema>> {
    return templateFileSchema.parse(JSON.parse(await fs.readFile(path.join(this.layout.templateDir(name), 'template.json'), 'utf8')));
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
   *
   * The archive is untrusted: GNU tar refuses members and hard-link targets
   * with "..", a symlink that leaves the tree before something is written
   * through it, and strips a leading "/" (such members land inside the new
   * root). It runs without CAP_MKNOD, so the kernel refuses every device
   * node (skipped, counted); FIFOs, sockets and unsafe modes are dealt with
   * by sanitizeTree before the tree is checked and shared.
   */
  async importTar(name: string, file: string, opts: { onProgress?: (p: BuildProgress) => void } = {}): Promise<ImportedTemplateInfo> {
    const progress = opts.onProgress ?? (() => undefined);
    const st = await fs.stat(file).catch(() => null);
    if (!st?.isFile()) {
      throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `${file} is not a readable file: give the path of a tar archive of a root filesystem`);
    }
    let skippedDevices = 0;
    let report: SanitizeReport | null = null;
    const info = await this.install(name, 'import', async (rootfs) => {
      await fs.mkdir(rootfs, { mode: 0o755 });
      progress({ fraction: 0.1, message: 'unpacking' });
      skippedDevices = await unpackUntrustedTar(path.resolve(file), rootfs);
      // A root directory is root's and 0755, whatever the archive's "./" said
      // (GNU tar 1.34 leaves an existing directory 0700 with --no-overwrite-dir).
      await fs.chmod(rootfs, 0o755);
      progress({ fraction: 0.8, message: 'removing devices, FIFOs and unsafe permissions' });
      report = await sanitizeTree(rootfs);
      return detectInit(rootfs, file);
    }, progress);
    const r = report as SanitizeReport | null;
    this.log.info({
      event: 'template.imported', template: name, file, sizeBytes: info.sizeBytes,
      skippedDevices, removedSpecialFiles: r?.removedCount ?? 0, clampedModes: r?.clampedCount ?? 0,
      ...(r && r.removedCount > 0 ? { removed: r.removed } : {}),
      ...(r && r.clampedCount > 0 ? { clamped: r.clamped } : {}),
    });
    return { ...info, imported: { skippedDevices, removedSpecialFiles: r?.removedCount ?? 0, clampedModes: r?.clampedCount ?? 0 } };
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
    // Root only (see prepareDataDir): a template is owned by host root's ids on disk, its setuid files included.
    await fs.mkdir(this.layout.templatesDir, { recursive: true, mode: TEMPLATES_DIR_MODE });
    await fs.chmod(this.layout.templatesDir, TEMPLATES_DIR_MODE);
    const tmp = path.join(this.layout.templatesDir, `.build-${name}-${randomBytes(4).toString('hex')}`);
    await fs.mkdir(tmp, { mode: TEMPLATES_DIR_MODE });
    try {
      const rootfs = path.join(tmp, 'rootfs');
      const { init, stopSignal } = await make(rootfs);
      progress({ fraction: 0.97, message: 'checking ownership' });
      await assertIdsInRange(rootfs, this.idmapSize);
      const sizeBytes = await treeSize(rootfs);
      // Unshifted: template root is host root on disk (see the class comment).
      const file = { name, kind, createdAt: new Date().toISOString(), init, stopSignal, idmapBase: 0, sizeBytes };
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

/** A few thousand entries per second at the least; a whole distribution is tens of thousands. */
const UNSHIFT_TIMEOUT_MS = 10 * 60_000;

/** template.json replaced atomically (temp file, fsync, rename): a crash leaves the old or the new one. */
async function writeTemplateFile(dir: string, value: unknown): Promise<void> {
  const tmp = path.join(dir, `.template.json.${process.pid}.tmp`);
  const fh = await fs.open(tmp, 'w', 0o644);
  try {
    await fh.writeFile(`${JSON.stringify(value, null, 2)}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.rename(tmp, path.join(dir, 'template.json'));
}

export function assertTemplateName(name: string): void {
  if (!TEMPLATE_NAME_PATTERN.test(name)) {
    throw new VeshError(ErrorCodes.INVALID_NAME, `"${name}" is not a valid template name: use 1-32 lower-case letters, digits, ".", "_" or "-", starting and ending with a letter or digit`);
  }
}

/**
 * Unpack `file` into `rootfs` as root, keeping owners and modes (sanitizeTree
 * and the ownership check come after), but with only the capabilities that
 * needs: without CAP_MKNOD the kernel refuses every device node, whatever
 * the archive says; without CAP_SYS_ADMIN no trusted.* attribute (overlayfs
 * reads those) can be set; only user.* attributes are restored at all.
 * Returns how many device nodes were skipped; any other error refuses the
 * archive.
 */
async function unpackUntrustedTar(file: string, rootfs: string): Promise<number> {
  const res = await run('setpriv', [
    '--bounding-set=-all,+chown,+dac_override,+dac_read_search,+fowner,+fsetid', '--inh-caps=-all', '--no-new-privs', '--',
    'tar', '--numeric-owner', '--same-owner', '--same-permissions', '--no-overwrite-dir', '--xattrs', '--xattrs-include=user.*',
    '-xf', file, '-C', rootfs,
  ], { allowFailure: true, env: safeEnv({ LC_ALL: 'C' }), timeoutMs: UNPACK_TIMEOUT_MS, maxOutputBytes: 1024 * 1024 });
  // tar quotes member names (a newline in one is "\n"), so each line is one message.
  const lines = res.stderr.split('\n').filter((l) => l.trim() !== '');
  const devices = lines.filter((l) => /^tar: .*: Cannot mknod: Operation not permitted$/.test(l)).length;
  const errors = lines.filter((l) => !/^tar: .*: Cannot mknod: Operation not permitted$/.test(l)
    && !/^tar: Exiting with failure status due to previous errors$/.test(l)
    && !/^tar: Removing leading `[^']*' from (member names|hard link targets)$/.test(l));
  if (res.code !== 0 && (errors.length > 0 || devices === 0)) {
    const why = errors[0] ?? lines[lines.length - 1] ?? `exit ${res.code}`;
    throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `${file} was refused (${why.replace(/^tar: /, '')}${errors.length > 1 ? `, and ${errors.length - 1} more problem(s)` : ''}): give a tar of a root filesystem whose members stay inside it (no "..", no links out of it); nothing was imported`);
  }
  return devices;
}

/** A tar of a whole distribution unpacks in a minute or two even on a slow disk; far beyond that, something is wrong. */
const UNPACK_TIMEOUT_MS = 30 * 60_000;
/** /etc/inittab is a few KiB; only whether it mentions ctrlaltdel matters. */
const INITTAB_MAX_BYTES = 256 * 1024;

/**
 * Which init the imported root has, and how to ask it to power off. Every
 * path is resolved inside the new root (an absolute symlink such as
 * /sbin -> /usr/sbin means the root's own /usr/sbin, never the host's), and
 * files are read with readBeneathNoFollow: a FIFO or device reads as
 * nothing instead of hanging the import or touching hardware.
 */
async function detectInit(rootfs: string, file: string): Promise<{ init: string[]; stopSignal: string }> {
  const initLink = await resolveInRoot(rootfs, 'sbin/init', { keepLast: true });
  const lst = initLink ? await fs.lstat(path.join(rootfs, initLink)).catch(() => null) : null;
  const resolved = await resolveInRoot(rootfs, 'sbin/init');
  const target = resolved ? await fs.lstat(path.join(rootfs, resolved)).catch(() => null) : null;
  if (!lst || !target?.isFile()) {
    throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `${file} has no /sbin/init${lst ? ' that is a regular file' : ''}: a VE needs an init as PID 1 (install sysvinit-core, busybox or systemd in it before exporting)`);
  }
  const link = lst.isSymbolicLink() ? await fs.readlink(path.join(rootfs, initLink!)) : '';
  if (link.includes('busybox')) return { init: ['/sbin/init'], stopSignal: 'SIGUSR2' };
  if (link.includes('systemd')) return { init: ['/sbin/init'], stopSignal: 'SIGRTMIN+3' };
  const inittabPath = await resolveInRoot(rootfs, 'etc/inittab');
  const inittab = inittabPath ? (await readBeneathNoFollow(rootfs, inittabPath, INITTAB_MAX_BYTES)) ?? '' : '';
  if (/ctrlaltdel/.test(inittab)) return { init: ['/sbin/init'], stopSignal: 'SIGINT' };
  return { init: ['/sbin/init'], stopSignal: 'SIGTERM' };
}
