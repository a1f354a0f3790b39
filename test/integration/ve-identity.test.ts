import { createHash } from 'node:crypto';
import { execFileSync, spawn } from 'node:child_process';
import { promises as fs, lstatSync, readFileSync, readdirSync, readlinkSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import { readRecord, writeJsonAtomic } from '../../src/ve/record.js';
import { mountsUnder } from '../../src/ve/storage.js';
import { setupHelperPath } from '../../src/system/native-helpers.js';

const sh = shInVe;
const SIZE = 65_536;

/** Every entry of a tree: path, owner, mode, size and (regular files) a content hash; symlinks not followed. */
function treeFingerprint(root: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (rel: string) => {
    const p = path.join(root, rel);
    const st = lstatSync(p);
    let sum = '';
    if (st.isFile()) sum = createHash('sha256').update(readFileSync(p)).digest('hex');
    else if (st.isSymbolicLink()) sum = `-> ${readlinkSync(p)}`;
    out.set(rel || '.', `${st.uid}:${st.gid} ${(st.mode & 0o177777).toString(8)} ${st.size} ${st.mtimeMs} ${sum}`);
    if (st.isDirectory()) for (const e of readdirSync(p).sort()) walk(path.join(rel, e));
  };
  walk('');
  return out;
}

function hostUidOf(pid: number): number {
  return Number(/^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);
}

function loopDevicesOf(dir: string): string[] {
  return execFileSync('losetup', ['-a'], { encoding: 'utf8' }).split('\n').filter((l) => l.includes(`${dir}/`));
}

/** Run the vesh CLI against the test instance without blocking the event loop (for concurrent creates). */
function cliAsync(env: VeTestEnv, args: string[]): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [path.resolve('bin/vesh.js'), '--config', env.configFile, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    child.on('close', (code) => resolve({ code, stderr }));
  });
}

