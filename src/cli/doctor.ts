import type { Command } from 'commander';

/** Registers the `vesh doctor` verbs (being written). */
export function register(_program: Command): void {}
