import { pino, type Logger, type LevelWithSilent } from 'pino';

export type { Logger };

/** JSON lines by default; pretty when asked, or when stdout is a terminal and pretty is 'auto'. */
export function createLogger(opts: { level?: string; pretty?: boolean | 'auto'; destination?: NodeJS.WritableStream } = {}): Logger {
  const pretty = opts.pretty === 'auto' || opts.pretty === undefined ? Boolean(process.stdout.isTTY) : opts.pretty;
  const level = (opts.level ?? 'info') as LevelWithSilent;
  const base = { level, base: { pid: process.pid }, redact: { paths: ['password', '*.password', 'privateKey', '*.privateKey'], censor: '[redacted]' } };
  if (pretty && !opts.destination) {
    return pino({ ...base, transport: { target: 'pino-pretty', options: { colorize: true, translateTime: 'SYS:standard' } } });
  }
  return opts.destination ? pino(base, opts.destination as never) : pino(base);
}

/** A logger that drops everything, for tests and CLI verbs that print their own output. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
