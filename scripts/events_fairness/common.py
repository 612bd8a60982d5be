import os, socket, subprocess, sys, time, threading, re, shutil, signal
# Data directories go here; a server binary is named by its path.
D = os.environ.get("EVENTS_FAIRNESS_DIR", "/tmp/stockade-events-fairness")
os.makedirs(D, exist_ok=True)
BINS = {}

class Srv:
    def __init__(self, which, datadir, *flags, fresh=True):
        self.which, self.dir, self.flags = which, datadir, flags
        if fresh and os.path.exists(datadir): shutil.rmtree(datadir)
        os.makedirs(datadir, exist_ok=True)
    def start(self):
        self.log = open(self.dir + ".log", "ab")
        self.p = subprocess.Popen([BINS.get(self.which, self.which), "serve", "--port", "0", "--data-dir", self.dir, *self.flags],
                                  stdout=subprocess.PIPE, stderr=self.log)
        line = b""
        t0 = time.time()
        while True:
            c = self.p.stdout.readline()
            if not c:
                raise RuntimeError("server exited: rc=%s" % self.p.poll())
            m = re.search(rb"listening on [^:]+:(\d+)", c)
            if m: self.port = int(m.group(1)); break
        threading.Thread(target=lambda: [None for _ in self.p.stdout], daemon=True).start()
        return self
    def status(self):
        s = open(f"/proc/{self.p.pid}/status").read()
        hwm = int(re.search(r"VmHWM:\s+(\d+)", s).group(1)); rss = int(re.search(r"VmRSS:\s+(\d+)", s).group(1))
        st = open(f"/proc/{self.p.pid}/stat").read().split(")")[1].split()
        cpu = (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
        return dict(hwm_kb=hwm, rss_kb=rss, cpu_s=cpu)
    def stop(self, kill=False):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try: self.p.wait(20)
            except subprocess.TimeoutExpired: self.p.kill(); self.p.wait()
        return self.p.returncode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../stall"))
from resp import enc  # noqa: E402  (RESP encoding of a command)

class Reader:
    """Minimal RESP reader on a socket."""
    def __init__(self, sock):
        self.s, self.buf = sock, bytearray()
    def _fill(self):
        d = self.s.recv(1 << 20)
        if not d: raise EOFError
        self.buf += d
    def _line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                l = bytes(self.buf[:i]); del self.buf[:i + 2]; return l
            self._fill()
    def read(self):
        l = self._line(); t, rest = l[:1], l[1:]
        if t in (b"+",): return rest.decode()
        if t == b"-": return Exception(rest.decode())
        if t == b":": return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0: return None
            while len(self.buf) < n + 2: self._fill()
            v = bytes(self.buf[:n]); del self.buf[:n + 2]; return v
        if t in (b"*", b"%"):
            n = int(rest)
            if n < 0: return None
            k = n * 2 if t == b"%" else n
            return [self.read() for _ in range(k)]
        if t == b"_": return None
        raise ValueError(l)

def conn(port, timeout=60):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s, Reader(s)

def call(port_or_pair, *args):
    s, r = port_or_pair
    s.sendall(enc(*args)); return r.read()

class Prober:
    """PING from n connections (spread over loops), every interval; records latencies (ms)."""
    def __init__(self, port, n=4, interval=0.005, cmd=None):
        self.port, self.n, self.interval = port, n, interval
        self.cmd = cmd or (lambda i: enc("PING"))
        self.lat = [[] for _ in range(n)]; self.stopflag = False; self.th = []
    def start(self):
        for i in range(self.n):
            t = threading.Thread(target=self._run, args=(i,), daemon=True); t.start(); self.th.append(t)
        return self
    def _run(self, i):
        s, r = conn(self.port, timeout=120)
        k = 0
        while not self.stopflag:
            t0 = time.monotonic(); s.sendall(self.cmd((i, k))); v = r.read(); k += 1
            self.lat[i].append((time.monotonic() - t0) * 1000)
            time.sleep(self.interval)
        s.close()
    def stop(self):
        self.stopflag = True
        for t in self.th: t.join(30)
        allv = sorted(x for l in self.lat for x in l)
        if not allv: return {}
        q = lambda p: allv[min(len(allv) - 1, int(p * len(allv)))]
        return dict(n=len(allv), p50=round(q(.5), 2), p99=round(q(.99), 2), max=round(allv[-1], 1),
                    per_conn_max=[round(max(l), 1) if l else None for l in self.lat])

BIG = [f"k{i:062d}" for i in range(64)]
def setup_orders(P, n=300, user="victim"):
    c = conn(P)
    call(c, "SKU.ADD", "s", 10_000_000)
    for k in BIG: call(c, "SKU.ADD", k, 10_000_000)
    pipe = b"".join(enc("BUY", user, *sum([[k, 1] for k in BIG], []), "TTL", 3_600_000) for _ in range(n))
    c[0].sendall(pipe); ids = [c[1].read() for _ in range(n)]
    c[0].close()
    return ids
