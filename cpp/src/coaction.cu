// Fused CAN co-action kernels. See dwdp/coaction.h for the two kernel families (fast path, fallback).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>

#include "dwdp/check.h"
#include "dwdp/coaction.h"

namespace dwdp {
namespace {

constexpr int kWarpsMax = 4;
// Column stride of the per-lane scratch: lane m's value k lives at scratch[k * kLd + m]. With an odd stride, lanes
// touching the same k hit distinct banks (the MLP), and so do lanes touching distinct k at one m (column sums).
constexpr int kLd = 33;
constexpr size_t kSmemMax = 227 * 1024;

__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }

// The feed-table row of the id at pos. An id outside [0, rows) reads (backward: adds into) row 0 instead: the kernels
// never touch memory outside the table, whatever the ids (check_ids rejects such ids; without it the result is wrong,
// not a fault). rows >= 1 (the host refuses an empty table with ids).
__device__ __forceinline__ size_t feed_row(const int64_t* __restrict__ ids, size_t pos, int64_t rows) {
  const int64_t v = ids[pos];
  return static_cast<uint64_t>(v) < static_cast<uint64_t>(rows) ? static_cast<size_t>(v) : 0;
}

// Per-warp shared memory, in floats: W[ind_dim] | gW[ind_dim] (backward) | vec[n_out] (acc or grad_out) | scratch.
// Scratch rows (x kLd): valid | x0[D] | h[D + S] (h_0 = x^c, then each layer's output) | dz[S] | gx[D] (backward).
struct Geo {
  int D, S, n_out;
  int w, gw, vec, scratch;
  int valid, x0, h, dz, gx;
  int per_warp;
  __host__ __device__ Geo(const CoActionDims& d, bool backward) {
    D = d.din[0];
    S = d.out_per_order;
    n_out = d.paper ? S : d.orders * S;
    w = 0;
    gw = d.ind_dim;
    vec = gw + (backward ? d.ind_dim : 0);
    scratch = vec + n_out;
    valid = 0;
    x0 = 1;
    h = x0 + D;
    dz = h + D + S;
    gx = dz + S;
    const int rows = backward ? gx + D : dz;
    per_warp = scratch + rows * kLd;
  }
};

__device__ __forceinline__ float& R(float* col, int row) { return col[row * kLd]; }

__device__ __forceinline__ bool activated(const CoActionDims& d, int layer) {
  return d.paper || layer < d.num_layers - 1;
}

// Forward of order c for this lane's behaviour: h_0 = x0 ** c, then every layer's output, into the lane's column.
// A lane without a behaviour (masked, or past the row) gets zeros in every row: computed from its zero x0, an
// infinite weight would make them NaN, and the column sums (forward: h times the 0 of `valid`; backward: h times
// dz = 0) would carry the NaN into the sample's results, where the reference, which leaves such positions out, has
// none.
__device__ void lane_mlp(const CoActionDims& d, const Geo& g, const float* __restrict__ W, int c, float* col,
                         bool on) {
  if (!on) {
    for (int r = g.h; r < g.h + g.D + g.S; ++r) R(col, r) = 0.f;
    return;
  }
  for (int i = 0; i < g.D; ++i) {
    const float v = R(col, g.x0 + i);
    float p = v;
    for (int k = 1; k < c; ++k) p *= v;
    R(col, g.h + i) = p;
  }
  int woff = d.order_independent ? (c - 1) * d.order_width : 0;
  int in = g.h, out = g.h + g.D;
  for (int l = 0; l < d.num_layers; ++l) {
    const int di = d.din[l], dn = d.dout[l];
    const float* w = W + woff;
    const bool act = activated(d, l);
    for (int j0 = 0; j0 < dn; j0 += 4) {
      float z[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) z[q] = (d.bias && j0 + q < dn) ? w[di * dn + j0 + q] : 0.f;
      for (int i = 0; i < di; ++i) {
        const float a = R(col, in + i);
#pragma unroll
        for (int q = 0; q < 4; ++q)
          if (j0 + q < dn) z[q] = fmaf(a, w[i * dn + j0 + q], z[q]);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q)
        if (j0 + q < dn) R(col, out + j0 + q) = act ? tanhf(z[q]) : z[q];
    }
    woff += di * dn + (d.bias ? dn : 0);
    in = out;
    out += dn;
  }
}

// Sum over the warp's 32 columns of scratch[ra + i] * scratch[rb + j] (rb < 0: the factor is 1).
__device__ __forceinline__ float colsum(const float* scratch, int ra, int rb) {
  float s = 0.f;
  const float* a = scratch + ra * kLd;
  if (rb < 0) {
#pragma unroll 8
    for (int m = 0; m < 32; ++m) s += a[m];
  } else {
    const float* b = scratch + rb * kLd;
#pragma unroll 8
    for (int m = 0; m < 32; ++m) s = fmaf(a[m], b[m], s);
  }
  return s;
}

template <typename T>
__device__ __forceinline__ const T* induction_row(const CoActionRows& r, const int64_t* ids, int b, int ind_dim,
                                                  int* shard, int64_t* local) {
  const int64_t row = ids ? ids[b] : b;
  *shard = 0, *local = 0;
  // an id outside the table: a zero row, never a read out of range (the range check reports it)
  if (static_cast<uint64_t>(row) >= static_cast<uint64_t>(r.num_rows)) return nullptr;
  // one shard (every table but a ShardedTable): no 64-bit division, a ~100-instruction routine on the GPU
  *shard = r.shards == 1 ? 0 : static_cast<int>(row / r.rows_per_shard);
  *local = r.shards == 1 ? row : row - static_cast<int64_t>(*shard) * r.rows_per_shard;
  return reinterpret_cast<const T*>(r.base[*shard]) + *local * ind_dim;
}

template <typename T>
__device__ __forceinline__ void load_x0(const CoActionDims& d, const Geo& g, int b, int T_len, int t, const T* feed,
                                        const int64_t* feed_ids, int64_t feed_rows, const float* mask, float* col,
                                        size_t* frow) {
  const bool on = t < T_len && mask[static_cast<size_t>(b) * T_len + t] != 0.f;
  R(col, g.valid) = on ? 1.f : 0.f;
  *frow = 0;
  if (on) *frow = feed_ids ? feed_row(feed_ids, static_cast<size_t>(b) * T_len + t, feed_rows)
                           : static_cast<size_t>(b) * T_len + t;
  for (int i = 0; i < g.D; ++i) R(col, g.x0 + i) = on ? ld(feed, *frow * g.D + i) : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kWarpsMax * 32) warp_forward_kernel(CoActionDims d, Geo g, int B, int T_len, CoActionRows rows,
                                                                 const int64_t* __restrict__ ind_ids,
                                                                 const T* __restrict__ feed,
                                                                 const int64_t* __restrict__ feed_ids,
                                                                 const float* __restrict__ mask, T* __restrict__ out) {
  extern __shared__ __align__(16) float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = blockIdx.x * (blockDim.x >> 5) + warp;
  if (b >= B) return;  // warps are independent: no block-wide barrier below
  float* base = smem + static_cast<size_t>(warp) * g.per_warp;
  float* W = base + g.w;
  float* acc = base + g.vec;
  float* scratch = base + g.scratch;
  float* col = scratch + lane;
  int shard;
  int64_t local;
  const T* row = induction_row<T>(rows, ind_ids, b, d.ind_dim, &shard, &local);
  for (int i = lane; i < d.ind_dim; i += 32) W[i] = row ? ld(row, i) : 0.f;
  for (int i = lane; i < g.n_out; i += 32) acc[i] = 0.f;
  __syncwarp();
  for (int t0 = 0; t0 < T_len; t0 += 32) {
    size_t frow;
    load_x0(d, g, b, T_len, t0 + lane, feed, feed_ids, rows.feed_rows, mask, col, &frow);
    for (int c = 1; c <= d.orders; ++c) {
      lane_mlp(d, g, W, c, col, R(col, g.valid) != 0.f);
      __syncwarp();
      const int obase = d.paper ? 0 : (c - 1) * g.S;
      for (int j = lane; j < g.S; j += 32) acc[obase + j] += colsum(scratch, g.h + g.D + j, g.valid);
      __syncwarp();
    }
  }
  for (int i = lane; i < g.n_out; i += 32) st(out, static_cast<size_t>(b) * g.n_out + i, acc[i]);
}

template <typename T>
__global__ void __launch_bounds__(kWarpsMax * 32) warp_backward_kernel(CoActionDims d, Geo g, int B, int T_len, CoActionRows rows,
                                                                  const int64_t* __restrict__ ind_ids,
                                                                  const T* __restrict__ feed,
                                                                  const int64_t* __restrict__ feed_ids,
                                                                  const float* __restrict__ mask,
                                                                  const float* __restrict__ grad_out,
                                                                  float* __restrict__ grad_feed) {
  extern __shared__ __align__(16) float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = blockIdx.x * (blockDim.x >> 5) + warp;
  if (b >= B) return;
  float* base = smem + static_cast<size_t>(warp) * g.per_warp;
  float* W = base + g.w;
  float* gW = base + g.gw;
  float* G = base + g.vec;
  float* scratch = base + g.scratch;
  float* col = scratch + lane;
  int shard;
  int64_t local;
  const T* row = induction_row<T>(rows, ind_ids, b, d.ind_dim, &shard, &local);
  if (!row) return;
  for (int i = lane; i < d.ind_dim; i += 32) {
    W[i] = ld(row, i);
    gW[i] = 0.f;
  }
  for (int i = lane; i < g.n_out; i += 32) G[i] = grad_out[static_cast<size_t>(b) * g.n_out + i];
  __syncwarp();
  const int L = d.num_layers;
  // row of layer l's input in the scratch (h_0 = x^c for l = 0), and offset of layer l's output inside S
  int hin[kCoMaxLayers], goff[kCoMaxLayers];
  for (int l = 0, r = g.h, o = 0; l < L; ++l) {
    hin[l] = r;
    goff[l] = o;
    r += l == 0 ? g.D : d.dout[l - 1];
    o += d.dout[l];
  }
  for (int t0 = 0; t0 < T_len; t0 += 32) {
    size_t frow;
    load_x0(d, g, b, T_len, t0 + lane, feed, feed_ids, rows.feed_rows, mask, col, &frow);
    const float v = R(col, g.valid);
    for (int i = 0; i < g.D; ++i) R(col, g.gx + i) = 0.f;
    for (int c = 1; c <= d.orders; ++c) {
      lane_mlp(d, g, W, c, col, v != 0.f);
      const float* Gc = G + (d.paper ? 0 : (c - 1) * g.S);
      int woff[kCoMaxLayers];
      for (int l = 0, w = d.order_independent ? (c - 1) * d.order_width : 0; l < L; ++l) {
        woff[l] = w;
        w += d.din[l] * d.dout[l] + (d.bias ? d.dout[l] : 0);
      }
      // dz of each layer (gradient at its pre-activation), last layer first; masked lanes get 0
      for (int l = L - 1; l >= 0; --l) {
        const int dn = d.dout[l];
        const int hout = g.h + g.D + goff[l];
        for (int j = 0; j < dn; ++j) {
          float up = Gc[goff[l] + j];  // the pooled output of every layer is part of the result
          if (l < L - 1) {
            const int dn2 = d.dout[l + 1];
            const float* w2 = W + woff[l + 1] + j * dn2;
            for (int k = 0; k < dn2; ++k) up = fmaf(R(col, g.dz + goff[l + 1] + k), w2[k], up);
          }
          const float hv = R(col, hout + j);
          // (a select, not v times: up of a lane without a behaviour is 0 times a weight, NaN for an infinite one)
          R(col, g.dz + goff[l] + j) = v != 0.f ? (activated(d, l) ? up * (1.f - hv * hv) : up) : 0.f;
        }
      }
      // d/dx0 of x0^c through the first layer
      {
        const int dn = d.dout[0];
        for (int i = 0; i < g.D; ++i) {
          float s = 0.f;
          const float* w0 = W + woff[0] + i * dn;
          for (int j = 0; j < dn; ++j) s = fmaf(R(col, g.dz + j), w0[j], s);
          const float x = R(col, g.x0 + i);
          float p = static_cast<float>(c);
          for (int k = 1; k < c; ++k) p *= x;
          R(col, g.gx + i) = fmaf(s, p, R(col, g.gx + i));
        }
      }
      __syncwarp();
      // weight (and bias) gradients: column sums of outer products, each entry owned by one lane
      for (int l = 0; l < L; ++l) {
        const int di = d.din[l], dn = d.dout[l];
        for (int k = lane; k < di * dn; k += 32)
          gW[woff[l] + k] += colsum(scratch, hin[l] + k / dn, g.dz + goff[l] + k % dn);
        if (d.bias)
          for (int j = lane; j < dn; j += 32) gW[woff[l] + di * dn + j] += colsum(scratch, g.dz + goff[l] + j, -1);
      }
      __syncwarp();
    }
    if (v != 0.f) {
      if (feed_ids) {
        for (int i = 0; i < g.D; ++i) atomicAdd(&grad_feed[frow * g.D + i], R(col, g.gx + i));
      } else {
        for (int i = 0; i < g.D; ++i) grad_feed[frow * g.D + i] = R(col, g.gx + i);
      }
    }
  }
  __syncwarp();
  float* gdst = reinterpret_cast<float*>(rows.grad[shard]) + local * d.ind_dim;
  for (int i = lane; i < d.ind_dim; i += 32) {
    if (ind_ids)
      atomicAdd_system(&gdst[i], gW[i]);  // maybe a peer's shard: system scope, so peers' adds are atomic with ours
    else
      gdst[i] = gW[i];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Fast path: a warp per sample, lanes over its unmasked behaviours, activations in registers, weights padded in
// shared memory (see dwdp/coaction.h).

constexpr int kFastWarps = 4;   // most warps (samples) per block; fewer when one warp needs > 227 KiB / 4
// The split kernels (a batch too small to fill the GPU with one warp a sample): a block of K warps a sample, each warp
// a segment of the sample's 32-position chunks (warp k: chunks [k n / K, (k + 1) n / K) of n; a segment may be empty),
// the segments' sums added in warp order (deterministic for a given K; rounding differs from K = 1's). The launch
// picks K from B and T (split_warps, below); DWDP_COACTION_SPLIT forces it.
constexpr int kSplitMax = 16;  // warps a sample at most
constexpr size_t kSplitStatic = sizeof(int64_t) * kSplitMax;  // the split backward's static shared memory (blk_row)
constexpr int kQueue = 64;      // compacted behaviour indices a warp may hold: up to 31 left over + 32 new
constexpr int kFastMaxW = 32;   // widest padded layer (and D) the register path takes

__host__ __device__ constexpr int pad4(int x) { return (x + 3) & ~3; }

struct Fast {
  int L, C, bias, oi, paper;
  int D, Dp, S, Sp, n_out, outs;  // outs: pooled blocks of Sp (1 for the paper variant, else C)
  int din[kCoMaxLayers], dout[kCoMaxLayers], dip[kCoMaxLayers], dnp[kCoMaxLayers];
  int woff[kCoMaxLayers];   // padded offset of layer l in a slice ([dip][dnp] weights, then [dnp] bias)
  int uoff[kCoMaxLayers];   // unpadded offset of layer l in an order's slice of the induction row
  int goff[kCoMaxLayers], goffp[kCoMaxLayers];  // output offset of layer l in an order (unpadded, padded)
  int tile[kCoMaxLayers];   // weight-gradient register tile (1, 2 or 4 square) of layer l
  int wslice, slices, order_width, ind_dim, MW;
  int RS;                   // staging row stride (floats): a multiple of 4 with RS / 4 odd (conflict-free 16 B rows)
  int rH0, rH, rDZ, rGX;    // staging row layout: x^c [Dp] | layer outputs [Sp] | dz [Sp] | d feed [Dp] (backward)
  int oW, oGW, oVec, oQ, oStage, per_warp;  // per-warp shared memory (floats): W | gW | acc or G | queue | rows
  int feed_vec, gfeed_vec;  // 16-byte feed loads / grad_feed stores are aligned (set at launch)
};

Fast make_fast(const CoActionDims& d, bool backward) {
  Fast f{};
  f.L = d.num_layers;
  f.C = d.orders;
  f.bias = d.bias;
  f.oi = d.order_independent;
  f.paper = d.paper;
  f.D = d.din[0];
  f.Dp = pad4(f.D);
  f.order_width = d.order_width;
  f.ind_dim = d.ind_dim;
  f.slices = d.order_independent ? d.orders : 1;
  int mw = f.Dp, w = 0, u = 0, o = 0, op = 0;
  for (int l = 0; l < f.L; ++l) {
    f.din[l] = d.din[l];
    f.dout[l] = d.dout[l];
    f.dip[l] = l == 0 ? f.Dp : pad4(d.dout[l - 1]);
    f.dnp[l] = pad4(d.dout[l]);
    mw = std::max(mw, f.dnp[l]);
    f.woff[l] = w;
    f.uoff[l] = u;
    f.goff[l] = o;
    f.goffp[l] = op;
    w += f.dip[l] * f.dnp[l] + (f.bias ? f.dnp[l] : 0);
    u += f.din[l] * f.dout[l] + (f.bias ? f.dout[l] : 0);
    o += f.dout[l];
    op += f.dnp[l];
    // tile edge t costs ceil(tiles / 32) passes of (2 loads + t * t FMAs) per behaviour: take the cheapest
    int best = 1;
    long best_cost = -1;
    for (int t = 1; t <= 4; t *= 2) {
      const long tiles = static_cast<long>(f.dip[l] / t) * (f.dnp[l] / t);
      const long cost = (tiles + 31) / 32 * (2 + t * t);
      if (best_cost < 0 || cost < best_cost) best = t, best_cost = cost;
    }
    f.tile[l] = best;
  }
  f.wslice = w;
  f.S = o;
  f.Sp = op;
  f.outs = d.paper ? 1 : d.orders;
  f.n_out = f.outs * f.S;
  f.MW = mw <= 8 ? 8 : mw <= 16 ? 16 : mw <= kFastMaxW ? kFastMaxW : 0;
  f.rH0 = 0;
  f.rH = backward ? f.Dp : 0;
  f.rDZ = f.rH + f.Sp;
  f.rGX = f.rDZ + f.Sp;
  const int width = backward ? f.rGX + f.Dp : f.rH + f.Sp;
  f.RS = pad4(width);
  if ((f.RS / 4) % 2 == 0) f.RS += 4;
  const int wpad = f.slices * f.wslice;
  f.oW = 0;
  f.oGW = wpad;
  f.oVec = f.oGW + (backward ? wpad : 0);
  f.oQ = f.oVec + pad4(f.outs * f.Sp);
  f.oStage = f.oQ + kQueue;
  f.per_warp = f.oStage + 32 * f.RS;
  return f;
}

template <int N>
__device__ __forceinline__ void ld_vec(const float* p, float (&v)[N]) {
  if constexpr (N == 1) {
    v[0] = p[0];
  } else if constexpr (N == 2) {
    const float2 a = *reinterpret_cast<const float2*>(p);
    v[0] = a.x, v[1] = a.y;
  } else {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
  }
}

// This lane's behaviour's feed row into x[0..D), zeros elsewhere (and everywhere when !on).
template <int MW>
__device__ __forceinline__ void load_feed(const float* __restrict__ feed, size_t frow, const Fast& f, bool on,
                                          float (&x)[MW]) {
#pragma unroll
  for (int i = 0; i < MW; ++i) x[i] = 0.f;
  if (!on) return;
  const float* p = feed + frow * f.D;
  if (f.feed_vec) {
#pragma unroll
    for (int c = 0; c < MW / 4; ++c)
      if (4 * c < f.D) {
        const float4 v = *reinterpret_cast<const float4*>(p + 4 * c);
        x[4 * c] = v.x, x[4 * c + 1] = v.y, x[4 * c + 2] = v.z, x[4 * c + 3] = v.w;
      }
  } else {
#pragma unroll
    for (int i = 0; i < MW; ++i)
      if (i < f.D) x[i] = p[i];
  }
}

template <int MW>
__device__ __forceinline__ void load_feed(const __nv_bfloat16* __restrict__ feed, size_t frow, const Fast& f, bool on,
                                          float (&x)[MW]) {
#pragma unroll
  for (int i = 0; i < MW; ++i) x[i] = 0.f;
  if (!on) return;
  const __nv_bfloat16* p = feed + frow * f.D;
  if (f.feed_vec) {  // D % 8 == 0: 16-byte loads of 8 values; a word holds element 2k in its low half
#pragma unroll
    for (int c = 0; c < MW / 8; ++c)
      if (8 * c < f.D) {
        const uint4 r = *reinterpret_cast<const uint4*>(p + 8 * c);
        const unsigned wd[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          x[8 * c + 2 * k] = __uint_as_float(wd[k] << 16);
          x[8 * c + 2 * k + 1] = __uint_as_float(wd[k] & 0xffff0000u);
        }
      }
  } else {
#pragma unroll
    for (int i = 0; i < MW; ++i)
      if (i < f.D) x[i] = __bfloat162float(p[i]);
  }
}

template <int MW>
__device__ __forceinline__ void store_row(float* dst, const float (&v)[MW], int n) {
#pragma unroll
  for (int c = 0; c < MW / 4; ++c)
    if (4 * c < n) reinterpret_cast<float4*>(dst)[c] = make_float4(v[4 * c], v[4 * c + 1], v[4 * c + 2], v[4 * c + 3]);
}

// z[0..dnp) = act(a[0..dip) W + bias) for one layer; W is [dip][dnp] (+ [dnp] bias) in shared memory, zero-padded,
// so padded outputs are act(0) = 0. Every weight is read once, as a 16-byte broadcast.
template <int MW>
__device__ __forceinline__ void layer_fwd(const float* __restrict__ w, int dip, int dnp, bool bias, bool act,
                                          const float (&a)[MW], float (&z)[MW]) {
  const float4* w4 = reinterpret_cast<const float4*>(w);
  const int n4 = dnp >> 2;
#pragma unroll
  for (int jc = 0; jc < MW / 4; ++jc) {
    if (jc < n4) {
      float4 s = bias ? w4[dip * n4 + jc] : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int ic = 0; ic < MW / 4; ++ic) {
        if (4 * ic < dip) {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int i = 4 * ic + q;
            const float4 v = w4[i * n4 + jc];
            s.x = fmaf(a[i], v.x, s.x);
            s.y = fmaf(a[i], v.y, s.y);
            s.z = fmaf(a[i], v.z, s.z);
            s.w = fmaf(a[i], v.w, s.w);
          }
        }
      }
      z[4 * jc] = act ? tanhf(s.x) : s.x;
      z[4 * jc + 1] = act ? tanhf(s.y) : s.y;
      z[4 * jc + 2] = act ? tanhf(s.z) : s.z;
      z[4 * jc + 3] = act ? tanhf(s.w) : s.w;
    }
  }
}

// Takes a round of up to 32 behaviours off the front of the warp's queue q (qn entries): this lane's (-1 for lanes
// >= n) in *my_t, the rest moved to the front. Returns n (warp-uniform).
__device__ __forceinline__ int take_round(int* q, int& qn, int lane, int* my_t) {
  __syncwarp();
  const int n = min(qn, 32);
  *my_t = lane < n ? q[lane] : -1;
  __syncwarp();
  if (lane < qn - n) q[lane] = q[lane + 32];  // reads [32, qn), writes [0, qn - 32): disjoint
  __syncwarp();
  qn -= n;
  return n;
}

// The next round of up to 32 unmasked behaviours of a sample: compacts the mask with ballots into the warp's queue
// q[kQueue] (qn entries, scanned up to t0). Returns the round's size n (0: the sample is done; warp-uniform) and
// this lane's behaviour (-1 for lanes >= n).
__device__ __forceinline__ int next_round(const float* __restrict__ mrow, int T_len, int* q, int& qn, int& t0,
                                          int lane, int* my_t) {
  while (qn < 32 && t0 < T_len) {
    const int t = t0 + lane;
    const bool on = t < T_len && mrow[t] != 0.f;
    const unsigned bal = __ballot_sync(0xffffffffu, on);
    if (on) q[qn + __popc(bal & ((1u << lane) - 1u))] = t;
    qn += __popc(bal);
    t0 += 32;
  }
  return take_round(q, qn, lane, my_t);
}

// fn(unpadded index in the induction row, padded index in the warp's W / gW) for this lane's share of the row.
template <typename Fn>
__device__ __forceinline__ void for_params(const Fast& f, int lane, Fn fn) {
  for (int s = 0; s < f.slices; ++s)
    for (int l = 0; l < f.L; ++l) {
      const int u = s * f.order_width + f.uoff[l], p = s * f.wslice + f.woff[l];
      const int di = f.din[l], dn = f.dout[l], dnp = f.dnp[l];
      for (int k = lane; k < di * dn; k += 32) {
        const int i = k / dn;
        fn(u + k, p + i * dnp + (k - i * dn));
      }
      if (f.bias)
        for (int j = lane; j < dn; j += 32) fn(u + di * dn + j, p + f.dip[l] * dnp + j);
    }
}

// fn(index in the output row [n_out], padded index in acc / G [outs * Sp]) for this lane's share.
template <typename Fn>
__device__ __forceinline__ void for_outputs(const Fast& f, int lane, Fn fn) {
  for (int o = 0; o < f.outs; ++o)
    for (int l = 0; l < f.L; ++l)
      for (int j = lane; j < f.dout[l]; j += 32) fn(o * f.S + f.goff[l] + j, o * f.Sp + f.goffp[l] + j);
}

// The sample's induction row into the warp's padded W (zeros where padded or where the row is missing).
template <typename T>
__device__ __forceinline__ void stage_w(const Fast& f, const T* row, float* W, int lane) {
  const int wpad = f.slices * f.wslice;
  for (int i = lane; i < wpad / 4; i += 32) reinterpret_cast<float4*>(W)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  __syncwarp();
  if (row) for_params(f, lane, [&](int u, int p) { W[p] = ld(row, u); });
  __syncwarp();
}

// A split kernel's sample (its block) and this warp's segment [t_lo, t_end) of its positions (see kSplitMax).
__device__ __forceinline__ void split_segment(int T_len, int warp, int* b, int* t_lo, int* t_end) {
  const int K = blockDim.x >> 5;
  const int64_t chunks = (static_cast<int64_t>(T_len) + 31) >> 5;
  *b = blockIdx.x;  // the grid is B blocks
  *t_lo = static_cast<int>(min(static_cast<int64_t>(T_len), 32 * (warp * chunks / K)));
  *t_end = static_cast<int>(min(static_cast<int64_t>(T_len), 32 * ((warp + 1) * chunks / K)));
}

// This warp's sample b and its positions [t_lo, t_end): a split block's sample and the warp's segment of it (kSplit:
// true), or the warp's own sample, all its positions (false when b is past the batch: warps are independent there).
template <bool kSplit>
__device__ __forceinline__ bool warp_sample(int B, int T_len, int warp, int* b, int* t_lo, int* t_end) {
  if constexpr (kSplit) {
    split_segment(T_len, warp, b, t_lo, t_end);
    return true;
  }
  *b = blockIdx.x * (blockDim.x >> 5) + warp;
  *t_lo = 0;
  *t_end = T_len;
  return *b < B;
}

// The general fast kernels' split (kSplit) bounds a block to 16 warps (registers: at most 128 a thread), 12 at the
// 32-wide register arrays (their 168 registers a thread, as one warp a sample takes them); K <= 8 there.
template <int MW>
constexpr int fast_split_threads() { return (MW == 32 ? 12 : kSplitMax) * 32; }

// Blocks of kFastWarps warps a SM that the bounded 32-wide forward asks for (at most 168 registers a thread).
constexpr int kFast32BoundBlocks = 3;

// The blocks of kFastWarps warps an SM must hold by registers: the one-warp-a-sample fast kernels' lower bound in
// __launch_bounds__ (1: none). 4 for the 16-wide register arrays (at most 128 registers a thread, as their split
// kernels take): unbounded, the compiler took 160 for the backward, 12 warps a SM instead of 16, and it ran 1.14-1.51x
// slower at B >= 2048 (the paper variant, fp32 and bf16, and the CAN shape on the general kernels; the forward, at
// 114 either way, ran the same). 5 for the 8-wide arrays (at most 102): the backward took 117 (16 warps a SM) and runs
// at 96 (20 warps, 16 bytes spilled) 1.04-1.10x faster at B >= 8192 and within 2 % below (the forward's 78 are
// under the bound). The 32-wide forward is built twice: unbounded (177 registers, 8 warps a SM) and bounded to 3 blocks
// (kBound: at most 168, 12 warps), which ran 1.05-1.22x faster at B >= 4096 but 1.08-1.24x slower at B <= 2048 (deep
// and wide shapes): the launch picks by the grid's waves (fast32_bounded). The 32-wide backward stays unbounded: its
// shared memory holds 2 blocks a SM on those shapes anyway. Measured on one H200: docs/benchmarks.md, "Eighteenth
// session" and "Nineteenth session".
template <int MW, bool kBound = false>
constexpr int fast_min_blocks() { return kBound ? kFast32BoundBlocks : MW == 16 ? 4 : MW == 8 ? 5 : 1; }

// kSplit: a block of K warps a sample, each a segment of its positions, the segments' pooled sums added in warp order
// by warp 0, which writes the output row.
template <typename T, int MW, bool kSplit, bool kBound = false>
__global__ void __launch_bounds__(kSplit ? fast_split_threads<MW>() : kFastWarps * 32,
                                  kSplit ? 1 : fast_min_blocks<MW, kBound>())
    fast_forward_kernel(Fast f, int B, int T_len, CoActionRows rows, const int64_t* __restrict__ ind_ids,
                        const T* __restrict__ feed, const int64_t* __restrict__ feed_ids,
                        const float* __restrict__ mask, T* __restrict__ out) {
  extern __shared__ __align__(16) float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int b, t_lo, t_end;  // the sample and the warp's positions [t_lo, t_end); a split block's warps never return here
  if (!warp_sample<kSplit>(B, T_len, warp, &b, &t_lo, &t_end)) return;  // (one warp a sample: no block barrier)
  float* base = smem + static_cast<size_t>(warp) * f.per_warp;
  float* W = base + f.oW;
  float* acc = base + f.oVec;
  int* q = reinterpret_cast<int*>(base + f.oQ);
  float* stg = base + f.oStage;
  float* my = stg + lane * f.RS;
  int shard;
  int64_t local;
  const T* row = induction_row<T>(rows, ind_ids, b, f.ind_dim, &shard, &local);
  for (int i = lane; i < f.outs * f.Sp; i += 32) acc[i] = 0.f;
  stage_w(f, row, W, lane);
  const float* mrow = mask + static_cast<size_t>(b) * T_len;
  int qn = 0, t0 = t_lo;
  for (;;) {
    int t;
    const int n = next_round(mrow, t_end, q, qn, t0, lane, &t);
    if (n == 0) break;
    const size_t pos = static_cast<size_t>(b) * T_len + (t < 0 ? 0 : t);
    const size_t frow = t < 0 ? 0 : feed_ids ? feed_row(feed_ids, pos, rows.feed_rows) : pos;
    float x[MW], p[MW], a[MW], z[MW];
    load_feed<MW>(feed, frow, f, t >= 0, x);
#pragma unroll
    for (int i = 0; i < MW; ++i) p[i] = x[i], z[i] = 0.f;
    for (int c = 1; c <= f.C; ++c) {
      if (c > 1) {
#pragma unroll
        for (int i = 0; i < MW; ++i) p[i] *= x[i];
      }
#pragma unroll
      for (int i = 0; i < MW; ++i) a[i] = p[i];
      const float* Wc = W + (f.oi ? (c - 1) * f.wslice : 0);
      for (int l = 0; l < f.L; ++l) {
        layer_fwd<MW>(Wc + f.woff[l], f.dip[l], f.dnp[l], f.bias, f.paper || l < f.L - 1, a, z);
        store_row<MW>(my + f.rH + f.goffp[l], z, f.dnp[l]);
#pragma unroll
        for (int i = 0; i < MW; ++i) a[i] = z[i];
      }
      __syncwarp();
      float* accc = acc + (f.paper ? 0 : (c - 1) * f.Sp);
      for (int j = lane; j < f.Sp; j += 32) {  // pooled sums: column sums over the round's n rows
        const float* col = stg + f.rH + j;
        float s = 0.f;
#pragma unroll 8
        for (int m = 0; m < n; ++m) s += col[m * f.RS];
        accc[j] += s;
      }
      __syncwarp();
    }
  }
  __syncwarp();
  if constexpr (kSplit) {  // the segments' sums, added in warp order by warp 0
    __syncthreads();
    if (warp != 0) return;
    const int K = blockDim.x >> 5;
    for_outputs(f, lane, [&](int k, int pk) {
      float v = acc[pk];
      for (int w = 1; w < K; ++w) v += smem[static_cast<size_t>(w) * f.per_warp + f.oVec + pk];
      st(out, static_cast<size_t>(b) * f.n_out + k, v);
    });
    return;
  }
  for_outputs(f, lane, [&](int k, int pk) { st(out, static_cast<size_t>(b) * f.n_out + k, acc[pk]); });
}

// gW[dip][dnp] += sum over the round's n rows of H[m][i] * DZ[m][j], lanes over TI x TI register tiles.
template <int TI>
__device__ __forceinline__ void gw_tiles(float* gw, const float* stg, int RS, int hoff, int dzoff, int dip, int dnp,
                                         int n, int lane) {
  const int nti = dip / TI, ntj = dnp / TI;
  for (int tile = lane; tile < nti * ntj; tile += 32) {
    const int ti = tile / ntj, tj = tile - ti * ntj;
    float s[TI][TI];
#pragma unroll
    for (int u = 0; u < TI; ++u)
#pragma unroll
      for (int v = 0; v < TI; ++v) s[u][v] = 0.f;
    const float* hp = stg + hoff + ti * TI;
    const float* dp = stg + dzoff + tj * TI;
#pragma unroll 4
    for (int m = 0; m < n; ++m) {
      float h[TI], g[TI];
      ld_vec<TI>(hp + m * RS, h);
      ld_vec<TI>(dp + m * RS, g);
#pragma unroll
      for (int u = 0; u < TI; ++u)
#pragma unroll
        for (int v = 0; v < TI; ++v) s[u][v] = fmaf(h[u], g[v], s[u][v]);
    }
#pragma unroll
    for (int u = 0; u < TI; ++u)
#pragma unroll
      for (int v = 0; v < TI; ++v) gw[(ti * TI + u) * dnp + tj * TI + v] += s[u][v];
  }
}

// The feed gradient of this lane's behaviour ``t`` (-1: none), staged in its shared-memory row at ``gx`` (the
// warp's rows start at ``rows_base``, RS floats apart, the same offset in each): written to row ``frow`` of
// ``grad_feed``, or with feed ids added, the lanes of the round that share a feed row summed by the lowest of them
// (as few atomics as repeats need). Every lane of the warp calls it (match_any).
__device__ __forceinline__ void store_feed_grad(const Fast& f, float* __restrict__ grad_feed, bool feed_ids,
                                                size_t frow, int t, const float* rows_base, int RS, int gx_off,
                                                int lane) {
  const float* gx = rows_base + lane * RS + gx_off;
  if (feed_ids) {
    const unsigned long long key = t >= 0 ? static_cast<unsigned long long>(frow) : ~0ull - lane;
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    if (t >= 0 && lane == __ffs(peers) - 1) {
      float* dst = grad_feed + frow * f.D;
      if (f.gfeed_vec) {
        for (int i = 0; i < f.D; i += 4) {
          float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
          for (unsigned pm = peers; pm; pm &= pm - 1) {
            const float4 v = *reinterpret_cast<const float4*>(rows_base + (__ffs(pm) - 1) * RS + gx_off + i);
            s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
          }
          atomicAdd(reinterpret_cast<float4*>(dst + i), s);
        }
      } else {
        for (int i = 0; i < f.D; ++i) {
          float s = 0.f;
          for (unsigned pm = peers; pm; pm &= pm - 1) s += rows_base[(__ffs(pm) - 1) * RS + gx_off + i];
          atomicAdd(dst + i, s);
        }
      }
    }
  } else if (t >= 0) {
    float* dst = grad_feed + frow * f.D;
    if (f.gfeed_vec) {
      for (int i = 0; i < f.D; i += 4)
        *reinterpret_cast<float4*>(dst + i) = *reinterpret_cast<const float4*>(gx + i);
    } else {
      for (int i = 0; i < f.D; ++i) dst[i] = gx[i];
    }
  }
}

// A split block's (one sample's) gathered induction-row gradient: written once by warp 0, the warps' rows (gW at oGW
// of each warp's per_warp floats) added in warp order. Every thread of the block calls it (a barrier).
__device__ __forceinline__ void split_store_gathered(const Fast& f, const CoActionRows& rows, int b, bool has_row,
                                                     const float* smem, int per_warp, int oGW, int warp, int lane) {
  __syncthreads();
  if (warp != 0 || !has_row) return;
  const int K = blockDim.x >> 5;
  float* gdst = reinterpret_cast<float*>(rows.grad[0]) + static_cast<size_t>(b) * f.ind_dim;
  for_params(f, lane, [&](int u, int p) {
    float v = smem[oGW + p];
    for (int k = 1; k < K; ++k) v += smem[static_cast<size_t>(k) * per_warp + oGW + p];
    gdst[u] = v;
  });
}

// The sample's induction-row gradient (the warp's padded ``gW``, at ``oGW`` in each warp's ``per_warp`` floats of
// ``smem``) to its destination. Gathered rows (no ids): row b written. Table rows: the block's warps with one id add
// up their gradients in shared memory, and the first of them adds the sum to the owner's shard (system scope: the
// shard may be a peer's, and peers add into ours). With ids every warp of the block must call it (block barrier).
// flat (the specialised kernels): gW is laid out as the row itself, 16-byte aligned; a one-shard table (no peer adds
// into it) then takes 16-byte device-scope atomics where its row is 16-byte aligned, a quarter of the instructions.
template <bool flat = false>
__device__ __forceinline__ void store_row_grad(const Fast& f, const CoActionRows& rows, const int64_t* ind_ids,
                                               int b, bool has_row, int shard, int64_t local, const float* smem,
                                               int per_warp, int oGW, int64_t* blk_row, int warp, int lane) {
  const float* gW = smem + static_cast<size_t>(warp) * per_warp + oGW;
  if (!ind_ids) {
    if (has_row) {
      float* gdst = reinterpret_cast<float*>(rows.grad[0]) + static_cast<size_t>(b) * f.ind_dim;
      for_params(f, lane, [&](int u, int p) { gdst[u] = gW[p]; });
    }
    return;
  }
  if (lane == 0) blk_row[warp] = has_row ? ind_ids[b] : -1;
  __syncthreads();  // reached by every warp of the block (ind_ids is a kernel argument, uniform)
  if (!has_row) return;
  const int64_t id = blk_row[warp];
  for (int w = 0; w < warp; ++w)
    if (blk_row[w] == id) return;  // an earlier warp adds this row
  unsigned others = 0;
  for (int w = warp + 1; w < static_cast<int>(blockDim.x >> 5); ++w)
    if (blk_row[w] == id) others |= 1u << w;
  float* gdst = reinterpret_cast<float*>(rows.grad[shard]) + local * f.ind_dim;
  if (flat && rows.shards == 1 && f.ind_dim % 4 == 0 && reinterpret_cast<uintptr_t>(gdst) % 16 == 0) {
    for (int u = 4 * lane; u < f.ind_dim; u += 128) {
      float4 s = *reinterpret_cast<const float4*>(gW + u);
      for (unsigned o = others; o; o &= o - 1) {
        const float* other = smem + static_cast<size_t>(__ffs(o) - 1) * per_warp + oGW;
        const float4 t = *reinterpret_cast<const float4*>(other + u);
        s.x += t.x, s.y += t.y, s.z += t.z, s.w += t.w;
      }
      atomicAdd(reinterpret_cast<float4*>(gdst + u), s);
    }
    return;
  }
  for_params(f, lane, [&](int u, int p) {
    float s = gW[p];
    for (unsigned o = others; o; o &= o - 1) s += smem[static_cast<size_t>(__ffs(o) - 1) * per_warp + oGW + p];
    atomicAdd_system(&gdst[u], s);
  });
}

// kSplit: a block of K warps a sample, each a segment of its positions; the warps' gradient rows of the sample are
// added in warp order and stored once (split_store_gathered for gathered rows, store_row_grad's warps of equal ids
// for a table row).
template <typename T, int MW, bool kSplit>
__global__ void __launch_bounds__(kSplit ? fast_split_threads<MW>() : kFastWarps * 32,
                                  kSplit ? 1 : fast_min_blocks<MW>())
    fast_backward_kernel(Fast f, int B, int T_len, CoActionRows rows, const int64_t* __restrict__ ind_ids,
                         const T* __restrict__ feed, const int64_t* __restrict__ feed_ids,
                         const float* __restrict__ mask, const float* __restrict__ grad_out,
                         float* __restrict__ grad_feed) {
  extern __shared__ __align__(16) float smem[];
  // the table row each warp's gradient belongs to (-1: none); kFastStatic / kSplitStatic bytes
  __shared__ int64_t blk_row[kSplit ? kSplitMax : kFastWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int b, t_lo, t_end;  // the sample and the warp's positions [t_lo, t_end); b may be past the batch (no row)
  warp_sample<kSplit>(B, T_len, warp, &b, &t_lo, &t_end);
  float* base = smem + static_cast<size_t>(warp) * f.per_warp;
  float* W = base + f.oW;
  float* gW = base + f.oGW;
  float* G = base + f.oVec;
  int* q = reinterpret_cast<int*>(base + f.oQ);
  float* stg = base + f.oStage;
  float* my = stg + lane * f.RS;
  int shard = 0;
  int64_t local = 0;
  const T* row = b < B ? induction_row<T>(rows, ind_ids, b, f.ind_dim, &shard, &local) : nullptr;
  // No early return: with ids every warp of the block meets the barrier before the row gradients are combined.
  if (row) {
    const int wpad = f.slices * f.wslice;
    for (int i = lane; i < wpad / 4; i += 32) reinterpret_cast<float4*>(gW)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int i = lane; i < pad4(f.outs * f.Sp); i += 32) G[i] = 0.f;
    stage_w(f, row, W, lane);  // its barriers also order the zeroing above before the scatter below
    for_outputs(f, lane, [&](int k, int pk) { G[pk] = grad_out[static_cast<size_t>(b) * f.n_out + k]; });
    __syncwarp();
    const float* mrow = mask + static_cast<size_t>(b) * T_len;
    int qn = 0, t0 = t_lo;
    for (;;) {
      int t;
      const int n = next_round(mrow, t_end, q, qn, t0, lane, &t);
      if (n == 0) break;
      const size_t pos = static_cast<size_t>(b) * T_len + (t < 0 ? 0 : t);
      const size_t frow = t < 0 ? 0 : feed_ids ? feed_row(feed_ids, pos, rows.feed_rows) : pos;
      float x[MW], pm1[MW];  // x and x^(c-1)
      load_feed<MW>(feed, frow, f, t >= 0, x);
#pragma unroll
      for (int i = 0; i < MW; ++i) pm1[i] = 1.f;
      for (int i = 0; i < f.Dp; i += 4) *reinterpret_cast<float4*>(my + f.rGX + i) = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int c = 1; c <= f.C; ++c) {
        const float* Wc = W + (f.oi ? (c - 1) * f.wslice : 0);
        float a[MW], z[MW];
        // forward, every layer's output staged in this lane's row
#pragma unroll
        for (int i = 0; i < MW; ++i) a[i] = pm1[i] * x[i], z[i] = 0.f;
        store_row<MW>(my + f.rH0, a, f.Dp);
        for (int l = 0; l < f.L; ++l) {
          layer_fwd<MW>(Wc + f.woff[l], f.dip[l], f.dnp[l], f.bias, f.paper || l < f.L - 1, a, z);
          store_row<MW>(my + f.rH + f.goffp[l], z, f.dnp[l]);
#pragma unroll
          for (int i = 0; i < MW; ++i) a[i] = z[i];
        }
        // backward: dz of each layer (gradient at its pre-activation), last layer first, staged in the row
        const float* Gc = G + (f.paper ? 0 : (c - 1) * f.Sp);
        float dzn[MW];  // dz of the layer above
#pragma unroll
        for (int i = 0; i < MW; ++i) dzn[i] = 0.f;
        for (int l = f.L - 1; l >= 0; --l) {
          const bool act = f.paper || l < f.L - 1, up = l < f.L - 1;
          const int n4 = f.dnp[l] >> 2, n4u = up ? f.dnp[l + 1] >> 2 : 0;
          const float4* wu = reinterpret_cast<const float4*>(Wc + (up ? f.woff[l + 1] : 0));  // [dnp[l]][dnp[l+1]]
          const float* hout = my + f.rH + f.goffp[l];
          float dz[MW];
#pragma unroll
          for (int jc = 0; jc < MW / 4; ++jc) {
            dz[4 * jc] = dz[4 * jc + 1] = dz[4 * jc + 2] = dz[4 * jc + 3] = 0.f;
            if (jc < n4) {
              const float4 g4 = reinterpret_cast<const float4*>(Gc + f.goffp[l])[jc];
              const float4 h4 = reinterpret_cast<const float4*>(hout)[jc];
              float u[4] = {g4.x, g4.y, g4.z, g4.w};
              const float h[4] = {h4.x, h4.y, h4.z, h4.w};
#pragma unroll
              for (int qq = 0; qq < 4; ++qq) {
#pragma unroll
                for (int kc = 0; kc < MW / 4; ++kc) {
                  if (kc < n4u) {
                    const float4 v = wu[(4 * jc + qq) * n4u + kc];
                    u[qq] = fmaf(dzn[4 * kc], v.x, u[qq]);
                    u[qq] = fmaf(dzn[4 * kc + 1], v.y, u[qq]);
                    u[qq] = fmaf(dzn[4 * kc + 2], v.z, u[qq]);
                    u[qq] = fmaf(dzn[4 * kc + 3], v.w, u[qq]);
                  }
                }
                dz[4 * jc + qq] = act ? u[qq] * (1.f - h[qq] * h[qq]) : u[qq];
              }
            }
          }
          store_row<MW>(my + f.rDZ + f.goffp[l], dz, f.dnp[l]);
#pragma unroll
          for (int i = 0; i < MW; ++i) dzn[i] = dz[i];
        }
        // d/dx of x^c through the first layer: gx[i] += c x^(c-1)[i] * sum_j dz0[j] W0[i][j]
        {
          const int n4 = f.dnp[0] >> 2;
          const float4* w0 = reinterpret_cast<const float4*>(Wc + f.woff[0]);
          const float cf = static_cast<float>(c);
#pragma unroll
          for (int ic = 0; ic < MW / 4; ++ic) {
            if (4 * ic < f.Dp) {
              float s[4];
#pragma unroll
              for (int qq = 0; qq < 4; ++qq) {
                s[qq] = 0.f;
#pragma unroll
                for (int jc = 0; jc < MW / 4; ++jc) {
                  if (jc < n4) {
                    const float4 v = w0[(4 * ic + qq) * n4 + jc];
                    s[qq] = fmaf(dzn[4 * jc], v.x, s[qq]);
                    s[qq] = fmaf(dzn[4 * jc + 1], v.y, s[qq]);
                    s[qq] = fmaf(dzn[4 * jc + 2], v.z, s[qq]);
                    s[qq] = fmaf(dzn[4 * jc + 3], v.w, s[qq]);
                  }
                }
              }
              float4* gx = reinterpret_cast<float4*>(my + f.rGX) + ic;
              float4 g = *gx;
              g.x = fmaf(s[0], cf * pm1[4 * ic], g.x);
              g.y = fmaf(s[1], cf * pm1[4 * ic + 1], g.y);
              g.z = fmaf(s[2], cf * pm1[4 * ic + 2], g.z);
              g.w = fmaf(s[3], cf * pm1[4 * ic + 3], g.w);
              *gx = g;
            }
          }
        }
#pragma unroll
        for (int i = 0; i < MW; ++i) pm1[i] *= x[i];
        __syncwarp();
        // this order's weight (and bias) gradients over the round's n rows; lanes own disjoint entries
        float* gWc = gW + (f.oi ? (c - 1) * f.wslice : 0);
        for (int l = 0; l < f.L; ++l) {
          const int hoff = l == 0 ? f.rH0 : f.rH + f.goffp[l - 1], dzoff = f.rDZ + f.goffp[l];
          float* gw = gWc + f.woff[l];
          if (f.tile[l] == 4)
            gw_tiles<4>(gw, stg, f.RS, hoff, dzoff, f.dip[l], f.dnp[l], n, lane);
          else if (f.tile[l] == 2)
            gw_tiles<2>(gw, stg, f.RS, hoff, dzoff, f.dip[l], f.dnp[l], n, lane);
          else
            gw_tiles<1>(gw, stg, f.RS, hoff, dzoff, f.dip[l], f.dnp[l], n, lane);
          if (f.bias)
            for (int j = lane; j < f.dnp[l]; j += 32) {
              float s = 0.f;
              for (int m = 0; m < n; ++m) s += stg[m * f.RS + dzoff + j];
              gw[f.dip[l] * f.dnp[l] + j] += s;
            }
        }
        __syncwarp();
      }
      // feed gradient of this lane's behaviour (its row's gx, complete over the orders)
      store_feed_grad(f, grad_feed, feed_ids != nullptr, frow, t, stg, f.RS, f.rGX, lane);
      __syncwarp();  // the rows are read by other lanes above and rewritten by the next round
    }
  }
  if constexpr (kSplit) {
    if (!ind_ids) return split_store_gathered(f, rows, b, row != nullptr, smem, f.per_warp, f.oGW, warp, lane);
  }
  store_row_grad(f, rows, ind_ids, b, row != nullptr, shard, local, smem, f.per_warp, f.oGW, blk_row, warp, lane);
}

