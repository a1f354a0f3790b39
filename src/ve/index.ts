import type { Logger } from '../audit/logger.js';
import type { ServerConfig } from '../config/server-config.js';
import { VeNetwork } from '../net/network.js';
import { existsSync } from 'node:fs';
import { detectCgroupLayout } from '../runtime/cgroups.js';
import { RuncRuntime } from '../runtime/runc.js';
import { sessionHelperPath } from '../system/native-helpers.js';
import { makeLayout, type Layout } from '../system/layout.js';
import { TemplateStore } from '../template/store.js';
import { VeManager } from './manager.js';

/**
 * Assembly of the VE layer from its parts: the one place that chooses the
 * engine (runc), so callers (CLI, SSH server, tests, benchmarks) never name it.
 */
export function createTemplateStore(config: ServerConfig, layout: Layout, logger: Logger): TemplateStore {
  return new TemplateStore({ layout, logger, idmapSize: config.runtime.idmapSize });
}

export function createVeNetwork(config: ServerConfig, layout: Layout, logger: Logger): VeNetwork {
  return new VeNetwork({ ...config.network, layout, logger });
}

export function createVeManager(config: ServerConfig, logger: Logger): VeManager {
  const layout = makeLayout(config.dataDir);
  return new VeManager({
    config,
    layout,
    logger,
    runtime: new RuncRuntime(config.runtime.binary, layout.runtimeRoot, {
      parent: layout.cgroupParent,
      layout: detectCgroupLayout(),
      pids: config.runtime.relayPids,
      memoryBytes: config.runtime.relayMemoryBytes,
      helper: () => (existsSync(sessionHelperPath()) ? sessionHelperPath() : null),
    }),
    templates: createTemplateStore(config, layout, logger),
    network: createVeNetwork(config, layout, logger),
  });
}

export type { VeManager } from './manager.js';
