import { describe, expect, it } from 'vitest';
import { encodeAgentRequest, exitFromWaitStatus } from '../../src/broker/agent-session.js';

const proc = {
  argv: ['/bin/sh', '-c', 'true'], uid: 1000, gid: 1000, groups: [1000, 27], cwd: '/home/u',
  env: { PATH: '/usr/bin:/bin', TERM: 'xterm' }, tty: true, consoleSize: { rows: 40, cols: 100 },
};

describe('the broker\'s request to a VE session agent (struct req_head in vesh-session.c)', () => {
  it('lays out the header, the groups and the NUL-ended strings as the agent reads them', () => {
    const b = encodeAgentRequest(proc)!;
    expect(b.readUInt32LE(0)).toBe(0x76657368);
    expect(b.readUInt32LE(4)).toBe(1);
    expect([b.readUInt32LE(8), b.readUInt32LE(12)]).toEqual([1000, 1000]);
    expect([b.readUInt16LE(16), b.readUInt16LE(18)]).toEqual([40, 100]);
    expect([b.readUInt32LE(20), b.readUInt32LE(24), b.readUInt32LE(28)]).toEqual([2, 2, 3]);
    expect([b.readUInt32LE(32), b.readUInt32LE(36)]).toEqual([1000, 27]);
    expect(b.subarray(40).toString('utf8')).toBe('/home/u\0PATH=/usr/bin:/bin\0TERM=xterm\0/bin/sh\0-c\0true\0');
  });

  it('refuses what the agent cannot carry: a NUL in a string, no argv, too many groups, over its 60 KiB', () => {
    expect(encodeAgentRequest({ ...proc, argv: ['/bin/sh', '-c', 'a\0b'] })).toBeNull();
    expect(encodeAgentRequest({ ...proc, env: { 'A\0': 'x' } })).toBeNull();
    expect(encodeAgentRequest({ ...proc, argv: [] })).toBeNull();
    expect(encodeAgentRequest({ ...proc, groups: Array.from({ length: 257 }, (_, i) => i) })).toBeNull();
    expect(encodeAgentRequest({ ...proc, env: { BIG: 'x'.repeat(61 * 1024) } })).toBeNull();
  });
});

describe('a wait status from a VE session agent, as the client is told it', () => {
  it('passes exit codes and the signals that end a process', () => {
    expect(exitFromWaitStatus(0)).toEqual({ kind: 'status', code: 0 });
    expect(exitFromWaitStatus(130 << 8)).toEqual({ kind: 'status', code: 130 });
    expect(exitFromWaitStatus(9)).toEqual({ kind: 'signal', signal: 'KILL' });
    expect(exitFromWaitStatus(15 | 0x80)).toEqual({ kind: 'signal', signal: 'TERM' });
  });

  it('reads what only a lying agent sends as an exit status, never as a stop: "killed by SIGSTOP", "stopped", an unknown signal', () => {
    expect(exitFromWaitStatus(19)).toEqual({ kind: 'status', code: 128 + 19 });
    expect(exitFromWaitStatus((19 << 8) | 0x7f)).toEqual({ kind: 'status', code: 255 });
    expect(exitFromWaitStatus(43)).toEqual({ kind: 'status', code: 128 + 43 });
  });
});
