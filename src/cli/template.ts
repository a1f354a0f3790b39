import type { Command } from 'commander';

/** Registers the `vesh template` verbs (being written). */
export function register(_program: Command): void {}
