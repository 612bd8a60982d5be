"""EVENTS as a consumer needs it (#10), against the real server: `$` for "from now", a position
beyond the end of the log refused with the last position, and RESP3 maps for STOCK, ORDER and
EVENTS entries after HELLO 3 while RESP2 keeps its flat arrays."""
import socket
import threading
import time

import pytest
import redis

from conftest import Server


def read_replies(sock, count, timeout=10):
    """Reads `count` complete RESP2/RESP3 replies from a raw socket; returns their first lines."""
    buffer = b""
    deadline = time.time() + timeout

    def parse(at):
        """Index after the reply starting at `at`, or None when incomplete."""
        end = buffer.find(b"\r\n", at)
        if end < 0:
            return None
        kind, text = buffer[at:at + 1], buffer[at + 1:end]
        nxt = end + 2
        if kind == b"$":
            length = int(text)
            return None if length >= 0 and len(buffer) < nxt + length + 2 else nxt + max(length + 2, 0)
        if kind in (b"*", b"%"):
            elements = int(text) * (2 if kind == b"%" else 1)
            for _ in range(max(elements, 0)):
                nxt = parse(nxt)
                if nxt is None:
                    return None
        return nxt

    starts = []
    while True:
        starts, at = [], 0
        while len(starts) < count:
            after = parse(at)
            if after is None:
                break
            starts.append(buffer[at:buffer.find(b"\r\n", at)])
            at = after
        if len(starts) == count or time.time() > deadline:
            return starts
        sock.settimeout(max(deadline - time.time(), 0.1))
        buffer += sock.recv(65536)


def test_events_dollar_waits_for_the_next_position(server):
    """`EVENTS $` answers nothing already in the log: with BLOCK it returns the first event logged
    after it was sent, whatever its position."""
    r = server.client()
    r.execute_command("SKU.ADD", "tv", 10)
    r.execute_command("RESERVE", "ann", "tv", 1)
    assert r.execute_command("EVENTS", "$") == []
    got = {}

    def follow():
        got["events"] = server.client().execute_command("EVENTS", "$", "BLOCK", 5000)

    t = threading.Thread(target=follow)
    t.start()
    deadline = time.time() + 5
    while time.time() < deadline and r.info("clients")["blocked_events_clients"] != 1:
        time.sleep(0.01)
    order = r.execute_command("RESERVE", "bob", "tv", 2)
    t.join(10)
    assert [(e[0], e[1], e[2]) for e in got["events"]] == [(3, "created", order)]


def test_a_position_beyond_the_end_of_the_log_is_an_error_naming_the_last(data_dir):
    """A consumer's saved position from another log (the data directory replaced by an older copy):
    the old server answered an empty array and the consumer waited forever; now `-BEYOND <last>`,
    at once even with BLOCK. The next position itself is fine (the consumer is caught up)."""
    s = Server(data_dir).start()
    try:
        r = s.client()
        r.execute_command("SKU.ADD", "tv", 10)
        r.execute_command("RESERVE", "ann", "tv", 1)
        assert r.execute_command("EVENTS", 3) == []
        started = time.time()
        with pytest.raises(redis.ResponseError, match=r"^BEYOND 2 position 4 is beyond the end of the log \(last position 2\)"):
            r.execute_command("EVENTS", 4, "BLOCK", 5000)
        assert time.time() - started < 2
        s.stop()
        # The same answer after a restart: the last position is the recovered one.
        s = Server(data_dir).start()
        with pytest.raises(redis.ResponseError, match=r"^BEYOND 2 "):
            s.client().execute_command("EVENTS", 100)
        assert [e[0] for e in s.client().execute_command("EVENTS", 0)] == [1, 2]
    finally:
        s.stop()


def test_resp3_maps_for_stock_order_and_events(server):
    """Under HELLO 3 (redis-py with protocol=3) STOCK, ORDER, ORDERS and EVENTS entries are maps;
    RESP2 clients keep the flat arrays."""
    r2 = server.client()
    r3 = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True, protocol=3)
    r2.execute_command("SKU.ADD", "tv", 10, "LIMIT", 3)
    r2.execute_command("SKU.ADD", "radio", 5)
    order = r3.execute_command("BUY", "ann", "tv", 2, "radio", 1)
    assert r3.execute_command("STOCK", "tv") == {
        "sku": "tv", "total": 10, "available": 8, "reserved": 2, "sold": 0, "limit": 3, "paused": 0}
    assert r2.execute_command("STOCK", "tv") == [
        "sku", "tv", "total", 10, "available", 8, "reserved", 2, "sold", 0, "limit", 3, "paused", 0]
    shown = r3.execute_command("ORDER", order)
    assert shown["id"] == order and shown["user"] == "ann" and shown["state"] == "PENDING"
    assert shown["items"] == {"tv": 2, "radio": 1}
    assert r3.execute_command("ORDERS", "ann") == [shown]
    assert r2.execute_command("ORDER", order)[8:] == ["items", ["tv", 2, "radio", 1]]
    r3.execute_command("CONFIRM", order)
    r3.execute_command("SKU.PAUSE", "radio")
    r3.execute_command("SKU.RESTOCK", "tv", 4)
    r3.execute_command("DEDUCT", "tv", 1)
    events = r3.execute_command("EVENTS", 0)
    assert events == [
        {"position": 1, "type": "sku-added", "sku": "tv", "total": 10, "limit": 3},
        {"position": 2, "type": "sku-added", "sku": "radio", "total": 5, "limit": 0},
        {"position": 3, "type": "created", "order": order, "user": "ann", "deadline": shown["deadline"],
         "items": {"tv": 2, "radio": 1}},
        {"position": 4, "type": "paid", "order": order},
        {"position": 5, "type": "paused", "sku": "radio"},
        {"position": 6, "type": "restocked", "sku": "tv", "delta": 4},
        {"position": 7, "type": "deducted", "sku": "tv", "quantity": 1},
    ]
    assert r2.execute_command("EVENTS", 3, "COUNT", 1) == [[3, "created", order, "ann", shown["deadline"], ["tv", 2, "radio", 1]]]


def test_hello_3_in_a_pipeline_changes_only_the_replies_after_it(server):
    """One write: STOCK, HELLO 3, STOCK, HELLO 2, STOCK. Engine replies are encoded when a round
    ends, so a HELLO that switched the protocol mid-round would have turned the first STOCK into
    a map too; each reply is in the protocol in force when its command was read."""
    server.client().execute_command("SKU.ADD", "tv", 10)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
        c.sendall(b"STOCK tv\r\nHELLO 3\r\nSTOCK tv\r\nHELLO 2\r\nSTOCK tv\r\nEVENTS 0\r\n")
        heads = read_replies(c, 6)
    assert heads == [b"*14", b"%7", b"%7", b"*14", b"*14", b"*1"]
