#!/usr/bin/env bash
# Builds the guest's initramfs: static busybox, the kernel modules the test needs, Hindsight's
# binaries and a few host tools with the shared libraries they link, /init and the guest test.
#
#   build-initramfs.sh BIN_DIR OUT     BIN_DIR holds hindsight and hindsight-agent
#   HS_VM_WORK                         where setup-host.sh unpacked the kernel
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BIN_DIR=$1
OUT=$2
# The agent's CA, certificate and key (ca.pem, agent.pem, agent-key.pem), for /etc/hindsight/tls.
TLS_DIR=$3
WORK=${HS_VM_WORK:-/var/tmp/hindsight-vm}
KVER=$(cat "$WORK/kver")
MODDIR=$WORK/kernel/lib/modules/$KVER
ROOT=$(mktemp -d "$(dirname "$OUT")/initramfs-root.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT

# virtio_blk and virtio_net are modules in the cloud kernel (the guest's disks and its
# network); nbd and ublk_drv are the two front ends under test. Anything built in is skipped.
MODULES="virtio_blk virtio_net nbd ublk_drv"

make_tree() {
  mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,run,mnt,etc/hindsight,lib/modules,lib/x86_64-linux-gnu,lib64,usr/lib,usr/local/bin}
  ln -s ../../lib/x86_64-linux-gnu "$ROOT/usr/lib/x86_64-linux-gnu"
  # /init links the applets at boot (busybox --install), so the archive stays small.
  cp /bin/busybox "$ROOT/bin/busybox"
  # An empty or missing mke2fs.conf makes "mke2fs -t ext4" fail: ship the host's.
  cp /etc/mke2fs.conf "$ROOT/etc/mke2fs.conf"
  install -m 0755 "$HERE/guest-init.sh" "$ROOT/init"
  install -m 0755 "$HERE/../../tests/vm/guest-test.sh" "$ROOT/guest-test.sh"
  mkdir -p "$ROOT/etc/hindsight/tls"
  install -m 0644 "$TLS_DIR/ca.pem" "$TLS_DIR/agent.pem" "$ROOT/etc/hindsight/tls/"
  install -m 0600 "$TLS_DIR/agent-key.pem" "$ROOT/etc/hindsight/tls/"
}

# The path of module $1 relative to $MODDIR as modules.dep writes it, or nothing.
module_path() { grep -oE "^([^:]*/)?$1\.ko(\.xz|\.zst|\.gz)?:" "$MODDIR/modules.dep" | head -1 | tr -d :; }

declare -A ADDED=()
LOAD_ORDER=()
# Adds a module after its dependencies, so that /init can insmod in list order (busybox
# insmod does not resolve dependencies).
add_module_path() {
  local rel=$1 dep deps
  [ -n "${ADDED[$rel]:-}" ] && return 0
  ADDED[$rel]=1
  read -ra deps <<<"$(awk -F': ' -v m="$rel" '$1 == m {print $2}' "$MODDIR/modules.dep")"
  for dep in "${deps[@]}"; do add_module_path "$dep"; done
  LOAD_ORDER+=("$rel")
}

# busybox insmod reads plain .ko files only.
unpack_module() {
  local rel=$1 base
  base=$(basename "$rel")
  base=${base%.xz}
  base=${base%.zst}
  base=${base%.gz}
  case $rel in
    *.xz) xz -dc "$MODDIR/$rel" >"$ROOT/lib/modules/$base" ;;
    *.zst) zstd -dcq "$MODDIR/$rel" >"$ROOT/lib/modules/$base" ;;
    *.gz) gzip -dc "$MODDIR/$rel" >"$ROOT/lib/modules/$base" ;;
    *) cp "$MODDIR/$rel" "$ROOT/lib/modules/$base" ;;
  esac
  echo "${base%.ko}" >>"$ROOT/lib/modules/load-order"
}

add_modules() {
  local m rel
  for m in $MODULES; do
    rel=$(module_path "$m")
    if [ -n "$rel" ]; then
      add_module_path "$rel"
    elif ! grep -qE "/$m\.ko$" "$MODDIR/modules.builtin"; then
      echo "initramfs: kernel $KVER has no module $m" >&2
      exit 1
    fi
  done
  : >"$ROOT/lib/modules/load-order"
  for rel in "${LOAD_ORDER[@]}"; do unpack_module "$rel"; done
}

# Copies a host binary into /usr/local/bin with every shared library ldd lists. Debug info is
# stripped (symbols stay for backtraces): the initramfs is unpacked into the guest's RAM.
add_binary() {
  local src=$1 name lib
  name=$(basename "$src")
  if ldd "$src" | grep -q 'not found'; then
    echo "initramfs: $src needs libraries this host lacks:" >&2
    ldd "$src" >&2
    exit 1
  fi
  if command -v objcopy >/dev/null; then
    objcopy --strip-debug "$src" "$ROOT/usr/local/bin/$name"
  else
    cp "$src" "$ROOT/usr/local/bin/$name"
  fi
  for lib in $(ldd "$src" | grep -oE '/[^ ]+\.so[^ ]*'); do
    case $lib in
      */ld-linux-x86-64.so.2) cp -L "$lib" "$ROOT/lib64/" ;;
      *) cp -L "$lib" "$ROOT/lib/x86_64-linux-gnu/" ;;
    esac
  done
}

# The guest's tools come from the host, as a distribution would ship them: e2fsprogs for the
# file systems, util-linux's fsfreeze, which the agent runs to quiesce (busybox's applet
# only takes --freeze/--unfreeze, not util-linux's -f/-u), and nbd-client, with which the
# guest attaches a point the host exports.
host_tool() {
  command -v "$1" || { echo "initramfs: $1 is not installed on this host" >&2; exit 1; }
}

make_tree
add_modules
for b in "$BIN_DIR/hindsight-agent" "$BIN_DIR/hindsight"; do add_binary "$b"; done
for t in mke2fs e2fsck fsfreeze nbd-client; do add_binary "$(host_tool "$t")"; done
(cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$OUT"
echo "initramfs: $(du -h "$OUT" | cut -f1) (modules: $(tr '\n' ' ' <"$ROOT/lib/modules/load-order"))"
