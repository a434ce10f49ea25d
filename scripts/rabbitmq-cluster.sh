#!/usr/bin/env bash
# A throw-away RabbitMQ cluster of extra nodes on this machine, beside (never
# touching) the main broker on 5672. Used by epu-core/tests/broker_cluster.rs; also
# handy by hand.
#
#   scripts/rabbitmq-cluster.sh start DIR [NODES]   # NODES defaults to 3
#   scripts/rabbitmq-cluster.sh stop-node DIR I     # stop node I (1-based), keep the rest
#   scripts/rabbitmq-cluster.sh kill-node DIR I     # SIGKILL node I: a crash, no goodbyes
#   scripts/rabbitmq-cluster.sh start-node DIR I    # start a stopped node I again
#   scripts/rabbitmq-cluster.sh status DIR
#   scripts/rabbitmq-cluster.sh ctl DIR I ARGS...   # rabbitmqctl ARGS against node I (30 s)
#   scripts/rabbitmq-cluster.sh logs DIR            # the tail of every node's log
#   scripts/rabbitmq-cluster.sh stop DIR            # stop every node and delete DIR
#
# Everything lives in DIR (created by start; must not exist or be empty): each node's
# data, logs and config, and an Erlang cookie of its own in DIR/home. The nodes are
# named epu-c<I>-<id>@localhost, listen for AMQP on free ports of 127.0.0.1 only and
# have no plugins, so nothing clashes with the main node (5672/15672/25672, its own
# cookie); no command here ever names the main node. `start` writes DIR/cluster.env
# (node names, ports, process groups, and EPU_CLUSTER_URLS: the comma-separated AMQP
# URLs, guest/guest, in node order) and prints EPU_CLUSTER_URLS=... last.
#
# Every call to rabbitmqctl has a deadline (`timeout`), every wait is bounded and fails
# saying what it waited for, with the node's log. Exit status: 0 ok, 1 failed, 2 usage,
# 3 rabbitmq-server not installed.
set -euo pipefail

