/**
 * Files the templates carry so that a VE's init behaves like a machine's:
 * `reboot` restarts the VE, `poweroff`/`halt` stop it. With `runc run -d`
 * nobody is the init's parent, so nobody would see why it exited; instead
 * the shutdown path writes "reboot" or "poweroff" to /run/vesh/shutdown (a
 * directory the host gives each VE), and vesh's monitor reads it when the
 * init is gone. No resident process per VE is needed (density target).
 */

/** The marker file inside a VE; the host side reads ves/NAME/ctl/shutdown. */
export const SHUTDOWN_MARKER_IN_VE = '/run/vesh/shutdown';

/** busybox init: SIGUSR2 = poweroff, SIGTERM = reboot; no gettys (no console to log in on). */
export const BUSYBOX_INITTAB = `# vesh VE init (busybox). Services: scripts /etc/init.d/S??* are started at boot.
::sysinit:/etc/init.d/rcS
::shutdown:/etc/init.d/rcK
::restart:/sbin/init
`;

export const BUSYBOX_RCS = `#!/bin/sh
# Start every /etc/init.d/S??* script, in order (enable a service by adding one).
for s in /etc/init.d/S??*; do
  [ -x "$s" ] && "$s" start
done
exit 0
`;

export const BUSYBOX_RCK = `#!/bin/sh
# Stop services in reverse order, then let init kill what is left.
for s in $(ls -r /etc/init.d/S??* 2>/dev/null); do
  [ -x "$s" ] && "$s" stop
done
exit 0
`;

/**
 * /sbin/reboot, /sbin/poweroff and /sbin/halt of the busybox template: note
 * why the VE goes down, then ask init for a clean shutdown (init runs rcK,
 * kills the rest and calls reboot(2), which ends a PID namespace's init).
 */
export function busyboxShutdownScript(action: 'reboot' | 'poweroff'): string {
  return `#!/bin/sh
# vesh: ${action} this VE (the host ${action === 'reboot' ? 'starts it again' : 'leaves it stopped'}).
mkdir -p /run/vesh 2>/dev/null
echo ${action} > ${SHUTDOWN_MARKER_IN_VE}
sync
kill -USR2 1
`;
}

/**
 * sysvinit's inittab for the Debian template: the usual runlevels (services
 * enabled with update-rc.d/systemctl start at boot), no gettys, Ctrl-Alt-Del
 * (SIGINT from the host: "vesh ve stop") is a clean poweroff, and entering
 * runlevel 0 or 6 first writes the shutdown marker, so `reboot`, `shutdown
 * -r now`, `init 6`, `poweroff`, `halt` and `init 0` all work as on Debian.
 */
export const SYSVINIT_INITTAB = `# /etc/inittab of a vesh VE (sysvinit). Gettys are left out: log in with ssh.
id:2:initdefault:
si::sysinit:/etc/init.d/rcS

m0:0:wait:/bin/sh -c 'mkdir -p /run/vesh; echo poweroff > ${SHUTDOWN_MARKER_IN_VE}'
m6:6:wait:/bin/sh -c 'mkdir -p /run/vesh; echo reboot > ${SHUTDOWN_MARKER_IN_VE}'
l0:0:wait:/etc/init.d/rc 0
l1:1:wait:/etc/init.d/rc 1
l2:2:wait:/etc/init.d/rc 2
l3:3:wait:/etc/init.d/rc 3
l4:4:wait:/etc/init.d/rc 4
l5:5:wait:/etc/init.d/rc 5
l6:6:wait:/etc/init.d/rc 6
z6:6:respawn:/sbin/sulogin --force

ca:12345:ctrlaltdel:/sbin/shutdown -t1 -h now
`;

export const MOTD = `
Welcome to your vesh VE: a whole Linux system of your own.
You are root here. Install software, start services, edit anything;
\`reboot\` restarts this VE and \`poweroff\` stops it (your next login starts it).

`;
