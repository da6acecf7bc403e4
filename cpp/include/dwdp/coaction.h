// Fused CAN co-action forward and backward (see python/dwdp_ops/coaction/fused.py and docs/coaction.md).
//
// Two kernel families, chosen by shape on the host (coaction_launch_shape says which sizes):
//
// Fast path (every layer width and D padded to a multiple of 4 at most 32, and the per-warp shared memory below
// within 227 KiB): a warp per sample, its lanes over the sample's unmasked behaviours (the mask is compacted with
// ballots, so a round holds 32 valid (sample, behaviour) pairs except the last). The sample's induction row is read
// once into the warp's shared memory as fp32, each layer padded to [d_in/4*4, d_out/4*4] with zeros, and reused by
// every behaviour and order; a lane keeps its behaviour's activations in registers, reads the weights as 16-byte
// broadcasts, and stages each layer's output (and, backward, each layer's dz) in its own shared-memory row. Pooled
// sums are column sums over the round's rows; weight gradients are register-tiled column sums of outer products over
// the same rows into the warp's fp32 gradient row: per sample, no global atomics. Table-row gradients: the gathered
// form writes its rows; with ids the warps of a block first add up the rows of equal ids and one warp adds the sum
// (one atomic per element and distinct id per block; remote system-scope atomics for a peer's shard); feed-table
// gradients are summed over the lanes of a round that share a feed id (match_any) and added by one lane with
// 16-byte atomics where D allows.
//
// Specialised path (the CAN reference shape, D = 16, 16 -> 8 -> 4, linear last layer, 1-4 orders): the fast path's
// organisation with every width and the order count compile-time constants, the forward's first layer on the tensor
// cores (split fp16, 16 behaviours a tile; the backward's from one pass over a feed row for all orders), the linear
// last layer once per sample from the pooled h1, and, backward, only the first layer's weight gradient from
// per-behaviour outer products (register tiles over a sample's rounds).
//
// Fallback (wider layers): one warp per sample, 32 behaviours at a time, every lane's activations in a
// shared-memory column, warp column sums (the original kernels). No kernel spin-waits.
//
// Induction rows come from the gathered ``induction[b]`` or, with ``ind_ids``, from a table that may be split into
// shards on several GPUs (row r lives in shard r / rows_per_shard at row r % rows_per_shard; the shard bases are local
// or NVLink peer pointers, so a remote row is pulled one-sidedly). Backward recomputes the forward.
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

// Where induction rows (and their gradients) live. Gathered rows: one shard, rows_per_shard = num_rows = B, no ids.
// num_rows: the induction table's rows (the last shard may end in padding); feed_rows: the feed table's rows (with
// feed ids; >= 1). An induction id outside [0, num_rows) reads a zero row (and adds its gradient nowhere), a feed id
// outside [0, feed_rows) reads (backward: adds into) row 0: no ids make a kernel touch memory outside the tables; the
// range check (check_ids) is what reports them.
struct CoActionRows {
  uint64_t base[kCoMaxShards];  // row storage of each shard (dtype of the op)
  uint64_t grad[kCoMaxShards];  // fp32 gradient of each shard (backward only)
  int64_t rows_per_shard;
  int shards;
  int64_t num_rows;
  int64_t feed_rows;
};

// dtype: 0 = float32, 1 = bfloat16 (inputs and output); gradients are float32.
// check_ids: the range check of both id arrays (ind_ids against num_rows, feed_ids against feed_rows) is launched on
// the stream before the forward, and the host waits for the check alone after launching the forward (which runs
// meanwhile, memory-safe on any ids; see CoActionRows): returns coaction_check_ids's bits (0 when not checked). A
// caller that gets a nonzero result discards the output.
// zero: up to two float32 arrays (address, count of floats; address 0: none) the forward zeroes for a later backward
// (TableGrads): the specialised kernels alongside their work, a share per sample, when an address is 16-byte
// aligned and a sample's share of both is at most 128 KiB; otherwise a cudaMemsetAsync on the stream in front of the
// kernel. Either way they are zero for the work queued on the stream behind the call.
struct CoActionZero {
  uint64_t ptr[2] = {0, 0};
  int64_t n[2] = {0, 0};
};
int coaction_forward(const CoActionDims& d, int dtype, int B, int T, const CoActionRows& rows, uintptr_t ind_ids,
                     uintptr_t feed, uintptr_t feed_ids, uintptr_t mask, uintptr_t out, uintptr_t stream,
                     bool check_ids = false, const CoActionZero& zero = {});
// Gradients: with ind_ids == 0, rows.grad[0] is [B, D'] and is written; else the table gradient shards are
// accumulated atomically. grad_feed is [B, T, D] (written) or, with feed_ids, the feed table gradient (accumulated).
void coaction_backward(const CoActionDims& d, int dtype, int B, int T, const CoActionRows& rows, uintptr_t ind_ids,
                       uintptr_t feed, uintptr_t feed_ids, uintptr_t mask, uintptr_t grad_out, uintptr_t grad_feed,
                       uintptr_t stream);
// Warps per block and dynamic shared memory per block the kernels would use (0 warps: does not fit); *fast (may be
// null) says whether the fast path takes this shape.
void coaction_launch_shape(const CoActionDims& d, bool backward, int* warps, size_t* smem, bool* fast = nullptr);
// Whether the specialised kernels (compile-time widths, two layers with a linear last one; see coaction.cu) take this
// shape; DWDP_COACTION_SPECIALIZED=0 turns them off.
bool coaction_specialized(const CoActionDims& d, bool backward);
// Warps a sample the specialised forward (or backward) takes for B samples of T positions on a GPU of `sms`
// multiprocessors, feed elements of elem bytes (0: the specialised kernels do not take d). 1: one warp a sample, whose
// results do not depend on B; more: a block of that many warps a sample, each a segment of its positions, for batches
// that one warp a sample leaves short of one wave (coaction.cu, spec_forward_kernel / spec_backward_kernel). forced:
// 0 picks; a power of two up to 16 is taken, capped by what a block's shared memory holds; -1 reads
// DWDP_COACTION_SPLIT ("auto" or unset: pick; 1, 2, 4, 8, 16), as the kernels' launches do at every call.
int coaction_split_warps(const CoActionDims& d, bool backward, int elem, int B, int T, int sms, int forced = 0);
// Range check of table ids on the device, stream-ordered (one kernel over both arrays), then the host waits for it:
// returns bit 0 set when an ind_ids entry is outside [0, ind_rows), bit 1 for feed_ids outside [0, feed_rows). A null
// ids pointer (or count 0) is not checked. feed_mask (0: none): the feed ids' float32 [B, T] mask; a feed id where it
// is 0 is not checked (a masked position contributes nothing; the forward passes its mask to its own check).
int coaction_check_ids(uintptr_t ind_ids, int64_t n_ind, int64_t ind_rows, uintptr_t feed_ids, int64_t n_feed,
                       int64_t feed_rows, uintptr_t stream, uintptr_t feed_mask = 0);

}  // namespace dwdp