// ---------------------------------------------------------------------------------------------------------------
// Specialised path: the CAN reference shape (D = 16, 16 -> 8 -> 4, linear last layer: the reference code's variant,
// not the paper's) with 1-4 orders; widths, order count and order independence are compile-time constants. A warp
// runs a sample, its lanes over the sample's compacted unmasked behaviours in rounds of 32, the induction row staged
// once in shared memory (at these widths its layout is the row's own: nothing is padded). Three facts of the shape
// organise the arithmetic:
//  - the last layer is linear, so its pooled output is (sum over behaviours of h1) W2 (+ n b2): per behaviour only
//    h1 = tanh(x^c W1) is computed; the second layer runs once per sample;
//  - every order reads the same feed row, so one pass over its 16 values forms x^c for every order and all C x 8
//    first-layer sums at once (C x 8 independent FMA chains; with shared weights each 16-byte weight broadcast
//    feeds every order); the forward instead takes the round's rows 16 at a time through the tensor cores (split
//    fp16, see spec_tile_z) and keeps its h1 sums in the mma's accumulator layout;
//  - backward, dz of the last layer is the sample's grad_out block for every behaviour, so the first layer's
//    upstream gradient u_c = G1_c + W2_c G2_c is one vector per (sample, order), W2's gradient is (sum of h1) x G2_c,
//    and only W1's gradient needs per-behaviour outer products: each lane owns one 1 x 4 tile of W1 in every order
//    and accumulates it in registers over all of the sample's rounds from the round's staged rows (x and dz).
// And one fact of the machine organises the memory traffic: a round's global reads form a chain (mask -> the
// compacted behaviours -> their feed ids -> their feed rows), and a warp that walks it round by round waits on it
// every round (a third of all warp cycles in Nsight Compute). So the chain runs ahead of the arithmetic: the mask
// chunks two ahead and the feed ids one round ahead are loaded into registers, and round r + 1's feed rows are copied
// into the warp's second feed buffer (cp.async) while round r computes; the induction row and grad_out are loaded
// into registers before the first round's chain and stored to shared memory after it. Only a sample's first round
// waits for memory. The forward shortens that wait too: the feed ids of a sample's first 96 positions are loaded
// beside its mask (spec_early_ids), so its first copies wait for one load, not two; and a round's ids are
// range-checked where their copies start, a round after their load, not right behind it.
// tanh is 1 - 2 / (exp(2z) + 1) on the hardware's ex2 and rcp approximations, a minimax polynomial below |z| = 1/4
// (relative error ~1e-6 everywhere, see tanh_scaled; the general kernels use tanhf). Pooled sums, weight gradients and
// the order sums are accumulated in a fixed order: results do not depend on scheduling.

