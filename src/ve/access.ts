import type { LimitsInput } from '../config/limits.js';
import type { HostCommand } from '../runtime/types.js';
import type { AgentProcessSpec } from './session-agents.js';

/** A user account inside a VE, read from the VE's own /etc/passwd and /etc/group. */
export interface VeUserInfo {
  name: string;
  uid: number;
  gid: number;
  groups: number[];
  home: string;
  shell: string;
}

/** A process to start inside a VE, as a user of that VE. */
export interface VeProcessSpec {
  user: VeUserInfo;
  argv: string[];
  env: Record<string, string>;
  cwd?: string;
  tty: boolean;
  /** With tty: the client's window size, which the process sees from its start. */
  consoleSize?: { rows: number; cols: number };
}

/** Where to ask a VE's running session agent for a process directly, and the process as the agent takes it. */
export interface AgentRoute {
  /** The agent's socket (a root-only host directory, never in the VE). */
  socket: string;
  /** The process as the relay path asks for it (uid/gid inside the VE; env complete), with the terminal's first size. */
  process: AgentProcessSpec & { consoleSize?: { rows: number; cols: number } };
}

/**
 * The narrow interface the SSH side uses to reach VEs. It holds every
 * root-only operation the SSH layer needs, so that privilege separation is a
 * matter of putting a broker behind this interface (see design.md). Nothing
 * here reads or writes VE files on a user's behalf: it only returns host
 * commands that, once spawned, run inside the VE's namespaces.
 */
export interface VeAccess {
  /**
   * Make sure the VE exists and runs: a VE that does not exist is created
   * from the given template and limits, a stopped one is started. Concurrent
   * calls for one VE share one create/start.
   */
  ensureRunning(ve: string, opts?: { template?: string; limits?: LimitsInput; reason?: string }): Promise<void>;
  /** Look up a user in the VE's own passwd/group database. Throws VESH_ACCOUNT_NOT_FOUND if absent. */
  lookupUser(ve: string, user: string): Promise<VeUserInfo>;
  /** Host command that runs the process inside the running VE (stdio and exit status pass through). */
  processCommand(ve: string, spec: VeProcessSpec): Promise<HostCommand>;
  /**
   * The VE's session agent when one runs under the VE's current init: its
   * socket and `spec` as the agent takes it, for a caller that asks the agent
   * itself (no host process per session; src/broker/agent-session.ts). null
   * when there is none: then processCommand, which also has one started for
   * the next session. Optional: a VeAccess without agents leaves it out.
   */
  agentRoute?(ve: string, spec: VeProcessSpec): Promise<AgentRoute | null>;
  /**
   * Host command that starts the port-forward relay on the host
   * (src/native/vesh-forward-relay.c), which starts the helper inside the
   * running VE as `user`, with everything a session process has there (all
   * the VE's namespaces, its cgroups, capabilities and seccomp filter), so
   * every socket it makes is the VE's and nothing connects from the host's
   * network. Spawn it with a SOCK_SEQPACKET frame channel as fd 3 (the relay
   * is a host process the VE cannot reach; it checks every frame and
   * descriptor from the helper) and `program` opened read-only as fd 4. It
   * says {t:'ready'} once the helper runs, and lives until the channel closes.
   */
  forwardCommand(ve: string, user: VeUserInfo): Promise<HostCommand & { program: string }>;
}
