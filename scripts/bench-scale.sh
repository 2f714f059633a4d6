#!/usr/bin/env bash
# What many groups cost (`scripts/bench.sh scale N...`): for each N, one target, one engine and
# one agent on this machine, N consistency groups of one 16 MiB volume each, every volume served
# by the one agent on an NBD socket (TLS on both links, cdp). Prints, per N: the agent's
# start-up (from its start until every socket is there), the engine's and the target's, and,
# after one 4 KiB write per volume has reached the target, the threads, the resident memory
# and the open file descriptors of each process; then the engine and the target are stopped
# and started again over their N groups (the restart: until the engine listens, until the
# target has loaded every group and says it listens), and the agent (until every socket is
# there again: the disks are known now, nothing to compare); then, with HS_BENCH_QD1=1, fio 4 KiB
# random writes at QD1 for 10 s on group g0 while the N-1 others are idle (run it with N=1
# beside N=1000 to see what idle groups cost a busy one).
#
#   scripts/bench.sh scale 50 400        the sizes (default: 50 400)
#   HS_BENCH_BIN=DIR                     take the binaries from DIR instead of building
#   HS_BENCH_DIR=dir                     where files go, kept afterwards (default: a temporary
#                                        directory, removed at the end)
#   HS_BENCH_KEEP=1                      keep each size's data directories (under HS_BENCH_DIR)
#   HS_BENCH_VOLUME=16MiB                each volume's size (the target reserves every replica's
#                                        space: 5,000 groups of 16 MiB need 80 GB)
#   HS_BENCH_QD1=1                       also run fio 4 KiB QD1 on g0 beside the idle groups
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
SIZES=("$@")
VOLUME=${HS_BENCH_VOLUME:-16MiB}
[ ${#SIZES[@]} -gt 0 ] || SIZES=(50 400)
"$ROOT/scripts/install-deps.sh"
if [ -n "${HS_BENCH_BIN:-}" ]; then
  BIN=$HS_BENCH_BIN
else
  (cd "$ROOT" && cargo build --release --workspace --bins -q)
  BIN=$ROOT/build/release
fi
WORK=${HS_BENCH_DIR:-$(mktemp -d /tmp/hindsight-bench-scale.XXXXXX)}
mkdir -p "$WORK"
RESULTS=$WORK/results.tsv
: >"$RESULTS"
now() { date +%s.%N; }
since() { python3 -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$(now)"; }
# threads PID, rss PID (MiB)
threads() { awk '/^Threads:/ {print $2}' "/proc/$1/status"; }
rss() { awk '/^VmRSS:/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
# wait_log FILE TEXT SECONDS: until FILE holds TEXT.
wait_log() {
  local i
  for ((i = 0; i < $3 * 10; i++)); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "$1 never said \"$2\"" >&2
  return 1
}

# configs DIR N: the three configurations for N groups g0..g(N-1), volume v<i> of VM "vm".
configs() {
  local d=$1 n=$2 i pki=$1/pki
  HS=$BIN/hindsight hs_make_pki "$pki" vm 127.0.0.1
  cat >"$d/target.toml" <<EOT
[target]
listen = "127.0.0.1:$TPORT"
data_dir = "$d/target"

[tls]
ca = "$pki/ca.pem"
cert = "$pki/target-dr.pem"
key = "$pki/target-dr-key.pem"
EOT
  {
    printf '[engine]\nlisten = "127.0.0.1:%s"\ndata_dir = "%s/engine"\n\n' "$EPORT" "$d"
    printf '[tls]\nca = "%s/ca.pem"\ncert = "%s/engine-primary.pem"\nkey = "%s/engine-primary-key.pem"\n' "$pki" "$pki" "$pki"
    for ((i = 0; i < n; i++)); do
      printf '\n[[group]]\nname = "g%d"\nmode = "cdp"\ntarget = "127.0.0.1:%s"\n' "$i" "$TPORT"
      printf '[[group.volume]]\nname = "v%d"\nvm = "vm"\nsize = "%s"\n' "$i" "$VOLUME"
    done
  } >"$d/engine.toml"
  {
    printf '[agent]\nengine = "127.0.0.1:%s"\nvm = "vm"\n\n' "$EPORT"
    printf '[tls]\nca = "%s/ca.pem"\ncert = "%s/agent-vm.pem"\nkey = "%s/agent-vm-key.pem"\n' "$pki" "$pki" "$pki"
    for ((i = 0; i < n; i++)); do
      truncate -s "${VOLUME%iB}" "$d/disk$i.img"
      printf '\n[[disk]]\ngroup = "g%d"\nvolume = "v%d"\npath = "%s/disk%d.img"\nlisten = "unix:%s/s%d.sock"\n' \
        "$i" "$i" "$d" "$i" "$d" "$i"
    done
  } >"$d/agent.toml"
}

for N in "${SIZES[@]}"; do
  echo "==== $N groups"
  D=$WORK/n$N
  rm -rf "$D"
  mkdir -p "$D"
  EPORT=$(hs_free_port)
  TPORT=$(hs_free_port)
  configs "$D" "$N"
  t0=$(now)
  hs_spawn target "$D/target.log" "$BIN/hindsight" target --config "$D/target.toml"
  tpid=$HS_PID
  hs_wait_tcp "$TPORT" 600
  target_s=$(since "$t0")
  t0=$(now)
  hs_spawn engine "$D/engine.log" "$BIN/hindsight" engine --config "$D/engine.toml"
  epid=$HS_PID
  hs_wait_tcp "$EPORT" 600
  engine_s=$(since "$t0")
  t0=$(now)
  hs_spawn agent "$D/agent.log" "$BIN/hindsight-agent" --config "$D/agent.toml"
  apid=$HS_PID
  for ((i = 0; i < N; i++)); do hs_wait_sock "$D/s$i.sock" 900; done
  agent_s=$(since "$t0")
  echo "== one 4 KiB write per volume"
  for ((i = 0; i < N; i++)); do
    qemu-io -f raw "nbd+unix:///v$i?socket=$D/s$i.sock" -c "write -P 7 0 4096" >/dev/null
  done
  # Until the target holds every group's write.
  for _ in $(seq 300); do
    held=$(find "$D/target/groups" -maxdepth 1 -mindepth 1 -type d 2>/dev/null | wc -l)
    [ "$held" -ge "$N" ] && break
    sleep 1
  done
  sleep 5
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s' "$N" "$agent_s" "$engine_s" "$target_s" \
    "$(threads "$tpid")" "$(rss "$tpid")" "$(threads "$epid")" "$(rss "$epid")" "$(threads "$apid")" "$(rss "$apid")" \
    "$(fds "$tpid")" "$(fds "$epid")" "$(fds "$apid")" >>"$RESULTS"
  echo "== restart of the engine and the target over $N groups"
  hs_stop "$epid" engine
  hs_stop "$tpid" target
  t0=$(now)
  hs_spawn target "$D/target-2.log" "$BIN/hindsight" target --config "$D/target.toml"
  tpid=$HS_PID
  wait_log "$D/target-2.log" "target listening" 600
  target_again=$(since "$t0")
  t0=$(now)
  hs_spawn engine "$D/engine-2.log" "$BIN/hindsight" engine --config "$D/engine.toml"
  epid=$HS_PID
  hs_wait_tcp "$EPORT" 600
  engine_again=$(since "$t0")
  echo "== restart of the agent over its $N disks"
  hs_stop "$apid" agent
  t0=$(now)
  hs_spawn agent "$D/agent-2.log" "$BIN/hindsight-agent" --config "$D/agent.toml"
  apid=$HS_PID
  for ((i = 0; i < N; i++)); do hs_wait_sock "$D/s$i.sock" 900; done
  agent_again=$(since "$t0")
  qd1=-
  if [ -n "${HS_BENCH_QD1:-}" ]; then
    echo "== fio 4 KiB randwrite QD1 on g0, $((N - 1)) groups idle"
    # The agent reconnects to the restarted engine first.
    sleep 5
    fio --name=qd1 --ioengine=nbd --uri="nbd+unix:///v0?socket=$D/s0.sock" --rw=randwrite --bs=4k --iodepth=1 \
      --size="${VOLUME%iB}" --time_based --runtime=10 --ramp_time=2 --output-format=json --output="$D/qd1.json" >/dev/null
    qd1=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["write"]; print("%.0f (p50 %.0f us)" % (j["iops"], j["clat_ns"]["percentile"]["50.000000"] / 1000))' "$D/qd1.json")
  fi
  printf '\t%s\t%s\t%s\t%s\n' "$engine_again" "$target_again" "$agent_again" "$qd1" >>"$RESULTS"
  hs_cleanup
  # The second and later sizes start on fresh ports and directories; the disks take no space.
  [ -n "${HS_BENCH_KEEP:-}" ] || rm -rf "$D"
done

echo
echo "== results ($(nproc) vCPU, $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ), groups of one $VOLUME volume, one agent)"
python3 - "$RESULTS" <<'PY'
import sys
print("| N groups | agent start-up | engine start-up | target start-up | target threads / RSS / fds | engine threads / RSS / fds | agent threads / RSS / fds | engine restart | target restart | agent restart | 4k QD1 on g0, IOPS |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for l in open(sys.argv[1]):
    n, a, e, t, tt, tr, et, er, at, ar, tf, ef, af, er2, tr2, ar2, qd1 = l.rstrip("\n").split("\t")
    print(f"| {n} | {a} s | {e} s | {t} s | {tt} / {tr} MiB / {tf} | {et} / {er} MiB / {ef} | {at} / {ar} MiB / {af} | {er2} s | {tr2} s | {ar2} s | {qd1} |")
PY
if [ -z "${HS_BENCH_DIR:-}" ]; then
  rm -rf "$WORK"
fi
