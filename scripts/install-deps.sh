#!/usr/bin/env bash
# Installs the system packages Hindsight's demo, tests and benchmarks use: the NBD clients
# (libnbd-bin: nbdinfo, nbdcopy, nbdfuse), nbdkit and qemu-utils (peers and clients: qemu-nbd,
# qemu-img, qemu-io, and qemu-storage-daemon for the mirror peer of scripts/bench-peers.sh), fio,
# e2fsprogs and fuse3, Prometheus (a real server scraping the daemons, promtool for lints and
# alert rules), Chromium (the dashboard's headless browser test) and etcd (engine clusters:
# etcd-server, etcd-client for etcdctl). Idempotent; needs root
# (apt-get).
set -euo pipefail
pkgs=(libnbd-bin nbdkit qemu-utils fio e2fsprogs fuse3 util-linux prometheus chromium etcd-server etcd-client)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
for t in nbdinfo nbdcopy nbdfuse nbdkit qemu-nbd qemu-io qemu-img qemu-storage-daemon fio mkfs.ext4 e2fsck debugfs losetup prometheus promtool chromium etcd etcdctl; do
  command -v "$t" >/dev/null || { echo "install-deps: $t is still missing after installing packages" >&2; exit 1; }
done
# cargo must exist: Hindsight builds from source.
command -v cargo >/dev/null || { echo "install-deps: cargo (Rust toolchain) is required" >&2; exit 1; }
