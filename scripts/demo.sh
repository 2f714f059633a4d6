#!/usr/bin/env bash
# Hindsight end to end on one machine: a target, an engine and an agent on 127.0.0.1 with a
# file-backed disk, both links over TLS with certificates made by `hindsight certs`. An ext4 file system is created and written through the agent's NBD export
# (nbdfuse + a loop device), two points in time are noted, more data is written, and both
# points are recovered (one by sequence number, one by time) and compared byte for byte with
# copies of the source disk taken at those points. Then everything is stopped.
#
#   HS_DEMO_DIR=/some/dir   keep the demo's files there (default: a new temporary directory)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

step() { printf '\n== %s\n' "$*"; }

step "installing tools and building"
"$ROOT/scripts/install-deps.sh"
(cd "$ROOT" && cargo build --release --workspace --bins -q)
BIN=$ROOT/build/release
HS=$BIN/hindsight

WORK=${HS_DEMO_DIR:-$(mktemp -d /tmp/hindsight-demo.XXXXXX)}
mkdir -p "$WORK"/{engine,target,run,fuse,mnt,out}
EPORT=$(hs_free_port)
TPORT=$(hs_free_port)
SOCK=$WORK/run/db-data.sock
DISK=$WORK/erp-db-disk.img
rm -f "$DISK" && truncate -s 256M "$DISK"

hs_write_configs "$WORK" erp erp-db db-data 256MiB "$DISK" "$SOCK" 'retention = "24h"'
echo "TLS on both links, certificates made by hindsight certs in $WORK/pki:"
ls "$WORK/pki" | sed 's/^/  /'

step "starting target, engine and agent (files in $WORK)"
hs_start_cluster "$WORK" "$BIN" "$SOCK"
URI="nbd+unix:///db-data?socket=$SOCK"
nbdinfo "$URI" | sed 's/^/  /'

# Waits until the target holds every write the engine acknowledged: the target's last
# sequence number stops moving. Prints it.
settled_seq() {
  local prev=-1 cur n=0
  while :; do
    cur=$(hs_json_field "$("$HS" history --config "$WORK/target.toml" --group erp --json)" last_seq)
    if [ "$cur" = "$prev" ]; then n=$((n + 1)); else n=0; fi
    [ $n -ge 3 ] && break
    prev=$cur
    sleep 0.3
  done
  echo "$cur"
}

attach_fs() {
  hs_spawn nbdfuse "$WORK/nbdfuse.log" nbdfuse "$WORK/fuse/disk" "$URI"
  FUSE_PID=$HS_PID
  for _ in $(seq 100); do [ -e "$WORK/fuse/disk" ] && break; sleep 0.1; done
  LOOP=$(losetup -f --show "$WORK/fuse/disk")
  hs_undo "losetup -d $LOOP"
  hs_undo "fusermount3 -u $WORK/fuse"
}
detach_fs() {
  losetup -d "$LOOP"
  fusermount3 -u "$WORK/fuse"
  wait "$FUSE_PID" 2>/dev/null || true
}

step "ext4 through the agent: mkfs, mount, write files"
attach_fs
mkfs.ext4 -q -F "$LOOP"
mount "$LOOP" "$WORK/mnt"
hs_undo "umount $WORK/mnt"
mkdir -p "$WORK/mnt/orders"
for i in $(seq 1 20); do echo "order $i: $(date -u +%s%N)" >"$WORK/mnt/orders/$i.txt"; done
head -c 8M /dev/urandom >"$WORK/mnt/ledger.bin"
sha256sum "$WORK/mnt/ledger.bin" | cut -d' ' -f1 >"$WORK/ledger-A.sha256"
umount "$WORK/mnt"
detach_fs

SEQ_A=$(settled_seq)
cp --sparse=always "$DISK" "$WORK/source-at-A.img"
echo "point A: seq $SEQ_A (ext4 with 20 orders and an 8 MiB ledger)"

step "more changes: delete, overwrite, add"
attach_fs
mount "$LOOP" "$WORK/mnt"
rm -f "$WORK"/mnt/orders/1{0..9}.txt
head -c 4M /dev/urandom | dd of="$WORK/mnt/ledger.bin" bs=1M seek=2 conv=notrunc status=none
head -c 16M /dev/urandom >"$WORK/mnt/backup.tar"
umount "$WORK/mnt"
detach_fs
SEQ_B=$(settled_seq)
sleep 0.2
TIME_B=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
sleep 0.2
cp --sparse=always "$DISK" "$WORK/source-at-B.img"
echo "point B: seq $SEQ_B, time $TIME_B"

step "a later burst of raw writes (qemu-io), which neither point may contain"
qemu-io -f raw "$URI" -c 'write -P 0x5a 200M 4M' -c 'write -z 210M 1M' -c 'discard 0 64k' -c flush >/dev/null
SEQ_C=$(settled_seq)
echo "latest: seq $SEQ_C"
"$HS" history --config "$WORK/target.toml" --group erp | sed 's/^/  /'

step "recover point A by sequence number and point B by time"
"$HS" recover --config "$WORK/target.toml" --group erp --volume db-data --seq "$SEQ_A" --out "$WORK/out/A.img"
"$HS" recover --config "$WORK/target.toml" --group erp --volume db-data --time "$TIME_B" --out "$WORK/out/B.img"
"$HS" recover --config "$WORK/target.toml" --group erp --volume db-data --latest --out "$WORK/out/latest.img"

step "verify"
fail=0
check() { if cmp -s "$1" "$2"; then echo "OK   $3"; else echo "FAIL $3"; fail=1; fi; }
check "$WORK/out/A.img" "$WORK/source-at-A.img" "point A (seq $SEQ_A) equals the source disk at A, byte for byte"
check "$WORK/out/B.img" "$WORK/source-at-B.img" "point B (time $TIME_B) equals the source disk at B, byte for byte"
check "$WORK/out/latest.img" "$DISK" "latest point equals the source disk now"
for p in A B; do
  if e2fsck -fn "$WORK/out/$p.img" >/dev/null 2>&1; then echo "OK   e2fsck clean on point $p"; else echo "FAIL e2fsck on point $p"; fail=1; fi
done
nA=$(debugfs -R 'ls /orders' "$WORK/out/A.img" 2>/dev/null | grep -o '[0-9]*\.txt' | wc -l)
nB=$(debugfs -R 'ls /orders' "$WORK/out/B.img" 2>/dev/null | grep -o '[0-9]*\.txt' | wc -l)
hA=$(debugfs -R 'cat /ledger.bin' "$WORK/out/A.img" 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$nA" = 20 ] && [ "$nB" = 10 ] && echo "OK   point A has 20 orders, point B has 10" || { echo "FAIL orders: A=$nA B=$nB"; fail=1; }
[ "$hA" = "$(cat "$WORK/ledger-A.sha256")" ] && echo "OK   ledger.bin at A has the checksum written at A" || { echo "FAIL ledger at A"; fail=1; }

step "stopping"
hs_cleanup
if [ $fail = 0 ]; then echo "DEMO PASSED (files in $WORK)"; else echo "DEMO FAILED (logs in $WORK)"; exit 1; fi
