import { promises as fs } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, type VeTestEnv } from '../helpers/ve-env.js';

/**
 * A VE start's engine runs in a mount namespace made from one that holds the
 * host's system mounts and none of the VEs' file systems (engine-ns.ts), so
 * the cost of a start does not grow with the VEs already running. The engine
 * here is a wrapper that records the mount table it sees, then runs runc.
 */
describe('the engine that starts a VE', () => {
  let env: VeTestEnv;
  let seen: string;
  let dir: string;

  beforeAll(async () => {
    dir = await fs.mkdtemp('/var/tmp/vesh-engine-ns-');
    await fs.chmod(dir, 0o711);
    seen = path.join(dir, 'mountinfo');
    const wrapper = path.join(dir, 'runc');
    // Only `run` (the start) is recorded: delete and state run in the host's namespace.
    await fs.writeFile(wrapper, `#!/bin/sh\nfor a; do [ "$a" = run ] && { cat /proc/self/mountinfo; echo ----; } >> ${seen}; done\nexec runc "$@"\n`, { mode: 0o755 });
    env = await makeVeTestEnv({ template: 'busybox', runtime: `binary: ${wrapper}` });
  }, 120_000);

  afterAll(async () => {
    await env?.cleanup();
    if (dir) await fs.rm(dir, { recursive: true, force: true });
  }, 120_000);

  it('sees none of the running VEs\' file systems, only the VE it starts, and that VE works as before', async () => {
    for (const ve of ['ea', 'eb', 'ec']) {
      await env.ves.create(ve);
      await env.ves.start(ve);
    }
    const host = await fs.readFile('/proc/self/mountinfo', 'utf8');
    // The host holds every running VE's disk and root file system.
    for (const ve of ['ea', 'eb', 'ec']) expect(host).toContain(`${env.layout.veDir(ve)}/rootfs `);
    const starts = (await fs.readFile(seen, 'utf8')).split('----\n').filter(Boolean);
    expect(starts).toHaveLength(3);
    const third = starts[2]!;
    expect(third).toContain(`${env.layout.veDir('ec')}/rootfs `);
    expect(third).not.toContain(env.layout.veDir('ea'));
    expect(third).not.toContain(env.layout.veDir('eb'));
    // Far fewer mounts than the host's, whatever else the host has mounted.
    expect(third.split('\n').filter(Boolean).length).toBeLessThan(host.split('\n').filter(Boolean).length);
    // The VE has its disk, its network and its files.
    const out = await shInVe(env, 'ec', 'df -P / | tail -1; ip -4 addr show eth0 | grep -c inet; echo ok > /root/f; cat /root/f');
    expect(out.stdout).toMatch(/ok\n$/);
    expect(out.stdout).toMatch(/^1$/m);
  }, 120_000);
});
