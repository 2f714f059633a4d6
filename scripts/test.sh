#!/usr/bin/env bash
# The test command: installs what the tests need, checks formatting and lints, builds every
# binary, runs each fuzz target for a bounded time, runs every test (unit, codec, journal, NBD
# with real clients, system tests that start target, engine and agents and drive them with
# qemu-io, qemu-img, nbdinfo, nbdcopy, fio and nbdfuse + loop + ext4), then the VM tier: the
# agent in a real Linux guest under QEMU with its ublk and kernel nbd devices
# (scripts/vm-test.sh; HS_VM=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
echo "== cargo build"
cargo build --workspace --bins -q
echo "== fuzz (bounded: ${HS_FUZZ_SECONDS:-20}s a target)"
scripts/fuzz.sh
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rc=0
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee "$log" || rc=$?
# One closing line for the whole run (cargo prints one per test binary).
passed=$(grep -E '^test result:' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -E '^test result:' "$log" | awk '{s += $6} END {print s + 0}')

echo "== VM tier"
vmlog=$(mktemp)
trap 'rm -f "$log" "$vmlog"' EXIT
vm_rc=0
scripts/vm-test.sh 2>&1 | tee "$vmlog" || vm_rc=$?
vm_line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$vmlog" | tail -1)
if [ -n "$vm_line" ]; then
  passed=$((passed + $(echo "$vm_line" | awk '{print $1}')))
  failed=$((failed + $(echo "$vm_line" | awk '{print $3}')))
elif [ "$vm_rc" -ne 0 ]; then
  # The tier could not even count (setup failed): that is one failure.
  failed=$((failed + 1))
fi
[ "$vm_rc" -eq 0 ] || rc=1

echo
echo "$passed passed, $failed failed"
exit $rc
