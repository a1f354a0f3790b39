import type { Connection } from 'ssh2';

/**
 * The key exchange objects ssh2 1.17 makes for one connection, as it makes
 * them: ssh2 assigns a new one to its protocol's `_kex` in handleKexInit,
 * holding both KEXINIT payloads, before the next packet is read; rekeys go
 * the same way. ssh2 exports no hook for this, so the property becomes an
 * accessor whose setter calls every watcher with each such object. Used by
 * kex-guess.ts (RFC 4253 guessed packets) and kex-x25519.ts (a cheaper
 * X25519). Install synchronously from the server's 'connection' event,
 * before the peer's KEXINIT is parsed.
 */
export interface KeyExchangeLike {
  /** The KEXINIT payload we sent (message byte, cookie, name-lists, flag, reserved). */
  _kexinit?: Buffer;
  /** The peer's KEXINIT payload, same layout. */
  _remoteKexinit?: Buffer;
  /** ssh2's family of the chosen method: '25519', 'ecdh', 'group', 'groupex'. */
  type?: string;
}

export interface ProtocolInternals {
  _server: boolean;
  _kex: KeyExchangeLike | undefined;
  _skipNextInboundPacket: boolean;
}

const WATCHERS = Symbol('vesh.kexWatchers');

type Watched = ProtocolInternals & { [WATCHERS]?: Array<(kex: KeyExchangeLike, proto: ProtocolInternals) => void> };

export function watchKeyExchanges(conn: Connection, onKex: (kex: KeyExchangeLike, proto: ProtocolInternals) => void): void {
  const proto = (conn as unknown as { _protocol: Watched })._protocol;
  const existing = proto[WATCHERS];
  if (existing) {
    existing.push(onKex);
    return;
  }
  const watchers = [onKex];
  proto[WATCHERS] = watchers;
  let current = proto._kex;
  Object.defineProperty(proto, '_kex', {
    configurable: true,
    enumerable: true,
    get: () => current,
    set: (kex: KeyExchangeLike | undefined) => {
      current = kex;
      // ssh2 makes a key exchange object only in handleKexInit, holding both
      // KEXINITs; anything else it assigns here (undefined) carries neither.
      if (kex?._kexinit && kex._remoteKexinit) for (const w of watchers) w(kex, proto);
    },
  });
}
