"""Fixtures for the integration tests: a real `stockade serve` process on an ephemeral port."""
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest
import redis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("STOCKADE_BIN", os.path.join(ROOT, ".build", "debug", "stockade"))


class LoopbackListener:
    """A stand-in peer on a free loopback port (a fake primary, a relay, a scripted server): each
    connection goes to `connected(conn)` on the accepting thread. A subclass sets what
    `connected` needs before calling this constructor, which starts accepting."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connected(conn)

    def connected(self, conn):
        raise NotImplementedError

    def close(self):
        self.listener.close()


class ThreadedLoopbackListener(LoopbackListener):
    """A LoopbackListener that serves each connection with `serve(conn)` on a thread of its own."""

    def connected(self, conn):
        threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        raise NotImplementedError


class Server:
    """A stockade server process; stops by SIGTERM (graceful) or SIGKILL (crash)."""

    def __init__(self, data_dir, *args, preexec_fn=None):
        self.data_dir = data_dir
        self.args = list(args)
        self.preexec_fn = preexec_fn
        self.proc = None
        self.port = None
        self.log_path = os.path.join(data_dir + "-logs", f"server-{time.time_ns()}.log")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)

    def start(self, timeout=60):
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [BINARY, "serve", "--port", "0", "--data-dir", self.data_dir, *self.args],
            stdout=subprocess.PIPE, stderr=self.log, preexec_fn=self.preexec_fn,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline().decode()
            m = re.search(r"listening on [^:]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"server did not start: {self.logs()}")

    def client(self, protocol=2, **kw):
        """A redis-py client speaking RESP2 unless told otherwise: redis-py 8 opens with HELLO 3 by
        default, and under RESP3 STOCK, ORDER and EVENTS entries are maps, not the flat arrays the
        tests index."""
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, protocol=protocol, **kw)

    def logs(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def data_dir():
    path = tempfile.mkdtemp(prefix="stockade-it-")
    yield path
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path + "-logs", ignore_errors=True)


@pytest.fixture
def server(data_dir):
    s = Server(data_dir, "--shards", "2").start()
    yield s
    s.stop()


def cli(port, *args, input=None):
    """Runs redis-cli against the server; returns its stdout lines."""
    out = subprocess.run(["redis-cli", "-p", str(port), *map(str, args)], input=input,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.rstrip("\n").split("\n") if out.stdout.strip() else []


def wait_for_stock(server, sku, field, value, timeout=15):
    """Waits until field `field` of `STOCK sku` (the flat RESP2 array) is `value` on `server` (a
    replica taking its primary's history: NOSKU until the SKU arrives), then checks it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if server.client().execute_command("STOCK", sku)[field] == value:
                return
        except redis.ResponseError:
            pass
        time.sleep(0.05)
    assert server.client().execute_command("STOCK", sku)[field] == value
