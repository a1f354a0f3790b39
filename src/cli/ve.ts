import type { Command } from 'commander';

/** Registers the `vesh ve` verbs (being written). */
export function register(_program: Command): void {}
