#!/bin/bash
# Server heap allocations per request, a count that noise on a shared machine does not disturb:
# starts BINARY on PORT in a temporary directory, adds the SKUs `rb` (plenty) and `so` (sold out),
# counts calls to jemalloc's malloc in the server (a perf uprobe, added once) while redis-benchmark
# runs with the given arguments, and prints mallocs per request.
#
#   bash scripts/allocs_per_request.sh .build/release/stockade 7431 -P 16 -n 200000 PING
#   bash scripts/allocs_per_request.sh .build/release/stockade 7432 -P 1 -n 50000 -r 100000000 RESERVE user:__rand_int__ rb 1
set -euo pipefail
BIN=$1; PORT=$2; shift 2
LIB=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
perf probe -l 2>/dev/null | grep -q 'probe_libjemalloc:malloc' || perf probe -q -x "$LIB" --add malloc
DIR=$(mktemp -d)
"$BIN" serve --port "$PORT" --data-dir "$DIR/d" --snapshot-every-changes 0 --snapshot-every-seconds 0 >/dev/null 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 50); do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$PORT" SKU.ADD rb 1000000000000 >/dev/null
redis-cli -p "$PORT" SKU.ADD so 0 >/dev/null
perf stat -e probe_libjemalloc:malloc -p $PID -o "$DIR/stat" 2>/dev/null &
STAT=$!
sleep 0.5
redis-benchmark -p "$PORT" -c 50 -q "$@" >/dev/null 2>&1
kill -INT $STAT; wait $STAT 2>/dev/null || true
n=$(echo "$@" | grep -oP '(?<=-n )\d+')
m=$(grep malloc "$DIR/stat" | awk '{gsub(",","",$1); print $1}')
echo "$(basename "$BIN") mallocs_per_request=$(echo "scale=2; $m/$n" | bc) ($*)"
