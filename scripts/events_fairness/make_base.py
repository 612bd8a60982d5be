"""The data of pages.py: 600 baskets of 64 SKUs for user `victim`, and their order ids."""
import os, subprocess, re, redis, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/integration"))
from test_protocol import place_big_baskets
base = os.environ.get("EVENTS_FAIRNESS_DIR", "/tmp/stockade-events-fairness") + "/base"
os.makedirs(os.path.dirname(base), exist_ok=True)
p = subprocess.Popen([sys.argv[1], "serve", "--port", "0", "--data-dir", base], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
while True:
    m = re.search(r"listening on [^:\s]+:(\d+)", p.stdout.readline().decode())
    if m: port = int(m.group(1)); break
ids = place_big_baskets(redis.Redis(port=port), "victim", 600)
open(base + ".ids", "w").write(" ".join(str(int(i)) for i in ids))
p.terminate(); p.wait()
