import { describe, expect, it } from 'vitest';
import { compileSourcePatterns, isArgon2Phc, parseAccounts, parseAuthorizedKeyLine } from '../../src/config/accounts.js';
import { isVeshError } from '../../src/errors.js';
import { sourceAllowed } from '../../src/auth/source-match.js';
import { generateKeyPair } from '../../src/ssh/keygen.js';

const ed = generateKeyPair('ed25519', { comment: 'alice@laptop' }).public;
const ecdsa = generateKeyPair('ecdsa', { bits: 384 }).public;
const edBlob = Buffer.from(ed.split(' ')[1]!, 'base64');
/** A PHC string of the shape node-argon2 writes (m,p,t) and one in the spec's order. */
const HASH = '$argon2id$v=19$m=65536,p=4,t=3$3++FYTFh+cXYxHfdfquBdg$V0aFPC1DsbQSwsLsxd94iYJxt3dZGiNXitfwuGNx8og';
const HASH_MTP = '$argon2id$v=19$m=65536,t=3,p=4$3++FYTFh+cXYxHfdfquBdg$V0aFPC1DsbQSwsLsxd94iYJxt3dZGiNXitfwuGNx8og';

/** The problems of an invalid file, as "line: message". */
function problemsOf(text: string): string[] {
  try {
    parseAccounts('/etc/vesh/accounts.yaml', text);
  } catch (err) {
    if (!isVeshError(err)) throw err;
    expect(err.code).toBe('VESH_ACCOUNTS_INVALID');
    return (err.details!.problems as Array<{ line: number; path: string; message: string }>).map((p) => `${p.line}: ${p.path ? `${p.path}: ` : ''}${p.message}`);
  }
  throw new Error('expected the file to be invalid');
}

describe('accounts.yaml', () => {
  it('applies defaults: VE = account name, user root, unlocked, forwarding on', () => {
    const accounts = parseAccounts('a.yaml', `alice:\n  password: "${HASH}"\n  keys:\n    - ${ed}\nbob:\n  ve: shared\n  user: www\n  locked: true\n  forwarding: false\n  limits: { memory: 1G, pids: 64 }\n`);
    const alice = accounts.get('alice')!;
    expect(alice).toMatchObject({ name: 'alice', ve: 'alice', user: 'root', locked: false, forwarding: true, password: HASH });
    expect(alice.keys).toHaveLength(1);
    expect(alice.keys[0]!.blob.equals(edBlob)).toBe(true);
    expect(accounts.get('bob')).toMatchObject({ ve: 'shared', user: 'www', locked: true, forwarding: false, limits: { memory: 1024 ** 3, pids: 64 }, keys: [] });
    expect(accounts.get('bob')!.password).toBeUndefined();
  });

  it('reads an empty file, or one of comments only, as no accounts', () => {
    expect(parseAccounts('a.yaml', '').size).toBe(0);
    expect(parseAccounts('a.yaml', '# nobody yet\n\n# really\n').size).toBe(0);
  });

  it('takes an empty entry as an account with no way in, and an empty keys list', () => {
    const accounts = parseAccounts('a.yaml', 'bob:\ncarol:\n  keys:\n');
    expect(accounts.get('bob')).toMatchObject({ ve: 'bob', keys: [] });
    expect(accounts.get('carol')!.keys).toEqual([]);
  });

  it('names file and line of each problem', () => {
    const text = [
      '# accounts',          // 1
      'alice:',              // 2
      '  password: hunter2', // 3
      '  keys:',             // 4
      `    - ${ed}`,         // 5
      '    - ssh-ed25519 AAAA-not-base64', // 6
      'bob:',                // 7
      '  pasword: x',        // 8
      'Carol:',              // 9
      '  ve: x',             // 10
      'dave_1:',             // 11
      '  ve: ok',            // 12
      '  limits: { memory: 12XB }', // 13
      'e_f: {}',             // 14
    ].join('\n');
    const problems = problemsOf(text);
    expect(problems).toEqual(expect.arrayContaining([
      expect.stringMatching(/^3: alice\.password: password must be an argon2 hash/),
      expect.stringMatching(/^6: alice\.keys\.1: bad key: ssh-ed25519: the key data is not base64/),
      expect.stringMatching(/^8: bob\.pasword: unknown setting "pasword"/),
      expect.stringMatching(/^9: Carol: account names must be SSH user names/),
      expect.stringMatching(/^13: dave_1\.limits\.memory: invalid memory limit "12XB"/),
      expect.stringMatching(/^14: e_f: "e_f" is not a valid VE name/),
    ]));
    // The plaintext a confused admin put in the password field is not echoed back.
    expect(problems.join('\n')).not.toContain('hunter2');
  });

  it('formats the error message as file:line: path: message', () => {
    expect(() => parseAccounts('/etc/vesh/accounts.yaml', 'alice:\n  locked: maybe\n')).toThrow(/^\/etc\/vesh\/accounts\.yaml:2: alice\.locked: /);
  });

  it('reports YAML syntax errors and duplicate accounts with their line', () => {
    expect(problemsOf('alice:\n  ve: x\n  keys: [this is: not valid\n')[0]).toMatch(/^[34]: YAML syntax/);
    expect(problemsOf('alice:\n  ve: x\n  ve: y\n')[0]).toMatch(/^3: YAML syntax: Map keys must be unique/);
    expect(problemsOf('alice: {}\nbob: {}\nalice: {}\n')[0]).toMatch(/^3: YAML syntax: Map keys must be unique/);
  });

  it('rejects a list or a scalar at the top', () => {
    expect(problemsOf('- alice\n')[0]).toMatch(/^1: .*expected record/i);
  });

  it('accepts argon2 PHC strings in either parameter order, and only those', () => {
    expect(isArgon2Phc(HASH)).toBe(true);
    expect(isArgon2Phc(HASH_MTP)).toBe(true);
    expect(isArgon2Phc(HASH.replace('argon2id', 'argon2i'))).toBe(true);
    expect(isArgon2Phc(HASH.replace('$v=19', ''))).toBe(true);
    expect(isArgon2Phc(HASH.replace('argon2id', 'scrypt'))).toBe(false);
    expect(isArgon2Phc(HASH.replace(',t=3', ''))).toBe(false);
    expect(isArgon2Phc('$6$salt$crypt')).toBe(false);
    expect(isArgon2Phc('password')).toBe(false);
  });
});

