#!/usr/bin/env python3
"""Stockade against Redis + Lua and against a bare SwiftNIO server, in one sitting; prints BENCHMARKS.md tables.

Starts its own servers on free loopback ports: Stockade with `--fsync always`; Redis with no persistence
and with `appendfsync always`; and `stockade-ceiling` (Sources/stockade-ceiling: per read, one `+PONG` per
complete command, one flush), the most a SwiftNIO server answers on this machine. Every measurement runs
ROUNDS times in rotation; the tables give medians and the ratios that issue #8 sets goals for, each with
its goal and whether it is met:

  durable RESERVE -P16      / Redis EVALSHA, plain script (scripts/stock_plain.lua), appendfsync always  >= 3.0
  durable RESERVE -P16      / the same, no persistence                                                  >= 1.5
  RESERVE -P16, SKU LIMIT   / Redis EVALSHA, per-user-limit script (scripts/stock.lua), both settings   >= 3.0, 1.5
  durable DEDUCT -P16       / plain script, appendfsync always                                          >= 3.0
  durable RESERVE -P1       / Redis PING_INLINE -P1                                                     >= 0.9
  durable RESERVE -P1 p99                                                                               <= 1 ms
  PING -P16                 / ceiling PING -P16                                                         >= 0.95
  sold-out DEDUCT, RESERVE -P16 / ceiling PING -P16                                                     >= 0.9

All with 50 connections. redis-benchmark 7.0.15 exits at the first error reply, so the sold-out RESERVE
(`-SOLDOUT`) is driven by this script's own pipelined client (`pipelined_load`), and its ratio is taken
against the ceiling's PING driven by that same client. Two rows put the pipeline-1 latency goal in context
(no goal of their own): Redis's plain script at -P1 with `appendfsync always` (what a durable Redis gives at
that depth on this disk), and Stockade with `--io-threads 1` (one event loop: when the load client shares the
machine's two cores, two loops and the client compete for them, which shows in the tail). A context table
(no goals of its own) gives what each miss runs into: the ceiling at -P1 against Redis's PING_INLINE (what a
SwiftNIO server that does nothing answers at pipeline 1), with both p99s, and a third Stockade, one loop with
`--fsync none`, at -P16 and -P1 (what the durable rows would give if a sync cost nothing). Then the harness
rows (`stockade bench sustained`) and the sellout audit, as before.

With `--one-loop`, every Stockade measurement of the goals is also made on the `--io-threads 1` server, each
right after the default server's, and a second goals table gives them: one loop runs every shard, so no
request crosses to another thread (no hop to a shard's loop, no hand-off of records to the log's thread),
and what that table misses is not a hand-off.

Usage: python3 scripts/compare.py [--rounds 3] [--quick] [--one-loop] [--stockade PATH] [--ceiling PATH] [--out results.json]
Needs: a release `stockade` (make release), redis-server, redis-benchmark; builds `stockade-ceiling`
(swift build -c release --product stockade-ceiling) unless --ceiling names one. Tables go to stdout,
progress to stderr.
"""
import argparse
import csv
import io
import json
import math
import os
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOCKADE = os.environ.get("STOCKADE_BIN", os.path.join(ROOT, ".build", "release", "stockade"))
CONNECTIONS = 50
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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
            if self.p.poll() is not None:
                raise RuntimeError(f"{name} exited with status {self.p.returncode} at start: {' '.join(args)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{name} did not start")

    def cpu_seconds(self):
        """User + system CPU of the server process (all its threads) so far."""
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def stockade_proc(port, name="stockade", extra=(), fsync="always"):
    return Proc(name, [STOCKADE, "serve", "--port", str(port), "--data-dir", "{dir}", "--fsync", fsync,
                       "--snapshot-every-changes", "0", "--snapshot-every-seconds", "0", *extra], port)


