import path from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * The session helper (src/native/vesh-session.c), built by
 * scripts/build-native.sh into dist/ beside the compiled TypeScript; the same
 * path from src/ (tests, vite-node) and from dist/ (the installed command).
 */
export function sessionHelperPath(): string {
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../dist/vesh-session');
}