describe('authorized_keys lines', () => {
  it('reads type, blob, comment and fingerprint', () => {
    const k = parseAuthorizedKeyLine(`${ed} and more words`);
    expect(k.algo).toBe('ssh-ed25519');
    expect(k.comment).toBe('alice@laptop and more words');
    expect(k.fingerprint).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
    expect(k.options).toEqual({ noPty: false, noPortForwarding: false, certAuthority: false });
    expect(k.sources).toBeUndefined();
    expect(parseAuthorizedKeyLine(ecdsa).algo).toBe('ecdsa-sha2-nistp384');
  });

  it('reads options with quoted values and escaped quotes', () => {
    const k = parseAuthorizedKeyLine(`no-pty,command="echo \\"hi, there\\"",from="10.0.0.0/8,!10.1.2.3,*.example.com" ${ed}`);
    expect(k.options).toEqual({ noPty: true, noPortForwarding: false, certAuthority: false, command: 'echo "hi, there"', from: ['10.0.0.0/8', '!10.1.2.3', '*.example.com'] });
    expect(k.sources).toHaveLength(3);
    expect(k.comment).toBe('alice@laptop');
  });

  it('reads restrict as no-pty + no-port-forwarding, undone by pty / port-forwarding after it', () => {
    expect(parseAuthorizedKeyLine(`restrict ${ed}`).options).toMatchObject({ noPty: true, noPortForwarding: true });
    expect(parseAuthorizedKeyLine(`restrict,pty ${ed}`).options).toMatchObject({ noPty: false, noPortForwarding: true });
    expect(parseAuthorizedKeyLine(`restrict,port-forwarding ${ed}`).options).toMatchObject({ noPty: true, noPortForwarding: false });
    expect(parseAuthorizedKeyLine(`pty,restrict ${ed}`).options).toMatchObject({ noPty: true, noPortForwarding: true });
    expect(parseAuthorizedKeyLine(`NO-PORT-FORWARDING,no-agent-forwarding,no-X11-forwarding ${ed}`).options).toMatchObject({ noPty: false, noPortForwarding: true });
  });

  it('refuses options that would grant more if ignored, and unknown ones', () => {
    expect(() => parseAuthorizedKeyLine(`environment="A=b" ${ed}`)).toThrow(/option environment is not supported/);
    expect(() => parseAuthorizedKeyLine(`tunnel="0" ${ed}`)).toThrow(/option tunnel is not supported/);
    expect(() => parseAuthorizedKeyLine(`frobnicate ${ed}`)).toThrow(/unknown option "frobnicate"/);
    expect(() => parseAuthorizedKeyLine(`command=ls ${ed}`)).toThrow(/double-quoted value/);
    expect(() => parseAuthorizedKeyLine(`command="ls ${ed}`)).toThrow(/missing closing double quote/);
    expect(() => parseAuthorizedKeyLine(`command="a",command="b" ${ed}`)).toThrow(/command= given twice/);
    expect(() => parseAuthorizedKeyLine(`no-pty="x" ${ed}`)).toThrow(/takes no value/);
    expect(() => parseAuthorizedKeyLine('no-pty')).toThrow(/not followed by a key/);
    expect(() => parseAuthorizedKeyLine(`from="10.0.0.0/33" ${ed}`)).toThrow(/prefix length must be 0-32/);
    expect(() => parseAuthorizedKeyLine(`from="" ${ed}`)).toThrow(/empty from= pattern/);
  });

  it('refuses key types we do not take, with the reason', () => {
    const blob = ed.split(' ')[1];
    expect(() => parseAuthorizedKeyLine(`ssh-dss ${blob}`)).toThrow(/DSA keys/);
    expect(() => parseAuthorizedKeyLine(`sk-ssh-ed25519@openssh.com ${blob}`)).toThrow(/security-key/);
    expect(() => parseAuthorizedKeyLine(`ssh-ed25519-cert-v01@openssh.com ${blob}`)).toThrow(/a certificate .* is not an authorized key: list its CA's public key with cert-authority/);
    expect(() => parseAuthorizedKeyLine(`ssh-rsa ${blob}`)).toThrow(/the line says ssh-rsa but the key data is "ssh-ed25519"/);
    expect(() => parseAuthorizedKeyLine('ssh-ed25519')).toThrow(/base64 key data is missing/);
    expect(() => parseAuthorizedKeyLine(`ssh-ed25519 ${Buffer.from('garbage').toString('base64')}`)).toThrow(/not an SSH public key/);
    expect(() => parseAuthorizedKeyLine('-----BEGIN OPENSSH PRIVATE KEY-----')).toThrow(/private key/);
    expect(() => parseAuthorizedKeyLine('   ')).toThrow(/empty key line/);
  });

  it('refuses RSA keys shorter than 1024 bits', () => {
    // ssh2 cannot make one that small; build the blob by hand (e=65537, n of 512 bits).
    const str = (b: Buffer) => Buffer.concat([Buffer.from([0, 0, 0, b.length].map((x, i) => (i === 3 ? b.length & 0xff : x))), b]);
    const n = Buffer.concat([Buffer.from([0x00, 0xc1]), Buffer.alloc(63, 0x35)]);
    const blob = Buffer.concat([str(Buffer.from('ssh-rsa')), str(Buffer.from([1, 0, 1])), str(n)]);
    expect(() => parseAuthorizedKeyLine(`ssh-rsa ${blob.toString('base64')}`)).toThrow(/too short/);
  });
});

describe('from= patterns', () => {
  const allowed = (list: string, source: string) => sourceAllowed(compileSourcePatterns(list.split(',')), source);

  it('matches addresses, wildcards and CIDR blocks', () => {
    expect(allowed('192.0.2.7', '192.0.2.7')).toBe(true);
    expect(allowed('192.0.2.7', '192.0.2.70')).toBe(false);
    expect(allowed('192.0.2.*', '192.0.2.70')).toBe(true);
    expect(allowed('192.0.2.?', '192.0.2.7')).toBe(true);
    expect(allowed('192.0.2.?', '192.0.2.70')).toBe(false);
    expect(allowed('10.0.0.0/8', '10.200.3.4')).toBe(true);
    expect(allowed('10.0.0.0/8', '11.0.0.1')).toBe(false);
    expect(allowed('0.0.0.0/0', '203.0.113.9')).toBe(true);
    expect(allowed('2001:db8::/32', '2001:DB8:1::5')).toBe(true);
    expect(allowed('2001:db8::/32', '10.0.0.1')).toBe(false);
    expect(allowed('10.0.0.0/8', '2001:db8::1')).toBe(false);
  });

  it('sees IPv4-mapped IPv6 sources as IPv4', () => {
    expect(allowed('10.0.0.0/8', '::ffff:10.1.1.1')).toBe(true);
    expect(allowed('127.0.0.1', '::ffff:127.0.0.1')).toBe(true);
  });

  it('lets a matching negation refuse, whatever else matches, in any order', () => {
    expect(allowed('10.0.0.0/8,!10.1.2.3', '10.1.2.3')).toBe(false);
    expect(allowed('!10.1.2.3,10.0.0.0/8', '10.1.2.3')).toBe(false);
    expect(allowed('10.0.0.0/8,!10.1.2.3', '10.1.2.4')).toBe(true);
    expect(allowed('!10.1.0.0/16,*', '10.1.9.9')).toBe(false);
    expect(allowed('!10.1.0.0/16,*', '10.2.9.9')).toBe(true);
    // Only negations: nothing is let in (OpenSSH too).
    expect(allowed('!10.1.2.3', '192.0.2.1')).toBe(false);
  });

  it('never matches host names: only the address is known', () => {
    expect(allowed('*.example.com', '192.0.2.1')).toBe(false);
  });

  it('lets every source in when a key has no from=', () => {
    expect(sourceAllowed(undefined, '192.0.2.1')).toBe(true);
  });

  it('rejects patterns that cannot be addresses', () => {
    expect(() => compileSourcePatterns(['foo bar'])).toThrow(/may only hold/);
    expect(() => compileSourcePatterns(['example.com/24'])).toThrow(/is not an IP address/);
    expect(() => compileSourcePatterns(['!'])).toThrow(/empty from= pattern/);
  });
});

describe('account names', () => {
  it('refuses "__proto__", which a JavaScript object would swallow', () => {
    expect(problemsOf('__proto__:\n  ve: x\n')[0]).toMatch(/^1: __proto__: the name "__proto__" is reserved/);
  });
});
