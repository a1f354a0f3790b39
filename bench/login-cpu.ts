/**
 * Who used the host's CPU during a logins/s run, every process counted:
 * the OpenSSH clients (each lives ~0.1 s, so the 100 ms /proc sampler of
 * lib.ts misses most of them), each server's process tree, each VE (its
 * session agent's fork and the `sh -c true` it runs), and the rest of the
 * host. Read from cgroup v1 cpuacct groups made for the run: a group counts
 * the time of every task that ran in it, exited or not, and children stay
 * in their parent's group (the VEs' processes are in the VEs' own groups,
 * which runc makes). Accounting only: cpuacct sets no limit.
 *
 * With 8 clients in parallel on this 2-CPU host the logins/s figure is set
 * by the CPU one login costs the whole host (see bench/README.md): this
 * tells that sum apart.
 */
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { hostCpuTicks } from './lib.js';

const CPUACCT = '/sys/fs/cgroup/cpuacct';
const USER_HZ = 100;

/** CPU per login, ms, of one logins/s run. */
export interface LoginCpu {
  /** The client `ssh` processes (this process's children). */
  clients: number;
  /** This process: spawning the clients, the /proc sampler, and for "bare" the ssh2 server itself. */
  bench: number;
  /** The server's process tree (broker and workers; sshd and its children); for "bare", the same as bench. */
  server: number;
  /** The VE the sessions ran in (its session agent and the session's processes); 0 for host servers. */
  ve: number;
  /** The host's busy time not in any of these (other people's work, interrupts). */
  rest: number;
  /** Share of the host's CPUs busy over the run (0–1). */
  busy: number;
}

function usageNs(dir: string): number {
  try {
    return Number(readFileSync(path.join(dir, 'cpuacct.usage'), 'utf8'));
  } catch {
    return 0;
  }
}

/** This process's cpuacct group now (to come back to at the end). */
function ownGroup(): string | null {
  const line = readFileSync('/proc/self/cgroup', 'utf8').split('\n').find((l) => /^\d+:([^:]*,)?cpuacct(,[^:]*)?:/.test(l));
  return line ? line.slice(line.lastIndexOf(':') + 1) : null;
}

export class LoginCpuGroups {
  private readonly root = path.join(CPUACCT, `vesh-bench-${process.pid}`);
  private readonly made: string[] = [];
  private readonly servers = new Map<string, string>();
  private readonly ves = new Map<string, string>();
  private readonly home = ownGroup();

  /** Null where there is no cgroup v1 cpuacct hierarchy (then only the /proc sampler reports). */
  static create(): LoginCpuGroups | null {
    if (!existsSync(path.join(CPUACCT, 'cpuacct.usage')) || ownGroup() === null) return null;
    try {
      return new LoginCpuGroups();
    } catch (err) {
      // A read-only or delegated cgroup tree: the run goes on with the sampler's figures only.
      console.error(`--cpu: no cpuacct groups for this run (${(err as Error).message}); CPU per login by group is left out`);
      return null;
    }
  }

  private constructor() {
    mkdirSync(this.root);
    this.made.push(this.root);
    try {
      // This process goes into "clients": every ssh it spawns is born there.
      this.group('clients', process.pid);
    } catch (err) {
      this.remove();
      throw err;
    }
  }

  private group(name: string, pid: number): string {
    const dir = path.join(this.root, name);
    mkdirSync(dir);
    this.made.push(dir);
    writeFileSync(path.join(dir, 'cgroup.procs'), String(pid));
    return dir;
  }

  /** A server's process tree, from its first process (call right after spawning it: workers it starts later are born in the group). */
  server(target: string, pid: number): void {
    try {
      this.servers.set(target, this.group(`server-${target}`, pid));
    } catch (err) {
      // Gone already (it failed to start): the run reports that itself; its server figure reads 0.
      console.error(`--cpu: cannot count ${target}'s CPU by group: ${(err as Error).message}`);
    }
  }

  /** The VE a target's sessions run in: the group runc made for it (`cgroupsPath`, e.g. /vesh-1a2b3c/warm). */
  ve(target: string, cgroupsPath: string): void {
    this.ves.set(target, path.join(CPUACCT, cgroupsPath));
  }

  /** Start measuring one run of `target`; the returned function ends it and gives CPU per login. */
  start(target: string, logins: number): () => LoginCpu {
    const read = () => ({
      clients: usageNs(path.join(this.root, 'clients')),
      server: usageNs(this.servers.get(target) ?? ''),
      ve: usageNs(this.ves.get(target) ?? ''),
      // All groups of this run: the other targets' servers idle meanwhile, but their CPU is not "rest".
      all: usageNs(this.root) + [...this.ves.values()].reduce((s, d) => s + usageNs(d), 0),
      own: process.cpuUsage(),
      host: hostCpuTicks(),
    });
    const a = read();
    return () => {
      const b = read();
      const ms = (ns: number) => ns / 1e6 / logins;
      const own = (b.own.user - a.own.user + b.own.system - a.own.system) / 1000 / logins;
      const hostBusy = ((b.host.busy - a.host.busy) * 1000) / USER_HZ / logins;
      const clientsAndBench = ms(b.clients - a.clients);
      const bench = own;
      return {
        clients: clientsAndBench - bench,
        bench,
        server: this.servers.has(target) ? ms(b.server - a.server) : bench,
        ve: ms(b.ve - a.ve),
        rest: Math.max(0, hostBusy - ms(b.all - a.all)),
        busy: (b.host.busy - a.host.busy) / Math.max(1, b.host.total - a.host.total),
      };
    };
  }

  /** Back to this process's own group; the run's groups go once their processes have (a busy one is left for the next try). */
  remove(): string[] {
    if (this.home !== null) {
      try {
        writeFileSync(path.join(CPUACCT, this.home, 'cgroup.procs'), String(process.pid));
      } catch { /* the group we came from is gone: the run's group is then left with us in it */ }
    }
    const left: string[] = [];
    for (const dir of this.made.reverse()) {
      try {
        rmdirSync(dir);
      } catch {
        left.push(dir);
      }
    }
    return left;
  }
}

/** One line of a run's CPU per login. */
export function formatLoginCpu(c: LoginCpu): string {
  const total = c.clients + c.bench + (c.server === c.bench ? 0 : c.server) + c.ve + c.rest;
  return `clients ${c.clients.toFixed(1)}, bench ${c.bench.toFixed(1)}, server ${c.server.toFixed(1)}, VE ${c.ve.toFixed(1)}, rest of host ${c.rest.toFixed(1)}; sum ${total.toFixed(1)} ms at busy ${c.busy.toFixed(2)}`;
}

/**
 * The logins per second the host's CPUs would allow at these costs, were
 * they all this run's and all busy: CPUs × 1000 ms / (clients + bench +
 * server + VE, per login), leaving out the rest of the host (other work on
 * a shared machine, which takes from every target alike); and the same
 * with the server's share taken out: what even a server that cost nothing
 * would reach beside these clients and this VE.
 */
export function loginCeiling(c: LoginCpu): { ceiling: number; freeServer: number } {
  const capacityMs = availableParallelism() * 1000;
  const server = c.server === c.bench ? 0 : c.server;
  const own = c.clients + c.bench + server + c.ve;
  return { ceiling: capacityMs / own, freeServer: capacityMs / (own - server) };
}