describe('every VE has host ids of its own on one unshifted template (issue 11)', () => {
  let env: VeTestEnv;
  let base: number;
  let templateBefore: Map<string, string>;
  const baseOf = async (ve: string) => (await readRecord(path.join(env.layout.veDir(ve), 've.json')))!.ids!.base;

  beforeAll(async () => {
    // Three ranges, so running out is reachable.
    env = await makeVeTestEnv({ template: 'busybox', runtime: 'idRanges: 3' });
    base = env.config.runtime.idmapBase;
    templateBefore = treeFingerprint(env.layout.templateRootfs('busybox'));
    await env.ves.create('alpha');
    await env.ves.create('beta');
    await env.ves.start('alpha');
    await env.ves.start('beta');
  });

  afterAll(async () => {
    await env?.cleanup();
  });

  it('keeps the template as built: owned by host root, not by any VE\'s range', () => {
    const info = JSON.parse(readFileSync(path.join(env.layout.templateDir('busybox'), 'template.json'), 'utf8')) as { idmapBase: number };
    expect(info.idmapBase).toBe(0);
    const owners = new Set([...templateBefore.values()].map((v) => v.split(' ')[0]));
    expect([...owners]).toEqual(['0:0']);
  });

  it('records a range of its own for each VE, the smallest free slot', async () => {
    expect(await baseOf('alpha')).toBe(base);
    expect(await baseOf('beta')).toBe(base + SIZE);
    expect((await env.ves.status('beta')).ids).toEqual({ base: base + SIZE, size: SIZE });
  });

  it('runs each VE\'s processes as its own host uids (host /proc and ps)', async () => {
    const a = (await env.ves.status('alpha')).pid!;
    const b = (await env.ves.status('beta')).pid!;
    expect(hostUidOf(a)).toBe(base);
    expect(hostUidOf(b)).toBe(base + SIZE);
    const ps = execFileSync('ps', ['-o', 'uid=', '-p', `${a},${b}`], { encoding: 'utf8' }).trim().split(/\s+/).map(Number).sort();
    expect(ps).toEqual([base, base + SIZE]);
    // The uid_map the engine set up says the same.
    expect(readFileSync(`/proc/${b}/uid_map`, 'utf8').trim().split(/\s+/)).toEqual(['0', String(base + SIZE), String(SIZE)]);
  });

  it('shows the template to each VE as owned by its root, and by a different host range to each', async () => {
    expect((await sh(env, 'alpha', 'stat -c %u:%g /bin/busybox')).stdout.trim()).toBe('0:0');
    expect((await sh(env, 'beta', 'stat -c %u:%g /bin/busybox')).stdout.trim()).toBe('0:0');
    // From the host, through each VE's overlay: the VE's own range.
    const a = lstatSync(path.join(env.layout.veDir('alpha'), 'rootfs', 'bin', 'busybox'));
    const b = lstatSync(path.join(env.layout.veDir('beta'), 'rootfs', 'bin', 'busybox'));
    expect([a.uid, a.gid]).toEqual([base, base]);
    expect([b.uid, b.gid]).toEqual([base + SIZE, base + SIZE]);
    // One inode on disk under both: one page cache.
    expect(a.ino).toBe(b.ino);
  });

  it('gives a file made as root in one VE that VE\'s host range only; a copy-up too; the template is untouched', async () => {
    await sh(env, 'alpha', 'echo mine > /root/made; chown 1000:1001 /root/made; echo "# alpha" >> /etc/profile');
    await sh(env, 'beta', 'echo mine > /root/made');
    const upperA = path.join(env.layout.veDir('alpha'), 'private', 'upper');
    const upperB = path.join(env.layout.veDir('beta'), 'private', 'upper');
    const made = lstatSync(path.join(upperA, 'root', 'made'));
    expect([made.uid, made.gid]).toEqual([base + 1000, base + 1001]);
    const copied = lstatSync(path.join(upperA, 'etc', 'profile'));
    expect([copied.uid, copied.gid]).toEqual([base, base]);
    const madeB = lstatSync(path.join(upperB, 'root', 'made'));
    expect([madeB.uid, madeB.gid]).toEqual([base + SIZE, base + SIZE]);
    // Inside, ids are the VE's own.
    expect((await sh(env, 'alpha', 'stat -c %u:%g /root/made /etc/profile')).stdout.trim().split('\n')).toEqual(['1000:1001', '0:0']);
    expect((await sh(env, 'beta', 'cat /etc/profile')).stdout).not.toContain('# alpha');
    expect(treeFingerprint(env.layout.templateRootfs('busybox'))).toEqual(templateBefore);
  });

  it('keeps two concurrent creates off one range, refuses a create when the ranges run out, and frees a destroyed VE\'s range', async () => {
    // Two processes at once take the one range left and... only one can.
    const [c, d] = await Promise.all([cliAsync(env, ['ve', 'create', 'gamma']), cliAsync(env, ['ve', 'create', 'delta'])]);
    expect([c.code, d.code].sort()).toEqual([0, 1]);
    const loser = c.code === 0 ? d : c;
    expect(loser.stderr).toMatch(/all 3 VE id ranges \(runtime\.idRanges\) are taken/);
    const winner = c.code === 0 ? 'gamma' : 'delta';
    const other = c.code === 0 ? 'delta' : 'gamma';
    expect(await baseOf(winner)).toBe(base + 2 * SIZE);
    expect(await env.ves.exists(other)).toBe(false);
    expect(await mountsUnder(env.layout.veDir(other))).toEqual([]);

    // Destroy frees beta's range: no mount, no loop device, and the next create gets the same slot.
    const betaDir = env.layout.veDir('beta');
    await env.ves.destroy('beta', { force: true });
    expect(await mountsUnder(betaDir)).toEqual([]);
    await waitFor('beta\'s loop device to be freed', async () => loopDevicesOf(betaDir).length === 0, 10_000);
    expect(readFileSync('/proc/self/mountinfo', 'utf8')).not.toContain(betaDir);
    await env.ves.create(other);
    expect(await baseOf(other)).toBe(base + SIZE);
    await env.ves.destroy(other);
    await env.ves.destroy(winner);
  });

  it('leaves no idmapped or other mount behind when a start fails after the mounts', async () => {
    await env.ves.create('broken');
    // The VE removes its own init: the next start fails in the engine, after the
    // disk, the overlay and its idmapped lower layer were mounted.
    await env.ves.start('broken');
    await sh(env, 'broken', 'rm /sbin/init');
    await env.ves.stop('broken', { kill: true });
    await expect(env.ves.start('broken')).rejects.toThrow(/failed to start/);
    const dir = env.layout.veDir('broken');
    expect(await mountsUnder(dir)).toEqual([]);
    // The kernel frees an autoclear loop device after its last unmount, not always before umount returns.
    await waitFor('the disk image\'s loop device to be freed', async () => loopDevicesOf(dir).length === 0, 10_000);
    // The idmapped lower layer is never attached: no process of ours holds a mount of the template either.
    const rootfs = await fs.realpath(env.layout.templateRootfs('busybox'));
    expect(readFileSync('/proc/self/mountinfo', 'utf8')).not.toContain(rootfs);
    await env.ves.destroy('broken', { force: true });
  });
});

