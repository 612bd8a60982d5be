#!/usr/bin/env python3
"""What an EVENTS at the end of the log costs as the open segment grows: a consumer that keeps up reads
one new event at a time. Starts `stockade serve` (the binary given) on a new data directory, adds
RESERVEs with redis-benchmark in steps, and after each step times `EVENTS <last> COUNT 1` (and the
same from the segment's middle and its start), medians of 21, one connection, loopback.

    python3 scripts/events_tail.py .build/release/stockade [--steps 3] [--per-step 300000] [--pipeline 16]

At pipeline 1 each group commit holds few records, so a segment holds many more blocks for as many
records than at pipeline 16.
"""
import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--per-step", type=int, default=300_000)
    parser.add_argument("--pipeline", type=int, default=16)
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="stockade-events-tail-")
    port = free_port()
    server = subprocess.Popen([args.binary, "serve", "--port", str(port), "--data-dir", os.path.join(data, "d")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                s = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)

        def ask(request):
            started = time.monotonic()
            s.sendall(request + b"PING\r\n")
            data = b""
            while not data.endswith(b"+PONG\r\n"):
                data += s.recv(1 << 20)
            return (time.monotonic() - started) * 1000, data

        ask(b"SKU.ADD s 1000000000\r\n")
        for step in range(args.steps):
            subprocess.run(["redis-benchmark", "-p", str(port), "-c", "50", "-P", str(args.pipeline), "-n", str(args.per_step),
                            "-r", "100000000", "-q", "RESERVE", "user:__rand_int__", "s", "1", "TTL", "600000"],
                           check=True, stdout=subprocess.DEVNULL)
            info = ask(b"INFO replication\r\n")[1]
            last = int(info.split(b"master_repl_offset:")[1].split(b"\r\n")[0])
            row = []
            for position in (1, last // 2, last):
                times = [ask(b"EVENTS %d COUNT 1\r\n" % position)[0] for _ in range(21)]
                row.append(f"from {position}: first {times[0]:.2f} ms, median {statistics.median(times):.2f} ms")
            print(f"{last} records: " + "; ".join(row), flush=True)
    finally:
        server.terminate()
        server.wait()
        subprocess.run(["rm", "-rf", data])


if __name__ == "__main__":
    main()
