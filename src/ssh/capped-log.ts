import type { Logger } from '../audit/logger.js';

/**
 * Log lines a client can cause at will (refused requests, clamped terminal
 * sizes, signals) go through one of these per connection: the first `cap`
 * are logged, one warning says that the rest are not, and the rest are only
 * counted (reported when the connection closes). Otherwise an authenticated
 * user could fill the log's disk with a loop of window-change requests
 * (review L3).
 */
export class CappedLog {
  private count = 0;

  constructor(private readonly log: () => Logger, private readonly cap: number) {}

  info(fields: Record<string, unknown>): void {
    this.count += 1;
    if (this.count <= this.cap) this.log().info(fields);
    else if (this.count === this.cap + 1) this.log().warn({ event: 'ssh.log_lines_suppressed', cap: this.cap }, `more than ${this.cap} client-caused log lines on this connection: the rest are only counted`);
  }

  /** Lines not logged so far. */
  get suppressed(): number {
    return Math.max(0, this.count - this.cap);
  }
}
