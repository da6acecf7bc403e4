// SM-driven one-sided fetch kernels and the pack kernel. See dwdp/fetch.h.
#include <algorithm>
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

// Block-wide copy of n16 16-byte vectors (16-byte aligned pointers), 4 vectors in flight per thread.
__device__ __forceinline__ void block_copy16(uint4* __restrict__ dst, const uint4* __restrict__ src, size_t n16) {
  constexpr int kUnroll = 4;
  size_t i = threadIdx.x;
  const size_t step = blockDim.x;
  for (; i + (kUnroll - 1) * step < n16; i += kUnroll * step) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldcs(src + i + u * step);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) __stcs(dst + i + u * step, v[u]);
  }
  for (; i < n16; i += step) __stcs(dst + i, __ldcs(src + i));
}

__device__ __forceinline__ int id_count(const int32_t* count_dev, int count_cap) {
  return count_dev != nullptr ? min(max(*count_dev, 0), count_cap) : count_cap;
}

// first[e] = the smallest list position holding expert e (first[] preset to a large value by a memset).
__global__ void first_occurrence_kernel(const int32_t* __restrict__ ids, const int32_t* __restrict__ count_dev,
                                        int count_cap, int num_experts, int* __restrict__ first) {
  const int count = id_count(count_dev, count_cap);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    const int e = ids[i];
    if (e >= 0 && e < num_experts) atomicMin(&first[e], i);
  }
}

template <bool kPeerPtr>
__global__ void fetch_experts_kernel(const ExpertCopy* __restrict__ table, int num_experts, int num_tensors,
                                     const int32_t* __restrict__ ids, const int32_t* __restrict__ count_dev,
                                     int count_cap, size_t chunk, int max_chunks, int* __restrict__ err,
                                     const int* __restrict__ first) {
  const int count = id_count(count_dev, count_cap);
  const long long total = static_cast<long long>(count) * num_tensors * max_chunks;
  for (long long w = blockIdx.x; w < total; w += gridDim.x) {
    const int c = static_cast<int>(w % max_chunks);
    const int t = static_cast<int>((w / max_chunks) % num_tensors);
    const int i = static_cast<int>(w / (static_cast<long long>(max_chunks) * num_tensors));
    const int e = ids[i];
    if (e < 0 || e >= num_experts) {
      if (threadIdx.x == 0 && err != nullptr && atomicCAS(err, 0, 1) == 0) err[1] = e;
      continue;
    }
    if (first != nullptr && first[e] != i) continue;  // a repeat: fetched by its first occurrence
    const ExpertCopy cp = table[static_cast<size_t>(e) * num_tensors + t];
    const size_t off = static_cast<size_t>(c) * chunk;
    if (cp.pe < 0 || off >= cp.bytes) continue;
    const size_t n = cp.bytes - off < chunk ? cp.bytes - off : chunk;
    if constexpr (kPeerPtr) {
      block_copy16(reinterpret_cast<uint4*>(cp.dst + off), reinterpret_cast<const uint4*>(cp.src_peer + off), n / 16);
      // the tail of a tensor whose size is not a multiple of 16 bytes (only the last chunk has one), byte by byte
      for (size_t b = (n & ~size_t(15)) + threadIdx.x; b < n; b += blockDim.x)
        reinterpret_cast<char*>(cp.dst + off)[b] = reinterpret_cast<const char*>(cp.src_peer + off)[b];
    } else {
      nvshmemx_getmem_nbi_block(reinterpret_cast<void*>(cp.dst + off), reinterpret_cast<const void*>(cp.src + off), n,
                                cp.pe);
    }
  }
  if constexpr (!kPeerPtr) nvshmem_quiet();
}

__global__ void pack_kernel(uint4* __restrict__ dst, size_t dst_stride16, const uint64_t* __restrict__ src_table,
                            size_t n16) {
  const int e = blockIdx.y;
  const uint4* src = reinterpret_cast<const uint4*>(src_table[e]);
  uint4* out = dst + e * dst_stride16;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n16;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = src[i];
}

}  // namespace

void getmem(uintptr_t dst, uintptr_t src, size_t bytes, int pe, uintptr_t stream, int num_blocks, int threads) {
  require_initialized("getmem");
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

void ce_copy(const uint64_t* dsts, const uint64_t* srcs, const uint64_t* sizes, size_t n, uintptr_t stream,
             bool batched) {
  require_initialized("ce_copy");
  if (n == 0) return;
  DeviceGuard guard(device());
  auto s = reinterpret_cast<cudaStream_t>(stream);
  // cudaMemcpyBatchAsync refuses the legacy default stream (cudaErrorInvalidValue): copy one by one there.
  if (!batched || s == nullptr) {
    for (size_t i = 0; i < n; ++i)
      DWDP_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(dsts[i]), reinterpret_cast<const void*>(srcs[i]),
                                      sizes[i], cudaMemcpyDeviceToDevice, s));
    return;
  }
  cudaMemcpyAttributes attr = {};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  size_t attr_idx = 0;
