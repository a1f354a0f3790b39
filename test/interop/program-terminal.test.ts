import { describe, expect, it } from 'vitest';
import { ProgramTerminal } from './kit.js';

/**
 * The interop suite's terminal (ProgramTerminal) must report the exit status
 * of a program that closes its stdin, stdout and stderr a while before it
 * exits, as dbclient does when its session channel closes. A terminal that
 * closed its master once no slave descriptor was left hung such a program
 * up (SIGHUP) before its exit, and node-pty then reported 0: the interop
 * test "dbclient -t ... exit status" read `expected +0 to be 3` although
 * the server had sent exit-status 3 before EOF and close.
 */
describe('ProgramTerminal (interop kit)', () => {
  it('reports the exit status of a program that closes its stdio before exiting', async () => {
    // The pause after closing stdio makes the old hang-up certain, not a race.
    const term = new ProgramTerminal('/bin/sh', ['-c', 'echo closing; exec 0<&- 1>&- 2>&-; sleep 0.5; exit 3']);
    try {
      await term.expect(/closing/);
      expect(await term.waitExit()).toBe(3);
    } finally {
      term.kill();
    }
  });
});
