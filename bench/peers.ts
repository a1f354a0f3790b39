import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, promises as fs, writeFileSync } from 'node:fs';
import path from 'node:path';
import { sharedTemplate } from '../test/helpers/templates.js';
import { waitForPort } from './lib.js';

/**
 * The two servers a "vesh beside OpenSSH" benchmark starts: `vesh serve` on
 * the shared Debian template with its own data dir, bridge and subnet, and
 * Debian's sshd with its own config, host key and authorized key. Each
 * bench says only what differs (limits, accounts, sshd options).
 */

const REPO = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');

export interface VeshServeOptions {
  port: number;
  /** `limits: {…}` of the defaults block, e.g. "memory: 512M, pids: 512, cpus: 2, disk: 1G". */
  limits: string;
  /** Bridge name (at most 15 characters) and /24 subnet of its own, so that benches can run beside tests. */
  bridge: string;
  subnet: string;
  /** accounts.yaml, written as given. */
  accounts: string;
  logLevel?: 'error' | 'warn' | 'info';
}

/** Start `vesh serve` in `dir` (config in dir/vesh.yaml, data in dir/data) and wait for its port. */
export async function startVeshServe(dir: string, o: VeshServeOptions): Promise<ChildProcess> {
  const data = path.join(dir, 'data');
  mkdirSync(path.join(data, 'templates'), { recursive: true });
  await fs.symlink((await sharedTemplate('debian')).dir, path.join(data, 'templates', 'debian'));
  writeFileSync(path.join(dir, 'vesh.yaml'), [
    `listen: "127.0.0.1:${o.port}"`, `dataDir: ${data}`, `hostKeysDir: ${dir}/keys`, `accountsFile: ${dir}/accounts.yaml`,
    `defaults: { template: debian, limits: { ${o.limits} } }`,
    `network: { bridge: ${o.bridge}, subnet: ${o.subnet}, outbound: false }`,
    `logging: { level: ${o.logLevel ?? 'warn'}, pretty: false }`,
  ].join('\n'));
  writeFileSync(path.join(dir, 'accounts.yaml'), o.accounts);
  const serve = spawn(process.execPath, [path.join(REPO, 'bin/vesh.js'), '--config', path.join(dir, 'vesh.yaml'), 'serve'], { stdio: ['ignore', 'ignore', 'inherit'] });
  await waitForPort(o.port).catch((e) => { serve.kill('SIGTERM'); throw e; });
  return serve;
}

export interface SshdOptions {
  port: number;
  hostKey: string;
  /** The one public key line root may log in with. */
  authorizedKey: string;
  /** sshd_config lines that differ from the key-only default (e.g. "AllowAgentForwarding yes"). */
  extra?: string[];
  passwordAuthentication?: boolean;
}

/** Start Debian's sshd in the foreground with a config of its own in `dir`, and wait for its port. */
export async function startSshd(dir: string, o: SshdOptions): Promise<ChildProcess> {
  mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });
  writeFileSync(path.join(dir, 'authorized_keys'), `${o.authorizedKey}\n`, { mode: 0o600 });
  writeFileSync(path.join(dir, 'sshd_config'), [
    `Port ${o.port}`, 'ListenAddress 127.0.0.1', `HostKey ${o.hostKey}`, `PidFile ${dir}/sshd.pid`,
    `AuthorizedKeysFile ${dir}/authorized_keys`, 'StrictModes no', 'UsePAM no', 'PermitRootLogin prohibit-password',
    `PasswordAuthentication ${o.passwordAuthentication ? 'yes' : 'no'}`, 'KbdInteractiveAuthentication no',
    ...(o.extra ?? []), 'PrintMotd no', 'UseDNS no', '',
  ].join('\n'));
  const sshd = spawn('/usr/sbin/sshd', ['-D', '-e', '-f', path.join(dir, 'sshd_config')], { stdio: ['ignore', 'ignore', 'ignore'] });
  await waitForPort(o.port).catch((e) => { sshd.kill('SIGTERM'); throw e; });
  return sshd;
}