describe('a VE and a template in the old shared-range layout keep working (migration)', () => {
  let env: VeTestEnv;
  let base: number;
  let oldTemplateBefore: Map<string, string>;
  const recordOf = async (ve: string) => (await readRecord(path.join(env.layout.veDir(ve), 've.json')))!;
  const helper = () => setupHelperPath();

  /** Put a stopped VE's files back into the shared range and drop its recorded range: what an older vesh left. */
  async function makeLegacy(ve: string): Promise<void> {
    const rec = await recordOf(ve);
    const p = env.layout.veDir(ve);
    if (rec.ids!.base !== base) {
      execFileSync('mount', ['-o', 'loop', path.join(p, 'disk.img'), path.join(p, 'private')]);
      execFileSync(helper(), ['shift', path.join(p, 'private'), String(rec.ids!.base), String(base), String(SIZE)]);
      execFileSync('umount', [path.join(p, 'private')]);
    }
    const legacy = { ...rec } as Record<string, unknown>;
    delete legacy.ids;
    await writeJsonAtomic(path.join(p, 've.json'), legacy);
  }

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'busybox' });
    base = env.config.runtime.idmapBase;
    // A template as an older vesh made it: shifted on disk to the shared range, idmapBase recorded.
    const oldDir = env.layout.templateDir('oldstyle');
    execFileSync('cp', ['-a', env.layout.templateDir('busybox'), oldDir]);
    execFileSync(helper(), ['shift', path.join(oldDir, 'rootfs'), '0', String(base), String(SIZE)]);
    const meta = JSON.parse(readFileSync(path.join(oldDir, 'template.json'), 'utf8')) as Record<string, unknown>;
    await fs.writeFile(path.join(oldDir, 'template.json'), JSON.stringify({ ...meta, name: 'oldstyle', idmapBase: base }));
    oldTemplateBefore = treeFingerprint(path.join(oldDir, 'rootfs'));

    for (const ve of ['old1', 'old2']) {
      await env.ves.create(ve, { template: 'oldstyle' });
      await env.ves.start(ve);
      await sh(env, ve, `echo kept > /root/kept; echo user > /root/user; chown 1000:1000 /root/user; cp /bin/busybox /root/suid; chmod 4755 /root/suid`);
      await env.ves.stop(ve);
    }
    await makeLegacy('old1');
    await makeLegacy('old2');
  });

  afterAll(async () => {
    await env?.cleanup();
  });

  it('gives no new VE the shared range while a VE without a range of its own exists', async () => {
    await env.ves.create('fresh');
    expect((await recordOf('fresh')).ids!.base).toBe(base + SIZE);
  });

  it('moves an old VE to a range of its own at its next start, its files and their modes with it', async () => {
    await env.ves.start('old1');
    const rec = await recordOf('old1');
    // fresh holds slot 1, old2 (still shared) slot 0.
    expect(rec.ids).toEqual({ base: base + 2 * SIZE, size: SIZE });
    expect(rec.idsFrom).toBeUndefined();
    expect(hostUidOf((await env.ves.status('old1')).pid!)).toBe(base + 2 * SIZE);
    expect((await sh(env, 'old1', 'cat /root/kept; stat -c "%u:%g %a" /root/kept /root/user /root/suid /bin/busybox')).stdout.trim().split('\n'))
      .toEqual(['kept', '0:0 644', '1000:1000 644', '0:0 4755', '0:0 755']);
    const upper = path.join(env.layout.veDir('old1'), 'private', 'upper', 'root');
    expect(lstatSync(path.join(upper, 'user')).uid).toBe(base + 2 * SIZE + 1000);
    // A new file lands in the new range.
    await sh(env, 'old1', 'touch /root/new');
    expect(lstatSync(path.join(upper, 'new')).uid).toBe(base + 2 * SIZE);
  });

  it('lets the last old VE keep the shared range as its own (nothing to move)', async () => {
    await env.ves.start('old2');
    expect((await recordOf('old2')).ids).toEqual({ base, size: SIZE });
    expect((await sh(env, 'old2', 'cat /root/kept; stat -c %u:%g /root/user /bin/busybox')).stdout.trim().split('\n')).toEqual(['kept', '1000:1000', '0:0']);
  });

  it('shows an old shifted template in each VE\'s own range and never changes it', async () => {
    await env.ves.start('fresh');
    expect((await sh(env, 'fresh', 'stat -c %u:%g /bin/busybox /etc')).stdout.trim().split('\n')).toEqual(['0:0', '0:0']);
    expect(lstatSync(path.join(env.layout.veDir('fresh'), 'rootfs', 'bin', 'busybox')).uid).toBe(base + SIZE);
    expect(treeFingerprint(path.join(env.layout.templateDir('oldstyle'), 'rootfs'))).toEqual(oldTemplateBefore);
  });

  it('finishes a move that was cut short at the next start', async () => {
    await env.ves.stop('old1');
    const rec = await recordOf('old1');
    const target = base + 2 * SIZE;
    // As if the last start died mid-way: part of the files still in the shared range, the move recorded.
    const p = env.layout.veDir('old1');
    execFileSync('mount', ['-o', 'loop', path.join(p, 'disk.img'), path.join(p, 'private')]);
    execFileSync('chown', ['-h', `${base + 1000}:${base + 1000}`, path.join(p, 'private', 'upper', 'root', 'user')]);
    execFileSync('umount', [path.join(p, 'private')]);
    await writeJsonAtomic(path.join(p, 've.json'), { ...rec, idsFrom: base });
    await env.ves.start('old1');
    expect((await recordOf('old1')).idsFrom).toBeUndefined();
    expect(lstatSync(path.join(p, 'private', 'upper', 'root', 'user')).uid).toBe(target + 1000);
    expect((await sh(env, 'old1', 'stat -c %u /root/user')).stdout.trim()).toBe('1000');
  });

  it('moves an old template back to host root\'s ids once no VE built on it runs, and not before', async () => {
    const oldRootfs = path.join(env.layout.templateDir('oldstyle'), 'rootfs');
    const meta = () => JSON.parse(readFileSync(path.join(env.layout.templateDir('oldstyle'), 'template.json'), 'utf8')) as { idmapBase: number; unshiftFrom?: number };
    // old1 runs: nothing moves.
    expect((await env.ves.status('old1')).state).toBe('running');
    expect(await env.ves.unshiftTemplates()).toEqual([]);
    expect(treeFingerprint(oldRootfs)).toEqual(oldTemplateBefore);

    for (const ve of ['old1', 'old2', 'fresh']) if ((await env.ves.status(ve)).state === 'running') await env.ves.stop(ve);
    expect(await env.ves.unshiftTemplates()).toEqual(['oldstyle']);
    expect(meta()).toMatchObject({ idmapBase: 0 });
    expect(meta().unshiftFrom).toBeUndefined();
    // Owners and modes (setuid bits included) as the template was built; contents untouched.
    const strip = (m: Map<string, string>) => new Map([...m].map(([k, v]) => [k, v.split(' ').filter((_, i) => i !== 3).join(' ')]));
    expect(strip(treeFingerprint(oldRootfs))).toEqual(strip(treeFingerprint(env.layout.templateRootfs('busybox'))));

    await env.ves.start('old1');
    expect((await sh(env, 'old1', 'cat /root/kept; stat -c %u:%g /bin/busybox')).stdout.trim().split('\n')).toEqual(['kept', '0:0']);
    expect(lstatSync(path.join(env.layout.veDir('old1'), 'rootfs', 'bin', 'busybox')).uid).toBe(base + 2 * SIZE);
    await env.ves.stop('old1');

    // A move back cut short: the template is refused until the next call finishes it.
    execFileSync('chown', ['-h', `${base}:${base}`, path.join(oldRootfs, 'bin', 'busybox')]);
    await fs.writeFile(path.join(env.layout.templateDir('oldstyle'), 'template.json'), JSON.stringify({ ...meta(), idmapBase: 0, unshiftFrom: base }));
    await expect(env.ves.start('old2')).rejects.toThrow(/was being shifted back to host root's ids/);
    expect(await env.ves.unshiftTemplates()).toEqual(['oldstyle']);
    expect(lstatSync(path.join(oldRootfs, 'bin', 'busybox')).uid).toBe(0);
    await env.ves.start('old2');
    expect((await sh(env, 'old2', 'stat -c %u:%g /bin/busybox')).stdout.trim()).toBe('0:0');
  });
});
