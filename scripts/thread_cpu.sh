#!/bin/bash
# How busy each server thread is while redis-benchmark runs: starts BINARY on PORT in a temporary
# directory (snapshots off; $SERVE_ARGS adds `serve` arguments), adds the SKUs `rb` (plenty) and `so`
# (sold out), runs redis-benchmark with the given arguments, and prints each thread's CPU (user +
# system, /proc/PID/task/*/stat; threads of one name summed) as a share of one core over the run,
# then the load client's own CPU, the whole machine's busy share (/proc/stat: the rest of the cores
# is idle), and the log's sync count and mean from INFO persistence. An event loop below 100% while
# clients wait spends the rest off the CPU: in fdatasync's wait for the disk (a loop writes and syncs
# what its own rounds wait for), or idle. A thread that exits during the run (a kernel worker that
# times out) is missing from the per-thread lines; the machine line counts it.
#
#   SERVE_ARGS="--io-threads 1" bash scripts/thread_cpu.sh .build/release/stockade 7431 \
#       -P 16 -n 2000000 -r 100000000 RESERVE user:__rand_int__ rb 1 TTL 600000
set -euo pipefail
BIN=$1; PORT=$2; shift 2
. "$(dirname "$0")/serve_for_count.sh"
threads() { for t in /proc/$PID/task/*; do echo "$(tr ' ' _ < "$t/comm") $(awk '{print $14+$15}' "$t/stat")"; done; }
# The machine's CPU (all cores, /proc/stat: busy = all but idle and iowait) and the client's own.
machine() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat; }
threads > "$DIR/before"
read -r busy_before idle_before < <(machine)
start=$(date +%s.%N)
TIMEFORMAT='%U %S'
{ time redis-benchmark -p "$PORT" -c 50 -q "$@" > "$DIR/bench" 2>&1 ; } 2> "$DIR/client" \
    || { cat "$DIR/bench" >&2; exit 1; }
end=$(date +%s.%N)
read -r busy_after idle_after < <(machine)
threads > "$DIR/after"
out=$(tr '\r' '\n' < "$DIR/bench" | grep "requests per" | tail -1)
echo "$(basename "$BIN") $out"
python3 - "$DIR/before" "$DIR/after" "$start" "$end" "$(getconf CLK_TCK)" "$(cat "$DIR/client")" \
    "$busy_before $idle_before $busy_after $idle_after" "$(grep -c '^cpu[0-9]' /proc/stat)" <<'PY'
import sys
def load(path):
    ticks = {}
    for line in open(path):
        name, value = line.rsplit(" ", 1)
        ticks[name] = ticks.get(name, 0) + int(value)
    return ticks
before, after = load(sys.argv[1]), load(sys.argv[2])
wall, hz = float(sys.argv[4]) - float(sys.argv[3]), int(sys.argv[5])
for name, ticks in sorted(after.items()):
    used = (ticks - before.get(name, 0)) / hz
    if used > 0:
        print(f"  {name:20s} {used / wall * 100:5.1f}% of a core")
user, system = map(float, sys.argv[6].split())
print(f"  {'client':20s} {(user + system) / wall * 100:5.1f}% of a core (redis-benchmark, user + system)")
b0, i0, b1, i1 = map(int, sys.argv[7].split())
cores = int(sys.argv[8])
print(f"  {'machine':20s} {(b1 - b0) / ((b1 - b0) + (i1 - i0)) * cores * 100:5.1f}% of a core, of {cores} (/proc/stat, every core's busy time)")
PY
redis-cli -p "$PORT" INFO persistence | tr -d '\r' | grep -E "^log_fsyncs|^log_fsync_mean_ms" | tr '\n' ' '
echo
