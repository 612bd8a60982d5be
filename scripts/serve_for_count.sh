# Sourced by the per-request measurement scripts: starts "$BIN" on "$PORT" in a temporary directory
# ($DIR, removed on exit with the server, $PID), waits for it, and adds the SKUs `rb` (plenty) and
# `so` (sold out). $SERVE_ARGS, when set, adds arguments to `serve` (e.g. "--io-threads 1").
# A stockade-ceiling binary (its name says so) is started as itself, with $CEILING_ARGS (e.g.
# "--threads 1"): it answers every command, so the same load measures the front's floor.
DIR=$(mktemp -d)
case "$(basename "$BIN")" in
*ceiling*) "$BIN" --port "$PORT" ${CEILING_ARGS:-} >/dev/null 2>&1 & ;;
*) "$BIN" serve --port "$PORT" --data-dir "$DIR/d" --snapshot-every-changes 0 --snapshot-every-seconds 0 ${SERVE_ARGS:-} >/dev/null 2>&1 & ;;
esac
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 50); do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.1; done
case "$(basename "$BIN")" in
*ceiling*) ;;
*)
    redis-cli -p "$PORT" SKU.ADD rb 1000000000000 >/dev/null
    redis-cli -p "$PORT" SKU.ADD so 0 >/dev/null
    ;;
esac
