/**
 * The engine interface. Everything the VE layer needs from an OCI runtime goes
 * through here, so another engine (crun on cgroup v2 hosts, a Kubernetes
 * backend later) is one more implementation of this file, not a change to
 * callers. Every method throws VeshError: VESH_RUNTIME_MISSING when the binary
 * is absent, VESH_RUNTIME_FAILED when the engine refuses (message carries the
 * engine's own last line).
 */

export type ContainerStatus = 'creating' | 'created' | 'running' | 'paused' | 'stopped';

export interface ContainerState {
  id: string;
  /** PID of the container's init on the host, 0 when not running. */
  pid: number;
  status: ContainerStatus;
  bundle: string;
  created?: string;
}

/** A process to run inside a running container. */
export interface ExecSpec {
  argv: string[];
  /** uid/gid inside the container. */
  uid: number;
  gid: number;
  additionalGids?: number[];
  cwd?: string;
  env?: Record<string, string>;
  /** Allocate a terminal from the container's own devpts. */
  tty: boolean;
  /**
   * With tty: the terminal's size from the process's first instruction on.
   * Without it the process may start on a 0x0 terminal and get its size
   * (and a SIGWINCH) a moment later, when the relay copies ours over.
   */
  consoleSize?: { rows: number; cols: number };
  /** Return once the process runs, leaving it in the background (no relay). */
  detach?: boolean;
  /** Pass the caller's fds 3..3+N-1 on to the process. */
  preserveFds?: number;
  /** Write the process's host pid here (with detach). */
  pidFile?: string;
}

/** A host command line that, when spawned, runs the process inside the container. */
export interface HostCommand {
  file: string;
  args: string[];
  /**
   * How the command reports the process's end: 'exact' (its own exit status,
   * or death by the signal that killed the process), or, when absent, as
   * `runc exec` does (128+N for death by signal N).
   */
  exitReporting?: 'exact';
  /**
   * Variables to add to the command's own environment (not the process's in
   * the container): what must not be on its command line, which every host
   * user can read with ps, while a root process's environment only root can.
   */
  env?: Record<string, string>;
}

export interface ContainerRuntime {
  readonly name: string;
  /** Engine version string, e.g. "runc 1.1.5". */
  version(): Promise<string>;
  /**
   * Create the container from an OCI bundle; init exists (namespaces made) but
   * has not started. The init's stdout/stderr go to `consoleFile` (truncated).
   */
  create(id: string, opts: { bundleDir: string; pidFile: string; consoleFile: string }): Promise<void>;
  /**
   * create and start in one step (one engine process instead of two); hooks
   * in the bundle run between them. `prepare`, when given, is spawned in the
   * engine's place as `FILE ARGS… --console CONSOLEFILE [--engine-ns 3] --
   * ENGINE-LINE…`: it does its work (mounting the VE's file systems, where
   * the console file may live), opens CONSOLEFILE (truncated) as its stdout
   * and stderr and execs the engine line, so the two cost one process start;
   * with --engine-ns, fd 3 is the mount namespace to make the engine's from
   * (runtime/engine-ns.ts: none of the VEs' file systems in it). It exits 127 when the
   * engine is missing. A step that fails before the exec says why on its
   * stderr: VESH_COMMAND_FAILED with its last line (VESH_COMMAND_MISSING when
   * the step itself is absent).
   */
  run(id: string, opts: { bundleDir: string; pidFile: string; consoleFile: string; prepare?: HostCommand }): Promise<void>;
  /** Start the init of a created container. */
  start(id: string): Promise<void>;
  /** State of one container, or null when the engine does not know it. */
  state(id: string): Promise<ContainerState | null>;
  list(): Promise<ContainerState[]>;
  /** Send a signal to the container's init (or to all its processes with all=true). */
  kill(id: string, signal: string, all?: boolean): Promise<void>;
  /** Remove the engine's state and cgroups of a container (force also kills it). */
  delete(id: string, force?: boolean): Promise<void>;
  /**
   * The host command that runs `spec` inside the container in the foreground:
   * stdio, exit status and (for tty) window size pass through it. The process
   * gets the container's namespaces, cgroups, capabilities and seccomp filter.
   */
  execCommand(id: string, spec: ExecSpec): Promise<HostCommand>;
  /**
   * `cmd`, made to run charged to the host-side limits of container `id`
   * (its relay cgroup: pids and memory) from its first instruction on. For
   * host processes that serve the container, such as a session relay;
   * execCommand's commands are charged already. Never throws.
   */
  chargeToContainer(id: string, cmd: HostCommand): HostCommand;
}
