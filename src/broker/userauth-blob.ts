/**
 * The data a client signs for publickey authentication (RFC 4252 7):
 *
 *   string    session identifier
 *   byte      SSH_MSG_USERAUTH_REQUEST (50)
 *   string    user name
 *   string    service name
 *   string    "publickey"
 *   boolean   TRUE
 *   string    public key algorithm name
 *   string    public key blob
 *
 * The worker hands us this blob with the signature. We verify the signature
 * ourselves, and only over a blob that names the session id we signed for
 * this connection, the user and key the worker says are logging in, and
 * nothing after them: so a signature a worker saw on one connection cannot
 * log in another, and a worker cannot log a key into an account the client
 * did not ask for.
 */
export interface UserauthBlob {
  sessionId: Buffer;
  user: string;
  service: string;
  algo: string;
  key: Buffer;
}

const USERAUTH_REQUEST = 50;

export function parseUserauthBlob(blob: Buffer): UserauthBlob | null {
  let pos = 0;
  const str = (): Buffer | null => {
    if (pos + 4 > blob.length) return null;
    const len = blob.readUInt32BE(pos);
    pos += 4;
    if (len > blob.length - pos) return null;
    const out = blob.subarray(pos, pos + len);
    pos += len;
    return out;
  };
  const sessionId = str();
  if (!sessionId || pos >= blob.length || blob[pos++] !== USERAUTH_REQUEST) return null;
  const user = str();
  const service = str();
  const method = str();
  if (!user || !service || !method || method.toString('latin1') !== 'publickey') return null;
  if (pos >= blob.length || blob[pos++] !== 1) return null;
  const algo = str();
  const key = str();
  if (!algo || !key || pos !== blob.length) return null;
  return { sessionId, user: user.toString('utf8'), service: service.toString('latin1'), algo: algo.toString('latin1'), key };
}
