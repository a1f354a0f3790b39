import { promises as fs, readFileSync } from 'node:fs';
import type { Logger } from '../audit/logger.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import { run } from '../system/exec.js';
import { requireSetupHelper } from '../system/native-helpers.js';
import type { Layout } from '../system/layout.js';
import { canonicalCidr, intToIp, macForAddress, offsetIn, parseSubnet, type Subnet } from './ipv4.js';
import { ALLOWED_SET, allowedElement, hostTables, replaceTablesScript, tableComments, tableName } from './firewall.js';
import type { OciHook } from '../runtime/oci-bundle.js';
import type { VeNetIdentity } from './types.js';

export interface VeNetworkOptions {
  bridge: string;
  subnet: string;
  outbound: boolean;
  /** CIDRs VEs may reach with outbound on although they are link-local, private or otherwise blocked (firewall.ts OUTBOUND_BLOCKED). */
  outboundAllow?: readonly string[];
  /** Connections (conntrack entries) one VE may hold through the host at once, with outbound on. */
  maxConnectionsPerVe?: number;
  layout: Layout;
  logger: Logger;
}

/**
 * The host side of VE networking: one bridge (the VEs' gateway holds its
 * first address), one veth per running VE with its fixed address, and this
 * instance's nftables tables. What VE root may do in its own network
 * namespace is its business; what leaves it is checked here, on the host:
 *  - frames from one VE's port to another's are dropped, so VEs cannot reach each other;
 *  - a VE may send only untagged IPv4 and ARP, from the MAC vesh gave its
 *    eth0 and its own address; no IPv6, no VLAN tags, no other ether type;
 *  - the bridge learns nothing from VE ports: a static FDB entry says where
 *    each VE's MAC is, and a permanent neighbour entry says which MAC has
 *    each VE's address, so no frame a VE sends can redirect the host's
 *    traffic for another VE;
 *  - the host answers ARP on the bridge only for the gateway address (it
 *    does not tell VEs its other addresses);
 *  - VE traffic to the host itself is dropped unless it answers a
 *    connection the host opened (host services on 0.0.0.0 stay private);
 *  - VE traffic out of the host is forwarded (and masqueraded) only when
 *    network.outbound is on, then not to link-local, private or host
 *    ranges unless network.outboundAllow names them, and at most
 *    network.maxConnectionsPerVe connections per VE.
 */
export class VeNetwork {
  readonly bridge: string;
  readonly subnet: Subnet;
  private readonly outbound: boolean;
  private readonly outboundAllow: readonly string[];
  private readonly maxConnectionsPerVe: number;
  private readonly instanceId: string;
  private readonly log: Logger;
  private hostSetup: Promise<void> | null = null;
  /**
   * Anti-spoofing elements known to be in the set. An element pairs a host
   * veth name with the VE address it is derived from (and the MAC derived
   * from that address), so it is a fixed fact about the VE from its
   * creation to its destruction, harmless while the VE
   * is stopped (no port has that name), and stays in the set across stops:
   * a start only adds it when this process has not seen it there.
   */
  private readonly allowed = new Set<string>();

  constructor(opts: VeNetworkOptions) {
    this.bridge = opts.bridge;
    this.subnet = parseSubnet(opts.subnet);
    this.outbound = opts.outbound;
    this.outboundAllow = (opts.outboundAllow ?? []).map((c) => canonicalCidr(c, 'network.outboundAllow entry'));
    this.maxConnectionsPerVe = opts.maxConnectionsPerVe ?? DEFAULT_MAX_CONNECTIONS_PER_VE;
    this.instanceId = opts.layout.instanceId;
    this.log = opts.logger.child({ component: 'net' });
  }

  private get table(): string {
    return tableName(this.instanceId);
  }

  /**
   * Bridge, gateway address and firewall tables; made when missing, kept when
   * present and made from this configuration, replaced when made from
   * another (see applyRuleset). The first call in a process also puts every
   * VE's anti-spoofing element in the set (`ves` lists them): the set is
   * lost with the tables (host reboot), and VEs stopped by an older vesh had
   * theirs removed at stop.
   */
  ensureHost(ves: () => Promise<VeNetIdentity[]>): Promise<void> {
    // Two VEs starting at once share one set-up (the second `ip link add` of the bridge would fail).
    this.hostSetup ??= this.setUpHost(ves).catch((err: unknown) => {
      this.hostSetup = null;
      throw err;
    });
    return this.hostSetup;
  }

