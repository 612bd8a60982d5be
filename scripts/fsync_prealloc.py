#!/usr/bin/env python3
"""fdatasync after a 500-byte write at the end of the data, by how the file's space was made.

  append     the write grows the file (what the log does today)
  zeros      the file was filled with zeros and synced first; the write overwrites them
  fallocate  posix_fallocate extended the file first (its size too); the write lands in that space
  keepsize   fallocate(FALLOC_FL_KEEP_SIZE) reserved the space without changing the file's size

Usage: python3 scripts/fsync_prealloc.py [--rounds 2] [--writes 2000] [--dir /tmp]
Prints the median and p99 of the fdatasync time per mode, the modes alternating, each round.
"""
import argparse
import ctypes
import os
import time

FALLOC_FL_KEEP_SIZE = 1
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def bench(mode, writes, directory):
    path = os.path.join(directory, "fsync-prealloc-test.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    size = writes * 512 + 4096
    if mode == "zeros":
        os.write(fd, b"\0" * size)
        os.fsync(fd)
    elif mode == "fallocate":
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    elif mode == "keepsize":
        if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, size) != 0:
            raise OSError(ctypes.get_errno(), "fallocate(FALLOC_FL_KEEP_SIZE)")
        os.fsync(fd)
    times = []
    offset = 0
    for _ in range(writes):
        os.pwrite(fd, b"x" * 500, offset)
        offset += 500
        start = time.perf_counter()
        os.fdatasync(fd)
        times.append(time.perf_counter() - start)
    os.close(fd)
    os.unlink(path)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--dir", default="/tmp")
    args = parser.parse_args()
    for _ in range(args.rounds):
        for mode in ("append", "zeros", "fallocate", "keepsize"):
            p50, p99 = bench(mode, args.writes, args.dir)
            print(f"{mode:<9} p50 {p50:.0f} us, p99 {p99:.0f} us")


if __name__ == "__main__":
    main()
