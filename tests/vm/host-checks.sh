# shellcheck shell=bash
# Host-side checks of the VM tier, sourced by scripts/vm-test.sh after the guest has powered
# off. They compare what the guest wrote (its disk images, and the files it reported on the
# serial console) with what the target recovers. Each check prints HOST-OK NAME or
# HOST-FAIL NAME (why).
#
# Uses from the caller: RUN (the run directory with vda.img, vdb.img, target.toml), BIN (the
# directory of the hindsight binary), GROUP, MARKERS (the guest's GVM- lines, one a line).

HOST_PASSED=0
HOST_FAILED=0
SETTLE_SECONDS=60

host_ok() {
  echo "HOST-OK $1"
  HOST_PASSED=$((HOST_PASSED + 1))
}
host_fail() {
  echo "HOST-FAIL $1${2:+ ($2)}"
  HOST_FAILED=$((HOST_FAILED + 1))
}

# The guest's image file of each volume, as QEMU saw it.
source_image() {
  case $1 in
    ublk-vol) echo "$RUN/vda.img" ;;
    nbd-vol) echo "$RUN/vdb.img" ;;
  esac
}
VOLUMES=(ublk-vol nbd-vol)

# guest_files PREFIX: "VOLUME PATH MD5" for every file whose name starts with PREFIX that the
# guest reported with a "GVM-INFO file" line.
guest_files() {
  awk -v p="/$1" '$1 == "GVM-INFO" && $2 == "file" && index($4, p) == 1 {print $3, $4, $5}' "$MARKERS"
}

target_last_seq() {
  local json
  json=$("$BIN/hindsight" history --config "$RUN/target.toml" --group "$GROUP" --json 2>/dev/null) || return 1
  hs_json_field "$json" last_seq
}

# wait_settled SECS: waits until the target's last sequence number has not moved for 2 s and
# prints it; fails after SECS seconds.
wait_settled() {
  local deadline=$((SECONDS + $1)) prev=none cur stable=0
  while ((SECONDS < deadline)); do
    cur=$(target_last_seq) || cur=none
    if [ "$cur" != none ] && [ "$cur" = "$prev" ]; then stable=$((stable + 1)); else stable=0; fi
    if ((stable >= 4)); then
      echo "$cur"
      return 0
    fi
    prev=$cur
    sleep 0.5
  done
  return 1
}

# recover_vm DIR POINT...: recovers every volume of the guest into a fresh DIR; the command's
# output goes to DIR.log.
recover_vm() {
  local dir=$1
  shift
  rm -rf "$dir"
  "$BIN/hindsight" recover --config "$RUN/target.toml" --group "$GROUP" --vm guest "$@" --out-dir "$dir" >"$dir.log" 2>&1
}

# same_images DIR: each recovered image equals the guest's disk byte for byte. Prints the
# first difference of each image that is not.
same_images() {
  local vol rc=0
  for vol in "${VOLUMES[@]}"; do
    cmp "$(source_image "$vol")" "$1/$vol.img" || rc=1
  done
  return $rc
}

# The whole replica at the newest point equals the guest's disks. The target may still be
# applying the last writes when QEMU exits, so this waits for the stream to settle and
# retries within the bound.
check_replica() {
  local deadline=$((SECONDS + SETTLE_SECONDS)) seq differences why="the target's sequence never settled"
  while ((SECONDS < deadline)); do
    seq=$(wait_settled $((deadline - SECONDS))) || break
    if ! recover_vm "$RUN/latest" --latest; then
      why="recover --latest failed: $(tail -n 1 "$RUN/latest.log")"
    elif differences=$(same_images "$RUN/latest" 2>&1); then
      host_ok replica-equals-source
      echo "  (target at seq $seq)"
      return 0
    else
      why="at seq $seq: $(paste -sd ' ' <<<"$differences")"
    fi
    sleep 2
  done
  host_fail replica-equals-source "$why"
}

# files_match DIR PREFIX: every file the guest reported under PREFIX has the guest's md5 in
# the recovered images. Prints what differs.
files_match() {
  local dir=$1 prefix=$2 vol path md5 got n=0 rc=0
  while read -r vol path md5; do
    n=$((n + 1))
    got=$(debugfs -R "cat $path" "$dir/$vol.img" 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$md5" ] || { echo "$vol:$path"; rc=1; }
  done < <(guest_files "$prefix")
  ((n > 0)) || { echo "the guest reported no $prefix files"; rc=1; }
  return $rc
}

# no_files DIR PREFIX: no recovered image has a file whose name starts with PREFIX.
no_files() {
  local dir=$1 prefix=$2 vol found rc=0
  for vol in "${VOLUMES[@]}"; do
    found=$(debugfs -R 'ls /' "$dir/$vol.img" 2>/dev/null | grep -oE "${prefix}[^ ]*\.bin" | paste -sd ' ')
    [ -z "$found" ] || { echo "$vol has $found"; rc=1; }
  done
  return $rc
}

# fsck_images NAME DIR: e2fsck finds nothing to repair in any recovered image.
fsck_images() {
  local name=$1 dir=$2 vol bad=""
  for vol in "${VOLUMES[@]}"; do
    e2fsck -fn "$dir/$vol.img" >"$dir.$vol.fsck" 2>&1 || bad+="$vol "
  done
  if [ -z "$bad" ]; then host_ok "$name"; else host_fail "$name" "e2fsck found errors in ${bad% }"; fi
}

# The bookmark taken with both file systems frozen: marked app-consistent, clean file systems
# without journal replay, the files written before it and none written after it.
check_bookmark() {
  local dir=$RUN/bookmark consistency problems
  if ! recover_vm "$dir" --bookmark vm-bookmark; then
    local why
    why="recover --bookmark failed: $(tail -n 1 "$dir.log")"
    host_fail bookmark-app-consistent "$why"
    host_fail bookmark-fsck "$why"
    host_fail bookmark-image "$why"
    return
  fi
  consistency=$(hs_json_field "$(cat "$dir/manifest.json")" consistency)
  if [ "$consistency" = app-consistent ]; then
    host_ok bookmark-app-consistent
  else
    host_fail bookmark-app-consistent "manifest.json says $consistency"
  fi
  fsck_images bookmark-fsck "$dir"
  if problems=$(files_match "$dir" before- && no_files "$dir" after-); then
    host_ok bookmark-image
  else
    host_fail bookmark-image "$(paste -sd ' ' <<<"$problems")"
  fi
}

# The newest point has every file the guest wrote, the one written across the agent's
# SIGKILL included.
check_latest() {
  local dir=$RUN/latest problems
  [ -d "$dir" ] || recover_vm "$dir" --latest || {
    host_fail latest-fsck "recover --latest failed"
    host_fail latest-image "recover --latest failed"
    return
  }
  fsck_images latest-fsck "$dir"
  if problems=$(files_match "$dir" before- && files_match "$dir" after- && files_match "$dir" during-kill); then
    host_ok latest-image
  else
    host_fail latest-image "$(paste -sd ' ' <<<"$problems")"
  fi
}

HOST_CHECKS=(replica-equals-source bookmark-app-consistent bookmark-fsck bookmark-image latest-fsck latest-image)

run_host_checks() {
  local name
  if ! grep -q '^GVM-OK agent-start' "$MARKERS"; then
    for name in "${HOST_CHECKS[@]}"; do host_fail "$name" "the agent never ran in the guest"; done
    return
  fi
  check_replica
  check_bookmark
  check_latest
}
