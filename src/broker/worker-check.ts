import { promises as fs } from 'node:fs';
import { fdpassAddonPath } from '../system/fdpass.js';
import { run } from '../system/exec.js';
import { idsInRange, listSome, type Check, type CheckResult } from '../system/doctor-checks.js';
import { workerCount } from './worker-pool.js';
import { appRoot, hiddenFromWorkers, workerSandboxCommand } from './worker-sandbox.js';

/**
 * `vesh doctor`: can an SSH worker start here the way `vesh serve` starts
 * one? A sandbox like a real worker's runs Node, loads the fd-passing addon
 * and installs the seccomp filter; and no host user or group has a worker's
 * id (it would own the files that user owns, from inside the sandbox).
 */
export const checkSshWorkers: Check = async ({ config }) => {
  const out: CheckResult[] = [];
  const count = workerCount(config.workers.count);
  const lo = config.workers.firstUid;
  const hi = lo + count - 1;
  const users = idsInRange(await fs.readFile('/etc/passwd', 'utf8').catch(() => ''), lo, hi);
  const groups = idsInRange(await fs.readFile('/etc/group', 'utf8').catch(() => ''), lo, hi);
  out.push(users.length || groups.length
    ? { name: 'worker ids', status: 'fail', detail: `host ${[users.length ? `users ${listSome(users)}` : '', groups.length ? `groups ${listSome(groups)}` : ''].filter(Boolean).join('; ')} have the ids of SSH workers (${lo}-${hi})`, fix: 'set workers.firstUid in vesh.yaml to ids no host user or group has' }
    : { name: 'worker ids', status: 'ok', detail: `${count} SSH worker(s) run as uids ${lo}-${hi}, used by no host user or group` });
  try {
    const root = appRoot();
    const probe = 'const a = require(process.argv[1]); a.lockdown(); process.stdout.write("sandboxed " + process.getuid());';
    const cmd = workerSandboxCommand({ uid: lo, gid: lo, appRoot: root, script: fdpassAddonPath(), keepFds: [], hide: hiddenFromWorkers(config, root) });
    // The addon stands in as the "script" (under the app root, so visible); node runs the probe with it as its argument.
    const dash = cmd.args.indexOf('--');
    const args = [...cmd.args.slice(0, dash + 2), '-e', probe, fdpassAddonPath()];
    const r = await run(cmd.file, args, { allowFailure: true, timeoutMs: 15_000 });
    out.push(r.code === 0 && r.stdout.startsWith('sandboxed')
      ? { name: 'ssh workers', status: 'ok', detail: `a sandboxed worker starts (uid ${lo}, own namespaces, read-only root, seccomp filter installed)` }
      : { name: 'ssh workers', status: 'fail', detail: `a sandboxed worker does not start: ${(r.stderr.trim() || `exit ${r.code}`).slice(0, 300)}`, fix: 'npm run build (needs gcc and Node\'s headers); run vesh doctor as root' });
  } catch (err) {
    out.push({ name: 'ssh workers', status: 'fail', detail: `cannot start a sandboxed worker: ${(err as Error).message}`, fix: 'npm run build (needs gcc and Node\'s headers)' });
  }
  return out;
};
