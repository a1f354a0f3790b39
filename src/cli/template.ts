import type { Command } from 'commander';
import cliProgress from 'cli-progress';
import { formatSize } from '../config/units.js';
import { ErrorCodes, VeshError } from '../errors.js';
import type { BuildProgress } from '../template/types.js';
import { createTemplateStore, createVeManager } from '../ve/index.js';
import { buildContext, type GlobalOptions } from './context.js';
import { printTable } from './table.js';

/** A progress bar on a terminal, one line per phase otherwise (logs, CI). */
function progressReporter(title: string): { onProgress: (p: BuildProgress) => void; stop: () => void } {
  if (!process.stderr.isTTY) {
    let last = '';
    return {
      onProgress: (p) => {
        if (p.message !== last) process.stderr.write(`${title}: ${p.message}${p.fraction !== null ? ` (${Math.round(p.fraction * 100)}%)` : ''}\n`);
        last = p.message;
      },
      stop: () => undefined,
    };
  }
  const started = Date.now();
  const bar = new cliProgress.SingleBar({
    stream: process.stderr,
    format: `${title} [{bar}] {percentage}% | {elapsed}s | {message}`,
    hideCursor: true,
    clearOnComplete: false,
  }, cliProgress.Presets.shades_classic);
  bar.start(100, 0, { message: 'starting', elapsed: 0 });
  const tick = setInterval(() => bar.update({ elapsed: Math.round((Date.now() - started) / 1000) }), 1000);
  return {
    onProgress: (p) => bar.update(p.fraction === null ? bar.getProgress() * 100 : Math.round(p.fraction * 100), { message: p.message, elapsed: Math.round((Date.now() - started) / 1000) }),
    stop: () => {
      clearInterval(tick);
      bar.stop();
    },
  };
}

/** Run long work with a progress display, stopped once whether the work succeeds or fails. */
async function withProgress<T>(title: string, work: (onProgress: (p: BuildProgress) => void) => Promise<T>): Promise<T> {
  const p = progressReporter(title);
  try {
    return await work(p.onProgress);
  } finally {
    p.stop();
  }
}

/** Registers `vesh template …`. */
export function register(program: Command): void {
  const template = program.command('template').description('build, import and list VE templates (the shared read-only file systems)');

  template.command('build <kind>').description('build a template: "debian" (Debian bookworm minbase from this host\'s apt mirror) or "busybox"')
    .option('--name <name>', 'store it under another name')
    .action(async (kind: string, o: { name?: string }) => {
      if (kind !== 'debian' && kind !== 'busybox') {
        throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `unknown template kind "${kind}": build "debian" or "busybox", or import a root filesystem with "vesh template import NAME FILE.tar"`);
      }
      const { config, layout, logger } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
      const t = await withProgress(`template ${o.name ?? kind}`, (onProgress) => createTemplateStore(config, layout, logger).build(kind, { name: o.name, onProgress }));
      console.log(`built template ${t.name} (${formatSize(t.sizeBytes)})`);
    });

  template.command('import <name> <file>').description('import a root filesystem from a tar archive')
    .action(async (name: string, file: string) => {
      const { config, layout, logger } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
      const t = await withProgress(`template ${name}`, (onProgress) => createTemplateStore(config, layout, logger).importTar(name, file, { onProgress }));
      console.log(`imported template ${t.name} (${formatSize(t.sizeBytes)})`);
      // What the archive had that a shared template may not (see template/sanitize.ts); the log names the paths.
      const { skippedDevices, removedSpecialFiles, clampedModes } = t.imported;
      if (skippedDevices + removedSpecialFiles + clampedModes > 0) {
        console.log(`left out: ${skippedDevices} device node(s) (a VE gets its /dev from the engine), ${removedSpecialFiles} FIFO(s)/socket(s); narrowed the mode of ${clampedModes} file(s) (world-writable, or setuid/setgid not owned by root)`);
      }
    });

  template.command('list').description('list templates').option('--json', 'machine-readable output').action(async (o: { json?: boolean }) => {
    const { config, layout, logger } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
    const store = createTemplateStore(config, layout, logger);
    const ves = createVeManager(config, logger);
    const all = await store.list();
    const users = await Promise.all(all.map((t) => ves.usersOfTemplate(t.name)));
    if (o.json) {
      console.log(JSON.stringify(all.map((t, i) => ({ ...t, ves: users[i] })), null, 2));
      return;
    }
    printTable(['NAME', 'KIND', 'SIZE', 'VES', 'CREATED'], all.map((t, i) => [t.name, t.kind, formatSize(t.sizeBytes), String(users[i]!.length), t.createdAt]));
  });

  template.command('remove <name>').description('remove a template no VE uses').action(async (name: string) => {
    const { config, logger } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
    await createVeManager(config, logger).removeTemplate(name);
    console.log(`removed template ${name}`);
  });
}
