"""fp8 e4m3 quantisation in numpy: the exact reference the GPU (PyTorch) code is tested against.

Format. ``float8_e4m3fn`` (OCP FP8 E4M3, "fn" = finite + NaN) is one byte: 1 sign bit, 4 exponent bits (bias 7) and
3 mantissa bits. There are no infinities; ``0x7F`` and ``0xFF`` are NaN. Exponent field ``e`` and mantissa ``m``
decode to ``(1 + m/8) * 2^(e-7)`` for ``e >= 1`` (normals: 2^-6 up to 448 = ``0x7E``) and ``m * 2^-9`` for ``e = 0``
(subnormals: 2^-9 = ``0x01`` up to 7 * 2^-9). ``0x80`` is -0.0. Between 2^E and 2^(E+1) the spacing is 2^(E-3),
so rounding to nearest changes a normal value by at most 2^-4 of itself; below 2^-6 the spacing is 2^-9 (absolute
error at most 2^-10).

Rounding rule (``to_e4m3``). The input is first converted to float32 (float64 is rounded to float32 first, as
PyTorch's cast does: it goes through float, so a float64 just above a tie can round differently than a direct
rounding would), then its magnitude is clamped to 448 and rounded to the nearest e4m3 value, ties to the even code
(the one with mantissa bit 0). Values beyond +-448, +-inf included, therefore SATURATE to +-448 (``0x7E`` / ``0xFE``).
This equals ``torch.from_numpy(x).clamp(-448, 448).to(torch.float8_e4m3fn)`` bit for bit. Callers of PyTorch clamp
first because the plain cast is not the same on every release and device: c10's conversion in torch 2.13 saturates
finite overflow, older releases (and the NaN-on-overflow conversions) give NaN from 464 up (464 = 1.8125 * 2^8 is
the tie between 448 and the would-be 480 = ``0x7F``, which rounds to the even, NaN pattern). The sign is kept
everywhere, as PyTorch does: -0.0 encodes as ``0x80``, and so does a negative value that rounds to zero
(-2^-10 -> ``0x80``); NaN encodes as ``0x7F`` with its sign bit set when the NaN's is (``-nan`` -> ``0xFF``; note
that NaNs made by arithmetic on x86, such as 0 * inf, carry the sign bit).

Scales. Weights are stored rowwise: one float32 scale per output row, ``W ~= from_e4m3(q) * scale[..., None]``
with ``scale = amax(|row|) / 448`` and ``q = to_e4m3(row / scale)``, all in float32 (a true division, not a multiply
by the reciprocal, which rounds differently). A row whose scale comes out 0 (a row of zeros, or amax below about
3e-43 so that amax / 448 underflows) gets scale 1.0; its codes are then +-0 (``0x00``, ``0x80`` for -0.0 inputs, as
the cast gives). Below amax = 448 * 2^-126 (about 5.3e-36) the scale is a float32 subnormal, with fewer significant
bits the smaller it is: amax / 448 rounds on a coarse grid, amax / scale can exceed 448 and the largest elements
saturate, so the round trip loses up to a third of amax (amax 9.3e-43: scale 2^-149, the amax element comes back as
448 * 2^-149 = 6.3e-43); the PyTorch path and the CUDA kernels compute the same bits, and no such row is refused.
Activations are quantised per token the same way (``quant_rowwise``). DeepSeek-R1's checkpoints
are block-scaled instead: ``W = from_e4m3(q) * scale_inv`` of the 128 x 128 block holding the element (partial
blocks at the edges); ``requant_rowwise_from_block`` turns those into the rowwise format (dequantise in float32,
requantise per row) and ``requant_error`` measures what that costs.

Memory. Everything is vectorised and works through the data in chunks of about ``_CHUNK_ELEMS`` elements along the
rows, so the float32 temporaries stay at tens of MiB even for all experts of a layer (``[256, 4096, 7168]``).

Errors. Bad dtypes (codes that are not uint8, scales that are not float32, non-float values), bad shapes (a scale
shape that does not match the rows or the blocks), non-finite scales or inputs and float64 inputs beyond float32's
range (quantisation computes in float32; ``to_e4m3`` alone saturates them, as the cast does) raise ValueError naming
the argument, what was given and what is expected; so does a ``block`` that is not a positive integer.

Every function is local host (numpy) code: inputs are array-likes (read, never written), results are new numpy
arrays the caller owns (``requant_error``: a dict of floats).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import is_int

__all__ = [
    "E4M3_MAX",
    "to_e4m3",
    "from_e4m3",
    "quant_rowwise",
    "dequant_rowwise",
    "quant_block",
    "dequant_block",
    "requant_rowwise_from_block",
    "requant_error",
]

E4M3_MAX = 448.0
_MAX32 = np.float32(E4M3_MAX)
_CHUNK_ELEMS = 1 << 22  # elements per chunk (16 MiB per float32 temporary)


def _decode_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int64)
    e = (codes >> 3) & 0xF
    m = codes & 0x7
    mag = np.where(e == 0, np.ldexp(m.astype(np.float64), -9), np.ldexp((8 + m).astype(np.float64), e - 10))
    val = np.where(codes & 0x80, -mag, mag)  # 0x80 -> -0.0
    val[(codes & 0x7F) == 0x7F] = np.nan
    val[0xFF] = -np.nan
    return val.astype(np.float32)


_DECODE = _decode_table()  # code -> float32 value, exact (every e4m3 value is a float32)


# -- validation -------------------------------------------------------------------------------------------------------


def _float_array(x: Any, name: str, fn: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise ValueError(f"{fn}: {name} must be a floating-point array (float16/32/64), got dtype {a.dtype}")
    return a


def _codes(q: Any, name: str, fn: str, min_ndim: int = 0) -> np.ndarray:
    a = np.asarray(q)
    if a.dtype != np.uint8:
        raise ValueError(f"{fn}: {name} must be uint8 e4m3 bit patterns, got dtype {a.dtype}")
    if a.ndim < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dimension(s), got shape {a.shape}")
    return a


def _scales(s: Any, name: str, fn: str, want: tuple[int, ...], what: str) -> np.ndarray:
    a = np.asarray(s)
    if a.dtype != np.float32:
        raise ValueError(f"{fn}: {name} must be float32, got dtype {a.dtype}")
    if a.shape != want:
        raise ValueError(f"{fn}: {name} shape {a.shape} does not match {what}: want {want}")
    if not np.isfinite(a).all():
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ValueError(f"{fn}: {name} has {bad} non-finite value(s) (inf or NaN); scales must be finite")
    return a


def _chunk32(a: np.ndarray, name: str, fn: str) -> np.ndarray:
    """A chunk of float input as float32 (quantisation computes in float32); ValueError naming ``name`` for finite
    values that overflow float32 (float64 beyond +-3.4e38: they would be reported as non-finite)."""
    with np.errstate(over="ignore"):
        x = a.astype(np.float32)
    if a.dtype.itemsize > 4 and not np.isfinite(x).all():
        big = np.abs(a[np.isinf(x) & np.isfinite(a)])
        if big.size:
            raise ValueError(f"{fn}: {name} has finite values beyond float32's range (magnitude {big.max():.6g} > "
                             f"{np.finfo(np.float32).max:.8g}); quantisation computes in float32")
    return x


def _block_size(block: Any, fn: str) -> int:
    if not is_int(block) or block < 1:
        raise ValueError(f"{fn}: block must be a positive integer, got {block!r}")
    return int(block)


def _block_grid(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    n, k = shape[-2], shape[-1]
    return (*shape[:-2], -(-n // block), -(-k // block))


def _row_chunk(k: int, block: int = 1) -> int:
    """Rows per chunk: about _CHUNK_ELEMS elements, a positive multiple of ``block``."""
    rows = max(1, _CHUNK_ELEMS // max(k, 1))
    return max(block, rows // block * block)


# -- element codec ----------------------------------------------------------------------------------------------------


def _encode32(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint8 e4m3 codes (the rounding rule of the module docstring)."""
    sign = np.signbit(x).astype(np.uint8) << np.uint8(7)
    nan = np.isnan(x)
    a = np.abs(x)
    a[nan] = 0
    np.minimum(a, _MAX32, out=a)  # saturate (inf included)
    # a = f * 2^e with f in [0.5, 1): a's binade is 2^(e-1); below 2^-6 the spacing stays 2^-9 (subnormals).
    _, e = np.frexp(a)  # frexp(0) gives e = 0: zero is placed with the subnormals explicitly
    E = np.where(a > 0, np.maximum(e - 1, -6), -6)
    n = np.rint(np.ldexp(a, 3 - E))  # a / 2^(E-3), exact (power of two); rint = nearest, ties to even; n in 0..16
    # value n * 2^(E-3): the code is (E+7) << 3 | (n-8) for normals, n for subnormals (E = -6), one formula for both;
    # n = 16 carries into the next exponent with mantissa 0. a <= 448 keeps the code <= 0x7E.
    code = ((E + 6) * 8 + n.astype(np.int32)).astype(np.uint8)
    code[nan] = 0x7F
    return code | sign


