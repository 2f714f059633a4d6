#!/bin/sh
# shellcheck shell=dash
# The VM tier's test, run by /init inside the guest. hindsight-agent serves the guest's two
# local disks through the kernel's own block drivers: /dev/vda as /dev/ublkb0 (ublk) and
# /dev/vdb as /dev/nbd0 (nbd). The test puts ext4 on both, places a quiesced bookmark,
# attaches the bookmark of nbd-vol as the host exports it (`hindsight export`, kernel nbd over
# the network), kills the agent with SIGKILL in the middle of I/O and restarts it, then stops
# it cleanly.
#
# Booted with hs.site=recovery (the volumes a failover promoted at the recovery site) or
# hs.site=home (the original disks after failback), it runs site_main instead: the agent serves
# the disks with no engine to reach, and the test mounts the file systems it finds, checks the
# files the host lists on /dev/vdc, and at the recovery site writes files of its own.
#
# Every result line starts with GVM-OK NAME, GVM-FAIL NAME or GVM-INFO; the host counts them
# and checks the replicated images against the "GVM-INFO file VOLUME PATH MD5" lines.
# GVM-TEST-END closes a test that ran to its end.
#
# Busybox sh prefers its own applets to $PATH, so the real programs are called by full path.
# Anything that can hang on a device whose server is gone runs in the background or under
# timeout; the guest's watchdog (see /init) and the host's timeout bound the rest.

BIN=/usr/local/bin
CONFIG=/etc/hindsight/agent.toml
# The agent's certificate (VM "guest"), its key and the CA, put there by the host.
TLS=/etc/hindsight/tls
AGENT_LOG=/tmp/agent.log
ENGINE=$(sed -n 's/.*hs\.engine=\([^ ]*\).*/\1/p' /proc/cmdline)
# Where the host serves a point it exports when asked (QEMU forwards it): IP:PORT.
EXPORT=$(sed -n 's/.*hs\.export=\([^ ]*\).*/\1/p' /proc/cmdline)
# Empty for the main test; recovery or home for the boots after a failover (site_main).
SITE=$(sed -n 's/.*hs\.site=\([a-z]*\).*/\1/p' /proc/cmdline)
# Extra [agent] lines of the site boots.
SITE_CONFIG=
EXPORT_DEV=/dev/nbd1
EXPORT_MNT=/mnt/e
GROUP=vmtier
UBLK_DEV=/dev/ublkb0
NBD_DEV=/dev/nbd0
UBLK_MNT=/mnt/u
NBD_MNT=/mnt/n
FAILS=0
AGENT_PID=

# --- reporting ---------------------------------------------------------------------------

uptime_s() { cut -d' ' -f1 /proc/uptime; }
ok() { echo "GVM-OK $1 t=$(uptime_s)"; }
fail() {
  echo "GVM-FAIL $1 t=$(uptime_s)${2:+ ($2)}"
  FAILS=$((FAILS + 1))
}
info() { echo "GVM-INFO $*"; }
# result NAME CMD...: OK or FAIL for NAME by CMD's exit status.
result() {
  local name=$1
  shift
  if "$@"; then ok "$name"; else fail "$name"; fi
}
show_agent_log() { sed 's/^/GVM-INFO agent: /' "$AGENT_LOG"; }

# --- waiting -----------------------------------------------------------------------------

# wait_for SECS CMD...: polls CMD until it succeeds; fails after SECS seconds.
wait_for() {
  local end
  end=$(($(date +%s) + $1))
  shift
  until "$@"; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.2
  done
}

# spawn NAME CMD...: runs CMD (a command or a function) in the background; its exit status
# lands in /tmp/NAME.rc. Polling that file never blocks on a stuck process, unlike wait.
spawn() {
  local name=$1
  shift
  rm -f "/tmp/$name.rc"
  ("$@"; echo $? >"/tmp/$name.rc") &
  echo $! >"/tmp/$name.pid"
}
finished() { [ -s "/tmp/$1.rc" ]; }
exit_status() { cat "/tmp/$1.rc"; }

# --- the agent and its devices -----------------------------------------------------------

write_config() {
  mkdir -p /etc/hindsight
  cat >"$CONFIG" <<EOT
[agent]
engine = "$ENGINE"
vm = "guest"
freeze = ["$UBLK_MNT", "$NBD_MNT"]

$SITE_CONFIG
[tls]
ca = "$TLS/ca.pem"
cert = "$TLS/agent.pem"
key = "$TLS/agent-key.pem"

[[disk]]
group = "$GROUP"
volume = "ublk-vol"
path = "/dev/vda"
frontend = "ublk"
device = "$UBLK_DEV"

[[disk]]
group = "$GROUP"
volume = "nbd-vol"
path = "/dev/vdb"
frontend = "nbd"
device = "$NBD_DEV"
EOT
}

