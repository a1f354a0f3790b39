import { describe, expect, it } from 'vitest';
import { run } from '../../src/system/exec.js';

describe('run(): bounded output and a hard deadline', () => {
  it('stops a program that writes more than the cap, and says so', async () => {
    await expect(run('yes', ['x'], { maxOutputBytes: 64 * 1024 })).rejects.toThrow(/more than 65536 bytes to stdout/);
  });

  it('ends at the deadline although a process the program started still holds its stdout', async () => {
    // The shell exits at once; its background sleep keeps the pipe open (3 s here; for ever in a VE), so 'close' would not come in time.
    await expect(run('/bin/sh', ['-c', 'sleep 3 & echo started'], { timeoutMs: 1000 })).rejects.toThrow(/did not finish within 1000 ms/);
  });

  it('still collects ordinary output and passes a non-zero exit through with allowFailure', async () => {
    const r = await run('/bin/sh', ['-c', 'echo out; echo err >&2; exit 3'], { allowFailure: true, timeoutMs: 10_000 });
    expect(r).toMatchObject({ code: 3, stdout: 'out\n', stderr: 'err\n' });
  });
});
