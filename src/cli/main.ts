import { Command, CommanderError } from 'commander';
import { isVeshError, errorMessage } from '../errors.js';
import { DEFAULT_CONFIG_PATH } from '../config/server-config.js';
import * as serve from './serve.js';
import * as ve from './ve.js';
import * as template from './template.js';
import * as user from './user.js';
import * as doctor from './doctor.js';
import * as service from './service.js';
import * as recordings from './recordings.js';
import * as cluster from './cluster.js';

/**
 * Each object's verbs live in their own file (cli/ve.ts, cli/user.ts, …) and
 * register themselves here; verbs are thin: parse, call, print.
 */
const registrars: Array<(program: Command) => void> = [serve.register, ve.register, template.register, user.register, user.registerHashPassword, doctor.register, service.register, recordings.register, cluster.register];

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('vesh')
    .description('SSH server that gives every account a root shell in its own virtual environment (VE)')
    .option('--config <path>', 'server configuration file', DEFAULT_CONFIG_PATH)
    .showHelpAfterError()
    .exitOverride();
  return program;
}

export async function main(argv: string[]): Promise<void> {
  const program = buildProgram();
  for (const register of registrars) register(program);
  try {
    await program.parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      process.exitCode = err.exitCode;
      return;
    }
    const code = isVeshError(err) ? err.code : 'VESH_INTERNAL';
    process.stderr.write(`vesh: ${errorMessage(err)} [${code}]\n`);
    process.exitCode = typeof (err as { exitCode?: unknown }).exitCode === 'number' ? (err as { exitCode: number }).exitCode : 1;
  }
}
