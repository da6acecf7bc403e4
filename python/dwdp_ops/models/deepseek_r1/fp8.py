"""fp8 e4m3 experts on the GPU (PyTorch): rowwise requantisation of block-scaled weights, per-token activation
quantisation and the grouped expert MLP over ``torch._scaled_grouped_mm``.

Format (the numpy truth is ``dwdp_ops.quant``): a weight ``[N, K]`` is ``q [N, K]`` float8_e4m3fn with one float32
``scale [N]`` per output row, ``W = q * scale[:, None]``, ``scale = amax(|row|) / 448`` (1.0 for a zero row);
activations ``[R, K]`` the same per row (per token). Values are divided (not multiplied by a reciprocal) by the
scale in float32 and clamped to +-448 before the cast, which rounds to nearest even: bit for bit the numpy encoder
(older PyTorch releases cast values above 448 to NaN; the clamp makes every release and the encoder agree).

The grouped GEMM takes ``a [R, K]`` fp8 row-major with ``scale_a [R]`` and ``b [G, K, N]`` fp8 column-major (the
transpose of the store's ``[G, N, K]`` view, no copy) with ``scale_b [G, N]``, groups of rows ending at ``offs [G]``
(int32, multiples of 16), and writes bf16: ``out[r] = (a[r] * scale_a[r]) @ (b[g] * scale_b[g])``.
"""

from __future__ import annotations

from typing import Any

from .gpu_weights import require_torch

E4M3_MAX = 448.0
QUANT_CHUNK = 16384  # rows quantised at a time: bounds the float32 temporary ([chunk, K] x 4 bytes)


def quant_rows(x: Any, chunk: int = QUANT_CHUNK) -> tuple[Any, Any]:
    """``x [R, K]`` (bf16 / float) -> ``(q [R, K] float8_e4m3fn, scale [R] float32)`` per row: scale = amax / 448
    (1.0 where that is 0: a zero row), q = clamp(x / scale, +-448) rounded to nearest even. Returned (allocated on the
    current stream); capturable (no host round trip; the chunking is by shape only)."""
    torch = require_torch()
    if x.dim() != 2:
        raise ValueError(f"quant_rows: x must be [rows, K], got shape {list(x.shape)}")
    R, K = x.shape
    q = torch.empty((R, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((R,), dtype=torch.float32, device=x.device)
    for a in range(0, R, chunk):
        xs = x[a : a + chunk].float()
        s = xs.abs().amax(dim=1) / E4M3_MAX
        s = torch.where(s == 0, torch.ones_like(s), s)  # a zero row, or one whose amax / 448 underflows
        scale[a : a + chunk] = s
        q[a : a + chunk] = (xs / s[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequant_rows(q: Any, scale: Any) -> Any:
    """``q [..., N, K]`` float8_e4m3fn, ``scale [..., N]`` -> float32 ``q * scale[..., None]``."""
    return q.float() * scale[..., None]


def requant_block(codes: Any, scale_inv: Any, block: int = 128) -> tuple[Any, Any]:
    """A checkpoint's block-scaled weight (``codes [N, K]`` uint8 e4m3 bits, ``scale_inv [ceil(N/b), ceil(K/b)]``
    float32) -> rowwise ``(q [N, K] float8_e4m3fn, scale [N] float32)``: dequantised in float32, requantised per
    row. The float32 temporary is ``[N, K]``; callers go expert by expert."""
    torch = require_torch()
    N, K = codes.shape
    want = (-(-N // block), -(-K // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"requant_block: scale_inv shape {tuple(scale_inv.shape)} does not match {N}x{K} in "
                         f"{block}x{block} blocks: want {want}")
    full = scale_inv.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:N, :K]
    w = codes.view(torch.float8_e4m3fn).float() * full
    return quant_rows(w)


def grouped_swiglu_fp8(xg: Any, offs: Any, w13: Any, w2: Any, s13: Any, s2: Any, inter: int) -> Any:
    """The expert MLP over rows grouped by expert with fp8 weights: ``xg [R, H]`` bf16, group g in rows
    ``[offs[g-1], offs[g])`` (``offs [G]`` int32, multiples of 16), ``w13 [G, 2I, H]`` / ``w2 [G, H, I]``
    float8_e4m3fn (any page-strided batch stride, rows contiguous), ``s13 [G, 2I]`` / ``s2 [G, H]`` float32 row
    scales -> ``[R, H]`` bf16. Activations are quantised per row before each GEMM (``quant_rows``); the SwiGLU runs
    on the first GEMM's bf16 output. Rows past ``offs[-1]`` are not meaningful."""
    torch = require_torch()
    xq, xs = quant_rows(xg)
    h = torch._scaled_grouped_mm(xq, w13.transpose(-2, -1), xs, s13, offs=offs, out_dtype=torch.bfloat16)
    del xq
    a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    del h  # a large prefill's temporaries: each freed as soon as its reader is enqueued (stream-ordered pool)
    aq, as_ = quant_rows(a)
    del a
    return torch._scaled_grouped_mm(aq, w2.transpose(-2, -1), as_, s2, offs=offs, out_dtype=torch.bfloat16)
