import { constants as osConstants } from 'node:os';

/**
 * What a session tells the client when its process ends: an exit status, or
 * the name of the signal that killed it (RFC 4254 6.10, names without "SIG").
 */
export type ExitReport = { kind: 'status'; code: number } | { kind: 'signal'; signal: string };

/** Signals RFC 4254 lets a client send in a "signal" request (names without "SIG"). */
export const CLIENT_SIGNALS = new Set(['ABRT', 'ALRM', 'FPE', 'HUP', 'ILL', 'INT', 'KILL', 'PIPE', 'QUIT', 'SEGV', 'TERM', 'USR1', 'USR2']);

const NUMBER_TO_NAME = new Map<number, string>(
  Object.entries(osConstants.signals).map(([name, num]) => [num, name.replace(/^SIG/, '')]),
);

/**
 * The signal our relays take in place of SIGKILL, which they cannot catch
 * (SIGKILL would end the relay and leave the process running): SIGRTMIN+9
 * with glibc, KILL_RELAY_SIG in src/native/vesh-session.c. The session
 * relay turns it into SIGKILL for the process; runc, which forwards every
 * signal, passes it on as it is, and its default action ends the process too.
 */
export const KILL_RELAY_SIGNAL = 43;

/** What to send the host-side relay so that the process in the VE gets `sig`. */
export function relaySignal(sig: NodeJS.Signals): NodeJS.Signals | number {
  return sig === 'SIGKILL' ? KILL_RELAY_SIGNAL : sig;
}

/**
 * How a relay reports the process's end: 'exact' (our session relay: its
 * exit code is the process's status, and it dies of the signal that killed
 * the process), or 'runc' (runc exec: 128+N for death by signal N).
 */
export type ExitReporting = 'exact' | 'runc';

/** Signal numbers whose 128+N exit code we read as "killed by that signal" (see exitReport). */
const FATAL_SIGNALS = new Set(['HUP', 'INT', 'QUIT', 'ILL', 'TRAP', 'ABRT', 'BUS', 'FPE', 'KILL', 'USR1', 'SEGV', 'USR2', 'PIPE', 'ALRM', 'TERM', 'XCPU', 'XFSZ', 'SYS']);

/**
 * Turn how the host-side relay ended into what the client sees.
 *
 * An 'exact' relay needs no reading: a signal is the signal, a code the code.
 *
 * The process inside the VE is a child of `runc exec`, not of ours, and runc
 * reports its end as a plain exit code: the process's own status, or 128+N
 * when signal N killed it (runc's utils.ExitStatus, the shell convention).
 * So an exit code of 128+N for a fatal signal N is reported as exit-signal N,
 * which is what OpenSSH's sshd sends for a command killed by a signal (e.g.
 * `kill -9 $$`, a segfault, our SIGHUP on close). The price: a program that
 * deliberately calls exit(130) is reported as killed by SIGINT. Exit codes a
 * shell can produce otherwise (1-128) pass through unchanged.
 *
 * If runc itself was killed by a signal (SIGKILL cannot be relayed; runc
 * dies), that signal is reported.
 */
export function exitReport(code: number | null, signal: NodeJS.Signals | number | null | undefined, how: ExitReporting = 'runc'): ExitReport {
  if (signal !== null && signal !== undefined && signal !== 0) {
    if (signal === KILL_RELAY_SIGNAL) return { kind: 'signal', signal: 'KILL' };
    const name = typeof signal === 'number' ? NUMBER_TO_NAME.get(signal) : signal.replace(/^SIG/, '');
    if (name) return { kind: 'signal', signal: name };
  }
  const c = code ?? 255;
  if (how === 'exact') return { kind: 'status', code: c };
  if (c === 128 + KILL_RELAY_SIGNAL) return { kind: 'signal', signal: 'KILL' };
  if (c > 128 && c < 128 + 65) {
    const name = NUMBER_TO_NAME.get(c - 128);
    if (name && FATAL_SIGNALS.has(name)) return { kind: 'signal', signal: name };
  }
  return { kind: 'status', code: c };
}
