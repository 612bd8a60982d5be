"""Log blocks and records crafted by hand (docs/FORMAT.md), for a fake primary in the tests."""
import struct


def _table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_T = _table()


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _T[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _name(s):
    s = s.encode() if isinstance(s, str) else s
    return bytes([len(s)]) + s


def _record(kind, body):
    return struct.pack("<BH", kind, len(body)) + body


def sku_added(shard, index, sku, total, limit=0):
    return _record(1, struct.pack("<HIqq", shard, index, total, limit) + _name(sku))


def restocked(shard, index, delta):
    return _record(2, struct.pack("<HIq", shard, index, delta))


def epoch_started(epoch):
    return _record(9, struct.pack("<Q", epoch))


def block(first_lsn, records):
    """A version-2 block, uncompressed: header with its own checksum, then the payload's."""
    payload = b"".join(records)
    header = struct.pack("<IHHIIQI", 0x4B4C4253, 2, 0, len(payload), len(payload), first_lsn, len(records))
    header += struct.pack("<I", crc32c(header))
    return header + struct.pack("<I", crc32c(payload, crc32c(header))) + payload


def bulk(data):
    return b"$%d\r\n" % len(data) + data + b"\r\n"