constexpr int kSpecD = 16, kSpecN1 = 8, kSpecN2 = 4, kSpecMaxOrders = 4;

// tanh to ~1e-6 relative everywhere, for pre-activations scaled by kTanhScale = 2 log2(e): both specialised kernels
// stage their first layer (W1, b1) multiplied by it, so z arrives as zs = 2 log2(e) z and exp(2z) is one ex2
// (the backward divides u by kTanhScale, so that dz and with it the feed gradient W1 dz come out unscaled, and
// multiplies the W1 and b1 sums back). |z| >= 1/4: 1 - 2 / (exp(2z) + 1) on the PTX approximations directly (two
// MUFU instructions; __expf and __fdividef would add range checks that this form never needs: exp(2z) is 0 below
// z = -44 and inf above 44, giving -1 and 1); its absolute error (~3e-7) is a relative error above 1e-6 below
// |z| = 1/4 (3e-4 at 1e-3, biased), so there z P(z^2) takes over, P the minimax quadratic of tanh(z) / z on
// [0, 1/16] in z^2 (relative error 4e-7, 5e-7 in fp32 arithmetic, largest at 0 where P = 1 - 4.3e-7: a bias of that
// size on small pre-activations; the Taylor polynomial to z^7 had one more term for 3e-7; P's coefficients carry the
// powers of 1 / kTanhScale). Both are computed and one selected (no divergence): 10
// instructions against tanhf's longer sequence.
constexpr float kTanhScale = 2.8853900817779268f;
__device__ __forceinline__ float tanh_scaled(float zs) {
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(zs));  // exp(2z)
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(e + 1.f));
  const float big = fmaf(-2.f, r, 1.f);
  const float s2 = zs * zs;
  // z P(z^2) at z = zs / kTanhScale
  constexpr float c0 = 0.34657344222068787f, c1 = -0.013871272094547749f, c2 = 0.0006420938880182803f;
  const float p = fmaf(fmaf(c2, s2, c1), s2, c0);
  return fabsf(zs) < 0.25f * kTanhScale ? zs * p : big;
}

// Per-warp shared memory of the specialised kernels (floats): W | gW (backward) | G (backward: grad_out row) |
// U (forward: pooled h1 sums; backward: u_c) | queue | lane rows (backward: 32 rows of RS floats: dz [C][N1] | sums
// of dz [C][N1] (bias only) | feed gradient [D] (bf16 feeds only; an fp32 feed gradient is staged over the lane's
// own feed row) | two feed buffers of 32 rows, FRS floats apart, in the feed's own element type (FRS x 4 bytes: an
// odd number of 16-byte units, so 8 lanes reading 16 bytes of their rows hit distinct banks).
struct SpecGeo {
  int oW, oGW, oG, oU, oQ, oRows, RS, rDZ, rB, rGX, oFeed, FRS, per_warp;
};

__host__ __device__ constexpr int odd4(int x) { return (pad4(x) / 4) % 2 ? pad4(x) : pad4(x) + 4; }

// Floats between the rows of a feed buffer for feed elements of elem bytes (4: fp32, 2: bf16).
__host__ __device__ constexpr int spec_frs(int elem) { return odd4(kSpecD * elem / 4); }

