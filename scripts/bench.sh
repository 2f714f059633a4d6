#!/usr/bin/env bash
# Benchmarks hindsight-agent (replicating in cdp mode to an engine and a target on this
# machine) against qemu-nbd (page cache, and --cache=none) and nbdkit serving the same kind of
# backing file, in the same run,
# with fio's nbd engine. Prints IOPS, MB/s, p50/p99 completion latency and the ratios.
# The servers take turns, round after round, each starting fresh; every figure is the median
# of the rounds (a machine shared with other work varies by a fifth from one run to the next),
# and the IOPS column shows the lowest and highest round too.
#
#   HS_BENCH_RUNTIME=20   seconds per fio job      HS_BENCH_SIZE=1G   backing file size
#   HS_BENCH_ROUNDS=3     rounds (1 for a quick look)
#   HS_BENCH_DIR=dir      where files go, kept afterwards (default: a new temporary directory,
#                         removed at the end: the images and journals take many GiB)
#   HS_BENCH_JOBS="4k-randwrite-qd32 1m-seqwrite-qd8"   only these jobs (default: all)
#   HS_BENCH_SERVERS="qemu-nbd hindsight"                only these servers (default: all)
#
# `scripts/bench.sh link` runs the benchmarks of the modes and the link instead
# (tests/bench_link.rs: bytes on the wire per GiB by mode, sync QD1 latency against the link's
# delay, cdp lag at 80 % of a capped link, CPU per GiB of compression), through the test
# suite's WAN emulator; each result line starts with BENCH. `scripts/bench.sh failover` runs
# tests/bench_failover.rs: failover and failback times and bytes (docs/benchmarks.md);
# `scripts/bench.sh cluster` runs tests/bench_cluster.rs: engine-cluster takeover and handover.
# `scripts/bench.sh tiers` (scripts/bench-tiers.sh) runs one target with a flat window and one
# with retention tiers compressed in time side by side for 30 minutes under the same writes:
# bytes each target writes per byte of guest writes, and the space its history takes.
# `scripts/bench.sh scale N...` (scripts/bench-scale.sh) prints the threads, the memory and
# the start-up time of target, engine and agent with N groups of one volume each.
#
# `scripts/bench.sh peers` (scripts/bench-peers.sh) measures Hindsight against replicating
# peers in the same run: qemu-nbd with nothing replicated, and QEMU's mirror made of stock QEMU
# tools (qemu-storage-daemon mirroring to a second qemu-nbd, copy-mode write-blocking as the
# sync peer and background as the async one), against Hindsight sync, cdp and async over TLS and
# in plaintext, each on a fresh file. Per server and job (4k randwrite QD32 and QD1, 1m seqwrite
# QD8): IOPS, MB/s, p50/p99 latency, each process's CPU seconds per GB written and peak RSS,
# whether the replica kept up (a round where it did not is invalid), and the ratios sync /
# write-blocking, async / background, cdp / qemu-nbd. `scripts/bench.sh quick` is its short
# regression guard, under 3 minutes: 1 round of 5 s jobs, plaintext, qemu-nbd, the write-blocking
# mirror, Hindsight sync and cdp. Both take HS_BENCH_BIN=dir to use built binaries.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ "${1:-}" = peers ] || [ "${1:-}" = quick ]; then
  exec "$ROOT/scripts/bench-peers.sh" "$1"
fi
if [ "${1:-}" = tiers ]; then
  exec "$ROOT/scripts/bench-tiers.sh"
fi
if [ "${1:-}" = recovery ]; then
  exec "$ROOT/scripts/bench-recovery.sh"
fi
if [ "${1:-}" = scale ]; then
  shift
  exec "$ROOT/scripts/bench-scale.sh" "$@"
fi
if [ "${1:-}" = failover ]; then
  # tests/bench_failover.rs: failover to the latest point and to an earlier one, a planned move
  # under a writer, failback's shipped bytes; HS_BENCH_FAILOVER_SIZES="1G 16G" by default.
  "$ROOT/scripts/install-deps.sh"
  cd "$ROOT"
  cargo build --release --workspace --bins -q
  exec cargo test --release -q --test bench_failover -- --ignored --nocapture --test-threads=1
