/**
 * When a VE that asked for a reboot is started again. VE root may reboot
 * in a loop; every start costs host CPU (engine, mounts, network) that is
 * charged to no VE, so quick reboots in a row are free only up to a point,
 * then delayed, doubling each time, and at last refused: the VE stays
 * stopped until a login or "vesh ve start" brings it back (which starts a
 * new count).
 */
export interface RebootPolicy {
  /** A run shorter than this counts as a quick reboot; a longer one ends the streak. */
  quickUptimeMs: number;
  /** Quick reboots in a row that restart at once. */
  freeRestarts: number;
  /** Delay before the first delayed restart; doubled for each one after it. */
  firstDelayMs: number;
  /** Quick reboots in a row after which the VE is left stopped. */
  maxRestarts: number;
}

/** 5 free, then 2, 4, 8, 16 s, then stopped: at most 10 starts per loop, about half a minute of waiting. */
export const DEFAULT_REBOOT_POLICY: RebootPolicy = { quickUptimeMs: 60_000, freeRestarts: 5, firstDelayMs: 2_000, maxRestarts: 10 };

export type RebootDecision =
  | { action: 'restart'; delayMs: number; streak: number }
  | { action: 'leave-stopped'; streak: number };

/**
 * `streak`: quick reboots in a row before this one; `uptimeMs`: how long the
 * run that just ended lasted (null when unknown, e.g. a VE started before
 * this process: not counted as quick).
 */
export function decideReboot(policy: RebootPolicy, streak: number, uptimeMs: number | null): RebootDecision {
  const quick = uptimeMs !== null && uptimeMs < policy.quickUptimeMs;
  const now = quick ? streak + 1 : 0;
  if (now >= policy.maxRestarts) return { action: 'leave-stopped', streak: now };
  if (now <= policy.freeRestarts) return { action: 'restart', delayMs: 0, streak: now };
  return { action: 'restart', delayMs: policy.firstDelayMs * 2 ** (now - policy.freeRestarts - 1), streak: now };
}
