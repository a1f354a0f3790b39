import type { AuthContext, KeyboardAuthContext, PublicKeyAuthContext } from 'ssh2';
import type { Logger } from '../audit/logger.js';
import { errorMessage } from '../errors.js';
import { sshFingerprint } from './host-keys.js';
import type { SshAccount, SshAuthenticator, SshAuthorizedKey } from './ports.js';

/** Who logged in, and with which key (when it was a key). */
export interface AuthResult {
  account: SshAccount;
  key: SshAuthorizedKey | null;
  method: 'publickey' | 'password' | 'keyboard-interactive';
}

const METHODS: Array<'publickey' | 'password' | 'keyboard-interactive'> = ['publickey', 'password', 'keyboard-interactive'];

/**
 * The authentication phase of one connection: answers ssh2's
 * 'authentication' events, counts failures against MaxAuthTries and tells the
 * authenticator about failures and successes for its per-source penalties.
 *
 * Every attempt is one audit event `ssh.auth` with method, the user name the
 * client sent, the account (when known), the key fingerprint (publickey) and
 * the result. Passwords never reach a log line.
 */
export class ConnectionAuthentication {
  private failures = 0;
  private done = false;
  /** Failures of this connection already held against its source (so closing it is not counted again as "noauth"). */
  recordedFailures = 0;
  result: AuthResult | null = null;

  constructor(
    private readonly authenticator: SshAuthenticator,
    private readonly maxAuthTries: number,
    private readonly source: string,
    private readonly log: Logger,
    /** Called when the client used up MaxAuthTries: the connection must end. */
    private readonly onTooManyFailures: () => void,
  ) {}

  handle(ctx: AuthContext): void {
    if (this.done) {
      ctx.reject();
      return;
    }
    const user = ctx.username.slice(0, 128);
    switch (ctx.method) {
      case 'none':
        // Clients ask "none" first to learn the methods; not an attempt.
        ctx.reject(METHODS);
        return;
      case 'publickey':
        this.publickey(ctx, user);
        return;
      case 'password':
        void this.password(user, ctx.password, 'password').then((ok) => this.finish(ctx, ok)).catch((err) => this.internalError(ctx, user, err));
        return;
      case 'keyboard-interactive':
        this.keyboardInteractive(ctx, user);
        return;
      default:
        // hostbased and anything else: not offered, counted as a failure.
        this.audit('failure', ctx.method, user, {});
        this.countFailure(ctx);
    }
  }

  private publickey(ctx: PublicKeyAuthContext, user: string): void {
    const fingerprint = sshFingerprint(ctx.key.data);
    const found = this.authenticator.findKey(user, ctx.key.algo, ctx.key.data, this.source);
    if (!ctx.signature) {
      // The query phase ("would you take this key?"): answering yes costs
      // nothing, the login happens only with a signature. An unknown key
      // counts against MaxAuthTries as in OpenSSH, but not as a penalty
      // failure: clients routinely offer several keys.
      //
      // Review L9: the answer tells whoever holds a public key whether an
      // account takes it. We keep it, as OpenSSH does: refusing the query
      // (or accepting every key and failing the signature) breaks clients
      // that offer several keys, or turns every offered key into a penalty
      // failure; public keys are public, and the answer gives no access. A
      // connection that only asks still counts as "noauth" when it leaves.
      if (found) {
        this.audit('key-acceptable', 'publickey', user, { account: found.account.name, fingerprint, algo: ctx.key.algo });
        ctx.accept();
      } else {
        this.audit('key-refused', 'publickey', user, { fingerprint, algo: ctx.key.algo });
        this.countFailure(ctx);
      }
      return;
    }
    const ok = !!found && !!ctx.blob && this.authenticator.verifySignature(found.key, ctx.blob, ctx.signature, ctx.hashAlgo);
    if (ok && found) {
      this.audit('success', 'publickey', user, { account: found.account.name, fingerprint, algo: ctx.key.algo });
      this.succeed(ctx, { account: found.account, key: found.key, method: 'publickey' });
    } else {
      this.audit('failure', 'publickey', user, { account: found?.account.name, fingerprint, algo: ctx.key.algo });
      this.holdAgainstSource(user);
      this.countFailure(ctx);
    }
  }

  private keyboardInteractive(ctx: KeyboardAuthContext, user: string): void {
    ctx.prompt([{ prompt: 'Password: ', echo: false }], (answers: string[] | Error) => {
      if (this.done) return;
      if (answers instanceof Error || !Array.isArray(answers)) {
        // The client moved on to another method (RFC 4256 abort) or went away.
        return;
      }
      if (answers.length !== 1 || typeof answers[0] !== 'string') {
        this.audit('failure', 'keyboard-interactive', user, { reason: 'wrong number of answers' });
        this.holdAgainstSource(user);
        this.countFailure(ctx);
        return;
      }
      void this.password(user, answers[0], 'keyboard-interactive').then((ok) => this.finish(ctx, ok)).catch((err) => this.internalError(ctx, user, err));
    });
  }

  /** Check a password; audit it; return the result to apply, or null for failure. */
  private async password(user: string, password: string, method: 'password' | 'keyboard-interactive'): Promise<AuthResult | null> {
    const penalty = this.authenticator.penaltyRemaining(this.source, user);
    if (penalty > 0) {
      // A source under penalty for this account (or as a whole) gets no
      // password checks and costs us no hashing; trying on anyway is a
      // failure too, so the penalty grows instead of running out.
      this.audit('penalized', method, user, { penaltyMs: penalty });
      this.holdAgainstSource(user);
      return null;
    }
    const res = await this.authenticator.verifyPassword(user, password, this.source);
    if (res.ok) {
      this.audit('success', method, user, { account: res.account.name });
      return { account: res.account, key: null, method };
    }
    this.audit('failure', method, user, {});
    this.holdAgainstSource(user);
    return null;
  }

  private finish(ctx: AuthContext, result: AuthResult | null): void {
    if (this.done) return;
    if (result) this.succeed(ctx, result);
    else this.countFailure(ctx);
  }

  private succeed(ctx: AuthContext, result: AuthResult): void {
    this.done = true;
    this.result = result;
    this.authenticator.recordSuccess(this.source, result.account.name);
    ctx.accept();
  }

  /** A failed attempt at `user` counts against this source, for that account and as a whole. */
  private holdAgainstSource(user: string): void {
    this.recordedFailures += 1;
    this.authenticator.recordFailure(this.source, user);
  }

  private countFailure(ctx: AuthContext): void {
    this.failures += 1;
    if (this.failures >= this.maxAuthTries) {
      this.done = true;
      this.log.warn({ event: 'ssh.auth_too_many', source: this.source, failures: this.failures }, 'too many authentication failures: disconnecting');
      ctx.reject(METHODS);
      this.onTooManyFailures();
      return;
    }
    ctx.reject(METHODS);
  }

  /**
   * The check itself failed (argon2 threw, say). It still counts against
   * MaxAuthTries: otherwise a client that can make checks fail would get
   * unlimited attempts on one connection. It is not held against the source
   * (the fault is ours), and the user sees the same refusal as for a wrong
   * password.
   */
  private internalError(ctx: AuthContext, user: string, err: unknown): void {
    this.log.error({ event: 'ssh.auth_error', source: this.source, user, err: errorMessage(err) }, 'authentication check failed inside the server');
    if (!this.done) this.countFailure(ctx);
  }

  private audit(result: string, method: string, user: string, extra: Record<string, unknown>): void {
    this.log.info({ event: 'ssh.auth', method, user, source: this.source, result, ...extra });
  }
}
