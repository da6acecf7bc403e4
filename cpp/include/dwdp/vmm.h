// CUDA virtual memory management (driver API reached through cudaGetDriverEntryPointByVersion, so the module
// links no libcuda and imports without a driver).
//
// Physical allocations are pinned device memory exportable as POSIX file descriptors: the only kind that
// nvshmemx_buffer_register_symmetric accepts on our machines (gpu-machines.md).
#pragma once
#include <cstddef>
#include <cstdint>

namespace dwdp {

// Recommended allocation granularity (2 MiB on Hopper) of `device`.
size_t vmm_granularity(int device);
// A physical allocation of `bytes` (a multiple of the granularity) on `device`; returns the handle.
uint64_t vmm_create(size_t bytes, int device);
void vmm_release(uint64_t handle);
// A reserved virtual address range of `bytes`, aligned to `alignment` (0 = granularity).
uintptr_t vmm_reserve(size_t bytes, size_t alignment);
void vmm_free(uintptr_t va, size_t bytes);
// Maps `bytes` of `handle` starting at `offset` to `va` and grants `device` read/write access; if granting fails,
// the mapping is undone before the error is raised (the range is left as it was).
void vmm_map(uintptr_t va, size_t bytes, uint64_t handle, size_t offset, int device);
void vmm_unmap(uintptr_t va, size_t bytes);

}  // namespace dwdp
