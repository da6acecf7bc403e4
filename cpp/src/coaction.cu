// Fused CAN co-action kernels. See dwdp/coaction.h.
#include <cuda_bf16.h>

#include <algorithm>

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
__device__ void lane_mlp(const CoActionDims& d, const Geo& g, const float* __restrict__ W, int c, float* col) {
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
  *shard = static_cast<int>(row / r.rows_per_shard);
  *local = row - static_cast<int64_t>(*shard) * r.rows_per_shard;
  if (row < 0 || *shard >= r.shards) return nullptr;  // the host checks ids; never read out of range
  return reinterpret_cast<const T*>(r.base[*shard]) + *local * ind_dim;
}

template <typename T>
__device__ __forceinline__ void load_x0(const CoActionDims& d, const Geo& g, int b, int T_len, int t, const T* feed,
                                        const int64_t* feed_ids, const float* mask, float* col, size_t* frow) {
  const bool on = t < T_len && mask[static_cast<size_t>(b) * T_len + t] != 0.f;
  R(col, g.valid) = on ? 1.f : 0.f;
  *frow = 0;
  if (on) *frow = feed_ids ? static_cast<size_t>(feed_ids[static_cast<size_t>(b) * T_len + t])
                           : static_cast<size_t>(b) * T_len + t;
  for (int i = 0; i < g.D; ++i) R(col, g.x0 + i) = on ? ld(feed, *frow * g.D + i) : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kWarpsMax * 32) forward_kernel(CoActionDims d, Geo g, int B, int T_len, CoActionRows rows,
                                                                 const int64_t* __restrict__ ind_ids,
                                                                 const T* __restrict__ feed,
                                                                 const int64_t* __restrict__ feed_ids,
                                                                 const float* __restrict__ mask, T* __restrict__ out) {
  extern __shared__ float smem[];
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
    load_x0(d, g, b, T_len, t0 + lane, feed, feed_ids, mask, col, &frow);
    for (int c = 1; c <= d.orders; ++c) {
      lane_mlp(d, g, W, c, col);
      __syncwarp();
      const int obase = d.paper ? 0 : (c - 1) * g.S;
      for (int j = lane; j < g.S; j += 32) acc[obase + j] += colsum(scratch, g.h + g.D + j, g.valid);
      __syncwarp();
    }
  }
  for (int i = lane; i < g.n_out; i += 32) st(out, static_cast<size_t>(b) * g.n_out + i, acc[i]);
}

template <typename T>
__global__ void __launch_bounds__(kWarpsMax * 32) backward_kernel(CoActionDims d, Geo g, int B, int T_len, CoActionRows rows,
                                                                  const int64_t* __restrict__ ind_ids,
                                                                  const T* __restrict__ feed,
                                                                  const int64_t* __restrict__ feed_ids,
                                                                  const float* __restrict__ mask,
                                                                  const float* __restrict__ grad_out,
                                                                  float* __restrict__ grad_feed) {
  extern __shared__ float smem[];
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
    load_x0(d, g, b, T_len, t0 + lane, feed, feed_ids, mask, col, &frow);
    const float v = R(col, g.valid);
    for (int i = 0; i < g.D; ++i) R(col, g.gx + i) = 0.f;
    for (int c = 1; c <= d.orders; ++c) {
      lane_mlp(d, g, W, c, col);
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
          R(col, g.dz + goff[l] + j) = v * (activated(d, l) ? up * (1.f - hv * hv) : up);
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

void check_dims(const CoActionDims& d) {
  DWDP_REQUIRE(d.num_layers >= 1 && d.num_layers <= kCoMaxLayers, "co-action: 1 to " << kCoMaxLayers << " layers");
  for (int l = 0; l < d.num_layers; ++l) {
    DWDP_REQUIRE(d.din[l] >= 1 && d.dout[l] >= 1 && d.din[l] <= 256 && d.dout[l] <= 256,
                 "co-action: layer dims must be in [1, 256]");
    if (l) DWDP_REQUIRE(d.din[l] == d.dout[l - 1], "co-action: layer dims do not chain");
  }
  DWDP_REQUIRE(d.orders >= 1 && d.orders <= 8, "co-action: orders must be in [1, 8]");
}

void check_rows(const CoActionRows& r) {
  DWDP_REQUIRE(r.shards >= 1 && r.shards <= kCoMaxShards, "co-action: 1 to " << kCoMaxShards << " table shards");
  DWDP_REQUIRE(r.rows_per_shard >= 1, "co-action: rows_per_shard must be positive");
  for (int s = 0; s < r.shards; ++s) DWDP_REQUIRE(r.base[s] != 0, "co-action: shard " << s << " has no address");
}

}  // namespace

void coaction_launch_shape(const CoActionDims& d, bool backward, int* warps, size_t* smem) {
  const Geo g(d, backward);
  const size_t per = sizeof(float) * static_cast<size_t>(g.per_warp);
  *warps = static_cast<int>(std::min<size_t>(kWarpsMax, kSmemMax / per));
  *smem = per * static_cast<size_t>(*warps);
}

namespace {
int prepare(const CoActionDims& d, bool backward, const void* kernel, size_t* smem) {
  check_dims(d);
  int warps;
  coaction_launch_shape(d, backward, &warps, smem);
  DWDP_REQUIRE(warps >= 1, "co-action: one warp's induction row and activations need "
                               << sizeof(float) * Geo(d, backward).per_warp
                               << " bytes of shared memory; at most 227 KiB (use smaller layers or fewer orders)");
  DWDP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(*smem)));
  return warps;
}
}  // namespace

