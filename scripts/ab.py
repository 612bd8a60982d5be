#!/usr/bin/env python3
"""Two Stockade binaries side by side in one sitting: redis-benchmark figures, alternating, medians.

Usage: python3 scripts/ab.py OLD_BINARY NEW_BINARY [--rounds 3]
Each round starts a fresh server per binary (fsync always, a new data directory, a free loopback port)
and runs: RESERVE -P 16 and -P 1 on a stocked SKU, DEDUCT -P 16 on a sold-out SKU, PING -P 16.
Prints requests per second per binary (median of the rounds) and the ratio NEW / OLD.
"""
import argparse
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

TESTS = [
    ("RESERVE -P16", 16, 300_000, ["RESERVE", "user:__rand_int__", "tee", "1", "TTL", "600000"]),
    ("RESERVE -P1", 1, 60_000, ["RESERVE", "user:__rand_int__", "tee", "1", "TTL", "600000"]),
    ("DEDUCT sold out -P16", 16, 500_000, ["DEDUCT", "gone"]),
    ("PING -P16", 16, 500_000, ["PING"]),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(binary):
    port = free_port()
    directory = tempfile.mkdtemp(prefix="ab-")
    proc = subprocess.Popen([binary, "serve", "--port", str(port), "--data-dir", directory + "/d"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    subprocess.run(["redis-cli", "-p", str(port), "SKU.ADD", "tee", "100000000"], check=True, capture_output=True)
    subprocess.run(["redis-cli", "-p", str(port), "SKU.ADD", "gone", "0"], check=True, capture_output=True)
    return proc, port, directory


def bench(port, pipeline, requests, command):
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-P", str(pipeline), "-n", str(requests),
                          "-r", "1000000", "-q", *command], capture_output=True, text=True, timeout=600).stdout
    match = re.findall(r"([0-9.]+) requests per second", out)
    return float(match[-1]) if match else 0.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = {(b, t[0]): [] for b in ("old", "new") for t in TESTS}
    for _ in range(args.rounds):
        for label, binary in (("old", args.old), ("new", args.new)):
            proc, port, directory = run_server(binary)
            try:
                for name, pipeline, requests, command in TESTS:
                    results[(label, name)].append(bench(port, pipeline, requests, command))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
                shutil.rmtree(directory, ignore_errors=True)
    print(f"| measurement | old | new | new / old |")
    print("|---|---|---|---|")
    for name, *_ in TESTS:
        old = statistics.median(results[("old", name)])
        new = statistics.median(results[("new", name)])
        print(f"| {name} | {old / 1000:.0f}k/s | {new / 1000:.0f}k/s | x{new / old if old else 0:.2f} |")


if __name__ == "__main__":
    main()