def start_all(names=("stockade", "redis-nopersist", "redis-always"), ceiling=None):
    """The servers by name (latency_curve.py uses the three default ones); `ceiling` is the binary's path."""
    servers = {}
    try:
        for name in names:
            port = free_port()
            if name == "stockade":
                servers[name] = stockade_proc(port)
            elif name == "stockade-1loop":
                # One event loop: on a machine whose cores the load client shares, fewer threads compete.
                servers[name] = stockade_proc(port, name, ("--io-threads", "1"))
            elif name == "stockade-nosync":
                # One loop and no sync: what the durable rows would give if a sync cost nothing.
                servers[name] = stockade_proc(port, name, ("--io-threads", "1"), fsync="none")
            elif name == "redis-nopersist":
                servers[name] = Proc(name, ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                                            "--dir", "{dir}"], port)
            elif name == "redis-always":
                servers[name] = Proc(name, ["redis-server", "--port", str(port), "--save", "", "--appendonly", "yes",
                                            "--appendfsync", "always", "--dir", "{dir}"], port)
            elif name == "ceiling":
                servers[name] = Proc(name, [ceiling, "--port", str(port)], port)
            else:
                raise ValueError(name)
    except BaseException:
        for p in servers.values():
            p.stop()
        raise
    return servers


def build_ceiling():
    subprocess.run(["swift", "build", "-c", "release", "--product", "stockade-ceiling"], cwd=ROOT, check=True,
                   stdout=sys.stderr)
    bin_dir = subprocess.run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
    return os.path.join(bin_dir, "stockade-ceiling")


def harness(target, *args):
    out = subprocess.run([STOCKADE, "bench", *map(str, args), "--target", target, "--json"], capture_output=True, text=True,
                         timeout=600)
    if not out.stdout.strip():
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def url(name, p):
    return f"{'stockade' if name == 'stockade' else 'redis'}://127.0.0.1:{p.port}"


def child_cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def redis_benchmark(server, pipeline, n, *command, tests=None):
    """redis-benchmark -c 50 against `server`: rps, p50 and p99 in ms (its CSV), server and client CPU.

    `command` is a custom command; `tests` a -t list instead (e.g. "ping_inline"). None if it failed
    (7.0.15 exits at the first error reply).
    """
    args = ["redis-benchmark", "-p", str(server.port), "-c", str(CONNECTIONS), "-P", str(pipeline), "-n", str(n),
            "-r", "100000000", "--csv"]
    args += ["-t", tests] if tests else list(command)
    server_before, client_before, start = server.cpu_seconds(), child_cpu_seconds(), time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    server_cpu, client_cpu = server.cpu_seconds() - server_before, child_cpu_seconds() - client_before
    rows = [r for r in csv.reader(io.StringIO(out.stdout)) if r and r[0] != "test"]
    if out.returncode != 0 or not rows:
        print(f"  redis-benchmark failed ({' '.join(args[1:])}): {(out.stdout + out.stderr).strip()[-300:]}", file=sys.stderr)
        return None
    row = rows[-1]
    return {"rps": float(row[1]), "p50": float(row[4]), "p99": float(row[6]), "client": "redis-benchmark",
            "serverMicrosPerRequest": server_cpu * 1e6 / n, "clientCPU": client_cpu / elapsed}


