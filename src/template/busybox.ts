import { promises as fs } from 'node:fs';
import path from 'node:path';
import { ErrorCodes, VeshError } from '../errors.js';
import { binaryLinkage } from '../system/elf.js';
import { run } from '../system/exec.js';
import { BUSYBOX_INITTAB, BUSYBOX_RCK, BUSYBOX_RCS, MOTD, busyboxShutdownScript } from './init-files.js';

const NOHUP_SCRIPT = `#!/bin/sh
# nohup for the busybox template: ignore hangups; output to nohup.out when it would go to a terminal.
[ $# -gt 0 ] || { echo "usage: nohup COMMAND [ARG]..." >&2; exit 125; }
trap '' HUP
if [ -t 1 ]; then exec >>nohup.out || exec >>"$HOME/nohup.out"; fi
if [ -t 2 ]; then exec 2>&1; fi
exec "$@"
`;

/** Where Debian's busybox-static puts its binary. */
const BUSYBOX_BINARY = '/bin/busybox';

/**
 * A small VE root filesystem from the host's static busybox: one binary with
 * its applets as symlinks, busybox init as PID 1. Builds in well under a
 * second; the test suite and the density benchmark use it.
 */
export async function buildBusyboxRootfs(rootfs: string): Promise<void> {
  const linkage = await binaryLinkage(BUSYBOX_BINARY);
  if (linkage === 'missing') {
    throw new VeshError(ErrorCodes.COMMAND_MISSING, `${BUSYBOX_BINARY} is missing: install it with "apt-get install busybox-static"`);
  }
  if (linkage === 'dynamic') {
    throw new VeshError(ErrorCodes.COMMAND_MISSING, `${BUSYBOX_BINARY} is dynamically linked and would not run in a VE: install "busybox-static" instead of "busybox"`);
  }
  for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'etc/init.d', 'root', 'home', 'tmp', 'var/log', 'var/run', 'proc', 'sys', 'dev', 'run']) {
    await fs.mkdir(path.join(rootfs, d), { recursive: true, mode: 0o755 });
  }
  await fs.chmod(path.join(rootfs, 'tmp'), 0o1777);
  await fs.chmod(path.join(rootfs, 'root'), 0o700);
  await fs.copyFile(BUSYBOX_BINARY, path.join(rootfs, 'bin/busybox'));
  await fs.chmod(path.join(rootfs, 'bin/busybox'), 0o755);

  const list = await run(BUSYBOX_BINARY, ['--list-full']);
  const own = new Set(['sbin/reboot', 'sbin/poweroff', 'sbin/halt']);
  for (const rel of list.stdout.split('\n').map((l) => l.trim()).filter(Boolean)) {
    if (own.has(rel) || rel === 'bin/busybox') continue;
    const target = path.join(rootfs, rel);
    const depth = rel.split('/').length - 1;
    await fs.symlink(`${'../'.repeat(depth)}bin/busybox`, target).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'EEXIST') throw err;
    });
  }
  await fs.rm(path.join(rootfs, 'sbin/init'), { force: true });
  await fs.symlink('../bin/busybox', path.join(rootfs, 'sbin/init'));

  const files: Array<[string, string, number]> = [
    ['etc/inittab', BUSYBOX_INITTAB, 0o644],
    ['etc/init.d/rcS', BUSYBOX_RCS, 0o755],
    ['etc/init.d/rcK', BUSYBOX_RCK, 0o755],
    ['sbin/reboot', busyboxShutdownScript('reboot'), 0o755],
    ['sbin/poweroff', busyboxShutdownScript('poweroff'), 0o755],
    ['sbin/halt', busyboxShutdownScript('poweroff'), 0o755],
    ['etc/passwd', 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n', 0o644],
    ['etc/group', 'root:x:0:\nnogroup:x:65534:\n', 0o644],
    ['etc/shadow', 'root:*:20000:0:99999:7:::\n', 0o600],
    ['etc/profile', 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1=\'\\u@\\h:\\w\\$ \'\n', 0o644],
    ['etc/motd', MOTD, 0o644],
    // Debian's busybox-static has no nohup applet; daemons started by hand need one.
    ['usr/bin/nohup', NOHUP_SCRIPT, 0o755],
    ['etc/hostname', 've\n', 0o644],
    ['etc/hosts', '127.0.0.1 localhost\n', 0o644],
    ['etc/resolv.conf', '', 0o644],
  ];
  for (const [rel, content, mode] of files) {
    await fs.writeFile(path.join(rootfs, rel), content, { mode });
    await fs.chmod(path.join(rootfs, rel), mode);
  }
}
