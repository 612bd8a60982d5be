"""Server CPU per EVENTS read at the end of the log: a new server (one loop) takes W one-SKU RESERVEs
(pipelined, one client), then one client pipelines N reads of `EVENTS <random one of the last R
positions> COUNT K` and reads every reply; prints the server's user + system time over the reads,
divided by N. A consumer that keeps up reads there. Alternate builds in one sitting to compare them.

    python3 scripts/events_fairness/tail_cpu.py BINARY [K] [N] [W] [R]
"""
import os, sys, socket, random, shutil, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Srv, enc  # noqa: E402

binary = sys.argv[1]
k = int(sys.argv[2]) if len(sys.argv) > 2 else 1
n = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
w = int(sys.argv[4]) if len(sys.argv) > 4 else 20000
r = int(sys.argv[5]) if len(sys.argv) > 5 else 1000
d = tempfile.mkdtemp(prefix="tail-cpu-")
server = Srv(binary, d + "/d", "--io-threads", "1").start()


def until_pong(s, expect_pongs=1):
    buf = b""
    while buf.count(b"+PONG\r\n") < expect_pongs:
        buf += s.recv(1 << 20)
    return buf


try:
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(enc("SKU.ADD", "tee", 10**9))
    until_pong_dummy = s.recv(100)
    for start in range(0, w, 1000):
        s.sendall(b"".join(enc("RESERVE", f"user:{i}", "tee", 1, "TTL", 600000) for i in range(start, min(w, start + 1000))) + b"PING\r\n")
        until_pong(s)
    last = w + 1  # the SKU's record, then one record per RESERVE
    rnd = random.Random(1)
    before = server.status()["cpu_s"]
    s.sendall(b"".join(b"EVENTS %d COUNT %d\r\n" % (rnd.randrange(max(1, last - r + 1), last + 1), k) for _ in range(n)) + b"PING\r\n")
    until_pong(s)
    after = server.status()["cpu_s"]
    print(f"{os.path.basename(binary)} EVENTS COUNT {k} among the last {r} of {last} positions: "
          f"{(after - before) * 1e6 / n:.1f} us of server CPU a read ({n} reads)")
finally:
    server.stop()
    shutil.rmtree(d, ignore_errors=True)
