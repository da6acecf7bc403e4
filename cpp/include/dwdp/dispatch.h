// Token dispatch / combine over NVLink (expert parallelism, DEP): the sibling of the weight fetch engines.
// Semantics: docs/dispatch.md and python/dwdp_ops/dispatch_plan.py (the pure reference); every kernel here runs on
// the caller's stream and never synchronises the host.
#pragma once
#include <cstddef>
#include <cstdint>

namespace dwdp {

constexpr int kDispatchMaxRanks = 8;
constexpr int kDispatchMaxTopK = 16;

// One dispatcher's geometry and buffers. Symmetric buffers are given as the address of each rank's copy (the
// NVLink mapping, nvshmem_ptr), index = rank; local buffers as plain device addresses.
struct DispatchArgs {
  int rank, world, hidden, top_k, num_experts, experts_per_rank, stride;
  int max_tokens;     // rows per source in recv_x / comb
  int max_pairs;      // rows of x_grouped
  int align;          // group starts are multiples of align
  int ids_int64;      // topk_ids dtype: int64 (1) or int32 (0)
  int num_blocks, threads;
  long long spin_budget;  // clock cycles a wait may take before it reports and traps
  // symmetric (peer addresses)
  uint64_t recv_x[kDispatchMaxRanks];     // [world][max_tokens][hidden] bf16
  uint64_t recv_meta[kDispatchMaxRanks];  // [world][max_tokens][top_k] int32 local expert (-1 none)
  uint64_t recv_w[kDispatchMaxRanks];     // [world][max_tokens][top_k] float32
  uint64_t recv_count[kDispatchMaxRanks]; // [world] int32 rows each source sent
  uint64_t comb[kDispatchMaxRanks];       // [world][max_tokens][hidden] float32 partial sums from each destination
  uint64_t flags[kDispatchMaxRanks];      // [2][world] uint64: dispatch / combine epochs per source
  // local
  uint64_t send_pos;     // [max_tokens][world] int32
  uint64_t send_count;   // [world] int32
  uint64_t expert_count; // [experts_per_rank] int32 (scratch)
  uint64_t offs;         // [experts_per_rank] int32 group ends
  uint64_t pair_pos;     // [world][max_tokens][top_k] int32 row of the pair in x_grouped (-1 none)
  uint64_t x_grouped;    // [max_pairs][hidden] bf16
  uint64_t epoch;        // [1] uint64 (local step counter) + [1] uint64 block counter + [2] int32 error flag
};

void dispatch_tokens(const DispatchArgs& a, uintptr_t x, uintptr_t topk_ids, uintptr_t topk_weights, int num_tokens,
                     uintptr_t stream);
void combine_tokens(const DispatchArgs& a, uintptr_t y_grouped, uintptr_t out, int num_tokens, uintptr_t stream);

}  // namespace dwdp