fi
if [ "${1:-}" = cluster ]; then
  # tests/bench_cluster.rs: takeover after kill -9 of the owner (20 rounds; HS_BENCH_TAKEOVERS,
  # HS_BENCH_LEASE_TTL="5s") and the pause of the planned handover back (docs/ha.md).
  "$ROOT/scripts/install-deps.sh"
  cd "$ROOT"
  cargo build --release --workspace --bins -q
  exec cargo test --release -q --test bench_cluster -- --ignored --nocapture --test-threads=1
fi
if [ "${1:-}" = link ]; then
  "$ROOT/scripts/install-deps.sh"
  cd "$ROOT"
  cargo build --release --workspace --bins -q
  exec cargo test --release -q --test bench_link -- --ignored --nocapture --test-threads=1
fi
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
RUNTIME=${HS_BENCH_RUNTIME:-20}
SIZE=${HS_BENCH_SIZE:-1G}
ROUNDS=${HS_BENCH_ROUNDS:-3}
if ! [[ $ROUNDS =~ ^[1-9][0-9]*$ ]]; then
  echo "HS_BENCH_ROUNDS=$ROUNDS: give a number of rounds, 1 or more" >&2
  exit 2
fi
"$ROOT/scripts/install-deps.sh"
(cd "$ROOT" && cargo build --release --workspace --bins -q)
BIN=$ROOT/build/release
WORK=${HS_BENCH_DIR:-$(mktemp -d /tmp/hindsight-bench.XXXXXX)}
mkdir -p "$WORK"
RESULTS=$WORK/results.tsv
: >"$RESULTS"

JOBS=(
  "4k-randwrite-qd32|--rw=randwrite --bs=4k --iodepth=32"
  "4k-randwrite-qd1|--rw=randwrite --bs=4k --iodepth=1"
  "1m-seqwrite-qd8|--rw=write --bs=1m --iodepth=8"
  "4k-randread-qd32|--rw=randread --bs=4k --iodepth=32"
)

# fio_run NAME URI JOBNAME FIO-ARGS: one fio run, one line of results. Each run starts with
# nothing dirty in the page cache: what an earlier run left to write back would otherwise be
# written during this one, on the same disk.
fio_run() {
  local server=$1 uri=$2 job=$3 args=$4 json=$WORK/$1-$3-round$ROUND.json
  sync
  # shellcheck disable=SC2086
  fio --name="$job" --ioengine=nbd --uri="$uri" $args --size="$SIZE" --time_based --runtime="$RUNTIME" \
      --ramp_time=2 --numjobs=1 --group_reporting --output-format=json --output="$json" >/dev/null
  python3 - "$json" "$server" "$job" >>"$RESULTS" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["jobs"][0]
op = d["write"] if d["write"]["io_bytes"] > 0 else d["read"]
pct = op["clat_ns"].get("percentile", {})
print("\t".join([sys.argv[2], sys.argv[3], "%.0f" % op["iops"], "%.1f" % (op["bw_bytes"] / 1e6),
                 "%.0f" % (pct.get("50.000000", 0) / 1e3), "%.0f" % (pct.get("99.000000", 0) / 1e3)]))
PY
}

bench_server() { # NAME URI
  local j
  for j in "${JOBS[@]}"; do
    if [ -n "${HS_BENCH_JOBS:-}" ] && [[ " $HS_BENCH_JOBS " != *" ${j%%|*} "* ]]; then continue; fi
    fio_run "$1" "$2" "${j%%|*}" "${j#*|}"
  done
}

# wanted NAME: is this server to be measured?
wanted() { [ -z "${HS_BENCH_SERVERS:-}" ] || [[ " $HS_BENCH_SERVERS " == *" $1 "* ]]; }

fresh_file() { rm -f "$1"; truncate -s "$SIZE" "$1"; }

