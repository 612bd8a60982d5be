#!/bin/bash
# The longest a request waits under sustained load, as redis-benchmark's latency summary reports it
# (avg, min, p50, p95, p99, max): a stall of the event loop (a table rehashed or an array copied in one
# step as it grows) shows as the max. Starts BINARY on PORT in a temporary directory (snapshots off;
# $SERVE_ARGS adds `serve` arguments, default one loop), adds the SKUs `rb` (plenty) and `so` (sold
# out), runs $SETUP (one redis-cli command, e.g. a SKU with a limit) if set, then redis-benchmark with
# the given arguments, and prints the summaries and the server's resident memory at the end. Then, from
# the server's own histograms (its metrics listener on PORT+1), how many reads waited longer than 5, 10
# and 50 ms for their replies and how many fdatasyncs took that long: a max that the server's reads do
# not reach is the load client's own wait (it shares the cores), and reads over 10 ms beside syncs over
# 10 ms are the disk's slow flushes.
#
#   bash scripts/max_latency.sh .build/release/stockade 7431 -P 16 -n 3000000 -r 100000000 \
#       RESERVE user:__rand_int__ rb 1 REQ r:__rand_int__ TTL 600000
#   SETUP="SKU.ADD lim 1000000000000 LIMIT 1000000" bash scripts/max_latency.sh BIN 7431 -P 16 \
#       -n 3000000 -r 100000000 RESERVE user:__rand_int__ lim 1 TTL 600000
set -euo pipefail
BIN=$1; PORT=$2; shift 2
SERVE_ARGS="${SERVE_ARGS:---io-threads 1} --metrics-port $((PORT + 1))"
. "$(dirname "$0")/serve_for_count.sh"
if [ -n "${SETUP:-}" ]; then redis-cli -p "$PORT" $SETUP >/dev/null; fi
redis-benchmark -p "$PORT" -c 50 "$@" 2>&1 | tr '\r' '\n' | grep -A2 -E "latency summary|throughput summary" | grep -v '^--'
echo "server resident memory: $(awk '/VmRSS/ {print $2, $3}' "/proc/$PID/status")"
# Cumulative buckets: count above a bound = the +Inf bucket's count less that bound's.
curl -s "http://127.0.0.1:$((PORT + 1))/metrics" | awk '
  /^stockade_(read_duration|fsync)_seconds_bucket/ {
    split($1, a, /[{}"]/); name = (a[1] ~ /fsync/) ? "fdatasyncs" : "reads"; bucket[name, a[3]] = $2 }
  END {
    for (i = 1; i <= 2; i++) {
      name = (i == 1) ? "reads" : "fdatasyncs"; total = bucket[name, "+Inf"] + 0
      printf "server: %s over 5 ms: %d, over 10 ms: %d, over 50 ms: %d (of %d)\n", name,
        total - bucket[name, "0.005"], total - bucket[name, "0.01"], total - bucket[name, "0.05"], total } }'
