import type { AuthContext, KeyboardAuthContext, PublicKeyAuthContext } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import type { AuthGrant } from '../broker/request-table.js';
import { errorMessage } from '../errors.js';
import type { ConnectionBroker } from '../worker/broker-client.js';

/** The request table's bound (MAX_USER_NAME_CHARS): a login carried from another cluster node names more than an account. */
const MAX_USER_NAME_CHARS = 4096;

const METHODS: Array<'publickey' | 'password' | 'keyboard-interactive'> = ['publickey', 'password', 'keyboard-interactive'];

/**
 * The authentication phase of one connection, on the worker's side: it
 * answers ssh2's 'authentication' events by asking the broker, which holds
 * the accounts, checks passwords and signatures, counts failures against
 * MaxAuthTries and the per-source penalties, and writes the `ssh.auth` audit
 * events. Nothing is decided here: a worker that skipped this would still
 * get no session, because the broker opens sessions only for a connection
 * it authenticated itself.
 */
export class ConnectionAuthentication {
  private done = false;
  /** Attempts in flight: ssh2 hands us one at a time, but a client may pipeline. */
  grant: AuthGrant | null = null;

  constructor(
    private readonly broker: ConnectionBroker,
    private readonly log: Logger,
    /** Called when the broker says MaxAuthTries is used up: the connection must end. */
    private readonly onTooManyFailures: () => void,
  ) {}

  handle(ctx: AuthContext): void {
    if (this.done) {
      ctx.reject();
      return;
    }
    const user = ctx.username.slice(0, MAX_USER_NAME_CHARS);
    switch (ctx.method) {
      case 'none':
        // Clients ask "none" first to learn the methods; not an attempt.
        ctx.reject(METHODS);
        return;
      case 'publickey':
        this.publickey(ctx, user);
        return;
      case 'password':
        this.settle(ctx, this.broker.password(user, ctx.password.slice(0, 1024), 'password'));
        return;
      case 'keyboard-interactive':
        this.keyboardInteractive(ctx, user);
        return;
      default:
        // hostbased and anything else: not offered, counted as a failure.
        this.settle(ctx, this.broker.failure(user, String(ctx.method).slice(0, 32), 'method not offered').then((disconnect) => ({ success: false, disconnect })));
    }
  }

  private publickey(ctx: PublicKeyAuthContext, user: string): void {
    if (!ctx.signature || !ctx.blob) {
      // The query ("would you take this key?"): the broker says, and an
      // unknown key counts against MaxAuthTries there.
      this.broker.keyQuery(user, ctx.key.algo, ctx.key.data).then((ok) => {
        if (this.done) return;
        if (ok) ctx.accept();
        else ctx.reject(METHODS);
      }, (err: unknown) => this.internalError(ctx, err));
      return;
    }
    this.settle(ctx, this.broker.publickey({ user, algo: ctx.key.algo, key: ctx.key.data, blob: ctx.blob, signature: ctx.signature, hashAlgo: ctx.hashAlgo }));
  }

  private keyboardInteractive(ctx: KeyboardAuthContext, user: string): void {
    ctx.prompt([{ prompt: 'Password: ', echo: false }], (answers: string[] | Error) => {
      if (this.done) return;
      // The client moved on to another method (RFC 4256 abort) or went away.
      if (answers instanceof Error || !Array.isArray(answers)) return;
      if (answers.length !== 1 || typeof answers[0] !== 'string') {
        this.settle(ctx, this.broker.failure(user, 'keyboard-interactive', 'wrong number of answers').then((disconnect) => ({ success: false, disconnect })));
        return;
      }
      this.settle(ctx, this.broker.password(user, answers[0].slice(0, 1024), 'keyboard-interactive'));
    });
  }

  private settle(ctx: AuthContext, answer: Promise<{ success: boolean; grant?: AuthGrant; disconnect: boolean }>): void {
    answer.then((a) => {
      if (this.done) return;
      if (a.success && a.grant) {
        this.done = true;
        this.grant = a.grant;
        ctx.accept();
        return;
      }
      ctx.reject(METHODS);
      if (a.disconnect) {
        this.done = true;
        this.onTooManyFailures();
      }
    }, (err: unknown) => this.internalError(ctx, err));
  }

  private internalError(ctx: AuthContext, err: unknown): void {
    this.log.error({ event: 'ssh.auth_error', err: errorMessage(err) }, 'authentication request to the broker failed');
    if (!this.done) ctx.reject(METHODS);
  }
}
