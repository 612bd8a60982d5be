"""EVENTS fan-out: N consumers blocked on EVENTS $ BLOCK; one RESERVE; time until the last consumer has
its event (each woken EVENTS now queues for a heavy turn, 2 at a time per loop). Optionally with 4
clients looping ORDERS pages (heavy) on the same loop. usage: python3 scripts/events_fairness/fanout.py BINARY N [heavy]"""
import sys, time, threading, socket, selectors
from common import *
which = sys.argv[1]; N = int(sys.argv[2]); heavy = len(sys.argv) > 3
s = Srv(which, f"{D}/fanout-{os.getpid()}", "--io-threads", "1").start(); P = s.port
ids = setup_orders(P)
stop = False
def hv():
    a = conn(P, timeout=600)
    while not stop: a[0].sendall(enc("ORDERS", "victim", "COUNT", 1000)); a[1].read()
if heavy:
    for _ in range(4): threading.Thread(target=hv, daemon=True).start()
cons = [conn(P) for _ in range(N)]
w = conn(P)
res = []
for rep in range(8):
    pos = int(call(w, "INFO", "persistence").split(b"log_position_durable:")[1].split(b"\r")[0]) + 1
    for k, r in cons: k.sendall(enc("EVENTS", pos, "COUNT", 10000, "BLOCK", 10000))
    time.sleep(0.3)
    t0 = time.time(); call(w, "RESERVE", "w", "s", 1, "TTL", 600000); tack = time.time() - t0
    lat = []
    for k, r in cons:
        v = r.read(); lat.append(time.time() - t0); assert isinstance(v, list) and len(v) == 1, v
    lat.sort(); res.append((tack * 1000, lat[len(lat)//2] * 1000, lat[-1] * 1000))
print(f"{os.path.basename(which)} N={N} heavy={heavy}: RESERVE ack ms / consumer median ms / last consumer ms per wake:", [tuple(round(x, 1) for x in t) for t in res])
stop = True; s.stop()