// elem: bytes of a feed element (4: fp32, 2: bf16).
SpecGeo make_spec_geo(const Fast& f, bool backward, int elem) {
  SpecGeo g{};
  const int wrow = pad4(f.slices * f.wslice), cn = f.C * kSpecN1;
  g.oW = 0;
  g.oGW = wrow;
  g.oG = g.oGW + (backward ? wrow : 0);
  g.oU = g.oG + (backward ? pad4(f.n_out) : 0);
  g.oQ = g.oU + pad4(cn);
  g.oRows = g.oQ + kQueue;
  g.rDZ = 0;
  g.rB = cn;
  g.rGX = g.rB + (f.bias ? cn : 0);
  g.RS = backward ? odd4(g.rGX + (elem == 4 ? 0 : kSpecD)) : 0;
  g.FRS = spec_frs(elem);
  g.oFeed = g.oRows + 32 * g.RS;
  g.per_warp = g.oFeed + 2 * 32 * g.FRS;
  return g;
}

// Registers per lane that hold an induction row of the (C, OI) shape with biases (the largest) on its way to W.
template <int C, bool OI>
__host__ __device__ constexpr int spec_row_regs() {
  return ((OI ? C : 1) * (kSpecD * kSpecN1 + kSpecN1 + kSpecN1 * kSpecN2 + kSpecN2) + 31) / 32;
}

// The sample's induction row into registers (zeros when the row is missing; element lane + 32 k in r[k]) ...
template <typename T, int NR>
__device__ __forceinline__ void spec_load_row(const T* row, int ind_dim, int lane, float (&r)[NR]) {
#pragma unroll
  for (int k = 0; k < NR; ++k) {
    const int i = lane + 32 * k;
    r[k] = row && i < ind_dim ? ld(row, i) : 0.f;
  }
}

// ... and from the registers into the warp's W as fp32, once the first round's loads are out; the first `first`
// floats of every `slice` floats (W1 and b1 of each order's slice) multiplied by `scale`.
template <int NR>
__device__ __forceinline__ void spec_store_row(float* W, int ind_dim, int lane, const float (&r)[NR],
                                               float scale = 1.f, int slice = 1, int first = 0) {
#pragma unroll
  for (int k = 0; k < NR; ++k) {
    const int i = lane + 32 * k;
    float v = r[k];
    if (first > 0) {  // i's offset in its slice, without a division (at most kSpecMaxOrders slices; one: the row)
      int j = i;
      if (slice < ind_dim)
        while (j >= slice) j -= slice;
      if (j < first) v *= scale;
    }
    if (i < ind_dim) W[i] = v;
  }
  __syncwarp();
}

// z[c][0..N1) = (x^(c+1)) W1_c (+ b1_c) for every order c < C at once; W1_c is [D][N1] (then [N1] bias) at
// W + c * ws (ws: floats between orders' slices, used only when OI), read as 16-byte broadcasts.
template <int C, bool OI>
__device__ __forceinline__ void spec_first_layer(const float* __restrict__ W, int ws, bool bias,
                                                 const float (&x)[kSpecD], float (&z)[C][kSpecN1]) {
  constexpr int D = kSpecD, N4 = kSpecN1 / 4;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const float4* w4 = reinterpret_cast<const float4*>(W + (OI ? c * ws : 0));
#pragma unroll
    for (int jc = 0; jc < N4; ++jc) {
      const float4 b = bias ? w4[D * N4 + jc] : make_float4(0.f, 0.f, 0.f, 0.f);
      z[c][4 * jc] = b.x, z[c][4 * jc + 1] = b.y, z[c][4 * jc + 2] = b.z, z[c][4 * jc + 3] = b.w;
    }
  }
#pragma unroll
  for (int i = 0; i < D; ++i) {
    float p = x[i];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (c) p *= x[i];
      const float4* w4 = reinterpret_cast<const float4*>(W + (OI ? c * ws : 0)) + i * N4;
#pragma unroll
      for (int jc = 0; jc < N4; ++jc) {
        const float4 w = w4[jc];
        z[c][4 * jc] = fmaf(p, w.x, z[c][4 * jc]);
        z[c][4 * jc + 1] = fmaf(p, w.y, z[c][4 * jc + 1]);
        z[c][4 * jc + 2] = fmaf(p, w.z, z[c][4 * jc + 2]);
        z[c][4 * jc + 3] = fmaf(p, w.w, z[c][4 * jc + 3]);
      }
    }
  }
}

// dst[0..N) += v * a[0..N) (16-byte shared-memory accesses; N a multiple of 4).
template <int N>
__device__ __forceinline__ void spec_acc(float* dst, float v, const float (&a)[N]) {
#pragma unroll
  for (int c = 0; c < N / 4; ++c) {
    float4 r = reinterpret_cast<float4*>(dst)[c];
    r.x = fmaf(v, a[4 * c], r.x);
    r.y = fmaf(v, a[4 * c + 1], r.y);
    r.z = fmaf(v, a[4 * c + 2], r.z);
    r.w = fmaf(v, a[4 * c + 3], r.w);
    reinterpret_cast<float4*>(dst)[c] = r;
  }
}

// A sample's compaction state: the queue's fill, the next mask position to scan and the mask chunks at ts and
// ts + 32 (this lane's element; 0 past the row), loaded two chunks ahead of their ballot.
struct SpecQueue {
  int qn, ts;
  float mk0, mk1;
};

__device__ __forceinline__ float spec_mask_at(const float* __restrict__ mrow, int T_len, int t) {
  return t < T_len ? mrow[t] : 0.f;
}

// The queue of a sample's positions [t_lo, T_len) (t_lo = 0: the whole sample; a segment's end as T_len).
__device__ __forceinline__ SpecQueue spec_queue(const float* __restrict__ mrow, int T_len, int lane, int t_lo = 0) {
  return SpecQueue{0, t_lo, spec_mask_at(mrow, T_len, t_lo + lane), spec_mask_at(mrow, T_len, t_lo + 32 + lane)};
}

// The sample's next round of up to 32 unmasked behaviours, as next_round (same rounds, same order), from the
// prefetched mask chunks. Returns the round's size n (0: the sample is done; warp-uniform) and this lane's behaviour
// (-1 for lanes >= n).
__device__ __forceinline__ int spec_next_round(const float* __restrict__ mrow, int T_len, int* q, SpecQueue& s,
                                               int lane, int* my_t) {
  while (s.qn < 32 && s.ts < T_len) {
    const bool on = s.mk0 != 0.f;
    s.mk0 = s.mk1;
    s.mk1 = spec_mask_at(mrow, T_len, s.ts + 64 + lane);
    const unsigned bal = __ballot_sync(0xffffffffu, on);
    if (on) q[s.qn + __popc(bal & ((1u << lane) - 1u))] = s.ts + lane;
    s.qn += __popc(bal);
    s.ts += 32;
  }
  return take_round(q, s.qn, lane, my_t);
}

// Behaviour t's feed id, unchecked (its gathered position without ids; 0 for t < 0), and the row it names
// (spec_frow_at: an id outside the table reads row 0, as feed_row): the forward loads a round's ids a round ahead
// and checks them where their copies start, so that the wait for the load falls after the round between, not
// before it (Nsight Compute: the check right behind the load was the forward's largest per-round stall).
__device__ __forceinline__ int64_t spec_fid(const int64_t* __restrict__ feed_ids, int b, int T_len, int t) {
  const size_t pos = static_cast<size_t>(b) * T_len + (t < 0 ? 0 : t);
  return t < 0 ? 0 : feed_ids ? feed_ids[pos] : static_cast<int64_t>(pos);
}
__device__ __forceinline__ size_t spec_frow_at(const int64_t* __restrict__ feed_ids, int64_t feed_rows, int64_t v) {
  return feed_ids && static_cast<uint64_t>(v) >= static_cast<uint64_t>(feed_rows) ? 0 : static_cast<size_t>(v);
}
// The feed row of behaviour t (-1: none, row 0 unread) of sample b, its id loaded and checked at once (the backward).
__device__ __forceinline__ size_t spec_frow(const int64_t* __restrict__ feed_ids, int64_t feed_rows, int b, int T_len,
                                            int t) {
  return spec_frow_at(feed_ids, feed_rows, spec_fid(feed_ids, b, T_len, t));
}

// The feed ids of a sample's first 32 x kSpecEarlyChunks positions, this lane's (position lane + 32 k in v[k]; 0
// past the row or without ids), loaded beside the sample's first mask chunks: the first two rounds' ids then come
// from the lanes' registers (spec_fid_early) instead of loads behind the mask's compaction, so that a sample's first
// copies wait for one load (the mask) instead of two.
constexpr int kSpecEarlyChunks = 3;
struct SpecEarlyIds {
  int64_t v[kSpecEarlyChunks];
};
// A warp that runs a segment [t_lo, t_hi) of the sample (the split forward; t_lo a multiple of 32) takes the ids of
// positions t_lo + lane + 32 k (0 from t_hi on).
__device__ __forceinline__ SpecEarlyIds spec_early_ids(const int64_t* __restrict__ feed_ids, int b, int T_len,
                                                       int t_lo, int t_hi, int lane) {
  SpecEarlyIds r;
#pragma unroll
  for (int k = 0; k < kSpecEarlyChunks; ++k) {
    const int t = t_lo + lane + 32 * k;
    r.v[k] = feed_ids && t < t_hi ? feed_ids[static_cast<size_t>(b) * T_len + t] : 0;
  }
  return r;
}
// spec_fid for behaviour t from the early ids where they hold it (a load otherwise). Every lane calls it (shuffles).
__device__ __forceinline__ int64_t spec_fid_early(const SpecEarlyIds& e, const int64_t* __restrict__ feed_ids, int b,
                                                  int T_len, int t_lo, int t) {
  const int r = t - t_lo;  // t's place in the warp's segment (negative for t = -1: no behaviour)
  int64_t v = 0;
#pragma unroll
  for (int k = 0; k < kSpecEarlyChunks; ++k) {
    const int64_t s = __shfl_sync(0xffffffffu, e.v[k], r & 31);
    if ((r >> 5) == k) v = s;
  }
  return feed_ids && r >= 32 * kSpecEarlyChunks ? spec_fid(feed_ids, b, T_len, t)
         : feed_ids && t >= 0                   ? v
                                                : spec_fid(feed_ids, b, T_len, t);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool on) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                   static_cast<unsigned>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(on ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// This lane's feed row of a coming round into its row of a feed buffer, raw (zeros when !on): asynchronous copies
// (cp.async, one commit group per round, waited for before the round computes); rows that are not 16-byte aligned
// go through registers at once.
template <typename T>
__device__ __forceinline__ void spec_fetch_row(const Fast& f, const T* __restrict__ feed, size_t frow, bool on,
                                               float* dst) {
  if (f.feed_vec) {
    const char* src = reinterpret_cast<const char*>(feed + frow * kSpecD);
#pragma unroll
    for (int c = 0; c < kSpecD * static_cast<int>(sizeof(T)) / 16; ++c)
      cp_async16(reinterpret_cast<char*>(dst) + 16 * c, src + 16 * c, on);
  } else {
    T* d = reinterpret_cast<T*>(dst);
#pragma unroll
    for (int i = 0; i < kSpecD; ++i) d[i] = on ? feed[frow * kSpecD + i] : T{};
  }
}

// A staged feed row as fp32: all of it, or element i.
template <typename T>
__device__ __forceinline__ void spec_read_x(const float* row, float (&x)[kSpecD]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int c = 0; c < kSpecD / 4; ++c) {
      const float4 v = reinterpret_cast<const float4*>(row)[c];
      x[4 * c] = v.x, x[4 * c + 1] = v.y, x[4 * c + 2] = v.z, x[4 * c + 3] = v.w;
    }
  } else {  // a word holds element 2k in its low half
#pragma unroll
    for (int c = 0; c < kSpecD / 8; ++c) {
      const uint4 r = reinterpret_cast<const uint4*>(row)[c];
      const unsigned wd[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        x[8 * c + 2 * k] = __uint_as_float(wd[k] << 16);
        x[8 * c + 2 * k + 1] = __uint_as_float(wd[k] & 0xffff0000u);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ float spec_x_at(const float* row, int i) {
  if constexpr (sizeof(T) == 4)
    return row[i];
  else
    return __uint_as_float(static_cast<unsigned>(reinterpret_cast<const unsigned short*>(row)[i]) << 16);
}

// The first layer on the tensor cores. 16 behaviours at a time, order c's pre-activations are one mma.sync m16n8k16:
// x^(c+1) (a 16 x 16 tile: rows the behaviours, columns the feed values) times W1_c (16 x 8). fp32 operands enter as
// fp16 pairs v = hi + lo (hi = fp16(v), lo = fp16(v - hi)), and three products, lo hi + hi lo + hi hi, accumulate in
// fp32 (the dropped lo lo term is ~2^-22 of its product; the tensor cores' fp32 accumulation truncates).
// fp16's range is narrow, so every behaviour's x and every column of a sample's W1 are scaled by a power of two,
// undone exactly on the fp32 result: a W1 column's largest magnitude to [16, 32), a behaviour's largest |x| to
// [16, 32) (up to 3 orders: x^3 < 2^15, below fp16's 65504) or [4, 8) (4 orders). A tile with a behaviour whose
// largest |x| is outside [2^-20, 2^24), or a sample with a W1 column whose largest |W1| is outside [2^-26, 2^35)
// (subnormal and infinite maxima included; all-zero rows and columns stay; NaNs are skipped by the maxima and
// propagate in their own row or column), takes the CUDA-core path instead: the same values by FMAs. Precision: an
// element within 2^8 of its row's (x) or its column's (W1) largest keeps ~22 significant bits; smaller ones lose them
// to fp16's subnormal range (an absolute ~2^-25 of the scale): ~3e-7 of the largest term of a sum on ordinary data.
// The scale is per column, so an outlier weight costs only its own column (whose sum it dominates): with one scale a
// sample, a weight 3e4 x above the rest had left the other columns 1.4-2.7e-5 relative accuracy on the GPU.
// Each lane holds rows g and g + 8 of the tile (g = lane / 4) and columns 2q and 2q + 1 (q = lane % 4) of every
// order's [16 x 8] result: the mma's own accumulator layout.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
constexpr bool kSpecTensorCores = true;
#else
constexpr bool kSpecTensorCores = false;
#endif

__device__ __forceinline__ float pow2f(int e) { return __int_as_float((e + 127) << 23); }  // e in [-126, 127]

// The exponent s that puts m 2^s in [2^top, 2^(top + 1)) for a largest magnitude m >= 0 (a row's, a column's), if
// m's exponent is in [lo, hi] (false otherwise: zero, subnormal, inf or NaN included).
__device__ __forceinline__ bool spec_scale_exp(float m, int top, int lo, int hi, int& s) {
  const int e = (__float_as_int(m) >> 23) - 127;
  s = top - e;
  return e >= lo && e <= hi;
}

// (a, b) as fp16 pairs: hi = fp16(a, b) and lo = fp16(a - hi.x, b - hi.y) (low halves a's).
__device__ __forceinline__ void split_h2(float a, float b, unsigned& hi, unsigned& lo) {
  const __half2 h = __floats2half2_rn(a, b);
  const float2 f = __half22float2(h);
  const __half2 l = __floats2half2_rn(a - f.x, b - f.y);
  hi = *reinterpret_cast<const unsigned*>(&h);
  lo = *reinterpret_cast<const unsigned*>(&l);
}

// d += A B for one m16n8k16 tile (A: 4 fp16 pairs, B: 2; the PTX ISA's fragment layouts).
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Elements i and i + 1 (i even) of a staged feed row as fp32.
template <typename T>
__device__ __forceinline__ float2 spec_x_pair(const float* row, int i) {
  if constexpr (sizeof(T) == 4) {
    return *reinterpret_cast<const float2*>(row + i);
  } else {  // a word holds element 2k in its low half
    const unsigned w = reinterpret_cast<const unsigned*>(row)[i >> 1];
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
}

// A sample's W1 as this lane's B fragments (column g, rows 2q, 2q + 1, 2q + 8, 2q + 9 of each [16 x 8] W1_c; one for
// all orders without order independence), each column scaled by its own power of two (its largest magnitude to
// [16, 32): a column's precision does not depend on the other columns' weights), and whether the tensor cores may
// take it: every column's largest |W1| in [2^-26, 2^35) or zero. sb: the scales of this lane's output columns 2q and
// 2q + 1 (the accumulator layout), to undo on the result, as the bits of pow2f(-w) for a column scaled by 2^w.
template <int C, bool OI>
struct SpecW1 {
  unsigned hi[OI ? C : 1][2], lo[OI ? C : 1][2];
  int sb[OI ? C : 1][2];
  bool tc;
};

template <int C, bool OI>
__device__ __forceinline__ SpecW1<C, OI> spec_w1_frags(const float* __restrict__ W, int ws, int lane) {
  constexpr int NB = OI ? C : 1, N1 = kSpecN1;
  const int g = lane >> 2, q = lane & 3;
  SpecW1<C, OI> r;
  bool ok = kSpecTensorCores;
#pragma unroll
  for (int c = 0; c < NB; ++c) {
    const float* w1 = W + c * ws;
    float w[4], m = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = w1[(2 * q + (k & 1) + 8 * (k >> 1)) * N1 + g];
      m = fmaxf(m, fabsf(w[k]));
    }
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));  // column g's largest: the 4 lanes that hold it
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    int s = 0;
    ok &= m == 0.f || spec_scale_exp(m, 4, -26, 34, s);  // zeros: a missing row
    if (m == 0.f || !ok) s = 0;
    const float fw = pow2f(s);
    split_h2(w[0] * fw, w[1] * fw, r.hi[c][0], r.lo[c][0]);
    split_h2(w[2] * fw, w[3] * fw, r.hi[c][1], r.lo[c][1]);
    r.sb[c][0] = (127 - __shfl_sync(0xffffffffu, s, 8 * q)) * (1 << 23);  // column 2q's (held by lanes 4 (2q) ..)
    r.sb[c][1] = (127 - __shfl_sync(0xffffffffu, s, 8 * q + 4)) * (1 << 23);
  }
  r.tc = __all_sync(0xffffffffu, ok);
  return r;
}

// z[c][0..4) = (x^(c+1)) W1_c + b1_c at (row g, column 2q), (g, 2q + 1), (g + 8, 2q), (g + 8, 2q + 1) of the 16-row
// tile whose first staged row is `rows` (row stride FRS floats, the feed's element type T; rows past the round are
// zeros). W1_c and bz (this lane's two b1_c columns) as staged; warp-uniform choice of tensor or CUDA cores. in0 / in1:
// whether rows g / g + 8 hold a behaviour; the CUDA-core path sets a row past the round to b1 (the caller multiplies
// its h1 by 0): its x = 0 times an infinite W1 (the path such a W1 takes) would be NaN, and NaN x 0 is NaN.
template <typename T, int C, bool OI>
__device__ __forceinline__ void spec_tile_z(const float* rows, const float* __restrict__ W, int ws,
                                            const SpecW1<C, OI>& wf, const float (&bz)[C][2], int lane, bool in0,
                                            bool in1, float (&z)[C][4]) {
  constexpr int D = kSpecD, N1 = kSpecN1, FRS = spec_frs(sizeof(T));
  const int g = lane >> 2, q = lane & 3;
  const float* r0 = rows + g * FRS;
  const float* r1 = rows + (g + 8) * FRS;
  // this lane's A elements in fragment order: (g, 2q..2q+1), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)
  const float2 xa = spec_x_pair<T>(r0, 2 * q), xb = spec_x_pair<T>(r1, 2 * q);
  const float2 xc = spec_x_pair<T>(r0, 2 * q + 8), xd = spec_x_pair<T>(r1, 2 * q + 8);
  float v[8] = {xa.x, xa.y, xb.x, xb.y, xc.x, xc.y, xd.x, xd.y};
  // each row (behaviour) its own scale: its largest |x| over the 4 lanes that hold it (lanes 4g .. 4g + 3)
  float m0 = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[4]), fabsf(v[5])));
  float m1 = fmaxf(fmaxf(fabsf(v[2]), fabsf(v[3])), fmaxf(fabsf(v[6]), fabsf(v[7])));
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, o));
    m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, o));
  }
  constexpr int top = C <= 3 ? 4 : 2;
  int s0 = 0, s1 = 0;  // an all-zero row (rows past the round included) stays unscaled: x^c = 0 in fp16 too
  const bool ok0 = m0 == 0.f || spec_scale_exp(m0, top, -20, 23, s0);
  const bool ok1 = m1 == 0.f || spec_scale_exp(m1, top, -20, 23, s1);
  if (m0 == 0.f) s0 = 0;
  if (m1 == 0.f) s1 = 0;
  if (__all_sync(0xffffffffu, wf.tc && ok0 && ok1)) {
    const float f0 = pow2f(s0), f1 = pow2f(s1);
    // the result's scale 2^-(w + (c + 1) s) as the bits of pow2f(-w) (staged a sample) less (c + 1) s in the exponent
    // field: one integer subtraction a result instead of a factor built from its exponent; w + (c + 1) s lies in
    // [-114, 118] by the bounds of spec_scale_exp above and in spec_w1_frags, so the bits are a normal power of two
    const int u0 = s0 * (1 << 23), u1 = s1 * (1 << 23);
    int a0 = 0, a1 = 0;  // (c + 1) s0 and (c + 1) s1 in exponent bits
    float p[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] *= (k & 2) ? f1 : f0, p[k] = v[k];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (c)
#pragma unroll
        for (int k = 0; k < 8; ++k) p[k] *= v[k];
      unsigned ah[4], al[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) split_h2(p[2 * r], p[2 * r + 1], ah[r], al[r]);
      const int cb = OI ? c : 0;
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      mma16816(d, al, wf.hi[cb][0], wf.hi[cb][1]);
      mma16816(d, ah, wf.lo[cb][0], wf.lo[cb][1]);
      mma16816(d, ah, wf.hi[cb][0], wf.hi[cb][1]);
      a0 += u0, a1 += u1;
      z[c][0] = fmaf(d[0], __int_as_float(wf.sb[cb][0] - a0), bz[c][0]);
      z[c][1] = fmaf(d[1], __int_as_float(wf.sb[cb][1] - a0), bz[c][1]);
      z[c][2] = fmaf(d[2], __int_as_float(wf.sb[cb][0] - a1), bz[c][0]);
      z[c][3] = fmaf(d[3], __int_as_float(wf.sb[cb][1] - a1), bz[c][1]);
    }
  } else {  // CUDA cores
#pragma unroll
    for (int c = 0; c < C; ++c) z[c][0] = z[c][2] = bz[c][0], z[c][1] = z[c][3] = bz[c][1];
#pragma unroll 4
    for (int i = 0; i < D; ++i) {
      const float x0 = spec_x_at<T>(r0, i), x1 = spec_x_at<T>(r1, i);
      float p0 = x0, p1 = x1;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (c) p0 *= x0, p1 *= x1;
        const float2 w = *reinterpret_cast<const float2*>(W + (OI ? c * ws : 0) + i * N1 + 2 * q);
        z[c][0] = fmaf(p0, w.x, z[c][0]);
        z[c][1] = fmaf(p0, w.y, z[c][1]);
        z[c][2] = fmaf(p1, w.x, z[c][2]);
        z[c][3] = fmaf(p1, w.y, z[c][3]);
      }
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (!in0) z[c][0] = bz[c][0], z[c][1] = bz[c][1];
      if (!in1) z[c][2] = bz[c][0], z[c][3] = bz[c][1];
    }
  }
}

