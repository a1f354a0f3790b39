import { describe, expect, it } from 'vitest';
import { parseServerConfig } from '../../src/config/server-config.js';
import { conflictKey, nameUnder, nodeKey, veKey, vesPrefix } from '../../src/cluster/keys.js';
import { MAX_NODE_RECORD_BYTES, parseNodeRecord, parseVeRecord, type NodeRecord } from '../../src/cluster/records.js';
import { nodeRecord } from '../helpers/etcd-cluster.js';
import { chooseNode } from '../../src/cluster/placement.js';
import type { LiveNode } from '../../src/cluster/cluster-state.js';
import { VE_NAME_PATTERN } from '../../src/ve/names.js';

const parse = (yaml: string) => parseServerConfig('/etc/vesh/vesh.yaml', `listen: "10.0.0.5:2222"\n${yaml}`);

describe('cluster settings in vesh.yaml', () => {
  it('are off by default, with no etcd', () => {
    const c = parse('').cluster!;
    expect(c.enabled).toBe(false);
    expect(c.etcd.endpoints).toEqual([]);
  });

  it('fill in the node name, address, lease and resolve TLS paths against the file', () => {
    const c = parse('cluster:\n  enabled: true\n  name: node-a\n  etcd:\n    endpoints: ["https://127.0.0.1:23790"]\n    tls: { ca: certs/ca.pem, cert: certs/a.pem, key: certs/a.key }\n    auth: { username: vesh, password: secret }').cluster!;
    expect(c).toMatchObject({ enabled: true, nodeName: 'node-a', clusterName: 'default', advertise: '10.0.0.5:2222', leaseSeconds: 10, loadIntervalMs: 5000 });
    expect(c.etcd.tls).toEqual({ ca: '/etc/vesh/certs/ca.pem', cert: '/etc/vesh/certs/a.pem', key: '/etc/vesh/certs/a.key' });
    expect(c.etcd.auth).toEqual({ username: 'vesh', password: 'secret' });
  });

  it('refuse cluster mode on listen port 0 without an advertise address', () => {
    expect(() => parseServerConfig('/v.yaml', 'listen: "127.0.0.1:0"\ncluster: { enabled: true, etcd: { endpoints: ["http://e:1"] } }')).toThrow(/listen port 0 needs cluster.advertise/);
    expect(parseServerConfig('/v.yaml', 'listen: "127.0.0.1:0"\ncluster: { enabled: true, advertise: "10.0.0.5:2222", etcd: { endpoints: ["http://e:1"] } }').cluster!.advertise).toBe('10.0.0.5:2222');
  });

  it.each([
    ['enabled without endpoints', 'cluster: { enabled: true }', /cluster.etcd.endpoints is not set/],
    ['a name that would leave its key prefix', 'cluster: { name: "../b", etcd: { endpoints: ["http://127.0.0.1:1"] } }', /cluster.name must be 1-63 lower-case/],
    ['a name with a slash', 'cluster: { name: "a/b", etcd: { endpoints: ["http://127.0.0.1:1"] } }', /cluster.name/],
    ['an endpoint with a path', 'cluster: { etcd: { endpoints: ["http://127.0.0.1:2379/v3"] } }', /endpoints entry must be a URL/],
    ['a lease of 1 s', 'cluster: { leaseSeconds: 1, etcd: { endpoints: ["http://127.0.0.1:1"] } }', /leaseSeconds must be at least 2/],
    ['a cert without its key', 'cluster: { etcd: { endpoints: ["https://e:1"], tls: { ca: a, cert: b } } }', /cert and key together/],
    ['TLS with an http endpoint', 'cluster: { etcd: { endpoints: ["http://e:1"], tls: { ca: a } } }', /use https:\/\/ endpoints/],
    ['an advertise address with a control character', 'cluster: { advertise: "a\\u001b[2J:22", etcd: { endpoints: ["http://e:1"] } }', /cluster.advertise must be/],
    ['an unknown setting', 'cluster: { enable: true }', /enable/],
  ])('refuse %s with a clear message', (_what, yaml, message) => {
    expect(() => parse(yaml)).toThrow(message);
  });
});

