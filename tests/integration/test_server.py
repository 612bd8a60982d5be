"""The real server process, driven by real Redis tools: redis-cli, redis-benchmark, redis-py."""
import os
import signal
import random
import socket
import subprocess
import threading
import time

import pytest
import redis

from conftest import BINARY, Server, cli


def stock(r, sku):
    values = r.execute_command("STOCK", sku)
    return dict(zip(values[0::2], values[1::2]))


def audit_ok(r):
    values = r.execute_command("AUDIT")
    return len(values) > 0 and all(v == "OK" for v in values[1::2])


def test_redis_cli_round_trip_of_every_command(server):
    p = server.port
    assert cli(p, "--no-raw", "PING") == ["PONG"]
    assert cli(p, "--no-raw", "ECHO", "hi there") == ['"hi there"']
    assert cli(p, "--no-raw", "SKU.ADD", "tv", "5", "LIMIT", "2") == ["OK"]
    assert cli(p, "--no-raw", "SKU.ADD", "tv", "5") == ["(error) EXISTS"]
    assert cli(p, "--no-raw", "SKU.ADD", "cam", "2") == ["OK"]
    order = cli(p, "RESERVE", "ann", "tv", "2", "REQ", "r1", "TTL", "60000")[0]
    assert order.isdigit()
    assert cli(p, "RESERVE", "ann", "tv", "2", "REQ", "r1") == [order]           # idempotent retry
    assert cli(p, "--no-raw", "RESERVE", "ann", "tv", "1") == ["(error) LIMIT 2 2"]
    assert cli(p, "--no-raw", "RESERVE", "bob", "tv", "4") == ["(error) INSUFFICIENT 3"]
    assert cli(p, "--no-raw", "RESERVE", "bob", "nope", "1") == ["(error) NOSKU"]
    assert cli(p, "--no-raw", "RESERVE", "bob", "tv", "0").__getitem__(0).startswith("(error) BADQTY")
    basket = cli(p, "BUY", "bob", "tv", "1", "cam", "2")[0]
    assert basket.isdigit()
    assert cli(p, "--no-raw", "BUY", "cyd", "tv", "1", "cam", "1") == ["(error) SOLDOUT"]
    assert cli(p, "CONFIRM", order) == ["PAID"]
    assert cli(p, "CONFIRM", order) == ["PAID"]
    assert cli(p, "--no-raw", "CANCEL", order) == ["(error) WRONGSTATE PAID"]
    assert cli(p, "CANCEL", basket) == ["CANCELLED"]
    assert cli(p, "--no-raw", "CONFIRM", "12345") == ["(error) NOORDER"]
    assert cli(p, "ORDER", order)[:6] == ["id", order, "user", "ann", "state", "PAID"]
    assert len(cli(p, "ORDERS", "bob")) == 13  # one order: 9 lines of fields, then 2 items of 2 lines
    assert cli(p, "SKU.PAUSE", "cam") == ["OK"]
    assert cli(p, "--no-raw", "RESERVE", "dee", "cam", "1") == ["(error) PAUSED"]
    assert cli(p, "SKU.RESUME", "cam") == ["OK"]
    assert cli(p, "STOCK", "tv") == ["sku", "tv", "total", "5", "available", "3", "reserved", "0", "sold", "2", "limit", "2", "paused", "0"]
    assert cli(p, "SKU.RESTOCK", "tv", "-1")[:4] == ["sku", "tv", "total", "4"]
    assert cli(p, "--no-raw", "SKU.RESTOCK", "tv", "-10") == ["(error) BELOWCOMMITTED 2"]
    assert cli(p, "DEDUCT", "cam") == ["1"]
    assert cli(p, "DEDUCT", "cam", "5") == ["0"]
    assert cli(p, "DEDUCT", "ghost") == ["-1"]
    assert cli(p, "AUDIT") == ["tv", "OK", "cam", "OK"] or cli(p, "AUDIT") == ["cam", "OK", "tv", "OK"]
    assert cli(p, "AUDIT", "tv") == ["tv", "OK"]
    events = cli(p, "--no-raw", "EVENTS", "1", "COUNT", "2")
    assert events[0].startswith("1) 1) (integer) 1") and '"sku-added"' in events[1]
    assert cli(p, "SNAPSHOT") == ["OK"]
    info = "\n".join(cli(p, "INFO"))
    for section in ["# Server", "# Clients", "# Stats", "# Persistence", "# Shards", "# Memory"]:
        assert section in info
    assert cli(p, "--no-raw", "WHATEVER") == ["(error) ERR unknown command 'WHATEVER'"]
    assert cli(p, "--no-raw", "RESERVE", "u", "tv") == ["(error) ERR wrong number of arguments for 'reserve' command"]
    assert cli(p, "--no-raw", "SKU.ADD", "x", "many") == ["(error) ERR value is not an integer or out of range"]
    # Inline commands, as nc or telnet send them, with quoting.
    with socket.create_connection(("127.0.0.1", p)) as s:
        s.sendall(b'ECHO "two words"\r\nPING\r\n')
        time.sleep(0.3)
        assert s.recv(4096) == b"$9\r\ntwo words\r\n+PONG\r\n"
    assert cli(p, "SHUTDOWN") == []
    assert server.proc.wait(timeout=30) == 0
    assert "log flushed and synced" in server.logs()


