/**
 * vesh ve backup of a running VE: how long its processes stay frozen and
 * the whole backup takes, beside the peer: the same freeze (runc pause +
 * fsfreeze) around `tar --sparse` of the same image. Rounds interleaved;
 * medians and min–max. Run as root under the bench lock:
 *   flock /tmp/vesh-bench.lock ./node_modules/.bin/vite-node bench/ve-backup.ts -- [rounds] [dataMiB]
 */
import { execFileSync } from 'node:child_process';
import { rmSync, statSync } from 'node:fs';
import path from 'node:path';
import { createTemplateStore, createVeNetwork } from '../src/ve/index.js';
import { VeBackups } from '../src/ve/backup.js';
import { vePaths } from '../src/ve/storage.js';
import { makeVeTestEnv, shInVe } from '../test/helpers/ve-env.js';
import { median } from './lib.js';

const rounds = Number(process.argv[2] ?? 5);
const dataMiB = Number(process.argv[3] ?? 200);

const env = await makeVeTestEnv({ template: 'busybox' });
try {
  await env.ves.create('bk', { limits: { disk: '1G' } });
  await env.ves.start('bk');
  // Incompressible data, so neither side gains by skipping zeros inside it.
  await shInVe(env, 'bk', `dd if=/dev/urandom of=/root/blob bs=1M count=${dataMiB} 2>/dev/null; sync`, { timeoutMs: 300_000 });
  const backups = new VeBackups({
    config: env.config, layout: env.layout, logger: env.logger, ves: env.ves,
    templates: createTemplateStore(env.config, env.layout, env.logger), network: createVeNetwork(env.config, env.layout, env.logger),
  });
  const p = vePaths(env.layout.veDir('bk'));
  const runc = (verb: string) => execFileSync(env.config.runtime.binary, ['--root', env.layout.runtimeRoot, verb, 'bk']);
  const ours = { frozen: [] as number[], total: [] as number[], bytes: 0 };
  const peer = { frozen: [] as number[], total: [] as number[], bytes: 0 };
  for (let i = 0; i < rounds; i++) {
    const f = path.join(env.dir, 'ours.vbk');
    let t = performance.now();
    const r = await backups.backup('bk', f);
    ours.total.push(performance.now() - t);
    ours.frozen.push(r.frozenMs);
    ours.bytes = statSync(f).size;
    rmSync(f);
    const tarFile = path.join(env.dir, 'peer.tar');
    t = performance.now();
    runc('pause');
    execFileSync('fsfreeze', ['--freeze', p.private]);
    execFileSync('tar', ['--sparse', '-cf', tarFile, '-C', p.dir, 'disk.img']);
    execFileSync('fsfreeze', ['--unfreeze', p.private]);
    runc('resume');
    const frozen = performance.now() - t;
    peer.frozen.push(frozen);
    peer.total.push(frozen);
    peer.bytes = statSync(tarFile).size;
    rmSync(tarFile);
  }
  const fmt = (xs: number[]) => `${median(xs).toFixed(0)} ms (${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)})`;
  console.log(`VE with ${dataMiB} MiB of data on a 1 GiB disk, ${rounds} interleaved rounds`);
  console.log(`vesh ve backup:        frozen ${fmt(ours.frozen)}, whole backup ${fmt(ours.total)}, file ${(ours.bytes / 2 ** 20).toFixed(1)} MiB`);
  console.log(`pause + tar --sparse:  frozen ${fmt(peer.frozen)}, file ${(peer.bytes / 2 ** 20).toFixed(1)} MiB`);
} finally {
  await env.cleanup();
}
