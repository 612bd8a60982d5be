#!/usr/bin/env python3
"""How long a PING waits on a server's loop while another client loads it: sends one PING at a time
(0.5 ms apart) for SECONDS and prints p50, p99 and the longest wait.

Usage: python3 scripts/stall/ping_wait.py PORT SECONDS
Run it beside scripts/stall/heavy_loop.py against a server with `--io-threads 1` (BENCHMARKS.md, "An
AUDIT of every SKU, and ORDERS of a user with many orders, beside other clients").
"""
import socket
import sys
import time

port, seconds = int(sys.argv[1]), float(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
waits = []
end = time.time() + seconds
while time.time() < end:
    started = time.perf_counter()
    s.sendall(b"PING\r\n")
    assert s.recv(100) == b"+PONG\r\n"
    waits.append(time.perf_counter() - started)
    time.sleep(0.0005)
waits.sort()
print("pings %d p50 %.2f ms p99 %.2f ms max %.2f ms" % (
    len(waits), waits[len(waits) // 2] * 1e3, waits[int(len(waits) * .99)] * 1e3, waits[-1] * 1e3))
