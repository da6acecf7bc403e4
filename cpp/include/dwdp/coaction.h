// Fused CAN co-action forward and backward (one thread block per sample; see python/dwdp_ops/coaction/fused.py).
//
// Per sample b the induction row (table[ind_ids[b]] or induction[b]) is read once into shared memory; each thread
// takes behaviours t = threadIdx.x, threadIdx.x + blockDim.x, ..., skips masked ones, reads the feed row
// (feed_table[feed_ids[b, t]] or feed[b, t]) and runs the micro-MLP for every order with its activations in a
// per-thread shared-memory scratch; no per-sample weight matrix or [B, T, ...] intermediate is written to memory.
// Backward recomputes the forward per behaviour (sum pooling makes the upstream gradient the same for every t).
#pragma once
#include <cstdint>

namespace dwdp {

constexpr int kCoMaxLayers = 8;

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

// dtype: 0 = float32, 1 = bfloat16 (inputs and output); gradients are float32.
void coaction_forward(const CoActionDims& d, int dtype, int B, int T, uintptr_t induction, uintptr_t ind_ids,
                      uintptr_t feed, uintptr_t feed_ids, uintptr_t mask, uintptr_t out, uintptr_t stream);
// grad_ind: [B, D'] when ind_ids == 0, else the [rows, D'] table gradient (atomically accumulated); grad_feed
// likewise [B, T, D] or the feed table gradient.
void coaction_backward(const CoActionDims& d, int dtype, int B, int T, uintptr_t induction, uintptr_t ind_ids,
                       uintptr_t feed, uintptr_t feed_ids, uintptr_t mask, uintptr_t grad_out, uintptr_t grad_ind,
                       uintptr_t grad_feed, uintptr_t stream);

}  // namespace dwdp
