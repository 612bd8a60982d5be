"""The coordinator (docs/REPLICATION.md): its etcd client against an etcd that misbehaves ("etcd
access": every call is bounded as a whole, whatever the peer sends, and the node keeps serving its
clients), and who may stand for election."""
import os
import time

import pytest
import redis

from conftest import Server, ThreadedLoopbackListener, wait_for_stock


class BadEtcd(ThreadedLoopbackListener):
    """Answers each connection's request the way `behaviour` says, on a thread of its own."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.requests = 0
        super().__init__()

    def serve(self, conn):
        try:
            conn.recv(65536)  # the request (small, one read on loopback)
            self.requests += 1
            if self.behaviour == "trickle":
                # A head at once, then one byte of body every half second: never idle for a
                # whole second, never done.
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
                while True:
                    conn.sendall(b" ")
                    time.sleep(0.5)
            elif self.behaviour == "huge":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b" " * 65536
                while True:
                    conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            elif self.behaviour == "silent":
                time.sleep(60)
            elif self.behaviour == "garbage":
                conn.sendall(b"\x00\xffnot http at all\r\n\r\n{")
                time.sleep(60)
            elif self.behaviour == "error":
                # Every request on the kept-alive connection is refused.
                while True:
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                    if not conn.recv(65536):
                        break
                    self.requests += 1
        except OSError:
            pass
        finally:
            conn.close()


@pytest.mark.parametrize("behaviour", ["trickle", "huge", "silent", "garbage", "error"])
def test_a_misbehaving_etcd_fails_each_call_in_bounded_time(data_dir, behaviour):
    """Each tick's call fails within its bound (1 s) and says so in INFO replication; the node takes
    no term, answers its clients meanwhile, and stops at once on SIGTERM."""
    etcd = BadEtcd(behaviour)
    node = Server(data_dir, "--shards", "2", "--coordinator", f"etcd://127.0.0.1:{etcd.port}", "--cluster", "sale",
                  "--lease-seconds", "2").start()
    try:
        r = node.client(socket_timeout=2)
        errors = set()
        slowest = 0.0
        deadline = time.time() + 8
        while time.time() < deadline and (etcd.requests < 3 or not errors):
            sent = time.time()
            assert r.ping()
            slowest = max(slowest, time.time() - sent)
            error = r.info("replication").get("coordinator_error", "")
            if error:
                errors.add(str(error))
            time.sleep(0.05)
        assert errors, f"no call failed in 8 s ({etcd.requests} requests): {node.logs()[-2000:]}"
        # A call that never ended would hold every later tick: count the ticks that reached etcd.
        assert etcd.requests >= 3, f"the first call never ended: {etcd.requests} request(s) in 8 s"
        assert slowest < 1.0, f"a PING took {slowest:.2f} s while the coordinator's calls failed"
        assert r.execute_command("ROLE")[0] == "slave"
        with pytest.raises(redis.exceptions.ReadOnlyError):
            r.execute_command("SKU.ADD", "tv", 10)
        started = time.time()
        assert node.stop() == 0
        assert time.time() - started < 5, f"SIGTERM took {time.time() - started:.1f} s"
    finally:
        node.stop()
        etcd.close()


from test_failover import LEASE_SECONDS, cluster, etcd, primary_of  # noqa: E402,F401 (etcd: the fixture)


def test_a_node_without_a_term_is_not_elected_in_a_cluster_that_had_one(data_dir, etcd):
    """The primary dies and an empty node joins: alone, it used to be elected (epoch 0 loses only to
    nodes that are there), and when the old primary came back it was refused and set its whole log
    aside. Now the empty node waits; the old primary is elected again and keeps its data."""
    (old,) = cluster(data_dir, etcd, 1)
    fresh = None
    try:
        r = primary_of([old]).client()
        r.execute_command("SKU.ADD", "tv", 100)
        for i in range(50):
            r.execute_command("RESERVE", f"u{i}", "tv", 1)
        old.kill9()
        fresh = Server(os.path.join(data_dir, "fresh"), "--shards", "2", "--coordinator", f"etcd://127.0.0.1:{etcd}",
                       "--cluster", "sale", "--lease-seconds", str(LEASE_SECONDS)).start()
        # Well past a lease for the old key to lapse and one for the new node's own wait.
        deadline = time.time() + 3 * LEASE_SECONDS + 3
        while time.time() < deadline:
            assert fresh.client().execute_command("ROLE")[0] == "slave", fresh.logs()[-2000:]
            time.sleep(0.1)
        assert "does not stand for election" in fresh.logs()
        old.start()
        assert primary_of([old, fresh], timeout=20) is old
        state = old.client().info("everything")
        assert int(state["rejoins"]) == 0 and not [d for d in os.listdir(old.data_dir) if d.startswith("diverged-")]
        assert old.client().execute_command("STOCK", "tv")[5] == 50
        # The empty node follows the primary and gets its history.
        wait_for_stock(fresh, "tv", 5, 50)
    finally:
        old.stop()
        if fresh:
            fresh.stop()


def test_a_node_of_another_data_set_with_terms_of_its_own_is_not_elected(data_dir, etcd):
    """A node that was the primary of another data set (a term of its own, a high epoch) joins the
    cluster and the primary dies: ranked on its epoch, it was elected over the caught-up replica, and
    the replica set the whole sale aside to take its history. Now only nodes whose directory records
    this cluster stand."""
    foreign = Server(os.path.join(data_dir, "foreign"), "--shards", "2", "--replica-of", "127.0.0.1:1").start()
    nodes = []
    try:
        f = foreign.client()
        assert f.execute_command("REPLICAOF", "NO", "ONE") == "OK"
        f.execute_command("SKU.ADD", "other", 5)
        foreign.stop()
        nodes = cluster(data_dir, etcd, 2)
        first = primary_of(nodes)
        (second,) = [n for n in nodes if n is not first]
        r = first.client()
        r.execute_command("SKU.ADD", "tv", 100)
        for i in range(50):
            r.execute_command("RESERVE", f"u{i}", "tv", 1)
        assert r.execute_command("WAIT", 1, 5000) == 1
        foreign.args = ["--shards", "2", "--coordinator", f"etcd://127.0.0.1:{etcd}", "--cluster", "sale",
                        "--lease-seconds", str(LEASE_SECONDS)]
        foreign.start()
        time.sleep(1.0)
        first.kill9()
        assert primary_of([second, foreign], timeout=20) is second, (foreign.logs()[-2000:], second.logs()[-3000:], os.listdir(second.data_dir))
        assert second.client().execute_command("STOCK", "tv")[5] == 50
        assert int(second.client().info("everything")["rejoins"]) == 0
        assert "does not stand for election" in foreign.logs()
    finally:
        foreign.stop()
        for node in nodes:
            node.stop()
