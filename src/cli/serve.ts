import type { Command } from 'commander';

/** Registers the `vesh serve` verbs (being written). */
export function register(_program: Command): void {}
