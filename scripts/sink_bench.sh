#!/usr/bin/env bash
# The sink under load, for BENCHMARKS.md: a release `stockade serve` (fsync always), a release
# `stockade-sink` and a PostgreSQL 15 cluster of its own with default settings (fsync on,
# synchronous_commit on), all on 127.0.0.1 in a temporary directory; then `stockade bench sustained`
# with the arguments given, and the time the sink needs to apply everything the server logged.
#
#   scripts/sink_bench.sh -c 50 -P 16 --duration 10            # closed loop: as fast as the server goes
#   scripts/sink_bench.sh --rate 5000 -c 50 --duration 10      # open loop at an offered rate
#
# Run as root (PostgreSQL runs as the postgres user); build first:
#   swift build -c release --product stockade && swift build -c release --product stockade-sink
set -euo pipefail
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/.build/release}
PGBIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort | tail -1)")
ROOT=$(mktemp -d /tmp/stockade-sink-bench-XXXX); chmod 777 "$ROOT"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PGPORT=$(free_port)
runuser -u postgres -- "$PGBIN/initdb" -D "$ROOT/pg" -A trust -U postgres >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$ROOT/pg" -l "$ROOT/pg.log" -w -o "-p $PGPORT -k $ROOT -c listen_addresses=127.0.0.1" start >/dev/null
"$BIN/stockade" serve --port 0 --data-dir "$ROOT/data" >"$ROOT/server.out" 2>"$ROOT/server.log" &
SERVER=$!
cleanup() {
  kill -TERM "${SINK:-}" "$SERVER" 2>/dev/null || true; wait 2>/dev/null || true
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$ROOT/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$ROOT"
}
trap cleanup EXIT
for _ in $(seq 100); do grep -q "listening on" "$ROOT/server.out" "$ROOT/server.log" 2>/dev/null && break; sleep 0.1; done
PORT=$(grep -ho "listening on [^ ]*" "$ROOT/server.out" "$ROOT/server.log" | head -1 | sed 's/.*://')
"$BIN/stockade-sink" --from "redis://127.0.0.1:$PORT" --to "postgres://postgres@127.0.0.1:$PGPORT/postgres" --progress-seconds 1 2>"$ROOT/sink.log" &
SINK=$!
sleep 1
START=$(date +%s.%N)
"$BIN/stockade" bench sustained --target "stockade://127.0.0.1:$PORT" --quiet --json "$@" >"$ROOT/bench.json" 2>/dev/null
END=$(date +%s.%N)
LAST=$(redis-cli -p "$PORT" INFO persistence | tr -d '\r' | grep log_position_durable | cut -d: -f2)
until [ "$(psql -h 127.0.0.1 -p "$PGPORT" -U postgres -At -c "SELECT position FROM stockade_sink_position")" -ge "$LAST" ]; do sleep 0.2; done
CAUGHT=$(date +%s.%N)
grep "events/s" "$ROOT/sink.log" >"$ROOT/progress.txt" || true
python3 - "$ROOT/bench.json" "$ROOT/progress.txt" "$LAST" "$START" "$END" "$CAUGHT" <<'PY'
import json, re, statistics, sys
bench = json.load(open(sys.argv[1]))
lines = open(sys.argv[2]).read().splitlines()
last, start, end, caught = int(sys.argv[3]), *map(float, sys.argv[4:7])
lag_events = [int(m.group(1)) for l in lines if (m := re.search(r"lag (\d+) events", l))]
lag_seconds = [float(m.group(1)) for l in lines if (m := re.search(r"events, ([\d.]+) s\)", l))]
rates = [int(m.group(1)) for l in lines if (m := re.search(r"(\d+) events/s", l))]
busy = [r for r in rates if r > 0]
print(f"bench: {bench.get('requests')} RESERVE in {bench.get('seconds', 0):.1f} s = {bench.get('throughput', 0):.0f}/s"
      + (f" (offered {bench['offeredRate']}/s)" if bench.get('offeredRate') else "")
      + f"; with the harness's cleanup (CANCEL of every hold) the server logged {last} events in {end - start:.1f} s")
print(f"sink: applied them all {caught - end:.1f} s after the load ended: {last / (caught - start):.0f} events/s overall, "
      f"median of the busy 1-s samples {statistics.median(busy) if busy else 0:.0f} events/s; "
      f"largest lag {max(lag_events, default=0)} events, {max(lag_seconds, default=0):.1f} s")
PY
