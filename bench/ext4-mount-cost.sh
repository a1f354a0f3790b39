#!/bin/bash
# The kernel memory of one VE disk mount: N (100) no-journal ext4 images, as vesh makes them, mounted
# through loop devices with and without nombcache, two interleaved rounds; prints the growth of live
# slab objects and of kmalloc-8k (where ext4's xattr block cache hash lives) per mount.
# Not a test. Run as root holding the bench lock: flock /tmp/vesh-bench.lock bash bench/ext4-mount-cost.sh
set -eu
trap 'for m in "$D"/m*; do mountpoint -q "$m" && umount "$m"; done; rm -rf "$D"' EXIT
D=$(mktemp -d /var/tmp/vesh-ext4cost-XXXXXX); N=${N:-100}
slab() { awk 'NR>2 {s+=$2*$4; if ($1=="kmalloc-8k") k+=$2*$4} END {printf "%d %d\n", s/1024, k/1024}' /proc/slabinfo; }
for i in $(seq 1 $N); do [ -f $D/img$i ] || { truncate -s 64M $D/img$i; mkfs.ext4 -q -F -m 0 -O ^has_journal $D/img$i; }; mkdir -p $D/m$i; done
for round in 1 2; do for opt in defaults nombcache; do
  sync; sleep 2; read s0 k0 < <(slab)
  for i in $(seq 1 $N); do mount -o loop,$opt,noatime $D/img$i $D/m$i; done
  sleep 3; read s1 k1 < <(slab)
  echo "round $round $opt: slab objects $(( (s1-s0)*1024/N/1024 )) KiB/mount, kmalloc-8k $(( (k1-k0)*1024/N/1024 )) KiB/mount"
  for i in $(seq 1 $N); do umount $D/m$i; done
done; done
