#!/usr/bin/env python3
"""fdatasync after a 500-byte append, against the same write into a file already filled with zeros.

Usage: python3 scripts/fsync_prealloc.py  (writes a scratch file in /tmp)
"""
import os, time
def bench(prealloc, n=2000):
    path = "/tmp/fsync-test.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    if prealloc:
        os.write(fd, b"\0" * (n * 512 + 4096)); os.fsync(fd); os.lseek(fd, 0, 0)
    t = []
    for i in range(n):
        os.write(fd, b"x" * 500)
        t0 = time.perf_counter(); os.fdatasync(fd); t.append(time.perf_counter() - t0)
    os.close(fd); os.unlink(path)
    t.sort(); return t[len(t)//2]*1e6, t[int(len(t)*0.99)]*1e6
for p in (False, True, False, True):
    print("prealloc" if p else "append  ", "p50 %.0f us, p99 %.0f us" % bench(p))
