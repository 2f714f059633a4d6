#!/usr/bin/env bash
# The VM tier: hindsight-agent inside a real Linux guest. A Debian 6.12 kernel boots under
# QEMU (software emulation, no KVM needed) from a small initramfs; the agent serves the guest's
# two virtio disks as /dev/ublkb0 (ublk) and /dev/nbd0 (kernel nbd) and replicates them to an
# engine and a target running on this host. The guest (tests/vm/guest-test.sh) puts ext4 on
# both, places a quiesced bookmark, attaches that point of its nbd volume as this script
# exports it on request (`hindsight export`, forwarded by QEMU, with the guest's nbd-client
# and kernel nbd driver) and checks its files, kills the agent with SIGKILL in the middle of
# I/O and restarts it, and stops it; this script then recovers the bookmark and the newest
# point on the host (tests/vm/host-checks.sh) and compares them with the guest's disks and
# files. Then it fails the group over, boots a guest on the promoted volumes, fails back to
# the original disks and boots a guest on them (tests/vm/failover-checks.sh).
#
# Needs root for apt-get (QEMU's user-mode network needs no privileges). The last line is
# "N passed, M failed"; the exit status is 0 when nothing failed.
#
#   HS_VM=0               skip the tier
#   HS_VM_WORK=DIR        cache of the kernel and packages (default /var/tmp/hindsight-vm);
#                         each run works in a new directory under it
#   HS_VM_KEEP=1          keep the run directory (serial log, images, daemon logs)
#   HS_VM_PROFILE=release test build/release instead of build/debug
#   HS_VM_TIMEOUT=SECS    bound on the guest's whole run (default 300)
#   HS_VM_SHELL=1         boot to a shell on this terminal instead of running the test
#                         (the engine and target run; /guest-test.sh runs the test by hand)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VM_DIR=$ROOT/scripts/vm

if [ "${HS_VM:-1}" = 0 ]; then
  echo "VM tier skipped (HS_VM=0)"
  echo "0 passed, 0 failed"
  exit 0
fi

# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
# shellcheck source=tests/vm/host-checks.sh
source "$ROOT/tests/vm/host-checks.sh"
# shellcheck source=tests/vm/failover-checks.sh
source "$ROOT/tests/vm/failover-checks.sh"

WORK=${HS_VM_WORK:-/var/tmp/hindsight-vm}
PROFILE=${HS_VM_PROFILE:-debug}
TIMEOUT=${HS_VM_TIMEOUT:-300}
BIN=$ROOT/build/$PROFILE
GROUP=vmtier
# The address the guest dials for the engine; QEMU forwards it to 127.0.0.1 on this host.
GUEST_ENGINE_IP=10.0.2.100
DISK_SIZE=64M
RUN=
PHASES=()

step() { printf '\n== %s\n' "$*"; }

# Stops the daemons, an export and QEMU (lib.sh's cleanup), then removes the run directory.
vm_cleanup() {
  [ -n "$RUN" ] && [ -s "$RUN/export.pid" ] && kill "$(cat "$RUN/export.pid")" 2>/dev/null
  hs_cleanup
  [ -n "$RUN" ] && [ "${HS_VM_KEEP:-0}" != 1 ] && rm -rf "$RUN"
  return 0
}
trap vm_cleanup EXIT

now_us() { echo "${EPOCHREALTIME/./}"; }
# timed NAME CMD...: runs CMD in this shell and records how long it took.
timed() {
  local name=$1 t0 us
  shift
  t0=$(now_us)
  "$@"
  us=$(($(now_us) - t0))
  PHASES+=("$name $((us / 1000000)).$(((us % 1000000) / 100000))s")
}

# Builds only when a binary is missing: the test command builds before it runs this tier.
ensure_binaries() {
  if [ -x "$BIN/hindsight" ] && [ -x "$BIN/hindsight-agent" ]; then
    warn_if_stale
    return 0
  fi
  step "building ($PROFILE)"
  local flags=(--workspace --bins -q)
  [ "$PROFILE" = release ] && flags+=(--release)
  (cd "$ROOT" && cargo build "${flags[@]}")
}

# A source file newer than the binary that links it means the tier would test old code.
warn_if_stale() {
  stale_check hindsight-agent consistency splitter
  stale_check hindsight consistency engine target src
}
stale_check() {
  local bin=$1 newer
  shift
  newer=$(cd "$ROOT" && find "$@" -name '*.rs' -newer "$BIN/$bin" -print -quit)
  [ -z "$newer" ] || echo "warning: $newer is newer than build/$PROFILE/$bin: the tier tests an old binary (run cargo build)"
}

