import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { rmdir } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeLayout } from '../../src/system/layout.js';
import { Cleanup, startVeshServe, tempDir, type ServeProcess } from '../helpers/ssh-harness.js';
import { startNotifyReceiver } from '../helpers/notify-receiver.js';

const REPO = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..', '..');

/**
 * The systemd unit (`vesh service unit|install`) and what `vesh serve` does
 * for it: sd_notify readiness, a SIGHUP reload (RELOADING=1 … READY=1) that
 * puts new admission caps in force and keeps the old config when the new
 * one is broken, and a clean stop on SIGTERM. PID 1 here is not systemd, so
 * the unit file is checked with `systemd-analyze verify` and the protocol is
 * spoken to a NOTIFY_SOCKET this test binds (python3: Node cannot bind a
 * unix datagram socket).
 */

/** Binds a unix datagram socket and prints each datagram as a JSON string line. */
function config(dir: string, maxStartups: number): string {
  return `listen: "127.0.0.1:0"\ndataDir: ${dir}/data\nhostKeysDir: ${dir}/keys\naccountsFile: ${dir}/accounts.yaml\nauth:\n  maxStartups: ${maxStartups}\n  penalties:\n    sourceFailuresBeforePenalty: 100000\n`;
}

/** Whether a raw TCP connection gets the server's SSH banner ('banner') or is closed at once ('closed'). */
function greet(port: number, keep: net.Socket[]): Promise<'banner' | 'closed'> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port });
    keep.push(s);
    s.once('data', (d) => resolve(d.toString().startsWith('SSH-2.0-') ? 'banner' : 'closed'));
    s.once('close', () => resolve('closed'));
    s.once('error', (e: NodeJS.ErrnoException) => (e.code === 'ECONNRESET' ? resolve('closed') : reject(e)));
  });
}

