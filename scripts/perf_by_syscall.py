#!/usr/bin/env python3
"""Where one thread's CPU samples fall: in which system call, or in user code.

Reads `perf script -F tid,ip,sym` output (a `perf record -g` of the server) on stdin, keeps the samples
of the thread with the most samples (or of `--tid`), and prints each class's share: the system call a
sample's stack enters (the frame just above `entry_SYSCALL_64_after_hwframe`), kernel work outside a
system call (interrupts, page faults), or own code and the Swift runtime ("user").

    perf record -F 2999 -g -p PID -o perf.data -- sleep 5
    perf script -i perf.data -F tid,ip,sym | python3 scripts/perf_by_syscall.py
"""
import argparse
import collections
import sys

KERNEL_LEAF_PREFIXES = ("_raw", "handle_", "exc_", "clear_page", "do_anon", "__handle_mm", "asm_", "irq", "__do_softirq")


def samples(lines):
    """(tid, stack) per sample, innermost frame first."""
    tid, stack = None, []
    for line in lines:
        if not line.strip():
            if tid is not None:
                yield tid, stack
            tid, stack = None, []
        elif not line.startswith("\t"):
            tid, stack = line.split()[0], []
        else:
            parts = line.split(None, 1)
            stack.append(parts[1].strip() if len(parts) > 1 else "?")
    if tid is not None:
        yield tid, stack


def classify(stack):
    for i, frame in enumerate(stack):
        if frame == "entry_SYSCALL_64_after_hwframe":
            return "syscall " + (stack[i + 1] if i + 1 < len(stack) else "?")
    if stack and stack[0].startswith(KERNEL_LEAF_PREFIXES):
        return "kernel, not in a system call"
    return "user (own code and the Swift runtime)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tid", help="the thread to count (default: the one with the most samples)")
    args = parser.parse_args()
    by_thread = collections.defaultdict(collections.Counter)
    total = 0
    for tid, stack in samples(sys.stdin):
        by_thread[tid][classify(stack)] += 1
        total += 1
    if not by_thread:
        sys.exit("no samples on stdin")
    tid = args.tid or max(by_thread, key=lambda t: sum(by_thread[t].values()))
    counts = by_thread[tid]
    n = sum(counts.values())
    print(f"thread {tid}: {n} of {total} samples ({n / total:.1%})")
    for what, count in counts.most_common():
        print(f"{count / n:7.2%}  {what}")


if __name__ == "__main__":
    main()
