import type { Algorithms } from 'ssh2';

/**
 * The transport algorithms we offer. Everything left out is left out on
 * purpose (see design.md, "Known library and platform pitfalls"):
 *
 * - Key exchange: curve25519 and nistp256 ECDH only. ssh2's server has no
 *   group exchange, and the fixed big DH groups cost a synchronous bignum
 *   operation on the event loop per handshake — a cheap way to stall every
 *   other user.
 * - Compression: none. ssh2's inflate has no output cap, so "zlib" before
 *   authentication lets anyone make us allocate without bound, and
 *   "zlib@openssh.com" lets any account do the same after login.
 * - Ciphers and MACs: AEAD ciphers first, then CTR with encrypt-then-MAC
 *   SHA-2; no CBC, no SHA-1.
 */
export const SERVER_ALGORITHMS: Algorithms = {
  kex: ['curve25519-sha256', 'curve25519-sha256@libssh.org', 'ecdh-sha2-nistp256'],
  cipher: ['aes128-gcm@openssh.com', 'aes256-gcm@openssh.com', 'chacha20-poly1305@openssh.com', 'aes128-ctr', 'aes256-ctr'],
  hmac: ['hmac-sha2-256-etm@openssh.com', 'hmac-sha2-512-etm@openssh.com', 'hmac-sha2-256', 'hmac-sha2-512'],
  compress: ['none'],
  serverHostKey: ['ssh-ed25519', 'rsa-sha2-512', 'rsa-sha2-256'],
};