# bench_peer NAME IMAGE SOCKET CMD...: measures a peer server CMD that serves IMAGE (made
# fresh) on SOCKET, then stops it. A socket left by an earlier round is removed first, so
# that waiting for it waits for this server.
bench_peer() {
  local name=$1 image=$2 sock=$3 pid; shift 3
  fresh_file "$image"
  rm -f "$sock"
  hs_spawn "$name" "$WORK/$name.log" "$@"
  pid=$HS_PID
  hs_wait_sock "$sock"
  bench_server "$name" "nbd+unix:///?socket=$sock"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

# fresh_cluster: a fresh local disk for the agent, no journals, no socket of an earlier round.
fresh_cluster() {
  fresh_file "$WORK/agent.img"
  rm -rf "$WORK/engine" "$WORK/target" "$WORK/agent.sock"
}

EPORT=$(hs_free_port); TPORT=$(hs_free_port)
fresh_file "$WORK/agent.img"
BYTES=$(stat -c %s "$WORK/agent.img")
hs_write_configs "$WORK" bench bench-vm vol "$BYTES" "$WORK/agent.img" "$WORK/agent.sock" 'journal_size = "4GiB"'

for ROUND in $(seq "$ROUNDS"); do
  echo "==== round $ROUND of $ROUNDS"
  if wanted qemu-nbd; then
    echo "== qemu-nbd (default cache: writeback)"
    bench_peer qemu-nbd "$WORK/qemu.img" "$WORK/qemu.sock" \
      qemu-nbd -t -e 8 -f raw -k "$WORK/qemu.sock" "$WORK/qemu.img"
  fi

  if wanted qemu-nbd-direct; then
    echo "== qemu-nbd --cache=none (O_DIRECT: every write reaches the disk before its reply)"
    bench_peer qemu-nbd-direct "$WORK/qemu-direct.img" "$WORK/qemu-direct.sock" \
      qemu-nbd -t -e 8 --cache=none --aio=threads -f raw -k "$WORK/qemu-direct.sock" "$WORK/qemu-direct.img"
  fi

  if wanted nbdkit; then
    echo "== nbdkit file plugin"
    bench_peer nbdkit "$WORK/nbdkit.img" "$WORK/nbdkit.sock" \
      nbdkit -f -U "$WORK/nbdkit.sock" file "$WORK/nbdkit.img"
  fi

  if wanted hindsight; then
    echo "== hindsight-agent, replicating (cdp) to an engine and a target on this machine"
    fresh_cluster
    hs_start_cluster "$WORK" "$BIN" "$WORK/agent.sock"
    bench_server hindsight "nbd+unix:///vol?socket=$WORK/agent.sock"
    hs_cleanup
  fi

  if wanted hindsight-no-target; then
    echo "== hindsight-agent and engine only (target not running: the engine journals and acks, ships nothing)"
    echo "   shows what the co-located recovery site costs on this machine; not a replicating figure"
    fresh_cluster
    hs_spawn engine "$WORK/engine-only.log" "$BIN/hindsight" engine --config "$WORK/engine.toml"
    hs_wait_tcp "$EPORT"
    hs_spawn agent "$WORK/agent-only.log" "$BIN/hindsight-agent" --config "$WORK/agent.toml"
    hs_wait_sock "$WORK/agent.sock"
    bench_server hindsight-no-target "nbd+unix:///vol?socket=$WORK/agent.sock"
    hs_cleanup
  fi
done

echo
echo "== results ($(nproc) vCPU, $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ), runtime ${RUNTIME}s per job, file $SIZE, median of $ROUNDS round(s))"
python3 - "$RESULTS" <<'PY'
import sys
from statistics import median
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
runs, jobs = {}, []
for r in rows:
    runs.setdefault((r[0], r[1]), []).append([float(x) for x in r[2:6]])
    if r[1] not in jobs: jobs.append(r[1])
# The median of each column over the rounds.
res = {k: [median(col) for col in zip(*v)] for k, v in runs.items()}
print("| job | server | IOPS (median) | IOPS (lowest-highest) | MB/s | p50 µs | p99 µs | hindsight / this |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for j in jobs:
    h = res.get(("hindsight", j))
    for s in ("hindsight", "hindsight-no-target", "qemu-nbd", "qemu-nbd-direct", "nbdkit"):
        r = res.get((s, j))
        if not r: continue
        iops = [x[0] for x in runs[(s, j)]]
        ratio = "" if s.startswith("hindsight") or not h else "%.2f" % (h[0] / max(r[0], 1))
        print(f"| {j} | {s} | {r[0]:.0f} | {min(iops):.0f}-{max(iops):.0f} | {r[1]:.1f} | {r[2]:.0f} | {r[3]:.0f} | {ratio} |")
PY
# The images and journals take many GiB: kept only in a directory the caller chose.
if [ -z "${HS_BENCH_DIR:-}" ]; then
  rm -rf "$WORK"
fi
