import { randomBytes } from 'node:crypto';
import { createReadStream, promises as fs, readFileSync } from 'node:fs';
import path from 'node:path';
import ssh2 from 'ssh2';
import type { Logger } from '../audit/logger.js';
import { encodeVouch, type MoveVouch } from '../broker/node-vouch.js';
import { MAX_USER_NAME_CHARS } from '../broker/request-table.js';
import { CLUSTER_NAME_PATTERN, type ClusterConfig } from '../config/cluster.js';
import type { ServerConfig } from '../config/server-config.js';
import { ErrorCodes, VeshError, errorMessage } from '../errors.js';
import { makeLayout } from '../system/layout.js';
import { VeBackups } from '../ve/backup.js';
import { createTemplateStore, createVeManager, createVeNetwork } from '../ve/index.js';
import { withLock } from '../ve/lock.js';
import { assertVeName } from '../ve/names.js';
import { vePaths } from '../ve/storage.js';
import { clusterConfigOf, withEtcd } from './admin.js';
import { readNodes } from './cluster-state.js';
import { withDeadline, type Etcd3 } from './etcd.js';
import { veKey } from './keys.js';
import { NODE_KEY_FILE } from './node-key.js';
import { Placement } from './placement.js';
import type { NodeRecord, VePlacement, VeRecord } from './records.js';

/**
 * `vesh ve move NAME --to NODE` for a stopped VE, run as root on the node
 * it is placed on: backup here, the file streamed to NODE over the
 * node-to-node channel (an SSH login to NODE's own port with this node's
 * key under a move vouch, NODE's host keys from its etcd record), restored
 * there under the same name with an address and ids of NODE's, and only
 * then the placement flipped here → NODE in one etcd transaction that
 * checks nobody changed it meanwhile; the local copy goes last. Any failure
 * before the flip leaves the VE here, placed here, and removes NODE's copy
 * (vesh-discard-ve): nothing half-made on either side.
 *
 * A running VE is refused: moving its processes needs CRIU checkpoint and
 * restore, and Debian 12's criu 3.17.1 fails its own `criu check` on this
 * kernel (Linux 6.18: "Unexpected rt vDSO area bounds").
 */

/** Connecting and logging in to the target node. */
const CONNECT_TIMEOUT_MS = 10_000;
/** A peer that stops answering is noticed after about a minute (15 s x 4 keepalives). */
const KEEPALIVE_MS = 15_000;
const KEEPALIVE_COUNT = 4;
/** Most of the receiver's answer kept (a JSON line, or the reason it failed). */
const MAX_ANSWER_BYTES = 16 * 1024;

export interface MoveResult {
  ve: string;
  from: string;
  to: string;
  bytes: number;
  dataBytes: number;
  seconds: number;
  /** The VE's address on the node it moved to. */
  address: string | null;
  /** Set when the VE moved but its copy here could not be removed (what the admin does about it). */
  leftHere: string | null;
}

function runningRefusal(ve: string, state: string): VeshError {
  return new VeshError(ErrorCodes.VE_STATE, `VE ${ve} is ${state}: stop it first ("vesh ve stop ${ve}"), then move it (it starts on the other node at its next login). Moving a running VE with its processes needs CRIU checkpoint/restore, which does not work on this host: Debian 12's criu 3.17.1 fails its own "criu check" on this kernel (Linux 6.18: "Unexpected rt vDSO area bounds"), so vesh moves stopped VEs only`);
}

/** "host:port" or "[v6]:port" (the record's schema checked the form). */
function splitAddress(address: string): { host: string; port: number } {
  const i = address.lastIndexOf(':');
  return { host: address.slice(0, i).replace(/^\[(.*)\]$/, '$1'), port: Number(address.slice(i + 1)) };
}

