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

# hs_bench_bin ROOT: sets BIN to the directory of hindsight and hindsight-agent: $HS_BENCH_BIN
# if set, else the release build of ROOT (built now).
hs_bench_bin() {
  if [ -n "${HS_BENCH_BIN:-}" ]; then
    BIN=$(cd "$HS_BENCH_BIN" && pwd)
  else
    (cd "$1" && cargo build --release --workspace --bins -q)
    BIN=$1/build/release
  fi
}

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

# hs_stop PID [NAME]: stops one process hs_spawn started (SIGTERM, SIGKILL after 5 s), reaps it
# and forgets it, so that the cleanup never signals a PID the system has given to another process.
hs_stop() {
  local pid=$1 name=${2:-$1} keep=() p
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$name (pid $pid) did not stop on SIGTERM; sending SIGKILL" >&2
    kill -9 "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  for p in "${HS_PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  HS_PIDS=("${keep[@]}")
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
# the retention setting, e.g. 'retention = "24h"'. The group's mode is $HS_MODE (default cdp),
# $HS_GROUP_LINES (default none) are added to its [[group]] section (e.g. 'interval = "5s"'),
# and with HS_PLAINTEXT=1 every link is plaintext (`insecure_plaintext = true`, loopback only)
# and no certificate is made.
hs_write_configs() {
  local dir=$1 group=$2 vm=$3 volume=$4 size=$5 disk=$6 sock=$7 target_line=$8
  local pki=$dir/pki tls_target tls_engine tls_agent
  if [ "${HS_PLAINTEXT:-}" = 1 ]; then
    tls_target='insecure_plaintext = true'
    tls_engine=$tls_target
    tls_agent=$tls_target
  else
    hs_make_pki "$pki" "$vm" 127.0.0.1
    tls_target=$(printf 'ca = "%s"\ncert = "%s"\nkey = "%s"\nengines = ["primary"]' "$pki/ca.pem" "$pki/target-dr.pem" "$pki/target-dr-key.pem")
    tls_engine=$(printf 'ca = "%s"\ncert = "%s"\nkey = "%s"' "$pki/ca.pem" "$pki/engine-primary.pem" "$pki/engine-primary-key.pem")
    tls_agent=$(printf 'ca = "%s"\ncert = "%s"\nkey = "%s"' "$pki/ca.pem" "$pki/agent-$vm.pem" "$pki/agent-$vm-key.pem")
  fi
  cat >"$dir/target.toml" <<EOT
[target]
listen = "127.0.0.1:$TPORT"
data_dir = "$dir/target"
$target_line

[tls]
$tls_target
EOT
  cat >"$dir/engine.toml" <<EOT
[engine]
listen = "127.0.0.1:$EPORT"
data_dir = "$dir/engine"

[tls]
$tls_engine

[[group]]
name = "$group"
mode = "${HS_MODE:-cdp}"
target = "127.0.0.1:$TPORT"
${HS_GROUP_LINES:-}

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
$tls_agent

[[disk]]
group = "$group"
volume = "$volume"
path = "$disk"
listen = "unix:$sock"
EOT
}

# hs_start_cluster DIR BIN SOCK: starts the target, the engine and the agent of the
# configurations hs_write_configs wrote in DIR (binaries in BIN), logs in DIR, and waits until
# the agent's socket SOCK is there. Their PIDs are left in HS_TARGET_PID, HS_ENGINE_PID and
# HS_AGENT_PID.
# shellcheck disable=SC2034 # the PIDs are for the scripts that source this file
hs_start_cluster() {
  local dir=$1 bin=$2 sock=$3
  hs_spawn target "$dir/target.log" "$bin/hindsight" target --config "$dir/target.toml"
  HS_TARGET_PID=$HS_PID
  hs_wait_tcp "$TPORT"
  hs_spawn engine "$dir/engine.log" "$bin/hindsight" engine --config "$dir/engine.toml"
  HS_ENGINE_PID=$HS_PID
  hs_wait_tcp "$EPORT"
  hs_spawn agent "$dir/agent.log" "$bin/hindsight-agent" --config "$dir/agent.toml"
  HS_AGENT_PID=$HS_PID
  hs_wait_sock "$sock"
}
