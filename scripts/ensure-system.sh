#!/usr/bin/env bash
# Installs the Debian packages vesh needs, only those that are missing, and
# says so. Sourced by scripts/start.sh and scripts/test.sh.
#   ensure_system runtime   # what `vesh serve` needs
#   ensure_system test      # plus what the test suite drives (OpenSSH client/server, sshpass, …)
set -euo pipefail

# command -> Debian package
declare -A VESH_RUNTIME_PKGS=(
  [runc]=runc
  [ip]=iproute2
  [bridge]=iproute2
  [nft]=nftables
  [mmdebstrap]=mmdebstrap
  [busybox]=busybox-static
  [mkfs.ext4]=e2fsprogs
  [e2fsck]=e2fsprogs
  # vesh ve backup: the image's extent map, its trim and freeze
  [filefrag]=e2fsprogs
  [fstrim]=util-linux
  [fsfreeze]=util-linux
  [losetup]=mount
  [ssh-keygen]=openssh-client
  [gcc]=gcc
  # a VE's own view of its memory, CPUs and uptime in /proc (runtime.lxcfs);
  # without it VEs still start, seeing the host's (vesh doctor warns)
  [lxcfs]=lxcfs
)
declare -A VESH_TEST_PKGS=(
  [ssh]=openssh-client
  [ssh-agent]=openssh-client
  [ssh-add]=openssh-client
  [sftp]=openssh-client
  [scp]=openssh-client
  [sshd]=openssh-server
  [sshpass]=sshpass
  [rsync]=rsync
  [git]=git
  [tmux]=tmux
  # test/integration/service-unit.test.ts checks the unit file
  [systemd-analyze]=systemd
  # test/interop: SSH clients other than OpenSSH's (curl's SFTP is libssh2's)
  [dbclient]=dropbear-bin
  [dropbearconvert]=dropbear-bin
  [plink]=putty-tools
  [pscp]=putty-tools
  [psftp]=putty-tools
  [puttygen]=putty-tools
  [curl]=curl
  # test/integration/session-recording.test.ts plays a recorded session back
  [asciinema]=asciinema
  # test/*/cluster-*.test.ts start three etcd members on free loopback ports
  # (never 2379/2380, where the package's own etcd.service may listen)
  [etcd]=etcd-server
  [etcdctl]=etcd-client
)

ensure_system() {
  local want="${1:-runtime}"
  if [ "$(id -u)" != 0 ]; then
    echo "vesh: must run as root (it creates namespaces, cgroups, mounts and network devices); try: sudo $0" >&2
    exit 1
  fi
  local -a missing=()
  local cmd
  for cmd in "${!VESH_RUNTIME_PKGS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || [ -x "/sbin/$cmd" ] || missing+=("${VESH_RUNTIME_PKGS[$cmd]}")
  done
  # The session helper is linked statically (scripts/build-native.sh): it needs libc.a.
  [ -e "/usr/lib/$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)/libc.a" ] || missing+=(libc6-dev)
  if [ "$want" = test ]; then
    for cmd in "${!VESH_TEST_PKGS[@]}"; do
      command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${VESH_TEST_PKGS[$cmd]}")
    done
    # test/interop drives these Python SSH libraries with Debian's own python3.
    local mod
    for mod in paramiko asyncssh; do
      /usr/bin/python3 -c "import $mod" >/dev/null 2>&1 || missing+=("python3-$mod")
    done
    # test/interop builds its libssh client against the library's headers.
    [ -e /usr/include/libssh/libssh.h ] || missing+=(libssh-dev)
  fi
  if [ "${#missing[@]}" -eq 0 ]; then
    return 0
  fi
  local pkgs
  pkgs="$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')"
  echo "vesh: installing missing Debian packages: ${pkgs}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  if ! apt-get install -y -q --no-install-recommends $pkgs >/tmp/vesh-apt.log 2>&1; then
    echo "vesh: apt-get install failed; refreshing package lists and trying again" >&2
    apt-get update -q >>/tmp/vesh-apt.log 2>&1 || true
    # shellcheck disable=SC2086
    if ! apt-get install -y -q --no-install-recommends $pkgs >>/tmp/vesh-apt.log 2>&1; then
      echo "vesh: could not install ${pkgs}(see /tmp/vesh-apt.log); install them by hand: apt-get install ${pkgs}" >&2
      exit 1
    fi
  fi
  echo "vesh: installed ${pkgs}" >&2
}

ensure_node_modules() {
  local root="$1"
  if [ ! -d "$root/node_modules" ] || [ "$root/package-lock.json" -nt "$root/node_modules/.package-lock.json" ]; then
    echo "vesh: installing npm dependencies (npm ci)" >&2
    # Install scripts stay on: ssh2 builds its native crypto binding (chacha20-poly1305,
    # OpenSSH's default cipher, is several times slower in its pure-JS fallback).
    (cd "$root" && npm ci --no-audit --no-fund --loglevel=error)
  fi
  echo "vesh: compiling TypeScript and the session helper" >&2
  (cd "$root" && ./node_modules/.bin/tsc -p tsconfig.json && sh scripts/build-native.sh)
}
