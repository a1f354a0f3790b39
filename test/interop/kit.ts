import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, constants as fsConstants, openSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn as ptySpawn, type IPty } from 'node-pty';

/**
 * Small tools for driving SSH clients other than OpenSSH's: a terminal for
 * any program, the server's host keys in the forms each client pins them,
 * and each client's version for the test names.
 */

/** Debian's Python, where python3-paramiko and python3-asyncssh live (a pyenv python3 on PATH would not see them). */
export const DEBIAN_PYTHON = '/usr/bin/python3';

export interface HostKeyInfo {
  /** `ssh-ed25519 AAAA…` / `ssh-rsa AAAA…` lines of the server's host keys. */
  publicLines: string[];
  /** `SHA256:…` fingerprints, one per key. */
  fingerprints: string[];
}

/** The server's host keys as `vesh serve` wrote them into its keys directory on first start. */
export function readHostKeys(keysDir: string): HostKeyInfo {
  const publicLines: string[] = [];
  const fingerprints: string[] = [];
  for (const name of ['ssh_host_ed25519_key', 'ssh_host_rsa_key']) {
    const pub = path.join(keysDir, `${name}.pub`);
    publicLines.push(readFileSync(pub, 'utf8').trim().split(/\s+/).slice(0, 2).join(' '));
    fingerprints.push(execFileSync('ssh-keygen', ['-l', '-E', 'sha256', '-f', pub], { encoding: 'utf8' }).split(' ')[1]!);
  }
  return { publicLines, fingerprints };
}

/** known_hosts lines for 127.0.0.1:PORT, the form OpenSSH, paramiko and AsyncSSH read (dbclient matches the host name alone). */
export function knownHostsText(port: number, keys: HostKeyInfo): string {
  return keys.publicLines.map((l) => `[127.0.0.1]:${port} ${l}\n`).join('');
}

/** First line a program prints for its version flag (stdout or stderr), for test names and logs. */
export function versionOf(file: string, args: string[], pattern: RegExp): string {
  const r = spawnSync(file, args, { encoding: 'utf8' });
  const text = `${r.stdout ?? ''}\n${r.stderr ?? ''}`;
  const m = pattern.exec(text);
  return m ? m[1]! : `${path.basename(file)} (not installed: ${r.error ? r.error.message : text.trim().slice(0, 80)})`;
}

/** A program running in a real terminal (node-pty), as a person would run it; output lands in a buffer tests wait on. */
export class ProgramTerminal {
  private buf = '';
  private exited: number | null = null;
  readonly proc: IPty;
  /**
   * Our own descriptor on the terminal's slave side, held until the program
   * has exited. node-pty closes the master as soon as a read of it fails
   * with EIO, which is as soon as no slave descriptor is open any more, and
   * closing the master hangs the terminal up: a program that closes its
   * stdin, stdout and stderr before it exits (dbclient does, when its
   * session channel closes) could get SIGHUP in between, and node-pty then
   * reports exit code 0 (and signal 1) instead of its status. A terminal
   * stays open until its program has exited; so does this one. (Opened in
   * the tick that spawned the program: node-pty cannot have closed the
   * master yet.)
   */
  private slave: number | null;
  constructor(file: string, args: string[], env: Record<string, string> = {}) {
    this.proc = ptySpawn(file, args, { name: 'xterm', cols: 80, rows: 24, env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: os.tmpdir(), TERM: 'xterm', ...env } });
    const pts = (this.proc as IPty & { ptsName?: string }).ptsName;
    if (!pts) throw new Error('ProgramTerminal: node-pty gave no slave path (ptsName), needed to keep the terminal open until the program exits');
    this.slave = openSync(pts, fsConstants.O_RDWR | fsConstants.O_NOCTTY);
    this.proc.onData((d) => {
      this.buf += d;
      if (this.buf.length > 1_000_000) this.buf = this.buf.slice(-500_000);
    });
    this.proc.onExit(({ exitCode }) => {
      this.exited = exitCode;
      if (this.slave !== null) closeSync(this.slave);
      this.slave = null;
    });
  }
  write(s: string): void {
    this.proc.write(s);
  }
  resize(cols: number, rows: number): void {
    this.proc.resize(cols, rows);
  }
  /** Wait until output since the last match matches `re`; returns the match and moves past it. */
  async expect(re: RegExp, timeoutMs = 30_000): Promise<RegExpExecArray> {
    const end = Date.now() + timeoutMs;
    while (Date.now() < end) {
      const m = re.exec(this.buf);
      if (m) {
        this.buf = this.buf.slice(m.index + m[0].length);
        return m;
      }
      if (this.exited !== null) break;
      await new Promise((r) => setTimeout(r, 30));
    }
    throw new Error(`terminal: timed out waiting for ${re}; exited=${this.exited}; screen tail: ${JSON.stringify(this.buf.slice(-600))}`);
  }
  async waitExit(timeoutMs = 20_000): Promise<number> {
    const end = Date.now() + timeoutMs;
    while (this.exited === null && Date.now() < end) await new Promise((r) => setTimeout(r, 30));
    if (this.exited === null) throw new Error(`terminal: the program did not exit; screen tail: ${JSON.stringify(this.buf.slice(-600))}`);
    return this.exited;
  }
  kill(): void {
    try {
      this.proc.kill('SIGKILL');
    } catch { /* gone */ }
  }
}
