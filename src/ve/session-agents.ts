import { existsSync, promises as fs } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import path from 'node:path';
import type { Logger } from '../audit/logger.js';
import { errorMessage } from '../errors.js';
import type { ContainerRuntime, HostCommand } from '../runtime/types.js';
import { run } from '../system/exec.js';
import { processStartTime } from '../system/proc.js';
import { sessionHelperPath } from '../system/native-helpers.js';

/**
 * Session agents: one small resident process per VE in use that starts
 * session processes, so that a login does not pay for a `runc exec`
 * (~65 ms here, two Go process starts and a copy of the runc binary) but
 * for a fork inside the VE (~1 ms) and one tiny host process.
 *
 * The agent (src/native/vesh-session.c) is itself started by `runc exec`,
 * so it has exactly what every `runc exec` process has: the VE's namespaces,
 * cgroups, capabilities, seccomp filter and rlimits. What it forks inherits
 * all of that; it does no namespace, cgroup or seccomp work of its own. A
 * session process gets a terminal from the VE's devpts (opened by the agent
 * inside the VE) and drops to the session user with setgroups/setgid/setuid,
 * which clears a non-root user's capabilities as login does.
 *
 * The host reaches an agent through a socket in a root-only directory of the
 * host (never in the VE's mount namespace); the agent holds only the
 * listening descriptor, so VE users cannot ask it for anything.
 *
 * An agent is started in the background the first time a session is asked
 * for a VE whose init we know (that session still goes through `runc exec`),
 * and again whenever it is gone (VE restarted, or VE root killed it). Every
 * attach carries the `runc exec` command line as its fallback for the case
 * that the agent died since we last looked. VEs nobody logs into have no
 * agent, so idle density is unchanged.
 */

const AGENT_START_DELAY_MS = 1000;
/** The agent's process name (AGENT_NAME in vesh-session.c). */
const AGENT_NAME = 'vesh-agent';

/** A process to start through an agent (uid/gid inside the VE; env complete). */
export interface AgentProcessSpec {
  argv: string[];
  uid: number;
  gid: number;
  groups: number[];
  cwd?: string;
  env: Record<string, string>;
  tty: boolean;
}

interface AgentRecord {
  /** The VE init (pid:start time) this agent was started under. */
  init: string;
  pid: number;
  start: string;
}

interface Launch {
  /** Cancels the start while it still waits out AGENT_START_DELAY_MS. */
  cancel: AbortController;
  done: Promise<void>;
}

/** Where `vesh-session attach` takes its request from (REQ_ENV in vesh-session.c). */
const ATTACH_REQUEST_ENV = 'VESH_SESSION_REQUEST';
/** The decoded request must fit the agent's message (REQ_MAX, 60 KiB, in vesh-session.c) with its header. */
const ATTACH_REQUEST_MAX = 56 * 1024;

/**
 * The request for `vesh-session attach` (UID GID GROUPS CWD NENV ENV... NARGV
 * ARGV..., each ended by a NUL) in base64, for its environment: the command
 * line would show the session's command and its SSH_CONNECTION (the client's
 * address) to every host user through ps. null when it is too large for the
 * agent, or holds a NUL (which no exec could pass on either).
 */
export function encodeAttachRequest(spec: AgentProcessSpec): string | null {
  const env = Object.entries(spec.env).map(([k, v]) => `${k}=${v}`);
  const fields = [
    String(spec.uid), String(spec.gid), spec.groups.length ? spec.groups.join(',') : '-', spec.cwd || '',
    String(env.length), ...env, String(spec.argv.length), ...spec.argv,
  ];
  if (fields.some((f) => f.includes('\0'))) return null;
  const bytes = Buffer.from(`${fields.join('\0')}\0`, 'utf8');
  return bytes.length > ATTACH_REQUEST_MAX ? null : bytes.toString('base64');
}

export class SessionAgents {
  private readonly agents = new Map<string, AgentRecord>();
  private readonly launching = new Map<string, Launch>();
  /** The init ("pid:start") under which each VE was last looked at for an agent left by a previous server. */
  private readonly adoptTried = new Map<string, string>();
  /** The helper binary, or null when it is not built; looked for at the first session, not in every CLI start. */
  private helper: string | null | undefined;

