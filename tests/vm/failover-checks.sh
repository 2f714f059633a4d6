# shellcheck shell=bash
# The VM tier's failover and failback, sourced by scripts/vm-test.sh after the main guest run
# and its host checks (docs/operations.md, "Failover"):
#   1. `hindsight failover --latest` at the target: the group's volumes become promoted images;
#   2. a second guest boots on them (hs.site=recovery): its agent serves them through ublk and
#      kernel nbd with no engine, it finds every file the first guest wrote and writes new ones;
#   3. failback: the original disks are prepared as a group of a second target (the original
#      site's), an engine and an agent on this host serve the promoted images and ship to it,
#      comparing every region; once the disks equal the promoted images, a planned failover at
#      that target brings production home;
#   4. a third guest boots on the original disks (hs.site=home) and finds the files of both.
#
# Uses from the caller: RUN, BIN, PKI, GROUP, MARKERS, TIMEOUT, QEMU (built by qemu_command),
# qemu_command, serial_text, host_ok, host_fail, hs_spawn, hs_free_port, hs_wait_tcp,
# hs_wait_sock, hs_json_field.

PROMOTED=
FAILOVER_CHECKS=(failover-promotes recovery-guest failback-equal failback-home home-guest)

# list_disk FILE MARKERS...: the "VOLUME /PATH MD5" lines of the files the guests reported in
# these marker files, padded to a whole disk sector, for the next guest's /dev/vdc.
list_disk() {
  local out=$1
  shift
  awk '$1 == "GVM-INFO" && $2 == "file" {print $3, $4, $5}' "$@" >"$out"
  truncate -s 1M "$out"
}

# site_boot NAME SITE VDA VDB LIST: boots a guest on these disks with hs.site=SITE and no engine
# to reach; its markers go to $RUN/markers-NAME.txt. OK when it ran to its end with no failure.
site_boot() {
  local name=$1 site=$2 vda=$3 vdb=$4 list=$5 pid serial=$RUN/serial-$1.log
  # The engine port closes every connection: the agent must serve without an engine.
  qemu_command "console=ttyS0 panic=-1 quiet hs.engine=$GUEST_ENGINE_IP:$EPORT hs.site=$site hs.deadline=$((TIMEOUT > 60 ? TIMEOUT - 20 : TIMEOUT * 2 / 3))" \
    "$vda" "$vdb" "$list" offline
  timeout "$TIMEOUT" "${QEMU[@]}" </dev/null >"$serial" 2>&1 &
  pid=$!
  HS_PIDS+=("$pid")
  local status=0
  wait "$pid" || status=$?
  sed 's/\r$//; s/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' "$serial" | grep -o 'GVM-.*' >"$RUN/markers-$name.txt" || true
  sed -n 's/^\(GVM-\(OK\|FAIL\) [^ ]*\).*/  \1/p' "$RUN/markers-$name.txt"
  if ! grep -q '^GVM-TEST-END' "$RUN/markers-$name.txt"; then
    host_fail "$name-guest" "no GVM-TEST-END (QEMU status $status)"
    tail -n 40 "$serial"
  elif grep -q '^GVM-FAIL ' "$RUN/markers-$name.txt"; then
    host_fail "$name-guest" "$(grep '^GVM-FAIL ' "$RUN/markers-$name.txt" | paste -sd ' ')"
    grep '^GVM-INFO\|^GVM-LOG' "$RUN/markers-$name.txt" | tail -n 40
  else
    host_ok "$name-guest"
  fi
}

failover_step() {
  local out
  if out=$("$BIN/hindsight" failover --config "$RUN/target.toml" --group "$GROUP" --latest --json 2>"$RUN/failover.log"); then
    PROMOTED=$RUN/target/groups/$GROUP/promoted
    echo "  $out"
    if [ -f "$PROMOTED/ublk-vol.img" ] && [ -f "$PROMOTED/nbd-vol.img" ]; then
      host_ok failover-promotes
      return 0
    fi
    host_fail failover-promotes "no promoted images in $PROMOTED"
  else
    host_fail failover-promotes "$(tail -n 3 "$RUN/failover.log" | paste -sd ' ')"
  fi
  return 1
}