def test_redis_benchmark_sells_exactly_the_stock(server):
    r = server.client()
    stock_units = 3000
    r.execute_command("SKU.ADD", "flash", stock_units)
    # redis-benchmark stops at the first error reply (SOLDOUT), after at least the stock was asked for.
    subprocess.run(["redis-benchmark", "-p", str(server.port), "-c", "20", "-P", "16", "-n", "40000",
                    "-r", "1000000", "-q", "RESERVE", "user:__rand_int__", "flash", "1"],
                   capture_output=True, timeout=120)
    s = stock(r, "flash")
    assert s["reserved"] == stock_units and s["available"] == 0 and s["sold"] == 0
    assert audit_ok(r)
    created = 0
    position = 1
    while True:
        events = r.execute_command("EVENTS", position, "COUNT", 10000)
        if not events:
            break
        created += sum(1 for e in events if e[1] == "created")
        position = events[-1][0] + 1
    assert created == stock_units


def test_redis_py_flash_sale(server):
    r = server.client()
    assert r.ping()
    r.execute_command("SKU.ADD", "sneaker", 2, "LIMIT", 1)
    assert stock(r, "sneaker")["total"] == 2
    r.execute_command("SKU.RESTOCK", "sneaker", 2)
    a = r.execute_command("RESERVE", "ann", "sneaker", 1, "REQ", "checkout-1")
    assert r.execute_command("RESERVE", "ann", "sneaker", 1, "REQ", "checkout-1") == a  # retry: same order
    with pytest.raises(redis.ResponseError, match="^LIMIT 1 1"):
        r.execute_command("RESERVE", "ann", "sneaker", 1)
    b = r.execute_command("RESERVE", "bob", "sneaker", 1)
    c = r.execute_command("RESERVE", "cyd", "sneaker", 1, "TTL", 300)
    d = r.execute_command("RESERVE", "dee", "sneaker", 1)
    with pytest.raises(redis.ResponseError, match="^SOLDOUT"):
        r.execute_command("RESERVE", "eve", "sneaker", 1)
    assert r.execute_command("CONFIRM", a) == "PAID"
    assert r.execute_command("CANCEL", b) == "CANCELLED"
    assert r.execute_command("CANCEL", b) == "CANCELLED"
    # The cancelled unit is back; cyd's hold expires by itself.
    e = r.execute_command("RESERVE", "eve", "sneaker", 1)
    time.sleep(0.6)
    order = r.execute_command("ORDER", c)
    assert dict(zip(order[0:8:2], order[1:8:2]))["state"] == "EXPIRED"
    with pytest.raises(redis.ResponseError, match="^EXPIRED"):
        r.execute_command("CONFIRM", c)
    s = stock(r, "sneaker")
    assert (s["available"], s["reserved"], s["sold"]) == (1, 2, 1)
    # The event stream, read in small pages and resumed from the last position seen.
    seen = []
    position = 1
    while True:
        page = r.execute_command("EVENTS", position, "COUNT", 3)
        if not page:
            break
        seen += page
        position = page[-1][0] + 1
    positions = [event[0] for event in seen]
    assert positions == list(range(1, len(seen) + 1))
    types = [event[1] for event in seen]
    assert types == ["sku-added", "restocked", "created", "created", "created", "created", "paid", "cancelled",
                     "created", "expired"]
    assert seen[2][2:5] == [a, "ann", seen[2][4]] and seen[2][5] == ["sneaker", 1]
    # A consumer waiting at the end is woken by the next change.
    waiter = {}
    t = threading.Thread(target=lambda: waiter.setdefault("events", server.client().execute_command("EVENTS", position, "BLOCK", 5000)))
    t.start()
    time.sleep(0.2)
    r.execute_command("CONFIRM", d)
    t.join()
    assert [ev[1] for ev in waiter["events"]] == ["paid"] and waiter["events"][0][2] == d
    assert r.execute_command("EVENTS", position + 1, "BLOCK", 100) == []
    assert audit_ok(r)
    del e