// One feed row's gradient s added at dst (16-byte atomics where grad_feed is aligned), each atomic from its own
// registers (an atomic reads its source registers after issue: rewriting them would wait for it).
__device__ __forceinline__ void spec_add_feed_grad(const Fast& f, float* dst, const float4 (&s)[kSpecD / 4]) {
  constexpr int Q = kSpecD / 4;
  if (f.gfeed_vec) {
#pragma unroll
    for (int k = 0; k < Q; ++k) atomicAdd(reinterpret_cast<float4*>(dst) + k, s[k]);
  } else {
#pragma unroll
    for (int k = 0; k < Q; ++k) {
      atomicAdd(dst + 4 * k, s[k].x);
      atomicAdd(dst + 4 * k + 1, s[k].y);
      atomicAdd(dst + 4 * k + 2, s[k].z);
      atomicAdd(dst + 4 * k + 3, s[k].w);
    }
  }
}

// The round's feed gradients (lane m's at gx_base + m * stride) added to grad_feed by feed id: the lanes that share
// a row are summed in lane order by the lowest of them, which then issues its atomics back to back, each from its
// own registers (an atomic reads its source registers after issue: rewriting them would wait for it). Every lane
// calls it (match_any).
__device__ __forceinline__ void spec_store_feed_grad(const Fast& f, float* __restrict__ grad_feed, size_t frow,
                                                     int t, const float* gx_base, int stride, int lane) {
  constexpr int Q = kSpecD / 4;
  const unsigned long long key = t >= 0 ? static_cast<unsigned long long>(frow) : ~0ull - lane;
  const unsigned peers = __match_any_sync(0xffffffffu, key);
  if (t < 0 || lane != __ffs(peers) - 1) return;
  float4 s[Q];
#pragma unroll
  for (int k = 0; k < Q; ++k) s[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (unsigned pm = peers; pm; pm &= pm - 1) {
    const float4* src = reinterpret_cast<const float4*>(gx_base + (__ffs(pm) - 1) * stride);
#pragma unroll
    for (int k = 0; k < Q; ++k) {
      const float4 v = src[k];
      s[k].x += v.x, s[k].y += v.y, s[k].z += v.z, s[k].w += v.w;
    }
  }
  spec_add_feed_grad(f, grad_feed + frow * kSpecD, s);
}

// Two warps (samples) a block: a block's slot on the SM frees when its slowest sample ends, so small blocks keep the
// SMs fuller as samples of different lengths finish. Register caps for up to 3 orders: 72 (forward, 14 blocks of 64
// threads, 7 warps a scheduler: its tensor-core first layer keeps 6 h1 sums a lane, not 24; 16 blocks at 64 registers
// measured slower) / 128 (backward, 8 blocks; at 96 registers the backward spills: 227 us against 148 us).
constexpr int kSpecWarps = 2;
template <int C>
constexpr int spec_fwd_blocks() { return (C <= 3 ? 7 : 5) * kFastWarps / kSpecWarps; }
template <int C>
constexpr int spec_bwd_blocks() { return (C <= 3 ? 4 : 3) * kFastWarps / kSpecWarps; }

// Sample b's share (about 1 / B) of the float32 arrays in z zeroed (TableGrads: a later backward's gradients), 16-byte
// streaming stores (written once here, read back only by that backward: kept out of the way of the forward's gathers
// in L2); the last sample also zeroes what is left past the last whole 16 bytes. Addresses are 16-byte aligned (the
// host sends unaligned ones to a memset instead). Issued at the end of the sample, by every sample: the zeroing then
// costs the forward about half of what a memset of the same bytes takes (at its start, or by fewer samples with
// larger shares, it cost more; docs/benchmarks.md).
// The shares are laid out on the host (spec_zero_plan): no 64-bit division per sample.
struct SpecZero {
  float4* p[2];       // the arrays (nullptr: none), 16-byte aligned
  int64_t q4[2];      // 16-byte units a sample zeroes; the first r4 samples one more
  int64_t r4[2];
  float* tail[2];     // the floats past the last whole 16 bytes (ntail < 4 of them), zeroed by the last sample
  int ntail[2];
};

SpecZero spec_zero_plan(const CoActionZero& z, int B) {
  SpecZero p{};
  for (int k = 0; k < 2; ++k) {
    if (!z.ptr[k] || z.n[k] <= 0 || B <= 0) continue;
    const int64_t n4 = z.n[k] / 4;
    p.p[k] = reinterpret_cast<float4*>(z.ptr[k]);
    p.q4[k] = n4 / B;
    p.r4[k] = n4 % B;
    p.tail[k] = reinterpret_cast<float*>(z.ptr[k]) + 4 * n4;
    p.ntail[k] = static_cast<int>(z.n[k] - 4 * n4);
  }
  return p;
}

// Thread `tid` of the `nthreads` that zero the share (a warp's lanes; a split sample's whole block).
__device__ __forceinline__ void spec_zero_share(const SpecZero& z, int b, int B, int tid, int nthreads) {
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    if (!z.p[k]) continue;
    const int64_t lo = z.q4[k] * b + min(static_cast<int64_t>(b), z.r4[k]);
    const int cnt = static_cast<int>(z.q4[k]) + (b < z.r4[k] ? 1 : 0);  // at most 128 KiB / 16 (the host's bound)
    float4* q = z.p[k] + lo;
#pragma unroll 4
    for (int i = tid; i < cnt; i += nthreads) __stcs(q + i, make_float4(0.f, 0.f, 0.f, 0.f));
    if (b == B - 1 && tid < z.ntail[k]) z.tail[k][tid] = 0.f;
  }
}

// The split forward (kSplit): a block is one sample, its K = blockDim.x / 32 warps each take a segment of the
// sample's 32-position chunks (warp k: chunks [k n / K, (k + 1) n / K) of n; a segment may be empty), and the
// segments' h1 sums and valid counts are added in warp order by warp 0, which writes the output row (every warp of
// the block zeroes part of the sample's share of the table gradients). A batch too small to fill the GPU with one
// warp a sample then runs a long sample on several warps; the sums are deterministic for a given K, but their
// rounding differs from K = 1's (the launch picks K from B and T: split_warps, below).

// Warps a sample at most for C orders: 8 for the 4-order backward, whose kernel is bounded to 12 warps a block so that
// it may take up to 170 registers a thread (168, as the one-warp kernel: ptxas); bounded to 128 with 16 warps it
// spilled 124-220 bytes and ran K = 2 slower than one warp a sample (docs/benchmarks.md, "Seventeenth session"). It
// gives up K = 16 only for the one 4-order shape whose shared memory fits 16 warps (no bias, not order-independent).
__host__ __device__ constexpr int spec_split_max(int C, bool backward) {
  return backward && C == 4 ? 8 : kSplitMax;
}
// Warps of the split kernels an SM holds by their registers, the most their bound allows: 16 (128 a thread), 12 for
// the 4-order backward.
__host__ __device__ constexpr int spec_split_reg_warps(int C, bool backward) {
  return backward && C == 4 ? 12 : kSplitMax;
}

template <typename T, int C, bool OI, bool kSplit>
__global__ void __launch_bounds__(kSplit ? kSplitMax * 32 : kSpecWarps * 32, kSplit ? 1 : spec_fwd_blocks<C>())
    spec_forward_kernel(Fast f, SpecGeo g, int B, int T_len, CoActionRows rows, const int64_t* __restrict__ ind_ids,
                        const T* __restrict__ feed, const int64_t* __restrict__ feed_ids,
                        const float* __restrict__ mask, T* __restrict__ out, SpecZero zero) {
  constexpr int D = kSpecD, N1 = kSpecN1, N2 = kSpecN2, S = N1 + N2, NR = spec_row_regs<C, OI>();
  constexpr int FRS = spec_frs(sizeof(T));  // g.FRS, as a constant
  extern __shared__ __align__(16) float smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int b, t_lo, t_end;  // the sample and the warp's positions [t_lo, t_end); a split block's warps never return here
  if (!warp_sample<kSplit>(B, T_len, warp, &b, &t_lo, &t_end)) return;  // (one warp a sample: no block barrier)
  float* base = smem + static_cast<size_t>(warp) * g.per_warp;
  float* W = base + g.oW;
  float* hs = base + g.oU;
  int* q_ = reinterpret_cast<int*>(base + g.oQ);
  float* fbuf = base + g.oFeed;
  const int buf = 32 * FRS;  // floats between the two feed buffers
  int shard;
  int64_t local;
  float wr[NR];
  spec_load_row(induction_row<T>(rows, ind_ids, b, f.ind_dim, &shard, &local), f.ind_dim, lane, wr);
  // the pipeline: round a computes from fbuf[cur] while round b's rows arrive in the other buffer
  const float* mrow = mask + static_cast<size_t>(b) * T_len;
  const SpecEarlyIds early = spec_early_ids(feed_ids, b, T_len, t_lo, t_end, lane);
  SpecQueue sq = spec_queue(mrow, t_end, lane, t_lo);
  int ta, tb;
  int na = spec_next_round(mrow, t_end, q_, sq, lane, &ta);
  int nb = spec_next_round(mrow, t_end, q_, sq, lane, &tb);
  int64_t fb = spec_fid_early(early, feed_ids, b, T_len, t_lo, tb);  // round b's id, checked where its copies start
  spec_fetch_row(f, feed,
                 spec_frow_at(feed_ids, rows.feed_rows, spec_fid_early(early, feed_ids, b, T_len, t_lo, ta)),
                 ta >= 0, fbuf + lane * FRS);
  cp_async_commit();
  // W1 and b1 of every slice pre-scaled for tanh_scaled
  spec_store_row(W, f.ind_dim, lane, wr, kTanhScale, f.wslice, f.woff[1]);
  const SpecW1<C, OI> wf = spec_w1_frags<C, OI>(W, f.wslice, lane);
  const int tq = lane & 3, tg = lane >> 2;  // this lane's tile column pair and rows
  float bz[C][2], acc[C][2];  // this lane's b1 columns 2q, 2q + 1 of every order; its h1 sums (rows g, g + 8)
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const float2 bb = f.bias ? *reinterpret_cast<const float2*>(W + (OI ? c * f.wslice : 0) + D * N1 + 2 * tq)
                             : make_float2(0.f, 0.f);
    bz[c][0] = bb.x, bz[c][1] = bb.y, acc[c][0] = acc[c][1] = 0.f;
  }
  int valid = 0, cur = 0;
  while (na > 0) {
    if (nb > 0)
      spec_fetch_row(f, feed, spec_frow_at(feed_ids, rows.feed_rows, fb), tb >= 0, fbuf + (cur ^ 1) * buf + lane * FRS);
    cp_async_commit();  // (an empty group past the sample's last round: the wait below still means "round a in")
    int tc;
    const int nc = spec_next_round(mrow, t_end, q_, sq, lane, &tc);
    const int64_t fc = spec_fid(feed_ids, b, T_len, tc);  // (checked a round later, where its copies start)
    cp_async_wait<1>();
    __syncwarp();  // the tiles read every lane's row
    valid += na;
    for (int r0 = 0; r0 < na; r0 += 16) {  // 16-row tiles; rows past na are zeros, their h1 multiplied by 0
      float z[C][4];
      const bool in0 = r0 + tg < na, in1 = r0 + tg + 8 < na;
      spec_tile_z<T, C, OI>(fbuf + cur * buf + r0 * FRS, W, f.wslice, wf, bz, lane, in0, in1, z);
      const float v0 = in0 ? 1.f : 0.f, v1 = in1 ? 1.f : 0.f;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        acc[c][0] = fmaf(v0, tanh_scaled(z[c][0]), acc[c][0]);
        acc[c][1] = fmaf(v0, tanh_scaled(z[c][1]), acc[c][1]);
        acc[c][0] = fmaf(v1, tanh_scaled(z[c][2]), acc[c][0]);
        acc[c][1] = fmaf(v1, tanh_scaled(z[c][3]), acc[c][1]);
      }
    }
    __syncwarp();  // every lane has read the buffer before it is refilled
    na = nb, ta = tb, nb = nc, tb = tc, fb = fc, cur ^= 1;
  }
  // h1 sums: the 8 lanes of a column pair (same q) added by a butterfly over g (a fixed order); lanes 0-3 hold the
  // sums of columns 2q, 2q + 1 of every order. Lane k < C x N1 writes column k = (c, j), then lane k < C x N2 (c, m)
  // of the second layer: out[b] = [C][h1 sums (N1) | h1 sums W2_c + valid b2_c (N2)]
  cp_async_wait<0>();
#pragma unroll
  for (int c = 0; c < C; ++c)
#pragma unroll
    for (int k = 0; k < 2; ++k)
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) acc[c][k] += __shfl_xor_sync(0xffffffffu, acc[c][k], o);
  if (lane < 4)
#pragma unroll
    for (int c = 0; c < C; ++c) *reinterpret_cast<float2*>(hs + c * N1 + 2 * lane) = make_float2(acc[c][0], acc[c][1]);
  if constexpr (kSplit) {  // the segments' sums and counts, added in warp order by warp 0
    if (lane == 0) q_[0] = valid;  // (the queue is done with)
    spec_zero_share(zero, b, B, threadIdx.x, blockDim.x);  // the sample's share, by every warp of its block
    __syncthreads();
    if (warp != 0) return;
    const int K = blockDim.x >> 5;
    float v = lane < C * N1 ? hs[lane] : 0.f;
    for (int k = 1; k < K; ++k) {
      const float* other = smem + static_cast<size_t>(k) * g.per_warp;
      if (lane < C * N1) v += other[g.oU + lane];
      valid += reinterpret_cast<const int*>(other + g.oQ)[0];
    }
    if (lane < C * N1) hs[lane] = v;
  }
  __syncwarp();
  T* o = out + static_cast<size_t>(b) * f.n_out;
  if (lane < C * N1) st(o, (lane / N1) * S + lane % N1, hs[lane]);
  if (lane < C * N2) {
    const int c = lane / N2, m = lane % N2;
    const float* w2 = W + (OI ? c * f.wslice : 0) + f.woff[1];
    float v = f.bias ? static_cast<float>(valid) * w2[N1 * N2 + m] : 0.f;
#pragma unroll
    for (int i = 0; i < N1; ++i) v = fmaf(hs[c * N1 + i], w2[i * N2 + m], v);
    st(o, c * S + N1 + m, v);
  }
  if constexpr (!kSplit)
    spec_zero_share(zero, b, B, lane, 32);  // at the sample's end: measured faster than at its start (see the docs)
}

