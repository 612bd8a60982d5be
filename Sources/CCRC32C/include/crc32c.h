#ifndef STOCKADE_CRC32C_H
#define STOCKADE_CRC32C_H
#include <stddef.h>
#include <stdint.h>

/// CRC32C (Castagnoli) of `length` bytes, continuing from `crc` (start with 0).
/// Uses the SSE4.2 instruction when the CPU has it, a table otherwise; both give the same value.
uint32_t stockade_crc32c(uint32_t crc, const void *data, size_t length);

#endif
