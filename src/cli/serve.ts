import { createHmac, randomBytes } from 'node:crypto';
import type { Command } from 'commander';
import { Authenticator } from '../auth/authenticator.js';
import { AccountsStore } from '../config/accounts-store.js';
import { errorMessage } from '../errors.js';
import { loadOrCreateHostKeys } from '../ssh/host-keys.js';
import { mkdirSync } from 'node:fs';
import { Broker } from '../broker/broker.js';
import { hiddenFromWorkers } from '../broker/worker-sandbox.js';
import { createTemplateStore, createVeManager } from '../ve/index.js';
import { makeLayout } from '../system/layout.js';
import { startMetricsServer } from '../audit/metrics.js';
import { Recordings } from '../audit/recording-store.js';
import { veSamples } from '../ve/metrics-samples.js';
import { buildContext, type GlobalOptions } from './context.js';
import { reloadOnHup } from './service.js';
import { sdNotify, takeNotifySocket } from '../system/sd-notify.js';

/** How long shutdown waits for sessions to hang up and their clients to be told. */
const SHUTDOWN_TIMEOUT_MS = 5_000;

/** Registers `vesh serve`. */
export function register(program: Command): void {
  program
    .command('serve')
    .description('run the SSH server: every account gets a root shell in its own VE')
    .action(async () => {
      await serve(program.opts<GlobalOptions>());
      // Everything we started is closed by now; a handle some library left
      // open must not keep a stopped server's process around.
      process.exit(0);
    });
}

/**
 * Load the configuration, the accounts (watched, and reloaded on SIGHUP), the
 * host keys (made on first start) and the VE manager, then serve until
 * SIGTERM or SIGINT. Stopping closes every session cleanly and leaves the
 * VEs running: the next `vesh serve` finds them again.
 */