#if CUDART_VERSION >= 13000
  DWDP_CUDA_CHECK(cudaMemcpyBatchAsync(reinterpret_cast<void* const*>(dsts), reinterpret_cast<const void* const*>(srcs),
                                       reinterpret_cast<const size_t*>(sizes), n, &attr, &attr_idx, 1, s));
#else
  size_t fail_idx = 0;
  DWDP_CUDA_CHECK(cudaMemcpyBatchAsync(reinterpret_cast<void**>(const_cast<uint64_t*>(dsts)),
                                       reinterpret_cast<void**>(const_cast<uint64_t*>(srcs)),
                                       reinterpret_cast<size_t*>(const_cast<uint64_t*>(sizes)), n, &attr, &attr_idx, 1,
                                       &fail_idx, s));
#endif
}

void fetch_experts(uintptr_t table, int num_experts, int num_tensors, uintptr_t ids, uintptr_t count_dev,
                   int count_cap, size_t chunk, int max_chunks, uintptr_t err, uintptr_t first, bool peer_ptr,
                   int num_blocks, int threads, uintptr_t stream) {
  require_initialized("fetch_experts");
  DWDP_REQUIRE(num_blocks >= 1 && num_blocks <= 65535, "fetch_experts: num_blocks must be in [1, 65535]");
  DWDP_REQUIRE(threads >= 32 && threads <= 1024 && threads % 32 == 0, "fetch_experts: bad thread count " << threads);
  DWDP_REQUIRE(chunk >= 16 && chunk % 16 == 0, "fetch_experts: chunk must be a positive multiple of 16 bytes");
  DWDP_REQUIRE(num_experts > 0 && num_tensors > 0 && max_chunks > 0, "fetch_experts: empty layer description");
  if (count_cap <= 0) return;
  DeviceGuard guard(device());
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* tab = reinterpret_cast<const ExpertCopy*>(table);
  auto* id = reinterpret_cast<const int32_t*>(ids);
  auto* cnt = reinterpret_cast<const int32_t*>(count_dev);
  auto* e = reinterpret_cast<int*>(err);
  auto* f = reinterpret_cast<int*>(first);
  if (f != nullptr) {
    DWDP_CUDA_CHECK(cudaMemsetAsync(f, 0x7f, sizeof(int) * static_cast<size_t>(num_experts), s));  // 0x7f7f7f7f
    first_occurrence_kernel<<<std::min((count_cap + 255) / 256, 1024), 256, 0, s>>>(id, cnt, count_cap, num_experts, f);
    DWDP_LAUNCH_CHECK();
  }
  if (peer_ptr)
    fetch_experts_kernel<true><<<num_blocks, threads, 0, s>>>(tab, num_experts, num_tensors, id, cnt, count_cap, chunk,
                                                              max_chunks, e, f);
  else
    fetch_experts_kernel<false><<<num_blocks, threads, 0, s>>>(tab, num_experts, num_tensors, id, cnt, count_cap,
                                                               chunk, max_chunks, e, f);
  DWDP_LAUNCH_CHECK();
}

void pack_experts(uintptr_t dst, size_t dst_stride, uintptr_t src_table, size_t bytes, int n, uintptr_t stream) {
  DWDP_REQUIRE(dst % 16 == 0 && dst_stride % 16 == 0 && bytes % 16 == 0,
               "pack_experts: destination, stride and size must be multiples of 16 bytes");
  DWDP_REQUIRE(bytes <= dst_stride, "pack_experts: " << bytes << " bytes do not fit a stride of " << dst_stride);
  DWDP_REQUIRE(n >= 0 && n <= 65535, "pack_experts: at most 65535 experts per call");
  if (n == 0 || bytes == 0) return;
  DeviceGuard guard(device_of(dst, "pack_experts: destination"));
  const size_t n16 = bytes / 16;
  const int threads = 256;
  const int bx = static_cast<int>(std::min<size_t>((n16 + threads - 1) / threads, 1024));
  pack_kernel<<<dim3(bx, n), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<uint4*>(dst), dst_stride / 16, reinterpret_cast<const uint64_t*>(src_table), n16);
  DWDP_LAUNCH_CHECK();
}

}  // namespace dwdp
