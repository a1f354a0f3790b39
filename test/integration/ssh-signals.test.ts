import { promises as fs, readFileSync } from 'node:fs';
import path from 'node:path';
import ssh2 from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeVeTestEnv, shInVe, waitFor, type VeTestEnv } from '../helpers/ve-env.js';
import { Cleanup, makeClientKey, sshWithKey, startVeshServe, tempDir, writeAccounts, type ClientKey, type ServeProcess } from '../helpers/ssh-harness.js';

interface ExecEnd {
  stdout: string;
  code: number | null;
  signal: string | null;
}

/**
 * What a client sees of a command's end and of its `signal` requests, with
 * real VEs: through the VE's session agent, and through `runc exec` (the
 * path a session takes while the VE has no agent). The OpenSSH client never
 * sends `signal` requests, so these use ssh2's client.
 */
/** A vesh serve with one account ("sig") on a busybox VE, and an ssh2 exec helper. */
function signalBed(opts: { runtime?: string }) {
  const cleanup = new Cleanup();
  const bed = {
    env: undefined as unknown as VeTestEnv,
    serve: undefined as unknown as ServeProcess,
    key: undefined as unknown as ClientKey,
    cleanup,
    async start() {
      bed.env = await makeVeTestEnv({ template: 'busybox', runtime: opts.runtime });
      cleanup.add(() => bed.env.cleanup());
      bed.key = makeClientKey(tempDir(cleanup), 'ed25519', 'sig');
      writeAccounts(bed.env.config.accountsFile, ['sig:', '  keys:', `    - ${bed.key.publicLine}`, ''].join('\n'));
      bed.serve = await startVeshServe(cleanup, bed.env.configFile);
      // The first login makes and boots the VE (through runc exec).
      expect((await sshWithKey(bed.serve.port, 'sig', bed.key, ['true'], { timeoutMs: 120_000 })).code).toBe(0);
    },
    /** Run `command` over one ssh2 connection; `during` may send signals once the command printed READY. */
    exec(command: string, during?: (stream: ssh2.ClientChannel) => void, opts: { pty?: { rows: number; cols: number } } = {}): Promise<ExecEnd> {
      return new Promise((resolve, reject) => {
        const c = new ssh2.Client();
        const timer = setTimeout(() => { c.end(); reject(new Error(`no end of ${command}`)); }, 60_000);
        c.on('error', reject);
        c.on('ready', () => {
          c.exec(command, opts.pty ? { pty: { ...opts.pty, term: 'xterm' } } : {}, (err, stream) => {
            if (err) return reject(err);
            let stdout = '';
            let code: number | null = null;
            let signal: string | null = null;
            let signalled = false;
            stream.on('data', (d: Buffer) => {
              stdout += d.toString();
              if (!signalled && during && stdout.includes('READY')) {
                signalled = true;
                during(stream);
              }
            });
            stream.stderr.on('data', () => undefined);
            stream.on('exit', (c2: number | null, sig?: string) => {
              // ssh2's client names the exit-signal with its SIG prefix.
              if (sig) signal = sig.replace(/^SIG/, '');
              else code = c2;
            });
            stream.on('close', () => {
              clearTimeout(timer);
              c.end();
              resolve({ stdout, code, signal });
            });
          });
        });
        c.connect({ host: '127.0.0.1', port: bed.serve.port, username: 'sig', privateKey: readFileSync(bed.key.file), algorithms: { kex: ['curve25519-sha256'] } });
      });
    },
    async parentComm(): Promise<string> {
      return (await bed.exec('cat /proc/$PPID/comm')).stdout.trim();
    },
  };
  return bed;
}

// A command that reports the signal it catches; it sleeps in the background so the shell can take the
// signal, and ends that sleep (which holds its stdout) before it exits.
const trapping = (sig: string, exitCode: number) => `trap 'kill $p; echo caught-${sig}; exit ${exitCode}' ${sig}; sleep 100 & p=$!; echo READY; wait`;

