"""`stockade sink` (#10) against a real PostgreSQL 15 started here in a temporary cluster, the real
`stockade` server and the real `stockade-sink` process: SQL equals STOCK and ORDER after a flash
sale, kill -9 of the sink and a PostgreSQL restart change nothing, a trimmed log stops it."""
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest
import redis

from conftest import BINARY, Server

SINK = os.environ.get("STOCKADE_SINK_BIN", os.path.join(os.path.dirname(BINARY), "stockade-sink"))


def pg_bindir():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A throwaway PostgreSQL cluster on a free loopback port, run as the `postgres` user
    (initdb refuses root), trusting local connections; stopped with `-m immediate`."""

    def __init__(self):
        self.bindir = pg_bindir()
        self.root = tempfile.mkdtemp(prefix="stockade-pg-")
        os.chmod(self.root, 0o777)
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "pg.log")
        self.port = free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")

    def run(self, *args):
        out = subprocess.run([*self.as_postgres, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def start(self):
        self.run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", self.log, "-w", "-t", "30", "-o",
                 f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        return self

    def stop(self):
        subprocess.run([*self.as_postgres, os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)

    def url(self, database="postgres"):
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, query):
        """Runs a query with psql; returns rows as lists of strings."""
        out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                              "-X", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1", "-c", query],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return [line.split("|") for line in out.stdout.splitlines() if line]

    def destroy(self):
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class SinkProcess:
    """A stockade-sink process with its stderr in a file."""

    def __init__(self, server, postgres, *args):
        self.log_path = os.path.join(postgres.root, f"sink-{time.time_ns()}.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [SINK, "--from", f"redis://127.0.0.1:{server.port}", "--to", postgres.url(), "--progress-seconds", "1",
             "--retry-max-ms", "500", *args],
            stdout=subprocess.DEVNULL, stderr=self.log)

    def logs(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_for(self, pattern, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.logs())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"sink never logged {pattern!r}:\n{self.logs()}")

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def postgres():
    # Not a skip: `make test` installs PostgreSQL and builds the sink, and a skipped test proves nothing.
    assert pg_bindir(), "PostgreSQL is not installed: `make deps` installs it (Debian package postgresql)"
    assert os.path.exists(SINK), f"{SINK} is missing: build it with `swift build --product stockade-sink`"
    pg = Postgres().start()
    yield pg
    pg.destroy()


def wait_applied(pg, position, timeout=30, sink=None):
    """Waits until the sink has committed up to `position`."""
    deadline = time.time() + timeout
    stored = None
    while time.time() < deadline:
        rows = pg.sql("SELECT position FROM stockade_sink_position") if has_tables(pg) else []
        stored = int(rows[0][0]) if rows else None
        if stored is not None and stored >= position:
            return stored
        time.sleep(0.05)
    raise AssertionError(f"sink stopped at {stored}, expected {position}" + (f":\n{sink.logs()}" if sink else ""))


def has_tables(pg):
    return pg.sql("SELECT count(*) FROM pg_tables WHERE tablename = 'stockade_sink_position'") == [["1"]]


def durable_position(r):
    return int(r.info("persistence")["log_position_durable"])


def flash_sale(r, skus=("phone", "case", "caf\u00e9"), users=60, seed=7):
    """A sale: holds (single and baskets), some paid, some cancelled, some left to expire, restock,
    pause/resume and DEDUCT. Returns the order ids."""
    import random
    rng = random.Random(seed)
    for i, sku in enumerate(skus):
        r.execute_command("SKU.ADD", sku, 40 + 10 * i, "LIMIT", 5)
    orders = []
    for u in range(users):
        user = f"user-{u}"
        try:
            if u % 7 == 0:
                orders.append(r.execute_command("BUY", user, skus[0], 1, skus[1], 2, "TTL", 600_000))
            else:
                sku = skus[u % len(skus)]
                ttl = 300 if u % 5 == 0 else 600_000   # these expire during the test
                orders.append(r.execute_command("RESERVE", user, sku, rng.randint(1, 3), "TTL", ttl))
        except Exception as e:  # sold out / limit: part of a sale
            assert str(e).split()[0] in ("SOLDOUT", "INSUFFICIENT", "LIMIT"), e
    for i, order in enumerate(orders):
        # A short hold may expire before it is paid or cancelled on a slow machine: also a sale.
        try:
            if i % 3 == 0:
                r.execute_command("CONFIRM", order)
            elif i % 3 == 1 and i % 5 != 0:
                r.execute_command("CANCEL", order)
        except Exception as e:
            assert str(e).split()[0] == "EXPIRED", e
    r.execute_command("SKU.RESTOCK", skus[1], 7)
    r.execute_command("SKU.PAUSE", skus[2])
    r.execute_command("SKU.RESUME", skus[2])
    r.execute_command("SKU.PAUSE", skus[0])
    r.execute_command("DEDUCT", skus[1], 2)
    return orders


def wait_expired(r, orders, timeout=10):
    """Waits until every short hold (deadline within a minute) is no longer PENDING: the server
    logged its expiry."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        infos = [dict(zip(o[0::2], o[1::2])) for o in (r.execute_command("ORDER", order) for order in orders)]
        if not any(i["state"] == "PENDING" and i["deadline"] < time.time() * 1000 + 60_000 for i in infos):
            return
        time.sleep(0.1)
    raise AssertionError("holds did not expire")