  constructor(
    private readonly deps: {
      runtime: ContainerRuntime;
      dir: string;
      log: Logger;
      /** "pid:start" of the VE's init as the VE manager knows it now, or null. */
      currentInit: (ve: string) => Promise<string | null>;
      /** false (runtime.sessionAgents): no agents; every session goes through the engine. */
      enabled: boolean;
    },
  ) {}

  private helperBinary(): string | null {
    if (this.helper === undefined) {
      const file = sessionHelperPath();
      this.helper = existsSync(file) ? file : null;
      if (!this.helper) {
        this.deps.log.warn({ event: 've.session_agent_unavailable', helper: file }, `${file} is missing (run "npm run build"): every session uses runc exec`);
      }
    }
    return this.helper;
  }

  private socketPath(ve: string): string {
    return path.join(this.deps.dir, `${ve}.sock`);
  }

  private pidPath(ve: string): string {
    return path.join(this.deps.dir, `${ve}.pid`);
  }

  /**
   * The host command for `spec` in VE `ve`, whose init is `init` (pid:start):
   * through the VE's agent when one runs under this init, else `fallback`
   * (while an agent is started for next time).
   */
  async command(ve: string, init: string, spec: AgentProcessSpec, fallback: HostCommand): Promise<HostCommand> {
    const helper = this.deps.enabled ? this.helperBinary() : null;
    if (!helper) return fallback;
    const agent = await this.known(ve, init);
    if (agent) {
      const request = encodeAttachRequest(spec);
      // Too big for the agent: the engine takes it (and its own limits apply).
      if (request === null) return fallback;
      // The relay joins the VE's relay cgroup before it runs (see
      // chargeToContainer), and so does its fallback, which it runs as a child.
      return this.deps.runtime.chargeToContainer(ve, {
        file: helper,
        args: ['attach', this.socketPath(ve), spec.tty ? '1' : '0', fallback.file, ...fallback.args],
        env: { ...fallback.env, [ATTACH_REQUEST_ENV]: request },
        exitReporting: 'exact',
      });
    }
    if (!this.launching.has(ve)) {
      // A second later, not now: the login that asked for it is starting its
      // own `runc exec` (on a VE just booted, maybe), and on two cores the
      // agent's start would slow that login down instead of the next one.
      const cancel = new AbortController();
      const done = sleep(AGENT_START_DELAY_MS, undefined, { signal: cancel.signal })
        .then(() => this.launch(ve, init, helper), (err) => {
          if (!cancel.signal.aborted) throw err;
        })
        .catch((err) => this.deps.log.warn({ event: 've.session_agent_failed', ve, err: errorMessage(err) }))
        .finally(() => this.launching.delete(ve));
      this.launching.set(ve, { cancel, done });
    }
    return fallback;
  }

  /**
   * The socket of the agent that runs in `ve` under its init `init` (its pid
   * and start time checked, so a reused pid is not taken for it), or null.
   */
  async liveSocket(ve: string, init: string): Promise<string | null> {
    if (!this.deps.enabled || !(await this.known(ve, init))) return null;
    return this.socketPath(ve);
  }

  /**
   * The agent running in `ve` under `init` (its pid and start time checked),
   * or null. One that a previous `vesh serve` started and left running (a
   * restart leaves VEs up) is taken over on the spot, at the VE's first
   * session under this init: the sessions of a restarted server go to the
   * agents at once, instead of through `runc exec` (~40 ms more each, and no
   * shells held over a drop) until a launch a second later finds them.
   */
  private async known(ve: string, init: string): Promise<AgentRecord | null> {
    const agent = this.agents.get(ve);
    if (agent && agent.init === init) return (await processStartTime(agent.pid)) === agent.start ? agent : null;
    if (agent || this.launching.has(ve) || this.adoptTried.get(ve) === init) return null;
    // Once per VE and init: a VE with no agent is not read for one at every session.
    this.adoptTried.set(ve, init);
    const previous = await this.adoptable(ve, init, this.pidPath(ve)).catch(() => null);
    // A launch or another session's look got there first.
    const meanwhile = this.agents.get(ve);
    if (meanwhile) return meanwhile.init === init ? meanwhile : null;
    if (!previous) return null;
    this.agents.set(ve, previous);
    this.deps.log.debug({ event: 've.session_agent_adopted', ve, pid: previous.pid });
    return previous;
  }

