#!/usr/bin/env python3
"""Two Stockade binaries side by side in one sitting: redis-benchmark figures, alternating, medians.

Usage: python3 scripts/ab.py OLD_BINARY NEW_BINARY [--rounds 3] [--scale 1] [--only RESERVE] [--serve-arg=--io-threads=1]
Each round starts a fresh server per binary (fsync always, a new data directory, a free loopback port)
and runs: RESERVE -P 16 and -P 1 on a stocked SKU, DEDUCT -P 16 on a sold-out SKU, PING -P 16, and RESERVE
-P 16 on a sold-out SKU (with compare.py's client: redis-benchmark stops at an error reply).
Prints requests per second, p99 and the server's CPU time per request (user + system, from /proc) per
binary (medians of the rounds, and each round's figure) and the ratio NEW / OLD. `--scale` multiplies the request counts (longer runs); `--only` keeps the
measurements whose name contains it; each `--serve-arg` is passed to `stockade serve`.
"""
import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

TESTS = [
    ("RESERVE -P16", 16, 300_000, ["RESERVE", "user:__rand_int__", "tee", "1", "TTL", "600000"]),
    ("RESERVE -P1", 1, 60_000, ["RESERVE", "user:__rand_int__", "tee", "1", "TTL", "600000"]),
    ("DEDUCT sold out -P16", 16, 500_000, ["DEDUCT", "gone"]),
    ("PING -P16", 16, 500_000, ["PING"]),
    # redis-benchmark stops at the first error reply: compare.py's own client drives this one.
    ("RESERVE sold out -P16 (compare.py's client)", 16, 500_000, ["RESERVE", "user:1", "gone", "1"]),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(binary, serve_args):
    port = free_port()
    directory = tempfile.mkdtemp(prefix="ab-")
    proc = subprocess.Popen([binary, "serve", "--port", str(port), "--data-dir", directory + "/d", *serve_args],
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


class Server:
    """What compare.py's client needs of a server: its name, port and CPU."""

    def __init__(self, proc, port):
        self.name, self.port, self.p = "stockade", port, proc

    def cpu_seconds(self):
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_client(proc, port, pipeline, requests, command):
    """compare.py's pipelined client, which takes error replies as replies: requests/s and p99 in ms."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compare
    result = compare.pipelined_load(Server(proc, port), pipeline, requests, command, b"-")
    return result["rps"], result["p99"]


def bench(port, pipeline, requests, command):
    """Requests per second and p99 in ms (redis-benchmark's CSV line); zeros if it printed none."""
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-P", str(pipeline), "-n", str(requests),
                          "-r", "100000000", "--csv", *command], capture_output=True, text=True, timeout=600).stdout
    rows = [line for line in out.splitlines() if line.startswith('"') and not line.startswith('"test"')]
    if not rows:
        return 0.0, 0.0
    fields = [f.strip('"') for f in rows[-1].split(",")]
    return float(fields[1]), float(fields[6])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--only", default="")
    parser.add_argument("--serve-arg", action="append", default=[])
    args = parser.parse_args()
    tests = [t for t in TESTS if args.only in t[0]]
    results = {(b, t[0]): [] for b in ("old", "new") for t in tests}
    for _ in range(args.rounds):
        for label, binary in (("old", args.old), ("new", args.new)):
            proc, port, directory = run_server(binary, [a for arg in args.serve_arg for a in arg.split("=", 1)])
            try:
                server = Server(proc, port)
                for name, pipeline, requests, command in tests:
                    n = int(requests * args.scale)
                    cpu_before = server.cpu_seconds()
                    rps, p99 = own_client(proc, port, pipeline, n, command) if "compare.py" in name else bench(port, pipeline, n, command)
                    results[(label, name)].append((rps, p99, (server.cpu_seconds() - cpu_before) * 1e6 / n))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
                shutil.rmtree(directory, ignore_errors=True)
    print("| measurement | old (rounds) | new (rounds) | new / old | p99 old | p99 new | server CPU per request, old | new |")
    print("|---|---|---|---|---|---|---|---|")
    for name, *_ in tests:
        old, new = results[("old", name)], results[("new", name)]
        old_rps, new_rps = statistics.median(r[0] for r in old), statistics.median(r[0] for r in new)
        each = lambda runs: " / ".join(f"{r[0] / 1000:.0f}k" for r in runs)
        cpu = lambda runs: " / ".join(f"{r[2]:.2f}" for r in runs) + f" us (median {statistics.median(r[2] for r in runs):.2f})"
        print(f"| {name} | {old_rps / 1000:.0f}k/s ({each(old)}) | {new_rps / 1000:.0f}k/s ({each(new)}) "
              f"| x{new_rps / old_rps if old_rps else 0:.2f} | {statistics.median(r[1] for r in old):.2f} ms "
              f"| {statistics.median(r[1] for r in new):.2f} ms | {cpu(old)} | {cpu(new)} |")


if __name__ == "__main__":
    main()