# The CA and the certificates, made with `hindsight certs`: the target ("dr") and the engine
# ("primary", also valid for the guest's address of the host, 10.0.2.100) on the host, and the
# agent of the VM "guest", whose files go into the initramfs (GUEST_TLS).
make_pki() {
  PKI=$RUN/pki
  HS=$BIN/hindsight hs_make_pki "$PKI" guest 127.0.0.1,10.0.2.100
  GUEST_TLS=$RUN/guest-tls
  mkdir -p "$GUEST_TLS"
  cp "$PKI/ca.pem" "$GUEST_TLS/ca.pem"
  cp "$PKI/agent-guest.pem" "$GUEST_TLS/agent.pem"
  cp "$PKI/agent-guest-key.pem" "$GUEST_TLS/agent-key.pem"
}

write_configs() {
  cat >"$RUN/target.toml" <<EOT
[target]
listen = "127.0.0.1:$TPORT"
data_dir = "$RUN/target"
retention = "24h"

[tls]
ca = "$PKI/ca.pem"
cert = "$PKI/target-dr.pem"
key = "$PKI/target-dr-key.pem"
engines = ["primary"]
EOT
  cat >"$RUN/engine.toml" <<EOT
[engine]
listen = "127.0.0.1:$EPORT"
data_dir = "$RUN/engine"

[tls]
ca = "$PKI/ca.pem"
cert = "$PKI/engine-primary.pem"
key = "$PKI/engine-primary-key.pem"

[[group]]
name = "$GROUP"
mode = "cdp"
target = "127.0.0.1:$TPORT"

[[group.volume]]
name = "ublk-vol"
vm = "guest"
size = "64MiB"

[[group.volume]]
name = "nbd-vol"
vm = "guest"
size = "64MiB"
EOT
}

# The guest's two local disks (sparse), the configs, and the target and engine on 127.0.0.1.
start_servers() {
  step "starting target and engine"
  truncate -s "$DISK_SIZE" "$RUN/vda.img" "$RUN/vdb.img"
  mkdir -p "$RUN/target" "$RUN/engine"
  EPORT=$(hs_free_port)
  TPORT=$(hs_free_port)
  XPORT=$(hs_free_port)
  write_configs
  hs_spawn target "$RUN/target.log" "$BIN/hindsight" target --config "$RUN/target.toml"
  hs_wait_tcp "$TPORT"
  hs_spawn engine "$RUN/engine.log" "$BIN/hindsight" engine --config "$RUN/engine.toml"
  hs_wait_tcp "$EPORT"
}

# qemu_command APPEND [VDA VDB [VDC [offline]]]: the QEMU command line in QEMU, on the guest's
# disks (default the run's vda.img and vdb.img) and, for a boot after a failover, a third disk
# with the files to find. restrict=on: the guest reaches nothing but the forwarded engine port.
# QEMU runs the socat once per guest connection, so an agent that reconnects gets a fresh one;
# with "offline" the engine port closes every connection at once (no engine at this site).
qemu_command() {
  local append=$1 vda=${2:-$RUN/vda.img} vdb=${3:-$RUN/vdb.img} vdc=${4:-} engine="socat - TCP:127.0.0.1:$EPORT" kver
  [ "${5:-}" != offline ] || engine=true
  kver=$(cat "$WORK/kver")
  # shellcheck disable=SC2054 # the commas belong to QEMU's option syntax
  QEMU=(qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 2 -m 512M -nographic -no-reboot
    -kernel "$WORK/kernel/boot/vmlinuz-$kver" -initrd "$RUN/initramfs.cpio.gz" -append "$append"
    -drive "file=$vda,format=raw,if=virtio,cache=writeback"
    -drive "file=$vdb,format=raw,if=virtio,cache=writeback"
    -netdev "user,id=n0,restrict=on,guestfwd=tcp:$GUEST_ENGINE_IP:$EPORT-cmd:$engine,guestfwd=tcp:$GUEST_ENGINE_IP:$XPORT-cmd:socat - TCP:127.0.0.1:$XPORT"
    -device virtio-net-pci,netdev=n0,romfile=)
  [ -z "$vdc" ] || QEMU+=(-drive "file=$vdc,format=raw,if=virtio,readonly=on")
}

# When the guest asks for it ("GVM-WANT-EXPORT BOOKMARK" on its console), serves its nbd-vol
# at that bookmark with `hindsight export` on 127.0.0.1:$XPORT, which QEMU forwards to the
# guest, until the run ends. The bookmark may take a moment to reach the target: the export
# is tried again until it starts.
export_on_request() {
  local qemu=$1 name pid
  # tail ends on SIGPIPE once sed has quit: not an error here.
  name=$(tail -n +1 -F --pid="$qemu" "$RUN/serial.log" 2>/dev/null |
    sed -un '/GVM-WANT-EXPORT /{s/\r$//; s/^.*GVM-WANT-EXPORT \([A-Za-z0-9._-]*\).*$/\1/p; q}') || true
  [ -n "$name" ] || return 0
  for _ in $(seq 60); do
    "$BIN/hindsight" export --config "$RUN/target.toml" --group "$GROUP" --volume nbd-vol --bookmark "$name" \
      --listen "tcp:127.0.0.1:$XPORT" >"$RUN/export.out" 2>"$RUN/export.log" &
    pid=$!
    echo "$pid" >"$RUN/export.pid"
    sleep 1
    if kill -0 "$pid" 2>/dev/null && grep -q '^exporting group' "$RUN/export.out"; then
      wait "$pid" || true
      return 0
    fi
    wait "$pid" 2>/dev/null || true
  done
}

