#!/usr/bin/env bash
# `npm test`: the whole suite on a fresh Debian machine. Installs what the
# tests drive (runc, OpenSSH client and server, sshpass, …) when missing,
# installs npm dependencies, compiles, type-checks the tests and benches,
# then runs vitest (unit tests and the
# real-VE, real-OpenSSH integration tests). Extra arguments go to vitest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=ensure-system.sh
source scripts/ensure-system.sh
ensure_system test
ensure_node_modules "$ROOT"
# vitest strips types without checking them: check the tests and benches first.
./node_modules/.bin/tsc -p test/tsconfig.json
exec ./node_modules/.bin/vitest run "$@"
