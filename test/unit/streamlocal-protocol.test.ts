import { describe, expect, it } from 'vitest';
import { parseAuthorizedKeyLine } from '../../src/config/accounts.js';
import { parseServerConfig } from '../../src/config/server-config.js';
import { isValidSocketPath, parseFromHelper, parseToHelper } from '../../src/ssh/forward-protocol.js';

const ED = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGnMiemYmywhw2hH0oYtJdiV5xQHrO1wI0Ai6NGTnnVG';

describe('Unix-socket and agent forwarding: what crosses between broker and relay', () => {
  it('takes only absolute printable socket paths that fit sun_path: no abstract name, no relative path, no truncation', () => {
    expect(isValidSocketPath('/tmp/x.sock')).toBe(true);
    expect(isValidSocketPath(`/${'a'.repeat(106)}`)).toBe(true);
    expect(isValidSocketPath(`/${'a'.repeat(107)}`)).toBe(false);
    for (const bad of ['', 'tmp/x.sock', '\0abstract', '@abstract', '/tmp/a\nb', '/tmp/\u00e9', 7, null]) expect(isValidSocketPath(bad)).toBe(false);
  });

  it('parses the new requests and answers, and nothing looser', () => {
    expect(parseToHelper({ t: 'connect_unix', id: 3, path: '/run/x.sock' })).toEqual({ t: 'connect_unix', id: 3, path: '/run/x.sock' });
    expect(parseToHelper({ t: 'listen_unix', id: 4, path: '/tmp/r.sock', mask: 0o177, unlink: true })).toEqual({ t: 'listen_unix', id: 4, path: '/tmp/r.sock', mask: 0o177, unlink: true });
    expect(parseToHelper({ t: 'listen_agent', id: 5, mask: 0o177 })).toEqual({ t: 'listen_agent', id: 5, mask: 0o177 });
    expect(parseToHelper({ t: 'listen_unix', id: 4, path: '/tmp/r.sock', mask: 0o1000 })).toBeNull();
    expect(parseToHelper({ t: 'connect_unix', id: 3, path: 'relative' })).toBeNull();
    // A Unix listener answers with port 0; the agent's with the path the helper made, of that shape only.
    expect(parseFromHelper({ t: 'listening', id: 4, port: 0 })).toEqual({ t: 'listening', id: 4, port: 0 });
    expect(parseFromHelper({ t: 'listening', id: 5, port: 0, path: '/tmp/ssh-AbCdEf0123/agent.42' })).toEqual({ t: 'listening', id: 5, port: 0, path: '/tmp/ssh-AbCdEf0123/agent.42' });
    for (const path of ['/tmp/ssh-AbCdEf0123/../../etc/agent.1', '/etc/passwd', '/tmp/ssh-short/agent.1', '/tmp/ssh-AbCdEf0123/agent.1\n']) {
      expect(parseFromHelper({ t: 'listening', id: 5, port: 0, path })).toBeNull();
    }
  });

  it('reads no-agent-forwarding, agent-forwarding and restrict in key lines as OpenSSH does', () => {
    expect(parseAuthorizedKeyLine(`no-agent-forwarding ${ED}`).options.noAgentForwarding).toBe(true);
    expect(parseAuthorizedKeyLine(`restrict ${ED}`).options.noAgentForwarding).toBe(true);
    expect(parseAuthorizedKeyLine(`restrict,agent-forwarding ${ED}`).options.noAgentForwarding).toBe(false);
    expect(parseAuthorizedKeyLine(ED).options.noAgentForwarding ?? false).toBe(false);
  });

  it('vesh.yaml: agentForwarding, streamLocalBindUnlink and streamLocalBindMask, with OpenSSH\'s defaults and a clear error for an unquoted mask', () => {
    const d = parseServerConfig('/x/vesh.yaml', '').sessions;
    expect([d.agentForwarding, d.streamLocalBindUnlink, d.streamLocalBindMask]).toEqual([true, false, 0o177]);
    expect(parseServerConfig('/x/vesh.yaml', 'sessions: { agentForwarding: false, streamLocalBindMask: "0077" }\n').sessions).toMatchObject({ agentForwarding: false, streamLocalBindMask: 0o77 });
    expect(() => parseServerConfig('/x/vesh.yaml', 'sessions: { streamLocalBindMask: 0177 }\n')).toThrow(/octal umask in quotes/);
    expect(() => parseServerConfig('/x/vesh.yaml', 'sessions: { streamLocalBindMask: "0800" }\n')).toThrow(/octal umask/);
  });
});
