import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeArena, serverAlive, type Arena } from './kit.js';
import { waitFor } from '../helpers/ve-env.js';

/**
 * A tenant's VE root against the VE lifecycle the host runs for it:
 * rebooting in a loop (N-E), a "reboot" marker left behind for an admin's
 * `vesh ve stop --kill` (N-F), and reading the host paths of VE disk images
 * from /sys (loop backing files). alice attacks, bob is the bystander whose
 * VE the monitor must keep serving; carol's VE has no disk limit, so its
 * shutdown marker stays readable after the VE's file systems are unmounted.
 */
describe('adversarial: VE lifecycle abuse (reboot loops, markers, /sys loop paths)', () => {
  let arena: Arena;

  beforeAll(async () => {
    arena = await makeArena({
      template: 'busybox',
      accounts: { alice: [], bob: [], carol: ['limits: { disk: 0 }'] },
    });
  }, 300_000);

  afterAll(async () => {
    await arena?.cleanup.run();
  }, 300_000);

  const events = (ve: string, event: string) => arena.serve.logs.filter((r) => r.ve === ve && r.event === event);

  it('a VE cannot read the host path of any VE disk image from /sys (loop backing_file)', async () => {
    // alice's VE has a disk limit, so a loop device backs it right now.
    await arena.expectServes('alice');
    // One string: ssh hands the remote side a command line for the login shell.
    const r = await arena.ssh('alice', ['cat /sys/block/loop*/loop/backing_file /sys/class/block/loop*/loop/backing_file /sys/dev/block/7:*/loop/backing_file 2>/dev/null; ls /sys/devices/virtual/block 2>/dev/null; echo done']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/done\n$/);
    expect(r.stdout).not.toContain('disk.img');
    expect(r.stdout).not.toContain(arena.env.config.dataDir);
    expect(r.stdout).not.toMatch(/loop\d/);
    // The host still has the loop device: it is hidden from the VE, not gone.
    expect((await arena.env.ves.status('alice')).state).toBe('running');
  }, 180_000);

  it('an admin\'s "vesh ve stop --kill" leaves the VE stopped though VE root wrote "reboot" as its shutdown marker', async () => {
    await arena.expectServes('carol');
    const r = await arena.ssh('carol', ['echo reboot > /run/vesh/shutdown && cat /run/vesh/shutdown']);
    expect(r.stdout).toBe('reboot\n');
    const before = arena.serve.logs.length;
    arena.env.cli(['ve', 'stop', '--kill', 'carol']);
    // The serve process's monitor sees the init gone and decides.
    await arena.serve.waitForLog((x) => arena.serve.logs.indexOf(x) >= before && x.ve === 'carol' && (x.event === 've.stopped' || x.event === 've.reboot'), 60_000);
    const decided = arena.serve.logs.slice(before).filter((x) => x.ve === 'carol' && (x.event === 've.stopped' || x.event === 've.reboot'));
    expect(decided.map((x) => x.event)).toEqual(['ve.stopped']);
    expect((await arena.env.ves.status('carol')).state).toBe('stopped');
    await arena.expectServes('bob');
  }, 180_000);

  it('a VE rebooting in a loop is slowed down, then left stopped with a log line; the monitor meanwhile handles another VE\'s poweroff', async () => {
    await arena.expectServes('bob');
    await arena.expectServes('alice');
    // VE root enables a "service" that reboots one second after every boot, and reboots.
    await arena.ssh('alice', [[
      'printf \'#!/bin/sh\\ncase "$1" in start) (sleep 1; /sbin/reboot) </dev/null >/dev/null 2>&1 & ;; esac\\n\' > /etc/init.d/S99loop',
      'chmod 755 /etc/init.d/S99loop',
      '(sleep 1; /sbin/reboot) </dev/null >/dev/null 2>&1 &',
    ].join('\n')]);
    // Past the quick restarts, the monitor delays the next start.
    await arena.serve.waitForLog((x) => x.ve === 'alice' && x.event === 've.reboot_delayed', 240_000);
    // bob powers off meanwhile: his VE is handled (stopped, cleaned up) while alice is still looping.
    await arena.ssh('bob', ['/sbin/poweroff'], { timeoutMs: 60_000 }).catch(() => undefined);
    const bobStopped = await arena.serve.waitForLog((x) => x.ve === 'bob' && x.event === 've.stopped', 120_000);
    const loopEnded = await arena.serve.waitForLog((x) => x.ve === 'alice' && x.event === 've.reboot_loop', 240_000);
    expect(arena.serve.logs.indexOf(bobStopped)).toBeLessThan(arena.serve.logs.indexOf(loopEnded));
    expect(String(loopEnded.msg)).toMatch(/left stopped; the next login or "vesh ve start alice" starts it again/);
    // Bounded: a few quick restarts and a few delayed ones, never more than the policy's cap.
    const starts = events('alice', 've.reboot').length;
    expect(starts).toBeGreaterThanOrEqual(5);
    expect(starts).toBeLessThan(10);
    await waitFor('alice\'s VE to be stopped', async () => (await arena.env.ves.status('alice')).state === 'stopped', 30_000);
    // And it stays stopped: nothing starts it again by itself.
    const seen = arena.serve.logs.length;
    await new Promise((r) => setTimeout(r, 5_000));
    expect(arena.serve.logs.slice(seen).filter((x) => x.ve === 'alice' && x.event === 've.reboot')).toEqual([]);
    expect((await arena.env.ves.status('alice')).state).toBe('stopped');
    expect(serverAlive(arena)).toBe(true);
    // bob's next login starts his VE again.
    await arena.expectServes('bob');
  }, 600_000);
});
