import ssh2 from 'ssh2';
import { describe, expect, it } from 'vitest';
import { acceptClientEnv, sanitizeTerm, sessionEnvironment } from '../../src/ssh/environment.js';
import { KILL_RELAY_SIGNAL, exitReport, relaySignal } from '../../src/ssh/exit-status.js';
import { listenHostFor, parseFromHelper, parseToHelper } from '../../src/ssh/forward-protocol.js';
import { clampPtySize } from '../../src/ssh/limits.js';
import { LineSplitter, parseSftpLogLine, unvis } from '../../src/ssh/sftp-log.js';
import { sshFingerprint } from '../../src/ssh/host-keys.js';
import { generateKeyPair } from '../../src/ssh/keygen.js';

describe('sftp-server log lines → audit events', () => {
  it('recognises the file-changing operations', () => {
    expect(parseSftpLogLine('open "/root/b.txt" flags WRITE,CREATE,TRUNCATE mode 0644')).toEqual({ op: 'write', path: '/root/b.txt', flags: 'WRITE,CREATE,TRUNCATE' });
    expect(parseSftpLogLine('open "/root/a.txt" flags READ mode 0666')).toBeNull();
    expect(parseSftpLogLine('close "/root/b.txt" bytes read 0 written 3')).toEqual({ op: 'close', path: '/root/b.txt', bytesRead: 0, bytesWritten: 3 });
    expect(parseSftpLogLine('close "/root/a.txt" bytes read 3 written 0')).toBeNull();
    expect(parseSftpLogLine('posix-rename old "/root/b.txt" new "/root/c.txt"')).toEqual({ op: 'rename', from: '/root/b.txt', to: '/root/c.txt' });
    expect(parseSftpLogLine('rename old "/a" new "/b"')).toEqual({ op: 'rename', from: '/a', to: '/b' });
    expect(parseSftpLogLine('remove name "/root/c.txt"')).toEqual({ op: 'remove', path: '/root/c.txt' });
    expect(parseSftpLogLine('rmdir name "/root/d"')).toEqual({ op: 'rmdir', path: '/root/d' });
    expect(parseSftpLogLine('mkdir name "/root/d" mode 0777')).toEqual({ op: 'mkdir', path: '/root/d' });
    expect(parseSftpLogLine('symlink old "a.txt" new "/root/l"')).toEqual({ op: 'symlink', target: 'a.txt', path: '/root/l' });
    expect(parseSftpLogLine('set "/root/a.txt" mode 0600')).toEqual({ op: 'setstat', path: '/root/a.txt', change: 'mode 0600' });
    expect(parseSftpLogLine('session opened for local user root from [127.0.0.1]')).toBeNull();
  });

  it('undoes strnvis so a file name with a newline cannot forge a second event', () => {
    expect(unvis('a\\012remove name "/etc/passwd"')).toBe('a\nremove name "/etc/passwd"');
    expect(unvis('back\\\\slash')).toBe('back\\slash');
    expect(unvis('caf\\303\\251')).toBe('café');
    expect(parseSftpLogLine('remove name "/root/x\\012remove name \\"/etc\\""')).toEqual({ op: 'remove', path: '/root/x\nremove name \\"/etc\\"' });
  });

  it('takes the last separator as the end of a name, as the greedy patterns did, and refuses malformed tails', () => {
    // A name may hold `" new "` itself (strnvis leaves quotes alone); what sftp-server appends comes last.
    expect(parseSftpLogLine('rename old "/a" new "b" new "/c"')).toEqual({ op: 'rename', from: '/a" new "b', to: '/c' });
    expect(parseSftpLogLine('open "/x" flags WRITE mode 1" flags READ mode 0666')).toBeNull();
    expect(parseSftpLogLine('open "/x" flags READ mode 1" flags WRITE mode 0666')).toEqual({ op: 'write', path: '/x" flags READ mode 1', flags: 'WRITE' });
    expect(parseSftpLogLine('rename old "/a" new "/b')).toBeNull();
    expect(parseSftpLogLine('open "/x" flags WRITE mode 06x6')).toBeNull();
    expect(parseSftpLogLine('close "/x" bytes read 1 written')).toBeNull();
    expect(parseSftpLogLine('mkdir name "/d" mode ')).toBeNull();
    expect(parseSftpLogLine('rename')).toBeNull();
    expect(parseSftpLogLine('error: process_write: write failed')).toEqual({ op: 'error', message: 'error: process_write: write failed' });
    expect(parseSftpLogLine('hardlink old "/a" new "/b"\r')).toEqual({ op: 'link', target: '/a', path: '/b' });
  });

  it('parses crafted lines in time linear in their length (review M3: a greedy regex was quadratic)', () => {
    // The crafted shapes of the review: many separators and quotes, 8 KiB and 8x that.
    const crafted = (n: number) => [
      `rename old "${'" new "'.repeat(n)}"`,
      `rename old "${'" new "'.repeat(n)}x`,
      `open "${'" flags '.repeat(n)}x`,
      `set "${'" '.repeat(n * 3)}`,
      `close "${'" bytes read '.repeat(n)}1 written`,
    ];
    const timeFor = (lines: string[], reps: number): number => {
      const t0 = process.hrtime.bigint();
      for (let r = 0; r < reps; r++) for (const l of lines) parseSftpLogLine(l);
      return Number(process.hrtime.bigint() - t0);
    };
    const small = crafted(1150);
    const large = crafted(1150 * 8);
    expect(small[0]!.length).toBeGreaterThan(8000);
    timeFor(small, 20);
    timeFor(large, 5);
    // The best of several runs, so a busy machine does not decide it.
    let ratio = Infinity;
    for (let i = 0; i < 5; i++) ratio = Math.min(ratio, timeFor(large, 20) / timeFor(small, 20));
    // Linear: about 8 times the work for 8 times the length; quadratic would be about 64.
    expect(ratio).toBeLessThan(24);
  });

  it('splits lines across chunks, including a split multi-byte character', () => {
    const lines: string[] = [];
    const s = new LineSplitter((l) => lines.push(l));
    const bytes = Buffer.from('one\ncafé\nthr');
    s.push(bytes.subarray(0, 8));
    s.push(bytes.subarray(8));
    s.push('ee');
    s.end();
    expect(lines).toEqual(['one', 'café', 'three']);
  });
});