// A backward round's lane: h1 = tanh(z) added to its h1 sums (for W2's gradient) and dz = v u_c (1 - h1^2) in place of
// z (U holds u / kTanhScale, so dz comes out unscaled). A lane past the round has z = 0 (set by the caller: its x is
// zero-filled, but 0 times an infinite W1 is NaN), so its h1 = 0 adds nothing to the h1 sums. kBias: dz is added to
// the lane's b1 sums at bsum ([C][N1] floats), so v (1: the lane has a behaviour, 0: it is past the round) multiplies
// it; without bias v is not needed: a lane past the round has its dz row past the rows W1's gradient reads, and its
// feed gradient is not stored.
template <int C, bool kBias>
__device__ __forceinline__ void spec_dz(const float* __restrict__ U, float v, float* bsum, float (&z)[C][kSpecN1],
                                        float (&hacc)[C][kSpecN1]) {
  constexpr int N1 = kSpecN1;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const float4* u4 = reinterpret_cast<const float4*>(U + c * N1);
#pragma unroll
    for (int jc = 0; jc < N1 / 4; ++jc) {
      const float4 u = u4[jc];
      const float uu[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int j = 4 * jc + k;
        const float h = tanh_scaled(z[c][j]);
        hacc[c][j] = kBias ? fmaf(v, h, hacc[c][j]) : hacc[c][j] + h;
        z[c][j] = (kBias ? v * uu[k] : uu[k]) * fmaf(-h, h, 1.f);
      }
    }
    if (kBias) spec_acc<N1>(bsum + c * N1, 1.f, z[c]);
  }
}

// kSplit: the split backward, a block of K warps a sample as the split forward's (each warp a segment of the
// sample's chunks); the warps' gradient rows of the sample are added in warp order and stored once
// (split_store_gathered for gathered rows, store_row_grad's warps of equal ids for a table row).
template <typename T, int C, bool OI, bool kSplit>
__global__ void __launch_bounds__(kSplit ? spec_split_reg_warps(C, true) * 32 : kSpecWarps * 32,
                                  kSplit ? 1 : spec_bwd_blocks<C>())
    spec_backward_kernel(Fast f, SpecGeo g, int B, int T_len, CoActionRows rows, const int64_t* __restrict__ ind_ids,
                         const T* __restrict__ feed, const int64_t* __restrict__ feed_ids,
                         const float* __restrict__ mask, const float* __restrict__ grad_out,
                         float* __restrict__ grad_feed) {
  constexpr int D = kSpecD, N1 = kSpecN1, N2 = kSpecN2, S = N1 + N2, NR = spec_row_regs<C, OI>();
  constexpr int NG = (C * S + 31) / 32;  // grad_out values per lane
  constexpr bool kGxInFeed = sizeof(T) == 4;  // the fp32 feed gradient is staged over the lane's feed row
  constexpr int FRS = spec_frs(sizeof(T));  // g.FRS, as a constant
  extern __shared__ __align__(16) float smem[];
  // the table row each warp's gradient belongs to (-1: none); kSplitStatic bytes at most
  __shared__ int64_t blk_row[kSplit ? kSplitMax : kFastWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int b, t_lo, t_end;  // the sample and the warp's positions [t_lo, t_end); b may be past the batch (no row)
  warp_sample<kSplit>(B, T_len, warp, &b, &t_lo, &t_end);
  float* base = smem + static_cast<size_t>(warp) * g.per_warp;
  const float* W = base + g.oW;
  float* gW = base + g.oGW;
  float* G = base + g.oG;
  float* U = base + g.oU;
  int* q = reinterpret_cast<int*>(base + g.oQ);
  float* rws = base + g.oRows;
  float* my = rws + lane * g.RS;
  float* fbuf = base + g.oFeed;
  const int buf = 32 * FRS;
  int shard = 0;
  int64_t local = 0;
  const T* row = b < B ? induction_row<T>(rows, ind_ids, b, f.ind_dim, &shard, &local) : nullptr;
  // No early return: with ids every warp of the block meets the barrier before the row gradients are combined.
  if (row) {
    float wr[NR], gr[NG];
    spec_load_row(row, f.ind_dim, lane, wr);
#pragma unroll
    for (int k = 0; k < NG; ++k)
      gr[k] = lane + 32 * k < C * S ? grad_out[static_cast<size_t>(b) * f.n_out + lane + 32 * k] : 0.f;
    const float* mrow = mask + static_cast<size_t>(b) * T_len;
    SpecQueue sq = spec_queue(mrow, t_end, lane, t_lo);
    int ta, tb;
    int na = spec_next_round(mrow, t_end, q, sq, lane, &ta);
    size_t fa = spec_frow(feed_ids, rows.feed_rows, b, T_len, ta);
    int nb = spec_next_round(mrow, t_end, q, sq, lane, &tb);
    size_t fb = spec_frow(feed_ids, rows.feed_rows, b, T_len, tb);
    for (int i = 4 * lane; i < g.oG - g.oGW; i += 128)  // (a multiple of 4 floats, 16-byte aligned)
      *reinterpret_cast<float4*>(gW + i) = make_float4(0.f, 0.f, 0.f, 0.f);
    if (f.bias)
      for (int i = g.rB; i < g.rB + C * N1; i += 4)
        *reinterpret_cast<float4*>(my + i) = make_float4(0.f, 0.f, 0.f, 0.f);
    spec_fetch_row(f, feed, fa, ta >= 0, fbuf + lane * FRS);
    cp_async_commit();
#pragma unroll
    for (int k = 0; k < NG; ++k)
      if (lane + 32 * k < C * S) G[lane + 32 * k] = gr[k];
    // W1 and b1 of every slice pre-scaled for tanh_scaled (as the forward's); the barrier of spec_store_row orders
    // the writes above before the reads below
    spec_store_row(base + g.oW, f.ind_dim, lane, wr, kTanhScale, f.wslice, f.woff[1]);
    // u_c = G1_c + W2_c G2_c: the first layer's upstream gradient, the same for every behaviour of the sample
    for (int k = lane; k < C * N1; k += 32) {
      const int c = k / N1, j = k - c * N1;
      const float* w2 = W + (OI ? c * f.wslice : 0) + f.woff[1] + j * N2;
      float u = G[c * S + j];
#pragma unroll
      for (int m = 0; m < N2; ++m) u = fmaf(w2[m], G[c * S + N1 + m], u);
      U[k] = u * (1.f / kTanhScale);  // dz then comes out divided by kTanhScale: W1 dz is the feed gradient
    }
    __syncwarp();
    // this lane's tile of W1's gradient, columns 4 tj .. 4 tj + 3 (tj = lane & 1): row ti = lane / 2 of every order,
    // over all the round's rows; or (kHalves: one W1 for 2 or 3 orders) rows 2 ri and 2 ri + 1 (ri = lane / 2 % 8:
    // one 8-byte load of x a behaviour), the orders folded per row by Horner (x dz_0 + x^2 dz_1 + ... =
    // x (dz_0 + x (dz_1 + ...))), over the round's even rows (lanes 0-15) or odd rows (16-31), the halves added once
    // per sample: each lane reads its half of the behaviours (4 shared-memory loads each: x's pair and 3 dz vectors),
    // and keeps 8 accumulators instead of 12 at 3 orders (1 order has 4 already, 4 orders spill more)
    constexpr bool kHalves = !OI && (C == 2 || C == 3);
    constexpr int NT = kHalves ? 2 : C;
    const int ti = lane >> 1, tj = lane & 1, ri = ti & 7, th = lane >> 4;
    float tacc[NT][4], hacc[C][N1];
#pragma unroll
    for (int c = 0; c < NT; ++c)
#pragma unroll
      for (int k = 0; k < 4; ++k) tacc[c][k] = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int j = 0; j < N1; ++j) hacc[c][j] = 0.f;
    int valid = 0, cur = 0;
    while (na > 0) {
      if (nb > 0) spec_fetch_row(f, feed, fb, tb >= 0, fbuf + (cur ^ 1) * buf + lane * FRS);
      cp_async_commit();
      int tc;
      const int nc = spec_next_round(mrow, t_end, q, sq, lane, &tc);
      const size_t fc = spec_frow(feed_ids, rows.feed_rows, b, T_len, tc);
      cp_async_wait<1>();
      __syncwarp();  // every lane's row of round a is in: the W1 tiles read all of them
      valid += na;
      float* rb = fbuf + cur * buf;
      float x[D], z[C][N1];
      spec_read_x<T>(rb + lane * FRS, x);
      spec_first_layer<C, OI>(W, f.wslice, f.bias, x, z);
      if (ta < 0)  // a lane past the round: its x = 0 times an infinite W1 is NaN, which its sums must not see
#pragma unroll
        for (int c = 0; c < C; ++c)
#pragma unroll
          for (int j = 0; j < N1; ++j) z[c][j] = 0.f;
      // h1 sums (for W2's gradient) and dz in place of z; with bias the lane's dz also goes to its b1 sums
      if (f.bias)
        spec_dz<C, true>(U, ta >= 0 ? 1.f : 0.f, my + g.rB, z, hacc);
      else
        spec_dz<C, false>(U, 1.f, nullptr, z, hacc);
#pragma unroll
      for (int c = 0; c < C; ++c) store_row<N1>(my + g.rDZ + c * N1, z[c], N1);
      // feed gradient: gx_i = sum_c (c + 1) x_i^c (W1_c dz_c)_i, by Horner in x_i over (c + 1) dz_c (scaled once a
      // round: dz is staged unscaled above, for W1's gradient)
      float gx[D];
#pragma unroll
      for (int c = 1; c < C; ++c)
#pragma unroll
        for (int j = 0; j < N1; ++j) z[c][j] *= static_cast<float>(c + 1);
#pragma unroll
      for (int i = 0; i < D; ++i) {
        float sc[C];
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const float4* w4 = reinterpret_cast<const float4*>(W + (OI ? c * f.wslice : 0)) + i * (N1 / 4);
          sc[c] = 0.f;
#pragma unroll
          for (int jc = 0; jc < N1 / 4; ++jc) {
            const float4 w = w4[jc];
            sc[c] = fmaf(w.x, z[c][4 * jc], sc[c]);
            sc[c] = fmaf(w.y, z[c][4 * jc + 1], sc[c]);
            sc[c] = fmaf(w.z, z[c][4 * jc + 2], sc[c]);
            sc[c] = fmaf(w.w, z[c][4 * jc + 3], sc[c]);
          }
        }
        float sum = sc[C - 1];
#pragma unroll
        for (int c = C - 2; c >= 0; --c) sum = fmaf(sum, x[i], sc[c]);
        gx[i] = sum;
      }
      __syncwarp();
      // W1's gradient: this lane's tile, summed over the round's rows m of x^(c+1) (x) dz_c
      if constexpr (!kHalves) {
        const float* xr = rb;
        const float* dm = rws + g.rDZ + 4 * tj;
#pragma unroll 2
        for (int m = 0; m < na; ++m, xr += FRS, dm += g.RS) {
          const float xm = spec_x_at<T>(xr, ti);
          float p = xm;
#pragma unroll
          for (int c = 0; c < C; ++c) {
            if (c) p *= xm;
            const float4 d = *reinterpret_cast<const float4*>(dm + c * N1);
            tacc[c][0] = fmaf(p, d.x, tacc[c][0]);
            tacc[c][1] = fmaf(p, d.y, tacc[c][1]);
            tacc[c][2] = fmaf(p, d.z, tacc[c][2]);
            tacc[c][3] = fmaf(p, d.w, tacc[c][3]);
          }
        }
      } else {
        const float* xr = rb + th * FRS;
        const float* dm = rws + g.rDZ + 4 * tj + th * g.RS;
#pragma unroll 4
        for (int m = th; m < na; m += 2, xr += 2 * FRS, dm += 2 * g.RS) {
          const float2 xp = spec_x_pair<T>(xr, 2 * ri);
          const float xa = xp.x, xb = xp.y;
          float d[C][4];
#pragma unroll
          for (int c = 0; c < C; ++c) {
            const float4 dv = *reinterpret_cast<const float4*>(dm + c * N1);
            d[c][0] = dv.x, d[c][1] = dv.y, d[c][2] = dv.z, d[c][3] = dv.w;
          }
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            float ha = d[C - 1][k], hb = ha;
#pragma unroll
            for (int c = C - 2; c >= 0; --c) ha = fmaf(xa, ha, d[c][k]), hb = fmaf(xb, hb, d[c][k]);
            tacc[0][k] = fmaf(xa, ha, tacc[0][k]);
            tacc[1][k] = fmaf(xb, hb, tacc[1][k]);
          }
        }
      }
      if (feed_ids) {
        const unsigned long long key = ta >= 0 ? static_cast<unsigned long long>(fa) : ~0ull - lane;
        if (__all_sync(0xffffffffu, __match_any_sync(0xffffffffu, key) == 1u << lane)) {
          // no feed row twice in the round (the common case): each lane adds its own, from its registers
          if (ta >= 0) {
            const float4 s4[D / 4] = {make_float4(gx[0], gx[1], gx[2], gx[3]), make_float4(gx[4], gx[5], gx[6], gx[7]),
                                      make_float4(gx[8], gx[9], gx[10], gx[11]),
                                      make_float4(gx[12], gx[13], gx[14], gx[15])};
            spec_add_feed_grad(f, grad_feed + fa * D, s4);
          }
        } else {  // lanes sharing a feed row add theirs once (staged in shared memory)
          if (kGxInFeed) __syncwarp();  // every lane's tiles have read the feed rows the gradients overwrite
          float* gxs = kGxInFeed ? rb : rws + g.rGX;
          const int gstride = kGxInFeed ? FRS : g.RS;
          store_row<D>(gxs + lane * gstride, gx, D);
          __syncwarp();
          spec_store_feed_grad(f, grad_feed, fa, ta, gxs, gstride, lane);
        }
      } else if (ta >= 0) {
        float* dst = grad_feed + fa * D;
        if (f.gfeed_vec) {
#pragma unroll
          for (int i = 0; i < D; i += 4)
            *reinterpret_cast<float4*>(dst + i) = make_float4(gx[i], gx[i + 1], gx[i + 2], gx[i + 3]);
        } else {
#pragma unroll
          for (int i = 0; i < D; ++i) dst[i] = gx[i];
        }
      }
      __syncwarp();  // the rows and this feed buffer are rewritten by the coming rounds
      na = nb, ta = tb, fa = fb, nb = nc, tb = tc, fb = fc, cur ^= 1;
    }
    cp_async_wait<0>();  // a sample without a valid behaviour leaves its prologue's (zero-fill) copies unwaited
    // W1: the lanes' tiles (without order independence the orders share one W1: summed in order; kHalves: the
    // even-row half plus the odd-row half, lanes 0-15 store)
    if constexpr (!kHalves) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (!OI && c) continue;
        float s[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          s[k] = tacc[c][k];
          if (!OI)
#pragma unroll
            for (int c2 = 1; c2 < C; ++c2) s[k] += tacc[c2][k];
        }
        float* gw = gW + (OI ? c * f.wslice : 0) + ti * N1 + 4 * tj;
#pragma unroll
        for (int k = 0; k < 4; ++k) gw[k] += s[k] * kTanhScale;  // (dz came out divided by it)
      }
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int k = 0; k < 4; ++k) tacc[r][k] += __shfl_xor_sync(0xffffffffu, tacc[r][k], 16);
      if (th == 0)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float* gw = gW + (2 * ri + r) * N1 + 4 * tj;
#pragma unroll
          for (int k = 0; k < 4; ++k) gw[k] += tacc[r][k] * kTanhScale;
        }
    }
    // W2 and the biases from the h1 and dz sums: the lanes' h1 sums go to their rows' first C x N1 slots; lane j
    // then owns row j of W2 and b1[j] in every slice, lane m < N2 b2[m]; orders are added in turn
#pragma unroll
    for (int c = 0; c < C; ++c) store_row<N1>(my + c * N1, hacc[c], N1);
    __syncwarp();
    // lane k < C x N1 sums column k = (c, j) over the 32 rows in row order: h1 into U, dz (bias) into the feed
    // buffer (both free after the rounds)
    if (lane < C * N1) {
      float hsum = 0.f, bsum = 0.f;
#pragma unroll 8
      for (int m = 0; m < 32; ++m) {
        hsum += rws[m * g.RS + lane];
        if (f.bias) bsum += rws[m * g.RS + g.rB + lane];
      }
      U[lane] = hsum;
      fbuf[lane] = bsum * kTanhScale;
    }
    __syncwarp();
    // (a split sample's segment without a behaviour adds nothing: skipped, so that 0 times an infinite grad_out does
    // not add a NaN that one warp a sample would not; warp-uniform)
    for (int j = lane; j < N1 && (!kSplit || valid > 0); j += 32)
      for (int c = 0; c < C; ++c) {
        const float hsum = U[c * N1 + j], bsum = fbuf[c * N1 + j];
        float* gw = gW + (OI ? c * f.wslice : 0);
        const float* g2 = G + c * S + N1;
#pragma unroll
        for (int m = 0; m < N2; ++m) gw[f.woff[1] + j * N2 + m] += hsum * g2[m];
        if (f.bias) gw[D * N1 + j] += bsum;
      }
    if (f.bias && (!kSplit || valid > 0))
      for (int m = lane; m < N2; m += 32)
        for (int c = 0; c < C; ++c)
          gW[(OI ? c * f.wslice : 0) + f.woff[1] + N1 * N2 + m] += static_cast<float>(valid) * G[c * S + N1 + m];
    __syncwarp();
  }
  if constexpr (kSplit) {
    if (!ind_ids) return split_store_gathered(f, rows, b, row != nullptr, smem, g.per_warp, g.oGW, warp, lane);
  }
  store_row_grad<true>(f, rows, ind_ids, b, row != nullptr, shard, local, smem, g.per_warp, g.oGW, blk_row, warp,
                       lane);
}