describe('service unit', () => {
  const cleanup = new Cleanup();
  let dir = '';
  let cfg = '';
  let serve: ServeProcess;
  let notes: string[] = [];
  const open: net.Socket[] = [];

  const waitNote = async (pred: (n: string) => boolean, from: number, ms = 15_000): Promise<number> => {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      const i = notes.findIndex((n, k) => k >= from && pred(n));
      if (i >= 0) return i;
      await new Promise((r) => setTimeout(r, 20));
    }
    throw new Error(`no notification matched after #${from}; got: ${JSON.stringify(notes)}`);
  };

  beforeAll(async () => {
    dir = tempDir(cleanup, 'vesh-service-test-');
    // VE inits pass through dataDir's parents as unprivileged users.
    chmodSync(dir, 0o755);
    cfg = path.join(dir, 'vesh.yaml');
    writeFileSync(cfg, config(dir, 1));
    writeFileSync(path.join(dir, 'accounts.yaml'), '{}\n');
    const sock = path.join(dir, 'notify.sock');
    notes = startNotifyReceiver(cleanup, sock);
    await waitNote((n) => n === 'bound', 0);
    // After the server stops: the runtime directories its start made (empty, no VE ran).
    const run = path.dirname(makeLayout(path.join(dir, 'data')).runtimeRoot);
    cleanup.add(async () => {
      for (const d of ['runc', 'agents', '']) await rmdir(path.join(run, d)).catch(() => undefined);
    });
    serve = await startVeshServe(cleanup, cfg, 120_000, { NOTIFY_SOCKET: sock });
    cleanup.add(() => { for (const s of open) s.destroy(); });
  }, 180_000);

  afterAll(async () => {
    await cleanup.run();
  }, 60_000);

  it('prints a unit that systemd-analyze verify accepts, with notify, reload, restart and limits', () => {
    const unit = execFileSync(process.execPath, [path.join(REPO, 'bin', 'vesh.js'), '--config', cfg, 'service', 'unit'], { encoding: 'utf8' });
    for (const line of ['Type=notify', 'ExecReload=/bin/kill -HUP $MAINPID', 'Restart=on-failure', 'KillMode=mixed', 'TasksMax=8192', 'LimitNOFILE=65536', 'WantedBy=multi-user.target']) {
      expect(unit.split('\n')).toContain(line);
    }
    expect(unit).toContain(`--config "${cfg}" serve`);
    const file = path.join(dir, 'vesh.service');
    writeFileSync(file, unit);
    const ok = spawnSync('systemd-analyze', ['verify', file], { encoding: 'utf8' });
    expect(ok.stderr).toBe('');
    expect(ok.status).toBe(0);
    // verify exits 0 on a bad directive too, saying so on stderr: the check above can fail.
    const bad = path.join(dir, 'bad.service');
    writeFileSync(bad, unit.replace('Type=notify', 'Type=notifyy'));
    expect(spawnSync('systemd-analyze', ['verify', bad], { encoding: 'utf8' }).stderr).toMatch(/service type/);
  });

  it('install writes the unit file it prints', () => {
    const file = path.join(dir, 'installed.service');
    const out = execFileSync(process.execPath, [path.join(REPO, 'bin', 'vesh.js'), '--config', cfg, 'service', 'install', '--unit-file', file], { encoding: 'utf8' });
    expect(out).toContain(`wrote ${file}`);
    expect(readFileSync(file, 'utf8')).toBe(readFileSync(path.join(dir, 'vesh.service'), 'utf8'));
  });

  it('sends READY=1 once a worker serves, and logs JSON lines when not on a terminal', async () => {
    const i = await waitNote((n) => n.split('\n').includes('READY=1'), 0);
    expect(notes[i]).toContain('STATUS=serving on 127.0.0.1:');
    expect(serve.logs.some((r) => r.event === 'broker.worker_serving')).toBe(true);
    expect(await greet(serve.port, open)).toBe('banner');
    open.splice(0).forEach((s) => s.destroy());
  });

  it('SIGHUP: RELOADING=1 then READY=1, and the new maxStartups is in force; a broken vesh.yaml keeps it', async () => {
    // maxStartups 1: a second connection that has not logged in is refused.
    // The server may not have seen the earlier test's connection close yet.
    let first = await greet(serve.port, open);
    for (let i = 0; i < 100 && first !== 'banner'; i++) {
      await new Promise((r) => setTimeout(r, 50));
      first = await greet(serve.port, open);
    }
    expect(first).toBe('banner');
    expect(await greet(serve.port, open)).toBe('closed');

    writeFileSync(cfg, config(dir, 10));
    let from = notes.length;
    serve.child.kill('SIGHUP');
    const reloading = await waitNote((n) => n.split('\n').includes('RELOADING=1'), from);
    expect(notes[reloading]).toMatch(/MONOTONIC_USEC=\d+/);
    await waitNote((n) => n.split('\n').includes('READY=1'), reloading + 1);
    const done = await serve.waitForLog((r) => r.event === 'serve.reloaded');
    expect(done.applied).toEqual(['auth']);
    expect(await greet(serve.port, open)).toBe('banner');

    writeFileSync(cfg, `${config(dir, 1)}listen: [\n`);
    from = notes.length;
    serve.child.kill('SIGHUP');
    const r2 = await waitNote((n) => n.split('\n').includes('RELOADING=1'), from);
    await waitNote((n) => n.split('\n').includes('READY=1'), r2 + 1);
    const failed = await serve.waitForLog((r) => r.event === 'serve.reload_failed');
    expect(String(failed.msg)).toMatch(/running configuration stays in force/);
    expect(String(failed.err)).toContain(cfg);
    // Still 10, not the broken file's 1: two more unauthenticated connections are taken.
    expect(await greet(serve.port, open)).toBe('banner');
    expect(await greet(serve.port, open)).toBe('banner');
    open.splice(0).forEach((s) => s.destroy());
  });

  it('SIGTERM: STOPPING=1 and a clean exit', async () => {
    const from = notes.length;
    expect(await serve.stop('SIGTERM')).toBe(0);
    await waitNote((n) => n.split('\n').includes('STOPPING=1'), from);
    expect(serve.logs.some((r) => r.event === 'serve.stopped')).toBe(true);
  });
});
