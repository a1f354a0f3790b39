import type { Command } from 'commander';
import { formatSize } from '../config/units.js';
import { buildContext, type GlobalOptions } from './context.js';
import { printTable } from './table.js';

/** Registers `vesh cluster …`: what the etcd-backed cluster looks like from this node. */
export function register(program: Command): void {
  const cluster = program.command('cluster').description('the vesh cluster (cluster mode): nodes and where VEs live');

  cluster.command('status').description('list the live nodes (address, lease, load, capacity, templates) and each VE\'s node')
    .option('--json', 'machine-readable output')
    .action(async (o: { json?: boolean }) => {
      const { config } = buildContext(program.opts<GlobalOptions>(), { quiet: true });
      // Loaded here, not at the top: a single node never loads the etcd client.
      const { clusterConfigOf, withEtcd } = await import('../cluster/admin.js');
      const { readState } = await import('../cluster/cluster-state.js');
      const cfg = clusterConfigOf(config, 'vesh cluster status');
      const state = await withEtcd(cfg, (client) => readState(client, cfg));
      if (o.json) {
        console.log(JSON.stringify({
          cluster: cfg.clusterName, node: cfg.nodeName,
          nodes: state.nodes.map((n) => ({ ...n.record, alive: true, leaseRemaining: n.leaseRemaining })),
          ves: state.ves, conflicts: state.conflicts, invalidRecords: state.bad,
        }, null, 2));
        return;
      }
      console.log(`cluster ${cfg.clusterName} (this node: ${cfg.nodeName})\n`);
      printTable(['NODE', 'ADDRESS', 'LEASE', 'VES', 'SESSIONS', 'LOAD', 'CPUS', 'MEMORY', 'TEMPLATES', 'VERSION'], state.nodes.map(({ record: r, leaseRemaining }) => [
        r.name, r.address, leaseRemaining === null ? 'alive' : `alive ${leaseRemaining}s`, `${r.load.runningVes}/${r.capacity.veSlots}`, String(r.load.sessions),
        r.load.loadavg.map((l) => l.toFixed(2)).join(' '), String(r.capacity.cpus), formatSize(r.capacity.memoryBytes),
        r.templates.map((t) => `${t.name}${t.digest ? `@${t.digest.slice(7, 19)}` : ''}`).join(',') || '-', r.version,
      ]));
      const live = new Set(state.nodes.map((n) => n.record.name));
      console.log('');
      printTable(['VE', 'NODE', 'NODE STATE', 'PLACED', 'BY', 'REVISION'], state.ves.map((v) => [
        v.ve, v.node, live.has(v.node) ? 'alive' : 'down', v.created, v.placedBy, v.modRevision,
      ]));
      for (const c of state.conflicts) console.log(`\nconflict: VE ${c.ve} is on node ${c.node}'s disk too, but placed on another node: keep one copy (see the node's log)`);
      for (const b of state.bad) console.log(`\ninvalid record ${b.key}: ${b.problem}`);
    });
}