// ---------------------------------------------------------------------------------------------------------------
// Id range check: one pass over both id arrays (a = ind_ids, b = feed_ids); flags in mapped pinned host memory, set
// (never cleared) by a warp that saw a bad id, no atomics. mb (may be null: every b id is checked): the mask of the b
// ids ([B, T] float32); an id at a masked position (mask 0) is not checked, since that position contributes nothing
// whatever its row: padding may hold any value (-1, say).

__global__ void check_ids_kernel(const int64_t* __restrict__ a, int64_t na, int64_t ra, const int64_t* __restrict__ b,
                                 int64_t nb, int64_t rb, const float* __restrict__ mb, volatile int* flags) {
  bool bad_a = false, bad_b = false;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < na + nb;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < na) {
      const int64_t v = a[i];
      bad_a |= v < 0 || v >= ra;
    } else if (!mb || mb[i - na] != 0.f) {  // (a NaN mask is nonzero: present, as the kernels count it)
      const int64_t v = b[i - na];
      bad_b |= v < 0 || v >= rb;
    }
  }
  const bool any_a = __any_sync(0xffffffffu, bad_a), any_b = __any_sync(0xffffffffu, bad_b);
  if ((threadIdx.x & 31) == 0) {
    if (any_a) flags[0] = 1;
    if (any_b) flags[1] = 1;
  }
}

// One range check in flight per process: the flags (mapped pinned host memory, allocated at the first check) are
// shared, so an IdCheck holds the lock from its launch to its result (callers on other threads wait their turn).
// The result is awaited on an event recorded behind the check kernel (one per device, created at its first check):
// the caller launches its own work first, then waits for the check alone.
class IdCheck {
 public:
  // Launches the check of both arrays (a null pointer or a count of 0: that array is not checked; feed_mask, when not
  // null, the feed ids' [B, T] mask: masked ones are not checked) on stream s of the current device; with nothing to
  // check nothing is launched, no lock is taken and result() is 0.
  IdCheck(uintptr_t ind_ids, int64_t n_ind, int64_t ind_rows, uintptr_t feed_ids, int64_t n_feed, int64_t feed_rows,
          uintptr_t feed_mask, cudaStream_t s) {
    const bool ci = ind_ids && n_ind > 0, cf = feed_ids && n_feed > 0;
    if (!ci && !cf) return;
    hold_ = std::unique_lock<std::mutex>(lock());
    static int *flags = nullptr, *dev = nullptr;  // dev: their device address (one for every device: portable, UVA)
    if (!flags) {
      DWDP_CUDA_CHECK(cudaHostAlloc(&flags, 2 * sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable));
      DWDP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev), flags, 0));
    }
    flags_ = flags;
    flags_[0] = flags_[1] = 0;
    int device;
    DWDP_CUDA_CHECK(cudaGetDevice(&device));
    static std::map<int, cudaEvent_t> events;
    auto it = events.find(device);
    if (it == events.end()) {
      cudaEvent_t e;
      DWDP_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      it = events.emplace(device, e).first;
    }
    event_ = it->second;
    const int64_t n = (ci ? n_ind : 0) + (cf ? n_feed : 0);
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 1024);
    try {
      check_ids_kernel<<<static_cast<int>(blocks), threads, 0, s>>>(
          reinterpret_cast<const int64_t*>(ind_ids), ci ? n_ind : 0, ind_rows,
          reinterpret_cast<const int64_t*>(feed_ids), cf ? n_feed : 0, feed_rows,
          reinterpret_cast<const float*>(feed_mask), dev);
      DWDP_LAUNCH_CHECK();
      DWDP_CUDA_CHECK(cudaEventRecord(event_, s));
    } catch (...) {  // no destructor runs for a constructor that throws: a queued check is waited for here
      cudaStreamSynchronize(s);
      throw;
    }
  }

  // An exception between the launch and result() (a shape the kernels refuse, a failed launch): the check kernel may
  // still be writing the shared flags, so it is waited for before the lock lets the next check reset them.
  ~IdCheck() {
    if (event_ && !done_) cudaEventSynchronize(event_);
  }
  IdCheck(const IdCheck&) = delete;
  IdCheck& operator=(const IdCheck&) = delete;

  // Waits for the check (and what the stream ran before it): bit 0 a bad ind id, bit 1 a bad feed id. It spins on the
  // event for up to a millisecond (a check launched before the caller's own launches is usually done by then), then
  // blocks: the context's scheduling mode (spin, yield or blocking synchronisation) only shapes long waits.
  int result() {
    if (!event_) return 0;
    done_ = true;
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      const cudaError_t e = cudaEventQuery(event_);
      if (e == cudaSuccess) break;
      if (e != cudaErrorNotReady) DWDP_CUDA_CHECK(e);
      if (std::chrono::steady_clock::now() - t0 > std::chrono::milliseconds(1)) {
        DWDP_CUDA_CHECK(cudaEventSynchronize(event_));
        break;
      }
    }
    return (flags_[0] ? 1 : 0) | (flags_[1] ? 2 : 0);
  }

 private:
  static std::mutex& lock() {
    static std::mutex m;
    return m;
  }
  std::unique_lock<std::mutex> hold_;
  volatile int* flags_ = nullptr;
  cudaEvent_t event_ = nullptr;
  bool done_ = false;
};

void check_dims(const CoActionDims& d) {
  DWDP_REQUIRE(d.num_layers >= 1 && d.num_layers <= kCoMaxLayers, "co-action: 1 to " << kCoMaxLayers << " layers");
  for (int l = 0; l < d.num_layers; ++l) {
    DWDP_REQUIRE(d.din[l] >= 1 && d.dout[l] >= 1 && d.din[l] <= 256 && d.dout[l] <= 256,
                 "co-action: layer dims must be in [1, 256]");
    if (l) DWDP_REQUIRE(d.din[l] == d.dout[l - 1], "co-action: layer dims do not chain");
  }
  DWDP_REQUIRE(d.orders >= 1 && d.orders <= 8, "co-action: orders must be in [1, 8]");
}

void check_rows(const CoActionRows& r, uintptr_t feed_ids, int64_t n_feed_ids) {
  DWDP_REQUIRE(!feed_ids || n_feed_ids == 0 || r.feed_rows >= 1, "co-action: feed ids index a feed table with no rows");
  DWDP_REQUIRE(r.shards >= 1 && r.shards <= kCoMaxShards, "co-action: 1 to " << kCoMaxShards << " table shards");
  DWDP_REQUIRE(r.rows_per_shard >= 1, "co-action: rows_per_shard must be positive");
  // (num_rows - 1) / shards < rows_per_shard: num_rows <= rows_per_shard x shards without the product, which wraps
  // past 2**63 (rows_per_shard 2**61 on 8 shards had refused 5 rows)
  DWDP_REQUIRE(r.num_rows >= 0 && (r.num_rows == 0 || (r.num_rows - 1) / r.shards < r.rows_per_shard),
               "co-action: num_rows must be in [0, rows_per_shard x shards]");
  for (int s = 0; s < r.shards; ++s) DWDP_REQUIRE(r.base[s] != 0, "co-action: shard " << s << " has no address");
}

}  // namespace

namespace {
size_t fallback_shape(const CoActionDims& d, bool backward, int* warps) {
  const Geo g(d, backward);
  const size_t per = sizeof(float) * static_cast<size_t>(g.per_warp);
  *warps = static_cast<int>(std::min<size_t>(kWarpsMax, kSmemMax / per));
  return per;
}

// The fast path takes a shape when its padded widths fit the register arrays and one warp's shared memory fits.
// kFastStatic: the backward's static shared memory (blk_row) comes out of the same 227 KiB.
constexpr size_t kFastStatic = 64;
bool fast_fits(const Fast& f) {
  return f.MW > 0 && sizeof(float) * static_cast<size_t>(f.per_warp) <= kSmemMax - kFastStatic;
}
}  // namespace

namespace {
// The specialised kernels' shape (D, N1, N2) = (16, 8, 4), the CAN reference configuration: a two-layer MLP whose
// last layer is linear (not the paper variant), 1-4 orders (more go to the general kernels: C x 8 first-layer sums
// per lane in registers). DWDP_COACTION_SPECIALIZED=0 sends it to the general fast path (a
// benchmark's same-run baseline); read at every launch.
bool spec_disabled() {
  const char* e = std::getenv("DWDP_COACTION_SPECIALIZED");
  return e && e[0] == '0' && e[1] == '\0';
}

// Warps per block and dynamic shared memory of the specialised kernels for d with feed elements of elem bytes (the
// queries without a dtype use 4, the larger); false when they do not take it.
bool spec_shape(const CoActionDims& d, bool backward, int elem, int* warps, size_t* smem) {
  if (spec_disabled() || d.paper || d.num_layers != 2 || d.din[0] != kSpecD || d.dout[0] != kSpecN1 ||
      d.din[1] != kSpecN1 || d.dout[1] != kSpecN2 || d.orders < 1 || d.orders > kSpecMaxOrders ||
      d.ind_dim != (d.order_independent ? d.orders : 1) * d.order_width)  // the row as the kernels lay it out
    return false;
  const size_t per = sizeof(float) * static_cast<size_t>(make_spec_geo(make_fast(d, backward), backward, elem).per_warp);
  const int w = static_cast<int>(std::min<size_t>(kSpecWarps, (kSmemMax - kFastStatic) / per));
  if (w < 1) return false;
  *warps = w;
  *smem = per * static_cast<size_t>(w);
  return true;
}
}  // namespace

namespace {
// DWDP_COACTION_SPLIT, read at every forward and backward launch on the specialised or the general register-path
// kernels: unset or "auto" (0 returned): the launch picks the warps a sample; "1", "2", "4", "8" or "16": that many.
// Anything else is an error naming the variable.
int split_from_env() {
  const char* e = std::getenv("DWDP_COACTION_SPLIT");
  if (!e || !*e || std::string(e) == "auto") return 0;
  const std::string v(e);
  for (int k = 1; k <= kSplitMax; k *= 2)
    if (v == std::to_string(k)) return k;
  DWDP_REQUIRE(false, "DWDP_COACTION_SPLIT must be 'auto' or one of 1, 2, 4, 8, 16 (warps a sample of the "
                      "co-action forward and backward), got '"
                          << v << "'");
  return 0;
}

// Multiprocessors of device dev (cached: the forward asks at every launch).
int device_sms(int dev) {
  static std::mutex mu;
  static std::map<int, int> sms;
  std::lock_guard<std::mutex> lock(mu);
  auto it = sms.find(dev);
  if (it != sms.end()) return it->second;
  int n = 0;
  DWDP_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  sms[dev] = n;
  return n;
}
}  // namespace

namespace {
// Shared memory of an SM (Hopper: 228 KiB, of which a block may have kSmemMax) and what each resident block reserves.
constexpr size_t kSmemSM = 228 * 1024, kSmemBlockReserve = 1024;

// The warps a sample of a split kernel whose warps take per_warp_bytes of shared memory (the backward's block also
// kSplitStatic bytes of static shared memory), at most kmax of them, of which an SM holds reg_warps by registers.
int split_warps(int kmax, int reg_warps, bool backward, size_t per_warp_bytes, int B, int T, int sms, int forced) {
  const int64_t chunks = (static_cast<int64_t>(T) + 31) / 32;
  const size_t stat = backward ? kSplitStatic : 0;
  // the most warps a block's shared memory and the kernel's thread bound allow (a power of two)
  int fit = 1;
  while (2 * fit <= kmax && 2 * static_cast<size_t>(fit) * per_warp_bytes <= kSmemMax - stat) fit *= 2;
  if (forced) return std::min(forced, fit);
  // The most warps a sample such that every warp keeps a chunk and the grid stays within one wave of a warp budget per
  // SM: 16 when each warp keeps at least 4 chunks, else 8 (about where the SM's issue slots fill: more warps of short
  // segments repeat a sample's setup for no gain), and never more than the SM holds of K-warp blocks by their shared
  // memory and registers (the 3- and 4-order order-independent backward with bias holds 8-10: a grid past that runs
  // in two waves, 1.25-1.5x slower than the next K down). Measured on one H200 (docs/benchmarks.md, "Sixteenth
  // session" to "Eighteenth session") at T = 100 / 1000 / 2000 and B = 1-4096 on eight shapes, forward and backward:
  // never slower than K = 1 (460 cases), within 2 % of the fastest K of 1-16 in 425; it keeps too few warps in the
  // others (large B, long T: up to 1.21x).
  int k = 1;
  for (int c = 2; c <= fit && c <= chunks; c *= 2) {
    const int64_t by_smem =
        c * static_cast<int64_t>(kSmemSM / (static_cast<size_t>(c) * per_warp_bytes + stat + kSmemBlockReserve));
    const int64_t by_regs = reg_warps / c * c;
    const int64_t resident = std::min(by_smem, by_regs);
    const int64_t budget = static_cast<int64_t>(sms) * std::min<int64_t>(resident, chunks / c >= 4 ? 16 : 8);
    if (static_cast<int64_t>(B) * c <= budget) k = c;
  }
  return k;
}

// The split of the specialised kernels (geo: their geometry for f) and of the general fast ones (f.MW > 0).
int spec_split(const Fast& f, const SpecGeo& geo, bool backward, int B, int T, int sms, int forced) {
  return split_warps(spec_split_max(f.C, backward), spec_split_reg_warps(f.C, backward), backward,
                     sizeof(float) * static_cast<size_t>(geo.per_warp), B, T, sms, forced);
}
int fast_split(const Fast& f, bool backward, int B, int T, int sms, int forced) {
  const int mw_threads = f.MW == 8 ? fast_split_threads<8>() : f.MW == 16 ? fast_split_threads<16>()
                                                                           : fast_split_threads<32>();
  const int reg_warps = mw_threads / 32;
  int kmax = 1;
  while (2 * kmax <= reg_warps) kmax *= 2;
  return split_warps(kmax, reg_warps, backward, sizeof(float) * static_cast<size_t>(f.per_warp), B, T, sms, forced);
}
}  // namespace

int coaction_split_warps(const CoActionDims& d, bool backward, int elem, int B, int T, int sms, int forced) {
  check_dims(d);
  DWDP_REQUIRE(elem == 2 || elem == 4, "coaction_split_warps: elem (bytes of a feed element) must be 2 or 4, got "
                                           << elem);
  DWDP_REQUIRE(B >= 1 && T >= 1 && sms >= 1,
               "coaction_split_warps: B, T and sms must be >= 1, got B " << B << ", T " << T << ", sms " << sms);
  DWDP_REQUIRE(forced >= -1 && forced <= kSplitMax && (forced <= 0 || (forced & (forced - 1)) == 0),
               "coaction_split_warps: forced must be -1 (DWDP_COACTION_SPLIT), 0 (pick) or a power of two up to "
                   << kSplitMax << ", got " << forced);
  int w;
  size_t sm;
  const Fast f = make_fast(d, backward);
  const bool spec = spec_shape(d, backward, elem, &w, &sm);
  if (!spec && !fast_fits(f)) return 0;  // the fallback kernels (the variable is not read for such a shape)
  if (forced < 0) forced = split_from_env();
  return spec ? spec_split(f, make_spec_geo(f, backward, elem), backward, B, T, sms, forced)
              : fast_split(f, backward, B, T, sms, forced);
}

bool coaction_specialized(const CoActionDims& d, bool backward) {
  check_dims(d);  // the op's limits, as coaction_launch_shape checks them (orders 9 had been "not specialised")
  int w;
  size_t sm;
  return spec_shape(d, backward, 4, &w, &sm);
}

namespace {
// The general kernels' shape (fast path or fallback), whatever the specialised kernels would take.
void general_shape(const CoActionDims& d, bool backward, int* warps, size_t* smem, bool* fast) {
  const Fast f = make_fast(d, backward);
  const bool use_fast = fast_fits(f);
  if (fast) *fast = use_fast;
  if (use_fast) {
    const size_t per = sizeof(float) * static_cast<size_t>(f.per_warp);
    *warps = static_cast<int>(std::min<size_t>(kFastWarps, (kSmemMax - kFastStatic) / per));
    *smem = per * static_cast<size_t>(*warps);
    return;
  }
  const size_t per = fallback_shape(d, backward, warps);
  *smem = per * static_cast<size_t>(*warps);
}
}  // namespace

void coaction_launch_shape(const CoActionDims& d, bool backward, int* warps, size_t* smem, bool* fast) {
  check_dims(d);  // the op's limits, as the launches check them
  if (spec_shape(d, backward, 4, warps, smem)) {
    if (fast) *fast = true;
    return;
  }
  general_shape(d, backward, warps, smem, fast);
}

namespace {
// Validates, picks the general path, raises the kernel's shared-memory limit. Returns warps per block. (The launches
// ask spec_shape first; this one is the general kernels' own shape, so that the specialised kernels' shape can
// never reach a general launch, even if DWDP_COACTION_SPECIALIZED changes between the two reads.)
int prepare(const CoActionDims& d, bool backward, bool* fast, const void* fast_kernel, const void* warp_kernel,
            size_t* smem) {
  check_dims(d);
  int warps;
  general_shape(d, backward, &warps, smem, fast);
  DWDP_REQUIRE(warps >= 1, "co-action: one warp's induction row and activations need "
                               << sizeof(float) * Geo(d, backward).per_warp
                               << " bytes of shared memory; at most 227 KiB (use smaller layers or fewer orders)");
  DWDP_CUDA_CHECK(cudaFuncSetAttribute(*fast ? fast_kernel : warp_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(*smem)));
  return warps;
}

// The fast kernel instance for the padded width MW (8, 16 or 32).
template <typename K8, typename K16, typename K32>
const void* by_width(int mw, K8 k8, K16 k16, K32 k32) {
  return mw == 8 ? reinterpret_cast<const void*>(k8)
                 : mw == 16 ? reinterpret_cast<const void*>(k16) : reinterpret_cast<const void*>(k32);
}
}  // namespace

namespace {
// Dynamic shared memory a kernel may take without raising its attribute.
constexpr size_t kSmemDefault = 48 * 1024;

// The specialised forward's blocks are small and many: under the default L1 / shared-memory split its shared memory
// bounds a SM to 10 blocks (Nsight Compute), below what its registers allow, so it asks once per process for the
// largest shared-memory carveout (a per-function hint, set on the device current at the first call: other devices
// of the process keep the default split, which costs occupancy, not results). The backward keeps the default: with
// the largest carveout (less L1) it ran 14 % slower.
void prefer_shared(const void* kernel) {
  static std::mutex mu;
  static std::set<const void*> done;
  std::lock_guard<std::mutex> lock(mu);
  if (done.insert(kernel).second)
    DWDP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         cudaSharedmemCarveoutMaxShared));
}