# The original site's target, seeded from the original disks; an engine and an agent on this
# host serving the promoted images (the recovery site's production) and shipping to it.
failback_step() {
  local tport eport ok_equal=0 i out
  tport=$(hs_free_port)
  eport=$(hs_free_port)
  cat >"$RUN/origin.toml" <<EOT
[target]
listen = "127.0.0.1:$tport"
data_dir = "$RUN/origin"

[tls]
ca = "$PKI/ca.pem"
cert = "$PKI/target-dr.pem"
key = "$PKI/target-dr-key.pem"
EOT
  if ! "$BIN/hindsight" failback prepare --config "$RUN/origin.toml" --group "$GROUP" --epoch 1 \
    --volume "guest/ublk-vol=$RUN/vda.img" --volume "guest/nbd-vol=$RUN/vdb.img" >"$RUN/prepare.log" 2>&1; then
    host_fail failback-equal "failback prepare: $(tail -n 2 "$RUN/prepare.log" | paste -sd ' ')"
    host_fail failback-home "not prepared"
    return 1
  fi
  hs_spawn origin-target "$RUN/origin.log" "$BIN/hindsight" target --config "$RUN/origin.toml"
  local origin_pid=$HS_PID
  hs_wait_tcp "$tport"
  sed -e "s/^listen = .*/listen = \"127.0.0.1:$eport\"/" -e "s|^data_dir = .*|data_dir = \"$RUN/recovery-engine\"|" \
    -e "s/^target = .*/target = \"127.0.0.1:$tport\"\nepoch = 1/" "$RUN/engine.toml" >"$RUN/recovery-engine.toml"
  hs_spawn recovery-engine "$RUN/recovery-engine.log" "$BIN/hindsight" engine --config "$RUN/recovery-engine.toml"
  local engine_pid=$HS_PID
  hs_wait_tcp "$eport"
  cat >"$RUN/recovery-agent.toml" <<EOT
[agent]
engine = "127.0.0.1:$eport"
vm = "guest"
start_offline = true
engine_timeout = "1s"

[tls]
ca = "$PKI/ca.pem"
cert = "$PKI/agent-guest.pem"
key = "$PKI/agent-guest-key.pem"

[[disk]]
group = "$GROUP"
volume = "ublk-vol"
path = "$PROMOTED/ublk-vol.img"
listen = "unix:$RUN/b-ublk.sock"

[[disk]]
group = "$GROUP"
volume = "nbd-vol"
path = "$PROMOTED/nbd-vol.img"
listen = "unix:$RUN/b-nbd.sock"
EOT
  hs_spawn recovery-agent "$RUN/recovery-agent.log" "$BIN/hindsight-agent" --config "$RUN/recovery-agent.toml"
  local agent_pid=$HS_PID
  for i in $(seq 600); do
    if cmp -s "$RUN/vda.img" "$PROMOTED/ublk-vol.img" && cmp -s "$RUN/vdb.img" "$PROMOTED/nbd-vol.img"; then
      ok_equal=1
      break
    fi
    sleep 0.2
  done
  if ((ok_equal)); then
    host_ok failback-equal
    echo "  (after $((i / 5)) s)"
  else
    host_fail failback-equal "the original disks never became equal to the promoted images"
    tail -n 20 "$RUN/recovery-agent.log"
  fi
  "$BIN/hindsight" certs issue --dir "$PKI" --role operator --name vmtier >/dev/null 2>&1 || true
  if out=$("$BIN/hindsight" failover --config "$RUN/origin.toml" --group "$GROUP" --planned --engine "127.0.0.1:$eport" \
    --engine-ca "$PKI/ca.pem" --engine-cert "$PKI/operator-vmtier.pem" --engine-key "$PKI/operator-vmtier-key.pem" --json \
    2>"$RUN/failback.log") && [ "$(hs_json_field "$out" epoch)" = 2 ]; then
    host_ok failback-home
  else
    host_fail failback-home "$(tail -n 3 "$RUN/failback.log" | paste -sd ' ')"
  fi
  kill "$agent_pid" "$engine_pid" 2>/dev/null || true
  wait "$agent_pid" "$engine_pid" 2>/dev/null || true
  kill "$origin_pid" 2>/dev/null || true
  wait "$origin_pid" 2>/dev/null || true
}

run_failover_checks() {
  local name
  if ! grep -q '^GVM-OK fs-nbd' "$MARKERS"; then
    for name in "${FAILOVER_CHECKS[@]}"; do host_fail "$name" "the main guest run made no file systems"; done
    return
  fi
  failover_step || return
  list_disk "$RUN/list-recovery.img" "$MARKERS"
  site_boot recovery recovery "$PROMOTED/ublk-vol.img" "$PROMOTED/nbd-vol.img" "$RUN/list-recovery.img"
  failback_step
  list_disk "$RUN/list-home.img" "$MARKERS" "$RUN/markers-recovery.txt"
  site_boot home home "$RUN/vda.img" "$RUN/vdb.img" "$RUN/list-home.img"
}
