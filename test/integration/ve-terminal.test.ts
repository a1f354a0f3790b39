import * as pty from 'node-pty';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';

/** A terminal session into a VE through node-pty, with a screen buffer to wait on. */
class Term {
  private buf = '';
  readonly proc: pty.IPty;
  constructor(file: string, args: string[]) {
    this.proc = pty.spawn(file, args, { name: 'xterm', cols: 80, rows: 24, env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', TERM: 'xterm' } });
    this.proc.onData((d) => { this.buf += d; });
  }
  write(s: string): void { this.proc.write(s); }
  /** Wait until the output since the last mark matches, then move the mark past it. */
  async expect(re: RegExp, timeoutMs = 15_000): Promise<string> {
    const end = Date.now() + timeoutMs;
    while (Date.now() < end) {
      const m = re.exec(this.buf);
      if (m) {
        this.buf = this.buf.slice(m.index + m[0].length);
        return m[0];
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`timed out waiting for ${re} in ${JSON.stringify(this.buf.slice(-500))}`);
  }
}

describe('terminals inside a VE (runc exec -t under node-pty)', () => {
  let env: VeTestEnv;
  let term: Term;

  beforeAll(async () => {
    env = await makeVeTestEnv({ template: 'busybox' });
    await env.ves.create('tty1');
    await env.ves.start('tty1');
    const cmd = await env.ves.execCommand('tty1', { argv: ['/bin/sh', '-i'], uid: 0, gid: 0, tty: true, env: { TERM: 'xterm', PS1: 'PROMPT# ' } });
    term = new Term(cmd.file, cmd.args);
    await term.expect(/PROMPT# /);
  });

  afterAll(async () => {
    try { term?.proc.kill(); } catch { /* already gone */ }
    await env?.cleanup();
  });

  it('names a tty device that exists inside the VE', async () => {
    term.write('t=$(tty); echo "TTY=$t"; ls -l "$t" >/dev/null && echo EXISTS\r');
    const line = await term.expect(/TTY=\/dev\/pts\/\d+/);
    expect(line).toMatch(/\/dev\/pts\/\d+/);
    await term.expect(/EXISTS/);
  });

  it('passes the window size and resizes through', async () => {
    term.write('stty size\r');
    await term.expect(/24 80/);
    term.proc.resize(100, 40);
    await new Promise((r) => setTimeout(r, 300));
    term.write('stty size\r');
    await term.expect(/40 100/);
  });

  it('does job control: Ctrl-Z stops, fg resumes, Ctrl-C interrupts the foreground job', async () => {
    /** State letter (S, R, T…) of the VE's `sleep 100`, as the VE's kernel reports it; null when there is none. */
    const sleepState = async (): Promise<string | null> => {
      const ps = await shInVe(env, 'tty1', 'ps -o stat,args');
      const line = ps.stdout.split('\n').find((l) => /^\S+\s+sleep 100$/.test(l.trim()));
      return line ? line.trim()[0]! : null;
    };
    // Each marker's output differs from the typed line the terminal echoes, so a
    // match proves the command ran; each step then consumes its own prompt.
    term.write('echo "SYNC-$((40+2))"\r');
    await term.expect(/SYNC-42/);
    await term.expect(/PROMPT# /);
    expect(await sleepState()).toBeNull();

    term.write('sleep 100\r');
    await waitFor('sleep 100 to run in the foreground', async () => (await sleepState()) === 'S');
    term.write('\x1a');
    await term.expect(/Stopped[^\r\n]*sleep 100/);
    await term.expect(/PROMPT# /);
    await waitFor('the kernel to show sleep 100 stopped', async () => (await sleepState()) === 'T');
    term.write('jobs >/tmp/jobs.out; echo "J=$(wc -l </tmp/jobs.out)X S=$(grep -c "Stopped.*sleep 100" /tmp/jobs.out)X"\r');
    await term.expect(/J=1X S=1X/);
    await term.expect(/PROMPT# /);

    term.write('fg\r');
    await waitFor('fg to resume sleep 100', async () => (await sleepState()) === 'S');
    term.write('\x03');
    await term.expect(/PROMPT# /);
    // 130 = 128 + SIGINT: Ctrl-C killed the foreground job, and the shell waited for it.
    term.write('echo "RC=$?X"\r');
    await term.expect(/RC=130X/);
    await term.expect(/PROMPT# /);
    expect(await sleepState()).toBeNull();
    term.write('jobs >/tmp/jobs.out; echo "J=$(wc -l </tmp/jobs.out)X"\r');
    await term.expect(/J=0X/);
    await term.expect(/PROMPT# /);
  });
});