  private async setUpHost(ves: () => Promise<VeNetIdentity[]>): Promise<void> {
    try {
      const exists = await fs.stat(`/sys/class/net/${this.bridge}`).then(() => true, () => false);
      if (!exists) {
        await ipBatch([
          // A fixed MAC: otherwise the bridge takes the lowest of its ports'
          // and changes it as VEs come and go, leaving VEs with a stale gateway entry.
          `link add ${this.bridge} address ${macForAddress(this.subnet.gateway)} type bridge`,
          `addr add ${this.subnet.gateway}/${this.subnet.prefix} dev ${this.bridge}`,
          `link set ${this.bridge} up`,
        ]);
        this.log.info({ event: 'net.bridge_created', bridge: this.bridge, gateway: this.subnet.gateway, subnet: this.subnet.cidr });
      } else {
        const addrs = await run('ip', ['-4', '-o', 'addr', 'show', 'dev', this.bridge]);
        if (!addrs.stdout.includes(` ${this.subnet.gateway}/${this.subnet.prefix} `)) {
          await run('ip', ['addr', 'add', `${this.subnet.gateway}/${this.subnet.prefix}`, 'dev', this.bridge]);
        }
        await run('ip', ['link', 'set', this.bridge, 'up']);
      }
      await this.hardenBridge();
      await this.applyRuleset(await ves());
      if (this.outbound) await fs.writeFile('/proc/sys/net/ipv4/ip_forward', '1');
    } catch (err) {
      throw new VeshError(ErrorCodes.NETWORK_FAILED, `cannot set up the VE bridge ${this.bridge} (${this.subnet.cidr}): ${errorMessage(err)}; check "vesh doctor"`, { cause: err });
    }
  }

