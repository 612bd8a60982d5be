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
DIR=$(mktemp -d)
"$BIN" serve --port "$PORT" --data-dir "$DIR" --snapshot-every-changes 0 --snapshot-every-seconds 0 >/dev/null 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 50); do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$PORT" SKU.ADD rb 1000000000000 >/dev/null
redis-cli -p "$PORT" SKU.ADD so 0 >/dev/null
ticks() { awk '{print $14+$15}' /proc/$PID/stat; }
before=$(ticks)
out=$(redis-benchmark -p "$PORT" -c 50 -q "$@" | tr '\r' '\n' | grep "requests per" | tail -1)
after=$(ticks)
n=$(echo "$@" | grep -oP '(?<=-n )\d+')
hz=$(getconf CLK_TCK)
echo "$(basename "$BIN") cpu_us_per_request=$(echo "scale=3; ($after-$before)*1000000/$hz/$n" | bc) $out"
