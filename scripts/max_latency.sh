#!/bin/bash
# The longest a request waits under sustained load, as redis-benchmark's latency summary reports it
# (avg, min, p50, p95, p99, max): a stall of the event loop (a table rehashed or an array copied in one
# step as it grows) shows as the max. Starts BINARY on PORT in a temporary directory (snapshots off;
# $SERVE_ARGS adds `serve` arguments, default one loop), adds the SKUs `rb` (plenty) and `so` (sold
# out), runs $SETUP (one redis-cli command, e.g. a SKU with a limit) if set, then redis-benchmark with
# the given arguments, and prints the summaries and the server's resident memory at the end.
#
#   bash scripts/max_latency.sh .build/release/stockade 7431 -P 16 -n 3000000 -r 100000000 \
#       RESERVE user:__rand_int__ rb 1 REQ r:__rand_int__ TTL 600000
#   SETUP="SKU.ADD lim 1000000000000 LIMIT 1000000" bash scripts/max_latency.sh BIN 7431 -P 16 \
#       -n 3000000 -r 100000000 RESERVE user:__rand_int__ lim 1 TTL 600000
set -euo pipefail
BIN=$1; PORT=$2; shift 2
SERVE_ARGS=${SERVE_ARGS:---io-threads 1}
. "$(dirname "$0")/serve_for_count.sh"
if [ -n "${SETUP:-}" ]; then redis-cli -p "$PORT" $SETUP >/dev/null; fi
redis-benchmark -p "$PORT" -c 50 "$@" 2>&1 | tr '\r' '\n' | grep -A2 -E "latency summary|throughput summary" | grep -v '^--'
echo "server resident memory: $(awk '/VmRSS/ {print $2, $3}' "/proc/$PID/status")"
