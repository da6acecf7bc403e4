"""Causal prefill attention over requests packed back to back: one kernel call per layer, no per-request loop.

``prefill_attention(q, k, v, lengths, scale)`` takes the step's tokens as they come out of the projections (request
after request, each a whole prompt starting at position 0) and attends within each request, causally. The value
head dim may differ from the query/key head dim (DeepSeek-R1: 192 and 128) and is never padded where the backend
takes it as it is. Backends, tried in the order of ``DWDP_PREFILL_ATTENTION`` (comma-separated; default
``cudnn_varlen,dense``), the first that accepts the shapes wins and is remembered per (head dims, dtype):

  * ``cudnn_varlen``  cuDNN's ragged (variable-length) fused attention through PyTorch
                      (``aten._cudnn_attention_forward`` with cumulative sequence lengths, the kernel PyTorch runs
                      for nested jagged tensors); V's head dim as it is.
  * ``flash_varlen``  FlashAttention-2's variable-length kernel through PyTorch (``aten._flash_attention_forward``);
                      FA2 needs equal head dims, so V is zero-padded to the query head dim and the output cut back.
  * ``dense``         one ``scaled_dot_product_attention`` over a ``[requests, heads, longest, dim]`` batch, cuDNN
                      first (``sdpa_kernel`` priority cuDNN, flash, efficient, math): with equal lengths the packed
                      tensors are only viewed, otherwise each request is copied into a zero-padded slot (a causal
                      query never sees the padding keys after it; padded query rows are dropped).
  * ``loop``          one SDPA call per request (what ``GpuModel`` did before): the reference the others are tested
                      against, and the fallback that accepts everything.

``bench/attention_probe.py`` times every backend on R1's prefill shapes side by side; ``tests/test_gpu_attention.py``
checks each against a float32 reference. Pure PyTorch: the kernels are cuDNN's and FlashAttention's as shipped
with PyTorch (we write none), chosen because they are the fastest on our H200s (see docs/benchmarks.md).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np

BACKENDS = ("cudnn_varlen", "flash_varlen", "dense", "loop")
DEFAULT_ORDER = ("cudnn_varlen", "dense")
ENV = "DWDP_PREFILL_ATTENTION"

# (backend, d_qk, d_v, dtype) that raised once: not tried again in this process
_refused: dict[tuple, str] = {}


def backend_order(environ=None) -> tuple[str, ...]:
    """The backends ``auto`` tries, from ``DWDP_PREFILL_ATTENTION`` (comma-separated names of ``BACKENDS``) or the
    default. Raises ValueError naming an unknown backend."""
    env = os.environ if environ is None else environ
    raw = (env.get(ENV) or "").strip()
    if not raw:
        return DEFAULT_ORDER
    names = tuple(x.strip() for x in raw.split(",") if x.strip())
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise ValueError(f"{ENV}={raw!r}: unknown backend(s) {bad}; expected a comma-separated list of {BACKENDS}")
    return names


def check_lengths(lengths: Sequence[int], tokens: int) -> list[int]:
    """The request lengths as ints; raises ValueError unless each is >= 1 and they sum to ``tokens``."""
    out = [int(x) for x in lengths]
    if not out or min(out) < 1 or sum(out) != tokens:
        raise ValueError(f"lengths must be positive and sum to the {tokens} packed tokens, got {len(out)} lengths "
                         f"summing to {sum(out)} (min {min(out) if out else None})")
    return out


def padded_rows(lengths: Sequence[int]) -> np.ndarray:
    """For each packed token, its row in a ``[requests * longest]`` zero-padded batch (int64): request ``b``'s token
    ``i`` goes to ``b * longest + i``."""
    L = max(lengths)
    return np.concatenate([b * L + np.arange(n, dtype=np.int64) for b, n in enumerate(lengths)])


def _device_ints(torch, values, device, dtype):
    """Host ints on ``device`` without draining the stream (pinned, non-blocking)."""
    t = torch.as_tensor(np.asarray(values), dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _cu(torch, lengths, device, dtype):
    return _device_ints(torch, np.concatenate([[0], np.cumsum(lengths)]), device, dtype)


def _cudnn_varlen(torch, q, k, v, lengths, scale):
    L = max(lengths)
    cu = _cu(torch, lengths, q.device, torch.int32)
    out = torch.ops.aten._cudnn_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), None, cu, cu, L, L,
                                                  False, 0.0, True, False, scale=scale)[0]
    return out.view(q.shape[0], q.shape[1], v.shape[2])


def _flash_varlen(torch, q, k, v, lengths, scale):
    L, dv = max(lengths), v.shape[2]
    cu = _cu(torch, lengths, q.device, torch.int32)
    vp = torch.nn.functional.pad(v, (0, q.shape[2] - dv)) if dv < q.shape[2] else v.contiguous()
    out = torch.ops.aten._flash_attention_forward(q.contiguous(), k.contiguous(), vp, cu, cu, L, L, 0.0, True, False,
                                                  scale=scale)[0]
    return out[..., :dv]


def _sdpa(torch, q, k, v, scale):
    """SDPA over ``[B, H, S, D]`` views, cuDNN first."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _dense(torch, q, k, v, lengths, scale):
    T, H, dv = q.shape[0], q.shape[1], v.shape[2]
    B, L = len(lengths), max(lengths)
    if min(lengths) == L:  # equal lengths: views of the packed tensors
        o = _sdpa(torch, *(t.view(B, L, H, t.shape[2]).transpose(1, 2) for t in (q, k, v)), scale)
        return o.transpose(1, 2).reshape(T, H, dv)
    rows = _device_ints(torch, padded_rows(lengths), q.device, torch.int64)

    def pad(t):
        p = t.new_zeros((B * L, H, t.shape[2]))
        p.index_copy_(0, rows, t)
        return p.view(B, L, H, t.shape[2]).transpose(1, 2)

    o = _sdpa(torch, pad(q), pad(k), pad(v), scale)
    return o.transpose(1, 2).reshape(B * L, H, dv).index_select(0, rows)


