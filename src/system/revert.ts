/**
 * Undo stack for multi-step set-up (Incus' revert pattern): each step that
 * changes the machine registers how to undo itself; on failure, undo runs
 * newest first, and every undo runs even when an earlier one throws.
 */
export class Revert {
  private undos: Array<{ what: string; fn: () => unknown | Promise<unknown> }> = [];

  add(what: string, fn: () => unknown | Promise<unknown>): void {
    this.undos.push({ what, fn });
  }

  /** Forget the undo steps: the set-up succeeded and its work is to stay. */
  success(): void {
    this.undos = [];
  }

  /** Run every undo, newest first. Returns the failures of undo steps (for logging). */
  async fail(): Promise<Array<{ what: string; error: unknown }>> {
    const failures: Array<{ what: string; error: unknown }> = [];
    const steps = this.undos.reverse();
    this.undos = [];
    for (const step of steps) {
      try {
        await step.fn();
      } catch (error) {
        failures.push({ what: step.what, error });
      }
    }
    return failures;
  }
}

/** Run `body` with a Revert; on throw, undo what it registered and rethrow. */
export async function withRevert<T>(body: (r: Revert) => Promise<T>, onUndoFailure?: (f: Array<{ what: string; error: unknown }>) => void): Promise<T> {
  const r = new Revert();
  try {
    const out = await body(r);
    r.success();
    return out;
  } catch (err) {
    const failures = await r.fail();
    if (failures.length > 0) onUndoFailure?.(failures);
    throw err;
  }
}
