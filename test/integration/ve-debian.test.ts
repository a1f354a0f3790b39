import { execFileSync, spawnSync } from 'node:child_process';
import path from 'node:path';
import * as pty from 'node-pty';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';

/**
 * A VE on the Debian template behaves like a Debian machine: sysvinit is
 * PID 1, services enabled for boot start at boot, dpkg installs packages,
 * tmux and screen work, reboot restarts the VE and poweroff stops it, and
 * `vesh ve enter` gives a root shell on a terminal of the VE's own.
 */
const sh = (env: VeTestEnv, ve: string, script: string, opts: { allowFailure?: boolean } = {}) => shInVe(env, ve, script, { ...opts, shell: '/bin/bash' });

const HELLO_SERVICE = `#!/bin/sh
### BEGIN INIT INFO
# Provides:          hello
# Required-Start:
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: test daemon
### END INIT INFO
case "$1" in
  start) start-stop-daemon --start --background --make-pidfile --pidfile /run/hello.pid --exec /bin/sleep -- 9999 ;;
  stop) start-stop-daemon --stop --pidfile /run/hello.pid --remove-pidfile ;;
esac
`;

describe('a VE on the Debian template', () => {
  let env: VeTestEnv;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'debian' });
    await env.ves.create('deb1');
    await env.ves.start('deb1');
    await env.ves.startMonitor(200);
    // start() returns once init runs; its boot scripts are processes of their own until runlevel 2 is reached.
    await waitFor('sysvinit to finish booting', async () => (await sh(env, 'deb1', 'runlevel', { allowFailure: true })).stdout.trim() === 'N 2');
  });

  afterAll(async () => {
    env?.ves.stopMonitor();
    await env?.cleanup();
  });

  it('runs sysvinit as PID 1 and shows only its own processes', async () => {
    const ps = await sh(env, 'deb1', 'ps -eo pid,comm --no-headers');
    const lines = ps.stdout.trim().split('\n').map((l) => l.trim());
    expect(lines[0]).toMatch(/^1 init$/);
    expect(lines.length).toBeLessThan(10);
    expect((await sh(env, 'deb1', 'hostname')).stdout.trim()).toBe('deb1');
  });

  it('denies io_uring to VE root (seccomp)', async () => {
    // io_uring_setup is syscall 425 on x86_64; perl-base is in every Debian system.
    const probe = `perl -e 'my $p = "\\0" x 120; my $r = syscall(425, 1, $p); print $r == -1 ? "$!\\n" : "allowed\\n"'`;
    // The control: this kernel offers io_uring outside the VE, so the denial is the filter's.
    expect(execFileSync('sh', ['-c', probe], { encoding: 'utf8' })).toBe('allowed\n');
    expect((await sh(env, 'deb1', probe)).stdout).toBe('Operation not permitted\n');
  });

  it('starts services with "service", and enabled services at boot', async () => {
    await sh(env, 'deb1', `cat > /etc/init.d/hello <<'EOF'\n${HELLO_SERVICE}EOF\nchmod +x /etc/init.d/hello && update-rc.d hello defaults && service hello start`);
    expect((await sh(env, 'deb1', 'pgrep -fx "/bin/sleep 9999"')).stdout.trim()).toMatch(/^\d+$/);
    await env.ves.restart('deb1');
    await waitFor('the enabled service after restart', async () => (await sh(env, 'deb1', 'pgrep -fx "/bin/sleep 9999"', { allowFailure: true })).code === 0);
  });

  it('installs a .deb with dpkg, adds users, and keeps it all across a restart', async () => {
    await sh(env, 'deb1', [
      'set -e; cd /tmp; mkdir -p pkg/DEBIAN pkg/usr/bin',
      'printf "Package: hi\\nVersion: 1.0\\nArchitecture: all\\nMaintainer: t <t@t>\\nDescription: test\\n" > pkg/DEBIAN/control',
      'printf "#!/bin/sh\\necho hi-from-deb\\n" > pkg/usr/bin/hi; chmod 755 pkg/usr/bin/hi',
      'dpkg-deb --build pkg hi.deb >/dev/null; dpkg -i hi.deb >/dev/null; useradd -m carol',
    ].join('\n'));
    await env.ves.restart('deb1');
    expect((await sh(env, 'deb1', 'hi; id -un carol')).stdout).toBe('hi-from-deb\ncarol\n');
    const upper = path.join(env.layout.veDir('deb1'), 'private', 'upper', 'usr', 'bin', 'hi');
    expect(spawnSync('test', ['-f', upper]).status).toBe(0);
  });

  it('runs tmux and screen sessions', async () => {
    expect((await sh(env, 'deb1', 'tmux new -d -s t "sleep 60" && tmux ls')).stdout).toMatch(/^t: 1 windows/);
    // screen -dm returns before its daemon has made the session socket: wait for it (up to 10 s).
    const screen = 'screen -dmS s sleep 60 && for i in $(seq 100); do screen -ls | grep -q "\\.s[[:space:]]" && break; sleep 0.1; done; screen -ls';
    expect((await sh(env, 'deb1', screen, { allowFailure: true })).stdout).toMatch(/\.s\s/);
    await sh(env, 'deb1', 'tmux kill-server; screen -S s -X quit', { allowFailure: true });
  });

  it('"vesh ve enter" gives a root login shell on a terminal that exists in the VE', async () => {
    const term = pty.spawn(process.execPath, [path.resolve('bin/vesh.js'), '--config', env.configFile, 've', 'enter', 'deb1'], {
      name: 'xterm', cols: 100, rows: 30, env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', TERM: 'xterm' },
    });
    let out = '';
    term.onData((d) => { out += d; });
    try {
      await waitFor('the root prompt', async () => /root@deb1:~# $/m.test(out), 20_000);
      term.write('t=$(tty); test -e "$t" && echo "TTY-OK $t"; stty size\r');
      await waitFor('tty and size', async () => /TTY-OK \/dev\/pts\/\d+/.test(out) && /30 100/.test(out), 10_000);
      term.write('exit 3\r');
      const code = await new Promise<number>((r) => term.onExit((e) => r(e.exitCode)));
      expect(code).toBe(3);
    } finally {
      term.kill();
    }
  });

  it('restarts on reboot and stays down after poweroff', async () => {
    const before = (await env.ves.status('deb1')).pid;
    await sh(env, 'deb1', 'reboot', { allowFailure: true });
    await waitFor('deb1 to come back with a new init', async () => {
      const s = await env.ves.status('deb1');
      return s.state === 'running' && s.pid !== before;
    }, 60_000);
    await waitFor('sysvinit to finish booting', async () => (await sh(env, 'deb1', 'runlevel', { allowFailure: true })).stdout.trim() === 'N 2');
    await sh(env, 'deb1', 'poweroff', { allowFailure: true });
    await waitFor('deb1 to stop', async () => (await env.ves.status('deb1')).state === 'stopped', 60_000);
    await new Promise((r) => setTimeout(r, 1500));
    expect((await env.ves.status('deb1')).state).toBe('stopped');
  });
});