def to_e4m3(x: Any) -> np.ndarray:
    """Round floats to float8_e4m3fn bit patterns.

    ``x``: array-like of float16/float32/float64, any shape. Returns uint8 of the same shape: nearest e4m3 value,
    ties to even, beyond +-448 (and +-inf) saturated to +-448, NaN -> 0x7F (0xFF with the sign bit), -0.0 -> 0x80.
    float64 is rounded to float32 first (as PyTorch's cast does). Equal bit for bit to
    ``torch.from_numpy(x).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)``. ValueError for a non-float
    ``x``.
    """
    a = _float_array(x, "x", "to_e4m3")
    flat = a.reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint8)
    for i in range(0, flat.size, _CHUNK_ELEMS):
        with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, saturated like any value > 448
            out[i : i + _CHUNK_ELEMS] = _encode32(flat[i : i + _CHUNK_ELEMS].astype(np.float32))
    return out.reshape(a.shape)


def from_e4m3(q: Any) -> np.ndarray:
    """Decode float8_e4m3fn bit patterns. ``q``: uint8, any shape. Returns float32 of the same shape, exact
    (0x80 -> -0.0, 0x7F / 0xFF -> NaN), equal to ``torch.from_numpy(q).view(torch.float8_e4m3fn).float()``.
    ValueError for a ``q`` that is not uint8."""
    return np.asarray(_DECODE[_codes(q, "q", "from_e4m3")])