describe('exit status vs exit signal', () => {
  it('passes plain exit codes through', () => {
    expect(exitReport(0, null)).toEqual({ kind: 'status', code: 0 });
    expect(exitReport(3, null)).toEqual({ kind: 'status', code: 3 });
    expect(exitReport(127, null)).toEqual({ kind: 'status', code: 127 });
    expect(exitReport(128, null)).toEqual({ kind: 'status', code: 128 });
  });
  it("reads runc's 128+N as death by signal N", () => {
    expect(exitReport(137, null)).toEqual({ kind: 'signal', signal: 'KILL' });
    expect(exitReport(143, null)).toEqual({ kind: 'signal', signal: 'TERM' });
    expect(exitReport(129, null)).toEqual({ kind: 'signal', signal: 'HUP' });
    expect(exitReport(139, null)).toEqual({ kind: 'signal', signal: 'SEGV' });
    // 128+SIGCHLD is not a death signal: stays a status.
    expect(exitReport(145, null)).toEqual({ kind: 'status', code: 145 });
    expect(exitReport(255, null)).toEqual({ kind: 'status', code: 255 });
  });
  it('takes an exact relay at its word: a code is a code, a signal a signal', () => {
    expect(exitReport(130, null, 'exact')).toEqual({ kind: 'status', code: 130 });
    expect(exitReport(137, null, 'exact')).toEqual({ kind: 'status', code: 137 });
    expect(exitReport(null, 'SIGINT', 'exact')).toEqual({ kind: 'signal', signal: 'INT' });
    expect(exitReport(0, 11, 'exact')).toEqual({ kind: 'signal', signal: 'SEGV' });
  });
  it('reads the kill-relay signal as SIGKILL, from either relay', () => {
    expect(relaySignal('SIGKILL')).toBe(KILL_RELAY_SIGNAL);
    expect(relaySignal('SIGTERM')).toBe('SIGTERM');
    expect(exitReport(128 + KILL_RELAY_SIGNAL, null)).toEqual({ kind: 'signal', signal: 'KILL' });
    expect(exitReport(null, KILL_RELAY_SIGNAL, 'exact')).toEqual({ kind: 'signal', signal: 'KILL' });
  });
  it('reports a signal that killed the relay itself', () => {
    expect(exitReport(null, 'SIGKILL')).toEqual({ kind: 'signal', signal: 'KILL' });
    expect(exitReport(0, 9)).toEqual({ kind: 'signal', signal: 'KILL' });
  });
});

describe('terminal sizes', () => {
  it('clamps absurd sizes and never yields 0', () => {
    expect(clampPtySize(80, 24)).toEqual({ cols: 80, rows: 24, clamped: false });
    expect(clampPtySize(0, 0)).toEqual({ cols: 80, rows: 24, clamped: true });
    expect(clampPtySize(100000, 4294967295)).toEqual({ cols: 1000, rows: 1000, clamped: true });
    expect(clampPtySize(NaN, -5)).toEqual({ cols: 80, rows: 24, clamped: true });
  });
});

