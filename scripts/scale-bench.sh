#!/usr/bin/env bash
# RSS of each service at scale: the provisioner, sensor-aggregator and
# epu-controller binaries as separate processes on the real broker, with the sim
# driver (on the real clock), DOMAINS domains of NODES_PER_DOMAIN nodes each
# (default 1,000 × 100 = 100,000). Once every node is RUNNING it samples each
# process's VmRSS and VmHWM (/proc/<pid>/status) and CPU every second for
# SAMPLE_SECS (default 60) and prints a table. Not a test: it prints numbers.
#
#   cargo build --release -p provisioner -p epu-controller -p sensor-aggregator --bins
#   scripts/scale-bench.sh
#
# Settings (environment): DOMAINS, NODES_PER_DOMAIN, SAMPLE_SECS, SIM_BOOT_SECS
# (default 5), SETTLE_TIMEOUT_SECS (default 900: the deadline for every node to be
# RUNNING), READY_TIMEOUT_SECS (default 120 per service), EPU_AMQP_URL (default
# amqp://guest:guest@127.0.0.1:5672/%2f), BIN_DIR (default target/release),
# RUN (default scale-<time>-<pid>), KEEP=1 keeps the temp dir (configs, logs).
#
# Everything it starts it stops (SIGTERM, SIGKILL after 15 s), on success, error
# or Ctrl-C, and it deletes the run's queues and exchange with rabbitmqctl. Every
# wait has a deadline.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN_DIR:-$ROOT/target/release}
DOMAINS=${DOMAINS:-1000}
PER=${NODES_PER_DOMAIN:-100}
SAMPLE=${SAMPLE_SECS:-60}
BOOT=${SIM_BOOT_SECS:-5}
SETTLE_TIMEOUT=${SETTLE_TIMEOUT_SECS:-900}
READY_TIMEOUT=${READY_TIMEOUT_SECS:-120}
AMQP=${EPU_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
RUN=${RUN:-scale-$(date +%s)-$$}
TOTAL=$((DOMAINS * PER))
SERVICES=(provisioner sensor-aggregator epu-controller)

for b in "${SERVICES[@]}"; do
  [[ -x $BIN/$b ]] || { echo "scale-bench: $BIN/$b not found; build it first (see the header)" >&2; exit 2; }
done
command -v rabbitmqctl >/dev/null || { echo "scale-bench: rabbitmqctl not found (needed to delete the run's queues)" >&2; exit 2; }
command -v curl >/dev/null || { echo "scale-bench: curl not found" >&2; exit 2; }

TMP=$(mktemp -d /tmp/epu-scale.XXXXXX)
mkdir -p "$TMP/policies" "$TMP/config" "$TMP/logs" "$TMP/stores"
declare -A PID=()
declare -A ADDR=()

log() { printf '[scale-bench %s] %s\n' "$(date +%T)" "$*" >&2; }

stop_services() {
  local s p i
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    s=${SERVICES[$i]}
    p=${PID[$s]:-}
    [[ -n $p ]] || continue
    if kill -0 "$p" 2>/dev/null; then
      kill -TERM "$p" 2>/dev/null || true
      for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$p" 2>/dev/null; then
        log "$s ($p) still running 15 s after SIGTERM: SIGKILL"
        kill -KILL "$p" 2>/dev/null || true
      fi
    fi
    wait "$p" 2>/dev/null || true
    unset "PID[$s]"
  done
}

delete_topology() {
  local q
  for q in $(timeout 60 rabbitmqctl -q list_queues name 2>/dev/null | grep -E "^epu\.${RUN}\." || true); do
    timeout 30 rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || log "could not delete queue $q"
  done
  timeout 30 rabbitmqctl -q eval \
    "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"epu.${RUN}\">>), false, <<\"scale-bench\">>)." \
    >/dev/null 2>&1 || log "could not delete exchange epu.${RUN} (delete it by hand if it is left)"
  local left
  left=$(timeout 60 rabbitmqctl -q list_queues name 2>/dev/null | grep -cE "^epu\.${RUN}\." || true)
  [[ ${left:-0} == 0 ]] || log "$left queue(s) of run $RUN are left"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_services
  delete_topology
  if [[ ${KEEP:-0} == 1 ]]; then
    log "kept $TMP"
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

# ---------------------------------------------------------------- configs
log "run $RUN: $DOMAINS domains × $PER sim nodes = $TOTAL, files in $TMP"
SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
policies=""
sensors=""
for ((i = 0; i < DOMAINS; i++)); do
  cat >"$TMP/policies/d$i.toml" <<EOF
name = "d$i"
engine = "npreserving"
[engine_conf]
preserve_n = $PER
[deployable]
driver = "sim"
# Sim nodes never heartbeat: never judge them MISSING.
[health]
boot_timeout_secs = 86400
missing_timeout_secs = 86400
EOF
  policies+="${policies:+,}\"$TMP/policies/d$i.toml\""
  sensors+="${sensors:+,}{\"name\":\"d$i\",\"boot_timeout_secs\":86400,\"missing_timeout_secs\":86400}"
done

common() { # service
  printf '"run":"%s","bus":{"transport":"amqp","amqp_url":"%s","secret":"%s"},"telemetry":{"log_format":"json","log_file":"%s","http_addr":"127.0.0.1:0"},"store":{"path":"%s"}' \
    "$RUN" "$AMQP" "$SECRET" "$TMP/logs/$1.jsonl" "$TMP/stores/$1"
}
printf '{%s,"run_dir":"%s","poll_interval_secs":5,"drivers":{"local":{"enabled":false},"sim":{"enabled":true,"boot_secs":%s,"failure_rate":0}}}\n' \
  "$(common provisioner)" "$TMP" "$BOOT" >"$TMP/config/provisioner.yaml"
printf '{%s,"domains":[%s]}\n' "$(common sensor-aggregator)" "$sensors" >"$TMP/config/sensor-aggregator.yaml"
printf '{%s,"policies":[%s]}\n' "$(common epu-controller)" "$policies" >"$TMP/config/epu-controller.yaml"
chmod 600 "$TMP"/config/*.yaml

# ---------------------------------------------------------------- start
http_addr() { # service: the address it logged as listening on
  grep -h '"http_listening"' "$TMP/logs/$1.jsonl" 2>/dev/null | tail -1 |
    sed -n 's/.*"addr":"\([^"]*\)".*/\1/p' || true
}

start() { # service
  local s=$1 deadline a
  "$BIN/$s" --config "$TMP/config/$s.yaml" >"$TMP/logs/$s.out" 2>&1 </dev/null &
  PID[$s]=$!
  deadline=$((SECONDS + READY_TIMEOUT))
  while :; do
    if ! kill -0 "${PID[$s]}" 2>/dev/null; then
      log "$s exited during start:"; tail -20 "$TMP/logs/$s.out" >&2; return 1
    fi
    a=$(http_addr "$s")
    if [[ -n $a ]] && [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$a/readyz") == 200 ]]; then
      ADDR[$s]=$a
      log "$s ready (pid ${PID[$s]}, http $a) after $((SECONDS - deadline + READY_TIMEOUT)) s"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      log "$s not ready within $READY_TIMEOUT s:"; tail -20 "$TMP/logs/$s.out" >&2; return 1
    fi
    sleep 0.2
  done
}

metric() { # service name-regex: the sum of the matching samples
  curl -s --max-time 5 "http://${ADDR[$1]}/metrics" 2>/dev/null |
    awk -v re="$2" '$1 ~ re { s += $NF } END { printf "%d\n", s }' || true
}

status_kib() { # pid field
  awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0
}

cpu_ticks() { # pid: utime + stime
  awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

T0=$SECONDS
for s in "${SERVICES[@]}"; do start "$s"; done

# ---------------------------------------------------------------- settle
declare -A LAUNCH_HWM=()
deadline=$((SECONDS + SETTLE_TIMEOUT))
next_note=0
while :; do
  for s in "${SERVICES[@]}"; do
    kill -0 "${PID[$s]}" 2>/dev/null || { log "$s died; see $TMP/logs/$s.out"; tail -20 "$TMP/logs/$s.out" >&2; exit 1; }
  done
  running=$(metric provisioner '^epu_provisioner_nodes[{].*state="RUNNING"')
  if ((running >= TOTAL)); then break; fi
  if ((SECONDS >= next_note)); then
    log "RUNNING $running of $TOTAL; aggregator tracks $(metric sensor-aggregator '^epu_sensor_tracked_nodes'); RSS MiB: $(for s in "${SERVICES[@]}"; do printf '%s %d  ' "$s" $(($(status_kib "${PID[$s]}" VmRSS) / 1024)); done)"
    next_note=$((SECONDS + 10))
  fi
  if ((SECONDS >= deadline)); then
    log "not every node RUNNING within $SETTLE_TIMEOUT s ($running of $TOTAL)"; exit 1
  fi
  sleep 1
done
T_RUNNING=$((SECONDS - T0))
log "all $TOTAL RUNNING after $T_RUNNING s; letting the feed and the first decisions settle (15 s)"
sleep 15
for s in "${SERVICES[@]}"; do LAUNCH_HWM[$s]=$(status_kib "${PID[$s]}" VmHWM); done

# ---------------------------------------------------------------- sample
HZ=$(getconf CLK_TCK)
SAMPLES=$TMP/samples.tsv
: >"$SAMPLES"
declare -A TICKS0=()
for s in "${SERVICES[@]}"; do TICKS0[$s]=$(cpu_ticks "${PID[$s]}"); done
S0=$SECONDS
log "sampling VmRSS/VmHWM every second for $SAMPLE s"
for ((k = 0; k < SAMPLE; k++)); do
  for s in "${SERVICES[@]}"; do
    p=${PID[$s]}
    kill -0 "$p" 2>/dev/null || { log "$s died while sampling"; exit 1; }
    printf '%s\t%d\t%s\t%s\n' "$s" "$k" "$(status_kib "$p" VmRSS)" "$(status_kib "$p" VmHWM)" >>"$SAMPLES"
  done
  sleep 1
done
ELAPSED=$((SECONDS - S0))
tracked=$(metric sensor-aggregator '^epu_sensor_tracked_nodes')
running=$(metric provisioner '^epu_provisioner_nodes[{].*state="RUNNING"')
ctl_running=$(metric epu-controller '^epu_domain_running_size')

echo
echo "scale-bench: run $RUN, $DOMAINS domains × $PER sim nodes = $TOTAL, RabbitMQ $(timeout 20 rabbitmqctl -q version 2>/dev/null || echo '?'), $(nproc) cores"
echo "  every node RUNNING after $T_RUNNING s; at the end: provisioner RUNNING $running, aggregator tracks $tracked, controller counts $ctl_running running"
echo "  steady state, sampled every 1 s for $SAMPLE samples ($ELAPSED s):"
printf '  %-18s %8s %10s %10s %10s %12s %14s %12s %8s\n' service pid "RSS min" "RSS avg" "RSS max" "max-min" "HWM at start" "HWM at end" "CPU %"
for s in "${SERVICES[@]}"; do
  p=${PID[$s]}
  t0=${TICKS0[$s]}
  cpu=$(( ($(cpu_ticks "$p") - t0) * 100 / HZ / (ELAPSED > 0 ? ELAPSED : 1) ))
  awk -F'\t' -v s="$s" -v p="$p" -v h0="${LAUNCH_HWM[$s]}" -v cpu="$cpu" '
    $1 == s { n++; sum += $3; if (min == "" || $3 < min) min = $3; if ($3 > max) max = $3; hwm = $4 }
    END { printf "  %-18s %8d %7.1f MiB %6.1f MiB %6.1f MiB %8.1f MiB %10.1f MiB %8.1f MiB %7d%%\n",
                 s, p, min/1024, sum/n/1024, max/1024, (max-min)/1024, h0/1024, hwm/1024, cpu }' "$SAMPLES"
done
agg_max=$(awk -F'\t' '$1 == "sensor-aggregator" && $3 > m { m = $3 } END { print int(m / 1024) }' "$SAMPLES")
echo "  target: aggregator RSS at $TOTAL nodes under 150 MB with no poll spike: max ${agg_max} MiB — $( ((agg_max * 1048576 < 150000000)) && echo met || echo 'NOT met'); its spike is the max-min column"
echo "  (HWM at start: the peak since the process started, launch included, taken when sampling began)"
