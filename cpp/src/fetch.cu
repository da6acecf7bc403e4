// SM-driven one-sided fetch: every block pulls a contiguous chunk with a non-blocking block get, then one quiet.
#include <nvshmem.h>
#include <nvshmemx.h>

#include "dwdp/check.h"
#include "dwdp/fetch.h"
#include "dwdp/runtime.h"

namespace dwdp {
namespace {

__global__ void getmem_kernel(char* __restrict__ dst, const char* __restrict__ src, size_t bytes, int pe) {
  // 256-byte aligned chunks keep every block's transfer on whole 16-byte vectors.
  const size_t per_block = ((bytes + gridDim.x - 1) / gridDim.x + 255) & ~size_t(255);
  const size_t off = per_block * blockIdx.x;
  if (off < bytes) {
    const size_t n = per_block < bytes - off ? per_block : bytes - off;
    nvshmemx_getmem_nbi_block(dst + off, src + off, n, pe);
  }
  nvshmem_quiet();
}

}  // namespace

void getmem(uintptr_t dst, uintptr_t src, size_t bytes, int pe, uintptr_t stream, int num_blocks, int threads) {
  DWDP_REQUIRE(device() >= 0, "getmem: the NVSHMEM runtime is not initialized");
  DWDP_REQUIRE(pe >= 0 && pe < n_pes(), "getmem: pe must be in [0, " << n_pes() << "), got " << pe);
  DWDP_REQUIRE(num_blocks >= 1 && num_blocks <= 65535, "getmem: num_blocks must be in [1, 65535], got " << num_blocks);
  DWDP_REQUIRE(threads >= 32 && threads <= 1024 && threads % 32 == 0,
               "getmem: threads must be a multiple of 32 in [32, 1024], got " << threads);
  if (bytes == 0) return;
  DeviceGuard guard(device());
  getmem_kernel<<<num_blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(src), bytes, pe);
  DWDP_LAUNCH_CHECK();
}

}  // namespace dwdp