def test_kill9_under_pipelined_load_keeps_every_acknowledged_order(data_dir):
    acknowledged = {}
    lock = threading.Lock()
    for round_ in range(3):
        server = Server(data_dir, "--shards", "2", "--snapshot-every-changes", "5000").start()
        r = server.client()
        if round_ == 0:
            for sku in ("k0", "k1", "k2", "k3"):
                r.execute_command("SKU.ADD", sku, 10_000_000)
        stop = threading.Event()

        def load(worker):
            c = server.client()
            n = 0
            try:
                while not stop.is_set():
                    p = c.pipeline(transaction=False)
                    users = [f"r{round_}-w{worker}-{n}-{k}" for k in range(16)]
                    for k, user in enumerate(users):
                        p.execute_command("RESERVE", user, f"k{(worker + k) % 4}", 1)
                    replies = p.execute(raise_on_error=False)
                    with lock:
                        for user, reply in zip(users, replies):
                            if isinstance(reply, str):
                                acknowledged[reply] = user
                    n += 1
            except (redis.ConnectionError, ConnectionResetError, OSError):
                pass

        threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(random.uniform(0.8, 1.5))
        server.kill9()
        stop.set()
        for t in threads:
            t.join()
        assert len(acknowledged) > 0

        restarted = Server(data_dir, "--shards", "2").start()
        r = restarted.client()
        missing = 0
        p = r.pipeline(transaction=False)
        ids = list(acknowledged.items())
        for order_id, _ in ids:
            p.execute_command("ORDER", order_id)
        for (order_id, user), reply in zip(ids, p.execute(raise_on_error=False)):
            if isinstance(reply, Exception) or reply[3] != user:
                missing += 1
        assert missing == 0, f"round {round_}: {missing} of {len(ids)} acknowledged orders lost\n{restarted.logs()}"
        assert audit_ok(r)
        total_reserved = sum(stock(r, f"k{i}")["reserved"] for i in range(4))
        assert total_reserved >= len(acknowledged)
        restarted.stop()


