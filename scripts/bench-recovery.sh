#!/usr/bin/env bash
# Benchmarks instant recovery (`scripts/bench.sh recovery`): for each journal size, a 1 GiB
# volume is written through the agent (64 KiB random writes, cdp, replicated to a target on this
# machine) until the target's journal holds that much, then, side by side in the same run:
#   - the time from starting `hindsight export --latest` to the first 4 KiB read by a client;
#   - 4 KiB random reads (fio's nbd engine, QD32) of the exported point against qemu-nbd serving
#     a raw image of the same point;
#   - `hindsight recover --latest` against `qemu-img convert` of that raw image (then synced,
#     as recover syncs its image), in GB/s, both from a cold page cache;
#   - the index's size and the export's resident memory, per GiB of journal.
#
#   HS_BENCH_JOURNALS="1G 16G"   journal sizes to measure (default)
#   HS_BENCH_RUNTIME=20          seconds per fio job
#   HS_BENCH_DIR=dir             where files go, kept afterwards (default: a temporary
#                                directory, removed at the end)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
RUNTIME=${HS_BENCH_RUNTIME:-20}
JOURNALS=${HS_BENCH_JOURNALS:-"1G 16G"}
"$ROOT/scripts/install-deps.sh"
(cd "$ROOT" && cargo build --release --workspace --bins -q)
BIN=$ROOT/build/release
WORK=${HS_BENCH_DIR:-$(mktemp -d /tmp/hindsight-bench-recovery.XXXXXX)}
mkdir -p "$WORK"
RESULTS=$WORK/results.tsv
: >"$RESULTS"
now() { date +%s.%N; }
# Empties the page cache (root only; elsewhere the figures are of a warm cache).
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
bytes_of() { numfmt --from=iec "$1"; }

fio_read() { # URI NAME: 4 KiB random reads, QD32; prints IOPS
  local json=$WORK/$2.json
  sync
  fio --name="$2" --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=32 --size=1G --time_based \
      --runtime="$RUNTIME" --ramp_time=2 --output-format=json --output="$json" >/dev/null
  python3 -c 'import json,sys; print("%.0f" % json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"])' "$json"
}

for J in $JOURNALS; do
  echo "==== journal of $J"
  D=$WORK/j$J
  rm -rf "$D"; mkdir -p "$D"
  EPORT=$(hs_free_port); TPORT=$(hs_free_port)
  truncate -s 1G "$D/agent.img"
  hs_write_configs "$D" bench bench-vm vol 1073741824 "$D/agent.img" "$D/agent.sock" \
    "$(printf 'retention = "24h"\njournal_size = "64GiB"')"
  # The engine keeps only what the target lacks; the target keeps it all.
  hs_start_cluster "$D" "$BIN" "$D/agent.sock"
  echo "== writing $J through the agent"
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///vol?socket=$D/agent.sock" --rw=randwrite --bs=64k \
      --iodepth=16 --size=1G --io_size="$J" --randrepeat=0 --output=/dev/null
  # Until the target holds all of it.
  want=$(( $(bytes_of "$J") * 99 / 100 ))
  for _ in $(seq 600); do
    have=$(du -sb "$D/target/groups/bench/journal" | cut -f1)
    [ "$have" -ge "$want" ] && break
    sleep 1
  done
  sleep 3
  journal=$(du -sb "$D/target/groups/bench/journal" | cut -f1)
  index=$(du -sb "$D/target/groups/bench/index" 2>/dev/null | cut -f1 || echo 0)

  echo "== export --latest: time to the first byte read"
  rm -f "$D/export.sock"
  t0=$(now)
  hs_spawn export "$D/export.log" "$BIN/hindsight" export --config "$D/target.toml" --group bench --volume vol --latest \
    --listen "unix:$D/export.sock"
  epid=$HS_PID
  until qemu-io -f raw -r "nbd+unix:///vol?socket=$D/export.sock" -c "read 0 4096" >/dev/null 2>&1; do sleep 0.005; done
  t1=$(now)
  first_byte=$(python3 -c "print('%.3f' % ($t1 - $t0))")
  rss=$(awk '/VmRSS/ {print $2 * 1024}' "/proc/$epid/status")
  echo "== 4 KiB random reads of the export, then of qemu-nbd on the same image (both read once first: warm)"
  nbdcopy "nbd+unix:///vol?socket=$D/export.sock" null:
  export_iops=$(fio_read "nbd+unix:///vol?socket=$D/export.sock" "export-$J")
  echo "== recover --latest, then qemu-img convert of the same image (both from a cold page cache)"
  drop_caches
  t0=$(now)
  "$BIN/hindsight" recover --config "$D/target.toml" --group bench --volume vol --latest --out "$D/recovered.img" >/dev/null
  t1=$(now)
  recover_s=$(python3 -c "print('%.3f' % ($t1 - $t0))")
  kill "$epid"; wait "$epid" 2>/dev/null || true
  cmp "$D/recovered.img" "$D/agent.img" || { echo "the recovered image differs from the agent's disk" >&2; exit 1; }
  drop_caches
  t0=$(now)
  # recover makes its image durable before it names it; so must the peer, to compare alike.
  qemu-img convert -f raw -O raw "$D/recovered.img" "$D/converted.img"
  sync "$D/converted.img"
  t1=$(now)
  convert_s=$(python3 -c "print('%.3f' % ($t1 - $t0))")
  rm -f "$D/qemu.sock"
  hs_spawn qemu-nbd "$D/qemu-nbd.log" qemu-nbd -t -r -e 8 -f raw -k "$D/qemu.sock" "$D/recovered.img"
  qpid=$HS_PID
  hs_wait_sock "$D/qemu.sock"
  cat "$D/recovered.img" >/dev/null
  qemu_iops=$(fio_read "nbd+unix:///?socket=$D/qemu.sock" "qemu-$J")
  kill "$qpid"; wait "$qpid" 2>/dev/null || true
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$J" "$journal" "$index" "$first_byte" "$rss" "$export_iops" "$qemu_iops" \
    "$recover_s" "$convert_s" >>"$RESULTS"
  hs_cleanup
  rm -f "$D/converted.img" "$D/recovered.img"
done

echo
echo "== results ($(nproc) vCPU, $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ), 1 GiB volume, ${RUNTIME}s per fio job)"
python3 - "$RESULTS" <<'PY'
import sys
G = 1 << 30
print("| journal | journal bytes | index bytes (per GiB) | export to first byte | export RSS (per GiB) | 4k randread export / qemu-nbd IOPS | recover / qemu-img convert |")
print("|---|---:|---:|---:|---:|---:|---:|")
for l in open(sys.argv[1]):
    j, jb, ib, fb, rss, ei, qi, rs, cs = l.split("\t")
    jb, ib, rss, ei, qi, rs, cs = int(jb), int(ib), int(rss), float(ei), float(qi), float(rs), float(cs)
    gib = jb / G
    print(f"| {j} | {jb} | {ib} ({ib / gib / 1e6:.1f} MB) | {float(fb) * 1000:.0f} ms | {rss / 1e6:.0f} MB ({rss / gib / 1e6:.1f} MB) "
          f"| {ei:.0f} / {qi:.0f} = {ei / max(qi, 1):.2f} | {G / rs / 1e9:.2f} / {G / cs / 1e9:.2f} GB/s = {cs / rs:.2f} |")
PY
if [ -z "${HS_BENCH_DIR:-}" ]; then
  rm -rf "$WORK"
fi
