#!/bin/sh
# Builds dist/vesh-session (src/native/vesh-session.c), the session helper:
# the agent runs inside VEs, which may hold no C library at all (the busybox
# template), so it is linked statically. Needs gcc and libc6-dev (libc.a);
# scripts/ensure-system.sh installs them when missing.
set -eu
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/src/native/vesh-session.c"
OUT="$ROOT/dist/vesh-session"
if ! command -v gcc >/dev/null 2>&1; then
  echo "vesh: gcc is missing, needed to build the session helper: apt-get install gcc libc6-dev" >&2
  exit 1
fi
mkdir -p "$ROOT/dist"
# Build to a temporary name and rename: a running server never sees half a binary.
gcc -O2 -static -Wall -Wextra -Werror -o "$OUT.tmp" "$SRC"
mv -f "$OUT.tmp" "$OUT"