start_agent() {
  echo "--- agent started at $(uptime_s)s" >>"$AGENT_LOG"
  RUST_LOG=info "$BIN/hindsight-agent" --config "$CONFIG" >>"$AGENT_LOG" 2>&1 &
  AGENT_PID=$!
}

# A process that exited stays a zombie until waited for, and kill -0 still finds it.
alive() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
  [ -n "$state" ] && [ "$state" != Z ]
}
agent_alive() { alive "$AGENT_PID"; }
agent_dead() { ! agent_alive; }

nbd_size() { blockdev --getsize64 "$NBD_DEV" 2>/dev/null || echo 0; }
nbd_attached() { [ "$(nbd_size)" -gt 0 ]; }
ublk_present() { [ -b "$UBLK_DEV" ]; }
devices_ready() { ublk_present && nbd_attached; }
ready_or_agent_dead() { devices_ready || agent_dead; }
devices_released() { [ ! -e "$UBLK_DEV" ] && [ "$(nbd_size)" = 0 ]; }

# Starts the agent and waits for both block devices. Fails when the agent is not running.
start_and_attach() {
  start_agent
  wait_for 30 ready_or_agent_dead
  if agent_dead; then
    wait "$AGENT_PID"
    fail agent-start "the agent exited with status $?"
    show_agent_log
    return 1
  fi
  ok agent-start
  result ublk-attach ublk_present
  result nbd-attach nbd_attached
  devices_ready || { show_agent_log; return 1; }
}

# --- file systems and files --------------------------------------------------------------

# make_fs NAME DEVICE MOUNTPOINT
make_fs() {
  local name=$1 dev=$2 mnt=$3
  mkdir -p "$mnt"
  if timeout 120 "$BIN/mke2fs" -q -F -t ext4 "$dev" && timeout 30 mount -t ext4 "$dev" "$mnt"; then
    ok "$name"
  else
    fail "$name"
    return 1
  fi
}

# write_files MOUNTPOINT PREFIX: three files of random bytes, one of them not a whole number
# of blocks.
write_files() {
  local mnt=$1 prefix=$2 n=1 kib
  for kib in 2048 1024 301; do
    dd if=/dev/urandom of="$mnt/$prefix-$n.bin" bs=1k count="$kib" 2>/dev/null || return 1
    n=$((n + 1))
  done
}

# report_files VOLUME MOUNTPOINT PREFIX: one "file" line a file for the host, and a checksum
# list for the guest's own check after the agent restarts.
report_files() {
  local vol=$1 mnt=$2 prefix=$3 f sum
  for f in "$mnt/$prefix"-*.bin; do
    sum=$(md5sum <"$f" | cut -d' ' -f1)
    info "file $vol /${f##*/} $sum"
    echo "$sum  $f" >>"/tmp/$vol.md5"
  done
}

# files NAME PREFIX: the same set of files on both file systems, synced.
files() {
  local name=$1 prefix=$2
  if write_files "$UBLK_MNT" "$prefix" && write_files "$NBD_MNT" "$prefix" && timeout 120 sync; then
    ok "$name"
  else
    fail "$name"
  fi
  report_files ublk-vol "$UBLK_MNT" "$prefix"
  report_files nbd-vol "$NBD_MNT" "$prefix"
}

# --- the bookmark ------------------------------------------------------------------------

# The engine asks this agent to freeze both mount points, places the bookmark and thaws.
quiesced_bookmark() {
  local out rc
  out=$(timeout 90 "$BIN/hindsight" bookmark --engine "$ENGINE" --ca "$TLS/ca.pem" --cert "$TLS/agent.pem" --key "$TLS/agent-key.pem" --group "$GROUP" --quiesce --json vm-bookmark 2>&1)
  rc=$?
  echo "$out" | sed 's/^/GVM-INFO bookmark: /'
  if [ "$rc" = 0 ] && echo "$out" | grep -Eq '"consistency": *"app-consistent"'; then
    ok bookmark-quiesced
  else
    fail bookmark-quiesced "exit status $rc"
  fi
}

# --- SIGKILL in the middle of I/O --------------------------------------------------------

# Reads the nbd device over and over until a read fails or the device goes away; an agent
# that dies must turn into an error here, never into a hang.
nbd_reader() {
  while nbd_attached; do
    dd if="$NBD_DEV" of=/dev/null bs=64k iflag=direct 2>>/tmp/nbd-reader.err || return 1
  done
  return 2
}

