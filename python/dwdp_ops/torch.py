"""PyTorch custom ops over dwdp_ops (``torch.library``, namespace ``dwdp``), so that an engine's MoE layer is made of
ops PyTorch can trace (``torch.compile(fullgraph=True)``: every op has a fake implementation) and capture
(``torch.cuda.graph``), with plain ``torch.Tensor`` arguments instead of CuPy arrays and DLPack.

Library objects (a ``PrefetchScheduler``, a ``TokenDispatcher``) cannot be op arguments: ``handle(obj)`` registers
one in this process and returns an int the ops take; ``release_handle`` forgets it. Host-side step logic stays
outside the traced region: call ``scheduler.begin_step(tokens=T)`` (which may run the per-step all-gather of
``auto``) before the compiled layer stack, as an engine calls its own scheduler.

Ops (all enqueue on PyTorch's current stream; none synchronises the host):

``dwdp::expert_mlp(Tensor x_grouped, Tensor offs, Tensor w13, Tensor w2, Tensor? s13, Tensor? s2) -> Tensor``
    The grouped SwiGLU expert MLP: ``x_grouped [R, H]`` bf16 rows grouped by expert, groups ending at
    ``offs [G]`` int32 (multiples of 16), ``w13 [G, 2I, H]`` / ``w2 [G, H, I]`` bf16, or float8_e4m3fn with
    rowwise scales ``s13 [G, 2I]`` / ``s2 [G, H]`` float32 -> ``[R, H]`` bf16, returned. Pure.
``dwdp::wait(Tensor(a!) w13, Tensor(b!) w2, int sched, int layer, Tensor? ids) -> ()``
    Before layer ``layer``'s MoE: makes the layer's composite views (``w13``, ``w2``: the store's ``[E, ...]``
    views of that layer, which it writes) hold every expert the step needs: waits for the prefetch
    (``prefetch_all``) or fetches the experts named by the router's ``ids`` (``on_demand``, int32, any shape).
    Declared as mutating the views, so that it orders before their readers and is never dropped.
``dwdp::release(Tensor(a!) w13, Tensor moe_out, int sched, int layer) -> ()``
    After the layer's expert kernels (``moe_out``: their output, so the op orders after them): hands the slot back
    (the prefetch of layer + 2 may overwrite it). Declared as mutating ``w13`` for the same reasons.
``dwdp::dispatch(Tensor x, Tensor topk_ids, Tensor topk_weights, int disp, int max_rows) -> (Tensor, Tensor)``
    DEP: ``x [T, H]`` bf16, ``topk_ids [T, k]`` int32/int64, ``topk_weights [T, k]`` float32 -> ``(x_grouped
    [max_rows, H] bf16, offs [L] int32)``: views of the dispatcher's own buffers, valid until its next dispatch
    (not fresh memory: read them before the layer's combine, as the MoE layer does). ``max_rows``: the step's row
    bound (``TokenDispatcher.rows_for``; -1 for the capacity). Collective: every rank calls it for the layer.
``dwdp::combine(Tensor y_grouped, Tensor x, int disp) -> Tensor``
    The weighted expert outputs back to their tokens: ``y_grouped [rows, H]`` bf16 (in the dispatch's row order),
    ``x`` the dispatch's ``[T, H]`` input (for the output's shape; not read) -> ``[T, H]`` bf16, returned.
    Collective.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import torch

from .errors import DwdpError

__all__ = ["handle", "release_handle", "lookup"]

_REGISTRY: dict[int, Any] = {}
_NEXT = itertools.count(1)
_LOCK = threading.Lock()


def handle(obj: Any) -> int:
    """Registers ``obj`` (a ``PrefetchScheduler`` or ``TokenDispatcher``) for the ops of this module; returns its
    handle (the same object always gets the same handle)."""
    with _LOCK:
        for h, o in _REGISTRY.items():
            if o is obj:
                return h
        h = next(_NEXT)
        _REGISTRY[h] = obj
        return h


def release_handle(h: int) -> None:
    """Forgets a handle (the ops raise for it afterwards)."""
    with _LOCK:
        _REGISTRY.pop(int(h), None)


def lookup(h: int, kind: str | None = None) -> Any:
    """The object behind handle ``h``; a DwdpError names a stale handle or one of the wrong kind."""
    obj = _REGISTRY.get(int(h))
    if obj is None:
        raise DwdpError(f"dwdp op: handle {h} is not registered (dwdp_ops.torch.handle(obj) gives one)")
    if kind is not None and type(obj).__name__ != kind:
        raise DwdpError(f"dwdp op: handle {h} is a {type(obj).__name__}, this op needs a {kind}")
    return obj


def _stream():
    return torch.cuda.current_stream()


# -- expert MLP ------------------------------------------------------------------------------------------------------
@torch.library.custom_op("dwdp::expert_mlp", mutates_args=())
def expert_mlp(x_grouped: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               s13: torch.Tensor | None = None, s2: torch.Tensor | None = None) -> torch.Tensor:
    inter = w2.shape[-1]
    if s13 is not None:
        from .models.deepseek_r1.fp8 import grouped_swiglu_fp8

        return grouped_swiglu_fp8(x_grouped, offs, w13, w2, s13, s2, inter)
    h = torch._grouped_mm(x_grouped, w13.transpose(-2, -1), offs=offs)
    a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    return torch._grouped_mm(a, w2.transpose(-2, -1), offs=offs)


@expert_mlp.register_fake
def _(x_grouped, offs, w13, w2, s13=None, s2=None):
    _check_mlp(x_grouped, offs, w13, w2, s13, s2)
    return x_grouped.new_empty((x_grouped.shape[0], w2.shape[1]), dtype=torch.bfloat16)


def _check_mlp(x, offs, w13, w2, s13, s2) -> None:
    G = w13.shape[0]
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or w2.shape[0] != G or offs.shape != (G,):
        raise ValueError(f"expert_mlp: x [R, H], offs [G], w13 [G, 2I, H], w2 [G, H, I]; got x {list(x.shape)}, offs "
                         f"{list(offs.shape)}, w13 {list(w13.shape)}, w2 {list(w2.shape)}")
    H, I2 = x.shape[1], w13.shape[1]
    if w13.shape[2] != H or w2.shape[1] != H or I2 != 2 * w2.shape[2]:
        raise ValueError(f"expert_mlp: w13 must be [G, 2I, {H}] and w2 [G, {H}, I], got {list(w13.shape)} and "
                         f"{list(w2.shape)}")
    if (s13 is None) != (s2 is None) or (s13 is not None and (s13.shape != (G, I2) or s2.shape != (G, H))):
        raise ValueError("expert_mlp: fp8 weights need both row scales, s13 [G, 2I] and s2 [G, H]; bf16 neither")


# -- weights: wait / release -----------------------------------------------------------------------------------------
@torch.library.custom_op("dwdp::wait", mutates_args=("w13", "w2"))
def wait(w13: torch.Tensor, w2: torch.Tensor, sched: int, layer: int, ids: torch.Tensor | None = None) -> None:
    s = lookup(sched, "PrefetchScheduler")
    if s.step_policy == "on_demand":
        if ids is None:
            raise ValueError(f"dwdp::wait({layer}): the on_demand step needs the router's ids")
        s.wait(layer, _stream(), ids=ids.reshape(-1).to(torch.int32).contiguous())
    else:
        s.wait(layer, _stream())


@wait.register_fake
def _(w13, w2, sched, layer, ids=None):
    return None


@torch.library.custom_op("dwdp::release", mutates_args=("w13",))
def release(w13: torch.Tensor, moe_out: torch.Tensor, sched: int, layer: int) -> None:
    lookup(sched, "PrefetchScheduler").release(layer, _stream())


@release.register_fake
def _(w13, moe_out, sched, layer):
    return None


# -- tokens: dispatch / combine --------------------------------------------------------------------------------------
_PENDING: dict[int, Any] = {}  # dispatcher handle -> the DispatchHandle of its latest dispatch


@torch.library.custom_op("dwdp::dispatch", mutates_args=())
def dispatch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, disp: int,
             max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = lookup(disp, "TokenDispatcher")
    h = d.dispatch(x, topk_ids, topk_weights, _stream(), max_rows=None if max_rows < 0 else max_rows)
    _PENDING[disp] = h
    xg, offs = h.torch()
    return xg, offs


@dispatch.register_fake
def _(x, topk_ids, topk_weights, disp, max_rows):
    d = lookup(disp, "TokenDispatcher")
    rows = d.max_pairs if max_rows < 0 else max_rows
    return (x.new_empty((rows, x.shape[1]), dtype=torch.bfloat16),
            x.new_empty((d.partition.experts_per_rank,), dtype=torch.int32))


@torch.library.custom_op("dwdp::combine", mutates_args=())
def combine(y_grouped: torch.Tensor, x: torch.Tensor, disp: int) -> torch.Tensor:
    d = lookup(disp, "TokenDispatcher")
    h = _PENDING.pop(disp, None)
    if h is None:
        raise DwdpError(f"dwdp::combine: dispatcher {disp} has no dispatch to combine")
    out = torch.empty((h.num_tokens, d.hidden), dtype=torch.bfloat16, device=y_grouped.device)
    d.combine(y_grouped, h, out=out, stream=_stream())
    return out


@combine.register_fake
def _(y_grouped, x, disp):
    return x.new_empty((x.shape[0], y_grouped.shape[1]), dtype=torch.bfloat16)
