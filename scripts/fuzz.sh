#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for a bounded time (HS_FUZZ_SECONDS each, default 20) from
# the kept corpus: the frame and message decoders, journal replay, the NBD request decoders and
# the point-in-time index file.
# A crash fails the script and leaves the input in fuzz/artifacts/. Installs cargo-fuzz if
# missing. Runs on the stable toolchain, without a sanitizer (a Rust panic is the crash).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_EACH=${HS_FUZZ_SECONDS:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked -q
cargo fuzz build -O --sanitizer none
for t in frame journal_replay nbd_request point_index; do
  # Work on a copy so that CI runs do not grow the kept corpus.
  work=$(mktemp -d)
  cp -r "corpus/$t/." "$work/"
  echo "== fuzz $t for ${SECONDS_EACH}s"
  log="$work.log"
  status=0
  cargo fuzz run -O --sanitizer none "$t" "$work" -- -max_total_time="$SECONDS_EACH" >"$log" 2>&1 || status=$?
  grep -E 'DONE|ERROR|panicked' "$log" | tail -3 || true
  rm -rf "$work"
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    rm -f "$log"
    echo "fuzz target $t failed; the crashing input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  rm -f "$log"
done
