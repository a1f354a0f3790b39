import type { Command } from 'commander';
import { checkSshWorkers } from '../broker/worker-check.js';
import { CHECKS, doctorExitCode, formatCheck, runChecks } from '../system/doctor-checks.js';
import { buildContext, type GlobalOptions } from './context.js';

/** Registers `vesh doctor`: can this host run VEs, and what to do if not. */
export function register(program: Command): void {
  program
    .command('doctor')
    .description('check that this host can run VEs (root, namespaces, overlayfs, cgroups, runc, bridge/veth, nftables, disk tools) and say how to fix what is missing')
    .option('--json', 'machine-readable output')
    .action(async (o: { json?: boolean }) => {
      const { config, layout } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
      const results = await runChecks({ config, layout }, [...CHECKS, checkSshWorkers]);
      if (o.json) console.log(JSON.stringify(results, null, 2));
      else for (const r of results) console.log(formatCheck(r));
      process.exitCode = doctorExitCode(results);
    });
}
