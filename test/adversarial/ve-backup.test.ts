import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, lstatSync, mkdirSync, readFileSync, readdirSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { shiftVeFiles, vePaths, type VePaths } from '../../src/ve/storage.js';
import { backupManifest, resealBackup } from '../helpers/backup-file.js';
import { makeVeTestEnv, shInVe, type VeTestEnv } from '../helpers/ve-env.js';

/**
 * A backup file is the attacker's: whoever hands the admin a file to
 * restore (a tenant moving in, a tampered copy) writes every byte of it,
 * with a valid checksum (resealBackup). It must not write outside the new
 * VE's directory, take another VE's ids, or plant files the host later
 * opens or that a VE could use as another range's or host root's.
 */
describe('a crafted backup file cannot write outside the new VE or take what is not its own', () => {
  let env: VeTestEnv;
  let work: string;
  let good: string;
  let victimIds: number;
  const marker = `/tmp/vesh-backup-attack-${randomBytes(4).toString('hex')}`;

  /** Restore that must fail, naming why; nothing new under ves/, nothing mounted or looped for it. */
  const refused = (file: string, name: string, why: RegExp) => {
    const before = readdirSync(env.layout.vesDir).sort();
    const r = env.cli(['ve', 'restore', file, name], { allowFailure: true });
    expect(r.code, r.stdout).not.toBe(0);
    expect(r.stderr).toMatch(why);
    expect(readdirSync(env.layout.vesDir).sort()).toEqual(before);
    expect(execFileSync('losetup', ['-a'], { encoding: 'utf8' })).not.toContain(`${env.layout.veDir(name)}/`);
  };

  /** Change a stopped VE's disk as the attacker would, from outside (loop-mounted on the host). */
  const editDisk = async (ve: string, edit: (priv: string) => unknown) => {
    const mnt = path.join(work, `mnt-${randomBytes(3).toString('hex')}`);
    mkdirSync(mnt);
    execFileSync('mount', ['-o', 'loop', vePaths(env.layout.veDir(ve)).image, mnt]);
    try {
      await edit(mnt);
    } finally {
      execFileSync('umount', [mnt]);
    }
  };

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'busybox' });
    work = path.join(env.dir, 'work');
    mkdirSync(work);
    await env.ves.create('victim');
    await env.ves.start('victim');
    await shInVe(env, 'victim', 'echo victim-data > /root/own');
    victimIds = (await env.ves.status('victim')).ids!.base;
    await env.ves.create('source');
    good = path.join(work, 'good.vbk');
    env.cli(['ve', 'backup', 'source', good]);
    writeFileSync(marker, 'host-file\n');
  });

  afterAll(async () => {
    execFileSync('rm', ['-f', marker]);
    await env?.cleanup();
  });

  it('a tar with traversal and symlink members is no backup: refused, nothing written where its names point', () => {
    const t = path.join(work, 'tree');
    mkdirSync(t);
    writeFileSync(path.join(t, 'x'), 'x');
    symlinkSync('/etc', path.join(t, 'link'));
    const tar = path.join(work, 'evil.tar');
    // Member names ../../escaped-by-tar and a symlink to /etc, as a tar-based restore would unpack them.
    execFileSync('tar', ['-cf', tar, '-C', t, '--transform', 's,^x$,../../escaped-by-tar,', '-P', 'x', 'link']);
    refused(tar, 'tarred', /does not start with the vesh backup mark/);
    expect(existsSync(path.join(env.layout.vesDir, '..', 'escaped-by-tar'))).toBe(false);
    expect(existsSync(path.join(env.layout.dataDir, 'escaped-by-tar'))).toBe(false);
  });

  it('a manifest naming a host path as the VE or its template is refused before anything is made', () => {
    const byName = path.join(work, 'name.vbk');
    resealBackup(good, byName, { manifest: (m) => ({ ...m, record: { ...m.record, name: '../../../../tmp/evil' } }) });
    const before = readdirSync(env.layout.vesDir).sort();
    const r = env.cli(['ve', 'restore', byName], { allowFailure: true });
    expect(r.stderr).toMatch(/invalid VE name/);
    expect(readdirSync(env.layout.vesDir).sort()).toEqual(before);
    expect(existsSync('/tmp/evil')).toBe(false);
    const byTemplate = path.join(work, 'template.vbk');
    resealBackup(good, byTemplate, { manifest: (m) => ({ ...m, template: { ...m.template, name: '../../../../etc' } }) });
    refused(byTemplate, 'tpl', /template/);
  });

  it('a disk owned by the victim\'s id range, and a manifest asking for that range, gets a fresh range; the victim\'s files keep their owner', async () => {
    const sourceIds = (await env.ves.status('source')).ids!;
    const size = sourceIds.size;
    // The attacker's disk: every file in the victim's range, as if made there.
    await editDisk('source', (priv) => shiftVeFiles({ private: priv } as VePaths, sourceIds.base, victimIds, size));
    const plain = path.join(work, 'plain-ids.vbk');
    env.cli(['ve', 'backup', 'source', plain]);
    await editDisk('source', (priv) => shiftVeFiles({ private: priv } as VePaths, victimIds, sourceIds.base, size));
    const asks = path.join(work, 'ids.vbk');
    resealBackup(plain, asks, { manifest: (m) => ({ ...m, ids: { ...m.ids, base: victimIds } }) });
    expect(backupManifest(asks).ids.base).toBe(victimIds);
    env.cli(['ve', 'restore', asks, 'squatter']);
    const got = (await env.ves.status('squatter')).ids!.base;
    expect(got).not.toBe(victimIds);
    expect(statSync(path.join(vePaths(env.layout.veDir('victim')).upper, 'root', 'own')).uid).toBe(victimIds);
    // Its files moved into its own range, none left in the victim's.
    await editDisk('squatter', (priv) => expect(statSync(path.join(priv, 'upper', 'etc')).uid).toBe(got));
    expect(statSync(vePaths(env.layout.veDir('squatter')).image).size).toBeGreaterThan(0);
    await env.ves.destroy('squatter');
  });

  it('an extent placed outside the image is refused (no write past the new image)', () => {
    const out = path.join(work, 'extent.vbk');
    const size = backupManifest(good).image.size as number;
    // The first extent's header follows the 8-byte mark: point it at the image's end.
    resealBackup(good, out, { body: (b) => { b.writeBigUInt64BE(BigInt(size), 8); return b; } });
    refused(out, 'extent', /outside the image or out of order/);
  });

  it('a disk holding a setuid file of host root (or of another VE\'s range) is refused', async () => {
    await editDisk('source', (priv) => {
      const f = path.join(priv, 'upper', 'rootshell');
      writeFileSync(f, '#!/bin/sh\nid\n');
      execFileSync('chown', ['0:0', f]);
      execFileSync('chmod', ['4755', f]);
    });
    const out = path.join(work, 'suid.vbk');
    env.cli(['ve', 'backup', 'source', out]);
    refused(out, 'suid', /upper\/rootshell in its disk is owned by host ids 0:0, outside the VE's own range/);
    await editDisk('source', (priv) => execFileSync('rm', ['-f', path.join(priv, 'upper', 'rootshell')]));
  });

  it('a console.log symlink to a host file in the disk is dropped: the restored VE\'s start does not write through it', async () => {
    await editDisk('source', (priv) => {
      execFileSync('rm', ['-f', path.join(priv, 'console.log')]);
      symlinkSync(marker, path.join(priv, 'console.log'));
    });
    const out = path.join(work, 'console.vbk');
    env.cli(['ve', 'backup', 'source', out]);
    env.cli(['ve', 'restore', out, 'consoled']);
    await env.ves.start('consoled');
    await env.ves.stop('consoled', { kill: true });
    expect(readFileSync(marker, 'utf8')).toBe('host-file\n');
    await editDisk('consoled', (priv) => expect(lstatSync(path.join(priv, 'console.log')).isSymbolicLink()).toBe(false));
    await env.ves.destroy('consoled');
  });
});