/** The image's identity and last change: equal before the backup and at the flip, or the VE was used meanwhile. */
async function imageStamp(file: string): Promise<string> {
  const st = await fs.stat(file, { bigint: true });
  return `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;
}

/** A login to `node` with this node's key under a move vouch for `ve`, accepting only the host keys its record lists. */
function connectNode(cfg: ClusterConfig, node: NodeRecord, ve: string, keyFile: string, onClient: (c: ssh2.Client) => void): Promise<ssh2.Client> {
  const vouch: MoveVouch = { v: 1, purpose: 'move', from: cfg.nodeName, to: node.name, ve, at: Date.now() };
  const user = encodeVouch(vouch, MAX_USER_NAME_CHARS);
  if (user === null) throw new VeshError(ErrorCodes.INTERNAL, 'a move vouch longer than a user name may be');
  const allowed = node.hostKeys.map((line) => Buffer.from(line.split(' ')[1] ?? '', 'base64'));
  const { host, port } = splitAddress(node.address);
  const c = new ssh2.Client();
  onClient(c);
  return new Promise((resolve, reject) => {
    let hostKeyRefused = false;
    c.on('ready', () => resolve(c));
    c.on('error', (err) => {
      c.end();
      const why = hostKeyRefused
        ? `it answered with a host key that its record in etcd does not list (another machine at that address?)`
        : errorMessage(err);
      reject(new VeshError(ErrorCodes.VE_ELSEWHERE, `cannot reach node ${node.name} at ${node.address}: ${why}; check that its vesh serve runs ("vesh cluster status") and that this node reaches that address`));
    });
    c.connect({
      host, port, username: user, privateKey: readFileSync(keyFile),
      readyTimeout: CONNECT_TIMEOUT_MS, keepaliveInterval: KEEPALIVE_MS, keepaliveCountMax: KEEPALIVE_COUNT,
      hostVerifier: (key: Buffer) => {
        const ok = allowed.some((b) => b.equals(key));
        if (!ok) hostKeyRefused = true;
        return ok;
      },
    });
  });
}

/** Run `command` on the receiver, `file` (if any) as its stdin; its exit status and (capped) output. */
function execOn(c: ssh2.Client, command: string, file: string | null, onSent?: (bytes: number) => void): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    c.exec(command, (err, ch) => {
      if (err) {
        reject(err);
        return;
      }
      const out: Buffer[] = [];
      const errs: Buffer[] = [];
      let kept = 0;
      const keep = (into: Buffer[]) => (d: Buffer) => {
        if (kept >= MAX_ANSWER_BYTES) return;
        into.push(d.subarray(0, MAX_ANSWER_BYTES - kept));
        kept += d.length;
      };
      let code: number | null = null;
      ch.on('data', keep(out));
      ch.stderr.on('data', keep(errs));
      ch.on('exit', (c: number | null) => { code = typeof c === 'number' ? c : null; });
      ch.on('error', () => undefined);
      ch.on('close', () => resolve({ code, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(errs).toString('utf8').trim() }));
      if (!file) {
        ch.end();
        return;
      }
      const rs = createReadStream(file, { highWaterMark: 256 * 1024 });
      let sent = 0;
      rs.on('data', (d) => {
        sent += d.length;
        onSent?.(sent);
      });
      rs.on('error', (e) => {
        ch.close();
        reject(e);
      });
      rs.pipe(ch);
    });
  });
}

export async function moveVe(config: ServerConfig, logger: Logger, name: string, to: string, say: (line: string) => void): Promise<MoveResult> {
  const cfg = clusterConfigOf(config, 'vesh ve move');
  assertVeName(name);
  if (!CLUSTER_NAME_PATTERN.test(to)) throw new VeshError(ErrorCodes.INVALID_NAME, `--to "${to.slice(0, 64)}" is not a node name: see "vesh cluster status" for the nodes`);
  if (to === cfg.nodeName) throw new VeshError(ErrorCodes.INVALID_ARGUMENT, `VE ${name} is to move to node ${to}, which is this node: name another node`);
  const layout = makeLayout(config.dataDir);
  const ves = createVeManager(config, logger);
  const backups = new VeBackups({
    config, layout, logger, ves, templates: createTemplateStore(config, layout, logger), network: createVeNetwork(config, layout, logger),
  });
  const keyFile = path.join(config.hostKeysDir, NODE_KEY_FILE);

  return withEtcd(cfg, async (client) => {
    // ---- checks: nothing is made until they all hold
    const placement = new Placement(client, cfg);
    const placed = await placement.get(name);
    if (!placed) throw new VeshError(ErrorCodes.VE_NOT_FOUND, `VE ${name} has no placement in cluster ${cfg.clusterName}: see "vesh ve list" and "vesh cluster status"`);
    if (placed.node !== cfg.nodeName) throw new VeshError(ErrorCodes.VE_ELSEWHERE, `VE ${name} is placed on node ${placed.node}, not on this node (${cfg.nodeName}): run "vesh ve move" there`);
    if (!(await ves.exists(name))) throw new VeshError(ErrorCodes.VE_NOT_FOUND, `VE ${name} is placed on this node but is not on its disk: it has never been created here (it is at its first login), so there is nothing to move`);
    const status = await ves.status(name);
    if (status.state !== 'stopped') throw runningRefusal(name, status.state);
    if (status.limits.disk === 0) throw new VeshError(ErrorCodes.VE_STATE, `VE ${name} has no disk image (disk 0): its files are not in one container that can be moved; give VEs a disk limit`);
    const nodes = await readNodes(client, cfg);
    const me = nodes.find((n) => n.record.name === cfg.nodeName)?.record;
    if (!me) throw new VeshError(ErrorCodes.CLUSTER_UNAVAILABLE, `this node (${cfg.nodeName}) is not a live member of cluster ${cfg.clusterName}: start "vesh serve" here first (node ${to} accepts a move only from a live node's key)`);
    const target = nodes.find((n) => n.record.name === to)?.record;
    if (!target) throw new VeshError(ErrorCodes.VE_ELSEWHERE, `node ${to} is not a live member of cluster ${cfg.clusterName}: see "vesh cluster status" for the live nodes`);
    if (target.hostKeys.length === 0) throw new VeshError(ErrorCodes.VE_ELSEWHERE, `node ${to} publishes no host keys (an older vesh): upgrade it first`);
    const mine = me.templates.find((t) => t.name === status.template);
    const theirs = target.templates.find((t) => t.name === status.template);
    if (!theirs) throw new VeshError(ErrorCodes.TEMPLATE_NOT_FOUND, `node ${to} has no template ${status.template}, which VE ${name} runs on: build or import it there first`);
    if (!mine?.digest || !theirs.digest) throw new VeshError(ErrorCodes.TEMPLATE_NOT_FOUND, `the digest of template ${status.template} is not yet published by ${!mine?.digest ? 'this node' : `node ${to}`} (it is computed after vesh serve starts): try again in a minute`);
    if (mine.digest !== theirs.digest) throw new VeshError(ErrorCodes.TEMPLATE_NOT_FOUND, `template ${status.template} on node ${to} is not the one here (digest ${theirs.digest.slice(7, 19)} there, ${mine.digest.slice(7, 19)} here): the VE's files sit on it; build or copy the same template there`);

    const started = performance.now();
    const image = vePaths(layout.veDir(name)).image;
    const stampBefore = await imageStamp(image);
    const dir = path.join(config.dataDir, 'moves');
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    const file = path.join(dir, `out-${name}-${randomBytes(6).toString('hex')}.vesh-backup`);

    // Ctrl-C or TERM: the transfer stops (the connection is cut) and the failure path cleans up; never during the flip.
    let interrupted: NodeJS.Signals | null = null;
    let conn: ssh2.Client | null = null;
    const onSignal = (sig: NodeJS.Signals) => {
      interrupted ??= sig;
      conn?.destroy();
    };
    const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
    for (const s of signals) process.on(s, onSignal);
    /** The receiver may hold a copy: from its first byte until it says it failed (it removes its own copy then). */
    let remoteCopy = false;
    try {
      say(`backing up VE ${name} on node ${cfg.nodeName}`);
      const b = await backups.backup(name, file);
      if (b.wasRunning) throw runningRefusal(name, 'running again (started during the move)');
      const mib = (n: number) => (n / 1048576).toFixed(1);
      say(`backup: ${mib(b.bytes)} MiB (${mib(b.dataBytes)} MiB of data on a ${mib(b.imageSize)} MiB disk); connecting to node ${to} at ${target.address}`);
      conn = await connectNode(cfg, target, name, keyFile, (c) => { conn = c; });
      if (interrupted) throw new VeshError(ErrorCodes.COMMAND_FAILED, `interrupted by ${interrupted}`);
      say(`sending VE ${name} to node ${to}`);
      remoteCopy = true;
      const sendStart = performance.now();
      let nextReport = 0.25;
      const recv = await execOn(conn, `vesh-receive-ve ${b.bytes} ${status.limits.disk}`, file, (sent) => {
        if (sent / b.bytes >= nextReport && sent < b.bytes) {
          say(`  ${Math.round((sent / b.bytes) * 100)}% (${mib(sent)} MiB)`);
          nextReport += 0.25;
        }
      });
      if (interrupted) throw new VeshError(ErrorCodes.COMMAND_FAILED, `interrupted by ${interrupted}`);
      if (recv.code !== 0) {
        // A failure it reported itself: it removed what it made (a restore reverts; a copy that fails a check is destroyed).
        if (recv.code !== null) remoteCopy = false;
        throw new VeshError(ErrorCodes.COMMAND_FAILED, `node ${to} did not take VE ${name}: ${recv.stderr.replace(/^vesh-receive-ve: /, '') || (recv.code === null ? 'the connection ended without an answer' : `exit status ${recv.code}`)}`);
      }
      let address: string | null = null;
      try {
        const answer = JSON.parse(recv.stdout) as { address?: unknown };
        if (typeof answer.address === 'string' && /^[0-9a-fA-F.:]{2,45}$/.test(answer.address)) address = answer.address;
      } catch { /* the status says it was restored; the address is only shown */ }
      say(`restored on node ${to} in ${((performance.now() - sendStart) / 1000).toFixed(1)} s${address ? ` (address ${address})` : ''}; moving the placement`);

      // ---- the flip: the VE unchanged since the backup, and its placement still the one read at the start
      await withLock(layout.locksDir, `ve-${name}`, async () => {
        const now = await ves.status(name);
        if (now.state !== 'stopped') throw runningRefusal(name, `${now.state} again (started during the move)`);
        if ((await imageStamp(image)) !== stampBefore) throw new VeshError(ErrorCodes.VE_BUSY, `VE ${name}'s disk changed during the move (it was started meanwhile): the copy on node ${to} is not current; move it again`);
        if (interrupted) throw new VeshError(ErrorCodes.COMMAND_FAILED, `interrupted by ${interrupted}`);
        const flipped = await flipPlacement(client, cfg, placement, placed, to);
        if (flipped === 'unknown') {
          // Either copy may be the one placed: neither is removed.
          remoteCopy = false;
          throw new VeshError(ErrorCodes.CLUSTER_UNAVAILABLE, `etcd did not confirm the move of VE ${name}'s placement to node ${to} and cannot be read now: both copies are kept; once etcd answers, "vesh cluster status" says which node VE ${name} is placed on: destroy the copy on the other node there ("vesh ve destroy --force ${name}")`);
        }
        if (flipped === 'unchanged') throw new VeshError(ErrorCodes.VE_BUSY, `the placement of VE ${name} changed during the move (another node or admin changed it): nothing was moved; see "vesh cluster status"`);
      });
      remoteCopy = false;
      logger.info({ event: 'cluster.ve_moved', ve: name, to, bytes: b.bytes }, `VE ${name} now placed on node ${to}`);

      // ---- the copy here goes (placement already elsewhere: a failure leaves a conflict to resolve by hand, never a lost VE)
      let leftHere: string | null = null;
      try {
        await ves.destroy(name, { force: true });
      } catch (err) {
        leftHere = `VE ${name} moved, but its copy on this node could not be removed (${errorMessage(err)}): remove it with "vesh ve destroy --force ${name}" here`;
      }
      return { ve: name, from: cfg.nodeName, to, bytes: b.bytes, dataBytes: b.dataBytes, seconds: (performance.now() - started) / 1000, address, leftHere };
    } catch (err) {
      if (remoteCopy) {
        const left = await discardRemote(cfg, target, name, keyFile, conn);
        say(left === null ? `removed the copy on node ${to}` : `warning: ${left}`);
      }
      throw err;
    } finally {
      for (const s of signals) process.off(s, onSignal);
      conn?.end();
      await fs.rm(file, { force: true });
    }
  });
}

