#!/usr/bin/env bash
# Installs hindsight-agent in a guest VM: the binary, agent.toml and the systemd unit
# (scripts/hindsight-agent.service), then enables and starts the unit. Every argument is
# checked before anything is changed; a second run with the same arguments changes nothing.
# `install-agent.sh --help` lists the options.
set -euo pipefail
export LC_ALL=C

PROG=install-agent.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
TEMPLATE=$SCRIPT_DIR/hindsight-agent.service
UNIT=hindsight-agent.service

usage() {
  cat <<EOF
Usage: $PROG --engine HOST:PORT --disk GROUP:VOLUME:PATH[:FRONTEND[:DEVICE]] [OPTION]...

Installs hindsight-agent in this VM: the binary to PREFIX/bin, CONFIG_DIR/agent.toml and
SYSTEMD_DIR/$UNIT, checks the configuration with \`hindsight-agent --check\`,
then runs \`systemctl daemon-reload\` and \`systemctl enable --now $UNIT\`.

  --engine HOST:PORT     the engine (required), e.g. 10.0.0.5:7400
  --vm NAME              this VM's name as the engine knows it (default: the host name)
  --disk SPEC            a replicated disk, at least one (repeat for more):
                           GROUP:VOLUME:PATH[:FRONTEND[:DEVICE]]
                           GROUP, VOLUME  consistency group and volume (letters, digits, . _ -)
                           PATH           the VM's real local disk, e.g. /dev/vdb (no ':' in it:
                                          use its /dev/disk/by-id/ name or the kernel name)
                           FRONTEND       auto (default: ublk if the kernel has it, else nbd),
                                          ublk or nbd
                           DEVICE         the device to create: /dev/ublkbN (ublk) or
                                          /dev/nbdN (nbd); without it, the first free one
                         e.g. --disk erp:db-data:/dev/vdb:ublk:/dev/ublkb0
  --freeze MOUNTPOINT    a file system to fsfreeze for a quiesced bookmark (repeatable)
  --ca FILE              the CA certificate (PEM) the engine's certificate is issued by
  --cert FILE            this VM's certificate, from: hindsight certs issue --role agent --name VM
  --key FILE             its private key; the three are installed in CONFIG_DIR/tls/ and
                         named in agent.toml's [tls] (docs/security.md)
  --server-name NAME     the name the engine's certificate must be valid for (default: the
                         host of --engine)
  --insecure-plaintext   no TLS: only for an engine on loopback (127.0.0.1), instead of
                         --ca, --cert and --key
  --binary PATH          the hindsight-agent to install (default: build/release/hindsight-agent
                         of this repository if it exists, else build/debug/hindsight-agent)
  --prefix DIR           install the binary as DIR/bin/hindsight-agent (default: /usr/local)
  --config-dir DIR       where agent.toml goes (default: /etc/hindsight)
  --systemd-dir DIR      where the unit goes (default: /etc/systemd/system)
  --force                replace an existing agent.toml that differs (kept as agent.toml.bak)
  --no-start             install only; do not run systemctl
  --root DIR             stage the installation under DIR (every installed path is prefixed
                         with DIR; systemctl is not run); the configuration is checked only
                         if every disk PATH exists on this machine
  --dry-run              show what would be done and change nothing
  -h, --help             this text

File systems on the agent's devices are mounted as network file systems, after the agent:
  /dev/ublkb0  /srv/db  ext4  _netdev,x-systemd.requires=$UNIT  0  2
(the unit file explains why).

Exit status: 0 done (or nothing to do), 2 a bad argument or a configuration the agent
rejects, 1 any other failure (an existing different agent.toml without --force, not root,
an install step or systemctl failed).
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
# A bad argument: exit 2.
bad() {
  printf '%s: %s\n' "$PROG" "$*" >&2
  printf '%s: see %s --help\n' "$PROG" "$PROG" >&2
  exit 2
}
# Anything else that stops the installation: exit 1.
die() {
  printf '%s: %s\n' "$PROG" "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- arguments

engine='' vm='' binary='' prefix='' config_dir='' systemd_dir='' root=''
ca='' cert='' key='' server_name=''
force=0 no_start=0 dry_run=0 insecure=0
disk_specs=()
freeze=()

# set_once OPTION VARIABLE VALUE: options that take one value may be given once.
set_once() {
  [ -z "${!2}" ] || bad "$1 is given twice (\"${!2}\" and \"$3\")"
  printf -v "$2" '%s' "$3"
}

while [ $# -gt 0 ]; do
  opt=$1 val='' inline=0
  case $opt in
    --*=*) val=${opt#*=} opt=${opt%%=*} inline=1 ;;
  esac
  case $opt in
    -h | --help)
      usage
      exit 0
      ;;
    --engine | --vm | --disk | --freeze | --binary | --prefix | --config-dir | --systemd-dir | --root | --ca | --cert | --key | --server-name)
      if [ $inline = 0 ]; then
        [ $# -ge 2 ] || bad "$opt needs a value"
        case $2 in --*) bad "$opt needs a value (found the option $2 instead)" ;; esac
        val=$2
        shift
      fi
      [ -n "$val" ] || bad "$opt needs a value (it is empty)"
      case $opt in
        --engine) set_once "$opt" engine "$val" ;;
        --vm) set_once "$opt" vm "$val" ;;
        --binary) set_once "$opt" binary "$val" ;;
        --prefix) set_once "$opt" prefix "$val" ;;
        --config-dir) set_once "$opt" config_dir "$val" ;;
        --systemd-dir) set_once "$opt" systemd_dir "$val" ;;
        --root) set_once "$opt" root "$val" ;;
        --ca) set_once "$opt" ca "$val" ;;
        --cert) set_once "$opt" cert "$val" ;;
        --key) set_once "$opt" key "$val" ;;
        --server-name) set_once "$opt" server_name "$val" ;;
        --disk) disk_specs+=("$val") ;;
        --freeze) freeze+=("$val") ;;
      esac
      ;;
    --force | --no-start | --dry-run | --insecure-plaintext)
      [ $inline = 0 ] || bad "$opt takes no value"
      case $opt in
        --force) force=1 ;;
        --insecure-plaintext) insecure=1 ;;
        --no-start) no_start=1 ;;
        --dry-run) dry_run=1 ;;
      esac
      ;;
    -*) bad "unknown option $opt" ;;
    *) bad "unexpected argument \"$opt\" (every argument is an option, e.g. --disk $opt)" ;;
  esac
  shift
done

# The rules of the agent's own configuration check, so that mistakes show up here, named by
# the option that caused them.
valid_name() { [[ $1 =~ ^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$ ]]; }
name_rule="use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"

[ -n "$engine" ] || bad "--engine HOST:PORT is required (the engine's address, e.g. --engine 10.0.0.5:7400)"
host_port='^([][A-Za-z0-9.:_-]+):([0-9]{1,5})$'
if [[ ! $engine =~ $host_port ]] || [ $((10#${BASH_REMATCH[2]})) -eq 0 ] ||
  [ $((10#${BASH_REMATCH[2]})) -gt 65535 ]; then
  bad "--engine \"$engine\" is not an address; give host:port with a port from 1 to 65535, e.g. --engine 10.0.0.5:7400"
fi

if [ -z "$vm" ]; then
  vm=$(uname -n)
  valid_name "$vm" || bad "the host name \"$vm\" cannot be the VM name ($name_rule); give --vm NAME"
else
  valid_name "$vm" || bad "--vm \"$vm\" is not a valid name; $name_rule"
fi

# Paths written into the unit file are kept to characters systemd takes literally.
install_dir() {
  local opt=$1 val=$2
  [[ $val =~ ^/[A-Za-z0-9/._+-]*$ ]] ||
    bad "$opt \"$val\" must be an absolute path of letters, digits and / . _ + - (it is written into the unit file)"
  val=${val%/}
  printf '%s' "${val:-/}"
}
prefix=$(install_dir --prefix "${prefix:-/usr/local}")
config_dir=$(install_dir --config-dir "${config_dir:-/etc/hindsight}")
systemd_dir=$(install_dir --systemd-dir "${systemd_dir:-/etc/systemd/system}")
bin_path=${prefix%/}/bin/hindsight-agent
config_path=${config_dir%/}/agent.toml
unit_path=${systemd_dir%/}/$UNIT

if [ -n "$root" ]; then
  [ -d "$root" ] || bad "--root \"$root\" is not a directory; create it first"
  root=$(cd "$root" && pwd)
  [ "$root" != / ] || bad "--root / is this system itself; leave --root out to install for real"
fi

absolute_path() { [[ $1 == /* && $1 != *[[:cntrl:]]* ]]; }

[ ${#disk_specs[@]} -gt 0 ] ||
  bad "no --disk given; name at least one disk as GROUP:VOLUME:PATH[:FRONTEND[:DEVICE]], e.g. --disk erp:db-data:/dev/vdb"

disk_group=() disk_volume=() disk_path=() disk_frontend=() disk_device=()
for spec in "${disk_specs[@]}"; do
  # Split on every ':', keeping empty fields (read -a would drop a trailing one).
  fields=()
  rest=$spec
  while [[ $rest == *:* ]]; do
    fields+=("${rest%%:*}")
    rest=${rest#*:}
  done
  fields+=("$rest")
  what="--disk \"$spec\""
  if [ ${#fields[@]} -lt 3 ] || [ ${#fields[@]} -gt 5 ]; then
    bad "$what: expected GROUP:VOLUME:PATH[:FRONTEND[:DEVICE]] (3 to 5 fields separated by ':'), e.g. --disk erp:db-data:/dev/vdb"
  fi
  group=${fields[0]} volume=${fields[1]} path=${fields[2]}
  frontend=${fields[3]-auto} device=${fields[4]-}
  valid_name "$group" || bad "$what: group name \"$group\" is not valid; $name_rule"
  valid_name "$volume" || bad "$what: volume name \"$volume\" is not valid; $name_rule"
  absolute_path "$path" || bad "$what: PATH \"$path\" is not an absolute path; give the local disk as e.g. /dev/vdb"
  case $frontend in
    auto | ublk | nbd) ;;
    *) bad "$what: front end \"$frontend\" is not known; use auto, ublk or nbd (and a PATH cannot contain ':')" ;;
  esac
  if [ ${#fields[@]} -eq 5 ]; then
    case $frontend in
      ublk) ok='^/dev/ublkb[0-9]+$' want='/dev/ublkbN, e.g. /dev/ublkb0' ;;
      nbd) ok='^/dev/nbd[0-9]+$' want='/dev/nbdN, e.g. /dev/nbd0' ;;
      *) bad "$what: a DEVICE needs the front end that creates it: ublk with /dev/ublkbN, nbd with /dev/nbdN (e.g. $group:$volume:$path:ublk:/dev/ublkb0)" ;;
    esac
    [[ $device =~ $ok ]] || bad "$what: device \"$device\" is not one the $frontend front end creates; give $want"
  fi
  for i in "${!disk_volume[@]}"; do
    [ "${disk_volume[$i]}" != "$volume" ] || bad "$what: volume \"$volume\" is given twice; each volume is served once"
    [ "${disk_path[$i]}" != "$path" ] || bad "$what: the local disk $path is given twice (also for volume \"${disk_volume[$i]}\")"
    [ -z "$device" ] || [ "${disk_device[$i]}" != "$device" ] ||
      bad "$what: device $device is given twice (also for volume \"${disk_volume[$i]}\")"
  done
  disk_group+=("$group") disk_volume+=("$volume") disk_path+=("$path")
  disk_frontend+=("$frontend") disk_device+=("$device")
done

for i in "${!freeze[@]}"; do
  m=${freeze[$i]}
  absolute_path "$m" || bad "--freeze \"$m\" is not an absolute mount point, e.g. --freeze /srv/db"
  for ((j = 0; j < i; j++)); do
    [ "${freeze[$j]}" != "$m" ] || bad "--freeze $m is given twice"
  done
done

# The link to the engine: TLS with this VM's certificate, or plaintext on loopback only.
tls_dir=${config_dir%/}/tls
if [ $insecure = 1 ]; then
  [ -z "$ca$cert$key" ] || bad "--insecure-plaintext cannot go with --ca, --cert or --key; choose TLS or plaintext"
  [ -z "$server_name" ] || bad "--server-name is for TLS; it cannot go with --insecure-plaintext"
  engine_host=${engine%:*}
  engine_host=${engine_host#[}
  engine_host=${engine_host%]}
  case $engine_host in
    127.* | localhost | ::1) ;;
    *) bad "--insecure-plaintext is only allowed with an engine on loopback, not $engine; give --ca, --cert and --key (docs/security.md)" ;;
  esac
else
  if [ -z "$ca" ] || [ -z "$cert" ] || [ -z "$key" ]; then
    bad "the link to the engine uses TLS: give --ca, --cert and --key (the CA certificate, and this VM's certificate and key from: hindsight certs issue --dir DIR --role agent --name $vm), or --insecure-plaintext for an engine on loopback"
  fi
  for opt in ca cert key; do
    f=${!opt}
    [ -f "$f" ] && [ -r "$f" ] || bad "--$opt \"$f\" is not a readable file"
    printf -v "$opt" '%s' "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"
  done
fi

if [ -z "$binary" ]; then
  for b in "$REPO/build/release/hindsight-agent" "$REPO/build/debug/hindsight-agent"; do
    if [ -x "$b" ]; then
      binary=$b
      break
    fi
  done
  [ -n "$binary" ] || bad "no hindsight-agent binary in $REPO/build/release or $REPO/build/debug; build it (cargo build --release --bin hindsight-agent) or give --binary PATH"
  if [ "$binary" = "$REPO/build/release/hindsight-agent" ] && [ "$REPO/build/debug/hindsight-agent" -nt "$binary" ]; then
    warn "$binary is older than $REPO/build/debug/hindsight-agent; installing it anyway (rebuild it with cargo build --release --bin hindsight-agent, or give --binary)"
  fi
fi
[ -f "$binary" ] || bad "--binary \"$binary\" does not exist or is not a file"
[ -x "$binary" ] || bad "--binary \"$binary\" is not executable"
version=$("$binary" --version 2>&1) || version=''
[[ $version == hindsight-agent\ * ]] ||
  bad "--binary \"$binary\" is not a hindsight-agent for this machine (\`$binary --version\` printed: ${version:-nothing})"

if [ -z "$root" ] && [ $dry_run = 0 ] && [ "$(id -u)" != 0 ]; then
  die "run it as root (it installs into $prefix, $config_dir and $systemd_dir and starts a service), or stage the files with --root DIR"
fi

# ---------------------------------------------------------------- the files to install

tmp=$(mktemp -d "${TMPDIR:-/tmp}/install-agent.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# toml_str S: S as a TOML basic string (control characters were refused above).
toml_str() {
  local s
  s=$(printf '%s' "$1" | sed 's/[\\"]/\\&/g')
  printf '"%s"' "$s"
}

# agent_toml CA CERT KEY: the configuration, naming these TLS files.
agent_toml() {
  echo "# hindsight-agent configuration, written by install-agent.sh (rerun it, or edit and check"
  echo "# with: $bin_path --config $config_path --check)."
  echo "[agent]"
  echo "engine = $(toml_str "$engine")"
  echo "vm = $(toml_str "$vm")"
  if [ ${#freeze[@]} -gt 0 ]; then
    list=''
    for m in "${freeze[@]}"; do list+="${list:+, }$(toml_str "$m")"; done
    echo "freeze = [$list]"
  fi
  for i in "${!disk_volume[@]}"; do
    echo
    echo "[[disk]]"
    echo "group = $(toml_str "${disk_group[$i]}")"
    echo "volume = $(toml_str "${disk_volume[$i]}")"
    echo "path = $(toml_str "${disk_path[$i]}")"
    echo "frontend = $(toml_str "${disk_frontend[$i]}")"
    [ -z "${disk_device[$i]}" ] || echo "device = $(toml_str "${disk_device[$i]}")"
  done
  echo
  echo "[tls]"
  if [ $insecure = 1 ]; then
    echo "insecure_plaintext = true"
  else
    echo "ca = $(toml_str "$1")"
    echo "cert = $(toml_str "$2")"
    echo "key = $(toml_str "$3")"
    [ -z "$server_name" ] || echo "server_name = $(toml_str "$server_name")"
  fi
}
agent_toml "$tls_dir/ca.pem" "$tls_dir/agent.pem" "$tls_dir/agent-key.pem" >"$tmp/agent.toml"
# The same configuration with the TLS files where they are now, for --check before installing.
agent_toml "$ca" "$cert" "$key" >"$tmp/check.toml"

[ -f "$TEMPLATE" ] || die "the unit template $TEMPLATE is missing (it ships next to this script)"
sed -e "s|@AGENT_BINARY@|$bin_path|g" -e "s|@AGENT_CONFIG@|$config_path|g" "$TEMPLATE" >"$tmp/$UNIT"
if grep -q '@AGENT_[A-Z]*@' "$tmp/$UNIT"; then
  die "the unit template $TEMPLATE has a placeholder this script does not know: $(grep -o '@AGENT_[A-Z]*@' "$tmp/$UNIT" | head -n1)"
fi

# ---------------------------------------------------------------- checks before any change

# Disk paths are checked as this machine sees them: with --root they usually belong to the
# guest being staged, so the check runs only when all of them are here.
missing=()
for p in "${disk_path[@]}"; do [ -e "$p" ] || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then
  rc=0
  out=$("$binary" --config "$tmp/check.toml" --check 2>&1) || rc=$?
  if [ $rc = 3 ]; then
    # The configuration is right, but this kernel lacks a front end it asks for right now.
    printf '%s: warning: %s\n' "$PROG" "$(printf '%s\n' "$out" | grep '^error: ' | sed 's/^error: //')" >&2
    printf '%s: warning: load the module before the service starts, or it will fail\n' "$PROG" >&2
    rc=0
  elif [ $rc != 0 ]; then
    {
      printf '%s: the agent rejects the configuration these arguments give (hindsight-agent --check exited %s):\n' "$PROG" "$rc"
      printf '%s\n' "$out" | sed 's/^/  /'
      printf '%s: the configuration was:\n' "$PROG"
      sed 's/^/  /' "$tmp/agent.toml"
    } >&2
    [ $rc = 2 ] && exit 2
    exit 1
  fi
  say "configuration checked: hindsight-agent --check accepts it"
elif [ -n "$root" ]; then
  say "configuration not checked: ${missing[*]} not on this machine (check it in the guest with $bin_path --config $config_path --check)"
else
  warn "configuration not checked: ${missing[*]} does not exist; once it does, run $bin_path --config $config_path --check"
fi

if [ -z "$root" ] && command -v mountpoint >/dev/null; then
  for m in "${freeze[@]}"; do
    mountpoint -q "$m" 2>/dev/null || warn "--freeze $m is not a mount point now; fsfreeze fails on it until it is"
  done
fi

# The staged (or real) location of an installed path.
at() { printf '%s%s' "$root" "$1"; }

config_state=new
if [ -e "$(at "$config_path")" ]; then
  if cmp -s "$tmp/agent.toml" "$(at "$config_path")"; then
    config_state=same
  elif [ $force = 1 ]; then
    config_state=replace
  else
    {
      printf '%s: %s exists and differs from the configuration these arguments give:\n' "$PROG" "$(at "$config_path")"
      diff -u --label "$(at "$config_path") (installed)" --label "new" "$(at "$config_path")" "$tmp/agent.toml" | sed 's/^/  /' || true
      printf '%s: nothing was changed; rerun with --force to replace it (the old one is kept as %s.bak)\n' \
        "$PROG" "$(at "$config_path")"
    } >&2
    exit 1
  fi
fi

# ---------------------------------------------------------------- changes

changed=0
# put SRC DEST MODE: installs SRC as DEST (atomically: a running agent keeps its old binary)
# unless DEST already has that content and mode.
put() {
  local src=$1 dst=$2 mode=$3
  if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
    if [ "$(stat -c %a "$dst")" = "${mode#0}" ]; then
      say "unchanged: $dst"
    elif [ $dry_run = 1 ]; then
      say "would chmod $mode $dst"
    else
      chmod "$mode" "$dst"
      say "chmod $mode: $dst"
    fi
    return
  fi
  changed=1
  if [ $dry_run = 1 ]; then
    say "would install $dst"
    return
  fi
  mkdir -p "$(dirname "$dst")"
  install -m "$mode" "$src" "$dst.new"
  mv -f "$dst.new" "$dst"
  say "installed $dst"
}

put "$binary" "$(at "$bin_path")" 0755
if [ $config_state = replace ]; then
  if [ $dry_run = 1 ]; then
    say "would keep the previous configuration as $(at "$config_path").bak"
  else
    cp -p "$(at "$config_path")" "$(at "$config_path").bak"
    say "kept the previous configuration as $(at "$config_path").bak"
  fi
fi
put "$tmp/agent.toml" "$(at "$config_path")" 0644
if [ $insecure = 0 ]; then
  put "$ca" "$(at "$tls_dir/ca.pem")" 0644
  put "$cert" "$(at "$tls_dir/agent.pem")" 0644
  put "$key" "$(at "$tls_dir/agent-key.pem")" 0600
fi
put "$tmp/$UNIT" "$(at "$unit_path")" 0644

example_device=/dev/ublkb0
for d in "${disk_device[@]}"; do
  if [ -n "$d" ]; then
    example_device=$d
    break
  fi
done
fstab_hint="file systems on the agent's devices go in /etc/fstab as network mounts, e.g.: $example_device /srv/data ext4 _netdev,x-systemd.requires=$UNIT 0 2"
start_cmd="systemctl daemon-reload && systemctl enable --now $UNIT"

if [ -n "$root" ] || [ $dry_run = 1 ] || [ $no_start = 1 ]; then
  [ $dry_run = 0 ] || say "dry run: nothing was changed"
  say "not started; in the guest run: $start_cmd"
  say "$fstab_hint"
  exit 0
fi

[ -d /run/systemd/system ] || die "systemd is not running here, so $UNIT cannot be started; the files are installed: rerun with --no-start, or start $bin_path --config $config_path yourself"
was_active=0
systemctl is-active --quiet "$UNIT" && was_active=1
systemctl daemon-reload || die "systemctl daemon-reload failed"
systemctl enable --now "$UNIT" || die "systemctl enable --now $UNIT failed; see: journalctl -u $UNIT"
if [ $was_active = 1 ] && [ $changed = 1 ]; then
  # Restarting releases the devices (deleted ublk device, disconnected nbd): never do it
  # under mounted file systems on the operator's behalf.
  say "$UNIT was already running and keeps the old files until it restarts; its devices are released while it stops, so unmount their file systems first (or reboot), then: systemctl restart $UNIT"
else
  say "$UNIT is enabled and running"
fi
say "$fstab_hint"
