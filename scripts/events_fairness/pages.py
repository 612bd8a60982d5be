"""Pages just under a bound: N clients each write PIPE x REQUEST and a PING, again and again; another
client PINGs every 10 ms for SECONDS; prints that PING's p50 / p99 / max. One loop (--io-threads 1),
over the baskets of make_base.py (run it first with any build).

    python3 scripts/events_fairness/make_base.py BINARY
    python3 scripts/events_fairness/pages.py BINARY events|orders|order N K PIPE SECONDS
"""
# N clients loop: PIPE x REQUEST + PING in one write, read to the PONG. One more client PINGs every 10 ms,
# from a process of its own: in this one it would wait for the interpreter's lock behind the N client
# threads, and the faster the server answers them the longer (up to 200 ms at N 200).
# REQUEST: "events" = EVENTS <random position> COUNT K; "orders" = ORDERS victim COUNT K; "order" = ORDER <random id>.
import sys, os, socket, threading, time, random, subprocess, re, shutil, tempfile
binary, mode, N, K, PIPE, DUR = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
base = os.environ.get("EVENTS_FAIRNESS_DIR", "/tmp/stockade-events-fairness") + "/base"  # make_base.py
d = tempfile.mkdtemp(prefix="f1-"); shutil.copytree(base, d + "/d")
p = subprocess.Popen([binary, "serve", "--port", "0", "--data-dir", d + "/d", "--io-threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
while True:
    line = p.stdout.readline().decode()
    m = re.search(r"listening on [^:\s]+:(\d+)", line)
    if m: port = int(m.group(1)); break
ids = [int(x) for x in open(base + ".ids").read().split()]
stop = False; done = [0]
def request(rnd):
    if mode == "events": return b"EVENTS %d COUNT %d\r\n" % (rnd.randrange(70, 600), K)
    if mode == "orders": return b"ORDERS victim COUNT %d\r\n" % K
    return b"ORDER %d\r\n" % rnd.choice(ids)
def worker(i):
    s = socket.create_connection(("127.0.0.1", port)); rnd = random.Random(i)
    while not stop:
        s.sendall(b"".join(request(rnd) for _ in range(PIPE)) + b"PING\r\n"); buf = b""
        while not buf.endswith(b"+PONG\r\n"):
            x = s.recv(1 << 20)
            if not x: return
            buf += x
        done[0] += PIPE
ths = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(N)]
for t in ths: t.start()
time.sleep(1)
mon = subprocess.run([sys.executable, "-c", """
import socket, time, sys
port, dur = int(sys.argv[1]), float(sys.argv[2])
ps = socket.create_connection(("127.0.0.1", port)); lat = []
t0 = time.time()
while time.time() - t0 < dur:
    a = time.monotonic(); ps.sendall(b"PING\\r\\n"); b = b""
    while not b.endswith(b"\\r\\n"): b += ps.recv(100)
    lat.append((time.monotonic() - a) * 1000); time.sleep(0.01)
print(" ".join("%.3f" % x for x in lat))
""", str(port), str(DUR)], capture_output=True, text=True)
lat = [float(x) for x in mon.stdout.split()]
stop = True
lat.sort()
print(os.path.basename(binary), mode, "N", N, "K", K, "PIPE", PIPE, "served", done[0], "PING p50 %.1f p99 %.1f max %.1f ms" % (lat[len(lat)//2], lat[int(len(lat)*.99)], lat[-1]), flush=True)
p.terminate(); p.wait(); shutil.rmtree(d)