kill_agent_during_io() {
  local src_md5 killed_at
  timeout 60 umount "$NBD_MNT" || info "umount $NBD_MNT failed"
  dd if=/dev/urandom of=/tmp/during-kill.src bs=1M count=16 2>/dev/null
  src_md5=$(md5sum </tmp/during-kill.src | cut -d' ' -f1)
  spawn ublk-writer dd if=/tmp/during-kill.src of="$UBLK_MNT/during-kill.bin" bs=1M conv=fsync 2>/tmp/ublk-writer.err
  spawn nbd-reader nbd_reader
  sleep 1
  if finished ublk-writer; then info "the ublk writer had finished before the kill"; fi
  kill -9 "$AGENT_PID"
  killed_at=$(date +%s)
  if wait_for 30 agent_dead; then
    wait "$AGENT_PID" 2>/dev/null # reap it
    info "agent killed with SIGKILL"
  else
    info "the agent still runs 30s after SIGKILL"
  fi

  if wait_for 30 finished nbd-reader && [ "$(exit_status nbd-reader)" != 0 ]; then
    ok nbd-dead-agent-errors
    info "nbd reader stopped after $(($(date +%s) - killed_at))s: $(tail -n 1 /tmp/nbd-reader.err 2>/dev/null)"
  else
    fail nbd-dead-agent-errors "nbd I/O neither failed nor ended within 30s"
    kill "$(cat /tmp/nbd-reader.pid)" 2>/dev/null
  fi
  if finished ublk-writer; then
    info "the ublk writer ended while the agent was down"
  else
    info "the ublk writer is held while the agent is down"
  fi

  start_agent
  # ublk user recovery: the kernel held the writer's I/O and re-issues it to the new agent.
  if wait_for 120 finished ublk-writer && [ "$(exit_status ublk-writer)" = 0 ]; then
    ok ublk-survives-agent-kill
    # Read back from the device, not from the page cache.
    echo 3 >/proc/sys/vm/drop_caches
    result ublk-data-after-recovery same_md5 "$UBLK_MNT/during-kill.bin" "$src_md5"
  else
    fail ublk-survives-agent-kill "writer status: $(exit_status ublk-writer 2>/dev/null || echo 'still running')"
    sed 's/^/GVM-INFO writer: /' /tmp/ublk-writer.err
    fail ublk-data-after-recovery "the writer did not complete"
  fi
  agent_alive || info "the restarted agent is not running"
  info "file ublk-vol /during-kill.bin $src_md5"

  if wait_for 30 nbd_attached; then ok nbd-reattach; else fail nbd-reattach; fi
  result nbd-files-after-restart remount_and_check_nbd
}

# same_md5 FILE MD5 (bounded: the file may sit on a device that hangs)
same_md5() { [ "$(timeout 60 md5sum <"$1" | cut -d' ' -f1)" = "$2" ]; }

# Never cd into a mount point: busybox timeout leaves a watcher process behind for up to a
# second, and its working directory would keep the file system busy.
remount_and_check_nbd() {
  timeout 30 mount -t ext4 "$NBD_DEV" "$NBD_MNT" && timeout 60 md5sum -c -s /tmp/nbd-vol.md5
}

# --- the end -----------------------------------------------------------------------------

# check_fs NAME DEVICE: e2fsck must find nothing to repair (-n: never changes the device).
check_fs() {
  if timeout 120 "$BIN/e2fsck" -fn "$2" >/tmp/fsck.log 2>&1; then
    ok "$1"
  else
    fail "$1"
    sed 's/^/GVM-INFO e2fsck: /' /tmp/fsck.log
  fi
}

unmount_and_check() {
  timeout 120 sync
  timeout 60 umount "$UBLK_MNT" || info "umount $UBLK_MNT failed"
  timeout 60 umount "$NBD_MNT" || info "umount $NBD_MNT failed"
  check_fs fsck-ublk "$UBLK_DEV"
  check_fs fsck-nbd "$NBD_DEV"
}

# SIGTERM must delete the ublk device and disconnect nbd before the agent exits.
stop_agent() {
  kill -TERM "$AGENT_PID"
  if wait_for 30 agent_dead && wait_for 5 devices_released; then
    ok agent-stop-releases
  else
    local running=no ublk=no
    agent_alive && running=yes
    ublk_present && ublk=yes
    fail agent-stop-releases "agent running: $running, $UBLK_DEV present: $ublk, nbd size $(nbd_size)"
  fi
}

# --- an exported point, attached in the guest -------------------------------------------

