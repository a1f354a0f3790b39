import type { Command } from 'commander';

/** Registers the `vesh user` verbs (being written). */
export function register(_program: Command): void {}