def settle(r, pg, sink=None):
    """Waits until the sink has applied everything the server logged, and the server logged
    nothing more meanwhile; returns that position."""
    while True:
        last = durable_position(r)
        wait_applied(pg, last, sink=sink)
        if durable_position(r) == last:
            return last


def assert_matches_server(pg, r, orders):
    """Every SKU's row equals STOCK; every order's row equals ORDER; items add up; no gaps."""
    rows = pg.sql("SELECT sku, total, available, reserved, sold, per_user_limit, paused::int FROM skus WHERE sku IS NOT NULL ORDER BY sku")
    skus = {row[0]: row[1:] for row in rows}
    for sku in skus:
        stock = r.execute_command("STOCK", sku)
        s = dict(zip(stock[0::2], stock[1::2]))
        assert skus[sku] == [str(s[k]) for k in ("total", "available", "reserved", "sold", "limit", "paused")], sku
    # SQL aggregates of the orders equal the stock counters: reserved = PENDING items, sold = PAID
    # items + DEDUCT (which makes no order).
    agg = pg.sql("""
        SELECT i.sku, coalesce(sum(i.quantity) FILTER (WHERE o.state = 'PENDING'), 0),
               coalesce(sum(i.quantity) FILTER (WHERE o.state = 'PAID'), 0)
        FROM order_items i JOIN orders o ON o.id = i.order_id WHERE i.sku IS NOT NULL GROUP BY i.sku ORDER BY i.sku""")
    for sku, reserved, paid in agg:
        assert reserved == skus[sku][2], sku
        assert int(paid) <= int(skus[sku][3]), sku
    by_id = {row[0]: row[1:] for row in pg.sql(
        "SELECT id, user_id, state, deadline_ms FROM orders WHERE user_id IS NOT NULL ORDER BY id")}
    assert sorted(by_id) == sorted(orders)
    items = {}
    for order, sku, quantity in pg.sql("SELECT order_id, sku, quantity FROM order_items"):
        items.setdefault(order, []).append([sku, quantity])
    pipe = r.pipeline(transaction=False)
    for order in orders:
        pipe.execute_command("ORDER", order)
    for order, o in zip(orders, pipe.execute()):
        fields = dict(zip(o[0::2], o[1::2]))
        assert by_id[order] == [fields["user"], fields["state"], str(fields["deadline"])], order
        assert sorted(items[order]) == sorted([fields["items"][i], str(fields["items"][i + 1])]
                                              for i in range(0, len(fields["items"]), 2)), order


