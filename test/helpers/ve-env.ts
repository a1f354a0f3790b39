import { randomBytes } from 'node:crypto';
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, promises as fs, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { createLogger, silentLogger, type Logger } from '../../src/audit/logger.js';
import { parseServerConfig, type ServerConfig } from '../../src/config/server-config.js';
import { makeLayout, type Layout } from '../../src/system/layout.js';
import { stopLxcfs } from '../../src/runtime/lxcfs.js';
import { createVeManager, createVeNetwork, createTemplateStore } from '../../src/ve/index.js';
import type { VeManager } from '../../src/ve/manager.js';

/**
 * A private vesh instance for one test file: its own data dir (so its own
 * runc root, cgroup parent and veth names), its own bridge and subnet. All of
 * it goes in `cleanup()`, which the test calls from afterAll so it runs even
 * when a test failed.
 */
export interface VeTestEnv {
  dir: string;
  configFile: string;
  config: ServerConfig;
  layout: Layout;
  logger: Logger;
  ves: VeManager;
  /** Run the vesh CLI against this instance. */
  cli(args: string[], opts?: { input?: string; allowFailure?: boolean }): { code: number; stdout: string; stderr: string };
  cleanup(): Promise<void>;
}

/** `runtime` adds settings to the runtime section (e.g. "sessionAgents: false"). */
export async function makeVeTestEnv(opts: { template?: 'busybox' | 'debian'; extraYaml?: string; runtime?: string; logger?: Logger } = {}): Promise<VeTestEnv> {
  const dir = mkdtempSync('/var/tmp/vesh-test-');
  // VE inits (unprivileged host uids) must pass through every directory above their root.
  chmodSync(dir, 0o711);
  const tag = randomBytes(2).toString('hex');
  // A /24 in 10.200.0.0-10.239.255.0 at random: test traffic goes only to addresses this instance made.
  const subnet = `10.${200 + Math.floor(Math.random() * 40)}.${Math.floor(Math.random() * 256)}.0/24`;
  const template = opts.template ?? 'busybox';
  const yaml = [
    `listen: "127.0.0.1:0"`,
    `dataDir: ${dir}/data`,
    `hostKeysDir: ${dir}/keys`,
    `accountsFile: ${dir}/accounts.yaml`,
    `defaults:`,
    `  template: ${template}`,
    `  limits: { memory: 128M, pids: 128, cpus: 1, disk: 256M }`,
    `network: { bridge: vt${tag}, subnet: ${subnet}, outbound: false }`,
    `runtime: { stopTimeout: 5s${opts.runtime ? `, ${opts.runtime}` : ''} }`,
    opts.extraYaml ?? '',
  ].join('\n');
  const configFile = path.join(dir, 'vesh.yaml');
  writeFileSync(configFile, yaml);
  let config: ServerConfig;
  try {
    config = parseServerConfig(configFile, yaml);
  } catch (err) {
    // Nothing was made yet but the directory: a test's bad extraYaml leaves no trace.
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  const layout = makeLayout(config.dataDir);
  // VESH_TEST_LOG=debug shows the VE layer's log events while a test runs.
  const logger = opts.logger ?? (process.env.VESH_TEST_LOG ? createLogger({ level: process.env.VESH_TEST_LOG as 'debug', pretty: false }) : silentLogger());
  const ves = createVeManager(config, logger);
  await useTemplate(layout, config, logger, template);

  const cli: VeTestEnv['cli'] = (args, o = {}) => {
    try {
      const stdout = execFileSync(process.execPath, [path.resolve('bin/vesh.js'), '--config', configFile, ...args], { input: o.input ?? '', encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'] });
      return { code: 0, stdout, stderr: '' };
    } catch (err) {
      const e = err as { status: number; stdout: string; stderr: string };
      if (!o.allowFailure) throw new Error(`vesh ${args.join(' ')} failed (${e.status}): ${e.stderr}`);
      return { code: e.status, stdout: e.stdout, stderr: e.stderr };
    }
  };

  const cleanup = async () => {
    await removeInstance(config, logger);
    // Anything still mounted below the test dir (a test that failed mid-way) goes before the files do.
    const mounts = (await fs.readFile('/proc/self/mountinfo', 'utf8')).split('\n').map((l) => l.split(' ')[4]).filter((m): m is string => !!m && m.startsWith(dir + '/'));
    for (const m of mounts.sort((a, b) => b.length - a.length)) {
      try { execFileSync('umount', ['-l', m]); } catch { /* already gone */ }
    }
    await fs.rm(dir, { recursive: true, force: true });
  };
  return { dir, configFile, config, layout, logger, ves, cli, cleanup };
}

/**
 * Remove everything a vesh instance made outside its data dir: its VEs
 * (destroyed, running or not), its bridge and firewall tables, and its
 * engine state root (/run/vesh/ID). Used by tests and benchmarks.
 */
export async function removeInstance(config: ServerConfig, logger: Logger = silentLogger()): Promise<void> {
  const layout = makeLayout(config.dataDir);
  const ves = createVeManager(config, logger);
  for (const s of await ves.list().catch(() => [])) {
    await ves.destroy(s.name, { force: true }).catch(() => undefined);
  }
  await createVeNetwork(config, layout, logger).teardownHost().catch(() => undefined);
  // The instance's LXCFS daemon and mount (started with its first VE) go before its runtime dir.
  await stopLxcfs(path.dirname(layout.runtimeRoot)).catch(() => undefined);
  await fs.rm(path.dirname(layout.runtimeRoot), { recursive: true, force: true });
  // /run/vesh itself, once no instance is left in it.
  await fs.rmdir(path.dirname(path.dirname(layout.runtimeRoot))).catch(() => undefined);
}

/**
 * Point this instance at a template: busybox is built for each instance (a few
 * seconds); Debian comes from a cache shared by test files and CI runs.
 */
async function useTemplate(layout: Layout, config: ServerConfig, logger: Logger, kind: 'busybox' | 'debian'): Promise<void> {
  const store = createTemplateStore(config, layout, logger);
  if (kind === 'busybox') {
    await store.build('busybox', {});
    return;
  }
  const { sharedTemplate } = await import('./templates.js');
  const cached = await sharedTemplate('debian');
  await fs.mkdir(layout.templatesDir, { recursive: true });
  await fs.symlink(cached.dir, layout.templateDir('debian'));
}

/** Run a shell script inside a VE as its root and return its output (throws on a non-zero exit unless allowFailure). */
export async function shInVe(env: VeTestEnv, ve: string, script: string, opts: { allowFailure?: boolean; timeoutMs?: number; shell?: string } = {}) {
  const cmd = await env.ves.execCommand(ve, {
    argv: [opts.shell ?? '/bin/sh', '-c', script], uid: 0, gid: 0, tty: false,
    env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', HOME: '/root' },
  });
  const res = spawnSync(cmd.file, cmd.args, { encoding: 'utf8', timeout: opts.timeoutMs ?? 60_000 });
  if (res.status !== 0 && !opts.allowFailure) throw new Error(`"${script}" in ${ve} exited ${res.status}: ${res.stderr}`);
  return { code: res.status ?? -1, stdout: res.stdout, stderr: res.stderr };
}

/** Poll `cond` every 100 ms until it holds; throw naming `what` after the timeout. */
export async function waitFor(what: string, cond: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}
