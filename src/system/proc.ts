import { promises as fs } from 'node:fs';

/**
 * Field 22 of /proc/PID/stat (start time in clock ticks since boot), or null
 * if there is no such process or it has exited (a zombie whose parent has not
 * reaped it yet). A pid with the same start time is the same process: pids
 * are reused, (pid, start time) pairs are not.
 */
export async function processStartTime(pid: number): Promise<string | null> {
  try {
    const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return fields[0] === 'Z' ? null : (fields[19] ?? null);
  } catch {
    return null;
  }
}
