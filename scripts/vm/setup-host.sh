#!/usr/bin/env bash
# Prepares the host for the VM tier: installs QEMU and the tools that build and drive the
# guest, and downloads the guest kernel. Idempotent; needs root (apt-get). Everything it
# downloads is kept in $HS_VM_WORK so later runs start offline and fast.
#
# The guest kernel is Debian's bookworm-backports "cloud" kernel (6.12): bookworm's own 6.1
# kernel is built without ublk (CONFIG_BLK_DEV_UBLK is not set), and the cloud flavour is the
# smallest one that has nbd and ublk_drv as modules. On success $HS_VM_WORK/kver names the
# kernel release and $HS_VM_WORK/kernel holds the unpacked package with its modules.dep.
set -euo pipefail

WORK=${HS_VM_WORK:-/var/tmp/hindsight-vm}
KERNEL_META=linux-image-cloud-amd64
SUITE=bookworm-backports
export DEBIAN_FRONTEND=noninteractive

log() { echo "vm setup: $*"; }

# Adds bookworm-backports on the mirror the machine already uses for bookworm. Backports are
# pinned low by default, so nothing else on the host is upgraded by this.
add_backports() {
  grep -rqs "$SUITE" /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
  local mirror
  mirror=$(awk '/^URIs:/{u=$2} /^Suites:.*bookworm( |$)/{print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $3=="bookworm"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  if [ -z "$mirror" ]; then
    echo "vm setup: no bookworm entry in the apt sources to take the $SUITE mirror from;" \
      "add $SUITE to /etc/apt/sources.list.d/ and run again" >&2
    exit 1
  fi
  log "adding $SUITE ($mirror)"
  cat >/etc/apt/sources.list.d/$SUITE.sources <<EOT
Types: deb
URIs: $mirror
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOT
  apt-get update -q >/dev/null
}

apt_lists_have_backports() { compgen -G "/var/lib/apt/lists/*${SUITE}*Packages*" >/dev/null; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# QEMU must come from backports (10.x): bookworm's 7.2 TCG crashes 6.12 guests at random
# (double faults), and installing it would replace a newer qemu-utils already on the host.
install_qemu() {
  local v
  v=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
  if [ -z "$v" ] || dpkg --compare-versions "$v" lt 1:10; then
    log "installing qemu-system-x86 and qemu-utils from $SUITE"
    apt-get install -y -q --no-install-recommends -t "$SUITE" qemu-system-x86 qemu-utils >/dev/null
  fi
}

# busybox-static: the guest's userland. kmod: depmod. e2fsprogs: mke2fs and e2fsck for the
# guest, debugfs and e2fsck for the host checks. cpio, xz-utils: the initramfs and the
# kernel's .ko.xz modules. socat: carries each guest connection to the engine (and to an
# export). nbd-client: the guest attaches an exported point with it.
install_tools() {
  local need=() p
  for p in busybox-static kmod e2fsprogs cpio xz-utils socat nbd-client; do
    installed "$p" || need+=("$p")
  done
  command -v python3 >/dev/null || need+=(python3)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  fi
}

# apt-get download as root prints a harmless warning about sandboxing; keep the output quiet.
download() { apt-get download -qq "$1" 2>&1 | grep -v 'Download is performed unsandboxed' || true; }

# Prints the versioned kernel package behind the metapackage (backports keeps only its newest
# upload, so the ABI name changes over time and is never written down here).
kernel_package() {
  apt-cache show "$KERNEL_META/$SUITE" 2>/dev/null | awk '/^Depends:/{print $2; exit}'
}

fetch_kernel() {
  local pkg deb
  pkg=$(kernel_package)
  if [ -z "$pkg" ]; then
    apt-get update -q >/dev/null
    pkg=$(kernel_package)
  fi
  [ -n "$pkg" ] || { echo "vm setup: apt knows no $KERNEL_META in $SUITE" >&2; exit 1; }
  mkdir -p "$WORK/debs"
  deb=$(compgen -G "$WORK/debs/${pkg}_*.deb" | head -1 || true)
  if [ -z "$deb" ]; then
    log "downloading $pkg"
    (cd "$WORK/debs" && download "$pkg/$SUITE")
    deb=$(compgen -G "$WORK/debs/${pkg}_*.deb" | head -1 || true)
    if [ -z "$deb" ]; then # stale package lists name an upload the mirror no longer has
      apt-get update -q >/dev/null
      pkg=$(kernel_package)
      (cd "$WORK/debs" && download "$pkg/$SUITE")
      deb=$(compgen -G "$WORK/debs/${pkg}_*.deb" | head -1 || true)
    fi
    [ -n "$deb" ] || { echo "vm setup: could not download $pkg from $SUITE" >&2; exit 1; }
  fi
  unpack_kernel "$deb"
}

# Unpacks the kernel once per package file. The .deb ships no modules.dep (its postinst makes
# it), so depmod builds one for the unpacked tree.
unpack_kernel() {
  local deb=$1 kver
  if [ -f "$WORK/kernel/.from" ] && [ "$(cat "$WORK/kernel/.from")" = "$(basename "$deb")" ] && [ -s "$WORK/kver" ]; then
    return 0
  fi
  log "unpacking $(basename "$deb")"
  rm -rf "$WORK/kernel"
  mkdir -p "$WORK/kernel"
  dpkg-deb -x "$deb" "$WORK/kernel"
  kver=$(ls "$WORK/kernel/lib/modules")
  depmod -b "$WORK/kernel" "$kver"
  grep -q '^CONFIG_BLK_DEV_UBLK=m' "$WORK/kernel/boot/config-$kver" ||
    { echo "vm setup: kernel $kver has no ublk module" >&2; exit 1; }
  echo "$kver" >"$WORK/kver"
  basename "$deb" >"$WORK/kernel/.from"
}

main() {
  mkdir -p "$WORK"
  add_backports
  apt_lists_have_backports || apt-get update -q >/dev/null
  install_qemu
  install_tools
  fetch_kernel
  log "kernel $(cat "$WORK/kver") in $WORK/kernel"
}

main "$@"
