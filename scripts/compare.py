#!/usr/bin/env python3
"""Stockade against Redis + Lua, measured alternately in one sitting; prints BENCHMARKS.md tables.

Starts its own servers on free loopback ports (Stockade with fsync always; Redis with no persistence and
with appendfsync always), runs every measurement ROUNDS times in rotation, and reports medians and
ratios. Usage: python3 scripts/compare.py [--rounds 3] [--out bench-results.json]
Needs: .build/release/stockade (make release), redis-server, redis-benchmark.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOCKADE = os.environ.get("STOCKADE_BIN", os.path.join(ROOT, ".build", "release", "stockade"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, name, args, port):
        self.name, self.port = name, port
        self.dir = tempfile.mkdtemp(prefix=f"cmp-{name}-")
        self.p = subprocess.Popen([a.replace("{dir}", self.dir) for a in args], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{name} did not start")

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_all():
    ps, pr1, pr2 = free_port(), free_port(), free_port()
    return {
        "stockade": Proc("stockade", [STOCKADE, "serve", "--port", str(ps), "--data-dir", "{dir}", "--fsync", "always",
                                      "--snapshot-every-changes", "0", "--snapshot-every-seconds", "0"], ps),
        "redis-nopersist": Proc("redis-nopersist", ["redis-server", "--port", str(pr1), "--save", "", "--appendonly", "no",
                                                    "--dir", "{dir}"], pr1),
        "redis-always": Proc("redis-always", ["redis-server", "--port", str(pr2), "--save", "", "--appendonly", "yes",
                                              "--appendfsync", "always", "--dir", "{dir}"], pr2),
    }


def harness(target, *args):
    out = subprocess.run([STOCKADE, "bench", *map(str, args), "--target", target, "--json"], capture_output=True, text=True,
                         timeout=600)
    if not out.stdout.strip():
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def url(name, p):
    return f"{'stockade' if name == 'stockade' else 'redis'}://127.0.0.1:{p.port}"


def redis_benchmark(port, pipeline, n, *command):
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-P", str(pipeline), "-n", str(n),
                          "-r", "100000000", "-q", *command], capture_output=True, text=True, timeout=600)
    m = re.search(r"([\d.]+) requests per second, p50=([\d.]+) msec", out.stdout.replace("\r", "\n"))
    return (float(m.group(1)), float(m.group(2))) if m else (0.0, 0.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = {}

    def add(key, value):
        results.setdefault(key, []).append(value)

    servers = start_all()
    try:
        for r in range(args.rounds):
            for name, p in servers.items():
                for pipeline, n in ((16, 1_000_000), (1, 200_000)):
                    rep = harness(url(name, p), "sustained", "-c", 50, "-P", pipeline, "-n", n, "--quiet")
                    add(f"harness/{name}/P{pipeline}", {"rps": rep["throughput"], "p50": rep["latencyMicros"]["p50"],
                                                        "p99": rep["latencyMicros"]["p99"]})
            # redis-benchmark: the same durable RESERVE, and Redis EVALSHA of the stock script.
            s = servers["stockade"]
            subprocess.run(["redis-cli", "-p", str(s.port), "SKU.ADD", f"rb{r}", "1000000000000"], capture_output=True)
            for pipeline, n in ((16, 2_000_000), (1, 200_000)):
                add(f"redis-benchmark/stockade/P{pipeline}", redis_benchmark(s.port, pipeline, n, "RESERVE", "user:__rand_int__", f"rb{r}", "1"))
            for name in ("redis-nopersist", "redis-always"):
                p = servers[name]
                sha = subprocess.run(["redis-cli", "-p", str(p.port), "SCRIPT", "LOAD", open(os.path.join(ROOT, "scripts", "stock.lua")).read()],
                                     capture_output=True, text=True).stdout.strip()
                subprocess.run(["redis-cli", "-p", str(p.port), "SET", "stock:rb", "1000000000000"], capture_output=True)
                for pipeline, n in ((16, 2_000_000), (1, 200_000)):
                    add(f"redis-benchmark/{name}/P{pipeline}", redis_benchmark(p.port, pipeline, n, "EVALSHA", sha, "2", "stock:rb",
                                                                               "bought:rb", "user:__rand_int__", "0", "1"))
                add(f"redis-benchmark/{name}/PING-P1", redis_benchmark(p.port, 1, 200_000, "PING"))
            # A sellout: 10 SKUs x 1,000 units = 10k units, 1M requests, per-user limit 1.
            for name, p in servers.items():
                rep = harness(url(name, p), "sellout", "--skus", 10, "--stock", 1000, "-n", 1_000_000, "-c", 50, "-P", 16, "--quiet")
                add(f"sellout/{name}", {"rps": rep["throughput"], "sellout": rep["sellOutSeconds"], "p99": rep["latencyMicros"]["p99"],
                                        "audit": rep["auditPassed"], "ok": rep["successes"]})
    finally:
        for p in servers.values():
            p.stop()

    med = lambda xs: statistics.median(xs)
    print("### Harness, sustained RESERVE, 50 connections (median of %d rounds)\n" % args.rounds)
    print("| pipeline | Stockade fsync always | Redis + Lua, no persistence | Redis + Lua, appendfsync always | vs no persistence | vs appendfsync always |")
    print("|---|---|---|---|---|---|")
    for P in (16, 1):
        row = {k: med([x["rps"] for x in results[f"harness/{k}/P{P}"]]) for k in servers}
        lat = {k: (med([x["p50"] for x in results[f"harness/{k}/P{P}"]]) / 1000, med([x["p99"] for x in results[f"harness/{k}/P{P}"]]) / 1000) for k in servers}
        cell = lambda k: f"{row[k]:,.0f}/s (p50 {lat[k][0]:.2f} ms, p99 {lat[k][1]:.2f} ms)"
        print(f"| {P} | {cell('stockade')} | {cell('redis-nopersist')} | {cell('redis-always')} | "
              f"x{row['stockade'] / row['redis-nopersist']:.2f} | x{row['stockade'] / row['redis-always']:.2f} |")
    print("\n### redis-benchmark, 50 connections (median of %d rounds)\n" % args.rounds)
    print("| pipeline | Stockade RESERVE (fsync always) | Redis EVALSHA, no persistence | Redis EVALSHA, appendfsync always | Redis PING, no persistence |")
    print("|---|---|---|---|---|")
    for P in (16, 1):
        c = lambda k: f"{med([x[0] for x in results[k]]):,.0f}/s (p50 {med([x[1] for x in results[k]]):.3f} ms)"
        ping = c("redis-benchmark/redis-nopersist/PING-P1") if P == 1 else ""
        print(f"| {P} | {c(f'redis-benchmark/stockade/P{P}')} | {c(f'redis-benchmark/redis-nopersist/P{P}')} | {c(f'redis-benchmark/redis-always/P{P}')} | {ping} |")
    print("\n### Sellout: 10 SKUs x 1,000 units, 1,000,000 requests, limit 1 per user (median of %d rounds)\n" % args.rounds)
    print("| system | sold out after | requests/s | p99 | units sold | audit |")
    print("|---|---|---|---|---|---|")
    for k in servers:
        xs = results[f"sellout/{k}"]
        print(f"| {k} | {med([x['sellout'] or 0 for x in xs]):.3f} s | {med([x['rps'] for x in xs]):,.0f} | "
              f"{med([x['p99'] for x in xs]) / 1000:.2f} ms | {', '.join(str(x['ok']) for x in xs)} | "
              f"{'passed' if all(x['audit'] for x in xs) else 'FAILED'} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
