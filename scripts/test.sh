#!/usr/bin/env bash
# Runs the whole test suite. Brings up what the tests need when it is not there:
# RabbitMQ on 127.0.0.1:5672 (installed from Debian's packages if missing) and
# moto's EC2 server (in a virtualenv) on a free port, and Celery in a virtualenv of
# its own (scripts/celery-venv.sh; exported as CELERY_VENV). Extra arguments go to
# `cargo test --workspace --no-fail-fast` (for example: scripts/test.sh -- --nocapture).
# Every test binary runs even when one fails; the summary at the end counts them all
# (scripts/test-summary.awk) and the exit status is non-zero if anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '== %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

ensure_rabbitmq() {
  if port_open 127.0.0.1 5672 && rabbitmqctl -q await_startup >/dev/null 2>&1; then
    log "RabbitMQ is running"
    return
  fi
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing rabbitmq-server"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  if ! port_open 127.0.0.1 5672; then
    log "starting RabbitMQ"
    as_root rabbitmq-server -detached || true
  fi
  # Right after -detached, await_startup fails at once until the node has registered.
  for _ in $(seq 1 60); do
    if as_root rabbitmqctl -q await_startup >/dev/null 2>&1; then
      log "RabbitMQ is up"
      return
    fi
    sleep 1
  done
  log "RabbitMQ did not start within a minute; see /var/log/rabbitmq/"
  exit 1
}

MOTO_PID=""
ensure_moto() {
  local bin
  bin=$(command -v moto_server || true)
  # The tests also ask the IaaS directly with boto3 (which moto brings).
  export EPU_MOTO_PYTHON=python3
  if [ -n "$bin" ] && ! python3 -c 'import boto3' 2>/dev/null; then
    bin=""
  fi
  if [ -z "$bin" ]; then
    local venv="${EPU_MOTO_VENV:-$HOME/.cache/epu/moto-venv}"
    if [ ! -x "$venv/bin/moto_server" ]; then
      log "installing moto[server] into $venv"
      if ! python3 -m venv "$venv" 2>/dev/null; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$venv"
      fi
      "$venv/bin/pip" install -q 'moto[server]'
    fi
    bin="$venv/bin/moto_server"
    export EPU_MOTO_PYTHON="$venv/bin/python"
  fi
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$bin" -H 127.0.0.1 -p "$port" >"${TMPDIR:-/tmp}/epu-moto-$port.log" 2>&1 &
  MOTO_PID=$!
  for _ in $(seq 1 100); do
    if port_open 127.0.0.1 "$port"; then
      export EPU_MOTO_URL="http://127.0.0.1:$port"
      log "moto's EC2 server at $EPU_MOTO_URL"
      return
    fi
    sleep 0.2
  done
  log "moto_server did not start; see ${TMPDIR:-/tmp}/epu-moto-$port.log"
  exit 1
}

cleanup() { [ -n "$MOTO_PID" ] && kill "$MOTO_PID" 2>/dev/null || true; }
trap cleanup EXIT

ensure_rabbitmq
ensure_moto
export AWS_EC2_METADATA_DISABLED=true
# Celery, for the Celery example's test, in a virtualenv of its own.
CELERY_VENV=$(bash scripts/celery-venv.sh) || { log "cannot set up Celery's virtualenv"; exit 1; }
export CELERY_VENV

# --no-fail-fast: one failing test binary does not hide the others. The log is
# kept (and named) when anything failed.
out="${TMPDIR:-/tmp}/epu-test-$$.log"
set +e
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
# The chaos suite's long form is `#[ignore]`d (scripts/chaos.sh runs it with 20
# trials per fault); CI runs it too, with one trial per fault (about a minute).
if [ "$#" -eq 0 ]; then
  # --workspace (the only `chaos` test is epumgmt's): `-p epumgmt` alone resolves
  # features differently and rebuilt half the workspace (7.5 min in CI).
  EPU_CHAOS_TRIALS=1 cargo test --workspace --test chaos chaos_long -- --ignored --exact 2>&1 | tee -a "$out"
  long=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] && status=$long
fi
# One summary over every test binary, after cargo's own per-binary lines.
awk -f scripts/test-summary.awk "$out"
summary=$?
set -e

if [ "$status" -ne 0 ] || [ "$summary" -ne 0 ]; then
  echo "the whole log: $out"
  [ "$status" -ne 0 ] && exit "$status"
  exit 1
fi
rm -f "$out"
