#!/usr/bin/env python3
"""Sends one heavy command COUNT times, back to back, each followed by a PING, and reads each reply
whole; prints the median time of one. The command: `AUDIT` (every SKU) or `ORDERS USER COUNT 10`.

Usage: python3 scripts/stall/heavy_loop.py PORT COUNT audit
       python3 scripts/stall/heavy_loop.py PORT COUNT orders USER
Beside scripts/stall/ping_wait.py (BENCHMARKS.md, "An AUDIT of every SKU, and ORDERS of a user with
many orders, beside other clients"). SKUs for an AUDIT: `redis-cli -p PORT --pipe` of SKU.ADD
commands; orders of one user: `redis-benchmark -p PORT -c 20 -P 16 -n 1000000 RESERVE guest big 1 TTL
600000000` after `SKU.ADD big 100000000`.
"""
import socket
import sys
import time

port, count, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
command = b"AUDIT\r\n" if kind == "audit" else b"ORDERS %s COUNT 10\r\n" % sys.argv[4].encode()
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)


def once():
    s.sendall(command + b"PING\r\n")
    data = bytearray()
    while not data.endswith(b"+PONG\r\n"):
        chunk = s.recv(1 << 22)
        assert chunk, "closed"
        data += chunk
    return len(data) - len(b"+PONG\r\n")


reply_bytes = once()
times = []
for _ in range(count):
    started = time.perf_counter()
    once()
    times.append(time.perf_counter() - started)
print("%s: reply %d bytes, %d times, median %.1f ms" % (kind, reply_bytes, count, sorted(times)[count // 2] * 1e3))
