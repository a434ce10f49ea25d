#!/usr/bin/env bash
# The CLI stress trial's long form: 1,000 epumgmt calls (status, inspect nodes,
# inspect domains, events) against an AMQP sleeper run scaling between 1 and 6,
# each under an outside deadline; prints how many hung or failed and the latency
# figures. CI runs the short form (200 calls) as part of the suite.
# Usage: scripts/stress-cli.sh [CALLS]   (needs RabbitMQ on 127.0.0.1:5672)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --quiet
EPU_STRESS_CALLS="${1:-1000}" cargo test --quiet -p epumgmt --test stress_cli -- --nocapture 2>&1 |
  grep -E '^stress:|panicked|test result' 
