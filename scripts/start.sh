#!/usr/bin/env bash
# `npm start`: everything a fresh Debian machine needs to serve, then `vesh serve`.
#  1. missing Debian packages (runc, iproute2, nftables, mmdebstrap, …) are installed;
#  2. npm dependencies are installed and the TypeScript is compiled;
#  3. config/vesh.yaml and config/accounts.yaml are made from the examples
#     when absent, with a demo account whose generated password is printed
#     (and kept, mode 0600, in keys/demo-password);
#  4. the default template is built when absent (Debian: a minute or two, once);
#  5. the server starts; host keys are made on its first start.
# Extra arguments go to `vesh serve` (e.g. npm start -- --config other.yaml).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=ensure-system.sh
source scripts/ensure-system.sh
ensure_system runtime
ensure_node_modules "$ROOT"

VESH=(node "$ROOT/bin/vesh.js")
CONFIG="${VESH_CONFIG:-config/vesh.yaml}"
if [ ! -f "$CONFIG" ]; then
  cp config/vesh.example.yaml "$CONFIG"
  echo "vesh: made $CONFIG from config/vesh.example.yaml (edit it to change the port, data dir, limits…)" >&2
fi
ACCOUNTS_DIR="$(dirname "$CONFIG")"
if [ ! -f "$ACCOUNTS_DIR/accounts.yaml" ] && [ -f config/accounts.example.yaml ]; then
  # Comments only: accounts are added below and with `vesh user add`.
  sed -n '/^#/p;/^$/p' config/accounts.example.yaml > "$ACCOUNTS_DIR/accounts.yaml"
fi
mkdir -p keys
if ! "${VESH[@]}" --config "$CONFIG" user list --json | grep -q '"name": *"demo"'; then
  DEMO_PASSWORD="$(head -c 12 /dev/urandom | base64 | tr -d '/+=' | cut -c1-14)"
  printf '%s\n' "$DEMO_PASSWORD" | "${VESH[@]}" --config "$CONFIG" user add demo --password-stdin >/dev/null
  (umask 077; printf '%s\n' "$DEMO_PASSWORD" > keys/demo-password)
  echo "vesh: added the demo account \"demo\"" >&2
fi

# The default template and the port, from the config as vesh reads it.
read -r TEMPLATE PORT < <(node --input-type=module -e '
  const { loadServerConfig } = await import(process.argv[1]);
  const c = loadServerConfig(process.argv[2]);
  process.stdout.write(`${c.defaults.template} ${c.listen.port}\n`);
' "$ROOT/dist/config/server-config.js" "$CONFIG" 2>/dev/null || echo debian 2222)
if ! "${VESH[@]}" --config "$CONFIG" template list --json | grep -q "\"name\": *\"$TEMPLATE\""; then
  case "$TEMPLATE" in
    debian|busybox)
      echo "vesh: building the $TEMPLATE template (once; the Debian one takes a minute or two)" >&2
      "${VESH[@]}" --config "$CONFIG" template build "$TEMPLATE" ;;
    *)
      echo "vesh: the default template \"$TEMPLATE\" does not exist: import it with \"vesh template import $TEMPLATE FILE.tar\"" >&2
      exit 1 ;;
  esac
fi

if [ -f keys/demo-password ]; then
  echo "vesh: log in with:  ssh -p $PORT demo@localhost   (password: $(cat keys/demo-password))" >&2
fi
exec "${VESH[@]}" --config "$CONFIG" serve "$@"
