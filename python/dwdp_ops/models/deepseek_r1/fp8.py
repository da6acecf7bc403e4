"""fp8 e4m3 experts on the GPU (PyTorch): rowwise requantisation of block-scaled weights, per-token activation
quantisation and the grouped expert MLP over ``torch._scaled_grouped_mm``.

Format (the numpy truth is ``dwdp_ops.quant``): a weight ``[N, K]`` is ``q [N, K]`` float8_e4m3fn with one float32
``scale [N]`` per output row, ``W = q * scale[:, None]``, ``scale = amax(|row|) / 448`` (1.0 for a zero row);
activations ``[R, K]`` the same per row (per token). Values are divided (not multiplied by a reciprocal) by the
scale in float32 and clamped to +-448 before the cast, which rounds to nearest even: bit for bit the numpy encoder
(older PyTorch releases cast values above 448 to NaN; the clamp makes every release and the encoder agree). The
scale is ``amax / 448`` divided by a tensor, never by the Python number: on CUDA PyTorch divides by a CPU scalar as a
multiplication by its float32 reciprocal, which differs from the quotient in the last bit for about half the amax
values.

On CUDA, bf16 activations take fused kernels of ``dwdp_ops._C`` (``cpp/src/quant.cu``): ``quant_rows`` in one pass
over each row, and ``swiglu_quant`` (the SwiGLU between the two GEMMs fused with the second quantisation), both bit
for bit the PyTorch implementations ``quant_rows_torch`` / ``swiglu_quant_torch``, which stay the path for every
other device, dtype or layout (and the reference the GPU tests compare with, ``tests/test_gpu_quant.py``).

The grouped GEMM takes ``a [R, K]`` fp8 row-major with ``scale_a [R]`` and ``b [G, K, N]`` fp8 column-major (the
transpose of the store's ``[G, N, K]`` view, no copy) with ``scale_b [G, N]``, groups of rows ending at ``offs [G]``
(int32, multiples of 16), and writes bf16: ``out[r] = (a[r] * scale_a[r]) @ (b[g] * scale_b[g])``.
"""

from __future__ import annotations

from typing import Any

from ..._checks import is_bool, is_int
from .gpu_weights import require_torch

E4M3_MAX = 448.0
# token-expert pairs of a rank's step for which the fp8 expert MLP accumulates with ``use_fast_accum``
# (``bench/expert_gemm.py`` on one H200, 2026-12-01T02:33Z, each token quantised before the gather): faster at 1K-2K
# tokens x top-8 (159-389 -> 190-389 TFLOP/s: 1.9-2.0x bf16 against 1.4-1.6x) and from 32K (704-753 -> 794-954:
# 1.49-1.80x against 1.30-1.42x), slower at 4K-8K (0.84-1.22x bf16 against 1.31-1.33x) and mixed at 16K (1.21 / 1.36x
# against 1.30 / 1.31x); relative error against bf16 4.65e-2 against 4.64e-2 either way
FAST_ACCUM_MAX_SMALL_ROWS = 2048 * 8
FAST_ACCUM_MIN_ROWS = 32768 * 8


def use_fast_accum(pairs: int) -> bool:
    """Whether a step with ``pairs`` token-expert pairs on this rank runs the fp8 GEMMs with fast accumulation: at
    most ``FAST_ACCUM_MAX_SMALL_ROWS`` or at least ``FAST_ACCUM_MIN_ROWS`` (where the benchmark measured it faster;
    between them PyTorch's fast-accumulation kernels were slower on an H200). ``pairs`` must be an int >= 0
    (TypeError for a bool, a float or anything else that is not an integer, ValueError for a negative count)."""
    if not is_int(pairs):
        raise TypeError(f"use_fast_accum: pairs must be an int >= 0 (token-expert pairs), got {pairs!r} "
                        f"({type(pairs).__name__})")
    if pairs < 0:
        raise ValueError(f"use_fast_accum: pairs must be an int >= 0 (token-expert pairs), got {pairs!r}")
    return pairs <= FAST_ACCUM_MAX_SMALL_ROWS or pairs >= FAST_ACCUM_MIN_ROWS


QUANT_CHUNK = 16384  # rows quantised at a time: bounds the float32 temporary ([chunk, K] x 4 bytes)
_NATIVE: Any = None  # dwdp_ops._C with the fused kernels, False without them, None until looked up


