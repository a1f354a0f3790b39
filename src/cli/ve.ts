import { spawn } from 'node:child_process';
import type { Command } from 'commander';
import type { LimitsInput } from '../config/limits.js';
import { limitsInputSchema } from '../config/schema.js';
import { formatSize } from '../config/units.js';
import { ErrorCodes, VeshError } from '../errors.js';
import { createTemplateStore, createVeManager, createVeNetwork, type VeManager } from '../ve/index.js';
import { VeBackups } from '../ve/backup.js';
import { makeLayout } from '../system/layout.js';
import type { VeStatus } from '../ve/manager.js';
import { buildContext, type GlobalOptions } from './context.js';
import { printTable } from './table.js';

interface LimitOptions {
  memory?: string;
  pids?: string;
  cpus?: string;
  disk?: string;
}

function manager(program: Command): VeManager {
  const { config, logger } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
  return createVeManager(config, logger);
}

function backups(program: Command): VeBackups {
  const { config, logger } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
  const layout = makeLayout(config.dataDir);
  return new VeBackups({
    config, layout, logger, ves: createVeManager(config, logger),
    templates: createTemplateStore(config, layout, logger), network: createVeNetwork(config, layout, logger),
  });
}

/** --memory/--pids/--cpus/--disk → limits, with the same parser and messages as the config files. */
function limitsFrom(o: LimitOptions): LimitsInput {
  const raw = Object.fromEntries(Object.entries({ memory: o.memory, pids: o.pids, cpus: o.cpus, disk: o.disk }).filter(([, v]) => v !== undefined));
  const res = limitsInputSchema.safeParse(raw);
  if (!res.success) {
    const issue = res.error.issues[0]!;
    throw new VeshError(ErrorCodes.INVALID_LIMIT, `--${String(issue.path[0])}: ${issue.message}`);
  }
  return res.data;
}

function fmtMem(s: VeStatus): string {
  if (s.memoryBytes === null) return '-';
  return `${formatSize(s.memoryBytes)}/${s.limits.memory > 0 ? formatSize(s.limits.memory) : 'unlimited'}`;
}

/** Exit status of a child as a shell reports it: 128+N when killed by signal N. */
function exitCodeOf(code: number | null, signal: NodeJS.Signals | null): number {
  if (code !== null) return code;
  const n = signal ? (({ SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGKILL: 9, SIGTERM: 15, SIGPIPE: 13 } as Record<string, number>)[signal] ?? 1) : 1;
  return 128 + n;
}

/**
 * Run a host command that enters the VE, and pass its exit status through.
 * With a terminal, runc makes a pty inside the VE and relays it to ours. Without
 * one, runc would hand our own descriptors to the process in the VE: when
 * they are the admin's terminal (`vesh ve exec … | less` leaves stdin on
 * it), VE root could keep them and read keystrokes or write escapes. So the
 * process gets pipes, and we copy bytes between them and our stdio.
 */
function runAttached(file: string, args: string[], tty: boolean): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: tty ? 'inherit' : ['pipe', 'pipe', 'pipe'] });
    // The terminal's Ctrl-C goes to the process in the VE (through runc's
    // terminal); we only wait for it.
    const ignore = () => undefined;
    process.on('SIGINT', ignore);
    process.on('SIGQUIT', ignore);
    let relayIn: (() => void) | null = null;
    if (!tty) {
      const stdin = child.stdin!;
      stdin.on('error', () => undefined); // the process may exit without reading its input
      child.stdout!.pipe(process.stdout);
      child.stderr!.pipe(process.stderr);
      process.stdin.pipe(stdin);
      relayIn = () => {
        process.stdin.unpipe(stdin);
        // Our stdin no longer keeps the CLI alive once the process has ended.
        process.stdin.pause();
        process.stdin.destroy();
      };
    }
    child.on('error', reject);
    child.on('close', (code, signal) => {
      process.off('SIGINT', ignore);
      process.off('SIGQUIT', ignore);
      relayIn?.();
      resolve(exitCodeOf(code, signal));
    });
  });
}

/** In cluster mode, refuses to start a VE the cluster places on another node (the cluster code loads only then). */
async function placedHere(program: Command, name: string): Promise<void> {
  const { config } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
  if (config.cluster?.enabled) await (await import('../cluster/admin.js')).assertPlacedHere(config, name);
}

