#!/bin/bash
# Which threads of the server sync the log, and how often: starts BINARY on PORT (as
# cpu_per_request.sh does, $SERVE_ARGS added to `serve`), records every fdatasync with `perf record -e
# syscalls:sys_enter_fdatasync` while redis-benchmark runs the given arguments, and prints the
# throughput line, each busy thread's CPU ticks, and the syncs per thread (event loops are
# NIO-ELT-*, the journal's writer thread runs on a Dispatch worker).
#
#   bash scripts/syncs_by_thread.sh .build/release/stockade 7433 -P 16 -n 1500000 -r 100000000 RESERVE user:__rand_int__ rb 1 TTL 600000
set -euo pipefail
BIN=$1; PORT=$2; shift 2
. "$(dirname "$0")/serve_for_count.sh"
DATA="$DIR/syncs.data"
perf record -e syscalls:sys_enter_fdatasync -p "$PID" -o "$DATA" >/dev/null 2>&1 &
RECORDER=$!
sleep 0.3
redis-benchmark -p "$PORT" -c 50 -q "$@" | tr '\r' '\n' | grep "requests per" | tail -1
kill -INT "$RECORDER"; wait "$RECORDER" || true
for task in /proc/"$PID"/task/*; do
    ticks=$(awk '{print $14+$15}' "$task/stat")
    [ "$ticks" -gt 2 ] && echo "cpu_ticks $(cat "$task/comm") $ticks"
done
perf script -i "$DATA" -F comm 2>/dev/null | sort | uniq -c | awk '{c=$1; $1=""; print "syncs" $0, c}'
