#!/usr/bin/env python3
"""fdatasync after a write at the end of the data, by how the file's space was made.

  append     the write grows the file
  zeros      the file was filled with zeros and synced first; the write overwrites them (what the log
             does since dde7793: zeros written a megabyte ahead)
  fallocate  posix_fallocate extended the file first (its size too); the write lands in that space,
             which ext4 keeps marked unwritten until a sync records it written (the log before dde7793)
  keepsize   fallocate(FALLOC_FL_KEEP_SIZE) reserved the space without changing the file's size
  direct     as zeros, but the file is opened O_DIRECT | O_DSYNC: each write bypasses the page cache and
             returns once durable, with no fdatasync after it (--bytes must be a multiple of 4096)

Usage: python3 scripts/fsync_prealloc.py [--rounds 2] [--writes 2000] [--bytes 500] [--dir /tmp] [--modes a,b]
Prints, per mode and round (the modes alternating): the median and p99 of the fdatasync time, and the
CPU the whole machine spent per write + sync (/proc/stat, every core: the sync's kernel work runs partly
in other threads, such as ext4's journal thread). A log batch at RESERVE -P16 is 6-16 KB, at -P1 about
1 KB.
"""
import argparse
import ctypes
import mmap
import os
import time

FALLOC_FL_KEEP_SIZE = 1
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def machine_busy():
    """Busy seconds of all cores (user, nice, system, irq, softirq) from /proc/stat."""
    fields = list(map(int, open("/proc/stat").readline().split()[1:]))
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")


def bench(mode, writes, size, directory):
    path = os.path.join(directory, "fsync-prealloc-test.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    total = writes * size + 4096
    if mode in ("zeros", "direct"):
        for start in range(0, total, 1 << 20):
            os.write(fd, b"\0" * min(1 << 20, total - start))
        os.fsync(fd)
    elif mode == "fallocate":
        os.posix_fallocate(fd, 0, total)
        os.fsync(fd)
    elif mode == "keepsize":
        if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, total) != 0:
            raise OSError(ctypes.get_errno(), "fallocate(FALLOC_FL_KEEP_SIZE)")
        os.fsync(fd)
    data = b"x" * size
    if mode == "direct":
        os.close(fd)
        fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
        data = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT requires
        data.write(b"x" * size)
    times = []
    offset = 0
    busy = machine_busy()
    for _ in range(writes):
        if mode == "direct":
            # The write is the sync: timed whole (the other modes time only the fdatasync).
            start = time.perf_counter()
            os.pwritev(fd, [data], offset)
            offset += size
        else:
            os.pwrite(fd, data, offset)
            offset += size
            start = time.perf_counter()
            os.fdatasync(fd)
        times.append(time.perf_counter() - start)
    busy = machine_busy() - busy
    os.close(fd)
    os.unlink(path)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6, busy / writes * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--bytes", type=int, default=500, help="bytes per write (default 500)")
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--modes", default="append,zeros,fallocate,keepsize", help="comma-separated, in turn")
    args = parser.parse_args()
    for _ in range(args.rounds):
        for mode in args.modes.split(","):
            p50, p99, cpu = bench(mode, args.writes, args.bytes, args.dir)
            print(f"{mode:<9} p50 {p50:.0f} us, p99 {p99:.0f} us, machine CPU {cpu:.0f} us per write + sync")


if __name__ == "__main__":
    main()
