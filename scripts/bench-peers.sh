#!/usr/bin/env bash
# Benchmarks Hindsight against replicating peers made of stock QEMU tools, side by side in one
# run (`scripts/bench.sh peers`; `scripts/bench.sh quick` is the short regression guard below).
# Every server gets a fresh sparse file (fresh files each round), serves it over NBD on a unix
# socket, and fio's nbd engine drives it:
#   - qemu-nbd (page cache, no replication): what serving the file costs with nothing to replicate;
#   - mirror-write-blocking, mirror-background: QEMU's mirror. qemu-storage-daemon serves a local
#     raw file through a blockdev-mirror job (sync=full, filter-node-name set) whose target is an
#     NBD blockdev served by a second qemu-nbd on another file (the replica). write-blocking
#     sends each write to the replica before it completes (the sync peer); background leaves a
#     copier to follow the dirty bitmap (the async peer). The NBD export goes on the mirror's
#     filter node once the job is ready, so that no write gets past the mirror;
#   - hindsight-{sync,cdp,async}-{tls,plain}: the agent, the engine and the target on this
#     machine, over TLS and in plaintext (insecure_plaintext, loopback only).
# Jobs: 4k randwrite QD32, 4k randwrite QD1, 1m seqwrite QD8, one after the other on the same
# server. For each server and job: IOPS, MB/s, p50/p99 completion latency, and for each process
# of the server its CPU seconds (utime + stime, from the end of fio's ramp until the replica
# has caught up) per GB that fio wrote, and its peak RSS (VmHWM, reset before the job; as
# root, else the peak since the server started). After each job the replica is checked (the
# mirror job still exists, is ready, the export is on its filter node and, write-blocking, it
# is actively synced; the Hindsight group runs its mode, the target is connected, and a sync
# group never degraded); a round that fails is marked invalid and left out of the medians,
# and the script exits 1. Then the script waits for the replica to catch up (a background
# mirror or an async group has a backlog when fio stops): the table shows that backlog and
# how long it took. Every figure is the median of the valid rounds; the servers take turns,
# each round starting one server later. Ratios: Hindsight sync / write-blocking mirror,
# Hindsight async / background mirror, Hindsight cdp / qemu-nbd.
# CPU is counted per process: the kernel's writeback threads, which write a page-cache
# server's dirty pages to the disk, are no one's.
#
#   HS_BENCH_RUNTIME=20    seconds per fio job, after a ramp of HS_BENCH_RAMP=2 seconds
#   HS_BENCH_SIZE=1G       size of every file
#   HS_BENCH_ROUNDS=3      rounds
#   HS_BENCH_SERVERS=...   only these servers (default: all, as named above)
#   HS_BENCH_TLS="tls plain"   the links Hindsight is measured over
#   HS_BENCH_JOBS="4k-randwrite-qd32 1m-seqwrite-qd8"   only these jobs (default: all)
#   HS_BENCH_SETTLE=120    most seconds to wait after a job for the replica to catch up
#   HS_BENCH_INTERVAL=5s   the async group's interval (engine default 30s)
#   HS_BENCH_QSD_AIO=threads   aio= of the mirror's local file: threads | io_uring | native
#   HS_BENCH_BIN=dir       take hindsight and hindsight-agent from dir (default: build them,
#                          cargo build --release, and take build/release)
#   HS_BENCH_DIR=dir       where files go, kept afterwards (default: a new temporary
#                          directory, removed at the end)
#   HS_BENCH_MIN_RATIO=x   also exit 1 when a Hindsight / peer IOPS ratio is below x
#
# `scripts/bench-peers.sh quick` (`scripts/bench.sh quick`): 1 round, 5 s per job, plaintext
# only, servers qemu-nbd, mirror-write-blocking, hindsight-sync-plain and hindsight-cdp-plain;
# the same tables and ratios in under 3 minutes. The knobs above still apply.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

QUICK=
case ${1:-} in
  quick) QUICK=1 ;;
  "" | peers) ;;
  *)
    echo "usage: $0 [quick]" >&2
    exit 2
    ;;
