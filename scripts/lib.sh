# Shared shell helpers for scripts/demo.sh and scripts/bench.sh. Source it; it sets a trap that
# stops every process it started (by PID) and undoes mounts, loop devices and FUSE mounts.

HS_PIDS=()
HS_UNDO=()

hs_cleanup() {
  local i
  for ((i = ${#HS_UNDO[@]} - 1; i >= 0; i--)); do eval "${HS_UNDO[$i]}" >/dev/null 2>&1 || true; done
  for p in "${HS_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${HS_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  HS_PIDS=()
  HS_UNDO=()
}
trap hs_cleanup EXIT

# hs_undo CMD: run CMD (a string) at cleanup, newest first.
hs_undo() { HS_UNDO+=("$1"); }

# hs_free_port: prints a TCP port nobody listens on.
hs_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# hs_spawn NAME LOGFILE CMD...: starts CMD in the background, remembers its PID in HS_PID.
hs_spawn() {
  local name=$1 log=$2; shift 2
  "$@" >"$log" 2>&1 &
  HS_PID=$!
  HS_PIDS+=("$HS_PID")
  echo "started $name (pid $HS_PID), log $log"
}

# hs_wait_tcp PORT [SECONDS]: waits until something listens on 127.0.0.1:PORT.
hs_wait_tcp() {
  local port=$1 secs=${2:-20} i
  for ((i = 0; i < secs * 10; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$port after ${secs}s" >&2
  return 1
}

# hs_wait_sock PATH [SECONDS]: waits for a unix socket to appear.
hs_wait_sock() {
  local path=$1 secs=${2:-20} i
  for ((i = 0; i < secs * 10; i++)); do
    [ -S "$path" ] && return 0
    sleep 0.1
  done
  echo "socket $path did not appear after ${secs}s" >&2
  return 1
}

# hs_json_field JSON KEY: prints a top-level field of a JSON object.
hs_json_field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# hs_make_pki PKI VM ENGINE_HOSTS: makes, with `hindsight certs` ($HS, default $BIN/hindsight),
# a CA in PKI and the certificates of the target ("dr", for 127.0.0.1), the engine ("primary",
# for ENGINE_HOSTS, comma separated) and the agent of VM (files named as `certs issue` names
# them: PKI/target-dr.pem, PKI/engine-primary.pem, PKI/agent-VM.pem, and their -key.pem).
hs_make_pki() {
  local pki=$1 vm=$2 engine_hosts=$3 hs=${HS:-$BIN/hindsight}
  rm -rf "$pki"
  "$hs" certs init --dir "$pki" >/dev/null
  "$hs" certs issue --dir "$pki" --role target --name dr --host 127.0.0.1 >/dev/null
  "$hs" certs issue --dir "$pki" --role engine --name primary --host "$engine_hosts" >/dev/null
  "$hs" certs issue --dir "$pki" --role agent --name "$vm" >/dev/null
}

# hs_write_configs DIR GROUP VM VOLUME SIZE DISK SOCKET TARGET_LINE: makes a CA and the
# certificates of the target ("dr"), the engine ("primary", both for 127.0.0.1) and the agent
# (VM) in DIR/pki with `hindsight certs` ($HS, default $BIN/hindsight), and writes
# DIR/target.toml, DIR/engine.toml and DIR/agent.toml for one group with one volume, over TLS,
# the target listening on 127.0.0.1:$TPORT and the engine on 127.0.0.1:$EPORT. TARGET_LINE is
# the retention setting, e.g. 'retention = "24h"'.
hs_write_configs() {
  local dir=$1 group=$2 vm=$3 volume=$4 size=$5 disk=$6 sock=$7 target_line=$8
  local pki=$dir/pki
  hs_make_pki "$pki" "$vm" 127.0.0.1
  cat >"$dir/target.toml" <<EOT
[target]
listen = "127.0.0.1:$TPORT"
data_dir = "$dir/target"
$target_line

[tls]
ca = "$pki/ca.pem"
cert = "$pki/target-dr.pem"
key = "$pki/target-dr-key.pem"
engines = ["primary"]
EOT
  cat >"$dir/engine.toml" <<EOT
[engine]
listen = "127.0.0.1:$EPORT"
data_dir = "$dir/engine"

[tls]
ca = "$pki/ca.pem"
cert = "$pki/engine-primary.pem"
key = "$pki/engine-primary-key.pem"

[[group]]
name = "$group"
mode = "cdp"
target = "127.0.0.1:$TPORT"

[[group.volume]]
name = "$volume"
vm = "$vm"
size = "$size"
EOT
  cat >"$dir/agent.toml" <<EOT
[agent]
engine = "127.0.0.1:$EPORT"
vm = "$vm"

[tls]
ca = "$pki/ca.pem"
cert = "$pki/agent-$vm.pem"
key = "$pki/agent-$vm-key.pem"

[[disk]]
group = "$group"
volume = "$volume"
path = "$disk"
listen = "unix:$sock"
EOT
}

# hs_start_cluster DIR BIN SOCK: starts the target, the engine and the agent of the
# configurations hs_write_configs wrote in DIR (binaries in BIN), logs in DIR, and waits until
# the agent's socket SOCK is there.
hs_start_cluster() {
  local dir=$1 bin=$2 sock=$3
  hs_spawn target "$dir/target.log" "$bin/hindsight" target --config "$dir/target.toml"
  hs_wait_tcp "$TPORT"
  hs_spawn engine "$dir/engine.log" "$bin/hindsight" engine --config "$dir/engine.toml"
  hs_wait_tcp "$EPORT"
  hs_spawn agent "$dir/agent.log" "$bin/hindsight-agent" --config "$dir/agent.toml"
  hs_wait_sock "$sock"
}