def _loop(torch, q, k, v, lengths, scale):
    o = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    a = 0
    for n in lengths:
        o[a:a + n] = _sdpa(torch, *(t[a:a + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v)), scale)[0].transpose(0, 1)
        a += n
    return o


_IMPL = {"cudnn_varlen": _cudnn_varlen, "flash_varlen": _flash_varlen, "dense": _dense, "loop": _loop}


def prefill_attention(q, k, v, lengths: Sequence[int], scale: float, backend: str = "auto"):
    """Causal attention within each of the packed requests.

    ``q [T, H, Dqk]``, ``k [T, H, Dqk]``, ``v [T, H, Dv]``: bf16 (or fp16) CUDA tensors on one GPU, the requests'
    tokens back to back (last dim contiguous; other strides free); ``lengths``: the requests' token counts (host
    ints, each >= 1, summing to ``T``); ``scale``: the softmax scale. Returns a new ``[T, H, Dv]`` tensor of q's
    dtype, computed on the caller's current stream. Not collective.

    ``backend``: one of ``BACKENDS``, or ``auto`` (the order of ``backend_order()``, the varlen kernels skipped for
    float32; a backend that raises on these head dims and dtype is skipped from then on, with one warning naming the
    error). An explicit backend's error propagates."""
    import torch

    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [T, H, Dqk] and v [T, H, Dv] with equal T and H, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    lengths = check_lengths(lengths, q.shape[0])
    if backend != "auto":
        if backend not in _IMPL:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        return _IMPL[backend](torch, q, k, v, lengths, scale)
    order = backend_order()
    if q.dtype not in (torch.bfloat16, torch.float16):  # the fused kernels are half-precision only
        order = tuple(b for b in order if b not in ("cudnn_varlen", "flash_varlen")) or ("dense",)
    for name in order:
        key = (name, q.shape[2], v.shape[2], q.dtype)
        if key in _refused:
            continue
        try:
            return _IMPL[name](torch, q, k, v, lengths, scale)
        except (RuntimeError, NotImplementedError) as e:
            if name == order[-1]:
                raise
            _refused[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            warnings.warn(f"prefill attention: backend {name} refused head dims {q.shape[2]}/{v.shape[2]} "
                          f"{q.dtype} ({_refused[key]}); using the next of {order}", RuntimeWarning, stacklevel=2)
    return _loop(torch, q, k, v, lengths, scale)
