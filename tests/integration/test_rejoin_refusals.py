"""When a peer taken for the primary refuses a node's log, the node starts over (docs/REPLICATION.md,
"Rejoining") only where its log really went another way and there is something to keep: a peer that is
behind it in its own term, a refusal of an empty log, an epoch past the largest, and a directory that
already keeps the most set-aside logs discard nothing."""
import os
import socket
import time

import pytest
import redis

from conftest import Server, ThreadedLoopbackListener, wait_for_stock


class RefusingPeer(ThreadedLoopbackListener):
    """Takes AUTH and REPLICATE like a primary and answers REPLICATE with `answer`, then closes;
    counts the REPLICATE requests."""

    def __init__(self, answer, hold=False):
        self.answer = answer
        self.hold = hold  # keep the link open after answering (a primary that sends nothing yet)
        self.requests = 0
        super().__init__()

    def serve(self, conn):
        try:
            conn.settimeout(0.3)
            data = b""
            while True:
                try:
                    part = conn.recv(4096)
                except socket.timeout:
                    part = None
                if part == b"":
                    return
                if part:
                    data += part
                    if data.upper().startswith(b"*2\r\n$4\r\nAUTH"):
                        conn.sendall(b"+OK\r\n")
                        data = b""
                    continue
                if b"REPLICATE" in data:  # the whole request is in (a pause after it)
                    break
            self.requests += 1
            conn.sendall(self.answer.encode() + b"\r\n")
            while self.hold:
                try:
                    if conn.recv(4096) == b"":
                        return
                except socket.timeout:
                    pass
        except OSError:
            pass
        finally:
            conn.close()


def info(node):
    return node.client().info("everything")


def set_aside(node):
    return sorted(d for d in os.listdir(node.data_dir) if d.startswith("diverged-"))


def primary_with_a_term(data_dir):
    """A node that began a term of its own (REPLICAOF NO ONE) and logged a few changes."""
    node = Server(os.path.join(data_dir, "node"), "--shards", "2", "--replica-of", "127.0.0.1:1").start()
    r = node.client()
    assert r.execute_command("REPLICAOF", "NO", "ONE") == "OK"
    r.execute_command("SKU.ADD", "tv", 100)
    for i in range(5):
        r.execute_command("RESERVE", f"u{i}", "tv", 1)
    return node


def tail(epoch, start):
    return f" [primary-epoch {epoch} diverged-from {start}]"


