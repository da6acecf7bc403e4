// Fused CAN co-action kernels. See dwdp/coaction.h.
#include <cuda_bf16.h>

#include "dwdp/check.h"
#include "dwdp/coaction.h"

namespace dwdp {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }

__device__ __forceinline__ bool activated(const CoActionDims& d, int layer) {
  return d.paper || layer < d.num_layers - 1;
}

// Scratch layout per thread (floats): x0[D] | h[D + sum dout] (h_0 = x^c, then each layer's output) |
// gx[D] | ga[maxd] | gb[maxd]
struct Scratch {
  int D, hsum, maxd, per_thread;
  __device__ Scratch(const CoActionDims& d) {
    D = d.din[0];
    hsum = D;
    maxd = D;
    for (int l = 0; l < d.num_layers; ++l) {
      hsum += d.dout[l];
      maxd = max(maxd, d.dout[l]);
    }
    per_thread = D + hsum + D + 2 * maxd;
  }
};

// Forward of one order for one behaviour: fills h (h_0 = x^c, then layer outputs) from x0.
__device__ void mlp_forward(const CoActionDims& d, const float* __restrict__ W, int c, const float* x0, float* h) {
  const int D = d.din[0];
  for (int i = 0; i < D; ++i) {
    float v = x0[i], p = v;
    for (int k = 1; k < c; ++k) p *= v;
    h[i] = p;
  }
  int woff = d.order_independent ? (c - 1) * d.order_width : 0;
  const float* in = h;
  float* outp = h + D;
  for (int l = 0; l < d.num_layers; ++l) {
    const int di = d.din[l], dn = d.dout[l];
    const float* w = W + woff;
    const float* bb = d.bias ? W + woff + di * dn : nullptr;
    for (int j = 0; j < dn; ++j) {
      float z = bb ? bb[j] : 0.f;
      for (int i = 0; i < di; ++i) z = fmaf(in[i], w[i * dn + j], z);
      outp[j] = activated(d, l) ? tanhf(z) : z;
    }
    woff += di * dn + (d.bias ? dn : 0);
    in = outp;
    outp += dn;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(CoActionDims d, int T_len, const T* __restrict__ induction,
                                                           const int64_t* __restrict__ ind_ids, const T* __restrict__ feed,
                                                           const int64_t* __restrict__ feed_ids,
                                                           const float* __restrict__ mask, T* __restrict__ out) {
  extern __shared__ float smem[];
  const int b = blockIdx.x;
  const int D = d.din[0];
  const int S = d.out_per_order;
  const int n_out = d.paper ? S : d.orders * S;
  float* W = smem;                 // [ind_dim]
  float* acc = W + d.ind_dim;      // [n_out]
  float* scratch = acc + n_out;    // per-thread
  Scratch sc(d);
  float* mine = scratch + threadIdx.x * sc.per_thread;
  float* x0 = mine;
  float* h = x0 + D;
  const size_t row = ind_ids ? static_cast<size_t>(ind_ids[b]) : static_cast<size_t>(b);
  for (int i = threadIdx.x; i < d.ind_dim; i += blockDim.x) W[i] = ld(induction, row * d.ind_dim + i);
  for (int i = threadIdx.x; i < n_out; i += blockDim.x) acc[i] = 0.f;
  __syncthreads();
  for (int t = threadIdx.x; t < T_len; t += blockDim.x) {
    if (mask[static_cast<size_t>(b) * T_len + t] == 0.f) continue;
    const size_t frow = feed_ids ? static_cast<size_t>(feed_ids[static_cast<size_t>(b) * T_len + t])
                                 : static_cast<size_t>(b) * T_len + t;
    for (int i = 0; i < D; ++i) x0[i] = ld(feed, frow * D + i);
    for (int c = 1; c <= d.orders; ++c) {
      mlp_forward(d, W, c, x0, h);
      const int base = d.paper ? 0 : (c - 1) * S;
      for (int j = 0; j < S; ++j) atomicAdd(&acc[base + j], h[D + j]);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n_out; i += blockDim.x) st(out, static_cast<size_t>(b) * n_out + i, acc[i]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(CoActionDims d, int T_len, const T* __restrict__ induction,
                                                            const int64_t* __restrict__ ind_ids, const T* __restrict__ feed,
                                                            const int64_t* __restrict__ feed_ids,
                                                            const float* __restrict__ mask,
                                                            const float* __restrict__ grad_out,
                                                            float* __restrict__ grad_ind, float* __restrict__ grad_feed) {
  extern __shared__ float smem[];
  const int b = blockIdx.x;
  const int D = d.din[0];
  const int S = d.out_per_order;
  const int n_out = d.paper ? S : d.orders * S;
  float* W = smem;               // [ind_dim]
  float* gW = W + d.ind_dim;     // [ind_dim]
  float* G = gW + d.ind_dim;     // [n_out]
  float* scratch = G + n_out;
  Scratch sc(d);
  float* mine = scratch + threadIdx.x * sc.per_thread;
  float* x0 = mine;
  float* h = x0 + D;
  float* gx = h + sc.hsum;
  float* ga = gx + D;
  float* gb = ga + sc.maxd;
  const size_t row = ind_ids ? static_cast<size_t>(ind_ids[b]) : static_cast<size_t>(b);
  for (int i = threadIdx.x; i < d.ind_dim; i += blockDim.x) {
    W[i] = ld(induction, row * d.ind_dim + i);
    gW[i] = 0.f;
  }
  for (int i = threadIdx.x; i < n_out; i += blockDim.x) G[i] = grad_out[static_cast<size_t>(b) * n_out + i];
  __syncthreads();
  for (int t = threadIdx.x; t < T_len; t += blockDim.x) {
    if (mask[static_cast<size_t>(b) * T_len + t] == 0.f) continue;
    const size_t frow = feed_ids ? static_cast<size_t>(feed_ids[static_cast<size_t>(b) * T_len + t])
                                 : static_cast<size_t>(b) * T_len + t;
    for (int i = 0; i < D; ++i) {
      x0[i] = ld(feed, frow * D + i);
      gx[i] = 0.f;
    }
    for (int c = 1; c <= d.orders; ++c) {
      mlp_forward(d, W, c, x0, h);
      const float* g_order = G + (d.paper ? 0 : (c - 1) * S);
      // offsets of each layer's output inside h, and of its weights inside W
      int hoff[kCoMaxLayers + 1], woff[kCoMaxLayers], goff[kCoMaxLayers];
      hoff[0] = 0;
      int w = d.order_independent ? (c - 1) * d.order_width : 0, g = 0;
      for (int l = 0; l < d.num_layers; ++l) {
        hoff[l + 1] = hoff[l] + (l == 0 ? D : d.dout[l - 1]);
        woff[l] = w;
        goff[l] = g;
        w += d.din[l] * d.dout[l] + (d.bias ? d.dout[l] : 0);
        g += d.dout[l];
      }
      // upstream gradient of the current layer's output lives in `up` (ga/gb ping-pong)
      float* up = ga;
      float* nxt = gb;
      const int L = d.num_layers;
      for (int j = 0; j < d.dout[L - 1]; ++j) up[j] = g_order[goff[L - 1] + j];
      for (int l = L - 1; l >= 0; --l) {
        const int di = d.din[l], dn = d.dout[l];
        const float* hin = h + hoff[l];
        const float* hout = h + hoff[l + 1];
        const float* wl = W + woff[l];
        // dz = dh * act'(z)
        for (int j = 0; j < dn; ++j) up[j] = activated(d, l) ? up[j] * (1.f - hout[j] * hout[j]) : up[j];
        for (int i = 0; i < di; ++i) {
          float s = 0.f;
          for (int j = 0; j < dn; ++j) {
            atomicAdd(&gW[woff[l] + i * dn + j], hin[i] * up[j]);
            s = fmaf(up[j], wl[i * dn + j], s);
          }
          // the input of layer l is the output of layer l-1, which also gets its direct (pooled) gradient
          nxt[i] = s + (l > 0 ? g_order[goff[l - 1] + i] : 0.f);
        }
        if (d.bias)
          for (int j = 0; j < dn; ++j) atomicAdd(&gW[woff[l] + di * dn + j], up[j]);
        float* tmp = up;
        up = nxt;
        nxt = tmp;
      }
      // up now holds d/d(x^c); chain to x0
      for (int i = 0; i < D; ++i) {
        float p = static_cast<float>(c);
        for (int k = 1; k < c; ++k) p *= x0[i];
        gx[i] = fmaf(up[i], p, gx[i]);
      }
    }
    if (feed_ids) {
      for (int i = 0; i < D; ++i) atomicAdd(&grad_feed[frow * D + i], gx[i]);
    } else {
      for (int i = 0; i < D; ++i) grad_feed[frow * D + i] = gx[i];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < d.ind_dim; i += blockDim.x) {
    if (ind_ids)
      atomicAdd(&grad_ind[row * d.ind_dim + i], gW[i]);
    else
      grad_ind[row * d.ind_dim + i] = gW[i];
  }
}

size_t smem_bytes(const CoActionDims& d, bool backward) {
  int D = d.din[0], hsum = D, maxd = D;
  for (int l = 0; l < d.num_layers; ++l) {
    hsum += d.dout[l];
    maxd = std::max(maxd, d.dout[l]);
  }
  const int n_out = d.paper ? d.out_per_order : d.orders * d.out_per_order;
  const size_t per_thread = D + hsum + D + 2 * maxd;
  return sizeof(float) * ((backward ? 2 : 1) * static_cast<size_t>(d.ind_dim) + n_out + kThreads * per_thread);
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

template <typename T>
void launch_forward(const CoActionDims& d, int B, int T_len, uintptr_t induction, uintptr_t ind_ids, uintptr_t feed,
                    uintptr_t feed_ids, uintptr_t mask, uintptr_t out, cudaStream_t s) {
  const size_t smem = smem_bytes(d, false);
  DWDP_CUDA_CHECK(cudaFuncSetAttribute(forward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  forward_kernel<T><<<B, kThreads, smem, s>>>(d, T_len, reinterpret_cast<const T*>(induction),
                                              reinterpret_cast<const int64_t*>(ind_ids), reinterpret_cast<const T*>(feed),
                                              reinterpret_cast<const int64_t*>(feed_ids),
                                              reinterpret_cast<const float*>(mask), reinterpret_cast<T*>(out));
  DWDP_LAUNCH_CHECK();
}

template <typename T>
void launch_backward(const CoActionDims& d, int B, int T_len, uintptr_t induction, uintptr_t ind_ids, uintptr_t feed,
                     uintptr_t feed_ids, uintptr_t mask, uintptr_t grad_out, uintptr_t grad_ind, uintptr_t grad_feed,
                     cudaStream_t s) {
  const size_t smem = smem_bytes(d, true);
  DWDP_CUDA_CHECK(cudaFuncSetAttribute(backward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  backward_kernel<T><<<B, kThreads, smem, s>>>(
      d, T_len, reinterpret_cast<const T*>(induction), reinterpret_cast<const int64_t*>(ind_ids),
      reinterpret_cast<const T*>(feed), reinterpret_cast<const int64_t*>(feed_ids), reinterpret_cast<const float*>(mask),
      reinterpret_cast<const float*>(grad_out), reinterpret_cast<float*>(grad_ind), reinterpret_cast<float*>(grad_feed));
  DWDP_LAUNCH_CHECK();
}

void check_smem(size_t smem) {
  DWDP_REQUIRE(smem <= 227 * 1024, "co-action: the induction row and per-thread scratch need " << smem
                                                                                               << " bytes of shared memory; at most 227 KiB (use smaller layers)");
}

}  // namespace

void coaction_forward(const CoActionDims& d, int dtype, int B, int T, uintptr_t induction, uintptr_t ind_ids,
                      uintptr_t feed, uintptr_t feed_ids, uintptr_t mask, uintptr_t out, uintptr_t stream) {
  check_dims(d);
  check_smem(smem_bytes(d, false));
  if (B == 0 || T == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 0)
    launch_forward<float>(d, B, T, induction, ind_ids, feed, feed_ids, mask, out, s);
  else
    launch_forward<__nv_bfloat16>(d, B, T, induction, ind_ids, feed, feed_ids, mask, out, s);
}

void coaction_backward(const CoActionDims& d, int dtype, int B, int T, uintptr_t induction, uintptr_t ind_ids,
                       uintptr_t feed, uintptr_t feed_ids, uintptr_t mask, uintptr_t grad_out, uintptr_t grad_ind,
                       uintptr_t grad_feed, uintptr_t stream) {
  check_dims(d);
  check_smem(smem_bytes(d, true));
  if (B == 0 || T == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 0)
    launch_backward<float>(d, B, T, induction, ind_ids, feed, feed_ids, mask, grad_out, grad_ind, grad_feed, s);
  else
    launch_backward<__nv_bfloat16>(d, B, T, induction, ind_ids, feed, feed_ids, mask, grad_out, grad_ind, grad_feed, s);
}

}  // namespace dwdp
