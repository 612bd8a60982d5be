#!/usr/bin/env python3
"""Server memory with many idle clients that each hold part of a request, for one binary.

Usage: python3 scripts/idle_partial_memory.py BINARY CLIENTS [--mode partial|remainder|choose] [--port P] [-- SERVE_ARGS...]

  partial    each client sends 0.9 MB of a 1 MiB request (ECHO with two 512 KiB arguments) and goes idle:
             what --max-partial-request-bytes bounds
  remainder  each client sends a whole 200 KB ECHO plus the first bytes of a PING, reads the ECHO's
             reply and goes idle: what moving a small remainder out of a large read buffer saves
  choose     (--max-request-bytes 1 MiB, --max-partial-request-bytes 32 MiB) each client goes idle a few
             bytes into an ECHO (its 2 KiB read buffer held: up to 10,000 clients fit); then 34 newer
             clients each send 0.9 MB of a 1 MiB request, which take the total over the bound, so
             every idle client is refused at once (the oldest first): prints how long until they are
             all gone, the server CPU it took, and the longest PING round trip from another
             connection meanwhile (every 2 ms)

Starts the server in a temporary directory (snapshots off), prints its VmRSS and VmHWM after the clients
are idle, INFO's partial_request_bytes and partial_request_refusals (a dash on builds without them),
how many clients the server closed, and one PING's round trip from another connection.
"""
import argparse
import os
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("binary")
parser.add_argument("clients", type=int)
parser.add_argument("--mode", choices=["partial", "remainder", "choose"], default="partial")
parser.add_argument("--port", type=int, default=7411)
parser.add_argument("serve_args", nargs="*")
args = parser.parse_args()
# A descriptor per client (the server's own limit is its `ulimit -n`).
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.clients + 100)), hard))

data = tempfile.mkdtemp(prefix="idle-partial-")
limits = ["--max-request-bytes", str(1 << 20), "--max-bulk-bytes", str(1 << 20),
          "--max-partial-request-bytes", str(32 << 20)] if args.mode == "choose" else []
server = subprocess.Popen([args.binary, "serve", "--port", str(args.port), "--data-dir", data + "/d",
                           "--snapshot-every-changes", "0", "--snapshot-every-seconds", "0", *limits, *args.serve_args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    time.sleep(2)

    def memory():
        with open(f"/proc/{server.pid}/status") as f:
            text = f.read()
        return tuple(int(re.search(rf"{k}:\s+(\d+)", text).group(1)) // 1024 for k in ("VmRSS", "VmHWM"))

    def info():
        out = subprocess.run(["redis-cli", "-p", str(args.port), "INFO"], capture_output=True, text=True).stdout
        return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)

    def cpu_seconds():
        with open(f"/proc/{server.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    if args.mode == "choose":
        idle = []
        for _ in range(args.clients):
            c = socket.create_connection(("127.0.0.1", args.port))
            c.sendall(b"*2\r\n$4\r\nECHO\r\n$10\r\nab")
            idle.append(c)
        time.sleep(1)
        before = info()
        held, refused_before = before["partial_request_bytes"], int(before["partial_request_refusals"])
        assert refused_before == 0, "the idle clients alone passed the bound: fewer clients"
        worst, done = [0.0], threading.Event()

        def pinger():
            p = socket.create_connection(("127.0.0.1", args.port))
            while not done.is_set():
                started = time.perf_counter()
                p.sendall(b"PING\r\n")
                p.recv(16)
                worst[0] = max(worst[0], time.perf_counter() - started)
                time.sleep(0.002)
        thread = threading.Thread(target=pinger)
        thread.start()
        time.sleep(0.5)
        started, cpu_before = time.perf_counter(), cpu_seconds()
        pushers = []
        for _ in range(34):
            c = socket.create_connection(("127.0.0.1", args.port))
            c.sendall(b"*2\r\n$4\r\nECHO\r\n$1000000\r\n" + b"x" * 900_000)
            pushers.append(c)
        while int(info()["partial_request_refusals"]) < args.clients and time.perf_counter() - started < 60:
            time.sleep(0.01)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_before
        time.sleep(0.3)
        done.set()
        thread.join()
        fields = info()
        print(f"{os.path.basename(args.binary)} mode=choose clients={args.clients} held_before={held} "
              f"refused={fields['partial_request_refusals']} all_refused_after={elapsed * 1000:.0f}ms "
              f"server_cpu={cpu:.2f}s ping_max={worst[0] * 1000:.1f}ms")
        raise SystemExit(0)

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