export async function serve(opts: GlobalOptions): Promise<void> {
  const { config, logger } = buildContext(opts);
  // Before any worker or helper starts: none of them may inherit it.
  takeNotifySocket();
  const log = logger.child({ component: 'serve' });

  const accounts = new AccountsStore(config.accountsFile, logger);
  await accounts.load();
  accounts.watch();
  const hostKeys = await loadOrCreateHostKeys(config.hostKeysDir, logger);
  // Which cost class an unknown user name is checked in must not change at a
  // restart (the answer time would then tell unknown names from real ones):
  // key it with a secret that lasts as long as the host key does.
  const dummySecret = createHmac('sha256', hostKeys[0]?.privateKey ?? randomBytes(32)).update('vesh: dummy password hash class').digest();
  const authenticator = new Authenticator(accounts, config.auth, logger, { dummySecret, maxHashesPerSource: config.auth.maxPasswordChecksPerSource });
  const ves = createVeManager(config, logger);
  // Cluster mode (off by default): placement decides which VEs log in here.
  // Its module, and the etcd client, are loaded only when it is on.
  let brokerSessions = () => 0;
  const cluster = config.cluster?.enabled
    ? await (await import('../cluster/node.js')).startClusterNode({ config, logger, ves, templates: createTemplateStore(config, makeLayout(config.dataDir), logger), sessions: () => brokerSessions(), hostKeys: hostKeys.map((k) => k.publicKey) })
    : null;

  // The SSH protocol runs in sandboxed workers; this process is the broker.
  // What the workers must never see, even where it lies under the program's
  // own directory (their root shows that directory, read-only).
  mkdirSync(config.dataDir, { recursive: true, mode: 0o700 });
  // Session recording: the directory checked (root-only, out of every VE's
  // reach), what a crash left unsealed sealed, retention applied. Made when
  // any account could be recorded (an account's record: true may come with
  // a later edit of accounts.yaml), hidden from workers like the data dir.
  const recordings = config.recording ? Recordings.open(config.recording, config.dataDir, config.hostKeysDir, logger) : null;
  const hide = [...hiddenFromWorkers(config), ...(recordings ? hiddenFromWorkers({ dataDir: recordings.dir, hostKeysDir: config.hostKeysDir, accountsFile: config.accountsFile, configFile: config.configFile }) : [])];
  const gate = cluster ? cluster.access(ves) : null;
  const server = new Broker({
    config, authenticator, ves: gate ?? ves, hostKeys, logger, hide: [...new Set(hide)], recordings,
    routes: cluster && gate ? cluster.routes(gate) : null,
    // VEs moved here from other nodes (vesh ve move): restored, placed here only once the sender says so.
    veReceiver: cluster ? new (await import('../broker/ve-receive.js')).VeReceiver({
      config, logger, ves, nodeName: config.cluster!.nodeName, placedOn: async (ve) => (await cluster.placement.get(ve))?.node ?? null,
    }) : null,
    // Tests stand a hostile worker in here; an admin never needs to.
    ...(process.env.VESH_WORKER_SCRIPT ? { workerScript: process.env.VESH_WORKER_SCRIPT } : {}),
  });
  if (config.auth.disconnectOnLock) {
    // A lock or delete (vesh user lock|del edit accounts.yaml, which is
    // watched) takes effect on open connections too, not only on the next
    // login (review L8). auth.disconnectOnLock: false keeps them open.
    accounts.onReload((now) => {
      const ended = server.endConnectionsOf((name) => {
        const a = now.get(name);
        if (!a) return 'account deleted';
        return a.locked ? 'account locked' : null;
      });
      if (ended > 0) log.info({ event: 'serve.connections_ended', count: ended }, `ended ${ended} connection(s) of locked or deleted accounts`);
    });
  }
  brokerSessions = () => server.metricsCounts().sessions;
  const addr = await server.listen();
  // Off unless vesh.yaml sets metrics.listen; every figure is the broker's own.
  const metrics = config.metrics?.listen ? await startMetricsServer(config.metrics.listen, {
    broker: () => server.metricsCounts(),
    penalties: () => authenticator.penaltiesInForce(),
    ves: () => veSamples(ves),
  }, logger) : null;

  // A person starting the server reads these; scripts read the log events.
  const lines = [`vesh: listening on ${addr.host.includes(':') ? `[${addr.host}]` : addr.host}:${addr.port}`];
  for (const k of hostKeys) lines.push(`vesh: host key ${k.type} ${k.fingerprint}${k.created ? ' (new)' : ''}`);
  process.stdout.write(`${lines.join('\n')}\n`);

  // Boot on-boot VEs in the background: logins are served meanwhile (a login
  // to a VE still booting waits for that same start).
  void ves.bootOnStart().then(
    (r) => log.info({ event: 'serve.boot_done', started: r.started, failed: r.failed }),
    (err: unknown) => log.error({ event: 'serve.boot_failed', err: errorMessage(err) }),
  );
  await ves.startMonitor();

  // systemd (Type=notify) hears READY=1 only once a worker serves: the
  // listener alone would take connections that nobody answers yet. Never
  // serving, the start times out (TimeoutStartSec) and systemd restarts us.
  let ready = false;
  const readyPoll = setInterval(() => {
    if (!server.serving()) return;
    clearInterval(readyPoll);
    ready = true;
    sdNotify({ READY: '1', STATUS: `serving on ${addr.host}:${addr.port}` }, log);
  }, 20);

  // Reloads run one after the other: a second SIGHUP waits for the first.
  let inForce = config;
  let reloading: Promise<unknown> = Promise.resolve();
  const onHup = () => {
    log.info({ event: 'serve.sighup' }, 'SIGHUP: reloading vesh.yaml and accounts.yaml');
    reloading = reloading
      .then(async () => { inForce = await reloadOnHup({ configFile: config.configFile, current: inForce, broker: server, accounts, log, ready: () => ready }); })
      .catch((err: unknown) => log.error({ event: 'serve.reload_failed', err: errorMessage(err) }));
  };
  process.on('SIGHUP', onHup);

  // A bug in one connection's handling must not end every user's session:
  // log it loudly, with the stack, and keep serving.
  process.on('uncaughtException', (err) => log.fatal({ event: 'serve.uncaught_exception', err: errorMessage(err), stack: err.stack }, 'uncaught exception (bug): please report it'));
  process.on('unhandledRejection', (err) => log.error({ event: 'serve.unhandled_rejection', err: errorMessage(err) }));

  await new Promise<void>((resolve) => {
    let stopping = false;
    const stop = (signal: NodeJS.Signals) => {
      if (stopping) return;
      stopping = true;
      log.info({ event: 'serve.stopping', signal }, `${signal}: closing sessions; VEs keep running`);
      clearInterval(readyPoll);
      sdNotify({ STOPPING: '1', STATUS: 'closing sessions' }, log);
      void (async () => {
        try {
          await server.close(SHUTDOWN_TIMEOUT_MS);
        } catch (err) {
          log.error({ event: 'serve.close_failed', err: errorMessage(err) });
        }
        await metrics?.close();
        await cluster?.stop().catch((err: unknown) => log.warn({ event: 'serve.cluster_leave_failed', err: errorMessage(err) }));
        // Sessions still open after the grace are sealed as cut short by the stop.
        recordings?.close();
        ves.stopMonitor();
        await Promise.resolve(accounts.close()).catch(() => undefined);
        process.removeListener('SIGHUP', onHup);
        log.info({ event: 'serve.stopped' });
        resolve();
      })();
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
  // The pino destination may buffer; let it flush before the CLI returns.
  await new Promise<void>((r) => logger.flush(() => r()));
}
