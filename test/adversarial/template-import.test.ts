import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Cleanup } from '../helpers/ssh-harness.js';
import { makeVeTestEnv, shInVe, type VeTestEnv } from '../helpers/ve-env.js';
import { buildBusyboxRootfs } from '../../src/template/busybox.js';

/**
 * `vesh template import NAME FILE.tar` with a hostile archive (N-B): the
 * admin imports a tar a tenant or a download handed over, and the import
 * runs as root. Each archive is a working busybox root with hostile members
 * appended by Python's tarfile (device nodes, a FIFO, setuid files,
 * world-writable entries, links and names that point out of the tree, an
 * inittab that is a symlink to a host FIFO). The import must finish within
 * a bound, leave no device node or FIFO in the template, change no host
 * file, and a VE on the sanitized template must still boot.
 */

/** Longest an import of a ~2 MB busybox tar may take on a loaded host before we call it hung. */
const IMPORT_BOUND_MS = 90_000;

describe('adversarial: template import of a hostile tar (N-B)', () => {
  const cleanup = new Cleanup();
  let env: VeTestEnv;
  /** Host files the archives aim at, made by this test (never a real host path). */
  let victimDir: string;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'busybox' });
    cleanup.add(() => env.cleanup());
    victimDir = path.join(env.dir, 'host-victims');
    mkdirSync(victimDir, { mode: 0o755 });
    writeFileSync(path.join(victimDir, 'passwd'), 'host-secret\n', { mode: 0o644 });
  }, 180_000);

  afterAll(async () => {
    await cleanup.run();
  }, 180_000);

  /** A busybox root with `spec` (a Python snippet calling add(...)) appended; returns the tar's path. */
  async function hostileTar(name: string, spec: string): Promise<string> {
    const src = path.join(env.dir, `${name}-src`);
    const tar = path.join(env.dir, `${name}.tar`);
    mkdirSync(src, { mode: 0o755 });
    await buildBusyboxRootfs(src);
    execFileSync('tar', ['--numeric-owner', '-C', src, '-cf', tar, '.']);
    const py = `
import io, sys, tarfile
t = tarfile.open(sys.argv[1], 'a', format=tarfile.GNU_FORMAT)
def add(name, type=tarfile.REGTYPE, data=b'', mode=0o644, linkname='', uid=0, gid=0, dev=(0, 0)):
    ti = tarfile.TarInfo(name); ti.type = type; ti.mode = mode; ti.uid = uid; ti.gid = gid
    ti.linkname = linkname; ti.devmajor, ti.devminor = dev; ti.mtime = 1700000000
    if type == tarfile.REGTYPE:
        ti.size = len(data); t.addfile(ti, io.BytesIO(data))
    else:
        t.addfile(ti)
${spec}
t.close()
`;
    execFileSync('python3', ['-c', py, tar], { stdio: ['ignore', 'inherit', 'inherit'] });
    return tar;
  }

  /** `vesh template import` as the admin runs it, killed after IMPORT_BOUND_MS. */
  function importTar(name: string, tar: string): { code: number | null; signal: string | null; stdout: string; stderr: string } {
    const r = spawnSync(process.execPath, [path.resolve('bin/vesh.js'), '--config', env.configFile, 'template', 'import', name, tar], {
      encoding: 'utf8', timeout: IMPORT_BOUND_MS, killSignal: 'SIGKILL',
    });
    return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
  }

  /** Every entry of a tree that is a device, FIFO or socket (lstat, no following). */
  function specialFiles(root: string): string[] {
    const out: string[] = [];
    const walk = (dir: string) => {
      for (const e of readdirSync(dir)) {
        const p = path.join(dir, e);
        const st = lstatSync(p);
        if (st.isCharacterDevice() || st.isBlockDevice() || st.isFIFO() || st.isSocket()) out.push(p);
        else if (st.isDirectory()) walk(p);
      }
    };
    walk(root);
    return out;
  }

  function leftovers(): string[] {
    return readdirSync(env.layout.templatesDir).filter((e) => e.startsWith('.'));
  }

  it('leaves out device nodes, FIFOs, stray setuid bits and world-write; keeps names and links inside the template; a VE on it boots', async () => {
    const hostPasswd = statSync('/etc/passwd');
    const absVictim = path.join(victimDir, 'absolute-member');
    const tar = await hostileTar('devs', `
add('./dev/sda', tarfile.BLKTYPE, mode=0o666, dev=(8, 0))
add('./dev/mem', tarfile.CHRTYPE, mode=0o666, dev=(1, 1))
add('./dev/null', tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
add('./run/fifo', tarfile.FIFOTYPE, mode=0o666)
add('./usr/bin/suid-root', data=b'#!/bin/sh\\n', mode=0o4755)
add('./usr/bin/sgid-root', data=b'#!/bin/sh\\n', mode=0o2755, gid=42)
add('./usr/bin/suid-user', data=b'#!/bin/sh\\n', mode=0o4755, uid=1000)
add('./etc/world-writable', data=b'x\\n', mode=0o666)
add('./var/open-dir', tarfile.DIRTYPE, mode=0o777)
add('./var/sticky-dir', tarfile.DIRTYPE, mode=0o1777)
add('./etc/host-passwd', tarfile.LNKTYPE, linkname='/etc/passwd')
add('${absVictim}', data=b'written-by-the-archive\\n')
add('./', tarfile.DIRTYPE, mode=0o777)
add('./etc/imported', data=b'from-the-tar\\n')
`);
    const r = importTar('hostile', tar);
    expect(r.signal, `import hung: ${r.stderr}`).toBeNull();
    expect(r.code, r.stderr).toBe(0);
    const rootfs = path.join(env.layout.templateDir('hostile'), 'rootfs');
    expect(specialFiles(rootfs)).toEqual([]);
    const mode = (rel: string) => lstatSync(path.join(rootfs, rel)).mode & 0o7777;
    // setuid/setgid kept only where template root owns the file (unshifted on disk: host root's, in a root-only directory).
    expect(mode('usr/bin/suid-root')).toBe(0o4755);
    expect(lstatSync(path.join(rootfs, 'usr/bin/suid-root')).uid).toBe(0);
    expect(mode('usr/bin/sgid-root')).toBe(0o2755);
    expect(mode('usr/bin/suid-user')).toBe(0o755);
    expect(mode('etc/world-writable')).toBe(0o664);
    expect(mode('var/open-dir')).toBe(0o775);
    expect(mode('var/sticky-dir')).toBe(0o1777);
    expect(mode('.')).toBe(0o755);
    // The hard link to "/etc/passwd" became one to the template's own etc/passwd; the host's is untouched.
    const linked = lstatSync(path.join(rootfs, 'etc/host-passwd'));
    expect(linked.ino).toBe(lstatSync(path.join(rootfs, 'etc/passwd')).ino);
    expect(linked.ino).not.toBe(hostPasswd.ino);
    expect(statSync('/etc/passwd').nlink).toBe(hostPasswd.nlink);
    expect(statSync('/etc/passwd').mtimeMs).toBe(hostPasswd.mtimeMs);
    // The absolute member landed inside the template, not at its host path.
    expect(existsSync(absVictim)).toBe(false);
    expect(existsSync(path.join(rootfs, absVictim))).toBe(true);
    expect(leftovers()).toEqual([]);
    // Sanitized, and the admin is told what was left out.
    expect(r.stdout).toMatch(/left out: 3 device node\(s\).*1 FIFO/);

    await env.ves.create('onhostile', { template: 'hostile' });
    try {
      await env.ves.start('onhostile');
      expect((await shInVe(env, 'onhostile', 'cat /etc/imported')).stdout).toBe('from-the-tar\n');
      // Inside, the setuid file that was kept belongs to VE root; /dev is the engine's, without the archive's sda.
      expect((await shInVe(env, 'onhostile', 'stat -c %u:%a /usr/bin/suid-root; ls /dev/sda 2>&1 || true')).stdout).toMatch(/^0:4755\n.*No such file/);
    } finally {
      await env.ves.destroy('onhostile', { force: true }).catch(() => undefined);
    }
  }, 300_000);

  it('refuses an archive with a ".." member or a ".." hard-link target and leaves nothing behind', async () => {
    const rel = path.relative(path.join(env.layout.templatesDir, '.build-x', 'rootfs'), path.join(victimDir, 'passwd'));
    expect(rel.startsWith('..')).toBe(true);
    const tar = await hostileTar('dotdot', `
add('${rel}', data=b'overwritten-by-the-archive\\n')
add('./etc/out-link', tarfile.LNKTYPE, linkname='${rel}')
`);
    const r = importTar('dotdot', tar);
    expect(r.signal, `import hung: ${r.stderr}`).toBeNull();
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/was refused \(.*'\.\.'.*\): .*nothing was imported/);
    expect(readFileSync(path.join(victimDir, 'passwd'), 'utf8')).toBe('host-secret\n');
    expect(statSync(path.join(victimDir, 'passwd')).nlink).toBe(1);
    expect(existsSync(env.layout.templateDir('dotdot'))).toBe(false);
    expect(leftovers()).toEqual([]);
  }, 300_000);

  it('finishes when /etc/inittab is a symlink to a host FIFO and /sbin/init is no symlink: the link resolves inside the template', async () => {
    const fifo = path.join(victimDir, 'inittab-fifo');
    execFileSync('mkfifo', ['-m', '0600', fifo]);
    const tar = await hostileTar('fifo', `
add('./sbin/init', tarfile.LNKTYPE, linkname='./bin/busybox')
add('./etc/inittab', tarfile.SYMTYPE, linkname='${fifo}')
`);
    const r = importTar('fifo', tar);
    expect(r.signal, `import hung reading the inittab through the host FIFO: ${r.stderr}`).toBeNull();
    expect(r.code, r.stderr).toBe(0);
    const list = JSON.parse(env.cli(['template', 'list', '--json']).stdout) as Array<{ name: string; stopSignal: string }>;
    // No readable inittab inside the template: the init gets the generic stop signal.
    expect(list.find((t) => t.name === 'fifo')?.stopSignal).toBe('SIGTERM');
    expect(lstatSync(fifo).isFIFO()).toBe(true);
    expect(leftovers()).toEqual([]);
  }, 300_000);
});