esac
RUNTIME=${HS_BENCH_RUNTIME:-${QUICK:+5}}
RUNTIME=${RUNTIME:-20}
ROUNDS=${HS_BENCH_ROUNDS:-${QUICK:+1}}
ROUNDS=${ROUNDS:-3}
TLS=${HS_BENCH_TLS:-${QUICK:+plain}}
TLS=${TLS:-tls plain}
SERVERS=${HS_BENCH_SERVERS:-${QUICK:+qemu-nbd mirror-write-blocking hindsight-sync-plain hindsight-cdp-plain}}
RAMP=${HS_BENCH_RAMP:-2}
SIZE=${HS_BENCH_SIZE:-1G}
SETTLE=${HS_BENCH_SETTLE:-120}
INTERVAL=${HS_BENCH_INTERVAL:-5s}
QSD_AIO=${HS_BENCH_QSD_AIO:-threads}
for knob in RUNTIME ROUNDS RAMP SETTLE; do
  [[ ${!knob} =~ ^[0-9]+$ ]] || { echo "HS_BENCH_$knob=${!knob}: give a whole number" >&2; exit 2; }
done
[ "$ROUNDS" -ge 1 ] || { echo "HS_BENCH_ROUNDS=0: give a number of rounds, 1 or more" >&2; exit 2; }

# Every server, in the order of the tables.
ALL=(qemu-nbd mirror-write-blocking mirror-background)
for m in sync cdp async; do
  for t in tls plain; do ALL+=("hindsight-$m-$t"); done
done
for s in $SERVERS; do
  [[ " ${ALL[*]} " == *" $s "* ]] || { echo "HS_BENCH_SERVERS: no server $s; the servers are: ${ALL[*]}" >&2; exit 2; }
done
for t in $TLS; do
  [[ $t == tls || $t == plain ]] || { echo "HS_BENCH_TLS: $t is neither tls nor plain" >&2; exit 2; }
done
RUN=()
for s in "${ALL[@]}"; do
  if [ -n "$SERVERS" ] && [[ " $SERVERS " != *" $s "* ]]; then continue; fi
  if [[ $s == hindsight-* ]] && [[ " $TLS " != *" ${s##*-} "* ]]; then continue; fi
  RUN+=("$s")