  private async launch(ve: string, init: string, helper: string): Promise<void> {
    // The VE stopped or restarted meanwhile: the next session asks again.
    if ((await this.deps.currentInit(ve)) !== init) return;
    await fs.mkdir(this.deps.dir, { recursive: true, mode: 0o700 });
    const pidFile = this.pidPath(ve);
    // An agent a previous `vesh serve` started in this VE: use it rather than
    // leave it behind with nobody connecting to it.
    const previous = await this.adoptable(ve, init, pidFile);
    if (previous) {
      this.agents.set(ve, previous);
      this.deps.log.debug({ event: 've.session_agent_adopted', ve, pid: previous.pid });
      return;
    }
    await fs.rm(pidFile, { force: true });
    const cmd = await this.deps.runtime.execCommand(ve, {
      // runc opens the path inside the VE: /proc/self/fd/4 is this binary,
      // passed by `listen`, so nothing of ours has to be in the VE's files.
      argv: ['/proc/self/fd/4', 'agent'],
      uid: 0,
      gid: 0,
      tty: false,
      detach: true,
      preserveFds: 2,
      pidFile,
    });
    const started = performance.now();
    await run(helper, ['listen', this.socketPath(ve), cmd.file, ...cmd.args], { timeoutMs: 30_000 });
    const pid = Number((await fs.readFile(pidFile, 'utf8')).trim());
    const start = pid > 0 ? await processStartTime(pid) : null;
    if (!start) throw new Error(`the session agent of VE "${ve}" exited at once`);
    this.agents.set(ve, { init, pid, start });
    this.deps.log.debug({ event: 've.session_agent_started', ve, pid, ms: Math.round(performance.now() - started) });
  }

  /**
   * The agent named in the pid file, if it still runs in this VE (its pid
   * namespace is the init's) and its socket is there. Only host root writes
   * the pid file and the socket; the checks make sure the pid was not reused.
   */
  private async adoptable(ve: string, init: string, pidFile: string): Promise<AgentRecord | null> {
    const pid = Number((await fs.readFile(pidFile, 'utf8').catch(() => '')).trim());
    if (!Number.isInteger(pid) || pid <= 0) return null;
    const initPid = init.split(':')[0];
    const [comm, ns, initNs, start, sock] = await Promise.all([
      fs.readFile(`/proc/${pid}/comm`, 'utf8').catch(() => ''),
      fs.readlink(`/proc/${pid}/ns/pid`).catch(() => 'none'),
      fs.readlink(`/proc/${initPid}/ns/pid`).catch(() => 'init'),
      processStartTime(pid),
      fs.lstat(this.socketPath(ve)).catch(() => null),
    ]);
    if (comm.trim() !== AGENT_NAME || ns !== initNs || !start) return null;
    if (!sock?.isSocket()) {
      // Ours, in this VE, but nobody can reach it any more.
      try { process.kill(pid, 'SIGKILL'); } catch { /* gone meanwhile */ }
      return null;
    }
    return { init, pid, start };
  }

  /** The VE stopped or is gone: its agent went with it; remove what we kept for it. */
  async forget(ve: string): Promise<void> {
    // A start still waiting is called off; one under way is waited for, so it
    // leaves no socket behind.
    const launch = this.launching.get(ve);
    launch?.cancel.abort();
    await launch?.done;
    this.agents.delete(ve);
    this.adoptTried.delete(ve);
    await fs.rm(this.socketPath(ve), { force: true });
    await fs.rm(this.pidPath(ve), { force: true });
  }
}
