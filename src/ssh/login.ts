import type { Logger } from '../audit/logger.js';
import { errorMessage, isVeshError } from '../errors.js';
import type { VeAccess, VeUserInfo } from '../ve/access.js';
import type { SshAccount } from './ports.js';

/** Where an authenticated connection's sessions run: a running VE and a user in it. */
export interface LoginContext {
  account: SshAccount;
  user: VeUserInfo;
  connection: { clientIp: string; clientPort: number; serverIp: string; serverPort: number };
}

/**
 * Make the account's VE ready for this connection: create it on first login,
 * start it when stopped (concurrent logins share one start — VeAccess sees
 * to that), then read the user from the VE's own passwd. The first session
 * channel waits on this; it is started at authentication so the VE boots
 * while the client is still opening its channel.
 *
 * A failure is logged here once, with the reason, for the admin; the
 * VeshError's userMessage is what the user is shown.
 */
export async function prepareLogin(
  ves: VeAccess,
  account: SshAccount,
  connection: LoginContext['connection'],
  log: Logger,
): Promise<LoginContext> {
  const started = Date.now();
  try {
    await ves.ensureRunning(account.ve, { limits: account.limits, reason: `login of ${account.name}` });
    const user = await ves.lookupUser(account.ve, account.user);
    log.debug({ event: 'ssh.login_ready', ms: Date.now() - started });
    return { account, user, connection };
  } catch (err) {
    log.error({ event: 'ssh.login_ve_failed', ve: account.ve, code: isVeshError(err) ? err.code : undefined, err: errorMessage(err), ms: Date.now() - started }, `VE "${account.ve}" could not be made ready for ${account.name}`);
    throw err;
  }
}
