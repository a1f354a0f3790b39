import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { ErrorCodes, VeshError } from '../errors.js';
import { safeEnv } from '../system/exec.js';
import { mirrorsFor, readAptSources } from './apt-sources.js';
import { MOTD, SYSVINIT_INITTAB } from './init-files.js';
import type { BuildProgress } from './types.js';

export const DEBIAN_RELEASE = 'bookworm';

/** Bump when the package list or the VE configuration below changes (test caches key on it). */
export const DEBIAN_RECIPE_VERSION = 2;

/**
 * What the contract needs on top of minbase: a shell, ps/top, ip, ping,
 * mount & co., sftp-server for file transfer, ssh/rsync/git for work,
 * a pager, editors, tmux and screen, and sysvinit as PID 1 (a real init that reaps,
 * runs enabled services and turns reboot/poweroff into VE restart/stop).
 */
export const DEBIAN_PACKAGES = [
  'bash', 'procps', 'iproute2', 'iputils-ping', 'util-linux', 'openssh-sftp-server', 'openssh-client',
  'rsync', 'git', 'less', 'vim-tiny', 'nano', 'tmux', 'screen', 'sysvinit-core', 'init-system-helpers', 'ca-certificates',
];

/** mmdebstrap's "I: …" lines, in the order they come, with where we are then. */
const PHASES: Array<[RegExp, number, string]> = [
  [/chroot architecture/, 0.02, 'preparing'],
  [/running apt-get update/, 0.05, 'reading package lists'],
  [/downloading packages/, 0.15, 'downloading essential packages'],
  [/extracting archives/, 0.35, 'extracting'],
  [/installing essential packages/, 0.45, 'installing essential packages'],
  [/installing remaining packages/, 0.6, 'installing packages'],
  [/cleaning package lists/, 0.9, 'cleaning up'],
  [/success in/, 0.95, 'done'],
];

/**
 * Build Debian minbase with DEBIAN_PACKAGES into `rootfs` (which must not
 * exist) with mmdebstrap, from the mirrors this host's apt is configured
 * with (read at run time, never a hard-coded mirror), then make it a VE:
 * inittab without gettys and with shutdown markers, the VE's own hostname
 * and hosts files written at VE creation, apt caches emptied.
 */
export async function buildDebianRootfs(rootfs: string, onProgress: (p: BuildProgress) => void): Promise<void> {
  const sources = await readAptSources();
  const mirrors = mirrorsFor(sources, DEBIAN_RELEASE);
  if (!mirrors) {
    throw new VeshError(ErrorCodes.TEMPLATE_BUILD_FAILED, `apt on this host has no source for Debian ${DEBIAN_RELEASE} (looked in /etc/apt/sources.list and /etc/apt/sources.list.d): add one, or import a root filesystem with "vesh template import NAME FILE.tar"`);
  }
  const args = [
    '--variant=minbase',
    '--mode=root',
    '--format=directory',
    `--include=${DEBIAN_PACKAGES.join(',')}`,
    // Manuals, docs and translations are not needed in every VE's common file system.
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    '--aptopt=Acquire::Retries "3"',
    DEBIAN_RELEASE,
    rootfs,
    ...mirrors,
  ];
  onProgress({ fraction: 0, message: `mmdebstrap from ${mirrors[0]!.split(' ')[1]}` });
  await runMmdebstrap(args, onProgress);
  onProgress({ fraction: 0.96, message: 'configuring init' });
  await configureDebianRootfs(rootfs);
}

function runMmdebstrap(args: string[], onProgress: (p: BuildProgress) => void): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('mmdebstrap', args, { env: safeEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    const tail: string[] = [];
    let buf = '';
    const onData = (d: Buffer) => {
      buf += d.toString('utf8');
      let i: number;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line) continue;
        tail.push(line);
        if (tail.length > 20) tail.shift();
        for (const [re, fraction, message] of PHASES) {
          if (re.test(line)) onProgress({ fraction, message });
        }
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('error', (err: NodeJS.ErrnoException) => {
      reject(err.code === 'ENOENT'
        ? new VeshError(ErrorCodes.COMMAND_MISSING, 'mmdebstrap is not installed: install it with "apt-get install mmdebstrap"')
        : err);
    });
    child.on('close', (code, signal) => {
      if (code === 0) resolve();
      else reject(new VeshError(ErrorCodes.TEMPLATE_BUILD_FAILED, `mmdebstrap failed (${signal ?? `exit ${code}`}): ${tail.slice(-5).join(' | ')}`));
    });
  });
}

async function configureDebianRootfs(rootfs: string): Promise<void> {
  const w = async (rel: string, content: string, mode = 0o644) => {
    const p = path.join(rootfs, rel);
    await fs.rm(p, { force: true });
    await fs.writeFile(p, content, { mode });
    await fs.chmod(p, mode);
  };
  await w('etc/inittab', SYSVINIT_INITTAB);
  await w('etc/motd', MOTD);
  // mmdebstrap copies the host's; each VE gets its own at creation.
  await w('etc/hostname', 've\n');
  await w('etc/hosts', '127.0.0.1 localhost\n');
  // No hardware clock, consoles or kernel modules in a VE: those boot scripts
  // would only print errors. Services VE root enables still start.
  for (const dir of ['rcS.d', 'rc0.d', 'rc6.d']) {
    for (const link of await fs.readdir(path.join(rootfs, 'etc', dir)).catch(() => [] as string[])) {
      if (/^[SK]\d\d(hwclock\.sh|brightness|checkroot\.sh|checkfs\.sh|procps|umountroot)$/.test(link)) {
        await fs.rm(path.join(rootfs, 'etc', dir, link), { force: true });
      }
    }
  }
  await fs.rm(path.join(rootfs, 'var/cache/apt/archives'), { recursive: true, force: true });
  await fs.mkdir(path.join(rootfs, 'var/cache/apt/archives/partial'), { recursive: true });
  await fs.rm(path.join(rootfs, 'var/lib/apt/lists'), { recursive: true, force: true });
  await fs.mkdir(path.join(rootfs, 'var/lib/apt/lists/partial'), { recursive: true });
  // Root logs in with bash and a prompt that names the VE: root@alice:~#
  const passwd = await fs.readFile(path.join(rootfs, 'etc/passwd'), 'utf8');
  await w('etc/passwd', passwd.replace(/^root:([^:]*):0:0:([^:]*):\/root:\/bin\/sh$/m, 'root:$1:0:0:$2:/root:/bin/bash'));
}