done
[ ${#RUN[@]} -gt 0 ] || { echo "no server left to measure (HS_BENCH_SERVERS, HS_BENCH_TLS)" >&2; exit 2; }

JOBS=(
  "4k-randwrite-qd32|--rw=randwrite --bs=4k --iodepth=32"
  "4k-randwrite-qd1|--rw=randwrite --bs=4k --iodepth=1"
  "1m-seqwrite-qd8|--rw=write --bs=1m --iodepth=8"
)
for j in ${HS_BENCH_JOBS:-}; do
  [[ " ${JOBS[*]%%|*} " == *" $j "* ]] || { echo "HS_BENCH_JOBS: no job $j; the jobs are: ${JOBS[*]%%|*}" >&2; exit 2; }
done

"$ROOT/scripts/install-deps.sh"
hs_bench_bin "$ROOT"
for b in hindsight hindsight-agent; do
  [ -x "$BIN/$b" ] || { echo "$BIN/$b is missing; build it (cargo build --release) or point HS_BENCH_BIN at it" >&2; exit 2; }
done
WORK=${HS_BENCH_DIR:-$(mktemp -d /tmp/hindsight-bench-peers.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
# The images and journals take many GiB: kept only in a directory the caller chose.
trap 'hs_cleanup; if [ -z "${HS_BENCH_DIR:-}" ]; then rm -rf "$WORK"; fi' EXIT
RESULTS=$WORK/results.tsv
: >"$RESULTS"
TCK=$(getconf CLK_TCK)

fresh_file() { rm -f "$1"; truncate -s "$SIZE" "$1"; }
qmp() { python3 "$ROOT/scripts/qmp.py" "$@"; }

# The processes of the running server, for the CPU and memory figures, and its NBD URI.
PROC_NAMES=()
PROC_PIDS=()
URI=

# cpu_ticks: utime + stime of each process of the server, in clock ticks, on one line (0 for
# a process that is gone). The command name in /proc/PID/stat may hold spaces; the fields
# after its closing parenthesis do not.
cpu_ticks() {
  local pid stat f out=()
  for pid in "${PROC_PIDS[@]}"; do
    if stat=$(cat "/proc/$pid/stat" 2>/dev/null); then
      read -r -a f <<<"${stat##*) }"
      out+=($((f[11] + f[12])))
    else
      out+=(0)
    fi
  done
  echo "${out[*]}"
}

# peak_rss: VmHWM of each process, in kB, on one line.
peak_rss() {
  local pid out=()
  for pid in "${PROC_PIDS[@]}"; do
    out+=("$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)")
  done
  echo "${out[*]}"
}

# reset_peak_rss: starts each process's VmHWM again from its current RSS (needs root).
reset_peak_rss() {
  local pid
  for pid in "${PROC_PIDS[@]}"; do { echo 5 >"/proc/$pid/clear_refs"; } 2>/dev/null || true; done
}

# wait_exit PID SECS: waits for a process to exit; fails if it is still there after SECS.
wait_exit() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}

# ---- qemu-nbd: the reference, nothing replicated.
start_qemu_nbd() { # DIR
  fresh_file "$1/disk.img"
  hs_spawn qemu-nbd "$1/qemu-nbd.log" qemu-nbd -t -e 8 -f raw -k "$1/nbd.sock" "$1/disk.img"
  PROC_NAMES=(qemu-nbd)
  PROC_PIDS=("$HS_PID")
  hs_wait_sock "$1/nbd.sock" || return 1
  URI="nbd+unix:///?socket=$1/nbd.sock"
}

# ---- QEMU mirror: qemu-storage-daemon (node "local", the mirror job "mirror0" with its filter
# node "mirror-top", the export "disk") and qemu-nbd serving the replica.
start_mirror() { # DIR COPY_MODE
  local d=$1 mode=$2 check
  fresh_file "$d/local.img"
  fresh_file "$d/replica.img"
  hs_spawn qemu-nbd-replica "$d/replica.log" qemu-nbd -f raw --cache=writeback --discard=unmap --persistent \
    -x replica -k "$d/replica.sock" "$d/replica.img"
  PROC_NAMES=(qemu-nbd-replica)
  PROC_PIDS=("$HS_PID")
  hs_wait_sock "$d/replica.sock" || return 1
  hs_spawn qemu-storage-daemon "$d/qsd.log" qemu-storage-daemon \
    --chardev "socket,id=qmp0,path=$d/qmp.sock,server=on,wait=off" --monitor chardev=qmp0 \
    --blockdev "driver=file,node-name=local,filename=$d/local.img,aio=$QSD_AIO,cache.direct=off,discard=unmap" \
    --blockdev "driver=nbd,node-name=replica,server.type=unix,server.path=$d/replica.sock,export=replica,discard=unmap" \
    --nbd-server "addr.type=unix,addr.path=$d/qsd.sock"
  PROC_NAMES=(qemu-storage-daemon qemu-nbd-replica)
  PROC_PIDS=("$HS_PID" "${PROC_PIDS[0]}")
  QMP_CONNECT_WAIT=20 qmp "$d/qmp.sock" query-version >/dev/null || return 1
  qmp "$d/qmp.sock" blockdev-mirror "{\"job-id\":\"mirror0\",\"device\":\"local\",\"target\":\"replica\",\"sync\":\"full\",\"copy-mode\":\"$mode\",\"filter-node-name\":\"mirror-top\"}" >/dev/null || return 1
  # Ready: the bulk copy is done and the replica was flushed once. Only then the export.
  qmp "$d/qmp.sock" wait-job mirror0 ready 600 || return 1
  qmp "$d/qmp.sock" block-export-add '{"type":"nbd","id":"e","node-name":"mirror-top","name":"disk","writable":true}' >/dev/null || return 1
  check=$(qmp "$d/qmp.sock" mirror-check mirror0 mirror-top "$mode") || return 1
  [ "${check%%$'\t'*}" = ok ] || { echo "mirror not replicating before the first job: ${check%%$'\t'*}" >&2; return 1; }
  URI="nbd+unix:///disk?socket=$d/qsd.sock"
}

# Orderly stop: drop the export (no more writes), cancel the ready job without force (it copies
# what is still dirty and flushes the replica, and does not pivot), wait for it to go, quit.
stop_mirror() { # DIR
  local d=$1 i pid
  for i in "${!PROC_NAMES[@]}"; do
    pid=${PROC_PIDS[$i]}
    if [ "${PROC_NAMES[$i]}" = qemu-storage-daemon ] && kill -0 "$pid" 2>/dev/null; then
      QMP_TIMEOUT=30 qmp "$d/qmp.sock" block-export-del '{"id":"e","mode":"hard"}' >/dev/null 2>&1 || true
      if qmp "$d/qmp.sock" block-job-cancel '{"device":"mirror0"}' >/dev/null 2>&1; then
        qmp "$d/qmp.sock" wait-gone mirror0 60 || true
      fi
      qmp "$d/qmp.sock" quit >/dev/null 2>&1 || true
      wait_exit "$pid" 10 || echo "qemu-storage-daemon (pid $pid) did not quit; stopping it" >&2
    fi
    # qemu-storage-daemon first: it is the replica's client.
    hs_stop "$pid" "${PROC_NAMES[$i]}"
  done
}

# ---- Hindsight: target, engine and agent, as hs_start_cluster starts them.
# hs_status DIR MODE: one line, REASON<TAB>LAG_BYTES<TAB>LAG_WRITES<TAB>ATTACHED<TAB>RESYNCING from
# the engine's status; REASON is "ok" when the group runs MODE with its target connected.
hs_status() {
  "$BIN/hindsight" status --config "$1/engine.toml" --json 2>/dev/null | python3 -c '
import json, sys
want = sys.argv[1]
try:
    g = json.load(sys.stdin)["groups"][0]
except (ValueError, LookupError) as e:
    print("no status from the engine (%s)\t-1\t-1\t0\t0" % e)
    sys.exit()
problems = []
if g["effective_mode"] != want:
    problems.append("running %s, not %s (%s)" % (g["effective_mode"], want, g["reason"]))
if not g["target_connected"]:
    problems.append("target not connected")
problems += [k.replace("_", " ") for k in ("poisoned", "paused", "handed_over") if g.get(k)]
print("\t".join(["; ".join(problems) or "ok", str(g["lag_bytes"]), str(g["lag_writes"]),
                 str(len(g["attached"])), str(len(g["resyncing"]))]))
' "$2"
}

start_hindsight() { # DIR MODE TLS
  local d=$1 mode=$2 tls=$3 t0 st reason lag att resync
  fresh_file "$d/agent.img"
  EPORT=$(hs_free_port)
  TPORT=$(hs_free_port)
  local plain='' lines=''
  [ "$tls" = tls ] || plain=1
  [ "$mode" != async ] || lines="interval = \"$INTERVAL\""
  HS_MODE=$mode HS_PLAINTEXT=$plain HS_GROUP_LINES=$lines \
    hs_write_configs "$d" bench bench-vm vol "$(stat -c %s "$d/agent.img")" "$d/agent.img" "$d/agent.sock" 'journal_size = "4GiB"' >/dev/null
  hs_start_cluster "$d" "$BIN" "$d/agent.sock" || return 1
  PROC_NAMES=(hindsight-agent hindsight-engine hindsight-target)
  PROC_PIDS=("$HS_AGENT_PID" "$HS_ENGINE_PID" "$HS_TARGET_PID")
  # Ready: the volume attached, its initial sync done, nothing left to ship.
  t0=$SECONDS
  while :; do
    st=$(hs_status "$d" "$mode")
    IFS=$'\t' read -r reason _ lag att resync <<<"$st"
    [ "$reason" = ok ] && [ "$lag" = 0 ] && [ "$att" -ge 1 ] && [ "$resync" = 0 ] && break
    ((SECONDS - t0 < 120)) || { echo "hindsight $mode not ready after 120 s: $st" >&2; return 1; }
    sleep 0.2
  done
  URI="nbd+unix:///vol?socket=$d/agent.sock"
}

stop_hindsight() {
  hs_stop "${PROC_PIDS[0]}" hindsight-agent
  hs_stop "${PROC_PIDS[1]}" hindsight-engine
  hs_stop "${PROC_PIDS[2]}" hindsight-target
}

degrades() { grep -c 'degraded to cdp' "$1/engine.log" || true; }

# ---- What each server is, and what "replicating" means for it.
server_start() { # NAME DIR
  case $1 in
    qemu-nbd) start_qemu_nbd "$2" ;;
    mirror-*) start_mirror "$2" "${1#mirror-}" ;;
    hindsight-*) start_hindsight "$2" "$(echo "$1" | cut -d- -f2)" "${1##*-}" ;;
  esac
}

