// Per-row fp8 e4m3 quantisation of bf16 rows, alone and fused with the SwiGLU. See dwdp/quant.h for the semantics.
//
// Design: one pass over each row. A row is split into 16-byte vectors of 8 bf16 (the SwiGLU reads one vector of the
// gate half and one of the up half per 8 outputs); `tpr` threads (whole warps) own a row and each keeps up to PER
// vectors of it in registers (the SwiGLU keeps its bf16 product). The row's amax is a max over the bf16 magnitude
// bits (|x| as an unsigned 16-bit pattern orders like the value, NaN above inf; __vmaxu2 on pairs), reduced by
// redux.sync in each warp and through shared memory across the row's warps. Then every thread divides its values by
// the scale and stores 8 codes (8 bytes) per vector. Several rows share a block when a row needs fewer than 256
// threads. No global atomics, nothing order dependent: max is exact, every other operation is per element.
//
// Bit exactness (against fp8.quant_rows_torch, whose float32 steps are IEEE round-to-nearest):
//   * bf16 -> float32 is exact; amax of the bf16 magnitudes equals the float32 amax exactly.
//   * scale = __fdiv_rn(amax, 448) is the IEEE quotient, like the reference's division by a (device) tensor; 0 -> 1.
//   * x / scale is __fdiv_rn (IEEE, denormals kept: this file is compiled without fast math / ftz).
//   * cvt.rn.satfinite.e4m3x2.f32 rounds to nearest even and saturates finite values beyond 448 to +-448, keeping the
//     sign (-0 -> 0x80): the reference's clamp(+-448) then cast (c10's round-to-nearest-even encoder).
//   * SwiGLU: expf (the CUDA math library's, as PyTorch's silu kernel calls through c10::cuda::compat::exp),
//     __fadd_rn(1, e), __fdiv_rn(g, .), __float2bfloat16_rn, then the product of two bf16 values (exact in float32)
//     rounded once to bf16: PyTorch's silu and bf16 mul kernels step by step.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "dwdp/check.h"
#include "dwdp/quant.h"

namespace dwdp {
namespace {

constexpr int kVec = 8;          // bf16 per 16-byte vector, codes per 8-byte store
constexpr int kBlock = 256;      // threads per block (a row takes at most all of them)
constexpr float kE4m3Max = 448.0f;

__device__ __forceinline__ unsigned abs_max2(unsigned m, const uint4& v) {
  m = __vmaxu2(m, v.x & 0x7FFF7FFFu);
  m = __vmaxu2(m, v.y & 0x7FFF7FFFu);
  m = __vmaxu2(m, v.z & 0x7FFF7FFFu);
  return __vmaxu2(m, v.w & 0x7FFF7FFFu);
}

__device__ __forceinline__ float bf16_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(unsigned w) { return __uint_as_float(w & 0xFFFF0000u); }

// PyTorch's bf16 `silu(g) * u`: silu in float32 rounded to bf16, the product in float32 rounded to bf16.
__device__ __forceinline__ unsigned short swiglu1(float g, float u) {
  const float s = __fdiv_rn(g, __fadd_rn(1.0f, expf(-g)));
  const float sb = __bfloat162float(__float2bfloat16_rn(s));
  return __bfloat16_as_ushort(__float2bfloat16_rn(__fmul_rn(sb, u)));
}

__device__ __forceinline__ unsigned swiglu2(unsigned g, unsigned u) {
  const unsigned lo = swiglu1(bf16_lo(g), bf16_lo(u));
  const unsigned hi = swiglu1(bf16_hi(g), bf16_hi(u));
  return lo | (hi << 16);
}

__device__ __forceinline__ unsigned short encode2(unsigned w, float s) {
  const float2 f = make_float2(__fdiv_rn(bf16_lo(w), s), __fdiv_rn(bf16_hi(w), s));
  return __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3);
}

// SWIGLU false: x [rows, k] (row stride `stride` elements) -> q [rows, k]. SWIGLU true: x = h [rows, 2k] -> q [rows, k].
template <int PER, bool SWIGLU>
__global__ void __launch_bounds__(kBlock) quant_rows_kernel(const uint4* __restrict__ x, long long stride16,
                                                          uint2* __restrict__ q, float* __restrict__ scale,
                                                          long long rows, int nvec, int tpr,
                                                          const int* __restrict__ live_rows) {
  __shared__ unsigned red[kBlock / 32];
  const int sub = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wpr = tpr >> 5;
  const long long row = static_cast<long long>(blockIdx.x) * (blockDim.x / tpr) + sub;
  // rows at or past *live_rows (a device count, e.g. the end of the last expert group) are neither read nor written
  const bool live = row < rows && (live_rows == nullptr || row < static_cast<long long>(*live_rows));
  const uint4* xr = x + (live ? row : 0) * stride16;

  uint4 v[PER];
  unsigned m = 0;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = t + i * tpr;
    if (live && c < nvec) {
      if constexpr (SWIGLU) {
        const uint4 g = xr[c], u = xr[nvec + c];
        v[i] = make_uint4(swiglu2(g.x, u.x), swiglu2(g.y, u.y), swiglu2(g.z, u.z), swiglu2(g.w, u.w));
      } else {
        v[i] = xr[c];
      }
      m = abs_max2(m, v[i]);
    }
  }
  unsigned bits = __reduce_max_sync(0xFFFFFFFFu, max(m & 0xFFFFu, m >> 16));
  if (wpr > 1) {
    if (lane == 0) red[warp] = bits;
    __syncthreads();
    bits = 0;
    for (int w = sub * wpr; w < (sub + 1) * wpr; ++w) bits = max(bits, red[w]);
  }
  if (!live) return;
  float s = __fdiv_rn(__uint_as_float(bits << 16), kE4m3Max);
  if (s == 0.0f) s = 1.0f;  // a zero row
  if (t == 0) scale[row] = s;
  uint2* qr = q + row * nvec;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = t + i * tpr;
    if (c < nvec) {
      const unsigned a = encode2(v[i].x, s) | (static_cast<unsigned>(encode2(v[i].y, s)) << 16);
      const unsigned b = encode2(v[i].z, s) | (static_cast<unsigned>(encode2(v[i].w, s)) << 16);
      qr[c] = make_uint2(a, b);
    }
  }
}

