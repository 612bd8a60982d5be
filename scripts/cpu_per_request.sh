#!/bin/bash
# Server CPU per request, a measure that noise on a shared machine disturbs less than throughput:
# starts BINARY on PORT in a temporary directory, adds the SKUs `rb` (plenty) and `so` (sold out),
# runs redis-benchmark with the given arguments, and prints the server's user+system CPU per 1,000
# requests (from /proc/PID/stat) and redis-benchmark's summary line.
#
#   bash scripts/cpu_per_request.sh .build/release/stockade 7431 -P 16 -n 1000000 PING
#   bash scripts/cpu_per_request.sh .build/release/stockade 7432 -P 16 -n 1000000 DEDUCT so 1
set -euo pipefail
BIN=$1; PORT=$2; shift 2
. "$(dirname "$0")/serve_for_count.sh"
ticks() { awk '{print $14+$15}' /proc/$PID/stat; }
before=$(ticks)
out=$(redis-benchmark -p "$PORT" -c 50 -q "$@" | tr '\r' '\n' | grep "requests per" | tail -1)
after=$(ticks)
n=$(echo "$@" | grep -oP '(?<=-n )\d+')
hz=$(getconf CLK_TCK)
echo "$(basename "$BIN") cpu_us_per_request=$(echo "scale=3; ($after-$before)*1000000/$hz/$n" | bc) $out"