# The host exports nbd-vol at the bookmark (`hindsight export`, read-only) when asked; the
# guest attaches it with the kernel's nbd driver over the network, mounts it read-only and
# finds exactly the files of the bookmark: those written before it, none written after.
attach_export() {
  timeout 20 "$BIN/nbd-client" "${EXPORT%:*}" "${EXPORT#*:}" "$EXPORT_DEV" -N nbd-vol -readonly >/tmp/nbd-client.log 2>&1
}
export_check() {
  local problems='' f
  echo "GVM-WANT-EXPORT vm-bookmark"
  if ! wait_for 90 attach_export; then
    sed 's/^/GVM-INFO nbd-client: /' /tmp/nbd-client.log
    fail export-point-in-guest "nbd-client could not attach the export at $EXPORT"
    return
  fi
  mkdir -p "$EXPORT_MNT"
  if ! timeout 60 mount -t ext4 -o ro,noload "$EXPORT_DEV" "$EXPORT_MNT"; then
    fail export-point-in-guest "the exported point does not mount"
  else
    grep '/before-' /tmp/nbd-vol.md5 | sed "s|$NBD_MNT/|$EXPORT_MNT/|" >/tmp/export.md5
    timeout 60 md5sum -c -s /tmp/export.md5 || problems="a file of the bookmark differs or is missing"
    for f in "$EXPORT_MNT"/after-*; do
      [ -e "$f" ] && problems="$problems; ${f##*/} was written after the bookmark"
    done
    if [ -z "$problems" ]; then ok export-point-in-guest; else fail export-point-in-guest "$problems"; fi
    timeout 30 umount "$EXPORT_MNT"
  fi
  timeout 20 "$BIN/nbd-client" -d "$EXPORT_DEV" >/dev/null 2>&1
}

# --- after a failover --------------------------------------------------------------------

# The files the volumes must hold, as the host lists them on /dev/vdc ("VOLUME /PATH MD5"
# lines, NUL-padded), each checked through the agent's devices.
check_listed() {
  local vol path md5 mnt n=0 rc=0
  tr -d '\000' </dev/vdc >/tmp/listed
  while read -r vol path md5; do
    case $vol in
      ublk-vol) mnt=$UBLK_MNT ;;
      nbd-vol) mnt=$NBD_MNT ;;
      *) continue ;;
    esac
    n=$((n + 1))
    same_md5 "$mnt$path" "$md5" || { info "$SITE: $vol $path differs or is missing"; rc=1; }
  done </tmp/listed
  info "$SITE: $n files checked"
  [ "$n" -gt 0 ] && [ "$rc" = 0 ]
}

mount_both() {
  mkdir -p "$UBLK_MNT" "$NBD_MNT"
  timeout 30 mount -t ext4 "$UBLK_DEV" "$UBLK_MNT" && timeout 30 mount -t ext4 "$NBD_DEV" "$NBD_MNT"
}

# The recovery site's VM on the promoted volumes, or the original VM on its disks after
# failback: no engine to reach (the agent serves at once and tracks the writes).
site_main() {
  info "site $SITE: the agent serves the disks with no engine to reach"
  SITE_CONFIG='start_offline = true
engine_timeout = "1s"'
  : >"$AGENT_LOG"
  write_config
  if start_and_attach; then
    if mount_both; then
      ok "$SITE-mount"
      result "$SITE-files" check_listed
      [ "$SITE" = recovery ] && files recovery-files-written recovery
      unmount_and_check
    else
      fail "$SITE-mount"
    fi
    stop_agent
  fi
  sed 's/^/GVM-LOG /' "$AGENT_LOG"
  echo "GVM-TEST-END fails=$FAILS"
  [ "$FAILS" = 0 ]
}

main() {
  if [ -n "$SITE" ]; then
    site_main
    return
  fi
  info "engine at $ENGINE"
  : >"$AGENT_LOG"
  write_config
  if start_and_attach; then
    # Everything after needs both file systems.
    if make_fs fs-ublk "$UBLK_DEV" "$UBLK_MNT" && make_fs fs-nbd "$NBD_DEV" "$NBD_MNT"; then
      files files-before before
      quiesced_bookmark
      files files-after after
      export_check
      kill_agent_during_io
      unmount_and_check
    fi
    stop_agent
  fi
  sed 's/^/GVM-LOG /' "$AGENT_LOG"
  [ "$FAILS" = 0 ] || dmesg | tail -n 40 | sed 's/^/GVM-DMESG /'
  echo "GVM-TEST-END fails=$FAILS"
  [ "$FAILS" = 0 ]
}

main
