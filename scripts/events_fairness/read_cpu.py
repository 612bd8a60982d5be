"""Server CPU per EVENTS read over the baskets of make_base.py: one client pipelines N reads of
`EVENTS <random position> COUNT K` and reads every reply; the server's user + system time over the
reads, divided by N. One loop (--io-threads 1). Alternate builds in one sitting to compare them.

    python3 scripts/events_fairness/make_base.py BINARY
    python3 scripts/events_fairness/read_cpu.py BINARY [K] [N]
"""
import os, sys, socket, random, shutil, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Srv  # noqa: E402

binary = sys.argv[1]
k = int(sys.argv[2]) if len(sys.argv) > 2 else 1
n = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
base = os.environ.get("EVENTS_FAIRNESS_DIR", "/tmp/stockade-events-fairness") + "/base"
d = tempfile.mkdtemp(prefix="read-cpu-")
shutil.copytree(base, d + "/d")
server = Srv(binary, d + "/d", "--io-threads", "1", fresh=False).start()
try:
    s = socket.create_connection(("127.0.0.1", server.port))
    rnd = random.Random(1)
    ticks = lambda: server.status()["cpu_s"]
    before = ticks()
    s.sendall(b"".join(b"EVENTS %d COUNT %d\r\n" % (rnd.randrange(70, 600), k) for _ in range(n)))
    s.sendall(b"PING\r\n")  # answered after every read: replies come in order
    buf = b""
    while not buf.endswith(b"+PONG\r\n"):
        buf += s.recv(1 << 20)
    after = ticks()
    print(f"{os.path.basename(binary)} EVENTS COUNT {k}: {(after - before) * 1e6 / n:.1f} us of server CPU a read ({n} reads)")
finally:
    server.stop()
    shutil.rmtree(d, ignore_errors=True)
