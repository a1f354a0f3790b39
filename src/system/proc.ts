import { readFileSync } from 'node:fs';

/**
 * Field 22 of /proc/PID/stat (start time in clock ticks since boot), or null
 * if there is no such process or it has exited (a zombie whose parent has not
 * reaped it yet). A pid with the same start time is the same process: pids
 * are reused, (pid, start time) pairs are not.
 *
 * Read synchronously: procfs answers from memory, never from a disk, and a
 * login asks this three times (VE init, session agent); each asynchronous
 * read was four thread-pool round trips (open, stat, read, close), which on
 * two cores cost more in wake-ups than the read itself.
 */
export async function processStartTime(pid: number): Promise<string | null> {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return fields[0] === 'Z' ? null : (fields[19] ?? null);
  } catch {
    return null;
  }
}
