import { z } from 'zod';
import { parseCpus, parseDuration, parsePids, parseSize } from './units.js';

/** A zod refinement that runs one of our unit parsers and reports its message. */
function parsed<T>(parse: (v: string | number) => T) {
  return z.union([z.string(), z.number()]).transform((v, ctx) => {
    try {
      return parse(v);
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: (err as Error).message });
      return z.NEVER;
    }
  });
}

export const limitsInputSchema = z.strictObject({
  memory: parsed((v) => parseSize(v, 'memory limit')).optional(),
  pids: parsed(parsePids).optional(),
  cpus: parsed(parseCpus).optional(),
  disk: parsed((v) => parseSize(v, 'disk limit')).optional(),
});

const listenSchema = z.string().regex(/^(\[[0-9a-fA-F:.]+\]|[^:\s]+):\d{1,5}$/, 'listen must be "ADDRESS:PORT", for example "0.0.0.0:2222"');

const cidrSchema = z.string().regex(/^\d{1,3}(\.\d{1,3}){3}\/\d{1,2}$/, 'subnet must be an IPv4 CIDR such as 10.88.0.0/16');

/** config/vesh.yaml. Relative paths resolve against the file's own directory. */
export const serverConfigSchema = z.strictObject({
  listen: listenSchema.default('0.0.0.0:2222'),
  dataDir: z.string().min(1).default('/var/lib/vesh'),
  hostKeysDir: z.string().min(1).default('../keys'),
  accountsFile: z.string().min(1).default('accounts.yaml'),
  defaults: z.strictObject({
    template: z.string().min(1).default('debian'),
    limits: z.strictObject({
      memory: parsed((v) => parseSize(v, 'memory limit')).default(512 * 1024 ** 2),
      pids: parsed(parsePids).default(512),
      cpus: parsed(parseCpus).default(1),
      disk: parsed((v) => parseSize(v, 'disk limit')).default(2 * 1024 ** 3),
    }).prefault({}),
  }).prefault({}),
  network: z.strictObject({
    bridge: z.string().regex(/^[A-Za-z0-9_.-]{1,15}$/, 'bridge must be an interface name of 1-15 letters, digits, "_", "." or "-"').default('vesh0'),
    subnet: cidrSchema.default('10.88.0.0/16'),
    outbound: z.boolean().default(false),
  }).prefault({}),
  auth: z.strictObject({
    maxAuthTries: z.number().int().min(1).max(100).default(6),
    loginGraceTime: parsed((v) => parseDuration(v, 'loginGraceTime')).default(30_000),
    /** Connections that have not logged in yet, at most, at any time (OpenSSH's MaxStartups). */
    maxStartups: z.number().int().min(1).max(100_000).default(100),
    /**
     * Of those, at most this many from one source: an IPv4 address, or an
     * IPv6 /64 (OpenSSH's PerSourceMaxStartups), so one source cannot hold
     * every slot through the login grace time.
     */
    maxStartupsPerSource: z.number().int().min(1).max(100_000).default(10),
    /**
     * Per-source penalties after repeated failures (OpenSSH PerSourcePenalties
     * style). A failure is a wrong password or signature, a connection cut at
     * the login grace time, or garbage / a failed key exchange before login.
     */
    penalties: z.strictObject({
      failuresBeforePenalty: z.number().int().min(1).default(10),
      penalty: parsed((v) => parseDuration(v, 'penalty')).default(30_000),
      maxPenalty: parsed((v) => parseDuration(v, 'maxPenalty')).default(600_000),
    }).prefault({}),
  }).prefault({}),
  runtime: z.strictObject({
    engine: z.enum(['runc']).default('runc'),
    binary: z.string().default('runc'),
    /** Host uid/gid that VE root maps to, and how many ids a VE has. */
    idmapBase: z.number().int().min(1).default(100_000),
    idmapSize: z.number().int().min(65_536).default(65_536),
    stopTimeout: parsed((v) => parseDuration(v, 'stopTimeout')).default(10_000),
    /** A session agent in each VE in use (one small process there) instead of one engine exec per session. */
    sessionAgents: z.boolean().default(true),
  }).prefault({}),
  logging: z.strictObject({
    level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace']).default('info'),
    pretty: z.union([z.boolean(), z.literal('auto')]).default('auto'),
  }).prefault({}),
});

export type ServerConfigFile = z.infer<typeof serverConfigSchema>;