void coaction_forward(const CoActionDims& d, int dtype, int B, int T, const CoActionRows& rows, uintptr_t ind_ids,
                      uintptr_t feed, uintptr_t feed_ids, uintptr_t mask, uintptr_t out, uintptr_t stream) {
  check_rows(rows);
  DeviceGuard guard(device_of(out, "coaction_forward: out"));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const Geo g(d, false);
  auto launch = [&](auto kernel, auto tag) {
    using E = decltype(tag);
    size_t smem;
    const int warps = prepare(d, false, reinterpret_cast<const void*>(kernel), &smem);
    if (B == 0 || T == 0) return;
    kernel<<<(B + warps - 1) / warps, warps * 32, smem, s>>>(
        d, g, B, T, rows, reinterpret_cast<const int64_t*>(ind_ids), reinterpret_cast<const E*>(feed),
        reinterpret_cast<const int64_t*>(feed_ids), reinterpret_cast<const float*>(mask), reinterpret_cast<E*>(out));
    DWDP_LAUNCH_CHECK();
  };
  if (dtype == 0)
    launch(forward_kernel<float>, float{});
  else
    launch(forward_kernel<__nv_bfloat16>, __nv_bfloat16{});
}

void coaction_backward(const CoActionDims& d, int dtype, int B, int T, const CoActionRows& rows, uintptr_t ind_ids,
                       uintptr_t feed, uintptr_t feed_ids, uintptr_t mask, uintptr_t grad_out, uintptr_t grad_feed,
                       uintptr_t stream) {
  check_rows(rows);
  for (int i = 0; i < rows.shards; ++i) DWDP_REQUIRE(rows.grad[i] != 0, "co-action: shard " << i << " has no gradient");
  DeviceGuard guard(device_of(grad_feed, "coaction_backward: grad_feed"));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const Geo g(d, true);
  auto launch = [&](auto kernel, auto tag) {
    using E = decltype(tag);
    size_t smem;
    const int warps = prepare(d, true, reinterpret_cast<const void*>(kernel), &smem);
    if (B == 0 || T == 0) return;
    kernel<<<(B + warps - 1) / warps, warps * 32, smem, s>>>(
        d, g, B, T, rows, reinterpret_cast<const int64_t*>(ind_ids), reinterpret_cast<const E*>(feed),
        reinterpret_cast<const int64_t*>(feed_ids), reinterpret_cast<const float*>(mask),
        reinterpret_cast<const float*>(grad_out), reinterpret_cast<float*>(grad_feed));
    DWDP_LAUNCH_CHECK();
  };
  if (dtype == 0)
    launch(backward_kernel<float>, float{});
  else
    launch(backward_kernel<__nv_bfloat16>, __nv_bfloat16{});
}

}  // namespace dwdp