# Boots the guest under a host timeout (a ublk device whose server is gone makes guest I/O
# wait, not fail), follows its result lines while it runs, and keeps the serial log.
boot_guest() {
  step "booting the guest (timeout ${TIMEOUT}s)"
  local append="console=ttyS0 panic=-1 quiet hs.engine=$GUEST_ENGINE_IP:$EPORT hs.export=$GUEST_ENGINE_IP:$XPORT"
  # The guest gives up a little before the host does, so that it can still print its logs.
  qemu_command "$append hs.deadline=$((TIMEOUT > 60 ? TIMEOUT - 20 : TIMEOUT * 2 / 3))"
  # Not hs_spawn: QEMU's stdin must not be the terminal, which -nographic would take over.
  timeout "$TIMEOUT" "${QEMU[@]}" </dev/null >"$RUN/serial.log" 2>&1 &
  local pid=$!
  HS_PIDS+=("$pid")
  export_on_request "$pid" &
  HS_PIDS+=("$!")
  tail -n +1 -F --pid="$pid" "$RUN/serial.log" 2>/dev/null |
    sed -un 's/\r$//; s/^.*\(GVM-\(OK\|FAIL\|INFO\|TEST-END\)\)/  \1/p' || true
  QEMU_STATUS=0
  wait "$pid" || QEMU_STATUS=$?
  # Kernel lines can precede a marker on the same serial line: keep from the first GVM- on.
  serial_text | grep -o 'GVM-.*' >"$MARKERS" || true
}

# The serial log without carriage returns and the firmware's terminal escapes.
serial_text() { sed 's/\r$//; s/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' "$RUN/serial.log"; }

shell_guest() {
  step "guest shell (leave with poweroff -f; the engine is at $GUEST_ENGINE_IP:$EPORT)"
  qemu_command "console=ttyS0 panic=-1 quiet hs.engine=$GUEST_ENGINE_IP:$EPORT hs.shell=1"
  "${QEMU[@]}"
}

check_guest_finished() {
  if ! grep -q '^GVM-TEST-END' "$MARKERS"; then
    host_fail guest-test-end "no GVM-TEST-END: the guest timed out, hung or panicked (QEMU status $QEMU_STATUS)"
  elif [ "$QEMU_STATUS" != 0 ]; then
    host_fail guest-test-end "the test ended but QEMU exited with status $QEMU_STATUS"
  else
    host_ok guest-test-end
  fi
}

host_checks() {
  step "host checks"
  check_guest_finished
  run_host_checks
}

failover_checks() {
  step "failover to the recovery site, a guest there, failback, the original guest"
  run_failover_checks
}

show_failure_logs() {
  step "serial log (last 60 lines)"
  serial_text | grep -v '^GVM-LOG ' | tail -n 60
  step "agent log (from the guest)"
  grep '^GVM-LOG ' "$MARKERS" | cut -c9- || echo "(none)"
  local d
  for d in engine target; do
    step "$d log (last 40 lines)"
    tail -n 40 "$RUN/$d.log"
  done
}

summary() {
  local passed failed
  passed=$(($(grep -c '^GVM-OK ' "$MARKERS" || true) + HOST_PASSED))
  failed=$(($(grep -c '^GVM-FAIL ' "$MARKERS" || true) + HOST_FAILED))
  ((failed == 0)) || show_failure_logs
  step "VM tier timings"
  printf '  %s\n' "${PHASES[@]}"
  [ "${HS_VM_KEEP:-0}" != 1 ] || echo "run files kept in $RUN"
  echo
  echo "$passed passed, $failed failed"
  ((failed == 0))
}

main() {
  local t0
  t0=$(now_us)
  step "host setup (packages, guest kernel in $WORK)"
  timed setup "$VM_DIR/setup-host.sh"
  timed build ensure_binaries
  RUN=$(mktemp -d "$WORK/run.XXXXXX")
  MARKERS=$RUN/markers.txt
  make_pki
  step "initramfs ($PROFILE binaries)"
  timed initramfs "$VM_DIR/build-initramfs.sh" "$BIN" "$RUN/initramfs.cpio.gz" "$GUEST_TLS"
  timed servers start_servers
  if [ "${HS_VM_SHELL:-0}" = 1 ]; then
    shell_guest
    return 0
  fi
  timed guest boot_guest
  timed host-checks host_checks
  timed failover failover_checks
  PHASES+=("total $((($(now_us) - t0) / 1000000))s")
  summary
}

main "$@"