template <bool SWIGLU>
void launch(const char* fn, uintptr_t x, int64_t x_stride, uintptr_t q, uintptr_t scale, int64_t rows, int64_t k,
            int device, uintptr_t stream, uintptr_t live_rows) {
  DWDP_REQUIRE(rows >= 0, fn << ": rows must be >= 0, got " << rows);
  DWDP_REQUIRE(k > 0 && k % kVec == 0 && k <= kQuantMaxK,
               fn << ": the row width must be a positive multiple of 8 up to " << kQuantMaxK << ", got " << k);
  const int64_t in_width = SWIGLU ? 2 * k : k;
  DWDP_REQUIRE(x % 16 == 0 && x_stride % kVec == 0,
               fn << ": the input and its row stride must be 16-byte aligned (stride " << x_stride << " elements)");
  DWDP_REQUIRE(rows <= 1 || x_stride >= in_width,
               fn << ": row stride " << x_stride << " is shorter than a row of " << in_width << " elements");
  DWDP_REQUIRE(q % 8 == 0 && scale % 4 == 0, fn << ": q must be 8-byte and scale 4-byte aligned");
  DWDP_REQUIRE(live_rows % 4 == 0, fn << ": live_rows must point to an int32 (4-byte aligned) or be 0");
  if (rows == 0) return;
  DWDP_REQUIRE(x != 0 && q != 0 && scale != 0, fn << ": null pointer");

  const int nvec = static_cast<int>(k / kVec);
  int per = 1;
  while (per < 8 && (nvec + per - 1) / per > 128) per *= 2;  // at most 128 threads a row while 8 vectors do
  const int tpr = static_cast<int>(((nvec + per - 1) / per + 31) / 32 * 32);
  const int rpb = std::max(1, kBlock / tpr);
  const long long blocks = rows / rpb + (rows % rpb != 0);  // (rows + rpb - 1 wraps for rows near 2**63)
  DWDP_REQUIRE(blocks <= 0x7FFFFFFFLL, fn << ": too many rows (" << rows << ")");

  DeviceGuard guard(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* xp = reinterpret_cast<const uint4*>(x);
  auto* qp = reinterpret_cast<uint2*>(q);
  auto* sp = reinterpret_cast<float*>(scale);
  const long long stride16 = x_stride / kVec;
  auto* lr = reinterpret_cast<const int*>(live_rows);
  const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(tpr * rpb));
  switch (per) {
    case 1: quant_rows_kernel<1, SWIGLU><<<grid, block, 0, s>>>(xp, stride16, qp, sp, rows, nvec, tpr, lr); break;
    case 2: quant_rows_kernel<2, SWIGLU><<<grid, block, 0, s>>>(xp, stride16, qp, sp, rows, nvec, tpr, lr); break;
    case 4: quant_rows_kernel<4, SWIGLU><<<grid, block, 0, s>>>(xp, stride16, qp, sp, rows, nvec, tpr, lr); break;
    default: quant_rows_kernel<8, SWIGLU><<<grid, block, 0, s>>>(xp, stride16, qp, sp, rows, nvec, tpr, lr); break;
  }
  DWDP_LAUNCH_CHECK();
}

}  // namespace

void quant_rows_bf16(uintptr_t x, int64_t x_stride, uintptr_t q, uintptr_t scale, int64_t rows, int64_t k,
                     int device, uintptr_t stream, uintptr_t live_rows) {
  launch<false>("quant_rows_bf16", x, x_stride, q, scale, rows, k, device, stream, live_rows);
}

void swiglu_quant_bf16(uintptr_t h, int64_t h_stride, uintptr_t q, uintptr_t scale, int64_t rows, int64_t inter,
                       int device, uintptr_t stream, uintptr_t live_rows) {
  launch<true>("swiglu_quant_bf16", h, h_stride, q, scale, rows, inter, device, stream, live_rows);
}

}  // namespace dwdp