def wait_for_error(node, text, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = info(node)
        if text in state.get("master_link_error", ""):
            return state
        time.sleep(0.05)
    raise AssertionError(f"no link error with {text!r}: {info(node)}")


@pytest.mark.parametrize("case", ["behind in the same term", "epoch past the largest"])
def test_a_refusal_that_shows_no_divergence_discards_nothing(data_dir, case):
    node = primary_with_a_term(data_dir)
    try:
        before = info(node)
        epoch, end = int(before["log_epoch"]), int(before["log_position_durable"])
        if case == "behind in the same term":
            # A replica of this node's own term that lags, taken for a primary (an operator's REPLICAOF).
            answer = f"-ERR the replica is ahead of this primary: it asks for position {end + 1}, this log ends at 3" + tail(epoch, 4)
            expected = "behind this node in the same term"
        else:
            answer = "-DIVERGED the replica's log went another way" + tail(2**64 - 1, 1)
            expected = "past the largest epoch"
        peer = RefusingPeer(answer)
        node.client().execute_command("REPLICAOF", "127.0.0.1", peer.port)
        state = wait_for_error(node, expected)
        time.sleep(0.5)
        state = info(node)
        assert int(state["rejoins"]) == 0 and set_aside(node) == [], state
        assert int(state["log_position_durable"]) == end
        assert node.client().execute_command("STOCK", "tv")[5] == 95
        peer.close()
    finally:
        node.stop()


def test_a_refusal_of_an_empty_log_is_retried_not_started_over(data_dir):
    """Nothing to keep: no directory is made, the link backs off and tries again (a peer that refused
    every log made a node start over 24 times a second, each time making a directory and closing
    every client)."""
    peer = RefusingPeer("-DIVERGED the replica's log went another way" + tail(7, 1))
    node = Server(os.path.join(data_dir, "node"), "--shards", "2", "--replica-of", f"127.0.0.1:{peer.port}").start()
    try:
        client = node.client()
        assert client.ping()
        time.sleep(3)
        state = info(node)
        assert int(state["rejoins"]) == 0 and set_aside(node) == [], state
        assert "refused this node's empty log" in state["master_link_error"], state
        # Backing off: a few attempts in 3 s, not one every few milliseconds.
        assert 2 <= peer.requests <= 12, peer.requests
        assert client.ping()  # the same connection: no client was closed
    finally:
        node.stop()
        peer.close()


def test_a_directory_that_keeps_the_most_set_aside_logs_stops_the_link(data_dir):
    node = primary_with_a_term(data_dir)
    try:
        epoch = int(info(node)["log_epoch"])
        for n in range(8):
            os.mkdir(os.path.join(node.data_dir, f"diverged-{n}-{1000 + n}"))
        peer = RefusingPeer("-DIVERGED the replica's log went another way" + tail(epoch + 1, 3))
        node.client().execute_command("REPLICAOF", "127.0.0.1", peer.port)
        state = wait_for_error(node, "the most it keeps")
        assert state["master_link_state"] == "stopped", state
        assert int(state["rejoins"]) == 0 and len(set_aside(node)) == 8
        assert node.client().execute_command("STOCK", "tv")[5] == 95
        peer.close()
    finally:
        node.stop()


def test_a_node_restarted_while_starting_over_is_no_primary_until_told(data_dir):
    """A node that set its log aside and had not yet followed the primary is restarted without
    --replica-of (a service manager's plain start): it came up empty and took changes as a primary.
    Now it refuses changes and says why until REPLICAOF NO ONE, or follows a primary given to it."""
    node = primary_with_a_term(data_dir)
    peer = None
    try:
        epoch = int(info(node)["log_epoch"])
        peer = RefusingPeer("-DIVERGED the replica's log went another way" + tail(epoch + 1, 3))
        node.client().execute_command("REPLICAOF", "127.0.0.1", peer.port)
        # It starts over (its log set aside); the peer then refuses its empty log, so it never follows.
        wait_for_error(node, "refused this node's empty log")
        assert len(set_aside(node)) == 1
        assert os.path.exists(os.path.join(node.data_dir, "STARTING-OVER"))
        node.stop()
        node.args = ["--shards", "2"]
        node.start()
        r = node.client()
        with pytest.raises(redis.exceptions.ReadOnlyError):
            r.execute_command("SKU.ADD", "tv", 10)
        assert "was starting over as a replica" in node.logs()
        assert r.execute_command("REPLICAOF", "NO", "ONE") == "OK"
        assert r.execute_command("SKU.ADD", "tv", 10) == "OK"
        assert not os.path.exists(os.path.join(node.data_dir, "STARTING-OVER"))
    finally:
        node.stop()
        if peer:
            peer.close()


def test_a_node_restarted_while_starting_over_follows_the_primary_it_is_given(data_dir):
    primary = Server(os.path.join(data_dir, "primary"), "--shards", "2").start()
    node = primary_with_a_term(data_dir)
    peer = None
    try:
        primary.client().execute_command("SKU.ADD", "cam", 7)
        epoch = int(info(node)["log_epoch"])
        peer = RefusingPeer("-DIVERGED the replica's log went another way" + tail(epoch + 1, 3))
        node.client().execute_command("REPLICAOF", "127.0.0.1", peer.port)
        wait_for_error(node, "refused this node's empty log")
        node.stop()
        node.args = ["--shards", "2", "--replica-of", f"127.0.0.1:{primary.port}"]
        node.start()
        deadline = time.time() + 15
        while os.path.exists(os.path.join(node.data_dir, "STARTING-OVER")) and time.time() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(os.path.join(node.data_dir, "STARTING-OVER"))
        wait_for_stock(node, "cam", 3, 7)
    finally:
        node.stop()
        primary.stop()
        if peer:
            peer.close()


def test_the_starting_over_marker_stays_until_the_node_holds_what_the_primary_had(data_dir):
    """The marker went at the handshake, before any of the primary's history came: killed then and
    started plainly, the node served an almost empty state as a primary's."""
    node = primary_with_a_term(data_dir)
    peers = []
    try:
        epoch = int(info(node)["log_epoch"])
        peers.append(RefusingPeer("-DIVERGED the replica's log went another way" + tail(epoch + 1, 3)))
        node.client().execute_command("REPLICAOF", "127.0.0.1", peers[-1].port)
        wait_for_error(node, "refused this node's empty log")
        marker = os.path.join(node.data_dir, "STARTING-OVER")
        assert os.path.exists(marker)
        # A primary that had 1000 records when the link began and has sent none of them yet.
        peers.append(RefusingPeer(f"+CONTINUE 1 SHARDS 2 EPOCH {epoch + 1} DURABLE 1000", hold=True))
        node.client().execute_command("REPLICAOF", "127.0.0.1", peers[-1].port)
        deadline = time.time() + 10
        while info(node).get("master_link_status") != "up" and time.time() < deadline:
            time.sleep(0.05)
        assert info(node)["master_link_status"] == "up", info(node)
        time.sleep(0.5)
        assert os.path.exists(marker), "the marker went before the node held the primary's history"
    finally:
        node.stop()
        for peer in peers:
            peer.close()
