#!/usr/bin/env python3
"""Replication figures, side by side in one sitting (BENCHMARKS.md, "Replication"):

- durable RESERVE throughput of `stockade bench sustained` against a primary alone, a primary with an
  asynchronous replica, and a primary with --min-replicas-to-write 1 (semi-synchronous), alternating
  rounds, medians and ratios to the primary alone;
- the replica's lag while the load runs (INFO replication: replica_lag_records, replica_lag_ms,
  sampled every 50 ms): median and max;
- promotion: kill -9 of the primary under load, then REPLICAOF NO ONE on the replica: time until the
  replica answers a change;
- automatic failover (--etcd): three nodes under a coordinator (a real etcd), kill -9 of the primary
  under load: time until another node acknowledges a change.

    python3 scripts/replication_bench.py [--binary .build/release/stockade] [--rounds 3] [--seconds 8] [--etcd]
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time

import redis


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, binary, root, name, *args):
        self.dir = os.path.join(root, name)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "serve", "--port", str(self.port), "--data-dir", self.dir, "--shards", "2", *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            if b"listening on" in self.proc.stdout.readline():
                return
        raise RuntimeError(f"{name} did not start")

    def client(self):
        return redis.Redis(port=self.port, decode_responses=True)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


def bench(binary, port, seconds):
    out = subprocess.run(
        [binary, "bench", "sustained", "--target", f"stockade://127.0.0.1:{port}", "--duration", str(seconds),
         "-c", "50", "-P", "16", "--skus", "10"],
        capture_output=True, text=True, timeout=seconds + 120)
    m = re.search(r"([\d,]+) requests/s", out.stdout) or re.search(r"([\d,.]+)\s*req/s", out.stdout)
    if not m:
        raise RuntimeError(out.stdout + out.stderr)
    return float(m.group(1).replace(",", ""))


def wait_connected(primary, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if int(primary.client().info("replication")["connected_slaves"]) >= 1:
            return
        time.sleep(0.05)
    raise RuntimeError("replica did not connect")


def run_mode(binary, mode, seconds):
    root = tempfile.mkdtemp(prefix="stockade-repl-")
    try:
        args = ["--min-replicas-to-write", "1"] if mode == "semi-synchronous" else []
        primary = Node(binary, root, "primary", *args)
        replica = None
        lags = []
        stop = threading.Event()
        if mode != "primary alone":
            replica = Node(binary, root, "replica", "--replica-of", f"127.0.0.1:{primary.port}")
            wait_connected(primary)

            def sample():
                c = replica.client()
                while not stop.is_set():
                    info = c.info("replication")
                    lags.append((int(info["replica_lag_records"]), int(info["replica_lag_ms"])))
                    time.sleep(0.05)
            sampler = threading.Thread(target=sample)
            sampler.start()
        rate = bench(binary, primary.port, seconds)
        stop.set()
        if replica:
            sampler.join()
        result = {"rate": rate, "lags": lags}
        if replica:
            # Catch-up after the load, then promotion after kill -9 of the primary under load.
            load_stop = threading.Event()

            def load():
                c = primary.client()
                i = 0
                while not load_stop.is_set():
                    try:
                        c.execute_command("RESERVE", f"promo{i}", "promo", 1)
                    except (redis.ConnectionError, redis.ResponseError):
                        return
                    i += 1
            primary.client().execute_command("SKU.ADD", "promo", 1_000_000_000)
            t = threading.Thread(target=load)
            t.start()
            time.sleep(0.5)
            r = replica.client()
            r.ping()
            killed = time.time()
            primary.stop(signal.SIGKILL)
            load_stop.set()
            r.execute_command("REPLICAOF", "NO", "ONE")
            r.execute_command("RESERVE", "after-promotion", "promo", 1)
            result["promotion_ms"] = (time.time() - killed) * 1000
            t.join()
            replica.stop()
        primary.stop()
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def failover_with_etcd(binary, lease_seconds=2):
    """Seconds from kill -9 of the primary of three coordinated nodes to a change acknowledged by
    the next one, with a client that looks for the primary with ROLE, as clients do."""
    root = tempfile.mkdtemp(prefix="stockade-failover-")
    client_port, peer_port = free_port(), free_port()
    etcd = subprocess.Popen(
        ["etcd", "--data-dir", os.path.join(root, "etcd"), "--name", "b",
         "--listen-client-urls", f"http://127.0.0.1:{client_port}", "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer_port}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-cluster", f"b=http://127.0.0.1:{peer_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes = []
    try:
        time.sleep(1.0)
        nodes = [Node(binary, root, f"n{i}", "--coordinator", f"etcd://127.0.0.1:{client_port}", "--cluster", "bench",
                      "--lease-seconds", str(lease_seconds)) for i in range(3)]

        def primary(exclude=None):
            while True:
                for node in nodes:
                    if node is exclude:
                        continue
                    try:
                        if node.client().info("replication").get("writable") == 1:
                            return node
                    except redis.RedisError:
                        pass
                time.sleep(0.01)
        first = primary()
        first.client().execute_command("SKU.ADD", "tv", 1_000_000)
        time.sleep(0.5)
        first.stop(signal.SIGKILL)
        killed = time.time()
        while True:
            target = primary(exclude=first)
            try:
                target.client().execute_command("RESERVE", "after", "tv", 1)
                return time.time() - killed
            except redis.RedisError:
                time.sleep(0.01)
    finally:
        for node in nodes:
            node.stop()
        etcd.kill()
        etcd.wait()
        shutil.rmtree(root, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=".build/release/stockade")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--etcd", action="store_true", help="also measure automatic failover with a real etcd")
    a = parser.parse_args()
    if a.etcd:
        times = [failover_with_etcd(a.binary) for _ in range(a.rounds)]
        print("automatic failover, kill -9 to the next acknowledged change (lease 2 s): "
              + ", ".join(f"{t:.2f} s" for t in times) + f"; median {statistics.median(times):.2f} s", flush=True)
    modes = ["primary alone", "asynchronous replica", "semi-synchronous"]
    results = {m: [] for m in modes}
    for round_ in range(a.rounds):
        for mode in modes:
            r = run_mode(a.binary, mode, a.seconds)
            results[mode].append(r)
            print(f"round {round_ + 1} {mode}: {r['rate']:,.0f} RESERVE/s", flush=True)
    base = statistics.median(r["rate"] for r in results["primary alone"])
    print("\n| setup | durable RESERVE/s (median) | ratio to the primary alone | replica lag: median / max records | median / max ms | promotion after kill -9 (median) |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        rate = statistics.median(r["rate"] for r in results[mode])
        lags = [l for r in results[mode] for l in r["lags"]]
        lag = (f"{statistics.median(l[0] for l in lags):.0f} / {max(l[0] for l in lags)}",
               f"{statistics.median(l[1] for l in lags):.0f} / {max(l[1] for l in lags)}") if lags else ("", "")
        promo = [r["promotion_ms"] for r in results[mode] if "promotion_ms" in r]
        promo_text = f"{statistics.median(promo):.0f} ms" if promo else ""
        print(f"| {mode} | {rate:,.0f} | x{rate / base:.2f} | {lag[0]} | {lag[1]} | {promo_text} |")


if __name__ == "__main__":
    main()
