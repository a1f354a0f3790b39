import { spawnSync } from 'node:child_process';
import { closeSync, openSync, readSync, existsSync, constants as fsc } from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import type { RecordingConfig } from '../config/server-config.js';
import { chainKey, parseRecordingName } from '../audit/recording-store.js';
import { listRecordings, verifyRecordings } from '../audit/recording-verify.js';
import { ErrorCodes, VeshError } from '../errors.js';
import { buildContext, type GlobalOptions } from './context.js';
import { printTable } from './table.js';

/** `vesh recordings list|show|verify`: read the recordings directory and its chain (src/audit/recording-*.ts). */

function settings(program: Command): { rec: RecordingConfig; keysDir: string } {
  const { config } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
  const rec = config.recording;
  if (!rec) throw new VeshError(ErrorCodes.CONFIG_INVALID, 'this configuration has no recording settings');
  if (!existsSync(rec.dir)) throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `no recordings directory at ${rec.dir}: nothing was recorded yet (set recording.enabled or an account's record: true in the config, and start vesh serve)`);
  return { rec, keysDir: config.hostKeysDir };
}

/** The chain's key for checking, or null when recording.hmac is off. A missing key with hmac on is an error: the chain cannot be checked. */
function keyFor(rec: RecordingConfig, keysDir: string): Buffer | null {
  if (!rec.hmac) return null;
  try {
    return chainKey(keysDir, false);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `recording.hmac is on but ${path.join(keysDir, 'recording-chain.key')} is missing: restore it from a backup (without it the chain cannot be checked), or set recording.hmac: false for a chain made without it`);
    }
    throw err;
  }
}

function fmtSize(n: number | null): string {
  return n === null ? '-' : String(n);
}

/** Copy a recording file to stdout in pieces (it may be large). */
function printFile(file: string): void {
  const fd = openSync(file, fsc.O_RDONLY | fsc.O_NOFOLLOW);
  try {
    const buf = Buffer.alloc(1024 * 1024);
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, null);
      if (n <= 0) break;
      process.stdout.write(Buffer.from(buf.subarray(0, n)));
    }
  } finally {
    closeSync(fd);
  }
}

export function register(program: Command): void {
  const cmd = program.command('recordings').description('list, show and verify session recordings (vesh.yaml recording:, accounts.yaml record:)');

  cmd.command('list').description('list recordings, oldest first')
    .option('--account <name>', 'only this account\'s')
    .option('--ve <name>', 'only sessions in this VE')
    .option('--json', 'machine-readable output')
    .action((o: { account?: string; ve?: string; json?: boolean }) => {
      const { rec } = settings(program);
      const rows = listRecordings(rec.dir).filter((r) => (!o.account || r.account === o.account) && (!o.ve || r.ve === o.ve));
      if (o.json) {
        console.log(JSON.stringify(rows, null, 2));
        return;
      }
      printTable(['ID', 'KIND', 'ACCOUNT', 'VE', 'STARTED', 'BYTES', 'STATUS'],
        rows.map((r) => [r.id, r.kind, r.account, r.ve, r.startedAt, fmtSize(r.size), `${r.status}${r.sealReason && r.sealReason !== 'ended' ? ` (${r.sealReason})` : ''}${r.truncated ? ', truncated' : ''}`]));
    });

  cmd.command('show <id>').description('print a recording (an asciicast or a connection\'s events); --play plays a cast with asciinema')
    .option('--play', 'play it with asciinema (installed separately)')
    .action((id: string, o: { play?: boolean }) => {
      const { rec } = settings(program);
      // Only names the server makes: an ID cannot name a path elsewhere.
      const file = [id, `${id}.cast`, `${id}.events.jsonl`].find((f) => parseRecordingName(f) && existsSync(path.join(rec.dir, f)));
      if (!file) throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `no recording ${JSON.stringify(id.slice(0, 120))} in ${rec.dir}: see \`vesh recordings list\` for the IDs`);
      const full = path.join(rec.dir, file);
      if (!o.play) {
        printFile(full);
        return;
      }
      if (!file.endsWith('.cast')) throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `${id} is a connection's events, not a terminal session: show it without --play`);
      const r = spawnSync('asciinema', ['play', full], { stdio: 'inherit' });
      if (r.error) throw new VeshError(ErrorCodes.COMMAND_MISSING, `asciinema could not be run (${r.error.message}): install it (apt-get install asciinema), or print the cast without --play`);
      process.exitCode = r.status ?? 1;
    });

  cmd.command('verify').description('check the hash chain and every recording against it; exits non-zero on any problem')
    .option('--json', 'machine-readable output')
    .action((o: { json?: boolean }) => {
      const { rec, keysDir } = settings(program);
      const report = verifyRecordings(rec.dir, keyFor(rec, keysDir));
      if (o.json) console.log(JSON.stringify(report, null, 2));
      else {
        for (const p of report.problems) console.log(p.message);
        for (const f of report.recording) console.log(`recording: ${f} is being written now (sealed when its session ends)`);
        console.log(`${report.ok ? 'ok' : 'FAILED'}: ${report.entries} chain entries, ${report.sealed} sealed files (${report.pruned} pruned by retention), ${report.recording.length} being recorded, ${report.problems.length} problem(s)`);
      }
      if (!report.ok) process.exitCode = 1;
    });
}
