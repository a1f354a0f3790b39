import { existsSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Command } from 'commander';
import type { Logger } from '../audit/logger.js';
import { loadServerConfig, type ServerConfig } from '../config/server-config.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import { run } from '../system/exec.js';
import { monotonicUsec, sdNotify } from '../system/sd-notify.js';
import type { GlobalOptions } from './context.js';

export const DEFAULT_UNIT_FILE = '/etc/systemd/system/vesh.service';

/**
 * TasksMax counts only the tasks in the unit's own cgroup: each VE runs in
 * cgroups of its own (with its own pids limit), and so do the host-side
 * session relays (charged to their VE). What stays in the unit: the broker
 * (~20 threads), its workers (≤ 16 on any likely host, ~12 threads each:
 * ~200), and short-lived helpers — runc (a Go program, ~10 threads while it
 * runs), mount, ip — during VE starts and session spawns. Budget 4 tasks per
 * session and 4 per VE at once, plus 1024 for the rest:
 * 500×4 + 1000×4 + 1024 = 7024, rounded up to 8192.
 */
export const TASKS_MAX = 8192;

/**
 * The broker's descriptors: per connection 2 (the worker's copy is the
 * worker's; the broker keeps one to cut it, plus a transient), per session
 * up to 8 (pidfd, pty master or socketpairs until sent, agent socket,
 * forward relays), per VE up to 8 (agent socket, loop and monitor handles):
 * 500×2 + 500×8 + 1000×8 + 1024 = 14024. 65536 leaves 4× headroom and equals
 * workers.maxFiles' default, so workers can keep their own limit.
 */
export const LIMIT_NOFILE = 65_536;

/** One ExecStart argument, quoted for systemd: `%` is a specifier and `$` a variable to it. */
function unitArg(s: string): string {
  return `"${s.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/%/g, '%%').replace(/\$/g, '$$$$')}"`;
}

/** The launcher (bin/vesh.js) of this installation. */
function launcher(): string {
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bin/vesh.js');
}

/** The unit file's text for `vesh --config CONFIG serve`, run by this Node. */
export function renderUnit(configFile: string, opts: { node?: string; launcher?: string } = {}): string {
  const node = opts.node ?? process.execPath;
  const bin = opts.launcher ?? launcher();
  return `# Written by "vesh service install"; "vesh service unit" prints it again.
[Unit]
Description=vesh SSH server (a root shell in its own VE for every account)
After=network-online.target
Wants=network-online.target

[Service]
# READY=1 is sent once the listener is up and a worker serves; a SIGHUP
# reload sends RELOADING=1, then READY=1 (the last good config stays on errors).
Type=notify
NotifyAccess=main
ExecStart=${unitArg(node)} ${unitArg(bin)} --config ${unitArg(path.resolve(configFile))} serve
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2s
# SIGTERM to the broker alone (it closes sessions, up to 5 s), then whatever
# is left in this cgroup (workers, helpers) is killed. VEs run in cgroups of
# their own and keep running across a stop or restart, as with a manual stop.
KillMode=mixed
TimeoutStopSec=30s
# Sized for 1000 VEs and 500 sessions: see TASKS_MAX and LIMIT_NOFILE in src/cli/service.ts.
TasksMax=${TASKS_MAX}
LimitNOFILE=${LIMIT_NOFILE}

[Install]
WantedBy=multi-user.target
`;
}