def test_malformed_input_does_not_disturb_other_clients(server):
    r = server.client()
    r.execute_command("SKU.ADD", "calm", 10_000_000)

    def good_client(duration, out):
        c = server.client()
        latencies, errors, ids = [], [], []
        end = time.time() + duration
        n = 0
        while time.time() < end:
            p = c.pipeline(transaction=False)
            for k in range(8):
                p.execute_command("RESERVE", f"g{threading.get_ident()}-{n}-{k}", "calm", 1)
            started = time.perf_counter()
            replies = p.execute(raise_on_error=False)
            latencies.append(time.perf_counter() - started)
            errors += [x for x in replies if isinstance(x, Exception)]
            ids += [x for x in replies if isinstance(x, str)]
            n += 1
        out.append((latencies, errors, ids))

    def run_phase(with_attacker):
        results = []
        stop = threading.Event()
        attacks = []

        def attacker():
            rng = random.Random(5)
            payloads = [b"*3\r\n$7\r\nRESERVE\r\n$-9\r\n", b"*99999999\r\n", b"$5\r\nhello\r\n",
                        b"*2\r\n$7\r\nRESERVE\r\n$999999999999\r\n", b'RESERVE "x y\r\n', b"\x00\xff\xfe" * 100,
                        b"*1\r\n$3\r\nabcXY", b"A" * 70_000 + b"\r\n",
                        b"*4\r\n$7\r\nRESERVE\r\n$3\r\nbad\r\n$4\r\ncalm\r\n$3\r\n1\r\n"]
            while not stop.is_set():
                try:
                    with socket.create_connection(("127.0.0.1", server.port), timeout=0.3) as s:
                        s.sendall(rng.choice(payloads) + bytes(rng.randrange(256) for _ in range(rng.randrange(64))))
                        attacks.append(s.recv(256))
                except OSError:
                    attacks.append(b"(no reply: waiting for the rest of a frame)")

        threads = [threading.Thread(target=good_client, args=(2.0, results)) for _ in range(3)]
        bad = threading.Thread(target=attacker) if with_attacker else None
        for t in threads + ([bad] if bad else []):
            t.start()
        for t in threads:
            t.join()
        stop.set()
        if bad:
            bad.join()
        return results, attacks

    quiet, _ = run_phase(False)
    noisy, attacks = run_phase(True)
    assert len(attacks) > 10
    assert any(a.startswith(b"-ERR Protocol error") for a in attacks)
    assert all(a.startswith(b"-") or a == b"" or a.startswith(b"(no reply") for a in attacks), attacks
    for latencies, errors, _ in quiet + noisy:
        assert errors == []
    median = lambda xs: sorted(xs)[len(xs) // 2]
    quiet_median = median([x for l, _, _ in quiet for x in l])
    noisy_median = median([x for l, _, _ in noisy for x in l])
    assert noisy_median < quiet_median * 3 + 0.002, (quiet_median, noisy_median)
    # Only the good clients' reservations reached the engine (and the log).
    good = sum(len(ids) for _, _, ids in quiet + noisy)
    assert stock(r, "calm")["reserved"] == good
    assert audit_ok(r)


def test_auth_and_limits(data_dir):
    s = Server(data_dir, "--requirepass", "s3cret", "--maxclients", "3", "--rate-limit", "20",
               "--max-inline-bytes", "1024", "--max-bulk-bytes", "4096", "--max-arguments", "8",
               "--client-stall-seconds", "1", "--max-output-bytes", str(4 << 20)).start()
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as anon:
            def ask(line):
                anon.sendall(line)
                return anon.recv(4096)
            assert ask(b"PING\r\n") == b"+PONG\r\n"
            assert ask(b"STOCK x\r\n") == b"-NOAUTH Authentication required.\r\n"
            assert ask(b"AUTH wrong\r\n").startswith(b"-WRONGPASS")
            assert ask(b"AUTH s3cret\r\n") == b"+OK\r\n"
            assert ask(b"STOCK x\r\n") == b"-NOSKU\r\n"
        with pytest.raises(redis.AuthenticationError):
            s.client().ping()  # redis-py without the password (HELLO 3 without AUTH)
        with pytest.raises(redis.AuthenticationError):
            s.client(password="wrong").ping()
        r = s.client(password="s3cret")
        r.execute_command("SKU.ADD", "lim", 1000)
        # Rate limit: a burst over 20 changes per second gets BUSY, reads are not limited.
        replies = r.pipeline(transaction=False)
        for i in range(60):
            replies.execute_command("RESERVE", f"u{i}", "lim", 1)
        out = replies.execute(raise_on_error=False)
        busy = [x for x in out if isinstance(x, redis.ResponseError) and str(x).startswith("BUSY")]
        assert 30 <= len(busy) <= 45 and stock(r, "lim")["reserved"] == 60 - len(busy)

        def raw(payload):
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
                c.sendall(payload)
                data = b""
                while True:
                    chunk = c.recv(4096)
                    if not chunk:
                        return data  # the server closed the connection
                    data += chunk

        assert raw(b"PING " + b"x" * 2000 + b"\r\n").startswith(b"-ERR Protocol error: too big inline request")
        assert raw(b"*2\r\n$4\r\nECHO\r\n$5000\r\n").startswith(b"-ERR Protocol error: invalid bulk length")
        assert raw(b"*9\r\n").startswith(b"-ERR Protocol error: invalid multibulk length")
        # maxclients: the fourth connection is refused, the others keep working.
        held = [s.client(password="s3cret") for _ in range(2)]
        for h in held:
            h.ping()
        with pytest.raises(redis.ConnectionError):
            s.client(password="s3cret").ping()
        for h in held:
            h.close()
        time.sleep(0.2)
        # A client that does not read its replies is disconnected; others are unaffected.
        hog = socket.create_connection(("127.0.0.1", s.port))
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = b"AUTH s3cret\r\n" + b"*2\r\n$4\r\nECHO\r\n$4000\r\n" + b"y" * 4000 + b"\r\n"
        closed = False
        end = time.time() + 20
        hog.settimeout(0.5)
        while time.time() < end and not closed:
            try:
                hog.sendall(request * 20)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            except socket.timeout:
                pass
            assert r.ping()
        assert closed, "a client that never reads was not disconnected"
        hog.close()
        assert "has not read its replies" in s.logs() or "unread replies" in s.logs()
    finally:
        s.stop()


def test_non_loopback_without_password_is_refused(data_dir):
    out = subprocess.run([BINARY, "serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", data_dir],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 64                  # a usage error, before anything is opened
    assert "refusing to listen on 0.0.0.0 without a password" in out.stderr


@pytest.mark.parametrize("preallocate", ["0", "1048576"], ids=["growing", "zeros-ahead"])
def test_log_write_failure_refuses_changes_and_loses_nothing_acknowledged(data_dir, preallocate):
    """The log's file may grow only 64 KiB (RLIMIT_FSIZE): once a write fails, every change is refused with
    UNAVAILABLE (and so are reads that could show a change that never became durable), INFO says why,
    and after a restart without the limit every acknowledged hold is there. With zeros written ahead
    (the default), the first megabyte of zeros stops at the limit: the log writes over the zeros it
    has until a write must grow the file."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    s = Server(data_dir, "--shards", "2", "--snapshot-every-changes", "0", "--log-preallocate-bytes", preallocate,
               preexec_fn=small_files).start()
    r = s.client()
    r.execute_command("SKU.ADD", "disk", 1_000_000)
    r.execute_command("SKU.ADD", "gone", 0)
    assert r.execute_command("DEDUCT", "gone") == 0   # sold out, answered from its counter
    acknowledged, refused = [], []
    for i in range(5000):
        try:
            acknowledged.append((r.execute_command("RESERVE", f"u{i}", "disk", 1), f"u{i}"))
        except redis.ResponseError as e:
            refused.append(str(e))
            if len(refused) >= 3:
                break
    assert refused and all(x.startswith("UNAVAILABLE") for x in refused), refused[:3]
    assert acknowledged
    with pytest.raises(redis.ResponseError, match="^UNAVAILABLE"):
        r.execute_command("SKU.ADD", "more", 1)
    with pytest.raises(redis.ResponseError, match="^UNAVAILABLE"):
        r.execute_command("STOCK", "disk")                   # it could show a hold that is not durable
    for sold_out in (["DEDUCT", "gone"], ["RESERVE", "late", "gone", 1]):  # the counters answer nothing now
        with pytest.raises(redis.ResponseError, match="^UNAVAILABLE"):
            r.execute_command(*sold_out)
    assert r.ping()
    assert "log write failed" in str(r.info("persistence").get("log_failure"))
    assert r.info("server")["tcp_port"] == s.port     # the bound port, also with --port 0
    # Stopped after a log failure: it says so and exits 1, not "flushed and synced".
    assert s.stop() == 1
    assert "the log failed while serving" in s.logs() and "bye" not in s.logs()

    restarted = Server(data_dir, "--shards", "2").start()
    r = restarted.client()
    for order_id, user in acknowledged:
        assert r.execute_command("ORDER", order_id)[3] == user
    assert stock(r, "disk")["reserved"] >= len(acknowledged)
    assert audit_ok(r)
    restarted.stop()


def test_output_that_cannot_be_written_does_not_stop_the_server(data_dir):
    """stdout and stderr go to a file that may not grow (RLIMIT_FSIZE below its size, SIGXFSZ ignored):
    every line the server writes there fails. The "listening" line's failed write trapped (SIGILL) at
    start-up; now the server serves, and stops cleanly, saying nothing."""
    import resource
    out_path = data_dir + "-out.txt"
    with open(out_path, "wb") as f:
        f.write(b"x" * 16384)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(out_path, "ab") as out:
        proc = subprocess.Popen([BINARY, "serve", "--port", str(port), "--data-dir", data_dir, "--snapshot-every-changes", "0"],
                                stdout=out, stderr=out, preexec_fn=small_files)
    try:
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        # The line is written once the listener is up: the failure came just after the first connect.
        r = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, protocol=2)
        try:
            time.sleep(0.5)
            assert r.ping()
            r.execute_command("SKU.ADD", "tv", 5)
            order = r.execute_command("RESERVE", "u1", "tv", 1)
            assert r.execute_command("ORDER", order)[3] == "u1"
        except redis.ConnectionError:
            pytest.fail(f"the server stopped serving: exit status {proc.wait(timeout=10)}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert os.path.getsize(out_path) == 16384       # nothing could be written, and nothing was
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.remove(out_path)


def test_a_closed_stderr_pipe_does_not_kill_the_server_at_start_up(data_dir):
    """stderr is a pipe whose reader is gone (a log collector that died, `2>&1 | head -n 1`), SIGPIPE at
    its default: the first log line ("recovered ...") killed the server by SIGPIPE before it listened
    (SwiftNIO ignores the signal only once it makes a socket). Now it starts, serves and stops cleanly."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        # subprocess restores SIGPIPE to its default in the child.
        proc = subprocess.Popen([BINARY, "serve", "--port", "0", "--data-dir", data_dir], stdout=subprocess.PIPE,
                                stderr=write_end)
    finally:
        os.close(write_end)
    try:
        line = proc.stdout.readline().decode()
        assert "listening on" in line, f"no listening line; exit status {proc.wait(timeout=10)}"
        port = int(line.rsplit(":", 1)[1])
        r = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, protocol=2)
        r.execute_command("SKU.ADD", "tv", 5)
        assert stock(r, "tv")["available"] == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill9_leaves_allocated_space_that_the_restart_cuts(data_dir):
    """The log writes its segment into space allocated ahead (--log-preallocate-bytes, 1 MiB by
    default): while the server runs the file is longer than its blocks. After kill -9 the restart cuts
    the zeros past the last block as unwritten space, not as a torn tail or damage, and every
    acknowledged hold is there; after a clean stop every segment ends at its last block."""
    s = Server(data_dir, "--shards", "2", "--snapshot-every-changes", "0").start()
    r = s.client()
    r.execute_command("SKU.ADD", "tv", 1000)
    held = [(r.execute_command("RESERVE", f"u{i}", "tv", 1), f"u{i}") for i in range(50)]
    segment = os.path.join(data_dir, max(f for f in os.listdir(data_dir) if f.startswith("wal-")))
    assert os.path.getsize(segment) == 1 << 20
    s.kill9()

    restarted = Server(data_dir, "--shards", "2").start()
    r = restarted.client()
    recovery = str(r.info("persistence")["recovery"])
    assert "bytes of allocated space past the last block" in recovery and "torn" not in recovery, recovery
    assert os.path.getsize(segment) < 1 << 20
    for order_id, user in held:
        assert r.execute_command("ORDER", order_id)[3] == user
    assert audit_ok(r)
    assert restarted.stop() == 0
    inspected = subprocess.run([BINARY, "inspect", data_dir], capture_output=True, text=True)
    assert inspected.returncode == 0 and "allocated" not in inspected.stdout, inspected.stdout[-2000:]