describe('cluster keys are built from checked names only', () => {
  it('build the expected keys', () => {
    expect(nodeKey('default', 'node-a')).toBe('/vesh/default/nodes/node-a');
    expect(veKey('prod', 'alice')).toBe('/vesh/prod/ves/alice');
    expect(conflictKey('prod', 'alice', 'b')).toBe('/vesh/prod/conflicts/alice/b');
  });

  it.each(['../nodes/a', 'a/b', '..', '', 'A', 'a\nb', '%2e%2e', 'x'.repeat(33)])('refuse the VE name %j', (name) => {
    expect(() => veKey('default', name)).toThrow(/invalid VE name/);
  });

  it.each(['../x', 'a/b', '.', 'a b'])('refuse the node and cluster name %j', (name) => {
    expect(() => nodeKey('default', name)).toThrow(/invalid node name/);
    expect(() => vesPrefix(name)).toThrow(/invalid cluster name/);
  });

  it('map a key read back to one name, or to none', () => {
    const p = vesPrefix('default');
    expect(nameUnder(p, `${p}alice`, VE_NAME_PATTERN)).toBe('alice');
    expect(nameUnder(p, `${p}../nodes/a`, VE_NAME_PATTERN)).toBeNull();
    expect(nameUnder(p, `${p}a/b`, VE_NAME_PATTERN)).toBeNull();
    expect(nameUnder(p, '/vesh/other/ves/alice', VE_NAME_PATTERN)).toBeNull();
  });
});

describe('records read from etcd', () => {
  it('parse a good node and VE record', () => {
    expect(parseNodeRecord('a', JSON.stringify(nodeRecord('a'))).name).toBe('a');
    expect(parseVeRecord('alice', JSON.stringify({ node: 'a', created: new Date().toISOString(), placedBy: 'b' })).node).toBe('a');
  });

  it.each([
    ['over the size bound', () => JSON.stringify(nodeRecord('a', { templates: Array.from({ length: 200 }, (_, i) => ({ name: `t${i}`.padEnd(60, 'x'), digest: `sha256:${'0'.repeat(64)}` })) })) + ' '.repeat(MAX_NODE_RECORD_BYTES), /bytes, over the/],
    ['not JSON', () => '{"name":', /not JSON/],
    ['naming another node', () => JSON.stringify(nodeRecord('b')), /names node b/],
    ['with an escape sequence in its address', () => JSON.stringify(nodeRecord('a', { address: '\u001b]0;owned\u0007:22' })), /address/],
    ['with an extra field', () => JSON.stringify({ ...nodeRecord('a'), path: '/etc/shadow' }), /invalid/],
    ['with a prototype key', () => JSON.stringify(nodeRecord('a')).replace('{', '{"__proto__":{"x":1},'), /invalid/],
  ])('refuse a node record %s', (_what, value, message) => {
    expect(() => parseNodeRecord('a', value())).toThrow(message);
  });

  it.each([
    ['a node name that is a path', { node: '../../etc', created: new Date().toISOString(), placedBy: 'a' }],
    ['a node name with a slash', { node: 'a/b', created: new Date().toISOString(), placedBy: 'a' }],
    ['a free-text time', { node: 'a', created: 'yesterday \u001b[2J', placedBy: 'a' }],
  ])('refuse a VE record with %s', (_what, rec) => {
    expect(() => parseVeRecord('alice', JSON.stringify(rec))).toThrow(/VESH|invalid/);
  });
});

describe('placement picks the least-loaded live node with the template', () => {
  const live = (r: NodeRecord): LiveNode => ({ record: r, leaseRemaining: 5 });
  it('by running VEs per slot, then load per CPU, then name; never one without the template or a free slot', () => {
    const a = live(nodeRecord('a', { load: { runningVes: 5, sessions: 0, loadavg: [0, 0, 0] } }));
    const b = live(nodeRecord('b', { load: { runningVes: 2, sessions: 0, loadavg: [1.9, 0, 0] } }));
    const c = live(nodeRecord('c', { load: { runningVes: 2, sessions: 0, loadavg: [0.1, 0, 0] } }));
    const d = live(nodeRecord('d', { templates: [{ name: 'debian', digest: null }] }));
    const full = live(nodeRecord('e', { capacity: { cpus: 2, memoryBytes: 1, veSlots: 1 }, load: { runningVes: 1, sessions: 0, loadavg: [0, 0, 0] } }));
    expect(chooseNode([a, b, c, d, full], 'busybox')?.record.name).toBe('c');
    expect(chooseNode([a, b, d], 'busybox')?.record.name).toBe('b');
    expect(chooseNode([a, b, c, d], 'debian')?.record.name).toBe('d');
    expect(chooseNode([a, full], 'alpine')).toBeNull();
    expect(chooseNode([full], 'busybox')).toBeNull();
  });
});
