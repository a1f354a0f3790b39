import type { Connection } from 'ssh2';
import { watchKeyExchanges } from './kex-watch.js';

/**
 * Corrects how ssh2 1.17 treats a client's guessed key-exchange packet
 * (RFC 4253 §7.1, `first_kex_packet_follows`).
 *
 * A client may send its first key-exchange packet (KEX_ECDH_INIT) right after
 * its KEXINIT, guessing our choices. The guess is right when both sides' first
 * key-exchange algorithm and first host key algorithm are the same; then the
 * packet MUST be used. Otherwise it MUST be silently ignored.
 *
 * ssh2's handleKexInit (lib/protocol/kex.js) overwrites the peer's parsed kex
 * list with the chosen name before it compares (`init.kex = clientList[i]`,
 * and `remote` is the same object), so `remote.kex[0]` is the name's first
 * character and a flagged guess always counts as wrong: ssh2 drops every
 * guessed packet, right or wrong. A client whose guess was right (dropbear's
 * dbclient against our list, which starts with curve25519-sha256 as dropbear's
 * does) then waits for our reply to a packet we threw away, until the login
 * grace timer ends the connection. It also never looks at the host key
 * algorithm, so an ssh2 that fixed only the comparison would use a guess made
 * for another host key type.
 *
 * We decide ourselves, from the two KEXINIT payloads as they went over the
 * wire, at the moment ssh2 makes the key exchange object for them (inside
 * handleKexInit, after its own decision and before the next packet is read),
 * and overwrite ssh2's `_skipNextInboundPacket`. Rekeys go through the same
 * path. Delete this module once ssh2 compares the first kex and host key
 * algorithms of both KEXINITs (check kex.js handleKexInit; the unit test
 * test/unit/kex-guess.test.ts shows a right guess with the wrapper off).
 */

/** Offset of the first name-list in a KEXINIT payload: message number (1) + cookie (16). */
const FIRST_LIST_OFFSET = 17;
/** Name-lists in a KEXINIT, before first_kex_packet_follows. */
const NAME_LIST_COUNT = 10;

export interface KexInitSummary {
  firstKex: string;
  firstHostKey: string;
  firstKexPacketFollows: boolean;
}

/** The parts of a KEXINIT payload that decide a guess; undefined when it is malformed (ssh2 refuses those itself). */
export function summarizeKexInit(payload: Buffer): KexInitSummary | undefined {
  let pos = FIRST_LIST_OFFSET;
  const firsts: string[] = [];
  for (let i = 0; i < NAME_LIST_COUNT; i++) {
    if (pos + 4 > payload.length) return undefined;
    const len = payload.readUInt32BE(pos);
    pos += 4;
    if (pos + len > payload.length) return undefined;
    if (i < 2) {
      const list = payload.toString('latin1', pos, pos + len);
      const comma = list.indexOf(',');
      firsts.push(comma === -1 ? list : list.slice(0, comma));
    }
    pos += len;
  }
  return { firstKex: firsts[0]!, firstHostKey: firsts[1]!, firstKexPacketFollows: pos < payload.length && payload[pos] !== 0 };
}

/**
 * Whether the packet after the peer's KEXINIT must be ignored: the peer said
 * a guessed packet follows and its first kex or host key algorithm is not
 * ours (RFC 4253 §7.1: "server and client have different preferred algorithm").
 */
export function mustIgnoreGuess(local: Buffer, remote: Buffer): boolean {
  const peer = summarizeKexInit(remote);
  if (!peer || !peer.firstKexPacketFollows) return false;
  const ours = summarizeKexInit(local);
  if (!ours) return true;
  return peer.firstKex !== ours.firstKex || peer.firstHostKey !== ours.firstHostKey;
}

/** Installs the correction on one connection; call it synchronously from the server's 'connection' event, before the peer's KEXINIT is parsed. */
export function correctKexGuessHandling(conn: Connection): void {
  watchKeyExchanges(conn, (kex, proto) => {
    proto._skipNextInboundPacket = mustIgnoreGuess(kex._kexinit!, kex._remoteKexinit!);
  });
}
