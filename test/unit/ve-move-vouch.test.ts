import { describe, expect, it } from 'vitest';
import { VOUCH_PREFIX, decodeVouch, encodeVouch, type MoveVouch } from '../../src/broker/node-vouch.js';
import { maxBackupBytes, parseMoveCommand } from '../../src/broker/ve-receive.js';

/** Move vouches (vesh ve move) beside login vouches, and the two commands a move connection may run. */

const name = (v: unknown): string => VOUCH_PREFIX + Buffer.from(JSON.stringify(v)).toString('base64url');
const move: MoveVouch = { v: 1, purpose: 'move', from: 'na', to: 'nb', ve: 'alice', at: 1 };
const login = {
  v: 1, from: 'na', to: 'nb', account: 'alice', source: '10.0.0.9', port: 5000, at: 1, method: 'password', key: null,
};

describe('move vouches', () => {
  it('a move vouch decodes with its VE; a login vouch without a purpose (as written before moves) still decodes as a login', () => {
    expect(decodeVouch(encodeVouch(move, 4096)!)).toEqual({ ok: true, vouch: move });
    expect(decodeVouch(name(login))).toEqual({ ok: true, vouch: login });
    expect(decodeVouch(name({ ...login, purpose: 'login' }))).toMatchObject({ ok: true, vouch: { account: 'alice', purpose: 'login' } });
  });

  it('a move vouch carries nothing else: no account, key or source smuggled in, a VE name that is one, no other purpose', () => {
    expect(decodeVouch(name({ ...move, account: 'root' }))).toMatchObject({ ok: false });
    expect(decodeVouch(name({ ...move, key: null }))).toMatchObject({ ok: false });
    expect(decodeVouch(name({ ...move, ve: '../etc' }))).toMatchObject({ ok: false });
    expect(decodeVouch(name({ ...move, ve: undefined }))).toMatchObject({ ok: false });
    expect(decodeVouch(name({ ...login, purpose: 'admin' }))).toMatchObject({ ok: false });
    // A login vouch cannot name a VE (it would be a move without the move's checks).
    expect(decodeVouch(name({ ...login, ve: 'alice' }))).toMatchObject({ ok: false });
  });
});

describe('a move connection\'s commands', () => {
  const disk = 256 * 1024 * 1024;
  it('takes exactly vesh-receive-ve BYTES DISK and vesh-discard-ve for its own VE', () => {
    expect(parseMoveCommand(move, { kind: 'exec', command: `vesh-receive-ve 1000 ${disk}` })).toEqual({ kind: 'receive', bytes: 1000, disk });
    expect(parseMoveCommand(move, { kind: 'exec', command: 'vesh-discard-ve alice' })).toEqual({ kind: 'discard', ve: 'alice' });
  });

  it('refuses anything else: shells, subsystems, terminals, other commands and VEs, padded or chained forms, sizes over the cap', () => {
    const refused = (r: { kind: string; command?: string; pty?: unknown }) => expect(parseMoveCommand(move, r)).toHaveProperty('refusal');
    refused({ kind: 'shell' });
    refused({ kind: 'subsystem' });
    refused({ kind: 'exec', command: `vesh-receive-ve 1000 ${disk}`, pty: { term: 'xterm' } });
    refused({ kind: 'exec', command: 'vesh-discard-ve bob' });
    refused({ kind: 'exec', command: `vesh-receive-ve 1000 ${disk}; rm -rf /` });
    refused({ kind: 'exec', command: `vesh-receive-ve 1000 ${disk}\n` });
    refused({ kind: 'exec', command: ` vesh-receive-ve 1000 ${disk}` });
    refused({ kind: 'exec', command: `vesh-receive-ve 01000 ${disk}` });
    refused({ kind: 'exec', command: `vesh-receive-ve -1 ${disk}` });
    refused({ kind: 'exec', command: 'vesh-receive-ve 99999999999999999 1' });
    refused({ kind: 'exec', command: `vesh-receive-ve ${maxBackupBytes(disk) + 1} ${disk}` });
    refused({ kind: 'exec', command: 'sh -c id' });
  });
});