server_stop() { # NAME DIR
  [ ${#PROC_PIDS[@]} -gt 0 ] || return 0
  case $1 in
    qemu-nbd) hs_stop "${PROC_PIDS[0]}" qemu-nbd ;;
    mirror-*) stop_mirror "$2" ;;
    hindsight-*) stop_hindsight ;;
  esac
  PROC_NAMES=()
  PROC_PIDS=()
}

# server_check NAME DIR DEGRADES: REASON<TAB>BACKLOG-BYTES right after fio, REASON "ok" when the
# replica took every write the server acknowledged (write-blocking, sync) or is being fed
# (background, cdp, async). DEGRADES: the engine log's count of degradations before the job.
server_check() {
  local i gone='' line
  for i in "${!PROC_PIDS[@]}"; do
    kill -0 "${PROC_PIDS[$i]}" 2>/dev/null || gone+="${PROC_NAMES[$i]} (pid ${PROC_PIDS[$i]}) exited; "
  done
  line=$(server_check_replica "$@")
  if [ -n "$gone" ] && [ "${line%%$'\t'*}" = ok ]; then
    line="${gone%; }"$'\t'"${line#*$'\t'}"
  elif [ -n "$gone" ]; then
    line="$gone$line"
  fi
  echo "$line"
}

server_check_replica() { # NAME DIR DEGRADES
  case $1 in
    qemu-nbd) printf 'ok\t0\n' ;;
    mirror-*)
      local out
      if out=$(qmp "$2/qmp.sock" mirror-check mirror0 mirror-top "${1#mirror-}" 2>&1); then
        echo "$out"
      else
        printf '%s\t-1\n' "$(echo "$out" | tr '\n' ' ')"
      fi
      ;;
    hindsight-*)
      local mode st
      mode=$(echo "$1" | cut -d- -f2)
      st=$(hs_status "$2" "$mode")
      if [ "$(degrades "$2")" != "$3" ]; then
        printf 'degraded to cdp during the job\t%s\n' "$(echo "$st" | cut -f2)"
      else
        echo "$st" | cut -f1,2
      fi
      ;;
  esac
}

