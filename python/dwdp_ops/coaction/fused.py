"""The fused CUDA co-action op (``_C.coaction_forward`` / ``_C.coaction_backward``) for CuPy arrays, with the same
semantics as ``reference``.

Rows can come gathered (``induction [B, D']``, ``feed [B, T, D]``) or straight from the tables
(``induction [rows, D']`` with ``ind_ids [B]``, ``feed [rows, D]`` with ``feed_ids [B, T]``, int64): the kernel reads
each sample's induction row once into shared memory and the feed rows as it goes, so no per-sample weight matrix and
no ``[B, T, ...]`` intermediate is ever written. ``dtype`` is ``float32`` or ``bfloat16`` (stored as uint16 bits, as
CuPy has no bf16); the output has the input's storage dtype, gradients are float32. With table inputs the gradients
are table-shaped and accumulated atomically (repeated ids add up).

Limits: 1-8 layers, layer widths up to 256, orders up to 8, and the induction row plus 128 threads' activations
within 227 KiB of shared memory; beyond them a ValueError says which. T and B are unbounded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._native import native
from ..interop import device_buffer, stream_handle
from .reference import CoActionSpec

_DT = {"float32": (np.dtype(np.float32), 0), "bfloat16": (np.dtype(np.uint16), 1)}


def _args(spec: CoActionSpec, induction, feed, mask, ind_ids, feed_ids, dtype):
    if dtype not in _DT:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    storage, code = _DT[dtype]
    ind, fd, mk = device_buffer(induction, "induction"), device_buffer(feed, "feed"), device_buffer(mask, "mask")
    for name, buf in (("induction", ind), ("feed", fd)):
        if buf.dtype != storage:
            raise TypeError(f"{name} must hold {dtype} ({storage}), got {buf.dtype}")
        if not buf.contiguous:
            raise ValueError(f"{name} must be contiguous")
    if mk.dtype != np.float32 or len(mk.shape) != 2 or not mk.contiguous:
        raise TypeError(f"mask must be a contiguous float32 [B, T] array, got {mk.dtype} {list(mk.shape)}")
    B, T = mk.shape
    if len(ind.shape) != 2 or ind.shape[1] != spec.induction_dim:
        raise ValueError(f"induction rows must hold D' = {spec.induction_dim} values, got shape {list(ind.shape)}")
    ids_ptr = 0
    if ind_ids is not None:
        ib = device_buffer(ind_ids, "ind_ids")
        if ib.dtype != np.int64 or ib.shape != (B,):
            raise TypeError(f"ind_ids must be int64 [{B}], got {ib.dtype} {list(ib.shape)}")
        ids_ptr = ib.ptr
    elif ind.shape[0] != B:
        raise ValueError(f"induction has {ind.shape[0]} rows but the mask has batch {B}")
    fids_ptr = 0
    if feed_ids is not None:
        fb = device_buffer(feed_ids, "feed_ids")
        if fb.dtype != np.int64 or fb.shape != (B, T):
            raise TypeError(f"feed_ids must be int64 [{B}, {T}], got {fb.dtype} {list(fb.shape)}")
        if len(fd.shape) != 2 or fd.shape[1] != spec.feed_dim:
            raise ValueError(f"the feed table must be [rows, {spec.feed_dim}], got {list(fd.shape)}")
        fids_ptr = fb.ptr
    elif fd.shape != (B, T, spec.feed_dim):
        raise ValueError(f"feed must be [B, T, D] = {[B, T, spec.feed_dim]}, got {list(fd.shape)}")
    din = [i for i, _ in spec.layer_dims]
    dout = [o for _, o in spec.layer_dims]
    geo = (din, dout, spec.orders, spec.bias, spec.order_independent, spec.variant == "paper", code, B, T)
    return geo, ind, fd, mk, ids_ptr, fids_ptr, storage


def _check_ids(ids, rows: int, what: str) -> None:
    if ids is not None and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        raise ValueError(f"{what} must be in [0, {rows}) (the table's rows)")


def coaction_forward_gpu(induction: Any, feed: Any, mask: Any, spec: CoActionSpec | None = None, *, ind_ids=None,
                         feed_ids=None, dtype: str = "float32", stream: Any = None, check_ids: bool = True):
    """Fused forward; returns a CuPy ``[B, spec.out_dim]`` array of the input storage dtype. ``check_ids``
    validates table ids on the device first (one host synchronisation)."""
    import cupy as cp

    spec = spec or CoActionSpec()
    geo, ind, fd, mk, ip, fp, storage = _args(spec, induction, feed, mask, ind_ids, feed_ids, dtype)
    if check_ids:
        _check_ids(ind_ids, ind.shape[0], "ind_ids")
        _check_ids(feed_ids, fd.shape[0], "feed_ids")
    out = cp.empty((geo[7], spec.out_dim), dtype=storage)
    native().coaction_forward(*geo, ind.ptr, ip, fd.ptr, fp, mk.ptr, out.data.ptr, stream_handle(stream))
    return out


def coaction_backward_gpu(induction: Any, feed: Any, mask: Any, grad_out: Any, spec: CoActionSpec | None = None, *,
                          ind_ids=None, feed_ids=None, dtype: str = "float32", stream: Any = None, check_ids: bool = True):
    """Fused backward; returns float32 ``(grad_induction, grad_feed)`` shaped like ``induction`` and ``feed``
    (table-shaped when ids are given)."""
    import cupy as cp

    spec = spec or CoActionSpec()
    geo, ind, fd, mk, ip, fp, _ = _args(spec, induction, feed, mask, ind_ids, feed_ids, dtype)
    if check_ids:
        _check_ids(ind_ids, ind.shape[0], "ind_ids")
        _check_ids(feed_ids, fd.shape[0], "feed_ids")
    g = device_buffer(grad_out, "grad_out")
    if g.dtype != np.float32 or g.shape != (geo[7], spec.out_dim) or not g.contiguous:
        raise TypeError(f"grad_out must be a contiguous float32 [{geo[7]}, {spec.out_dim}] array, got {g.dtype} {list(g.shape)}")
    g_ind = cp.zeros(ind.shape, cp.float32)
    g_feed = cp.zeros(fd.shape, cp.float32)
    native().coaction_backward(*geo, ind.ptr, ip, fd.ptr, fp, mk.ptr, g.ptr, g_ind.data.ptr, g_feed.data.ptr,
                               stream_handle(stream))
    return g_ind, g_feed
