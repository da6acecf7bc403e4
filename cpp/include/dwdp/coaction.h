// Fused CAN co-action forward and backward (one warp per sample; see python/dwdp_ops/coaction/fused.py).
//
// Per sample b the induction row is read once into the warp's shared memory (as fp32): from the gathered
// ``induction[b]`` or, with ``ind_ids``, from a table that may be split into shards on several GPUs (row r lives in
// shard r / rows_per_shard at row r % rows_per_shard; the shard bases are local or NVLink peer pointers, so a remote
// row is pulled one-sidedly). Lanes take behaviours t = t0 + lane, t0 = 0, 32, ..., skip masked ones, read the feed
// row and run the micro-MLP of every order with their activations in a shared-memory column of their own; pooled
// sums and weight gradients are warp-level column sums over those activations (no atomics inside a sample, no
// per-sample weight matrix and no [B, T, ...] intermediate in global memory). Backward recomputes the forward.
// Table gradients are added atomically to the owner's gradient shard (remote atomics over NVLink for peers).
#pragma once
#include <cstdint>

namespace dwdp {

constexpr int kCoMaxLayers = 8;
constexpr int kCoMaxShards = 8;

struct CoActionDims {
  int num_layers;
  int din[kCoMaxLayers];
  int dout[kCoMaxLayers];
  int orders;
  int bias;               // 0/1
  int order_independent;  // 0/1
  int paper;              // 0: the reference code (concat orders, no tanh after the last layer); 1: the paper
  int order_width;        // induction floats per order
  int ind_dim;            // D'
  int out_per_order;      // sum of dout
};

// Where induction rows (and their gradients) live. Gathered rows: one shard, rows_per_shard = B, no ids.
struct CoActionRows {
  uint64_t base[kCoMaxShards];  // row storage of each shard (dtype of the op)
  uint64_t grad[kCoMaxShards];  // fp32 gradient of each shard (backward only)
  int64_t rows_per_shard;
  int shards;
};

// dtype: 0 = float32, 1 = bfloat16 (inputs and output); gradients are float32.
void coaction_forward(const CoActionDims& d, int dtype, int B, int T, const CoActionRows& rows, uintptr_t ind_ids,
                      uintptr_t feed, uintptr_t feed_ids, uintptr_t mask, uintptr_t out, uintptr_t stream);
// Gradients: with ind_ids == 0, rows.grad[0] is [B, D'] and is written; else the table gradient shards are
// accumulated atomically. grad_feed is [B, T, D] (written) or, with feed_ids, the feed table gradient (accumulated).
void coaction_backward(const CoActionDims& d, int dtype, int B, int T, const CoActionRows& rows, uintptr_t ind_ids,
                       uintptr_t feed, uintptr_t feed_ids, uintptr_t mask, uintptr_t grad_out, uintptr_t grad_feed,
                       uintptr_t stream);
// Warps per block and dynamic shared memory per block the kernels would use (0 warps: does not fit).
void coaction_launch_shape(const CoActionDims& d, bool backward, int* warps, size_t* smem);

}  // namespace dwdp
