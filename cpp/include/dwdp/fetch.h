// One-sided expert fetch: the copy-engine executor and the SM-driven NVSHMEM kernel, plus the pack kernel that
// builds a rank's local expert layout. Plans (what to copy where) are made in Python (dwdp_ops.fetch); these
// functions only execute them, on a caller's stream, without host synchronisation.
#pragma once
#include <cstddef>
#include <cstdint>

namespace dwdp {

// One (expert, tensor) copy of a layer: `src` is this tensor's symmetric address on the owner `pe` (or its peer
// mapping, see fetch_experts), `dst` the local destination. pe < 0 marks a local expert, which is skipped.
struct ExpertCopy {
  uint64_t src;
  uint64_t src_peer;
  uint64_t dst;
  uint64_t bytes;
  int32_t pe;
  int32_t pad;
};

// Copies `bytes` from `pe`'s copy of the symmetric address `src` into local device memory `dst`, on `stream`,
// with `num_blocks` thread blocks of `threads` threads issuing non-blocking block gets and one quiet per block.
void getmem(uintptr_t dst, uintptr_t src, size_t bytes, int pe, uintptr_t stream, int num_blocks, int threads);

// Copy engine: n copies dsts[i] <- srcs[i] of sizes[i] bytes (host arrays), either one cudaMemcpyAsync each or
// one cudaMemcpyBatchAsync for all of them (on a non-default stream; on stream 0 the copies go one by one).
void ce_copy(const uint64_t* dsts, const uint64_t* srcs, const uint64_t* sizes, size_t n, uintptr_t stream,
             bool batched);

// Fetches, for every id in the device list ids[0:count], the remote tensors described by table[id * num_tensors +
// t] (a device array of num_experts * num_tensors ExpertCopy). count is *count_dev when count_dev is not 0 (read on
// the device, clamped to count_cap), else count_cap. Ids outside [0, num_experts) are skipped and recorded in
// err[0] (flag) / err[1] (the id). peer_ptr: copy through the P2P mapping (src_peer) with vector loads instead of
// nvshmemx_getmem_nbi_block. `chunk` bytes per work item; max_chunks = ceil(max bytes / chunk).
// `first` (a device int32 scratch of num_experts, or 0): when given, an expert named several times in the list (a
// router's ids) is fetched once, by its first occurrence; a memset and a pass over the ids find it on the stream.
void fetch_experts(uintptr_t table, int num_experts, int num_tensors, uintptr_t ids, uintptr_t count_dev,
                   int count_cap, size_t chunk, int max_chunks, uintptr_t err, uintptr_t first, bool peer_ptr,
                   int num_blocks, int threads, uintptr_t stream);

// Pack: dst + e * dst_stride <- (bytes at src_table[e]) for e in [0, n); src_table is a device array of n
// pointers. Needs 16-byte aligned pointers, stride and size.
void pack_experts(uintptr_t dst, size_t dst_stride, uintptr_t src_table, size_t bytes, int n, uintptr_t stream);

}  // namespace dwdp
