import { chmodSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { rmdir } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeLayout } from '../../src/system/layout.js';
import { Cleanup, startVeshServe, tempDir, type ServeProcess } from '../helpers/ssh-harness.js';
import { startNotifyReceiver } from '../helpers/notify-receiver.js';

const WORKER = path.join(path.dirname(new URL(import.meta.url).pathname), 'notify-socket-worker.mjs');

/** Binds a unix datagram socket and prints each datagram as a JSON string line. */
/**
 * Attack: a compromised SSH worker looks for systemd's NOTIFY_SOCKET in the
 * environment it inherited from the broker and tells systemd the server is
 * stopping, or ready with a status of its choosing. Guard: `vesh serve`
 * takes NOTIFY_SOCKET out of its environment before any worker starts
 * (src/system/sd-notify.ts takeNotifySocket), so the worker finds nothing;
 * the unit's NotifyAccess=main would refuse the datagram as well.
 */
describe('notify socket: a compromised worker cannot speak for the server to systemd', () => {
  const cleanup = new Cleanup();
  let notes: string[] = [];
  let serve: ServeProcess;

  beforeAll(async () => {
    const dir = tempDir(cleanup, 'vesh-notify-adv-');
    chmodSync(dir, 0o755);
    const cfg = path.join(dir, 'vesh.yaml');
    writeFileSync(cfg, `listen: "127.0.0.1:0"\ndataDir: ${dir}/data\nhostKeysDir: ${dir}/keys\naccountsFile: ${dir}/accounts.yaml\nworkers: { count: 1 }\n`);
    writeFileSync(path.join(dir, 'accounts.yaml'), '{}\n');
    const sock = path.join(dir, 'notify.sock');
    notes = startNotifyReceiver(cleanup, sock);
    for (let i = 0; i < 500 && !notes.includes('bound'); i++) await new Promise((r) => setTimeout(r, 10));
    // After the server stops: the runtime directories its start made (empty, no VE ran).
    const run = path.dirname(makeLayout(path.join(dir, 'data')).runtimeRoot);
    cleanup.add(async () => {
      for (const d of ['runc', 'agents', '']) await rmdir(path.join(run, d)).catch(() => undefined);
    });
    serve = await startVeshServe(cleanup, cfg, 120_000, { NOTIFY_SOCKET: sock, VESH_WORKER_SCRIPT: WORKER });
  }, 180_000);

  afterAll(async () => {
    await cleanup.run();
  }, 60_000);

  it('the worker finds no NOTIFY_SOCKET, and systemd hears only the broker', async () => {
    const attack = await serve.waitForLog((r) => r.event === 'attack.notify_socket');
    expect(attack.socket).toBeNull();
    expect(attack.sent).toBe(false);
    // The broker's own READY=1 still arrives: the guard did not cost it the socket.
    for (let i = 0; i < 1500 && !notes.some((n) => n.startsWith('READY=1')); i++) await new Promise((r) => setTimeout(r, 10));
    expect(notes.filter((n) => n !== 'bound')).toEqual([expect.stringMatching(/^READY=1\nSTATUS=serving on /)]);
  });
});
