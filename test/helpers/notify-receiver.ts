import { spawn } from 'node:child_process';
import type { Cleanup } from './ssh-harness.js';

/** Binds a Unix datagram socket (Node's dgram has no AF_UNIX) and prints each datagram as a JSON line. */
const RECEIVER = `
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print(json.dumps("bound"), flush=True)
while True:
    print(json.dumps(s.recv(4096).decode()), flush=True)
`;

/**
 * A stand-in for systemd's notification socket at `sock`: every datagram
 * sent there (READY=1, RELOADING=1, ...) is pushed onto the returned list,
 * in order, after a first "bound" once the socket exists. The receiver is
 * killed by `cleanup`.
 */
export function startNotifyReceiver(cleanup: Cleanup, sock: string): string[] {
  const notes: string[] = [];
  const rx = spawn('/usr/bin/python3', ['-u', '-c', RECEIVER, sock], { stdio: ['ignore', 'pipe', 'inherit'] });
  cleanup.add(() => { rx.kill('SIGKILL'); });
  let pending = '';
  rx.stdout!.on('data', (d: Buffer) => {
    pending += d.toString();
    const lines = pending.split('\n');
    pending = lines.pop() ?? '';
    for (const l of lines) notes.push(JSON.parse(l) as string);
  });
  return notes;
}
