#!/usr/bin/env python3
"""The first change on a fresh server, while another connection PINGs: the stall of the log's first zeros.

A new log segment's first batch writes the zeros ahead (`--log-preallocate-bytes`, 1 MiB by default) and
its sync takes them to the disk, so the first change after start-up (and after each new segment) waits
for them, and so does every client of the loop that syncs. This starts BINARY on a free loopback port
in a temporary directory (extra arguments go to `serve`), PINGs from a second connection every 0.5 ms,
times the first SKU.ADD and a second one, and prints both, the longest PING wait and INFO's
`log_fsync_max_ms`. ROUNDS fresh servers (default 3).

Usage: python3 scripts/first_change.py BINARY [--rounds 3] [-- serve arguments...]
  python3 scripts/first_change.py .build/release/stockade -- --io-threads 1 --log-preallocate-bytes 4194304
"""
import argparse
import shutil
import socket
import subprocess
import tempfile
import threading
import time


def command(sock, line):
    sock.sendall(line)
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        reply += chunk
    return reply


def round_once(binary, serve_args):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = tempfile.mkdtemp(prefix="first-change-")
    proc = subprocess.Popen([binary, "serve", "--port", str(port), "--data-dir", directory + "/d", *serve_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                main = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the server did not start")
                time.sleep(0.05)
        subprocess.run(["sync"])
        waits, stop = [], threading.Event()

        def pinger():
            with socket.create_connection(("127.0.0.1", port)) as s:
                while not stop.is_set():
                    start = time.perf_counter()
                    command(s, b"PING\r\n")
                    waits.append(time.perf_counter() - start)
                    time.sleep(0.0005)

        thread = threading.Thread(target=pinger)
        thread.start()
        time.sleep(0.2)
        start = time.perf_counter()
        command(main, b"SKU.ADD a 10\r\n")
        first = time.perf_counter() - start
        time.sleep(0.1)
        start = time.perf_counter()
        command(main, b"SKU.ADD b 10\r\n")
        second = time.perf_counter() - start
        time.sleep(0.2)
        stop.set()
        thread.join()
        main.sendall(b"INFO persistence\r\n")
        time.sleep(0.1)
        info = main.recv(65536).decode(errors="replace")
        fsync_max = next((line.split(":")[1].strip() for line in info.splitlines() if line.startswith("log_fsync_max_ms:")), "?")
        main.close()
        return first * 1000, second * 1000, max(waits) * 1000, fsync_max
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("serve_args", nargs="*")
    args = parser.parse_args()
    for _ in range(args.rounds):
        first, second, ping, fsync_max = round_once(args.binary, args.serve_args)
        print(f"first change {first:.1f} ms, second {second:.1f} ms; longest PING wait {ping:.1f} ms; "
              f"log_fsync_max_ms {fsync_max}", flush=True)


if __name__ == "__main__":
    main()