def test_flash_sale_lands_in_postgres_exactly(data_dir, postgres):
    """A sale with confirms, cancels, expiry, restock, pause and DEDUCT, followed live by the sink
    (through `stockade sink`, the main binary's subcommand): the tables equal STOCK and ORDER; the
    events table (--keep-events) holds every position once; ids that are not ASCII come out exact."""
    server = Server(data_dir, "--shards", "2").start()
    sink = None
    try:
        r = server.client()
        sink_args = ["--keep-events", "--metrics-port", "0", "--batch-events", "50"]
        sink = SinkProcess(server, postgres, *sink_args)
        sink.proc.kill()
        sink.proc.wait()
        # The same process through the main binary, git style.
        sink.proc = subprocess.Popen(
            [BINARY, "sink", "--from", f"redis://127.0.0.1:{server.port}", "--to", postgres.url(),
             "--progress-seconds", "1", *sink_args], stdout=subprocess.DEVNULL, stderr=sink.log)
        metrics_port = int(sink.wait_for(r"metrics on http://[^:]+:(\d+)/metrics").group(1))
        orders = flash_sale(r)
        # Ids that are no text: not UTF-8, with a NUL byte.
        rb = redis.Redis(host="127.0.0.1", port=server.port, protocol=2)
        rb.execute_command("SKU.ADD", b"\xff\x00bin", 10)
        binary_order = rb.execute_command("RESERVE", b"u\x00\xfe", b"\xff\x00bin", 2).decode()
        wait_expired(r, orders)
        last = settle(r, postgres, sink)
        assert postgres.sql("SELECT encode(sku_bytes, 'hex'), sku IS NULL, reserved FROM skus WHERE sku IS NULL") == \
            [["ff0062696e", "t", "2"]]
        assert postgres.sql("SELECT id, encode(user_bytes, 'hex'), user_id IS NULL FROM orders WHERE user_id IS NULL") == \
            [[binary_order, "7500fe", "t"]]
        assert_matches_server(postgres, r, orders)
        events = postgres.sql("SELECT count(*), min(position), max(position) FROM events")
        assert events == [[str(last), "1", str(last)]]
        assert postgres.sql("SELECT count(*) FROM orders WHERE state = 'EXPIRED'")[0][0] != "0"
        assert postgres.sql("SELECT sku_bytes FROM skus WHERE sku = 'caf\u00e9'") == [["\\x636166c3a9"]]
        assert postgres.sql("SELECT max(version) FROM stockade_schema_version") == [["1"]]
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert f"stockade_sink_position {last}" in text
        assert re.search(r"stockade_sink_events_total %d\b" % last, text)
        sink.wait_for(r"position %d .*events/s" % last)
        # SIGTERM: exits 0 and says where it stopped.
        assert sink.stop() == 0
        assert f"stopped at position {last}" in sink.logs()
    finally:
        if sink:
            sink.stop()
        server.stop()


def test_kill9_of_the_sink_mid_stream_then_restart_changes_nothing(data_dir, postgres):
    """The sink is killed with SIGKILL several times while a sale streams in (small batches, so
    many transactions); each restart resumes from the stored position: no duplicate, no gap."""
    server = Server(data_dir, "--shards", "2").start()
    sink = None
    try:
        r = server.client()
        r.execute_command("SKU.ADD", "tv", 100_000)
        orders = []
        sink = SinkProcess(server, postgres, "--batch-events", "7", "--keep-events")
        killed_behind = 0
        for round_ in range(4):
            round_start = durable_position(r)
            for u in range(150):
                order = r.execute_command("RESERVE", f"u{round_}-{u}", "tv", 1 + u % 3)
                orders.append(order)
                if u % 4 == 0:
                    r.execute_command("CONFIRM", order)
                elif u % 4 == 1:
                    r.execute_command("CANCEL", order)
            # Kill it once it has applied part of this round, while it is still behind.
            wait_applied(postgres, round_start + 1, sink=sink)
            sink.kill9()
            stored = int(postgres.sql("SELECT position FROM stockade_sink_position")[0][0])
            killed_behind += stored < durable_position(r)
            sink = SinkProcess(server, postgres, "--batch-events", "7", "--keep-events")
        # SIGTERM while it is (most likely) catching up: it commits the batch it is on, says where
        # it stopped, exits 0.
        before = durable_position(r)
        for u in range(100):
            orders.append(r.execute_command("RESERVE", f"late-{u}", "tv", 1))
        wait_applied(postgres, before + 1, sink=sink)
        assert sink.stop() == 0
        stopped = int(re.search(r"stopped at position (\d+)", sink.logs()).group(1))
        assert postgres.sql("SELECT position FROM stockade_sink_position") == [[str(stopped)]]
        sink = SinkProcess(server, postgres, "--batch-events", "7", "--keep-events")
        last = settle(r, postgres, sink)
        assert_matches_server(postgres, r, orders)
        assert postgres.sql("SELECT count(*), count(DISTINCT position), min(position), max(position) FROM events") == \
            [[str(last), str(last), "1", str(last)]]
        assert killed_behind >= 1, "the sink was never killed mid-stream"
        assert sink.stop() == 0
    finally:
        if sink:
            sink.stop()
        server.stop()


