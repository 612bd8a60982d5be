#ifndef STOCKADE_PREFETCH_H
#define STOCKADE_PREFETCH_H

/// Asks the CPU to start loading the cache line of `address` and returns at once: a hint, never a
/// fault (an address outside the process's memory is ignored), with no effect on what a program
/// computes. Swift has no spelling of its own for the instruction.
static inline void stockade_prefetch(const void *address) {
    __builtin_prefetch(address, 0, 3);
}

#endif
