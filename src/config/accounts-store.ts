import { watch, type FSWatcher } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../audit/logger.js';
import { ErrorCodes, VeshError, errorMessage, isVeshError } from '../errors.js';
import { parseAccounts, type Account } from './accounts.js';
import type { YamlProblem } from './yaml-validate.js';

/** What the authenticator reads: the accounts in force right now. */
export interface AccountSource {
  get(name: string): Account | undefined;
}

/** Editors and `vesh user` write in bursts (temp file, rename, lock dir): wait for quiet first. */
const DEFAULT_DEBOUNCE_MS = 100;

/**
 * The accounts in force, loaded from accounts.yaml and kept current: the file
 * is watched and reloaded on change (and on reload(), which serve calls on
 * SIGHUP). An invalid edit never replaces good accounts: the problem is
 * logged with file and line, and the last good set stays in force.
 */
export class AccountsStore implements AccountSource {
  readonly file: string;
  private accounts = new Map<string, Account>();
  /** Text of the file the accounts in force came from; null = no file. */
  private text: string | null = null;
  private watcher: FSWatcher | null = null;
  private timer: NodeJS.Timeout | null = null;
  /** Reloads run one at a time, in order. */
  private queue: Promise<unknown> = Promise.resolve();
  private readonly log: Logger;
  private readonly debounceMs: number;
  private readonly listeners: Array<(accounts: ReadonlyMap<string, Account>) => void> = [];

  constructor(file: string, logger: Logger, opts: { debounceMs?: number } = {}) {
    this.file = path.resolve(file);
    this.log = logger.child({ component: 'accounts' });
    this.debounceMs = opts.debounceMs ?? DEFAULT_DEBOUNCE_MS;
  }

  /**
   * First load. A missing file means no accounts yet (with a warning); an
   * invalid one throws VeshError ACCOUNTS_INVALID naming file:line, since
   * there is no last good set to fall back on.
   */
  async load(): Promise<void> {
    let text: string | null;
    try {
      text = await this.readText();
    } catch (err) {
      throw new VeshError(ErrorCodes.ACCOUNTS_INVALID, `cannot read accounts file ${this.file}: ${errorMessage(err)}`, { cause: err });
    }
    if (text === null) {
      this.log.warn({ event: 'accounts.missing', file: this.file }, `accounts file ${this.file} does not exist: no account can log in until one is added (vesh user add NAME)`);
      this.replace(new Map(), null);
      return;
    }
    this.replace(parseAccounts(this.file, text), text);
    this.log.info({ event: 'accounts.loaded', file: this.file, count: this.accounts.size });
  }

  get(name: string): Account | undefined {
    return this.accounts.get(name);
  }

  list(): Account[] {
    return [...this.accounts.values()];
  }

  get size(): number {
    return this.accounts.size;
  }

  /**
   * Call `listener` each time a reload put new accounts in force (not on
   * the first load, nor on a failed reload). The server uses it to end the
   * connections of accounts that were locked or deleted.
   */
  onReload(listener: (accounts: ReadonlyMap<string, Account>) => void): void {
    this.listeners.push(listener);
  }

  /**
   * Read the file again. Resolves true when its accounts are now in force,
   * false when the file was missing or invalid (logged as
   * `accounts.reload_failed` with file, line and reason; the last good
   * accounts stay). Never rejects.
   */
  reload(): Promise<boolean> {
    return this.enqueue(() => this.reloadNow(false));
  }

  /**
   * Watch the file's directory (not the file: editors and `vesh user` replace
   * the file by renaming a new one over it, which a watch on the old inode
   * would miss) and reload shortly after the file changes.
   */
  watch(): void {
    if (this.watcher) return;
    const dir = path.dirname(this.file);
    const base = path.basename(this.file);
    try {
      this.watcher = watch(dir, { persistent: false }, (_event, filename) => {
        if (filename === null || filename.toString() === base) this.schedule();
      });
    } catch (err) {
      this.log.warn({ event: 'accounts.watch_failed', file: this.file, err: errorMessage(err) }, 'cannot watch the accounts file: edits apply on SIGHUP only');
      return;
    }
    this.watcher.on('error', (err) => {
      this.log.warn({ event: 'accounts.watch_failed', file: this.file, err: errorMessage(err) }, 'watching the accounts file stopped: edits apply on SIGHUP only');
      this.watcher?.close();
      this.watcher = null;
    });
  }

  close(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.watcher?.close();
    this.watcher = null;
  }

  private schedule(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      // A change event for a file whose text did not change (touch, a lock
      // file next to it) is not worth a log line.
      void this.enqueue(() => this.reloadNow(true));
    }, this.debounceMs);
    this.timer.unref();
  }

  private enqueue(step: () => Promise<boolean>): Promise<boolean> {
    const run = this.queue.then(step, step);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async reloadNow(onlyIfChanged: boolean): Promise<boolean> {
    let text: string | null;
    try {
      text = await this.readText();
    } catch (err) {
      this.failed(1, `cannot read the file: ${errorMessage(err)}`, 1);
      return false;
    }
    if (text === null) {
      if (onlyIfChanged && this.text === null) return false;
      this.failed(1, 'the file is missing (deleted, or being replaced)', 1);
      return false;
    }
    if (onlyIfChanged && text === this.text) return true;
    try {
      const accounts = parseAccounts(this.file, text);
      this.replace(accounts, text);
    } catch (err) {
      const problems = isVeshError(err) ? (err.details?.problems as YamlProblem[] | undefined) : undefined;
      const first = problems?.[0];
      const reason = first ? `${first.path ? `${first.path}: ` : ''}${first.message}` : errorMessage(err);
      this.failed(first?.line ?? 1, reason, problems?.length ?? 1);
      return false;
    }
    this.log.info({ event: 'accounts.reloaded', file: this.file, count: this.accounts.size }, `accounts reloaded: ${this.accounts.size} account(s)`);
    for (const l of this.listeners) {
      try {
        l(this.accounts);
      } catch (err) {
        this.log.error({ event: 'accounts.listener_failed', err: errorMessage(err) }, 'a reaction to the accounts reload failed');
      }
    }
    return true;
  }

  private failed(line: number, reason: string, problems: number): void {
    this.log.error(
      { event: 'accounts.reload_failed', file: this.file, line, reason, problems },
      `${this.file}:${line}: ${reason}${problems > 1 ? ` (and ${problems - 1} more problem(s))` : ''}; keeping the last good accounts (${this.accounts.size})`,
    );
  }

  private replace(accounts: Map<string, Account>, text: string | null): void {
    this.accounts = accounts;
    this.text = text;
  }

  private async readText(): Promise<string | null> {
    try {
      return await readFile(this.file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
  }
}
