#!/usr/bin/env python3
"""Server memory with many idle clients that each hold part of a request, for one binary.

Usage: python3 scripts/idle_partial_memory.py BINARY CLIENTS [--mode partial|remainder] [--port P] [-- SERVE_ARGS...]

  partial    each client sends 0.9 MB of a 1 MiB request (ECHO with two 512 KiB arguments) and goes idle:
             what --max-partial-request-bytes bounds
  remainder  each client sends a whole 200 KB ECHO plus the first bytes of a PING, reads the ECHO's
             reply and goes idle: what moving a small remainder out of a large read buffer saves

Starts the server in a temporary directory (snapshots off), prints its VmRSS and VmHWM after the clients
are idle, INFO's partial_request_bytes and partial_request_refusals (a dash on builds without them),
how many clients the server closed, and one PING's round trip from another connection.
"""
import argparse
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

parser = argparse.ArgumentParser()
parser.add_argument("binary")
parser.add_argument("clients", type=int)
parser.add_argument("--mode", choices=["partial", "remainder"], default="partial")
parser.add_argument("--port", type=int, default=7411)
parser.add_argument("serve_args", nargs="*")
args = parser.parse_args()

data = tempfile.mkdtemp(prefix="idle-partial-")
server = subprocess.Popen([args.binary, "serve", "--port", str(args.port), "--data-dir", data + "/d",
                           "--snapshot-every-changes", "0", "--snapshot-every-seconds", "0", *args.serve_args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    time.sleep(2)

    def memory():
        with open(f"/proc/{server.pid}/status") as f:
            text = f.read()
        return tuple(int(re.search(rf"{k}:\s+(\d+)", text).group(1)) // 1024 for k in ("VmRSS", "VmHWM"))

    socks = []
    for _ in range(args.clients):
        c = socket.create_connection(("127.0.0.1", args.port))
        if args.mode == "partial":
            c.sendall(b"*4\r\n$4\r\nECHO\r\n$524288\r\n" + b"a" * 524288 + b"\r\n$524288\r\n" + b"b" * 400000)
        else:
            c.sendall(b"*2\r\n$4\r\nECHO\r\n$200000\r\n" + b"z" * 200000 + b"\r\n*1\r\n$4\r\nPI")
            got = 0
            while got < 200011:
                got += len(c.recv(1 << 20))
        socks.append(c)
    time.sleep(3)
    info = subprocess.run(["redis-cli", "-p", str(args.port), "INFO"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    closed = 0
    for c in socks:
        c.setblocking(False)
        try:
            c.recv(100)
            closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    started = time.perf_counter()
    subprocess.run(["redis-cli", "-p", str(args.port), "PING"], capture_output=True)
    ping_ms = (time.perf_counter() - started) * 1000
    rss, hwm = memory()
    print(f"{os.path.basename(args.binary)} mode={args.mode} clients={args.clients} rss={rss}MiB hwm={hwm}MiB "
          f"partial_request_bytes={fields.get('partial_request_bytes', '-')} "
          f"partial_request_refusals={fields.get('partial_request_refusals', '-')} closed={closed} ping={ping_ms:.1f}ms")
finally:
    server.terminate()
    server.wait()
    shutil.rmtree(data, ignore_errors=True)