/** The same cases for every path a session can take into a VE. */
function signalCases(bed: ReturnType<typeof signalBed>, path: string, expectParent: () => Promise<void>) {
  it(`goes through ${path}`, expectParent);

  it(`delivers signal requests (TERM, SEGV, PIPE) to the process, through ${path}`, async () => {
    for (const [sig, code] of [['TERM', 7], ['SEGV', 8], ['PIPE', 9]] as const) {
      const end = await bed.exec(trapping(sig, code), (s) => s.signal(sig));
      expect(end, sig).toEqual({ stdout: `READY\ncaught-${sig}\n`, code, signal: null });
    }
  });

  it(`kills the process itself on a KILL request, through ${path}`, async () => {
    const end = await bed.exec(`trap '' TERM HUP INT; echo READY; exec sleep 1234`, (s) => s.signal('KILL'));
    expect(end).toEqual({ stdout: 'READY\n', code: null, signal: 'KILL' });
    // Not only the relay died: the process is gone from the VE.
    await waitFor('sleep 1234 to be gone', async () => !(await shInVe(bed.env, 'sig', 'ps')).stdout.includes('sleep 1234'), 10_000);
  });

  it(`gives a terminal the client's size from the process's start, through ${path}`, async () => {
    // stty runs at once: a size copied over after the start would come too late for it.
    for (const size of [{ rows: 33, cols: 111 }, { rows: 7, cols: 20 }]) {
      const end = await bed.exec('stty size', undefined, { pty: size });
      expect(end).toEqual({ stdout: `${size.rows} ${size.cols}\r\n`, code: 0, signal: null });
    }
  });

  it(`reports death by a signal as exit-signal, and plain codes as exit-status, through ${path}`, async () => {
    expect(await bed.exec('kill -TERM $$')).toEqual({ stdout: '', code: null, signal: 'TERM' });
    expect(await bed.exec('exit 3')).toEqual({ stdout: '', code: 3, signal: null });
  });
}

/**
 * What a client sees of a command's end and of its `signal` requests, with
 * real VEs, on each path a session takes: through the VE's session agent,
 * through our relay's fallback when the agent does not answer, and through
 * `runc exec` alone (runtime.sessionAgents: false, and every VE's first
 * session). The OpenSSH client never sends `signal` requests, so these use
 * ssh2's client.
 */
describe('vesh serve: exit status, exit signal and signal requests', () => {
  describe('through the session agent', () => {
    const bed = signalBed({});
    beforeAll(() => bed.start());
    afterAll(() => bed.cleanup.run());

    signalCases(bed, 'the agent', async () => {
      await waitFor('sessions started by vesh-agent', async () => (await bed.parentComm()) === 'vesh-agent', 30_000);
    });

    it('tells a deliberate exit 130 from death by SIGINT', async () => {
      expect(await bed.exec('exit 130')).toEqual({ stdout: '', code: 130, signal: null });
      expect(await bed.exec('kill -INT $$')).toEqual({ stdout: '', code: null, signal: 'INT' });
    });

    describe('when the agent does not answer (its socket is gone), through the relay\'s fallback to runc exec', () => {
      beforeAll(async () => {
        // The agent process lives on, so vesh still routes sessions to it; the relay finds nobody at the socket.
        await fs.rm(path.join(bed.env.layout.agentsDir, 'sig.sock'));
      });
      signalCases(bed, 'the fallback', async () => {
        expect(await bed.parentComm()).not.toBe('vesh-agent');
        expect((await shInVe(bed.env, 'sig', 'ps -o comm')).stdout).toMatch(/^vesh-agent$/m);
      });
    });
  });

  describe('through runc exec alone (runtime.sessionAgents: false)', () => {
    const bed = signalBed({ runtime: 'sessionAgents: false' });
    beforeAll(() => bed.start());
    afterAll(() => bed.cleanup.run());

    signalCases(bed, 'runc exec', async () => {
      // Give an agent the time it would take to come up: none does.
      await new Promise((r) => setTimeout(r, 1500));
      expect(await bed.parentComm()).not.toBe('vesh-agent');
      expect((await shInVe(bed.env, 'sig', 'ps -o comm')).stdout).not.toMatch(/^vesh-agent$/m);
    });
  });
});
