"""`stockade bench` against the real server (and Redis + Lua when redis-server is installed)."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import BINARY, Server


def bench(*args, timeout=180):
    return subprocess.run([BINARY, "bench", *map(str, args), "--json"], capture_output=True, text=True, timeout=timeout)


def test_sellout_sells_exactly_the_stock_and_passes_the_audit(server):
    out = bench("sellout", "--target", f"stockade://127.0.0.1:{server.port}", "--skus", 4, "--stock", 500,
                "-n", 20000, "-c", 8, "-P", 8)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["auditPassed"] and report["successes"] == 2000
    assert report["outcomes"]["held"] == 2000 and report["holds"] == 2000 and sum(report["outcomes"].values()) == 20000
    assert report["sellOutSeconds"] is not None
    assert set(report["latencyMicros"]) == {"p50", "p90", "p99", "p99.9", "max"}


def test_audit_failure_gives_a_nonzero_exit(server):
    # Too few requests to sell out: the audit says so and the exit status gates a release.
    out = bench("sellout", "--target", f"stockade://127.0.0.1:{server.port}", "--skus", 2, "--stock", 1000, "-n", 100)
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert not report["auditPassed"] and "not sold out" in report["auditProblems"][0]


def test_lifecycle_matches_the_server_exactly(server):
    out = bench("lifecycle", "--target", f"stockade://127.0.0.1:{server.port}", "--skus", 3, "--stock", 3000,
                "-n", 3000, "-c", 6, "-P", 4, "--ttl", 1500)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["auditPassed"]
    assert report["outcomes"].get("paid", 0) > 0 and report["outcomes"].get("cancelled", 0) > 0


def test_sustained_open_loop(server):
    out = bench("sustained", "--target", f"stockade://127.0.0.1:{server.port}", "--rate", 5000, "--duration", 1, "-c", 4)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["offeredRate"] == 5000 and 3000 <= report["requests"] <= 6000


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_compare_with_redis_lua(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redis_dir = tempfile.mkdtemp()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", redis_dir],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = bench("sellout", "--target", f"stockade://127.0.0.1:{server.port}", "--compare", f"redis://127.0.0.1:{port}",
                    "--skus", 2, "--stock", 300, "-n", 5000, "-c", 4, "-P", 8)
        assert out.returncode == 0, out.stdout + out.stderr
        reports = json.loads(out.stdout)
        assert [r["system"] for r in reports] == ["Stockade", "Redis + Lua"]
        assert all(r["auditPassed"] and r["successes"] == 600 for r in reports)
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(redis_dir, ignore_errors=True)


def test_redis_benchmark_script_is_the_harness_script():
    """scripts/stock.lua (for redis-benchmark EVALSHA) must be the script the harness loads."""
    import re
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    source = open(os.path.join(root, "Sources", "StockadeBench", "Target.swift")).read()
    embedded = re.search(r'let redisStockScript = """\n(.*?)"""', source, re.S).group(1)
    assert open(os.path.join(root, "scripts", "stock.lua")).read() == embedded


def skus_on(server):
    """Every SKU the server has (an AUDIT of all of them)."""
    reply = server.client().execute_command("AUDIT")
    return [name for name in reply[::2]]


def test_flags_that_cannot_run_are_refused_before_anything_is_sent(server, tmp_path):
    """--rate 0 trapped (SIGILL) after the SKUs were created, which stayed on the server; a 130% split
    of confirms and cancels, a sale that cannot sell out, --acknowledged-orders on a path that cannot
    be written (found after the load, with no cleanup) or with lifecycle (an empty file), and
    lifecycle against Redis were accepted."""
    target = f"stockade://127.0.0.1:{server.port}"
    refused = [
        ("sustained", "--rate", 0), ("sustained", "--rate", "nan"), ("sustained", "--rate", "1e-300"),
        ("sustained", "--duration", "inf"), ("sustained", "--duration", 0), ("sellout", "--zipf", "nan"),
        ("lifecycle", "--confirm", 80, "--cancel", 50), ("lifecycle", "--confirm", -1),
        ("sellout", "--users", 10, "--limit", 1, "--stock", 100),
        ("sellout", "--acknowledged-orders", str(tmp_path / "no" / "such" / "dir")),
        ("lifecycle", "--acknowledged-orders", str(tmp_path / "acked")),
        ("lifecycle", "--compare", "redis://127.0.0.1:1"),
    ]
    for args in refused:
        out = subprocess.run([BINARY, "bench", "--target", target, "-n", "100", *map(str, args)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 64, (args, out.returncode, out.stderr)
        assert "Error:" in out.stderr, (args, out.stderr)
    assert skus_on(server) == []


def test_lifecycle_keeps_its_pipeline_and_counts_a_late_follow_up_as_expired(server):
    """Lifecycle sent a CONFIRM or CANCEL and a new RESERVE for each hold, so -c 1 -P 1 had thousands
    of requests in flight (115k requests/s with a p50 of 35 ms). And a CONFIRM or CANCEL that came
    after the hold's deadline (answered EXPIRED) was audited as PAID or CANCELLED: the audit failed
    on a correct server."""
    out = bench("lifecycle", "--target", f"stockade://127.0.0.1:{server.port}", "--skus", 2, "--stock", 2000,
                "-n", 3000, "-c", 1, "-P", 1, "--ttl", 1000)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    in_flight = report["throughput"] * report["latencyMicros"]["p50"] / 1e6
    assert in_flight < 1.5, (report["throughput"], report["latencyMicros"])

    out = bench("lifecycle", "--target", f"stockade://127.0.0.1:{server.port}", "--skus", 2, "--stock", 5000,
                "-n", 5000, "-c", 4, "-P", 8, "--ttl", 1)
    report = json.loads(out.stdout)
    assert report["outcomes"].get("follow-up:EXPIRED", 0) > 0, report["outcomes"]
    assert out.returncode == 0 and report["auditPassed"], report["auditProblems"]


def test_every_connection_is_open_before_the_clock_starts(data_dir):
    """Connections were opened one by one inside the measured window: -c 2000 peaked at 612 clients
    on the server, and -c 12000 ran on 2 or 3 for most of its run with no error although the server
    allows 10,000. Now all of them answer PING before the load starts, and a refusal stops the run
    before anything is created."""
    s = Server(data_dir, "--maxclients", "40").start()
    try:
        target = f"stockade://127.0.0.1:{s.port}"
        out = bench("sellout", "--target", target, "-c", 60, "-P", 1, "-n", 1000)
        assert out.returncode != 0
        assert "could not be opened before the load (nothing was created)" in out.stderr, out.stderr
        assert "max number of clients reached" in out.stderr, out.stderr
        assert skus_on(s) == []

        r = s.client()
        peak = [0]
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], int(r.info("clients")["connected_clients"]))
                time.sleep(0.01)
        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.time()
        out = bench("sustained", "--target", target, "-c", 35, "-P", 1, "--duration", 2)
        stop.set()
        watcher.join()
        assert out.returncode == 0, out.stderr
        # 35 load connections, the harness's control connection and the watcher's.
        assert peak[0] >= 37, peak[0]
        assert json.loads(out.stdout)["seconds"] < 3
    finally:
        s.stop()


def test_the_open_loop_sends_its_whole_schedule_at_the_offered_rate(server):
    """The open loop dropped the requests it had not sent by the deadline (1.3M of 4M due, unsaid) and
    started every connection's schedule at once (--rate 10 --duration 2 -c 50 sent 50 requests in 5 s).
    Request k is now meant for k / rate, all of them are sent, late if need be, and a run that fell
    behind says so."""
    target = f"stockade://127.0.0.1:{server.port}"
    out = bench("sustained", "--target", target, "--rate", 10, "--duration", 2, "-c", 50)
    report = json.loads(out.stdout)
    assert report["requests"] == 20 and 1.8 < report["seconds"] < 3, (report["requests"], report["seconds"])

    out = bench("sustained", "--target", target, "--rate", 20000, "--duration", 1, "-c", 4)
    report = json.loads(out.stdout)
    assert report["requests"] == 20000, report["requests"]

    # Far more than the server (or a debug build of this client) makes: every request is still sent
    # and counted, the latest with their wait from the schedule.
    out = bench("sustained", "--target", target, "--rate", 1_000_000, "--duration", 0.2, "-c", 4)
    report = json.loads(out.stdout)
    assert report["requests"] == 200_000, report["requests"]
    assert any("fell behind its schedule" in note for note in report["notes"]), report["notes"]


def test_the_audit_names_a_stock_another_client_changed(server):
    """A restock by another client mid-sale was reported as OVERSOLD, units taken by another client as
    'not sold out (send more requests)' though nothing was left."""
    r = server.client()
    stop = threading.Event()
    changed = set()

    def tamper(how):
        while not stop.is_set():
            for sku in skus_on(server):
                if sku.startswith("bench-") and sku not in changed:
                    if how == "restock":
                        r.execute_command("SKU.RESTOCK", sku, 5)
                    else:
                        r.execute_command("DEDUCT", sku, 1)
                    changed.add(sku)
            time.sleep(0.005)
    for how, words in (("restock", "another client changed the stock"), ("deduct", "another client took units")):
        changed.clear()
        stop.clear()
        t = threading.Thread(target=tamper, args=(how,))
        t.start()
        out = bench("sellout", "--target", f"stockade://127.0.0.1:{server.port}", "--skus", 2, "--stock", 20000,
                    "-n", 400000, "-c", 8, "-P", 16, "--users", 100000000)
        stop.set()
        t.join()
        report = json.loads(out.stdout)
        assert out.returncode == 1 and changed, (how, out.stderr)
        problems = " ".join(report["auditProblems"])
        assert words in problems, (how, problems)
        assert "OVERSOLD" not in problems and "send more requests" not in problems, (how, problems)


def test_refusals_counted_in_the_rate_are_noted_and_the_cleanup_outlasts_them(data_dir):
    """Under --rate-limit most requests were refused BUSY, and the headline rate counted them with no
    word of it. The cleanup's CANCELs and SKU.PAUSEs were refused BUSY too, and it reported the holds
    it had not cancelled as expired and the SKUs as paused: 7,756 units stayed held."""
    s = Server(data_dir, "--rate-limit", "500").start()
    try:
        out = subprocess.run([BINARY, "bench", "sellout", "--target", f"stockade://127.0.0.1:{s.port}", "--skus", "1",
                              "--stock", "1500", "-n", "20000", "-c", "4", "--quiet"], capture_output=True, text=True, timeout=120)
        assert "requests were refused BUSY" in out.stdout, out.stdout
        assert "cleanup: cancelled 1500 of 1500 holds" in out.stdout, out.stdout
        assert "cleanup: 1 of 1 SKUs paused" in out.stdout, out.stdout
        r = s.client()
        for sku in skus_on(s):
            fields = r.execute_command("STOCK", sku)
            info = dict(zip(fields[::2], fields[1::2]))
            assert int(info["reserved"]) == 0 and int(info["paused"]) == 1, info
    finally:
        s.stop()


def test_a_pipeline_deeper_than_the_requests_ends_with_them(server):
    """-P 100000000 with -n 200 went on taking tickets after the 200 were gone, and that time was
    counted as latency (p50 893 ms); -P now stops at 100,000 and the opening stops with the budget."""
    target = f"stockade://127.0.0.1:{server.port}"
    out = bench("sustained", "--target", target, "-c", 2, "-n", 200, "-P", 100_000_000)
    assert out.returncode == 64 and "-P must be at most 100000" in out.stderr, out.stderr
    out = bench("sustained", "--target", target, "-c", 2, "-n", 200, "-P", 100_000)
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["requests"] == 200 and report["seconds"] < 2, report
