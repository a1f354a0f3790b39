import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { afterAll, describe, expect, it } from 'vitest';
import { notifySocket, sdNotify, takeNotifySocket } from '../../src/system/sd-notify.js';

/** Receives on an abstract unix datagram address (systemd's "@name" form) and prints each datagram as a JSON line. */
const RECEIVER = `
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\\0" + sys.argv[1])
print(json.dumps("bound"), flush=True)
while True:
    print(json.dumps(s.recv(4096).decode()), flush=True)
`;

describe('sd-notify', () => {
  const name = `vesh-test-${randomBytes(6).toString('hex')}`;
  const rx = spawn('/usr/bin/python3', ['-u', '-c', RECEIVER, name], { stdio: ['ignore', 'pipe', 'inherit'] });
  const got: string[] = [];
  let pending = '';
  rx.stdout!.on('data', (d: Buffer) => {
    pending += d.toString();
    const lines = pending.split('\n');
    pending = lines.pop() ?? '';
    for (const l of lines) got.push(JSON.parse(l) as string);
  });
  afterAll(() => { rx.kill('SIGKILL'); });
  const until = async (n: number) => {
    for (let i = 0; i < 500 && got.length < n; i++) await new Promise((r) => setTimeout(r, 10));
    expect(got.length).toBeGreaterThanOrEqual(n);
  };

  it('sends nothing without NOTIFY_SOCKET, or with one that is neither a path nor @name', () => {
    expect(sdNotify({ READY: '1' }, undefined, null)).toBe(false);
    expect(notifySocket({ NOTIFY_SOCKET: 'relative/sock' })).toBeNull();
    expect(notifySocket({ NOTIFY_SOCKET: 'vsock:2:1' })).toBeNull();
  });

  it('sends one datagram to an abstract address; a newline in a value cannot add an assignment', async () => {
    await until(1);
    const env: NodeJS.ProcessEnv = { NOTIFY_SOCKET: `@${name}` };
    // Taken out of the environment (children must not inherit it), and used from then on.
    expect(takeNotifySocket(env)).toBe(`@${name}`);
    expect(env.NOTIFY_SOCKET).toBeUndefined();
    expect(sdNotify({ READY: '1', STATUS: 'a\nREADY=0' })).toBe(true);
    await until(2);
    expect(got[1]).toBe('READY=1\nSTATUS=a READY=0');
  });

  it('a socket nobody listens on is reported, not thrown', () => {
    expect(sdNotify({ READY: '1' }, undefined, `@${name}-absent`)).toBe(false);
  });
});
