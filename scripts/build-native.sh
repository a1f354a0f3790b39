#!/bin/sh
# Builds the native helpers into dist/, from src/native/:
#   vesh-session  the session helper; its agent runs inside VEs, which may
#                 hold no C library at all (the busybox template);
#   vesh-setup    the host-side steps of a VE start (loop + mounts, the
#                 network hook) in one process each instead of several;
#   vesh-forward  the port-forward helper, run inside VEs by the engine;
#   vesh-forward-relay  its host side: checks every frame and descriptor
#                 from the VE before the SSH server sees it.
#   vesh-worker-sandbox  starts each SSH worker unprivileged in its own
#                 namespaces and a read-only root showing only what it needs.
# All are linked statically (one build rule, no dependence on the host's
# libc at run time). Needs gcc and libc6-dev (libc.a); scripts/ensure-system.sh
# installs them when missing.
set -eu
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if ! command -v gcc >/dev/null 2>&1; then
  echo "vesh: gcc is missing, needed to build the native helpers: apt-get install gcc libc6-dev" >&2
  exit 1
fi
mkdir -p "$ROOT/dist"
for name in vesh-session vesh-setup vesh-forward vesh-forward-relay vesh-worker-sandbox; do
  OUT="$ROOT/dist/$name"
  # Build to a temporary name and rename: a running server never sees half a binary.
  # ld warns that a static getaddrinfo needs the C library's NSS modules at
  # run time: vesh-forward relies only on the "files" and "dns" sources built
  # into libc.a (checked in a root with no C library at all), so that one
  # warning is dropped; any other is shown.
  if ! gcc -O2 -static -Wall -Wextra -Werror -o "$OUT.tmp" "$ROOT/src/native/$name.c" 2>"$OUT.log"; then
    cat "$OUT.log" >&2
    rm -f "$OUT.log"
    exit 1
  fi
  grep -v -e "in function \`resolve" -e "Using 'getaddrinfo' in statically linked" "$OUT.log" >&2 || true
  rm -f "$OUT.log"
  mv -f "$OUT.tmp" "$OUT"
done

# fdpass.node: the Node addon for broker/worker frames (SCM_RIGHTS), ptys and
# the worker's seccomp filter. A shared object, dlopen'ed by node, so not
# static; built against Node's own headers (N-API 8 + libuv).
NODE_INCLUDE="${NODE_INCLUDE:-}"
if [ -z "$NODE_INCLUDE" ]; then
  for dir in "$(dirname "$(dirname "$(command -v node)")")/include/node" /usr/include/node "$HOME/.cache/node-gyp/$(node -p process.versions.node)/include/node"; do
    if [ -f "$dir/node_api.h" ] && [ -f "$dir/uv.h" ]; then NODE_INCLUDE="$dir"; break; fi
  done
fi
if [ -z "$NODE_INCLUDE" ]; then
  echo "vesh: Node's C headers (node_api.h, uv.h) are missing, needed to build dist/fdpass.node." >&2
  echo "  NodeSource's nodejs package installs them in /usr/include/node; with Debian's own nodejs: apt-get install libnode-dev;" >&2
  echo "  with any Node: npx node-gyp install (downloads them to ~/.cache/node-gyp/<version>/include/node), or set NODE_INCLUDE=DIR." >&2
  exit 1
fi
OUT="$ROOT/dist/fdpass.node"
gcc -O2 -shared -fPIC -Wall -Wextra -Werror -I"$NODE_INCLUDE" -o "$OUT.tmp" "$ROOT/src/native/vesh-fdpass.c"
mv -f "$OUT.tmp" "$OUT"
