#!/bin/bash
# Objects whose reference count both event loops write: starts BINARY on PORT in a temporary
# directory, adds the SKUs `rb` (plenty) and `so` (sold out), records every `swift_retain` in the
# server with the object's address and the call stack (a perf uprobe with an argument, added once)
# while redis-benchmark runs with the given arguments, and prints the objects retained from more than
# one event-loop thread, most retained first, with retains per request and the stacks that retain
# them. Such a retain writes a cache line the other core also writes: the costly kind (see
# BENCHMARKS.md, "the sold-out path's reference counts"). Recording stacks slows the server about
# fiftyfold: use a small -n; perf may lose events, so the rates are lower bounds.
#
#   bash scripts/shared_retains.sh .build/release/stockade 7431 -P 16 -n 20000 DEDUCT so 1
set -euo pipefail
BIN=$1; PORT=$2; shift 2
LIB=$(ldd "$BIN" | awk '/libswiftCore.so/ {print $3}')
perf probe -l 2>/dev/null | grep -q 'probe_libswiftCore:swift_retain_obj' || perf probe -q -x "$LIB" --add 'swift_retain_obj=swift_retain obj=%di:u64'
. "$(dirname "$0")/serve_for_count.sh"
perf record -q -e probe_libswiftCore:swift_retain_obj --call-graph dwarf,4096 -m 512 -o "$DIR/perf.data" -p $PID 2>/dev/null &
REC=$!
sleep 0.5
redis-benchmark -p "$PORT" -c 50 -q "$@" >/dev/null 2>&1
kill -INT $REC; wait $REC 2>/dev/null || true
n=$(echo "$@" | grep -oP '(?<=-n )\d+')
perf script -i "$DIR/perf.data" -F comm,tid,trace,ip,sym,srcline 2>/dev/null | python3 -c '
import collections, re, sys
requests = int(sys.argv[1])
threads = collections.defaultdict(collections.Counter)
stacks = collections.defaultdict(collections.Counter)
for sample in sys.stdin.read().split("\n\n"):
    lines = [l.strip() for l in sample.strip().splitlines() if l.strip()]
    m = re.search(r"^(\S+)\s+\d+\s.*obj=(\d+)", lines[0]) if lines else None
    if not m: continue
    obj = int(m.group(2))
    threads[obj][m.group(1)] += 1
    stacks[obj][" <- ".join(l.split(" ", 1)[-1][:90] for l in lines[3:9])] += 1
# Null and tagged values are not objects: the runtime returns at once for them.
shared = sorted(((sum(c.values()), o, c) for o, c in threads.items()
                 if 0x10000 < o < 0x7fffffffffff and sum(1 for t in c if t.startswith("NIO-ELT")) >= 2), reverse=True)
print("retains of objects retained from both event loops: %.2f per request" % (sum(s for s, _, _ in shared) / requests))
for total, obj, by in shared[:8]:
    print("%.3f per request  object %x  %s" % (total / requests, obj, dict(by)))
    for stack, count in stacks[obj].most_common(2): print("    %d  %s" % (count, stack))
' "$n"
