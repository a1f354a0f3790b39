import type { VeUserInfo } from '../ve/access.js';
import { ENV_LIMITS } from './limits.js';

/**
 * The environment a session's process starts with inside the VE. Built from
 * an allow-list only: the login variables from the VE's own passwd entry, the
 * few client variables OpenSSH's default AcceptEnv lets through, and the
 * SSH_* variables scripts look for. Nothing of the server's own environment
 * ever reaches a VE.
 */

/** Client `env` requests we honour: TERM, LANG and LC_* (OpenSSH's Debian default AcceptEnv). */
const CLIENT_ENV_NAME = /^(TERM|LANG|LC_[A-Z_]{1,40})$/;

/** Whether a client's `env` request may set this variable. */
export function acceptClientEnv(name: string, value: string): boolean {
  return (
    CLIENT_ENV_NAME.test(name) &&
    name.length <= ENV_LIMITS.maxNameLength &&
    value.length <= ENV_LIMITS.maxValueLength &&
    // NUL cannot cross exec; control characters have no business in these values.
    !/[\x00-\x1f\x7f]/.test(value)
  );
}

/** PATH before the login shell's profile sets its own; the same defaults as Debian's sshd. */
export function defaultPath(uid: number): string {
  return uid === 0 ? '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' : '/usr/local/bin:/usr/bin:/bin:/usr/games';
}

export interface SessionEnvInput {
  user: VeUserInfo;
  clientEnv: ReadonlyMap<string, string>;
  /** TERM from the pty request, which wins over an `env` TERM. */
  term?: string;
  /** "client-ip client-port server-ip server-port" */
  connection: { clientIp: string; clientPort: number; serverIp: string; serverPort: number };
  /** The client's command when a key's command= replaced it. */
  originalCommand?: string;
}

export function sessionEnvironment(input: SessionEnvInput): Record<string, string> {
  const { user, connection: c } = input;
  const env: Record<string, string> = {};
  for (const [k, v] of input.clientEnv) env[k] = v;
  Object.assign(env, {
    HOME: user.home,
    USER: user.name,
    LOGNAME: user.name,
    SHELL: user.shell,
    PATH: defaultPath(user.uid),
    SSH_CLIENT: `${c.clientIp} ${c.clientPort} ${c.serverPort}`,
    SSH_CONNECTION: `${c.clientIp} ${c.clientPort} ${c.serverIp} ${c.serverPort}`,
  });
  if (input.term) env.TERM = input.term;
  if (input.originalCommand !== undefined) env.SSH_ORIGINAL_COMMAND = input.originalCommand;
  return env;
}

/** A TERM from a pty request: printable, short, or the safe default. */
export function sanitizeTerm(term: string | undefined): string {
  return term && /^[A-Za-z0-9._+-]{1,64}$/.test(term) ? term : 'xterm';
}
