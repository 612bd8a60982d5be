#!/bin/bash
# Calls of one library function in the server per request, a count that noise on a shared machine
# does not disturb: starts BINARY on PORT in a temporary directory, adds the SKUs `rb` (plenty) and
# `so` (sold out), counts calls to FUNCTION in the server (a perf uprobe, added once) while
# redis-benchmark runs with the given arguments, and prints calls per request. FUNCTION is `malloc`
# (jemalloc's: heap allocations) or `swift_retain` (the Swift runtime's: reference counting, a write
# to the object's header each time; every retain has its release).
#
#   bash scripts/calls_per_request.sh malloc .build/release/stockade 7431 -P 16 -n 200000 PING
#   bash scripts/calls_per_request.sh swift_retain .build/release/stockade 7432 -P 16 -n 200000 DEDUCT so 1
#
# With OWN_CLIENT=1 the load is compare.py's client instead (50 connections, it takes error replies
# as replies, which redis-benchmark does not: a sold-out RESERVE answers -SOLDOUT); `-P` and `-n`
# come first, as above, then the command:
#
#   OWN_CLIENT=1 bash scripts/calls_per_request.sh malloc .build/release/stockade 7433 -P 16 -n 200000 RESERVE user:1 so 1
set -euo pipefail
FUNCTION=$1; BIN=$2; PORT=$3; shift 3
case "$FUNCTION" in
  malloc) LIB=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2; EVENT=probe_libjemalloc:malloc ;;
  swift_retain) LIB=$(ldd "$BIN" | awk '/libswiftCore.so/ {print $3}'); EVENT=probe_libswiftCore:swift_retain ;;
  *) echo "FUNCTION is malloc or swift_retain" >&2; exit 2 ;;
esac
perf probe -l 2>/dev/null | grep -q "$EVENT" || perf probe -q -x "$LIB" --add "$FUNCTION"
. "$(dirname "$0")/serve_for_count.sh"
perf stat -e "$EVENT" -p $PID -o "$DIR/stat" 2>/dev/null &
STAT=$!
sleep 0.5
if [ "${OWN_CLIENT:-0}" = 1 ]; then
  SCRIPTS=$(cd "$(dirname "$0")" && pwd) python3 - "$PORT" "$@" <<'PY'
import os, sys
sys.path.insert(0, os.environ["SCRIPTS"])
import compare
port, args = int(sys.argv[1]), sys.argv[2:]
pipeline, n, command = int(args[1]), int(args[3]), args[4:]
class Server:
    name, port = "stockade", port
    def cpu_seconds(self): return 0.0
compare.pipelined_load(Server(), pipeline, n, command, b"")
PY
else
  redis-benchmark -p "$PORT" -c 50 -q "$@" >/dev/null 2>&1
fi
kill -INT $STAT; wait $STAT 2>/dev/null || true
n=$(echo "$@" | grep -oP '(?<=-n )\d+')
m=$(grep "$FUNCTION" "$DIR/stat" | awk '{gsub(",","",$1); print $1}')
echo "$(basename "$BIN") ${FUNCTION}_per_request=$(echo "scale=2; $m/$n" | bc) ($*)"