  /**
   * The host's own stack on the bridge: answer ARP only for addresses of the
   * bridge itself (arp_ignore 1: the gateway; by default Linux answers for
   * every host address on every interface, telling VEs the host's LAN and
   * other bridges' addresses), ask with the bridge's own address
   * (arp_announce 2), and no IPv6 on the bridge (VEs get none; the host would
   * otherwise give it a link-local address and speak NDP/MLD to VEs).
   */
  private async hardenBridge(): Promise<void> {
    const conf = (family: 'ipv4' | 'ipv6', key: string) => `/proc/sys/net/${family}/conf/${this.bridge}/${key}`;
    await fs.writeFile(conf('ipv4', 'arp_ignore'), '1');
    await fs.writeFile(conf('ipv4', 'arp_announce'), '2');
    // Absent when the kernel has IPv6 off altogether: nothing to turn off then.
    await fs.writeFile(conf('ipv6', 'disable_ipv6'), '1').catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw err;
    });
  }

  /**
   * Make this instance's tables say what the configuration says. Each table
   * carries a comment naming the rules it was made from (firewall.ts): a
   * table that is missing, or was made from another configuration (say
   * network.outbound was flipped since) or by another vesh, is replaced; a
   * matching one is kept. Replacing and re-filling the anti-spoofing set
   * with every VE's element is one nft transaction, so running VEs never
   * see a moment without their rules. Two nft runs at most.
   */
  private async applyRuleset(all: VeNetIdentity[]): Promise<void> {
    const tables = hostTables({
      table: this.table,
      bridge: this.bridge,
      subnet: this.subnet.cidr,
      subnetSize: this.subnet.size,
      vethPrefix: this.vethPrefix(),
      outbound: this.outbound,
      outboundAllow: this.outboundAllow,
      nameServers: this.outbound ? (await hostNameServers()).filter(isIpv4) : [],
      maxConnectionsPerVe: this.maxConnectionsPerVe,
    });
    // One listing, terse (no set elements, so its size does not grow with the
    // VEs). Not two `list table` commands in one batch: nft 1.0.6 then fills
    // its cache for the first one only and fails the second.
    const found = tableComments((await run('nft', ['-t', 'list', 'ruleset'])).stdout);
    const stale = tables.filter((t) => found.get(`${t.family} ${t.name}`) !== t.comment);
    const ids = all.filter((id) => offsetIn(this.subnet, id.address) >= 0);
    const fill = ids.length > 0 ? [`add element bridge ${this.table} ${ALLOWED_SET} { ${ids.map((id) => `"${id.hostVeth}" . ${macForAddress(id.address)} . ${id.address}`).join(', ')} }`] : [];
    if (stale.length > 0) {
      // The bridge table holds the set: replacing it means filling it again in the same transaction.
      await run('nft', ['-f', '-'], { input: replaceTablesScript(stale, fill) });
      this.log.info({ event: 'net.ruleset_applied', table: this.table, replaced: stale.map((t) => t.family), outbound: this.outbound });
    } else if (fill.length > 0) {
      await run('nft', ['-f', '-'], { input: `${fill[0]}\n` });
    }
    this.allowed.clear();
    for (const id of ids) this.allowed.add(allowedElement(id.hostVeth, macForAddress(id.address), id.address));
    await this.warnAboutUnpinnedPorts(ids);
  }

  /**
   * A VE started by a vesh before MAC pinning still runs with a random MAC on
   * eth0 and a learning port: the anti-spoofing set (port . pinned MAC .
   * address) now drops all it sends until it is restarted, which gives it the
   * pinned MAC and port. Say so, once per VE, rather than leave it silent.
   */
  private async warnAboutUnpinnedPorts(ids: VeNetIdentity[]): Promise<void> {
    for (const id of ids) {
      const learning = await fs.readFile(`/sys/class/net/${id.hostVeth}/brport/learning`, 'utf8').catch(() => '');
      if (learning.trim() === '1') {
        this.log.warn({ event: 'net.ve_port_unpinned', ve: id.name, port: id.hostVeth }, `VE "${id.name}" was started by an older vesh and has no network until it is restarted: run "vesh ve restart ${id.name}"`);
      }
    }
  }

  /** Lowest free address of the subnet (the first one is the gateway's). */
  allocateAddress(used: string[]): string {
    const taken = new Set(used.map((a) => offsetIn(this.subnet, a)));
    for (let off = 2; off < this.subnet.size - 1; off++) {
      if (!taken.has(off)) return intToIp(this.subnet.network + off);
    }
    throw new VeshError(ErrorCodes.ADDRESS_EXHAUSTED, `no free address left in ${this.subnet.cidr}: destroy unused VEs or configure a larger network.subnet`);
  }

  private vethPrefix(): string {
    return `v${this.instanceId}`;
  }

  /** Host-side veth name: unique per instance and address, at most 15 characters. */
  vethNameFor(address: string): string {
    const off = offsetIn(this.subnet, address);
    if (off < 0) throw new VeshError(ErrorCodes.NETWORK_FAILED, `address ${address} is outside ${this.subnet.cidr}`);
    return `${this.vethPrefix()}${off.toString(16)}`;
  }

  /**
   * Let the VE's port send from its address (the anti-spoofing set); needs no
   * VE yet. Costs an nft run (~15 ms here) only the first time this process
   * starts the VE and did not find it at ensureHost (a VE created since).
   */
  async allow(id: VeNetIdentity): Promise<void> {
    const element = allowedElement(id.hostVeth, macForAddress(id.address), id.address);
    if (this.allowed.has(element)) return;
    await run('nft', ['add', 'element', 'bridge', this.table, ALLOWED_SET, element]);
    this.allowed.add(element);
  }

  /** The VE is destroyed: its anti-spoofing element and the host's neighbour entry for its address go. */
  async forget(id: VeNetIdentity): Promise<void> {
    const element = allowedElement(id.hostVeth, macForAddress(id.address), id.address);
    this.allowed.delete(element);
    await run('nft', ['delete', 'element', 'bridge', this.table, ALLOWED_SET, element], { allowFailure: true });
    await run('ip', ['neigh', 'del', id.address, 'dev', this.bridge], { allowFailure: true });
  }

  /**
   * Give the VE its eth0, as an OCI createRuntime hook: the runtime runs it
   * once the VE's network namespace exists (made by the runtime inside the
   * VE's user namespace, so VE root is root there) and before the VE's init
   * starts, so the VE boots with its network up, and `runc run` replaces
   * create + start (one engine process fewer). The native setup helper
   * (src/native/vesh-setup.c, `net-hook`) reads the init's pid from the state
   * JSON on its stdin and does it all over rtnetlink in one process: the pair
   * (host end on the bridge, given by its index; VE end straight in the VE's
   * namespace, with the MAC derived from its address), the host end's bridge
   * port set to learn nothing, flood no unknown unicast and stay isolated,
   * a static FDB entry for the VE's MAC on that port and a permanent
   * neighbour entry for its address on the bridge, the host end up, then lo
   * and eth0 up, the address and the default route inside. Both ends are
   * made with one queue pair and come up with IPv6 off (VEs get none, and
   * the bridge table drops it): no link-local addresses, routes or
   * multicast groups for them, one queue's sysfs directories instead of one
   * per possible CPU (bench/README.md, "Lean VEs", has what that saves). A shell + nsenter + ip did the same in ~35 ms here; the
   * helper takes ~3 ms. On failure it deletes the pair it made.
   */
  attachHook(id: VeNetIdentity): OciHook {
    if (offsetIn(this.subnet, id.address) < 0) {
      throw new VeshError(ErrorCodes.NETWORK_FAILED, `VE "${id.name}" has address ${id.address}, outside network.subnet ${this.subnet.cidr}: the subnet was changed; destroy and re-create the VE or set the subnet back`);
    }
    const helper = requireSetupHelper();
    return {
      path: helper,
      args: ['vesh-setup', 'net-hook', id.hostVeth, String(this.bridgeIndex()), id.address, String(this.subnet.prefix), this.subnet.gateway, macForAddress(id.address)],
      env: [],
      timeout: 10,
    };
  }

  /** ifindex of the bridge (made by ensureHost, which must come first). */
  private bridgeIndex(): number {
    try {
      return Number(readFileSync(`/sys/class/net/${this.bridge}/ifindex`, 'utf8').trim());
    } catch {
      throw new VeshError(ErrorCodes.NETWORK_FAILED, `the VE bridge ${this.bridge} does not exist: it is made when a VE starts; check "vesh doctor"`);
    }
  }

  /** Undo attach. The kernel deletes the veth with the VE's namespace; this catches the rest. */
  async detach(id: VeNetIdentity): Promise<void> {
    if (await fs.stat(`/sys/class/net/${id.hostVeth}`).then(() => true, () => false)) {
      await run('ip', ['link', 'del', id.hostVeth], { allowFailure: true });
    }
  }

  hostsFile(name: string, address: string): string {
    return [
      '127.0.0.1\tlocalhost',
      '::1\tlocalhost ip6-localhost ip6-loopback',
      'ff02::1\tip6-allnodes',
      'ff02::2\tip6-allrouters',
      `${address}\t${name}`,
      '',
    ].join('\n');
  }

  /** The host's own name servers when VEs may go out; none (fail fast) when they may not. */
  async resolvConf(): Promise<string> {
    if (!this.outbound) {
      return '# This VE has no outbound network (network.outbound is off in vesh.yaml), so no name server.\n';
    }
    const servers = await hostNameServers();
    if (servers.length === 0) return '# The host uses a local resolver VEs cannot reach; add a name server here.\n';
    return `${servers.map((s) => `nameserver ${s}`).join('\n')}\n`;
  }

  /** Remove this instance's bridge and tables (VEs must be stopped). Used by tests and benchmarks. */
  async teardownHost(): Promise<void> {
    await run('nft', ['delete', 'table', 'inet', this.table], { allowFailure: true });
    await run('nft', ['delete', 'table', 'bridge', this.table], { allowFailure: true });
    if (await fs.stat(`/sys/class/net/${this.bridge}`).then(() => true, () => false)) {
      await run('ip', ['link', 'del', this.bridge], { allowFailure: true });
    }
    this.hostSetup = null;
    this.allowed.clear();
  }
}

/** Default of network.maxConnectionsPerVe (config/schema.ts has the same). */
export const DEFAULT_MAX_CONNECTIONS_PER_VE = 4096;

/** Name servers of the host's /etc/resolv.conf that a VE could reach (not the host's loopback). */
async function hostNameServers(): Promise<string[]> {
  const host = await fs.readFile('/etc/resolv.conf', 'utf8').catch(() => '');
  return host.split('\n').map((l) => /^nameserver\s+(\S+)/.exec(l.trim())?.[1]).filter((s): s is string => !!s && !s.startsWith('127.') && s !== '::1');
}

function isIpv4(s: string): boolean {
  return /^\d{1,3}(\.\d{1,3}){3}$/.test(s) && s.split('.').every((p) => Number(p) <= 255);
}

function ipBatch(lines: string[]): Promise<unknown> {
  return run('ip', ['-batch', '-'], { input: `${lines.join('\n')}\n` });
}