def test_postgres_restarted_under_the_sink_it_retries_and_catches_up(data_dir, postgres):
    """PostgreSQL stopped (immediate: a crash) while events keep coming, then started again: the
    sink logs that it is retrying, then catches up, and the tables equal the server."""
    server = Server(data_dir, "--shards", "2").start()
    sink = None
    try:
        r = server.client()
        sink = SinkProcess(server, postgres, "--batch-events", "20")
        r.execute_command("SKU.ADD", "tv", 1000)
        orders = [r.execute_command("RESERVE", f"a{u}", "tv", 1) for u in range(50)]
        wait_applied(postgres, durable_position(r))
        postgres.stop()
        orders += [r.execute_command("RESERVE", f"b{u}", "tv", 2) for u in range(50)]
        for order in orders[::3]:
            r.execute_command("CONFIRM", order)
        sink.wait_for(r"PostgreSQL.*retrying with backoff")
        time.sleep(1.5)  # several tries while it is down
        assert sink.proc.poll() is None
        postgres.start()
        last = settle(r, postgres, sink)
        assert_matches_server(postgres, r, orders)
        assert sink.stop() == 0
    finally:
        if sink:
            sink.stop()
        server.stop()


def test_stockade_restarted_under_the_sink_it_reconnects_and_catches_up(data_dir, postgres):
    """The server stopped and started again on the same port: the sink retries, reconnects and
    follows on from its position. The sink used to hang for good when it connected while the old
    server was closing: its EVENTS went to a closed connection and no reply could ever come."""
    port = free_port()
    server = Server(data_dir, "--port", str(port))
    server.args = []  # the fixture's --port 0 is replaced below

    def start():
        server.log = open(server.log_path, "ab")
        server.proc = subprocess.Popen([BINARY, "serve", "--port", str(port), "--data-dir", data_dir],
                                       stdout=subprocess.DEVNULL, stderr=server.log)
        server.port = port
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("server did not start")

    start()
    sink = None
    try:
        r = server.client()
        sink = SinkProcess(server, postgres)
        r.execute_command("SKU.ADD", "tv", 1000)
        orders = [r.execute_command("RESERVE", f"a{u}", "tv", 1) for u in range(20)]
        settle(r, postgres, sink)
        for _ in range(3):
            server.stop()
            time.sleep(1)  # the sink retries meanwhile (--retry-max-ms 500)
            start()
            r = server.client()
            orders += [r.execute_command("RESERVE", f"b{len(orders)}-{u}", "tv", 1) for u in range(10)]
            settle(r, postgres, sink)
        sink.wait_for(r"following redis://127\.0\.0\.1:%d from position \d+[\s\S]*following" % port)
        assert_matches_server(postgres, r, orders)
        assert sink.stop() == 0
    finally:
        if sink:
            sink.stop()
        server.stop()


def test_a_trimmed_log_stops_the_sink_with_how_to_recover(data_dir, postgres):
    """The sink's stored position falls behind what the server keeps (snapshots with no segments
    retained): the sink exits 1 naming the positions and the ways to recover, and applies nothing
    past the gap."""
    server = Server(data_dir, "--shards", "1", "--events-retention-segments", "0").start()
    sink = None
    try:
        r = server.client()
        r.execute_command("SKU.ADD", "tv", 1000)
        sink = SinkProcess(server, postgres)
        wait_applied(postgres, 1)
        sink.stop()
        for u in range(20):
            r.execute_command("RESERVE", f"u{u}", "tv", 1)
        r.execute_command("SNAPSHOT")
        server.stop()
        server = Server(data_dir, "--shards", "1", "--events-retention-segments", "0").start()
        r = server.client()
        r.execute_command("RESERVE", "late", "tv", 1)
        r.execute_command("SNAPSHOT")
        with pytest.raises(Exception, match="^TRIMMED"):
            r.execute_command("EVENTS", 2)
        sink = SinkProcess(server, postgres)
        assert sink.proc.wait(timeout=30) == 1
        logs = sink.logs()
        assert "no longer has the events after position 1" in logs
        assert "start over into an empty database" in logs or "starting over into an empty database" in logs
        assert postgres.sql("SELECT position FROM stockade_sink_position") == [["1"]]
    finally:
        if sink:
            sink.stop()
        server.stop()


def test_stockade_sink_without_the_sink_binary_says_how_to_build_it(tmp_path):
    """`stockade sink` runs the stockade-sink beside it; a stockade alone says how to build the sink."""
    alone = tmp_path / "stockade"
    shutil.copy(BINARY, alone)
    out = subprocess.run([str(alone), "sink", "--to", "postgres://u@127.0.0.1/db"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert f"{tmp_path}/stockade-sink" in out.stderr and "swift build --product stockade-sink" in out.stderr
    # Beside its sibling, arguments (--help too) are the sink's own.
    out = subprocess.run([BINARY, "sink", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "USAGE: stockade-sink" in out.stdout and "--keep-events" in out.stdout