log() { printf '== rabbitmq-cluster: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

usage() {
  sed -n '5,13p' "$0" >&2
  exit 2
}

# The real scripts, not Debian's /usr/sbin wrappers (they switch to the rabbitmq
# user and its HOME, so its cookie, which would make our nodes unreachable).
find_sbin() {
  if [ -n "${RABBITMQ_SBIN:-}" ]; then
    if [ ! -x "$RABBITMQ_SBIN/rabbitmq-server" ]; then
      log "RABBITMQ_SBIN=$RABBITMQ_SBIN has no rabbitmq-server; is rabbitmq-server installed?"
      exit 3
    fi
    printf '%s\n' "$RABBITMQ_SBIN"
    return
  fi
  if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    printf '%s\n' /usr/lib/rabbitmq/bin
    return
  fi
  local bin
  bin=$(command -v rabbitmq-server || true)
  if [ -z "$bin" ]; then
    log "rabbitmq-server is not installed (not on PATH, no /usr/lib/rabbitmq/bin);"
    log "install it (Debian: apt-get install -y rabbitmq-server; scripts/test.sh does), or set RABBITMQ_SBIN"
    exit 3
  fi
  dirname "$(readlink -f "$bin")"
}

# The environment every rabbitmq command of this cluster runs in: our HOME (cookie),
# our env file (the system one names the main node), our plugins file, epmd on
# localhost only.
cluster_env() {
  export HOME="$DIR/home"
  export RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins"
  export ERL_EPMD_ADDRESS=127.0.0.1
  unset RABBITMQ_NODENAME RABBITMQ_NODE_PORT RABBITMQ_DIST_PORT RABBITMQ_CONFIG_FILE \
    RABBITMQ_MNESIA_BASE RABBITMQ_LOG_BASE RABBITMQ_PID_FILE RABBITMQ_ERLANG_COOKIE ERL_FLAGS
}

ctl() { # ctl SECONDS NODE ARGS...
  local secs=$1 node=$2
  shift 2
  timeout --kill-after=5 "$secs" "$SBIN/rabbitmqctl" -q -n "$node" "$@"
}

node_log() { # the tail of node I's log
  local i=$1
  local f
  for f in "$DIR/n$i"/log/*.log "$DIR/n$i/stdout.log"; do
    [ -f "$f" ] || continue
    printf -- '--- %s (last 40 lines)\n' "$f" >&2
    tail -n 40 "$f" >&2 || true
  done
}

fail_with_log() { # fail_with_log I MESSAGE
  local i=$1
  shift
  log "$*"
  node_log "$i"
  exit 1
}

load_state() {
  [ -f "$DIR/cluster.env" ] || die "$DIR/cluster.env not found: no cluster was started in $DIR"
  # shellcheck disable=SC1091
  . "$DIR/cluster.env"
}

# Free, distinct ports on 127.0.0.1, away from the main node's and from the CLI
# tools' own distribution range (35672-35682).
pick_ports() { # pick_ports COUNT -> space-separated
  local want=$1 p picked=() tries=0
  p=$(( 20000 + ($$ * 7 + RANDOM) % 9000 ))
  while [ "${#picked[@]}" -lt "$want" ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 2000 ] || die "found no $want free ports between 20000 and 30000"
    p=$((p + 1))
    [ "$p" -lt 30000 ] || p=20000
    case " ${picked[*]:-} " in *" $p "*) continue ;; esac
    [ "$p" -eq 25672 ] && continue
    port_open "$p" && continue
    picked+=("$p")
  done
  echo "${picked[*]}"
}

start() {
  local n=${1:-3}
  [[ "$n" =~ ^[1-9]$ ]] || die "NODES must be 1-9, got $n"
  if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
    die "$DIR exists and is not empty; give start a fresh directory"
  fi
  command -v timeout >/dev/null || die "timeout (coreutils) is needed"
  mkdir -p "$DIR/home"
  DIR=$(cd "$DIR" && pwd)
  local t0=$SECONDS id
  id=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' | head -c 6)
  head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr '0-9a-f' 'A-P' | head -c 32 >"$DIR/home/.erlang.cookie"
  chmod 400 "$DIR/home/.erlang.cookie"
  : >"$DIR/rabbitmq-env.conf"
  echo '[].' >"$DIR/enabled_plugins"
  cluster_env
  # A start that fails stops what it started (the logs stay in DIR for `logs`;
  # `stop` deletes DIR).
  trap 'rc=$?; if [ "$rc" -ne 0 ]; then stop_started; fi' EXIT

  local ports
  read -r -a ports <<<"$(pick_ports $((2 * n)))"
  local names=() amqp=() dist=() pgids=() urls=()
  local i
  for i in $(seq 1 "$n"); do
    names+=("epu-c$i-$id@localhost")
    amqp+=("${ports[$((2 * i - 2))]}")
    dist+=("${ports[$((2 * i - 1))]}")
    urls+=("amqp://guest:guest@127.0.0.1:${ports[$((2 * i - 2))]}/%2f")
  done
  {
    echo "NODES=\"${names[*]}\""
    echo "AMQP_PORTS=\"${amqp[*]}\""
    echo "DIST_PORTS=\"${dist[*]}\""
    local joined
    joined=$(IFS=,; echo "${urls[*]}")
    echo "EPU_CLUSTER_URLS=\"$joined\""
  } >"$DIR/cluster.env"

  for i in $(seq 1 "$n"); do
    local nd="$DIR/n$i"
    mkdir -p "$nd/mnesia" "$nd/log"
    cat >"$nd/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:${amqp[$((i - 1))]}
loopback_users.guest = true
log.file.level = info
log.console = false
EOF
    launch_node "$i" "${names[$((i - 1))]}" "${amqp[$((i - 1))]}" "${dist[$((i - 1))]}"
    pgids+=("$LAUNCHED")
  done
  log "started ${#names[@]} nodes (${names[*]}); waiting for them to boot"

  for i in $(seq 1 "$n"); do
    await_node "$i" "${names[$((i - 1))]}" "${amqp[$((i - 1))]}" "${pgids[$((i - 1))]}"
  done
  log "all nodes booted after $((SECONDS - t0)) s; joining them to ${names[0]}"

  for i in $(seq 2 "$n"); do
    local node=${names[$((i - 1))]}
    local step out
    for step in stop_app "join_cluster ${names[0]}" start_app; do
      # shellcheck disable=SC2086 # step is a command and its argument
      out=$(ctl 60 "$node" $step 2>&1) ||
        fail_with_log "$i" "rabbitmqctl -n $node $step failed or took over 60 s: $out"
    done
    await_node "$i" "$node" "${amqp[$((i - 1))]}" "${pgids[$((i - 1))]}"
  done

  # Every node must see every other as running.
  local deadline=$((SECONDS + 60)) running
  for i in $(seq 1 "$n"); do
    while :; do
      running=$(ctl 20 "${names[$((i - 1))]}" eval 'length(rabbit_nodes:all_running()).' 2>/dev/null || echo 0)
      [ "$running" = "$n" ] && break
      [ "$SECONDS" -lt "$deadline" ] ||
        fail_with_log "$i" "${names[$((i - 1))]} sees $running running nodes, not $n, after 60 s"
      sleep 1
    done
  done
  echo "STARTED_SECS=$((SECONDS - t0))" >>"$DIR/cluster.env"
  trap - EXIT
  log "cluster of $n nodes up after $((SECONDS - t0)) s"
  echo "EPU_CLUSTER_URLS=$(IFS=,; echo "${urls[*]}")"
}

# launch_node I NAME AMQP_PORT DIST_PORT: starts node I in the background (its config
# and data are in DIR/nI), records its process group in cluster.env, sets LAUNCHED.
launch_node() {
  local i=$1 name=$2 amqp_port=$3 dist_port=$4
  local nd="$DIR/n$i"
  # setsid: the node is a process group of its own, so stop can always end it.
  RABBITMQ_NODENAME="$name" \
    RABBITMQ_NODE_PORT="$amqp_port" \
    RABBITMQ_DIST_PORT="$dist_port" \
    RABBITMQ_CONFIG_FILE="$nd/rabbitmq.conf" \
    RABBITMQ_MNESIA_BASE="$nd/mnesia" \
    RABBITMQ_LOG_BASE="$nd/log" \
    RABBITMQ_PID_FILE="$nd/pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}' \
    setsid "$SBIN/rabbitmq-server" </dev/null >>"$nd/stdout.log" 2>&1 &
  LAUNCHED=$!
  # Sourced in order: a later line wins, so a restarted node's group replaces the old.
  echo "PGID_$i=$LAUNCHED" >>"$DIR/cluster.env"
}

# start_node I: starts a stopped node of the cluster again (it rejoins by itself).
start_node() {
  local i=$1
  load_state
  cluster_env
  local names amqp dist
  read -r -a names <<<"$NODES"
  read -r -a amqp <<<"$AMQP_PORTS"
  read -r -a dist <<<"$DIST_PORTS"
  [ "$i" -ge 1 ] && [ "$i" -le "${#names[@]}" ] || die "node $i: the cluster has nodes 1-${#names[@]}"
  local var="PGID_$i"
  if group_alive "${!var}"; then
    die "node ${names[$((i - 1))]} is still running (process group ${!var})"
  fi
  launch_node "$i" "${names[$((i - 1))]}" "${amqp[$((i - 1))]}" "${dist[$((i - 1))]}"
  await_node "$i" "${names[$((i - 1))]}" "${amqp[$((i - 1))]}" "$LAUNCHED"
  log "node ${names[$((i - 1))]} is back"
}

await_node() { # await_node I NODE PORT PGID: booted and accepting AMQP, within 90 s
  local i=$1 node=$2 port=$3 pgid=$4
  local deadline=$((SECONDS + 90))
  while :; do
    if ctl 20 "$node" await_startup --timeout 10 >/dev/null 2>&1 && port_open "$port"; then
      return 0
    fi
    kill -0 "$pgid" 2>/dev/null || fail_with_log "$i" "node $node exited while booting"
    [ "$SECONDS" -lt "$deadline" ] ||
      fail_with_log "$i" "node $node did not finish booting and listen on 127.0.0.1:$port within 90 s"
    sleep 1
  done
}

stop_started() { # after a failed start: stop every node started so far, keep DIR
  [ -f "$DIR/cluster.env" ] || return 0
  (
    load_state
    read -r -a names <<<"$NODES"
    for i in $(seq 1 "${#names[@]}"); do
      var="PGID_$i"
      [ -n "${!var:-}" ] && stop_one "$i" "${names[$((i - 1))]}" "${!var}"
    done
  ) || true
  log "start failed; the nodes are stopped and their logs left in $DIR (\`$0 stop $DIR\` deletes it)"
}

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

stop_one() { # stop_one I NODE PGID: graceful stop (30 s), then SIGKILL of its group
  local i=$1 node=$2 pgid=$3
  if group_alive "$pgid"; then
    ctl 30 "$node" stop >/dev/null 2>&1 || log "rabbitmqctl -n $node stop failed or took over 30 s; killing it"
  fi
  local deadline=$((SECONDS + 15))
  while group_alive "$pgid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  if group_alive "$pgid"; then
    kill -KILL -- "-$pgid" 2>/dev/null || true
    sleep 0.5
  fi
  if group_alive "$pgid"; then
    log "node $node (process group $pgid) is still alive after SIGKILL"
    return 1
  fi
  return 0
}

stop_node() {
  local i=$1
  load_state
  cluster_env
  local names
  read -r -a names <<<"$NODES"
  [ "$i" -ge 1 ] && [ "$i" -le "${#names[@]}" ] || die "node $i: the cluster has nodes 1-${#names[@]}"
  local var="PGID_$i"
  stop_one "$i" "${names[$((i - 1))]}" "${!var}"
  log "node ${names[$((i - 1))]} stopped"
}

kill_node() {
  local i=$1
  load_state
  local names
  read -r -a names <<<"$NODES"
  [ "$i" -ge 1 ] && [ "$i" -le "${#names[@]}" ] || die "node $i: the cluster has nodes 1-${#names[@]}"
  local var="PGID_$i" pgid
  pgid=${!var}
  kill -KILL -- "-$pgid" 2>/dev/null || true
  local deadline=$((SECONDS + 10))
  while group_alive "$pgid"; do
    [ "$SECONDS" -lt "$deadline" ] || die "node ${names[$((i - 1))]} (process group $pgid) outlived SIGKILL by 10 s"
    sleep 0.1
  done
  log "node ${names[$((i - 1))]} killed"
}

stop() {
  [ -d "$DIR" ] || return 0
  DIR=$(cd "$DIR" && pwd)
  local ok=0
  if [ -f "$DIR/cluster.env" ]; then
    load_state
    cluster_env
    local names i var
    read -r -a names <<<"$NODES"
    for i in $(seq 1 "${#names[@]}"); do
      var="PGID_$i"
      [ -n "${!var:-}" ] || continue
      stop_one "$i" "${names[$((i - 1))]}" "${!var}" || ok=1
    done
  fi
  if [ "${EPU_CLUSTER_KEEP:-}" = 1 ]; then
    log "EPU_CLUSTER_KEEP=1: leaving $DIR"
  else
    rm -rf "$DIR"
  fi
  return "$ok"
}

status() {
  load_state
  cluster_env
  local names i
  read -r -a names <<<"$NODES"
  for i in $(seq 1 "${#names[@]}"); do
    ctl 20 "${names[$((i - 1))]}" cluster_status || log "${names[$((i - 1))]} did not answer"
  done
}

logs() {
  load_state
  local names i
  read -r -a names <<<"$NODES"
  for i in $(seq 1 "${#names[@]}"); do node_log "$i"; done
}

[ $# -ge 2 ] || usage
cmd=$1
DIR=$2
shift 2
case "$cmd" in
  start)
    SBIN=$(find_sbin)
    start "$@"
    ;;
  stop-node)
    SBIN=$(find_sbin)
    [ $# -eq 1 ] || usage
    stop_node "$1"
    ;;
  start-node)
    SBIN=$(find_sbin)
    [ $# -eq 1 ] || usage
    start_node "$1"
    ;;
  kill-node)
    [ $# -eq 1 ] || usage
    kill_node "$1"
    ;;
  stop)
    SBIN=$(find_sbin)
    stop
    ;;
  status)
    SBIN=$(find_sbin)
    status
    ;;
  ctl)
    SBIN=$(find_sbin)
    [ $# -ge 2 ] || usage
    i=$1
    shift
    load_state
    cluster_env
    read -r -a names <<<"$NODES"
    [ "$i" -ge 1 ] && [ "$i" -le "${#names[@]}" ] || die "node $i: the cluster has nodes 1-${#names[@]}"
    ctl 30 "${names[$((i - 1))]}" "$@"
    ;;
  logs) logs ;;
  *) usage ;;
esac