/** Registers `vesh service unit|install`. */
export function register(program: Command): void {
  const service = program.command('service').description('run vesh serve under systemd');
  service
    .command('unit')
    .description('print the systemd unit for this installation and --config')
    .action(() => {
      process.stdout.write(renderUnit(program.opts<GlobalOptions>().config));
    });
  service
    .command('install')
    .description(`write the systemd unit (${DEFAULT_UNIT_FILE}) and reload systemd`)
    .option('--unit-file <path>', 'where to write the unit', DEFAULT_UNIT_FILE)
    .action(async (o: { unitFile: string }) => {
      const configFile = program.opts<GlobalOptions>().config;
      // A unit pointing at a config that does not load would only fail at start.
      loadServerConfig(configFile);
      const file = path.resolve(o.unitFile);
      const tmp = `${file}.tmp-${process.pid}`;
      try {
        writeFileSync(tmp, renderUnit(configFile), { mode: 0o644 });
        renameSync(tmp, file);
      } catch (err) {
        throw new VeshError(ErrorCodes.COMMAND_FAILED, `cannot write the unit ${file}: ${errorMessage(err)}; run as root, or pass --unit-file PATH`, { cause: err });
      }
      process.stdout.write(`vesh: wrote ${file}\n`);
      // /run/systemd/system exists only where systemd is PID 1 (sd_booted()).
      if (!existsSync('/run/systemd/system')) {
        process.stdout.write('vesh: systemd is not running on this host: the unit is written but not loaded\n');
        return;
      }
      await run('systemctl', ['daemon-reload']);
      process.stdout.write('vesh: systemd reloaded; start it with: systemctl enable --now vesh\n');
    });
}

/** What a SIGHUP reload needs from the running server. */
export interface Reloadable {
  configFile: string;
  /** The configuration in force; the reload compares against it. */
  current: ServerConfig;
  broker: { reconfigure(next: Pick<ServerConfig, 'auth' | 'timeouts'>): void };
  accounts: { reload(): Promise<boolean> };
  log: Logger;
  /** Whether READY=1 was sent at start: a reload before that must not claim readiness. */
  ready(): boolean;
}

/** Sections of vesh.yaml applied by a reload; every other change waits for a restart. */
const LIVE_SECTIONS = ['auth', 'timeouts'] as const;

/**
 * SIGHUP: read vesh.yaml and accounts.yaml again. A vesh.yaml that does not
 * load leaves the running configuration in force (logged with the reason);
 * accounts.yaml keeps its last good version the same way (AccountsStore).
 * Admission caps, the login grace time and timeouts apply to new
 * connections; a change elsewhere is logged as needing a restart. systemd
 * hears RELOADING=1 first and READY=1 at the end. Returns the config in force.
 */
export async function reloadOnHup(r: Reloadable): Promise<ServerConfig> {
  sdNotify({ RELOADING: '1', MONOTONIC_USEC: monotonicUsec(), STATUS: 'reloading vesh.yaml and accounts.yaml' }, r.log);
  let inForce = r.current;
  try {
    let next: ServerConfig | null = null;
    try {
      next = loadServerConfig(r.configFile);
    } catch (err) {
      r.log.error({ event: 'serve.reload_failed', file: r.configFile, err: errorMessage(err) }, `vesh.yaml not reloaded, the running configuration stays in force: ${errorMessage(err)}`);
    }
    if (next) {
      const restartNeeded = (Object.keys(next) as Array<keyof ServerConfig>).filter((k) => k !== 'configFile'
        && !(LIVE_SECTIONS as readonly string[]).includes(k) && JSON.stringify(next[k]) !== JSON.stringify(r.current[k]));
      const applied = LIVE_SECTIONS.filter((k) => JSON.stringify(next[k]) !== JSON.stringify(r.current[k]));
      r.broker.reconfigure(next);
      // What is in force: the new live sections, the old rest.
      inForce = { ...r.current, auth: next.auth, timeouts: next.timeouts };
      r.log.info({ event: 'serve.reloaded', file: r.configFile, applied, restartNeeded }, `vesh.yaml reloaded${applied.length ? `: ${applied.join(', ')} in force for new connections` : ''}`);
      if (restartNeeded.length > 0) {
        r.log.warn({ event: 'serve.reload_restart_needed', sections: restartNeeded }, `vesh.yaml changed in ${restartNeeded.join(', ')}: takes effect at the next restart (systemctl restart vesh)`);
      }
    }
    await r.accounts.reload().catch((err: unknown) => r.log.error({ event: 'serve.reload_failed', err: errorMessage(err) }));
  } finally {
    sdNotify(r.ready() ? { READY: '1', STATUS: 'serving' } : { STATUS: 'starting: waiting for an SSH worker' }, r.log);
  }
  return inForce;
}
