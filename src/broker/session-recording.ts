import net from 'node:net';
import type { Logger } from '../audit/logger.js';
import type { ConnectionRecording } from '../audit/recording-store.js';
import type { CastWriter } from '../audit/recording-files.js';
import { startTap, type Tap } from '../audit/recording-tap.js';
import type { ExitReport } from '../ssh/exit-status.js';
import { sftpStderrHandler } from '../ssh/sftp.js';
import { closeFd, socketpair } from '../system/fdpass.js';
import type { SpawnedSession } from './session-spawn.js';

/**
 * How a recorded session's descriptors are changed before the worker gets
 * them (vesh.yaml / accounts.yaml recording, src/audit/recording-*.ts):
 *
 * - a terminal: the broker keeps the pty master and taps it
 *   (recording-tap.ts); the worker gets a socketpair end, and window
 *   changes come as `session.resize`;
 * - SFTP: the broker keeps sftp-server's stderr (its `-l INFO` log) and
 *   turns the file changes into events itself; the worker's stderr
 *   descriptor is a socket already at its end. Unrecorded, the worker
 *   parses that log (sftp.ts) and the broker never reads it;
 * - an exec without a terminal: nothing changes; the command line the
 *   broker built and the exit status are the events.
 */
export interface RecordedSession {
  /** What goes to the worker in place of the session's own descriptors. */
  readonly fds: number[];
  /** Set for a tapped terminal. */
  readonly tap: Tap | null;
  /** The process ended: the terminal's last bytes copied, `session.end` written, the cast sealed. */
  finish(report: ExitReport): Promise<void>;
}

export interface SessionFacts {
  session: number;
  kind: 'shell' | 'exec' | 'subsystem';
  pty?: { term: string; cols: number; rows: number };
  shell: string;
}

/** An audit logger that also writes what it logs into the connection's events (SFTP changes). */
function sftpEventSink(rec: ConnectionRecording, log: Logger, session: number): Logger {
  const record = (o: Record<string, unknown>) => {
    const { event, ...fields } = o;
    rec.event(String(event), { session, ...fields });
  };
  const sink = {
    info: (o: Record<string, unknown>, msg?: string) => {
      log.info(o, msg);
      record(o);
    },
    warn: (o: Record<string, unknown>, msg?: string) => {
      log.warn(o, msg);
      record(o);
    },
  };
  return sink as unknown as Logger;
}

export function recordSession(rec: ConnectionRecording, facts: SessionFacts, s: SpawnedSession, log: Logger): RecordedSession {
  let tap: Tap | null = null;
  let cast: CastWriter | null = null;
  let fds = s.fds;
  let stderr: net.Socket | null = null;
  if (facts.pty) {
    cast = rec.cast(facts.session, { width: facts.pty.cols, height: facts.pty.rows, term: facts.pty.term, shell: facts.shell });
    tap = startTap(s.fds[0]!, cast);
    fds = [tap.workerFd];
    rec.event('session.recording', { session: facts.session, file: cast.path.split('/').pop() });
  } else if (facts.kind === 'subsystem' && s.fds.length === 2) {
    const [gone, theirs] = socketpair('stream');
    closeFd(gone);
    stderr = new net.Socket({ fd: s.fds[1]!, readable: true, writable: false });
    stderr.on('error', () => undefined);
    stderr.on('data', sftpStderrHandler(sftpEventSink(rec, log, facts.session)));
    fds = [s.fds[0]!, theirs];
  }
  return {
    fds,
    tap,
    finish: async (report) => {
      if (tap) await tap.finish();
      if (stderr) {
        const err = stderr;
        // sftp-server's last lines (the closing ones) come with its end.
        await new Promise<void>((r) => {
          if (err.readableEnded || err.destroyed) return r();
          const t = setTimeout(r, 1000);
          err.once('close', () => { clearTimeout(t); r(); });
        });
        err.destroy();
      }
      rec.event('session.end', { session: facts.session, ...(report.kind === 'status' ? { exitStatus: report.code } : { exitSignal: report.signal }) });
      if (cast) rec.sealCast(cast);
      rec.sessionEnded();
    },
  };
}
