# replica after a full copy (primary's log trimmed: run/trim3-live-new has wal-1 removed): EVENTS on a new replica
# and on an old replica of the same primary vs the primary, at positions around the snapshot and the end.
import sys, redis, shutil, time, random, string
from common import *
src = f"{HERE}/run/trim3-live-new"; dp = f"{HERE}/run/fc-primary"; shutil.rmtree(dp, ignore_errors=True); shutil.copytree(src, dp)
import os; [os.remove(os.path.join(dp, f)) for f in os.listdir(dp) if f == "LOCK"]
fl = ["--fsync", "none", "--events-retention-segments", "0", "--snapshot-every-changes", "0", "--snapshot-every-seconds", "0"]
pp_, portp = start(NEW, dp, *fl); rp = redis.Redis(port=portp, socket_timeout=60)
dur = lambda r: int(r.info("persistence")["log_position_durable"])
print("primary durable", dur(rp), sorted(os.listdir(dp)))
reps = {}
for tag, b in (("new", NEW), ("old", OLD)):
    d = f"{HERE}/run/fc-replica-{tag}"; shutil.rmtree(d, ignore_errors=True)
    reps[tag] = start(b, d, *fl, "--replica-of", f"127.0.0.1:{portp}")
rn = redis.Redis(port=reps["new"][1], socket_timeout=60); ro = redis.Redis(port=reps["old"][1], socket_timeout=60)
rnd = lambda: "".join(random.choices(string.ascii_letters, k=40))
for k in range(30):
    pl = rp.pipeline(transaction=False)
    for i in range(random.choice([1, 5, 200])): pl.execute_command("RESERVE", rnd(), "t", 1)
    pl.execute()
    if k == 5: time.sleep(2)
D = dur(rp)
for _ in range(200):
    time.sleep(0.1)
    if dur(rn) >= D and dur(ro) >= D: break
print("primary", D, "replica new", dur(rn), "replica old", dur(ro))
snap = max(int(f[5:-5]) for f in os.listdir(f"{HERE}/run/fc-replica-new") if f.startswith("snap"))
print("replica new dir", sorted(os.listdir(f"{HERE}/run/fc-replica-new")), "snapshot lsn", snap)
def ask(r, q, c):
    try:
        rep = r.execute_command("EVENTS", q, "COUNT", c); return [(e[b"position"], e) for e in rep]
    except Exception as e: return "ERR " + str(e)[:50]
probes = [1, snap - 1, snap, snap + 1, snap + 2, snap + 5, snap + 100, D - 300, D - 128, D - 1, D] + [random.randint(snap, D) for _ in range(40)]
dn = do = dp_ = 0
for q in probes:
    for c in (1, 3, 128, 129, 2000):
        a, b_, pr = ask(rn, q, c), ask(ro, q, c), ask(rp, q, c)
        if a != b_: dn += 1; print("DIFF new-vs-old replica", q - snap, c, str(a)[:100], "|", str(b_)[:100])
        if not isinstance(a, str) and a != pr: dp_ += 1; print("DIFF replica-new vs primary", q - snap, c, str(a)[:100], "|", str(pr)[:100])
print("probes", len(probes) * 5, "new-vs-old replica diffs", dn, "replica-new (events) vs primary diffs", dp_, "sample", q - snap, str(ask(rn, snap, 1))[:80], str(ask(rn, snap + 1, 1))[:60])
for p in list(reps.values()): stop(p[0])
stop(pp_)