describe('session environment', () => {
  const user = { name: 'root', uid: 0, gid: 0, groups: [0], home: '/root', shell: '/bin/bash' };
  const connection = { clientIp: '10.0.0.1', clientPort: 5555, serverIp: '10.0.0.2', serverPort: 2222 };
  it('accepts TERM, LANG and LC_* only, without control characters', () => {
    expect(acceptClientEnv('LANG', 'en_US.UTF-8')).toBe(true);
    expect(acceptClientEnv('LC_ALL', 'C')).toBe(true);
    expect(acceptClientEnv('TERM', 'xterm')).toBe(true);
    expect(acceptClientEnv('LD_PRELOAD', '/x.so')).toBe(false);
    expect(acceptClientEnv('PATH', '/evil')).toBe(false);
    expect(acceptClientEnv('LANG', 'a\nb')).toBe(false);
    expect(acceptClientEnv('LC_X', 'x'.repeat(5000))).toBe(false);
  });
  it('takes HOME/USER/SHELL from the VE user and lets login values win over client ones', () => {
    const env = sessionEnvironment({ user, clientEnv: new Map([['LANG', 'C.UTF-8']]), term: 'xterm-256color', connection });
    expect(env).toMatchObject({ HOME: '/root', USER: 'root', LOGNAME: 'root', SHELL: '/bin/bash', LANG: 'C.UTF-8', TERM: 'xterm-256color', SSH_CONNECTION: '10.0.0.1 5555 10.0.0.2 2222' });
    expect(env.PATH).toContain('/usr/sbin');
    expect(sessionEnvironment({ user: { ...user, uid: 1000, name: 'bob' }, clientEnv: new Map(), connection }).PATH).not.toContain('sbin');
  });
  it('sanitizes TERM', () => {
    expect(sanitizeTerm('xterm-256color')).toBe('xterm-256color');
    expect(sanitizeTerm('x;rm -rf /')).toBe('xterm');
    expect(sanitizeTerm(undefined)).toBe('xterm');
  });
});

describe('forward helper messages', () => {
  it('accepts well-formed requests and nothing else', () => {
    expect(parseToHelper({ t: 'connect', id: 1, host: 'localhost', port: 80 })).toEqual({ t: 'connect', id: 1, host: 'localhost', port: 80 });
    expect(parseToHelper({ t: 'listen', id: 2, host: '0.0.0.0', port: 0 })).toEqual({ t: 'listen', id: 2, host: '0.0.0.0', port: 0 });
    expect(parseToHelper({ t: 'connect', id: 1, host: 'localhost', port: 0 })).toBeNull();
    expect(parseToHelper({ t: 'connect', id: 1, host: 'a b', port: 80 })).toBeNull();
    expect(parseToHelper({ t: 'connect', id: -1, host: 'x', port: 80 })).toBeNull();
    expect(parseToHelper({ t: 'exec', id: 1 })).toBeNull();
    expect(parseFromHelper({ t: 'listening', id: 3, port: 8080 })).toEqual({ t: 'listening', id: 3, port: 8080 });
    expect(parseFromHelper({ t: 'listening', id: 3, port: 99999 })).toBeNull();
    expect(parseFromHelper('junk')).toBeNull();
  });
  it('maps client bind addresses to VE addresses', () => {
    expect(listenHostFor('')).toBe('0.0.0.0');
    expect(listenHostFor('*')).toBe('0.0.0.0');
    expect(listenHostFor('localhost')).toBe('127.0.0.1');
    expect(listenHostFor('10.1.2.3')).toBe('10.1.2.3');
  });
});

describe('key generation', () => {
  it('makes only ed25519 pairs that parse back (ssh2 alone loses one in ~256 to a stripped leading zero)', () => {
    for (let i = 0; i < 2000; i++) {
      const pair = generateKeyPair('ed25519');
      expect(ssh2.utils.parseKey(pair.private), pair.private).not.toBeInstanceOf(Error);
      expect(Buffer.from(pair.public.split(' ')[1]!, 'base64').readUInt32BE(15)).toBe(32);
    }
  });
});

describe('fingerprints', () => {
  it("match OpenSSH's SHA256 format", () => {
    // ssh-keygen -lf of this ed25519 public key prints this fingerprint.
    const blob = Buffer.from('AAAAC3NzaC1lZDI1NTE5AAAAIAwafqQHIv7Lzq7IBLXCYT6bQZ04dgb/6hnWw7AOp7TR', 'base64');
    expect(sshFingerprint(blob)).toBe('SHA256:VNK81ppoStr0817IbMODpiTZZOgTtPvGSAHXYHC+2Bk');
  });
});
