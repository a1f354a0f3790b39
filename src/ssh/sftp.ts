import type { Logger } from '../audit/logger.js';
import { LineSplitter, parseSftpLogLine } from './sftp-log.js';

/**
 * The SFTP subsystem is OpenSSH's own sftp-server, run inside the VE as the
 * account's VE user with the channel as its stdin/stdout. The VE's kernel
 * resolves every path it touches, so `..` and symlinks cannot leave the VE,
 * and our process never reads or writes VE files. (ssh2's own 'sftp'
 * listener is never registered: that would make this process the file
 * server.)
 *
 * `-l INFO -e` makes sftp-server log each file operation to stderr; those
 * lines become `sftp.*` audit events here.
 */
export const SFTP_SERVER_PATH = '/usr/lib/openssh/sftp-server';

export function sftpServerArgv(): string[] {
  return [SFTP_SERVER_PATH, '-l', 'INFO', '-e'];
}

/**
 * Bytes of sftp-server log lines parsed per second per session (a token
 * bucket holding one second's worth). A real session's log is a line of
 * about a hundred bytes per file operation; VE root can replace
 * sftp-server and write lines as fast as the pipe goes, and all tenants
 * share this event loop (review M3). Lines past the budget are counted, not
 * parsed.
 */
export const SFTP_LOG_BYTES_PER_SECOND = 256 * 1024;

/** A stderr consumer for one sftp-server: each complete line that is a file change becomes one audit event. */
export function sftpStderrHandler(log: Logger, now: () => number = Date.now): (chunk: Buffer) => void {
  let logged = 0;
  let tokens = SFTP_LOG_BYTES_PER_SECOND;
  let at = now();
  let skipped = 0;
  const splitter = new LineSplitter((line) => {
    const t = now();
    tokens = Math.min(SFTP_LOG_BYTES_PER_SECOND, tokens + ((t - at) / 1000) * SFTP_LOG_BYTES_PER_SECOND);
    at = t;
    const cost = line.length + 1;
    if (cost > tokens) {
      if (skipped++ === 0) log.warn({ event: 'sftp.log_rate_limited', bytesPerSecond: SFTP_LOG_BYTES_PER_SECOND }, 'sftp-server writes its log faster than it can be audited: lines past the budget are skipped');
      return;
    }
    tokens -= cost;
    const ev = parseSftpLogLine(line);
    if (!ev) return;
    // A cap per session keeps a runaway client from turning the audit log into its disk.
    if (++logged > 100_000) return;
    if (ev.op === 'error') log.warn({ event: 'sftp.error', message: ev.message });
    else {
      const { op, ...fields } = ev;
      log.info({ event: `sftp.${op}`, ...fields });
    }
  });
  return (chunk) => splitter.push(chunk);
}
