#ifndef STOCKADE_PREFETCH_H
#define STOCKADE_PREFETCH_H

#include <stddef.h>

/// Asks the CPU to start loading the cache line of `address` and returns at once: a hint, never a
/// fault (an address outside the process's memory is ignored), with no effect on what a program
/// computes. Swift has no spelling of its own for the instruction.
static inline void stockade_prefetch(const void *address) {
    __builtin_prefetch(address, 0, 3);
}

/// Maps, writable, every whole page inside `[address, address + length)` that is not mapped yet
/// (`madvise(MADV_POPULATE_WRITE)`, Linux 5.14): the page faults a first write would take, taken
/// now, by the calling thread. Writes nothing a program can see (contents stay as they were, zeros
/// for fresh memory), so it may run while another thread writes the same pages, and on memory that
/// was freed meanwhile (such a range is either unmapped, an error, or another allocation's, which
/// only gets its pages early). Returns 0, or the errno (EINVAL on a kernel without it).
int stockade_populate_write(const void *address, size_t length);

#endif
