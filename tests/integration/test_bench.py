"""`stockade bench` against the real server (and Redis + Lua when redis-server is installed)."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
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