# server_settle NAME DIR: waits until the replica holds every write; prints the seconds it
# took, or fails with the reason.
server_settle() {
  local t0 s0 first=1 st=""
  case $1 in
    qemu-nbd) echo 0 ;;
    mirror-*) qmp "$2/qmp.sock" wait-caught-up mirror0 "$SETTLE" ;;
    hindsight-*)
      t0=$EPOCHREALTIME
      s0=$SECONDS
      while ((SECONDS - s0 < SETTLE)); do
        st=$(hs_status "$2" "$(echo "$1" | cut -d- -f2)")
        if [ "$(echo "$st" | cut -f3)" = 0 ]; then
          # Caught up at the first look: no wait (the look itself takes a tenth of a second).
          [ -z "$first" ] || { echo 0; return 0; }
          awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f\n", b - a }'
          return 0
        fi
        first=''
        sleep 0.2
      done
      echo "the target still lags after ${SETTLE}s: $(echo "$st" | cut -f3) writes" >&2
      return 1
      ;;
  esac
}

# fio_run SERVER DIR JOB FIO-ARGS: one fio run against the running server, one line of
# results. Each run starts with nothing dirty in the page cache: what an earlier run left to
# write back would otherwise be written during this one, on the same disk.
fio_run() {
  local server=$1 d=$2 job=$3 args=$4 base=$WORK/$1-$3-round$ROUND
  local sampler check settle catchup=0 before fio_ok=1
  sync
  before=$([[ $server == hindsight-* ]] && degrades "$d" || echo 0)
  reset_peak_rss
  # The CPU is counted from the end of the ramp, as fio counts the bytes.
  (sleep "$RAMP"; cpu_ticks >"$base.cpu0") &
  sampler=$!
  # A replica that hangs makes a write-blocking or sync server's writes hang: fio is stopped
  # two minutes past its time.
  # shellcheck disable=SC2086
  timeout -k 10 $((RAMP + RUNTIME + 120)) fio --name="$job" --ioengine=nbd --uri="$URI" $args --size="$SIZE" \
    --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --numjobs=1 --group_reporting \
    --output-format=json --output="$base.json" >"$base.fio.log" 2>&1 || fio_ok=
  wait "$sampler"
  if [ -z "$fio_ok" ]; then
    check=$(printf 'fio failed (%s)\t-1' "$(tail -1 "$base.fio.log")")
  else
    check=$(server_check "$server" "$d" "$before")
  fi
  if settle=$(server_settle "$server" "$d" 2>"$base.settle"); then
    catchup=$settle
  else
    catchup=-1
    [ "${check%%$'\t'*}" != ok ] || check=$(printf '%s\t%s' "$(tr '\n' ' ' <"$base.settle")" "${check#*$'\t'}")
  fi
  cpu_ticks >"$base.cpu1"
  python3 - "$base.json" "$server" "$job" "$ROUND" "$check" "$catchup" "$TCK" "${PROC_NAMES[*]}" \
    "$(cat "$base.cpu0")" "$(cat "$base.cpu1")" "$(peak_rss)" >>"$RESULTS" <<'PY'
import json, sys
path, server, job, rnd, check, catchup, tck, names, cpu0, cpu1, rss = sys.argv[1:12]
reason, backlog = check.split("\t", 1)
try:
    op = json.load(open(path))["jobs"][0]["write"]
except (OSError, ValueError, LookupError):
    op = {"iops": 0, "bw_bytes": 0, "io_bytes": 0, "clat_ns": {}}
    reason = reason if reason != "ok" else "no fio results"
pct = op["clat_ns"].get("percentile", {})
procs = ",".join("%s:%.3f:%s" % (n, (int(b) - int(a)) / int(tck), r)
                 for n, a, b, r in zip(names.split(), cpu0.split(), cpu1.split(), rss.split()))
print("\t".join([server, job, rnd, "%.0f" % op["iops"], "%.1f" % (op["bw_bytes"] / 1e6),
                 "%.0f" % (pct.get("50.000000", 0) / 1e3), "%.0f" % (pct.get("99.000000", 0) / 1e3),
                 str(op["io_bytes"]), backlog.strip() or "-1", catchup, reason.strip().replace("\t", " "), procs]))
PY
  echo "   $job: $(tail -1 "$RESULTS" | cut -f4,5,11 | sed 's/\t/ IOPS, /; s/\t/ MB\/s, /')"
}

