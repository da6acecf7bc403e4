// Per-row (per-token) fp8 e4m3 activation quantisation of bf16 rows, alone and fused with the SwiGLU, for the fp8
// grouped expert MLP (python/dwdp_ops/models/deepseek_r1/fp8.py; numpy truth: python/dwdp_ops/quant.py).
//
// Semantics, bit for bit those of fp8.quant_rows_torch (and, for quant_rows_bf16, numpy quant_rowwise):
//   amax = max |x| over the row (float32; exact), scale = amax / 448 (IEEE division, not a reciprocal multiply),
//   scale = 1 where that is 0, q = e4m3(x / scale) (IEEE division, saturated to +-448, nearest even, sign kept).
// swiglu_quant_bf16 quantises a = bf16(float(bf16(silu(g))) * float(u)) with silu(g) = g / (1 + expf(-g)) in float32,
// g = h[r, j], u = h[r, I + j]: PyTorch's bf16 `silu(h[:, :I]) * h[:, I:]`.
// Non-finite inputs are outside the contract (NaN propagates to the row's scale and codes).
//
// Every call only enqueues kernels on `stream` (no allocation, no synchronisation): capturable in a CUDA graph.
#pragma once
#include <cstdint>

namespace pybind11 {
class module_;
}

namespace dwdp {

// x [rows, k] bf16, row stride x_stride elements (last dim contiguous; x and the stride 16-byte aligned, k % 8 == 0,
// k <= kQuantMaxK) -> q [rows, k] e4m3 contiguous (8-byte aligned), scale [rows] float32. live_rows: 0, or a device
// int32 whose value bounds the rows processed (rows at or past it are neither read nor written: the tail of a
// grouped buffer sized for the worst case, skipped without a host round trip).
void quant_rows_bf16(uintptr_t x, int64_t x_stride, uintptr_t q, uintptr_t scale, int64_t rows, int64_t k,
                     int device, uintptr_t stream, uintptr_t live_rows = 0);

// h [rows, 2 * inter] bf16, row stride h_stride elements (same alignment rules, inter % 8 == 0) -> q [rows, inter]
// e4m3 contiguous, scale [rows] float32; live_rows as for quant_rows_bf16.
void swiglu_quant_bf16(uintptr_t h, int64_t h_stride, uintptr_t q, uintptr_t scale, int64_t rows, int64_t inter,
                       int device, uintptr_t stream, uintptr_t live_rows = 0);

constexpr int64_t kQuantMaxK = 8 * 8 * 256;  // 8 elements per vector, 8 vectors per thread, 256 threads per row

// Adds quant_rows_bf16 / swiglu_quant_bf16 to the _C module (cpp/src/quant_bindings.cpp).
void register_quant(pybind11::module_& m);

}  // namespace dwdp