def resp(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def pipelined_load(server, pipeline, n, command, expect):
    """A closed-loop client like redis-benchmark's (50 connections, `pipeline` commands a write, the next
    write once all replies are in) that, unlike redis-benchmark, takes error replies as replies.

    Counts single-line replies only (`+..`, `-..`, `:..`): every reply must start with `expect`, checked on
    the first read of each connection. Latency is per pipelined batch, from its write to its last reply.
    """
    batch = resp(*command) * pipeline
    batches_left = n // pipeline
    selector = selectors.DefaultSelector()
    conns = []
    for _ in range(CONNECTIONS):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(s)
    # Per connection: replies counted in this batch, the batch's start, whether the last read ended in \r,
    # whether its first reply was checked.
    state = {}
    latencies = []
    server_before, self_before = server.cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for s in conns:
        if batches_left == 0:
            break
        batches_left -= 1
        state[s] = [0, time.perf_counter(), False, False]
        s.sendall(batch)
        selector.register(s, selectors.EVENT_READ)
    in_flight, done = len(state), 0
    try:
        while in_flight:
            events = selector.select(timeout=30)
            if not events:
                raise RuntimeError(f"{server.name} answered nothing for 30 s during {command[0]}")
            for key, _ in events:
                s = key.fileobj
                data = s.recv(1 << 16)
                if not data:
                    raise RuntimeError(f"{server.name} closed a connection during {command[0]}")
                st = state[s]
                if not st[3]:
                    if not data.startswith(expect):
                        raise RuntimeError(f"{server.name} answered {command[0]} with {data[:60]!r}, expected {expect!r}")
                    st[3] = True
                st[0] += data.count(b"\r\n") + (1 if st[2] and data[:1] == b"\n" else 0)
                st[2] = data[-1:] == b"\r"
                if st[0] >= pipeline:
                    now = time.perf_counter()
                    latencies.append(now - st[1])
                    done += pipeline
                    if batches_left:
                        batches_left -= 1
                        st[0], st[1] = 0, now
                        s.sendall(batch)
                    else:
                        selector.unregister(s)
                        in_flight -= 1
    finally:
        for s in conns:
            s.close()
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()
    client_cpu = (after.ru_utime - self_before.ru_utime) + (after.ru_stime - self_before.ru_stime)
    return {"rps": done / elapsed, "p50": latencies[len(latencies) // 2] * 1000,
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, "client": "compare.py",
            "serverMicrosPerRequest": (server.cpu_seconds() - server_before) * 1e6 / done, "clientCPU": client_cpu / elapsed}


def cli(server, *args):
    out = subprocess.run(["redis-cli", "-p", str(server.port), *map(str, args)], capture_output=True, text=True)
    reply = out.stdout.strip()
    if out.returncode != 0 or reply.startswith(("ERR", "(error)")):
        raise RuntimeError(f"{server.name}: {' '.join(map(str, args))} -> {reply} {out.stderr.strip()}")
    return reply


# Per-user limit for the limit rows: never reached (so every request is a sale), yet the work is done:
# Redis's HGET + HINCRBY, Stockade's per-(user, SKU) counter.
LIMIT = 1_000_000
HUGE_STOCK = 1_000_000_000_000

# The measurements: key, what it is, and (for the tables) which ones each goal divides.
LABELS = {
    "stockade/RESERVE/P16": "Stockade RESERVE -P16 (fsync always)",
    "stockade/RESERVE-limit/P16": f"Stockade RESERVE -P16, SKU with LIMIT {LIMIT:,} (fsync always)",
    "stockade/DEDUCT/P16": "Stockade DEDUCT -P16 (fsync always)",
    "stockade/RESERVE/P1": "Stockade RESERVE -P1 (fsync always)",
    "stockade-1loop/RESERVE/P1": "Stockade RESERVE -P1 (fsync always), --io-threads 1",
    "stockade/PING/P16": "Stockade PING -P16",
    "stockade/soldout-DEDUCT/P16": "Stockade DEDUCT on a sold-out SKU -P16",
    "stockade/soldout-RESERVE/P16/own": "Stockade RESERVE on a sold-out SKU -P16 (compare.py's client)",
    "stockade/soldout-DEDUCT/P16/own": "Stockade DEDUCT on a sold-out SKU -P16 (compare.py's client)",
    "ceiling/PING/P16": "ceiling PING -P16",
    "ceiling/PING/P16/own": "ceiling PING -P16 (compare.py's client)",
    "redis-always/plain/P16": "Redis EVALSHA plain script -P16, appendfsync always",
    "redis-nopersist/plain/P16": "Redis EVALSHA plain script -P16, no persistence",
    "redis-always/limit/P16": f"Redis EVALSHA limit script (limit {LIMIT:,}) -P16, appendfsync always",
    "redis-nopersist/limit/P16": f"Redis EVALSHA limit script (limit {LIMIT:,}) -P16, no persistence",
    "redis-nopersist/PING_INLINE/P1": "Redis PING_INLINE -P1",
    "redis-always/plain/P1": "Redis EVALSHA plain script -P1, appendfsync always",
    "ceiling/PING_INLINE/P1": "ceiling PING_INLINE -P1",
    "stockade-nosync/RESERVE/P16": "Stockade RESERVE -P16, --fsync none, --io-threads 1",
    "stockade-nosync/RESERVE/P1": "Stockade RESERVE -P1, --fsync none, --io-threads 1",
}

# (figure, numerator, denominator, goal): a ratio numerator / denominator of at least `goal`; with no
# denominator, the numerator's p99 in ms of at most `goal`.
GOALS = [
    ("durable RESERVE -P16 vs Redis EVALSHA plain script, appendfsync always",
     "stockade/RESERVE/P16", "redis-always/plain/P16", 3.0),
    ("durable RESERVE -P16 vs the plain script, no persistence",
     "stockade/RESERVE/P16", "redis-nopersist/plain/P16", 1.5),
    ("durable RESERVE -P16 with a per-user limit vs the limit script, appendfsync always",
     "stockade/RESERVE-limit/P16", "redis-always/limit/P16", 3.0),
    ("durable RESERVE -P16 with a per-user limit vs the limit script, no persistence",
     "stockade/RESERVE-limit/P16", "redis-nopersist/limit/P16", 1.5),
    ("durable DEDUCT -P16 vs the plain script, appendfsync always",
     "stockade/DEDUCT/P16", "redis-always/plain/P16", 3.0),
    ("durable RESERVE -P1 vs Redis PING_INLINE -P1",
     "stockade/RESERVE/P1", "redis-nopersist/PING_INLINE/P1", 0.9),
    ("durable RESERVE -P1, p99", "stockade/RESERVE/P1", None, 1.0),
    ("PING -P16 vs the ceiling", "stockade/PING/P16", "ceiling/PING/P16", 0.95),
    ("sold-out DEDUCT -P16 vs the ceiling", "stockade/soldout-DEDUCT/P16", "ceiling/PING/P16", 0.9),
    ("sold-out RESERVE -P16 vs the ceiling (compare.py's client for both)",
     "stockade/soldout-RESERVE/P16/own", "ceiling/PING/P16/own", 0.9),
]


# Context for the misses, no goals of their own (figure, numerator, denominator; no denominator: a p99):
# what SwiftNIO itself answers at pipeline 1 against Redis, and what the durable rows would give if a
# sync cost nothing (one loop, `--fsync none`), so that each sitting shows which limit a miss meets.
CONTEXT = [
    ("ceiling PING_INLINE -P1 vs Redis PING_INLINE -P1 (a SwiftNIO server that does nothing, at pipeline 1)",
     "ceiling/PING_INLINE/P1", "redis-nopersist/PING_INLINE/P1"),
    ("ceiling PING_INLINE -P1, p99", "ceiling/PING_INLINE/P1", None),
    ("Redis PING_INLINE -P1, p99", "redis-nopersist/PING_INLINE/P1", None),
    ("RESERVE -P1, no sync, one loop, vs Redis PING_INLINE -P1", "stockade-nosync/RESERVE/P1", "redis-nopersist/PING_INLINE/P1"),
    ("RESERVE -P1, no sync, one loop, p99", "stockade-nosync/RESERVE/P1", None),
    ("RESERVE -P16, no sync, one loop, vs the plain script, appendfsync always",
     "stockade-nosync/RESERVE/P16", "redis-always/plain/P16"),
    ("RESERVE -P16, no sync, one loop, vs the plain script, no persistence",
     "stockade-nosync/RESERVE/P16", "redis-nopersist/plain/P16"),
    ("durable RESERVE -P16, one loop, vs the same without sync (what the syncs leave)",
     "stockade-1loop/RESERVE/P16", "stockade-nosync/RESERVE/P16"),
]


# The Stockade measurements that goals divide, made on the one-loop server too with `--one-loop`.
ONE_LOOP_KEYS = ["stockade/RESERVE/P16", "stockade/RESERVE-limit/P16", "stockade/DEDUCT/P16", "stockade/PING/P16",
                 "stockade/soldout-DEDUCT/P16", "stockade/soldout-RESERVE/P16/own"]
for _key in ONE_LOOP_KEYS:
    LABELS[_key.replace("stockade/", "stockade-1loop/", 1)] = LABELS[_key] + ", --io-threads 1"


def measure_round(r, servers, sizes, add, one_loop=False):
    """One round of the redis-benchmark figures, systems alternating so that drift hits them alike."""
    s, c = servers["stockade"], servers["ceiling"]
    n16, n1 = sizes["P16"], sizes["P1"]
    for server in (s, servers["stockade-1loop"], servers["stockade-nosync"]):
        cli(server, "SKU.ADD", f"rb{r}", HUGE_STOCK)
        cli(server, "SKU.ADD", f"rbl{r}", HUGE_STOCK, "LIMIT", LIMIT)
        cli(server, "SKU.ADD", f"dd{r}", HUGE_STOCK)
        cli(server, "SKU.ADD", f"gone{r}", 0)
    sha = {}
    for name in ("redis-always", "redis-nopersist"):
        p = servers[name]
        for script, path in (("plain", "stock_plain.lua"), ("limit", "stock.lua")):
            with open(os.path.join(ROOT, "scripts", path)) as f:
                sha[name, script] = cli(p, "SCRIPT", "LOAD", f.read())
        cli(p, "SET", f"stock:rb{r}", HUGE_STOCK)
        cli(p, "SET", f"stock:rbl{r}", HUGE_STOCK)

    def evalsha(name, script, pipeline, n):
        if script == "plain":
            return redis_benchmark(servers[name], pipeline, n, "EVALSHA", sha[name, script], "1", f"stock:rb{r}")
        return redis_benchmark(servers[name], pipeline, n, "EVALSHA", sha[name, script], "2", f"stock:rbl{r}", f"bought:rbl{r}",
                               "user:__rand_int__", str(LIMIT), "1")

    def stockade_steps(key, server):
        return {
            "stockade/RESERVE/P16": lambda: redis_benchmark(server, 16, n16, "RESERVE", "user:__rand_int__", f"rb{r}", "1"),
            "stockade/RESERVE-limit/P16": lambda: redis_benchmark(server, 16, n16, "RESERVE", "user:__rand_int__", f"rbl{r}", "1"),
            "stockade/DEDUCT/P16": lambda: redis_benchmark(server, 16, n16, "DEDUCT", f"dd{r}"),
            "stockade/PING/P16": lambda: redis_benchmark(server, 16, n16, "PING"),
            "stockade/soldout-DEDUCT/P16": lambda: redis_benchmark(server, 16, n16, "DEDUCT", f"gone{r}"),
            "stockade/soldout-RESERVE/P16/own": lambda: pipelined_load(server, 16, n16, ["RESERVE", "user:1", f"gone{r}", "1"], b"-SOLDOUT"),
        }[key]

    steps = [
        ("stockade/RESERVE/P16", lambda: redis_benchmark(s, 16, n16, "RESERVE", "user:__rand_int__", f"rb{r}", "1")),
        ("redis-always/plain/P16", lambda: evalsha("redis-always", "plain", 16, n16)),
        ("redis-nopersist/plain/P16", lambda: evalsha("redis-nopersist", "plain", 16, n16)),
        ("stockade/RESERVE-limit/P16", lambda: redis_benchmark(s, 16, n16, "RESERVE", "user:__rand_int__", f"rbl{r}", "1")),
        ("redis-always/limit/P16", lambda: evalsha("redis-always", "limit", 16, n16)),
        ("redis-nopersist/limit/P16", lambda: evalsha("redis-nopersist", "limit", 16, n16)),
        ("stockade/DEDUCT/P16", lambda: redis_benchmark(s, 16, n16, "DEDUCT", f"dd{r}")),
        ("stockade/RESERVE/P1", lambda: redis_benchmark(s, 1, n1, "RESERVE", "user:__rand_int__", f"rb{r}", "1")),
        ("redis-nopersist/PING_INLINE/P1", lambda: redis_benchmark(servers["redis-nopersist"], 1, n1, tests="ping_inline")),
        ("stockade-1loop/RESERVE/P1", lambda: redis_benchmark(servers["stockade-1loop"], 1, n1, "RESERVE", "user:__rand_int__",
                                                               f"rb{r}", "1")),
        ("redis-always/plain/P1", lambda: evalsha("redis-always", "plain", 1, n1)),
        ("ceiling/PING_INLINE/P1", lambda: redis_benchmark(c, 1, n1, tests="ping_inline")),
        ("stockade-nosync/RESERVE/P1", lambda: redis_benchmark(servers["stockade-nosync"], 1, n1, "RESERVE",
                                                                "user:__rand_int__", f"rb{r}", "1")),
        ("stockade-nosync/RESERVE/P16", lambda: redis_benchmark(servers["stockade-nosync"], 16, n16, "RESERVE",
                                                                 "user:__rand_int__", f"rb{r}", "1")),
        ("stockade/PING/P16", lambda: redis_benchmark(s, 16, n16, "PING")),
        ("ceiling/PING/P16", lambda: redis_benchmark(c, 16, n16, "PING")),
        ("stockade/soldout-DEDUCT/P16", lambda: redis_benchmark(s, 16, n16, "DEDUCT", f"gone{r}")),
        ("stockade/soldout-RESERVE/P16/own", lambda: pipelined_load(s, 16, n16, ["RESERVE", "user:1", f"gone{r}", "1"], b"-SOLDOUT")),
        ("ceiling/PING/P16/own", lambda: pipelined_load(c, 16, n16, ["PING"], b"+PONG")),
        ("stockade/soldout-DEDUCT/P16/own", lambda: pipelined_load(s, 16, n16, ["DEDUCT", f"gone{r}"], b":0")),
    ]
    if one_loop:
        # Each right after the default server's same measurement.
        at = {key: i for i, (key, _) in enumerate(steps)}
        for key in reversed(ONE_LOOP_KEYS):
            steps.insert(at[key] + 1, (key.replace("stockade/", "stockade-1loop/", 1),
                                       stockade_steps(key, servers["stockade-1loop"])))
    for key, run in steps:
        value = run()
        add(key, value)
        if value:
            print(f"  round {r + 1}: {key:36} {value['rps']:>12,.0f}/s  p50 {value['p50']:.3f} ms  p99 {value['p99']:.3f} ms  "
                  f"server {value['serverMicrosPerRequest']:.2f} us/request", file=sys.stderr, flush=True)


def med(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def main():
    global STOCKADE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one round, fewer requests: a fast look, not a figure to publish")
    ap.add_argument("--stockade", default=STOCKADE, help="the stockade binary (default: $STOCKADE_BIN or .build/release/stockade)")
    ap.add_argument("--ceiling", default=None, help="a built stockade-ceiling (default: build it in this tree)")
    ap.add_argument("--out", default=None, help="write every measurement as JSON here")
    ap.add_argument("--one-loop", action="store_true",
                    help="also measure the goals' Stockade figures with --io-threads 1 (a second goals table)")
    args = ap.parse_args()
    STOCKADE = os.path.abspath(args.stockade)
    rounds = 1 if args.quick else args.rounds
    # Requests per measurement: each -P16 run lasts seconds at 0.3-1.5M/s, long enough to reach a steady state.
    sizes = ({"P16": 400_000, "P1": 50_000, "harness16": 200_000, "harness1": 50_000, "sellout": 200_000} if args.quick else
             {"P16": 2_000_000, "P1": 200_000, "harness16": 1_000_000, "harness1": 200_000, "sellout": 1_000_000})
    if not os.access(STOCKADE, os.X_OK):
        sys.exit(f"no stockade binary at {STOCKADE}: run `make release` or pass --stockade")
    ceiling = args.ceiling or build_ceiling()
    results = {}

    def add(key, value):
        results.setdefault(key, []).append(value)

    servers = start_all(("stockade", "stockade-1loop", "stockade-nosync", "redis-nopersist", "redis-always", "ceiling"),
                        ceiling=ceiling)
    harnessed = ("stockade", "redis-nopersist", "redis-always")
    try:
        for r in range(rounds):
            print(f"round {r + 1} of {rounds}", file=sys.stderr, flush=True)
            measure_round(r, servers, sizes, add, one_loop=args.one_loop)
            for name in harnessed:
                p = servers[name]
                for pipeline, n in ((16, sizes["harness16"]), (1, sizes["harness1"])):
                    rep = harness(url(name, p), "sustained", "-c", CONNECTIONS, "-P", pipeline, "-n", n, "--quiet")
                    add(f"harness/{name}/P{pipeline}", {"rps": rep["throughput"], "p50": rep["latencyMicros"]["p50"],
                                                        "p99": rep["latencyMicros"]["p99"]})
            # A sellout: 10 SKUs x 1,000 units = 10k units, far more requests, per-user limit 1.
            for name in harnessed:
                p = servers[name]
                rep = harness(url(name, p), "sellout", "--skus", 10, "--stock", 1000, "-n", sizes["sellout"], "-c", CONNECTIONS,
                              "-P", 16, "--quiet")
                add(f"sellout/{name}", {"rps": rep["throughput"], "sellout": rep["sellOutSeconds"], "p99": rep["latencyMicros"]["p99"],
                                        "audit": rep["auditPassed"], "ok": rep["successes"]})
    finally:
        for p in servers.values():
            p.stop()

    report(results, rounds, sizes, args.quick, one_loop=args.one_loop)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rounds": rounds, "sizes": sizes, "results": results}, f, indent=1)


def fig(results, key, field="rps"):
    return med([x[field] if x else None for x in results.get(key, [])])


def report(results, rounds, sizes, quick, one_loop=False):
    what = f"median of {rounds} rounds" if rounds > 1 else "one round"
    if quick:
        what += ", --quick: fewer requests, a fast look only"
    print(f"### Goals of issue #8 ({what}; redis-benchmark -c {CONNECTIONS}, -P16 n={sizes['P16']:,}, -P1 n={sizes['P1']:,})\n")
    goals_table(results, GOALS)
    if one_loop:
        print(f"\n### The same goals, Stockade with --io-threads 1 (one loop: no request crosses to another thread; {what})\n")
        one = lambda key: key.replace("stockade/", "stockade-1loop/", 1) if key.startswith("stockade/") else key
        goals_table(results, [(figure, one(num), den, goal) for figure, num, den, goal in GOALS])
    print(f"\n### Context for the misses (no goals of their own; {what})\n")
    context_table(results, CONTEXT)
    every_measurement(results, rounds, sizes, quick, what)


def context_table(results, rows):
    print("| figure | value | reference | ratio | per round |")
    print("|---|---|---|---|---|")
    for figure, num, den in rows:
        if den is None:
            p99 = fig(results, num, "p99")
            per_round = ", ".join(f"{x['p99']:.2f}" if x else "n/a" for x in results.get(num, []))
            print(f"| {figure} | " + (f"p99 {p99:.2f} ms" if p99 is not None else "n/a") + f" | | | {per_round} ms |")
            continue
        a, b = fig(results, num), fig(results, den)
        per_round = ", ".join(f"x{x['rps'] / y['rps']:.2f}" if x and y else "n/a"
                              for x, y in zip(results.get(num, []), results.get(den, [])))
        if a is None or b is None:
            print(f"| {figure} | n/a | n/a | n/a | {per_round} |")
            continue
        print(f"| {figure} | {a:,.0f}/s | {b:,.0f}/s | x{a / b:.2f} | {per_round} |")


def goals_table(results, goals):
    print("| figure | Stockade | reference | ratio | per round | goal | |")
    print("|---|---|---|---|---|---|---|")
    for figure, num, den, goal in goals:
        a = fig(results, num)
        if den is None:  # a latency bound
            p99 = fig(results, num, "p99")
            per_round = ", ".join(f"{x['p99']:.2f}" if x else "n/a" for x in results.get(num, []))
            if p99 is None:
                print(f"| {figure} | n/a | | | | <= {goal:g} ms | n/a |")
            else:
                print(f"| {figure} | p99 {p99:.2f} ms | | | {per_round} ms | <= {goal:g} ms | {'met' if p99 <= goal else 'missed'} |")
            continue
        b = fig(results, den)
        pairs = zip(results.get(num, []), results.get(den, []))
        per_round = ", ".join(f"x{x['rps'] / y['rps']:.2f}" if x and y else "n/a" for x, y in pairs)
        if a is None or b is None:
            print(f"| {figure} | n/a | n/a | n/a | {per_round} | >= {goal:g}x | n/a |")
            continue
        ratio = a / b
        print(f"| {figure} | {a:,.0f}/s | {b:,.0f}/s | **x{ratio:.2f}** | {per_round} | >= {goal:g}x | "
              f"{'met' if ratio >= goal else 'missed'} |")


def every_measurement(results, rounds, sizes, quick, what):
    print(f"\n### Every measurement ({what})\n")
    print("The server's CPU is its process's user + system time during the run divided by the requests; "
          "the client's, the share of one core the load client used (near 100%: the client, not the server, "
          "may be the limit).\n")
    print("| measurement | requests/s | p50 | p99 | server CPU per request | client, its CPU |")
    print("|---|---|---|---|---|---|")
    for key, label in LABELS.items():
        if key not in results and key.replace("stockade-1loop/", "stockade/", 1) in ONE_LOOP_KEYS:
            continue  # measured only with --one-loop
        xs = [x for x in results.get(key, []) if x]
        if not xs:
            print(f"| {label} | failed | | | | |")
            continue
        print(f"| {label} | {med([x['rps'] for x in xs]):,.0f} | {med([x['p50'] for x in xs]):.3f} ms | "
              f"{med([x['p99'] for x in xs]):.3f} ms | {med([x['serverMicrosPerRequest'] for x in xs]):.2f} us | "
              f"{xs[0]['client']}, {med([x['clientCPU'] for x in xs]) * 100:.0f}% |")

    servers = ("stockade", "redis-nopersist", "redis-always")
    print(f"\n### Harness, sustained RESERVE, {CONNECTIONS} connections ({what})\n")
    print("| pipeline | Stockade fsync always | Redis + Lua, no persistence | Redis + Lua, appendfsync always | vs no persistence | vs appendfsync always |")
    print("|---|---|---|---|---|---|")
    for P in (16, 1):
        row = {k: med([x["rps"] for x in results[f"harness/{k}/P{P}"]]) for k in servers}
        lat = {k: (med([x["p50"] for x in results[f"harness/{k}/P{P}"]]) / 1000, med([x["p99"] for x in results[f"harness/{k}/P{P}"]]) / 1000) for k in servers}
        cell = lambda k: f"{row[k]:,.0f}/s (p50 {lat[k][0]:.2f} ms, p99 {lat[k][1]:.2f} ms)"
        print(f"| {P} | {cell('stockade')} | {cell('redis-nopersist')} | {cell('redis-always')} | "
              f"x{row['stockade'] / row['redis-nopersist']:.2f} | x{row['stockade'] / row['redis-always']:.2f} |")
    print(f"\n### Sellout: 10 SKUs x 1,000 units, {sizes['sellout']:,} requests, limit 1 per user ({what})\n")
    print("| system | sold out after | requests/s | p99 | units sold | audit |")
    print("|---|---|---|---|---|---|")
    for k in servers:
        xs = results[f"sellout/{k}"]
        print(f"| {k} | {med([x['sellout'] or 0 for x in xs]):.3f} s | {med([x['rps'] for x in xs]):,.0f} | "
              f"{med([x['p99'] for x in xs]) / 1000:.2f} ms | {', '.join(str(x['ok']) for x in xs)} | "
              f"{'passed' if all(x['audit'] for x in xs) else 'FAILED'} |")


if __name__ == "__main__":
    main()
