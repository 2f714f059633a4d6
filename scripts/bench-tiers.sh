#!/usr/bin/env bash
# Tiered history over time (`scripts/bench.sh tiers`): two clusters side by side on this
# machine (plaintext, cdp, one 1 GiB volume each), the same fio workload on both (random writes
# of 4-64 KiB at a fixed rate, zipf-distributed as a database's hot blocks are, through the
# agent's NBD socket), one target with a flat window
# that keeps every write, one with retention tiers compressed in time so that every tier
# transition happens within the run. Every minute, and at the end, prints for each target the
# bytes it wrote (/proc/PID/io write_bytes) per byte of guest writes, the space its journal,
# thinned segments, base and replica images take on disk (du), and for the tiered one each tier's
# points and bytes (hindsight history --json).
#
#   HS_BENCH_SECS=1800       run length (default 30 minutes)
#   HS_BENCH_RATE=2m         fio's write rate
#   HS_BENCH_TIERS='...'     the tiers' TOML (default: every write for 2m, a point per 10s to
#                            10m, a point per 1m to 25m)
#   HS_BENCH_BIN=dir         take the binaries from dir instead of building
#   HS_BENCH_DIR=dir         where files go, kept afterwards (default: a temporary directory)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
SECS=${HS_BENCH_SECS:-1800}
RATE=${HS_BENCH_RATE:-2m}
TIERS=${HS_BENCH_TIERS:-$'[[target.tier]]\nevery = "write"\nfor = "2m"\n[[target.tier]]\nevery = "10s"\nfor = "10m"\n[[target.tier]]\nevery = "1m"\nfor = "25m"'}
"$ROOT/scripts/install-deps.sh"
hs_bench_bin "$ROOT"
WORK=${HS_BENCH_DIR:-$(mktemp -d /tmp/hindsight-bench-tiers.XXXXXX)}
[ -n "${HS_BENCH_DIR:-}" ] || hs_undo "rm -rf '$WORK'"
export HS_PLAINTEXT=1 HS_MODE=cdp

# start NAME TARGET_LINES: a cluster in $WORK/NAME; its target's PID in TARGET_<NAME>.
declare -A TARGET_PID
start() {
  local name=$1 lines=$2 d=$WORK/$1
  mkdir -p "$d"
  TPORT=$(hs_free_port) EPORT=$(hs_free_port)
  export TPORT EPORT
  truncate -s 1G "$d/disk.img"
  hs_write_configs "$d" g1 vm1 vol 1GiB "$d/disk.img" "$d/agent.sock" "$lines"
  hs_start_cluster "$d" "$BIN" "$d/agent.sock" >/dev/null
  TARGET_PID[$name]=$HS_TARGET_PID
}
start flat $'retention = "24h"\njournal_size = "100GiB"'
start tiered "$TIERS"

written() { awk '/^write_bytes:/ {print $2}' "/proc/$1/io"; }
space() { du -s -B1 "$1" 2>/dev/null | awk '{print $1}' || echo 0; }
declare -A W0
for n in flat tiered; do W0[$n]=$(written "${TARGET_PID[$n]}"); done

for n in flat tiered; do
  fio --name="$n" --ioengine=nbd --uri="nbd+unix:///vol?socket=$WORK/$n/agent.sock" --size=1G --rw=randwrite \
    --bssplit=4k/40:16k/30:64k/30 --random_distribution=zipf:1.1 --rate="$RATE" --time_based --runtime="$SECS" --output-format=json \
    >"$WORK/$n/fio.json" 2>"$WORK/$n/fio.err" &
  echo $! >"$WORK/$n/fio.pid"
done

report() {
  local n d g
  for n in flat tiered; do
    d=$WORK/$n/target/groups/g1
    printf '%s t=%ss target_written=%s journal=%s thin=%s base=%s replica=%s\n' "$n" "$1" \
      "$(($(written "${TARGET_PID[$n]}") - ${W0[$n]}))" "$(space "$d/journal")" "$(space "$d/thin")" "$(space "$d/base")" "$(space "$d/replica")"
  done
  "$BIN/hindsight" history --json --group g1 --config "$WORK/tiered/target.toml" 2>/dev/null | python3 -c '
import json, sys
h = json.load(sys.stdin)
for t in h.get("tiers", []):
    print("  tier every %-6s to %-4s points %6d bytes %12d" % (t["every"], t["until"], t["points"], t["bytes"]))
' || true
}

start_s=$(date +%s)
while true; do
  sleep 60
  el=$(($(date +%s) - start_s))
  report "$el"
  [ "$el" -lt "$SECS" ] || break
done
for n in flat tiered; do
  while kill -0 "$(cat "$WORK/$n/fio.pid")" 2>/dev/null; do sleep 1; done
done
sleep 5
echo "== at the end"
report "$SECS"
for n in flat tiered; do
  guest=$(python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):]); print(j["jobs"][0]["write"]["io_bytes"])' "$WORK/$n/fio.json")
  d=$WORK/$n/target/groups/g1
  python3 - "$n" "$guest" "$(($(written "${TARGET_PID[$n]}") - ${W0[$n]}))" "$(space "$d/journal")" "$(space "$d/thin")" "$(space "$d/base")" <<'EOF'
import sys
n, guest, written, journal, thin, base = sys.argv[1], *map(int, sys.argv[2:])
print("%s: guest writes %.1f MB; target wrote %.1f MB = %.2fx; history (journal + thinned) %.1f MB = %.2fx the guest's writes; base images %.1f MB (sparse)" % (
    n, guest / 1e6, written / 1e6, written / guest, (journal + thin) / 1e6, (journal + thin) / guest, base / 1e6))
EOF
done
