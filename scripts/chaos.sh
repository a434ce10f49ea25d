#!/usr/bin/env bash
# The chaos suite's long form: faults injected into sleeper runs over RabbitMQ
# (SIGKILL of each service, the one-shot failpoints, worker deaths, a broker outage
# through a proxy, a refused provision), each checked for convergence, duplicates,
# leaks and a clean killrun. Prints the table at the end; exits non-zero if any
# trial failed (their logs are kept in target/tmp/chaos/<run>/).
#
#   scripts/chaos.sh [TRIALS_PER_FAULT]        # default 20 (EPU_CHAOS_TRIALS)
#
# Also: EPU_CHAOS_PARALLEL (runs at a time, default 3), EPU_CHAOS_SEED (replay the
# random choices), EPU_CHAOS_KINDS (e.g. kprov,fpiaas,outage), EPU_CHAOS_VERBOSE=1,
# EPU_CHAOS_KEEP_LOGS=1. Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and
# rabbitmqctl (bash scripts/test.sh installs and starts both).
set -euo pipefail
cd "$(dirname "$0")/.."

trials=${1:-${EPU_CHAOS_TRIALS:-20}}
if ! [[ $trials =~ ^[0-9]+$ ]] || [ "$trials" -lt 1 ]; then
  echo "usage: $0 [TRIALS_PER_FAULT]   (a positive number; got '$trials')" >&2
  exit 2
fi
if ! timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' 2>/dev/null; then
  echo "chaos: nothing listens on 127.0.0.1:5672; start RabbitMQ (sudo service rabbitmq-server start," >&2
  echo "       or bash scripts/test.sh, which installs it)" >&2
  exit 1
fi

cargo build --workspace
log=$(mktemp -t epu-chaos.XXXXXX)
echo "chaos: $trials trials per fault; full output in $log" >&2
set +e
EPU_CHAOS_TRIALS=$trials cargo test -p epumgmt --test chaos chaos_long -- --ignored --nocapture --exact 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The table again, last, so it is what the terminal shows.
awk '/^=== chaos long/ {p=1} p && /^$/ {exit} p' "$log"
exit "$status"