/** Registers `vesh ve …`: the VE lifecycle verbs, in the manner of vzctl/vzlist. */
export function register(program: Command): void {
  const ve = program.command('ve').description('create, run and inspect virtual environments');

  const addLimitOptions = (c: Command) => c
    .option('--memory <size>', 'memory limit, e.g. 512M (0 = unlimited)')
    .option('--pids <n>', 'process limit')
    .option('--cpus <n>', 'CPU limit in cores, e.g. 0.5')
    .option('--disk <size>', 'size of the VE\'s private disk, e.g. 2G (0 = no separate disk)');

  addLimitOptions(ve.command('create <name>').description('create a VE (stopped) from a template')
    .option('--template <name>', 'template to build it on (default: defaults.template)')
    .option('--onboot', 'start it whenever vesh serve starts')
    .option('--node <name>', 'cluster mode: place it on this node (default: this one); on another node it is created there at its first login'))
    .action(async (name: string, o: LimitOptions & { template?: string; onboot?: boolean; node?: string }) => {
      const { config } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
      const limits = limitsFrom(o);
      const create = async () => {
        const rec = await manager(program).create(name, { template: o.template, limits, onBoot: o.onboot });
        console.log(`created VE ${rec.name} (template ${rec.template}, address ${rec.address})`);
        if (rec.limits.disk === 0) console.error(`warning: VE ${rec.name} has no disk limit (disk 0): its files sit on the host disk without limit; "vesh doctor" lists such VEs`);
      };
      // Without cluster mode and --node this is create() alone: the cluster code is not even loaded.
      if (!config.cluster?.enabled && o.node === undefined) return create();
      const { createPlaced } = await import('../cluster/admin.js');
      const placed = await createPlaced(config, name, { node: o.node, template: o.template ?? config.defaults.template }, create);
      if (!placed.here) console.log(`placed VE ${name} on node ${placed.node}; it is created there at its first login`);
    });

  ve.command('start <name>').description('start a VE').action(async (name: string) => {
    await placedHere(program, name);
    await manager(program).start(name);
    console.log(`started VE ${name}`);
  });

  ve.command('stop <name>').description('stop a VE: its init shuts down cleanly, or is killed after runtime.stopTimeout')
    .option('--kill', 'kill at once instead of a clean shutdown')
    .action(async (name: string, o: { kill?: boolean }) => {
      await manager(program).stop(name, { kill: o.kill });
      console.log(`stopped VE ${name}`);
    });

  ve.command('restart <name>').description('stop and start a VE').action(async (name: string) => {
    await placedHere(program, name);
    await manager(program).restart(name);
    console.log(`restarted VE ${name}`);
  });

  ve.command('destroy <name>').description('remove a VE and everything it owns (its files too)')
    .option('--force', 'stop it first if it runs')
    .action(async (name: string, o: { force?: boolean }) => {
      await manager(program).destroy(name, { force: o.force });
      console.log(`destroyed VE ${name}`);
      const { config } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
      if (config.cluster?.enabled && (await (await import('../cluster/admin.js')).releaseDestroyed(config, name))) console.log(`removed VE ${name}'s placement from the cluster`);
    });

  ve.command('backup <name> <file>').description('write a VE (its record and disk) to FILE, consistent whether it runs or not (a running VE is frozen for the copy)')
    .action(async (name: string, file: string) => {
      const res = await backups(program).backup(name, file);
      console.log(`backed up VE ${name} to ${res.file} (${formatSize(res.bytes)}, ${formatSize(res.dataBytes)} of data in a ${formatSize(res.imageSize)} disk${res.wasRunning ? `; frozen ${res.frozenMs} ms` : ''})`);
    });

  ve.command('restore <file> [name]').description('make a stopped VE from a backup, under its own name or NAME, with a fresh address and id range')
    .action(async (file: string, name: string | undefined) => {
      const rec = await backups(program).restore(file, name);
      console.log(`restored VE ${rec.name} (template ${rec.template}, address ${rec.address}); start it with "vesh ve start ${rec.name}"`);
    });

  ve.command('move <name>').description('cluster mode: move a stopped VE from this node to another (backup, copy over the node-to-node channel, restore there, then the placement); a failure leaves it here')
    .requiredOption('--to <node>', 'the live node to move it to (it needs the same template)')
    .action(async (name: string, o: { to: string }) => {
      const { config, logger } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
      // Loaded here: a single node never loads the cluster code.
      const { moveVe } = await import('../cluster/ve-move.js');
      const r = await moveVe(config, logger, name, o.to, (line) => console.log(line));
      const mib = r.bytes / 1048576;
      console.log(`moved VE ${r.ve} to node ${r.to}: ${mib.toFixed(1)} MiB in ${r.seconds.toFixed(1)} s; it starts there at its next login or with "vesh ve start ${r.ve}" on ${r.to}`);
      if (r.leftHere) {
        console.error(`warning: ${r.leftHere}`);
        process.exitCode = 1;
      }
    });

  ve.command('set <name>').description('change a VE\'s settings')
    .option('--onboot <yes|no>', 'start it whenever vesh serve starts')
    .action(async (name: string, o: { onboot?: string }) => {
      if (o.onboot === undefined) throw new VeshError(ErrorCodes.INVALID_ARGUMENT, 'nothing to set: give --onboot yes|no');
      if (!/^(yes|no|true|false|on|off)$/.test(o.onboot)) throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `--onboot must be yes or no, not "${o.onboot}"`);
      await manager(program).setOnBoot(name, /^(yes|true|on)$/.test(o.onboot));
      console.log(`VE ${name}: onboot ${o.onboot}`);
    });

  ve.command('list').description('list VEs').option('--json', 'machine-readable output').action(async (o: { json?: boolean }) => {
    const all = await manager(program).list();
    if (o.json) {
      console.log(JSON.stringify(all, null, 2));
      return;
    }
    printTable(['NAME', 'STATE', 'ADDRESS', 'TEMPLATE', 'MEMORY', 'PROCS', 'ONBOOT'], all.map((s) => [
      s.name, s.state, s.address, s.template, fmtMem(s), s.processes === null ? '-' : `${s.processes}/${s.limits.pids || '-'}`, s.onBoot ? 'yes' : 'no',
    ]));
  });

  ve.command('status <name>').description('show one VE').option('--json', 'machine-readable output').action(async (name: string, o: { json?: boolean }) => {
    const s = await manager(program).status(name);
    if (o.json) {
      console.log(JSON.stringify(s, null, 2));
      return;
    }
    const rows: Array<[string, string]> = [
      ['name', s.name], ['state', s.state], ['address', s.address], ['template', s.template], ['init pid', s.pid === null ? '-' : String(s.pid)],
      ['memory', fmtMem(s)], ['processes', s.processes === null ? '-' : `${s.processes}/${s.limits.pids || 'unlimited'}`],
      ['cpus', s.limits.cpus > 0 ? String(s.limits.cpus) : 'unlimited'],
      ['disk', s.disk ? `${formatSize(s.disk.used)}/${formatSize(s.disk.total)}` : s.limits.disk > 0 ? formatSize(s.limits.disk) : 'no limit'],
      ['onboot', s.onBoot ? 'yes' : 'no'], ['created', s.createdAt],
    ];
    for (const [k, v] of rows) console.log(`${k.padEnd(10)} ${v}`);
  });

  ve.command('exec <name> <command...>').description('run a command as root in a running VE; its exit status is passed through')
    .usage('<name> -- <command...>')
    .action(async (name: string, argv: string[]) => {
      const tty = Boolean(process.stdin.isTTY && process.stdout.isTTY);
      const cmd = await manager(program).execCommand(name, {
        argv, uid: 0, gid: 0, tty, cwd: '/', ...terminalSize(tty),
        env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', HOME: '/root', ...(tty && process.env.TERM ? { TERM: process.env.TERM } : {}) },
      });
      process.exitCode = await runAttached(cmd.file, cmd.args, tty);
    });

  ve.command('enter <name>').description('interactive root shell in a VE (like vzctl enter); starts it if stopped')
    .action(async (name: string) => {
      const m = manager(program);
      if (!(await m.exists(name))) await m.status(name);
      await placedHere(program, name);
      await m.ensureRunning(name, { reason: 'enter' });
      const root = await m.lookupUser(name, 'root');
      const tty = Boolean(process.stdin.isTTY);
      const cmd = await m.processCommand(name, {
        user: root,
        argv: [root.shell, '-l'],
        cwd: root.home,
        tty,
        ...terminalSize(tty),
        env: {
          PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', HOME: root.home, USER: 'root', LOGNAME: 'root', SHELL: root.shell,
          TERM: process.env.TERM ?? 'xterm', ...(process.env.LANG ? { LANG: process.env.LANG } : {}),
        },
      });
      process.exitCode = await runAttached(cmd.file, cmd.args, tty);
    });
}

/** Our terminal's size, so that a process in a VE has it from its start. */
function terminalSize(tty: boolean): { consoleSize?: { rows: number; cols: number } } {
  const { rows, columns } = process.stdout;
  return tty && rows > 0 && columns > 0 ? { consoleSize: { rows, cols: columns } } : {};
}
