import { readCgroupCpuSeconds, type VeSample } from '../audit/metrics.js';
import type { VeManager } from './manager.js';

/**
 * Every VE as a metrics scrape reports it: the manager's listing (one
 * `runc list`, then per running VE one read each of its memory and pids
 * cgroup files and a statfs of its disk) plus its CPU time from cpuacct.
 * A stopped VE has no cgroup: only its state is reported.
 */
export async function veSamples(ves: Pick<VeManager, 'list' | 'cgroupsPath' | 'cgroupLayout'>): Promise<VeSample[]> {
  const list = await ves.list();
  return Promise.all(list.map(async (v) => ({
    name: v.name,
    state: v.state,
    memoryBytes: v.memoryBytes,
    processes: v.processes,
    disk: v.disk,
    cpuSeconds: v.state === 'running' || v.state === 'paused' ? await readCgroupCpuSeconds(ves.cgroupsPath(v.name), ves.cgroupLayout) : null,
  })));
}
