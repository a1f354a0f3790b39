import { loadServerConfig, type ServerConfig } from '../config/server-config.js';
import { createLogger, type Logger } from '../audit/logger.js';
import { makeLayout, type Layout } from '../system/layout.js';

/** Options every verb takes. */
export interface GlobalOptions {
  config: string;
  json?: boolean;
}

/** What a verb needs, built from --config. No globals: each verb builds its own. */
export interface CliContext {
  config: ServerConfig;
  layout: Layout;
  logger: Logger;
}

export function buildContext(opts: GlobalOptions, loggerOpts: { quiet?: boolean } = {}): CliContext {
  const config = loadServerConfig(opts.config);
  const logger = createLogger({ level: loggerOpts.quiet ? 'warn' : config.logging.level, pretty: config.logging.pretty });
  return { config, layout: makeLayout(config.dataDir), logger };
}