def _native_quant() -> Any:
    """``dwdp_ops._C`` when it has the fused quantisation kernels, else None (no extension, or one built before
    them); looked up once."""
    global _NATIVE
    if _NATIVE is None:
        from ..._native import native_or_reason

        c, _why = native_or_reason()
        _NATIVE = c if c is not None and hasattr(c, "quant_rows_bf16") else False
    return _NATIVE or None


def _fused_ok(x: Any, width: int) -> bool:
    """Whether the fused kernels take ``x`` (2-D) with output rows of ``width``: a CUDA bf16 tensor, last dimension
    contiguous, rows that do not overlap (row stride >= the row's length: not a broadcast view), data and row stride
    16-byte aligned, ``width`` a multiple of 8 up to ``_C.QUANT_MAX_K``."""
    torch = require_torch()
    if not (x.is_cuda and x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1):
        return False
    if width <= 0 or width % 8 or x.data_ptr() % 16 or (x.shape[0] > 1 and (x.stride(0) % 8 or
                                                                          x.stride(0) < x.shape[1])):
        return False
    c = _native_quant()
    return c is not None and width <= c.QUANT_MAX_K


def _fused(fn: str, x: Any, width: int, live_rows: Any = None) -> tuple[Any, Any]:
    torch = require_torch()
    R = x.shape[0]
    lr = 0 if live_rows is None else live_rows.data_ptr()  # (checked by the caller, _check_live_rows)
    q = torch.empty((R, width), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((R,), dtype=torch.float32, device=x.device)
    if R:
        stride = x.stride(0) if R > 1 else x.shape[1]
        getattr(_native_quant(), fn)(x.data_ptr(), stride, q.data_ptr(), scale.data_ptr(), R, width, x.device.index,
                                     torch.cuda.current_stream(x.device).cuda_stream, lr)
    return q, scale


def _check_live_rows(live_rows: Any, x: Any, fn: str, name: str) -> None:
    """ValueError unless ``live_rows`` is None or an int32 tensor of at least one element on ``x``'s device: checked
    on every path (the PyTorch path ignores it, but a bad one would fail on a GPU whose inputs take the fused path)."""
    if live_rows is None:
        return
    torch = require_torch()
    if not (isinstance(live_rows, torch.Tensor) and live_rows.dtype == torch.int32 and live_rows.numel() >= 1
            and live_rows.device == x.device):
        got = (f"{live_rows.dtype} {list(live_rows.shape)} on {live_rows.device}" if isinstance(live_rows, torch.Tensor)
               else f"{live_rows!r} ({type(live_rows).__name__})")
        raise ValueError(f"{fn}: live_rows must be an int32 tensor on {name}'s device ({x.device}; its first element "
                         f"bounds the rows), got {got}")


def _check_tensor(x: Any, fn: str, name: str, shape: str = "[rows, K]") -> None:
    """TypeError naming ``name`` unless ``x`` is a torch.Tensor (a numpy array failed inside with AttributeError)."""
    torch = require_torch()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor {shape}, got {type(x).__name__}")


def _check_chunk(chunk: Any) -> int:
    if not is_int(chunk) or chunk < 1:
        raise ValueError(f"quant_rows: chunk must be an int >= 1, got {chunk!r}")
    return int(chunk)


def quant_rows(x: Any, chunk: int = QUANT_CHUNK, *, live_rows: Any = None) -> tuple[Any, Any]:
    """``x [R, K]`` (bf16 / float) -> ``(q [R, K] float8_e4m3fn, scale [R] float32)`` per row: scale = amax / 448
    (1.0 where that is 0: a zero row), q = clamp(x / scale, +-448) rounded to nearest even. Returned (allocated on the
    current stream); capturable (no host round trip). CUDA bf16 rows (16-byte aligned, K a multiple of 8): the fused
    kernel, one pass; anything else: ``quant_rows_torch`` (the same bits). ``live_rows``: None, or an int32 tensor
    on x's GPU whose first element bounds the rows the fused kernel processes (rows past it are left unwritten:
    the tail of a grouped buffer sized for the worst case; the PyTorch path computes them anyway, but checks it
    too). ``x`` must be a torch.Tensor (TypeError otherwise: numpy goes to ``dwdp_ops.quant.quant_rowwise``). Local.
    Raises ValueError for a ``chunk`` that is not an int >= 1, an ``x`` that is not ``[R, K]`` with K >= 1, and (on
    every path) a ``live_rows`` that is not None or an int32 tensor of at least one element on x's device."""
    _check_tensor(x, "quant_rows", "x")
    _check_chunk(chunk)
    _check_live_rows(live_rows, x, "quant_rows", "x")
    if x.dim() == 2 and _fused_ok(x, x.shape[1]):
        return _fused("quant_rows_bf16", x, x.shape[1], live_rows)
    return quant_rows_torch(x, chunk)


def quant_rows_torch(x: Any, chunk: int = QUANT_CHUNK) -> tuple[Any, Any]:
    """``quant_rows`` in PyTorch operations, any device and float dtype (in row chunks of ``chunk``: bounds the
    float32 temporary); bit for bit the numpy ``dwdp_ops.quant.quant_rowwise`` on finite input. Precondition: ``x``
    finite (not checked: reading the data would synchronise a device; the numpy reference raises, here a non-finite
    row gives a NaN or infinite scale and NaN codes). Returns new ``(q [R, K] float8_e4m3fn, scale [R] float32)`` on
    x's device. Local. Raises TypeError for a non-tensor, ValueError for a bad ``chunk``, a shape that is not
    ``[R, K]`` with K >= 1 or a dtype that is not floating point (all named as ``quant_rows``'s)."""
    torch = require_torch()
    _check_tensor(x, "quant_rows", "x")
    chunk = _check_chunk(chunk)
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"quant_rows: x must be [rows, K] with K >= 1, got shape {list(x.shape)}")
    if not x.dtype.is_floating_point:  # as the numpy reference: an integer or bool tensor was quantised silently
        raise ValueError(f"quant_rows: x must be a floating-point tensor (bf16 / float), got {x.dtype}")
    R, K = x.shape
    q = torch.empty((R, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((R,), dtype=torch.float32, device=x.device)
    for a in range(0, R, chunk):
        xs = x[a : a + chunk].float()
        s = xs.abs().amax(dim=1)
        s = s / torch.full_like(s, E4M3_MAX)  # a true division (CUDA turns `/ 448.0` into `* fl(1 / 448)`)
        s = torch.where(s == 0, torch.ones_like(s), s)  # a zero row, or one whose amax / 448 underflows
        scale[a : a + chunk] = s
        q[a : a + chunk] = (xs / s[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def swiglu_quant(h: Any, inter: int, *, live_rows: Any = None) -> tuple[Any, Any]:
    """``h [R, 2I]`` -> ``quant_rows(silu(h[:, :I]) * h[:, I:])`` (the SwiGLU in ``h``'s dtype, PyTorch's rounding).
    CUDA bf16: one fused kernel (each row of ``h`` read once, the product never written); else
    ``swiglu_quant_torch``. ``live_rows`` as for ``quant_rows``. ``h`` a torch.Tensor and ``inter`` an int >= 1
    (a bool is not an int: True had been taken as 1), refused by name otherwise. Returns new ``(q [R, I]
    float8_e4m3fn, scale [R] float32)`` on h's device (current stream). Local. Raises TypeError for a non-tensor
    ``h`` or a non-int ``inter``, ValueError for ``inter < 1``, an ``h`` that is not ``[R, 2 * inter]``, or a bad
    ``live_rows`` (on every path, as ``quant_rows``)."""
    _check_tensor(h, "swiglu_quant", "h")
    if not is_int(inter):
        raise TypeError(f"swiglu_quant: inter must be an int >= 1 (the intermediate size), got {inter!r} "
                        f"({type(inter).__name__})")
    if inter < 1:
        raise ValueError(f"swiglu_quant: inter must be an int >= 1 (the intermediate size), got {inter!r}")
    inter = int(inter)
    if h.dim() != 2 or h.shape[1] != 2 * inter:
        raise ValueError(f"swiglu_quant: h must be [rows, 2 * {inter}], got shape {list(h.shape)}")
    _check_live_rows(live_rows, h, "swiglu_quant", "h")
    if _fused_ok(h, inter):
        return _fused("swiglu_quant_bf16", h, inter, live_rows)
    return swiglu_quant_torch(h, inter)


def swiglu_quant_torch(h: Any, inter: int) -> tuple[Any, Any]:
    """``swiglu_quant`` in PyTorch operations: the reference of the fused kernel. ``h [R, 2I]`` -> new ``(q [R, I]
    float8_e4m3fn, scale [R] float32)``. ``h`` and ``inter`` are not checked here (``swiglu_quant`` checks them); the
    product goes through ``quant_rows_torch``'s checks."""
    torch = require_torch()
    a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    return quant_rows_torch(a)


def dequant_rows(q: Any, scale: Any) -> Any:
    """``q [..., N, K]`` float8_e4m3fn (or uint8 e4m3 bits, as ``requant_block`` takes them), ``scale [..., N]``
    -> float32 ``q * scale[..., None]`` (new; ``scale`` should be float32: its dtype is not checked, and PyTorch's
    promotion makes a float64 scale give a float64 result). Local. TypeError for a ``q`` or ``scale`` that is not a
    torch.Tensor, ValueError for codes of another dtype, a 0-d ``q`` or a scale of another shape."""
    torch = require_torch()
    _check_tensor(q, "dequant_rows", "q", "[..., K]")
    _check_tensor(scale, "dequant_rows", "scale", "[...]")
    if q.dtype not in (torch.uint8, torch.float8_e4m3fn) or q.dim() < 1:
        raise ValueError(f"dequant_rows: q must be [..., K] float8_e4m3fn or uint8 (e4m3 bits), got {q.dtype} "
                         f"{list(q.shape)}")
    if tuple(scale.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"dequant_rows: scale shape {list(scale.shape)} does not match q's rows: want "
                         f"{list(q.shape[:-1])}")
    return q.view(torch.float8_e4m3fn).float() * scale[..., None]


def requant_block(codes: Any, scale_inv: Any, block: int = 128) -> tuple[Any, Any]:
    """A checkpoint's block-scaled weight (``codes [N, K]`` uint8 e4m3 bits, ``scale_inv [ceil(N/b), ceil(K/b)]``
    float32) -> rowwise ``(q [N, K] float8_e4m3fn, scale [N] float32)``: dequantised in float32, requantised per
    row. The float32 temporary is ``[N, K]``; callers go expert by expert. Preconditions, not checked (as in
    ``quant_rows_torch``: reading the data would synchronise a device, once per call at load): finite scales, no NaN
    codes (e4m3 0x7F / 0xFF) and no block whose values overflow float32. A row that breaks one gets a NaN (or
    infinite) scale and NaN codes; the other rows are unaffected. The numpy ``quant.requant_rowwise_from_block``
    raises ValueError for each. Returns new tensors on codes' device (through ``quant_rows``). Local. Raises
    ValueError for codes that are not 2-D uint8 / float8_e4m3fn, a ``block`` that is not an int >= 1, or a
    ``scale_inv`` shape other than the block grid (its dtype is converted with ``.float()``, not checked); TypeError
    for a ``codes`` or ``scale_inv`` that is not a torch.Tensor (numpy goes to ``quant.requant_rowwise_from_block``)."""
    torch = require_torch()
    _check_tensor(codes, "requant_block", "codes", "[N, K]")
    _check_tensor(scale_inv, "requant_block", "scale_inv", "[ceil(N/b), ceil(K/b)]")
    if codes.dtype not in (torch.uint8, torch.float8_e4m3fn) or codes.dim() != 2:
        raise ValueError(f"requant_block: codes must be [N, K] uint8 (e4m3 bits) or float8_e4m3fn, got {codes.dtype} "
                         f"{list(codes.shape)}")
    if not is_int(block) or block < 1:
        raise ValueError(f"requant_block: block must be an int >= 1, got {block!r}")
    block = int(block)
    N, K = codes.shape
    want = (-(-N // block), -(-K // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"requant_block: scale_inv shape {tuple(scale_inv.shape)} does not match {N}x{K} in "
                         f"{block}x{block} blocks: want {want}")
    # a block longer than N (or K) is one block along that axis: repeat no more than the matrix needs
    full = scale_inv.float().repeat_interleave(min(block, N), 0).repeat_interleave(min(block, K), 1)[:N, :K]
    w = codes.view(torch.float8_e4m3fn).float() * full
    return quant_rows(w)


def _fast_accum_pair(fast_accum: Any) -> tuple[bool, bool]:
    """``fast_accum`` (a bool, or a pair of bools as a tuple or list) -> (first GEMM, second GEMM)."""
    pair = tuple(fast_accum) if isinstance(fast_accum, (tuple, list)) else (fast_accum, fast_accum)
    if len(pair) != 2 or not all(is_bool(f) for f in pair):
        raise TypeError(f"grouped_swiglu_fp8: fast_accum must be a bool or a pair of bools (first GEMM, second "
                        f"GEMM), got {fast_accum!r}")
    return bool(pair[0]), bool(pair[1])


def grouped_swiglu_fp8(xg: Any, offs: Any, w13: Any, w2: Any, s13: Any, s2: Any, inter: int, *,
                       fast_accum: bool | tuple[bool, bool] = False) -> Any:
    """The expert MLP over rows grouped by expert with fp8 weights: ``xg [R, H]`` bf16, or the same rows already
    quantised as a pair ``(q [R, H] float8_e4m3fn, scale [R] float32)`` (a tuple or a list; ``quant_rows``' output:
    the routed step quantises each token once and gathers the fp8 rows, ``models.routed``), group g in rows
    ``[offs[g-1], offs[g])`` (``offs [G]`` int32, multiples of 16), ``w13 [G, 2I, H]`` / ``w2 [G, H, I]``
    float8_e4m3fn (any page-strided batch stride, rows contiguous), ``s13 [G, 2I]`` / ``s2 [G, H]`` float32 row
    scales -> ``[R, H]`` bf16. bf16 activations are quantised per row before the first GEMM (``quant_rows``); the
    SwiGLU runs on the first GEMM's bf16 output, fused with the second quantisation (``swiglu_quant``). Rows past
    ``offs[-1]`` are not meaningful. ``fast_accum``: the GEMMs' ``use_fast_accum``, one bool or a pair of bools
    (first GEMM, second GEMM; a tuple or a list; anything else a TypeError before any work) (Hopper: partial sums
    stay in the tensor core's reduced-precision accumulator instead of being promoted to float32; measured in
    ``bench/expert_gemm.py``: faster from 32K tokens, the same error against bf16; ``GpuModel`` turns it on where
    ``use_fast_accum`` says).

    Returns a new tensor on the current stream. Local. Only ``fast_accum`` (TypeError) and a quantised input (a
    tuple or list that is not two tensors, or whose dtypes or scale shape differ: ValueError) are checked here;
    other shapes, dtypes and ``offs`` go unchecked to ``quant_rows`` and ``torch._scaled_grouped_mm``
    (``dwdp::expert_mlp`` checks them first)."""
    torch = require_torch()
    fast1, fast2 = _fast_accum_pair(fast_accum)
    live = offs[-1:]  # rows past the last group (a worst-case-sized DEP buffer's tail) are skipped, not quantised
    if isinstance(xg, (tuple, list)):  # a pair, as fast_accum's (a list had gone to quant_rows: "x must be a Tensor")
        if len(xg) != 2 or not all(isinstance(t, torch.Tensor) for t in xg):
            raise ValueError("grouped_swiglu_fp8: a quantised input must be a pair (q [R, H] float8_e4m3fn, scale [R] "
                             f"float32) of tensors (a tuple or a list), got {len(xg)} items of types "
                             f"{[type(t).__name__ for t in xg]}")
        xq, xs = xg
        if xq.dtype != torch.float8_e4m3fn or xs.dtype != torch.float32 or xs.shape != (xq.shape[0],):
            raise ValueError("grouped_swiglu_fp8: a quantised input must be (q [R, H] float8_e4m3fn, scale [R] "
                             f"float32), got {xq.dtype} {list(xq.shape)} and {xs.dtype} {list(xs.shape)}")
    else:
        xq, xs = quant_rows(xg, live_rows=live)
    h = torch._scaled_grouped_mm(xq, w13.transpose(-2, -1), xs, s13, offs=offs, out_dtype=torch.bfloat16,
                                 use_fast_accum=fast1)
    del xq, xs, xg  # a large prefill's temporaries: each freed as soon as its reader is enqueued (stream-ordered pool)
    aq, as_ = swiglu_quant(h, inter, live_rows=live)
    del h
    return torch._scaled_grouped_mm(aq, w2.transpose(-2, -1), as_, s2, offs=offs, out_dtype=torch.bfloat16,
                                    use_fast_accum=fast2)