# -- rowwise ----------------------------------------------------------------------------------------------------------


def _quant_rows32(x: np.ndarray, q_out: np.ndarray, s_out: np.ndarray, fn: str) -> None:
    """float32 ``x [R, K]`` -> codes into ``q_out [R, K]``, scales into ``s_out [R]``."""
    if not np.isfinite(x).all():
        what = "q holds NaN codes (0x7F / 0xFF) or a block overflows float32" if fn.startswith("requant") else "x"
        raise ValueError(f"{fn}: non-finite values (inf or NaN) to quantise: {what}; only finite values can be")
    amax = np.max(np.abs(x), axis=1)
    s = amax / _MAX32  # float32 / float32
    s[s == 0] = 1  # zero rows, and rows whose amax / 448 underflows
    s_out[...] = s
    q_out[...] = _encode32(x / s[:, None])


def quant_rowwise(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (last axis) fp8 quantisation.

    ``x [..., K]`` float16/32/64 (finite; K >= 1) -> ``(q [..., K] uint8, scale [...] float32)`` with, in float32,
    ``scale = amax(|row|) / 448`` (1.0 where that is 0: a zero row, or amax < ~3e-43) and ``q = to_e4m3(row / scale)``.
    Dequantise with ``dequant_rowwise`` (``from_e4m3(q) * scale[..., None]``). Raises ValueError for non-float
    input, K = 0, non-finite values or float64 values beyond float32's range.
    """
    fn = "quant_rowwise"
    a = _float_array(x, "x", fn)
    if a.ndim < 1 or a.shape[-1] == 0:
        raise ValueError(f"{fn}: x must be [..., K] with K >= 1, got shape {a.shape}")
    k = a.shape[-1]
    x2 = a.reshape(-1, k)
    q = np.empty(x2.shape, dtype=np.uint8)
    s = np.empty(x2.shape[0], dtype=np.float32)
    step = _row_chunk(k)
    for r in range(0, x2.shape[0], step):
        _quant_rows32(_chunk32(x2[r : r + step], "x", fn), q[r : r + step], s[r : r + step], fn)
    return q.reshape(a.shape), s.reshape(a.shape[:-1])


def dequant_rowwise(q: Any, scale: Any) -> np.ndarray:
    """``q [..., K]`` uint8 codes, ``scale [...]`` float32 (finite) -> float32 ``from_e4m3(q) * scale[..., None]``.
    ValueError for another dtype, a 0-d ``q``, a scale shape other than ``q.shape[:-1]`` or a non-finite scale."""
    fn = "dequant_rowwise"
    qa = _codes(q, "q", fn, min_ndim=1)
    sa = _scales(scale, "scale", fn, qa.shape[:-1], f"q's rows (q shape {qa.shape})")
    out = from_e4m3(qa)
    out *= sa[..., None]
    return out


# -- block-scaled (DeepSeek checkpoints) ------------------------------------------------------------------------------


def _expand(s: np.ndarray, rows: int, k: int, block: int) -> np.ndarray:
    """Block scales ``[ceil(rows/b), ceil(k/b)]`` -> per-element ``[rows, k]`` (float32). A block longer than
    ``rows`` (or ``k``) is one block along that axis: repeated only ``rows`` (``k``) times, not ``block`` times."""
    return np.repeat(np.repeat(s, min(block, rows), axis=0)[:rows], min(block, k), axis=1)[:, :k]


def quant_block(w: Any, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Block-scaled fp8 quantisation, the way DeepSeek-R1's checkpoints are stored (to make test weights).

    ``w [..., N, K]`` float16/32/64 (finite) -> ``(q [..., N, K] uint8, scale_inv [..., ceil(N/b), ceil(K/b)]
    float32)``: per ``b x b`` block (the last row / column of blocks may be partial), in float32,
    ``scale_inv = amax(|block|) / 448`` (1.0 where that is 0) and ``q = to_e4m3(w / scale_inv)``. Dequantise with
    ``dequant_block``. ValueError for non-float input, N or K = 0, non-finite values, float64 values beyond float32's
    range or a bad ``block``.
    """
    fn = "quant_block"
    b = _block_size(block, fn)
    a = _float_array(w, "w", fn)
    if a.ndim < 2 or a.shape[-1] == 0 or a.shape[-2] == 0:
        raise ValueError(f"{fn}: w must be [..., N, K] with N, K >= 1, got shape {a.shape}")
    n, k = a.shape[-2:]
    w3 = a.reshape(-1, n, k)
    q = np.empty(w3.shape, dtype=np.uint8)
    s = np.empty((w3.shape[0], *_block_grid((n, k), b)), dtype=np.float32)
    col_starts = np.arange(0, k, b)
    step = _row_chunk(k, b)
    for m in range(w3.shape[0]):
        for r in range(0, n, step):
            xs = _chunk32(w3[m, r : r + step], "w", fn)
            if not np.isfinite(xs).all():
                raise ValueError(f"{fn}: w has non-finite values (inf or NaN); only finite values can be quantised")
            ab = np.abs(xs)
            amax = np.maximum.reduceat(np.maximum.reduceat(ab, col_starts, axis=1), np.arange(0, xs.shape[0], b), 0)
            sb = amax / _MAX32
            sb[sb == 0] = 1
            s[m, r // b : r // b + sb.shape[0]] = sb
            q[m, r : r + step] = _encode32(xs / _expand(sb, xs.shape[0], k, b))
    return q.reshape(a.shape), s.reshape(_block_grid(a.shape, b))


def _check_block_pair(q: Any, scale_inv: Any, block: Any, fn: str) -> tuple[np.ndarray, np.ndarray, int]:
    b = _block_size(block, fn)
    qa = _codes(q, "q", fn, min_ndim=2)
    if 0 in qa.shape[-2:]:
        raise ValueError(f"{fn}: q must be [..., N, K] with N, K >= 1, got shape {qa.shape}")
    want = _block_grid(qa.shape, b)
    sa = _scales(scale_inv, "scale_inv", fn, want, f"q shape {qa.shape} in {b}x{b} blocks")
    return qa, sa, b


def _block_chunks(qa: np.ndarray, sa: np.ndarray, b: int):
    """Yield ``(m, r, w)``: float32 block-dequantised rows ``r : r + len(w)`` of matrix ``m`` of ``qa [..., N, K]``."""
    n, k = qa.shape[-2:]
    q3 = qa.reshape(-1, n, k)
    s3 = sa.reshape(-1, *sa.shape[-2:])
    step = _row_chunk(k, b)
    for m in range(q3.shape[0]):
        for r in range(0, n, step):
            w = _DECODE[q3[m, r : r + step]]
            w *= _expand(s3[m, r // b : -(-(r + w.shape[0]) // b)], w.shape[0], k, b)
            yield m, r, w


def dequant_block(q: Any, scale_inv: Any, block: int = 128) -> np.ndarray:
    """``q [..., N, K]`` uint8 codes, ``scale_inv [..., ceil(N/b), ceil(K/b)]`` float32 (finite) -> float32
    ``[..., N, K]``: each code's value times its block's scale_inv (one float32 multiply, as DeepSeek's
    ``weight_dequant`` does). ValueError for another dtype, N or K = 0, a scale_inv shape other than the block grid,
    a non-finite scale or a bad ``block``."""
    qa, sa, b = _check_block_pair(q, scale_inv, block, "dequant_block")
    n, k = qa.shape[-2:]
    out = np.empty(qa.shape, dtype=np.float32)
    o3 = out.reshape(-1, n, k)
    for m, r, w in _block_chunks(qa, sa, b):
        o3[m, r : r + w.shape[0]] = w
    return out


def requant_rowwise_from_block(q: Any, scale_inv: Any, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Block-scaled checkpoint weights -> rowwise fp8: ``quant_rowwise(dequant_block(q, scale_inv, block))``, done
    in row chunks (memory stays bounded for ``[E, N, K]``).

    ``q [..., N, K]`` uint8, ``scale_inv [..., ceil(N/b), ceil(K/b)]`` float32 -> ``(q_row [..., N, K] uint8,
    scale_row [..., N] float32)``. Raises ValueError for mismatched shapes, wrong dtypes, non-finite scales, or NaN
    codes (0x7F / 0xFF) in ``q``.
    """
    fn = "requant_rowwise_from_block"
    qa, sa, b = _check_block_pair(q, scale_inv, block, fn)
    n, k = qa.shape[-2:]
    q_row = np.empty(qa.shape, dtype=np.uint8)
    s_row = np.empty(qa.shape[:-1], dtype=np.float32)
    q3, s2 = q_row.reshape(-1, n, k), s_row.reshape(-1, n)
    for m, r, w in _block_chunks(qa, sa, b):
        _quant_rows32(w, q3[m, r : r + w.shape[0]], s2[m, r : r + w.shape[0]], fn)
    return q_row, s_row


def requant_error(q: Any, scale_inv: Any, block: int = 128) -> dict[str, float]:
    """What the rowwise requantisation of block-scaled weights loses, measured against the block dequantisation.

    ``q [..., N, K]`` uint8, ``scale_inv [..., ceil(N/b), ceil(K/b)]`` float32. With ``W = dequant_block(q,
    scale_inv)`` and ``R = dequant_rowwise(*requant_rowwise_from_block(q, scale_inv))``, ``D = R - W``, returns
    (sums in float64):

    - ``rel_fro``: ``||D||_F / ||W||_F`` over all rows (0.0 when W is all zero);
    - ``max_abs``: ``max |D|``;
    - ``max_rel_row``: ``max over rows of ||D_row||_2 / ||W_row||_2`` (a zero row counts 0: it requantises exactly).

    Raises ValueError as ``requant_rowwise_from_block``.
    """
    fn = "requant_error"
    qa, sa, b = _check_block_pair(q, scale_inv, block, fn)
    sq_d = sq_w = max_abs = max_rel = 0.0
    for _, _, w in _block_chunks(qa, sa, b):
        qr = np.empty(w.shape, dtype=np.uint8)
        sr = np.empty(w.shape[0], dtype=np.float32)
        _quant_rows32(w, qr, sr, fn)
        rec = _DECODE[qr]
        rec *= sr[:, None]
        w64 = w.astype(np.float64)
        d = rec.astype(np.float64) - w64
        dd = np.einsum("ij,ij->i", d, d)
        ww = np.einsum("ij,ij->i", w64, w64)
        sq_d += float(dd.sum())
        sq_w += float(ww.sum())
        max_abs = max(max_abs, float(np.abs(d).max(initial=0.0)))
        rel = np.sqrt(np.divide(dd, ww, out=np.zeros_like(dd), where=ww > 0))
        max_rel = max(max_rel, float(rel.max(initial=0.0)))
    return {"rel_fro": (sq_d / sq_w) ** 0.5 if sq_w > 0 else 0.0, "max_abs": max_abs, "max_rel_row": max_rel}
