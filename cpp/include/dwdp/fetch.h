// One-sided fetch kernels (SM-driven NVSHMEM gets).
#pragma once
#include <cstddef>
#include <cstdint>

namespace dwdp {

// Copies `bytes` from `pe`'s copy of the symmetric address `src` into local device memory `dst`, on `stream`,
// with `num_blocks` thread blocks of `threads` threads issuing non-blocking block gets and one quiet per block.
// No host synchronisation; completion is ordered on `stream`.
void getmem(uintptr_t dst, uintptr_t src, size_t bytes, int pe, uintptr_t stream, int num_blocks, int threads);

}  // namespace dwdp