bench_server() { # NAME
  local name=$1 d=$WORK/$1 j
  rm -rf "$d"
  mkdir -p "$d"
  echo "== $name"
  if ! server_start "$name" "$d"; then
    echo "   $name did not start (logs in $d)" >&2
    for j in "${JOBS[@]}"; do
      if [ -n "${HS_BENCH_JOBS:-}" ] && [[ " $HS_BENCH_JOBS " != *" ${j%%|*} "* ]]; then continue; fi
      printf '%s\t%s\t%s\t0\t0\t0\t0\t0\t-1\t-1\tthe server did not start\t\n' "$name" "${j%%|*}" "$ROUND" >>"$RESULTS"
    done
    server_stop "$name" "$d"
    return 0
  fi
  for j in "${JOBS[@]}"; do
    if [ -n "${HS_BENCH_JOBS:-}" ] && [[ " $HS_BENCH_JOBS " != *" ${j%%|*} "* ]]; then continue; fi
    fio_run "$name" "$d" "${j%%|*}" "${j#*|}"
  done
  server_stop "$name" "$d"
  # The logs stay; the images and journals go (many GiB by the end of a round).
  rm -rf "$d/engine" "$d/target" "$d"/*.img
}

for ROUND in $(seq "$ROUNDS"); do
  echo "==== round $ROUND of $ROUNDS"
  for ((k = 0; k < ${#RUN[@]}; k++)); do
    bench_server "${RUN[$(((k + ROUND - 1) % ${#RUN[@]}))]}"
  done
done

echo
echo "== results ($(nproc) vCPU, $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ), runtime ${RUNTIME}s per job after a ${RAMP}s ramp, file $SIZE, median of the valid rounds of $ROUNDS)"
echo "   $(qemu-storage-daemon --version | head -1), $(fio --version), async interval $INTERVAL, qsd aio=$QSD_AIO"
rc=0
python3 - "$RESULTS" "${HS_BENCH_MIN_RATIO:-}" "${ALL[@]}" <<'PY' || rc=$?
import sys
from statistics import median
path, min_ratio, order = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
runs, jobs, bad = {}, [], []
for r in rows:
    server, job, rnd = r[0], r[1], r[2]
    if job not in jobs:
        jobs.append(job)
    runs.setdefault((server, job), [])
    if r[10] != "ok":
        bad.append((server, job, rnd, r[10]))
        continue
    gb = int(r[7]) / 1e9
    procs = []
    for p in filter(None, r[11].split(",")):
        name, cpu, rss = p.split(":")
        procs.append((name, float(cpu) / gb if gb else 0.0, int(rss) / 1e3))
    runs[(server, job)].append({"iops": float(r[3]), "mbs": float(r[4]), "p50": float(r[5]), "p99": float(r[6]),
                                "backlog": int(r[8]) / 1e6, "catchup": float(r[9]), "procs": procs})

def med(server, job, key):
    v = [x[key] for x in runs.get((server, job), [])]
    return median(v) if v else None

def cpu(server, job):
    v = [sum(p[1] for p in x["procs"]) for x in runs.get((server, job), [])]
    return median(v) if v else None

print("| job | server | valid rounds | IOPS (median) | IOPS (lowest-highest) | MB/s | p50 µs | p99 µs | backlog at end MB | catch-up s | CPU s/GB (all processes) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for j in jobs:
    for s in order:
        if (s, j) not in runs:
            continue
        ok, n = runs[(s, j)], len([x for x in rows if (x[0], x[1]) == (s, j)])
        if not ok:
            print(f"| {j} | {s} | 0 of {n} | invalid | | | | | | | |")
            continue
        iops = [x["iops"] for x in ok]
        print(f"| {j} | {s} | {len(ok)} of {n} | {med(s, j, 'iops'):.0f} | {min(iops):.0f}-{max(iops):.0f} | {med(s, j, 'mbs'):.1f} "
              f"| {med(s, j, 'p50'):.0f} | {med(s, j, 'p99'):.0f} | {med(s, j, 'backlog'):.0f} | {med(s, j, 'catchup'):.2f} | {cpu(s, j):.2f} |")

print()
print("| job | server | process | CPU s/GB | peak RSS MB |")
print("|---|---|---|---:|---:|")
for j in jobs:
    for s in order:
        ok = runs.get((s, j))
        if not ok:
            continue
        for i, name in enumerate(p[0] for p in ok[0]["procs"]):
            c = median(x["procs"][i][1] for x in ok)
            m = median(x["procs"][i][2] for x in ok)
            print(f"| {j} | {s} | {name} | {c:.2f} | {m:.0f} |")

print()
print("Hindsight / peer (IOPS: higher is better; latency and CPU per GB: lower is better):")
print()
print("| job | hindsight | peer | IOPS | p50 latency | p99 latency | CPU s/GB |")
print("|---|---|---|---:|---:|---:|---:|")
pairs = [(f"hindsight-sync-{t}", "mirror-write-blocking") for t in ("tls", "plain")]
pairs += [(f"hindsight-async-{t}", "mirror-background") for t in ("tls", "plain")]
pairs += [(f"hindsight-cdp-{t}", "qemu-nbd") for t in ("tls", "plain")]
low = []
ratio = lambda a, b: "%.2f" % (a / b) if a is not None and b else "n/a"
for j in jobs:
    for h, p in pairs:
        if (h, j) not in runs or (p, j) not in runs:
            continue
        hi, pi = med(h, j, "iops"), med(p, j, "iops")
        print(f"| {j} | {h} | {p} | {ratio(hi, pi)} | {ratio(med(h, j, 'p50'), med(p, j, 'p50'))} "
              f"| {ratio(med(h, j, 'p99'), med(p, j, 'p99'))} | {ratio(cpu(h, j), cpu(p, j))} |")
        if min_ratio and hi is not None and pi and hi / pi < float(min_ratio):
            low.append(f"{j}: {h} / {p} = {hi / pi:.2f} IOPS, below {min_ratio}")

if bad:
    print()
    print("invalid rounds (left out of the medians):")
    for s, j, rnd, why in bad:
        print(f"  round {rnd}, {s}, {j}: {why}")
for l in low:
    print(l)
sys.exit(1 if bad or low else 0)
PY
exit "$rc"