/**
 * The placement here → `to`, only if it is still the one read before the
 * move. A transaction whose answer is lost (etcd timed out) is settled by
 * a second one (fenced: the first can no longer apply) and a read: the
 * move counts only if the placement names `to`; if etcd cannot tell,
 * nothing is removed anywhere and the admin is told.
 */
async function flipPlacement(client: Etcd3, cfg: ClusterConfig, placement: Placement, placed: VePlacement, to: string): Promise<'moved' | 'unchanged' | 'unknown'> {
  const key = veKey(cfg.clusterName, placed.ve);
  const record: VeRecord = { node: to, created: placed.created, placedBy: cfg.nodeName };
  try {
    const res = await withDeadline(
      client.if(key, 'Mod', '==', placed.modRevision).then(client.put(key).value(JSON.stringify(record))).commit(),
      cfg.etcd.timeoutMs, `the move of VE ${placed.ve}'s placement`, cfg,
    );
    return res.succeeded ? 'moved' : 'unchanged';
  } catch {
    try {
      // Our transaction may still be applied after any read: the same compare with the placement as it was
      // rewritten shuts it out (its revision no longer matches) and tells us that it had not been applied.
      const original: VeRecord = { node: placed.node, created: placed.created, placedBy: placed.placedBy };
      const fence = await withDeadline(
        client.if(key, 'Mod', '==', placed.modRevision).then(client.put(key).value(JSON.stringify(original))).commit(),
        cfg.etcd.timeoutMs, `the placement of VE ${placed.ve}`, cfg,
      );
      if (fence.succeeded) return 'unchanged';
      const now = await placement.get(placed.ve);
      return now?.node === to && now.placedBy === cfg.nodeName ? 'moved' : 'unchanged';
    } catch {
      return 'unknown';
    }
  }
}

/** Remove the receiver's copy (over the move's connection while it lasts, else a new one); null when done, else what is left for the admin. */
async function discardRemote(cfg: ClusterConfig, target: NodeRecord, ve: string, keyFile: string, conn: ssh2.Client | null): Promise<string | null> {
  const attempt = async (c: ssh2.Client) => {
    const r = await execOn(c, `vesh-discard-ve ${ve}`, null);
    if (r.code !== 0) throw new Error(r.stderr || `exit status ${r.code ?? 'none'}`);
  };
  try {
    if (!conn) throw new Error('no connection');
    await attempt(conn);
    return null;
  } catch {
    let fresh: ssh2.Client | null = null;
    try {
      fresh = await connectNode(cfg, target, ve, keyFile, () => undefined);
      await attempt(fresh);
      return null;
    } catch (err) {
      return `the copy of VE ${ve} on node ${target.name} could not be removed (${errorMessage(err)}): it is on that node's disk, not placed there; remove it there with "vesh ve destroy --force ${ve}"`;
    } finally {
      fresh?.end();
    }
  }
}
