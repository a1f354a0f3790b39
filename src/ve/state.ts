import type { ContainerState } from '../runtime/types.js';

/**
 * A VE's state as a person sees it, derived from the engine's view:
 * - stopped: no container (or a dead one awaiting clean-up)
 * - running: its init runs
 * - broken: created but never started (a start that died half-way); start and stop clean it up
 * - paused: frozen by the engine
 */
export type VeState = 'stopped' | 'running' | 'broken' | 'paused';

export function veStateOf(c: ContainerState | null): VeState {
  if (!c) return 'stopped';
  switch (c.status) {
    case 'running': return 'running';
    case 'paused': return 'paused';
    case 'created':
    case 'creating': return 'broken';
    default: return 'stopped';
  }
}

export const canStart = (s: VeState): boolean => s === 'stopped' || s === 'broken';
export const canStop = (s: VeState): boolean => s === 'running' || s === 'paused' || s === 'broken';
export const canDestroy = (s: VeState, force: boolean): boolean => force || s === 'stopped';
/** The engine still holds something (a dead or half-made container) that must be cleaned before a new start. */
export const needsCleanup = (c: ContainerState | null): boolean => c !== null && c.status !== 'running' && c.status !== 'paused';