// Raises a kernel's dynamic shared-memory limit on device dev (the current one) to at least `bytes`, once per device,
// kernel and size (the attribute is a device's: a process launching on several GPUs sets it on each).
void raise_smem(int dev, const void* kernel, size_t bytes) {
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, size_t> done;
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = done[{dev, kernel}];
  if (bytes <= have) return;
  DWDP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  have = bytes;
}

// Blocks of `threads` threads and `smem` bytes of dynamic shared memory that an SM of device dev (the current one)
// holds of `kernel` (cached per device, kernel, block and size; the kernel's shared-memory limit is raised first).
int resident_blocks(int dev, const void* kernel, int threads, size_t smem) {
  raise_smem(dev, kernel, smem);
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int, size_t>, int> got;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(dev, kernel, threads, smem);
  auto it = got.find(key);
  if (it != got.end()) return it->second;
  int n = 0;
  DWDP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  got[key] = n;
  return n;
}

// Whether the 32-wide one-warp forward runs its bounded build (fast_min_blocks): a grid of `blocks` blocks takes
// ceil(blocks / resident) waves of either build, and a wave of the bounded one, which holds more blocks a SM, takes
// longer: its samples share the SM with more warps and spill a little. Measured on one H200 (docs/benchmarks.md,
// "Eighteenth session"; deep and wide shapes, B = 1024-16384, T = 100-2000) its wave took 1.17-1.27x the unbounded
// one's at 1.5x the resident blocks, so it is picked where its waves times kFast32BoundWave are fewer: on an H200 (264
// -> 396 resident blocks of 4 samples) from B = 2113, but not where the two come out even (B = 4753-5280: 5 waves
// against 4 x 1.25), and never where the occupancy is the same. Checked there at B = 1024-16384 (docs/benchmarks.md,
// "Nineteenth session"): the pick was the faster build in every case.
constexpr double kFast32BoundWave = 1.25;
bool fast32_bounded(int dev, const void* unbounded, const void* bounded, int threads, size_t smem, int64_t blocks) {
  const int64_t sms = device_sms(dev);
  const int64_t ru = sms * resident_blocks(dev, unbounded, threads, smem);
  const int64_t rb = sms * resident_blocks(dev, bounded, threads, smem);
  if (ru <= 0 || rb <= ru) return false;
  const int64_t wu = (blocks + ru - 1) / ru, wb = (blocks + rb - 1) / rb;
  return static_cast<double>(wb) * kFast32BoundWave < static_cast<double>(wu);
}

// The specialised kernel instance for C orders (1-4; spec_shape admits no other).
template <typename K>
K spec_pick(int C, K k1, K k2, K k3, K k4) {
  return C == 1 ? k1 : C == 2 ? k2 : C == 3 ? k3 : k4;
}
}  // namespace

namespace {
// The specialised backward instance for C orders (1-4), order independence and kSplit (K warps a sample).
template <typename E, bool kSplit>
auto spec_backward_pick(int C, bool oi) {
  return oi ? spec_pick(C, spec_backward_kernel<E, 1, true, kSplit>, spec_backward_kernel<E, 2, true, kSplit>,
                        spec_backward_kernel<E, 3, true, kSplit>, spec_backward_kernel<E, 4, true, kSplit>)
            : spec_pick(C, spec_backward_kernel<E, 1, false, kSplit>, spec_backward_kernel<E, 2, false, kSplit>,
                        spec_backward_kernel<E, 3, false, kSplit>, spec_backward_kernel<E, 4, false, kSplit>);
}

// The specialised forward instance, likewise.
template <typename E, bool kSplit>
auto spec_forward_pick(int C, bool oi) {
  return oi ? spec_pick(C, spec_forward_kernel<E, 1, true, kSplit>, spec_forward_kernel<E, 2, true, kSplit>,
                        spec_forward_kernel<E, 3, true, kSplit>, spec_forward_kernel<E, 4, true, kSplit>)
            : spec_pick(C, spec_forward_kernel<E, 1, false, kSplit>, spec_forward_kernel<E, 2, false, kSplit>,
                        spec_forward_kernel<E, 3, false, kSplit>, spec_forward_kernel<E, 4, false, kSplit>);
}
}  // namespace

namespace {
// The kernels walk a sample's positions in 32-position chunks with 32-bit indices that run up to 95 past T.
constexpr int kMaxT = INT32_MAX - 128;
void check_batch(int B, int T) {
  DWDP_REQUIRE(B >= 0 && T >= 0 && T <= kMaxT,
               "co-action: B must be >= 0 and T in [0, " << kMaxT << "] (positions a sample), got B " << B << ", T " << T);
}
}  // namespace

namespace {
// The arrays of z zeroed by cudaMemsetAsync on s (the forward's path when its kernel does not zero them).
void zero_by_memset(const CoActionZero& z, cudaStream_t s) {
  for (int k = 0; k < 2; ++k)
    if (z.ptr[k] && z.n[k] > 0)
      DWDP_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(z.ptr[k]), 0, sizeof(float) * z.n[k], s));
}
}  // namespace

int coaction_forward(const CoActionDims& d, int dtype, int B, int T, const CoActionRows& rows, uintptr_t ind_ids,
                     uintptr_t feed, uintptr_t feed_ids, uintptr_t mask, uintptr_t out, uintptr_t stream,
                     bool check_ids, const CoActionZero& zero) {
  check_batch(B, T);
  check_rows(rows, feed_ids, static_cast<int64_t>(B) * T);
  const int dev = device_of(out, "coaction_forward: out");
  DeviceGuard guard(dev);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  // what the specialised kernel zeroes: 16-byte aligned arrays when a sample's share of them is at most 128 KiB (a
  // few samples cannot zero a large table at the memory's rate: a memset does); the rest by memset
  CoActionZero zk;
  CoActionZero zm;
  const int64_t total = zero.n[0] + zero.n[1];
  const bool by_kernel = B > 0 && static_cast<int64_t>(sizeof(float)) * total / B <= 128 * 1024;
  for (int k = 0; k < 2; ++k) {
    if (!zero.ptr[k] || zero.n[k] <= 0) continue;
    CoActionZero& to = by_kernel && zero.ptr[k] % 16 == 0 ? zk : zm;
    to.ptr[k] = zero.ptr[k];
    to.n[k] = zero.n[k];
  }
  // the check first on the stream, its result awaited after the forward's launch (the kernels are memory-safe on any
  // ids, see CoActionRows)
  IdCheck check(check_ids ? ind_ids : 0, B, rows.num_rows,
                check_ids ? feed_ids : 0, static_cast<int64_t>(B) * T, rows.feed_rows, mask, s);
  auto launch = [&](auto tag, auto k8, auto k16, auto k32, auto k32b, auto s8, auto s16, auto s32, auto kwarp) {
    using E = decltype(tag);
    Fast f = make_fast(d, false);
    const auto* ids = reinterpret_cast<const int64_t*>(ind_ids);
    const auto* fd = reinterpret_cast<const E*>(feed);
    const auto* fids = reinterpret_cast<const int64_t*>(feed_ids);
    const auto* mk = reinterpret_cast<const float*>(mask);
    auto* o = reinterpret_cast<E*>(out);
    f.feed_vec = feed % 16 == 0 && (f.D * sizeof(E)) % 16 == 0;
    int swarps;
    size_t ssmem;
    check_dims(d);
    if (spec_shape(d, false, sizeof(E), &swarps, &ssmem)) {
      const SpecGeo geo = make_spec_geo(f, false, sizeof(E));
      // a bad value raises before a kernel is queued but the id check (IdCheck waits for it)
      const int forced = split_from_env();
      zero_by_memset(zm, s);
      if (B == 0 || T == 0) {
        zero_by_memset(zk, s);
        return;
      }
      const int split = spec_split(f, geo, false, B, T, device_sms(dev), forced);
      if (split > 1) {
        const auto kspec = spec_forward_pick<E, true>(f.C, f.oi);
        const size_t ksmem = sizeof(float) * static_cast<size_t>(geo.per_warp) * split;
        if (ksmem > kSmemDefault) raise_smem(dev, reinterpret_cast<const void*>(kspec), ksmem);
        kspec<<<B, split * 32, ksmem, s>>>(f, geo, B, T, rows, ids, fd, fids, mk, o, spec_zero_plan(zk, B));
        DWDP_LAUNCH_CHECK();
        return;
      }
      const auto kspec = spec_forward_pick<E, false>(f.C, f.oi);
      prefer_shared(reinterpret_cast<const void*>(kspec));
      if (ssmem + kFastStatic > kSmemDefault)
        DWDP_CUDA_CHECK(
            cudaFuncSetAttribute(kspec, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(ssmem)));
      kspec<<<(B + swarps - 1) / swarps, swarps * 32, ssmem, s>>>(f, geo, B, T, rows, ids, fd, fids, mk, o,
                                                                  spec_zero_plan(zk, B));
      DWDP_LAUNCH_CHECK();
      return;
    }
    size_t smem;
    bool fast;
    const void* kfast = f.MW ? by_width(f.MW, k8, k16, k32) : nullptr;
    const int warps = prepare(d, false, &fast, kfast, reinterpret_cast<const void*>(kwarp), &smem);
    // a bad value raises before a kernel is queued but the id check (IdCheck waits for it)
    const int forced = fast ? split_from_env() : 0;
    zero_by_memset(zero, s);
    if (B == 0 || T == 0) return;
    const int split = fast ? fast_split(f, false, B, T, device_sms(dev), forced) : 1;
    if (split > 1) {
      const size_t ksmem = sizeof(float) * static_cast<size_t>(f.per_warp) * split;
      const void* ks = by_width(f.MW, s8, s16, s32);
      if (ksmem > kSmemDefault) raise_smem(dev, ks, ksmem);
      if (f.MW == 8)
        s8<<<B, split * 32, ksmem, s>>>(f, B, T, rows, ids, fd, fids, mk, o);
      else if (f.MW == 16)
        s16<<<B, split * 32, ksmem, s>>>(f, B, T, rows, ids, fd, fids, mk, o);
      else
        s32<<<B, split * 32, ksmem, s>>>(f, B, T, rows, ids, fd, fids, mk, o);
    } else if (fast) {
      const dim3 grid((B + warps - 1) / warps), block(warps * 32);
      if (f.MW == 8)
        k8<<<grid, block, smem, s>>>(f, B, T, rows, ids, fd, fids, mk, o);
      else if (f.MW == 16)
        k16<<<grid, block, smem, s>>>(f, B, T, rows, ids, fd, fids, mk, o);
      else if (fast32_bounded(dev, reinterpret_cast<const void*>(k32), reinterpret_cast<const void*>(k32b),
                              warps * 32, smem, grid.x))
        k32b<<<grid, block, smem, s>>>(f, B, T, rows, ids, fd, fids, mk, o);
      else
        k32<<<grid, block, smem, s>>>(f, B, T, rows, ids, fd, fids, mk, o);
    } else {
      kwarp<<<(B + warps - 1) / warps, warps * 32, smem, s>>>(d, Geo(d, false), B, T, rows, ids, fd, fids, mk, o);
    }
    DWDP_LAUNCH_CHECK();
  };
  if (dtype == 0)
    launch(float{}, fast_forward_kernel<float, 8, false>, fast_forward_kernel<float, 16, false>,
           fast_forward_kernel<float, 32, false>, fast_forward_kernel<float, 32, false, true>,
           fast_forward_kernel<float, 8, true>, fast_forward_kernel<float, 16, true>,
           fast_forward_kernel<float, 32, true>, warp_forward_kernel<float>);
  else
    launch(__nv_bfloat16{}, fast_forward_kernel<__nv_bfloat16, 8, false>, fast_forward_kernel<__nv_bfloat16, 16, false>,
           fast_forward_kernel<__nv_bfloat16, 32, false>, fast_forward_kernel<__nv_bfloat16, 32, false, true>,
           fast_forward_kernel<__nv_bfloat16, 8, true>,
           fast_forward_kernel<__nv_bfloat16, 16, true>, fast_forward_kernel<__nv_bfloat16, 32, true>,
           warp_forward_kernel<__nv_bfloat16>);
  return check.result();
}

void coaction_backward(const CoActionDims& d, int dtype, int B, int T, const CoActionRows& rows, uintptr_t ind_ids,
                       uintptr_t feed, uintptr_t feed_ids, uintptr_t mask, uintptr_t grad_out, uintptr_t grad_feed,
                       uintptr_t stream) {
  check_batch(B, T);
  check_rows(rows, feed_ids, static_cast<int64_t>(B) * T);
  for (int i = 0; i < rows.shards; ++i) DWDP_REQUIRE(rows.grad[i] != 0, "co-action: shard " << i << " has no gradient");
  // (a caller's gradient arrays are checked to be on the op's device in Python, coaction_backward_gpu's grads=)
  const int dev = device_of(grad_feed, "coaction_backward: grad_feed");
  DeviceGuard guard(dev);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto launch = [&](auto tag, auto k8, auto k16, auto k32, auto s8, auto s16, auto s32, auto kwarp) {
    using E = decltype(tag);
    Fast f = make_fast(d, true);
    const auto* ids = reinterpret_cast<const int64_t*>(ind_ids);
    const auto* fd = reinterpret_cast<const E*>(feed);
    const auto* fids = reinterpret_cast<const int64_t*>(feed_ids);
    const auto* mk = reinterpret_cast<const float*>(mask);
    const auto* go = reinterpret_cast<const float*>(grad_out);
    auto* gf = reinterpret_cast<float*>(grad_feed);
    f.feed_vec = feed % 16 == 0 && (f.D * sizeof(E)) % 16 == 0;
    f.gfeed_vec = grad_feed % 16 == 0 && f.D % 4 == 0;
    int swarps;
    size_t ssmem;
    check_dims(d);
    if (spec_shape(d, true, sizeof(E), &swarps, &ssmem)) {
      const SpecGeo geo = make_spec_geo(f, true, sizeof(E));
      const int forced = split_from_env();  // (a bad value raises before anything is queued)
      if (B == 0 || T == 0) return;
      const int split = spec_split(f, geo, true, B, T, device_sms(dev), forced);
      if (split > 1) {
        const auto kspec = spec_backward_pick<E, true>(f.C, f.oi);
        const size_t ksmem = sizeof(float) * static_cast<size_t>(geo.per_warp) * split;
        if (ksmem + kSplitStatic > kSmemDefault) raise_smem(dev, reinterpret_cast<const void*>(kspec), ksmem);
        kspec<<<B, split * 32, ksmem, s>>>(f, geo, B, T, rows, ids, fd, fids, mk, go, gf);
        DWDP_LAUNCH_CHECK();
        return;
      }
      const auto kspec = spec_backward_pick<E, false>(f.C, f.oi);
      if (ssmem + kFastStatic > kSmemDefault)
        DWDP_CUDA_CHECK(
            cudaFuncSetAttribute(kspec, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(ssmem)));
      kspec<<<(B + swarps - 1) / swarps, swarps * 32, ssmem, s>>>(f, geo, B, T, rows, ids, fd, fids, mk, go, gf);
      DWDP_LAUNCH_CHECK();
      return;
    }
    size_t smem;
    bool fast;
    const void* kfast = f.MW ? by_width(f.MW, k8, k16, k32) : nullptr;
    const int warps = prepare(d, true, &fast, kfast, reinterpret_cast<const void*>(kwarp), &smem);
    const int forced = fast ? split_from_env() : 0;  // (a bad value raises before anything is queued)
    if (B == 0 || T == 0) return;
    const int split = fast ? fast_split(f, true, B, T, device_sms(dev), forced) : 1;
    if (split > 1) {
      const size_t ksmem = sizeof(float) * static_cast<size_t>(f.per_warp) * split;
      const void* ks = by_width(f.MW, s8, s16, s32);
      if (ksmem + kSplitStatic > kSmemDefault) raise_smem(dev, ks, ksmem);
      if (f.MW == 8)
        s8<<<B, split * 32, ksmem, s>>>(f, B, T, rows, ids, fd, fids, mk, go, gf);
      else if (f.MW == 16)
        s16<<<B, split * 32, ksmem, s>>>(f, B, T, rows, ids, fd, fids, mk, go, gf);
      else
        s32<<<B, split * 32, ksmem, s>>>(f, B, T, rows, ids, fd, fids, mk, go, gf);
    } else if (fast) {
      const dim3 grid((B + warps - 1) / warps), block(warps * 32);
      if (f.MW == 8)
        k8<<<grid, block, smem, s>>>(f, B, T, rows, ids, fd, fids, mk, go, gf);
      else if (f.MW == 16)
        k16<<<grid, block, smem, s>>>(f, B, T, rows, ids, fd, fids, mk, go, gf);
      else
        k32<<<grid, block, smem, s>>>(f, B, T, rows, ids, fd, fids, mk, go, gf);
    } else {
      kwarp<<<(B + warps - 1) / warps, warps * 32, smem, s>>>(d, Geo(d, true), B, T, rows, ids, fd, fids, mk, go, gf);
    }
    DWDP_LAUNCH_CHECK();
  };
  if (dtype == 0)
    launch(float{}, fast_backward_kernel<float, 8, false>, fast_backward_kernel<float, 16, false>,
           fast_backward_kernel<float, 32, false>, fast_backward_kernel<float, 8, true>,
           fast_backward_kernel<float, 16, true>, fast_backward_kernel<float, 32, true>, warp_backward_kernel<float>);
  else
    launch(__nv_bfloat16{}, fast_backward_kernel<__nv_bfloat16, 8, false>,
           fast_backward_kernel<__nv_bfloat16, 16, false>, fast_backward_kernel<__nv_bfloat16, 32, false>,
           fast_backward_kernel<__nv_bfloat16, 8, true>, fast_backward_kernel<__nv_bfloat16, 16, true>,
           fast_backward_kernel<__nv_bfloat16, 32, true>, warp_backward_kernel<__nv_bfloat16>);
}

int coaction_check_ids(uintptr_t ind_ids, int64_t n_ind, int64_t ind_rows, uintptr_t feed_ids, int64_t n_feed,
                       int64_t feed_rows, uintptr_t stream, uintptr_t feed_mask) {
  // a negative count had been "nothing to check", returning 0 (in range) for ids never read
  DWDP_REQUIRE(n_ind >= 0 && n_feed >= 0, "coaction_check_ids: n_ind and n_feed (ids to check) must be >= 0, got n_ind "
                                              << n_ind << ", n_feed " << n_feed);
  const bool ci = ind_ids && n_ind > 0, cf = feed_ids && n_feed > 0;
  if (!ci && !cf) return 0;
  DeviceGuard guard(device_of(ci ? ind_ids : feed_ids, "coaction_check_ids: ids"));
  IdCheck check(ind_ids, n_ind, ind_rows, feed_ids, n_feed, feed_rows, feed_mask,
                reinterpret_cast<cudaStream_t>(stream));
  return check.result();
}

}  // namespace dwdp
