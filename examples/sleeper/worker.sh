#!/bin/sh
# The sleeper example's worker: does nothing but sleep, and is seen doing it.
#
# Launch it as a local deployable (`command = "examples/sleeper/worker.sh"`): when it
# is not running under the heartbeat agent yet (no EPU_JOBS_FILE), it starts itself
# again under `epu-agent`, which heartbeats OK for it every EPU_HEARTBEAT_INTERVAL
# seconds (default 1). The agent is found as $EPU_AGENT, next to this script's
# workspace build (target/debug or target/release), or on PATH.
#
# Every SLEEPER_BUSY_EVERY-th nap (default 0: never) it reports one job held, to
# show the jobs-file protocol: `echo 1 > "$EPU_JOBS_FILE"` ... `echo 0 > ...`.
# SLEEPER_FAIL_AFTER=N makes it fail with exit code 3 after N naps (to watch a
# PROCESS_ERROR reading and the engine replace it).
set -eu

if [ -z "${EPU_JOBS_FILE:-}" ]; then
  here=$(cd "$(dirname "$0")" && pwd)
  agent=${EPU_AGENT:-}
  if [ -z "$agent" ]; then
    for candidate in "$here/../../target/release/epu-agent" "$here/../../target/debug/epu-agent"; do
      if [ -x "$candidate" ]; then agent=$candidate; break; fi
    done
  fi
  exec "${agent:-epu-agent}" -- "$here/worker.sh" "$@"
fi

nap_pid=""
stop() {
  echo "sleeper ${EPU_NODE_ID:-?}: stopping" >&2
  [ -n "$nap_pid" ] && kill "$nap_pid" 2>/dev/null
  exit 0
}
trap stop TERM INT HUP

nap=${SLEEPER_NAP_SECS:-1}
busy_every=${SLEEPER_BUSY_EVERY:-0}
fail_after=${SLEEPER_FAIL_AFTER:-0}
echo "sleeper ${EPU_NODE_ID:-?}: sleeping in ${nap}s naps" >&2
n=0
while :; do
  n=$((n + 1))
  if [ "$busy_every" -gt 0 ] && [ $((n % busy_every)) -eq 0 ]; then
    echo 1 > "$EPU_JOBS_FILE"
  else
    echo 0 > "$EPU_JOBS_FILE"
  fi
  # Sleep in the background and wait, so a TERM is handled at once.
  sleep "$nap" &
  nap_pid=$!
  wait "$nap_pid" || true
  nap_pid=""
  if [ "$fail_after" -gt 0 ] && [ "$n" -ge "$fail_after" ]; then
    echo "sleeper ${EPU_NODE_ID:-?}: failing on purpose after $n naps" >&2
    exit 3
  fi
done
