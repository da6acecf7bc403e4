"""PyTorch custom ops over dwdp_ops (``torch.library``, namespace ``dwdp``), so that an engine's MoE layer is made of
ops PyTorch can trace (``torch.compile(fullgraph=True)``: every op has a fake implementation) and capture
(``torch.cuda.graph``), with plain ``torch.Tensor`` arguments instead of CuPy arrays and DLPack.

Library objects (a ``PrefetchScheduler``, a ``TokenDispatcher``) cannot be op arguments: ``handle(obj)`` registers
one in this process and returns an int the ops take; ``release_handle`` forgets it. Host-side step logic stays
outside the traced region: call ``scheduler.begin_step(tokens=T)`` (which may run the per-step all-gather of
``auto``) before the compiled layer stack, as an engine calls its own scheduler.

Ops (all enqueue on PyTorch's current stream of their tensors' device, not the current device's; none synchronises
the host; each refuses, by name, tensors on another device than the rest or than its scheduler's / dispatcher's GPU):

``dwdp::expert_mlp(Tensor x_grouped, Tensor offs, Tensor w13, Tensor w2, Tensor? s13, Tensor? s2) -> Tensor``
    The grouped SwiGLU expert MLP: ``x_grouped [R, H]`` bf16 rows grouped by expert, group g in rows
    ``[offs[g-1], offs[g])`` of ``offs [G]`` int32 (non-decreasing group ends; rows past ``offs[-1]`` are not
    meaningful), ``w13 [G, 2I, H]`` / ``w2 [G, H, I]`` bf16 without scales, or float8_e4m3fn with rowwise scales
    ``s13 [G, 2I]`` / ``s2 [G, H]`` float32 -> ``[R, H]`` bf16, returned; all on one device. Pure; inference only
    (no autograd formula: inputs that require grad run forward, and a backward through the op raises PyTorch's "no
    autograd formula was registered"; run it under ``torch.no_grad()`` / ``torch.inference_mode()``). Group ends:
    bf16 takes any (unaligned groups run on GPUs: ``tests/test_gpu_deepseek.py``, ``align=1``); fp8 takes groups
    that start on multiples of 16 rows, the layout ``fp8.grouped_swiglu_fp8`` states and the only one tested
    (``models.routed`` and ``TokenDispatcher`` pad groups to 16 rows). The op reads no tensor on the host (it must
    stay capturable), so ``offs``'s values are the caller's contract, not checked; shapes, dtypes and devices are,
    in the op and its fake alike (``TypeError`` for a dtype, ``ValueError`` for a shape, a missing scale or a
    device). Local (no communication).
``dwdp::wait(Tensor(a!) w13, Tensor(b!) w2, int sched, int layer, Tensor? ids) -> ()``
    Before layer ``layer``'s MoE: makes the layer's composite views (``w13``, ``w2``: the store's ``[E, ...]``
    views of that layer, which it writes) hold every expert the step needs: waits for the prefetch
    (``prefetch_all``) or fetches the experts named by the router's ``ids`` (``on_demand``; any shape, an integer
    dtype: a float or bool tensor is refused with a ``TypeError``, as the router's weights passed by mistake would
    otherwise name expert 0). Ids on the GPU are narrowed to int32 on the device with values outside int32 clamped
    to ``-1`` / ``2**31 - 1``, out of every store's range, so that the fetch kernel skips them and
    ``store.nvshmem.check_errors()`` reports them (no host synchronisation; a plain cast would wrap ``2**32 + 3`` to
    expert 3); ids on the CPU are range-checked on the host (``ValueError``). Declared as mutating the views, so
    that it orders before their readers and is never dropped. Local (the fetches are one-sided; no other rank takes
    part). Raises ``DwdpError`` for a stale handle or one that is not a scheduler's, ``ValueError`` for views / ids
    on different devices or off the scheduler's GPU and for an ``on_demand`` step without ids, and the scheduler's
    protocol errors (``RuntimeError``).
``dwdp::release(Tensor(a!) w13, Tensor moe_out, int sched, int layer) -> ()``
    After the layer's expert kernels (``moe_out``: their output, so the op orders after them): hands the slot back
    (the prefetch of layer + 2 may overwrite it). Declared as mutating ``w13`` for the same reasons. Local. Raises as
    ``wait`` for the handle and the devices, and the scheduler's protocol errors (``RuntimeError``).
``dwdp::dispatch(Tensor x, Tensor topk_ids, Tensor topk_weights, int disp, int max_rows) -> (Tensor, Tensor)``
    DEP: ``x [T, H]`` bf16, ``topk_ids [T, k]`` int32/int64, ``topk_weights [T, k]`` float32 -> ``(x_grouped
    [max_rows, H] bf16, offs [L] int32)``: views of the dispatcher's own buffers, valid until its next dispatch
    (not fresh memory: read them before the layer's combine, as the MoE layer does). ``max_rows``: the step's row
    bound (``TokenDispatcher.rows_for``; -1 for the capacity). Collective: every rank calls it for the layer, in
    the same order. Raises ``TypeError`` for a dtype and for ids / weights that are not contiguous ``[T, k]`` (a
    wrong shape included), ``ValueError`` for a non-contiguous or wrongly shaped ``x``, more than ``max_tokens``
    tokens, a ``max_rows`` that is 0, below -1 or above ``max_pairs``, or tensors off the dispatcher's GPU,
    ``DwdpError`` for a stale handle or a dispatch not combined yet.
``dwdp::combine(Tensor y_grouped, Tensor x, int disp) -> Tensor``
    The weighted expert outputs back to their tokens: ``y_grouped [rows, H]`` bf16 (in the dispatch's row order),
    ``x`` the dispatch's ``[T, H]`` input (for the output's shape; not read; another shape is a ``ValueError``) ->
    ``[T, H]`` bf16, returned (new, on the current stream of ``y_grouped``'s device). Collective. A combine that
    raised leaves the dispatch pending (it can be retried). Raises ``DwdpError`` without a pending dispatch (or for a
    stale handle), ``TypeError`` for a ``y_grouped`` that is not a contiguous bf16 ``[rows, H]``, ``ValueError`` for
    fewer rows than the dispatch's, another ``x`` shape or tensors off the dispatcher's GPU.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import torch

from ._checks import is_int
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


def _as_handle(h: Any) -> int:
    """``h`` as an int handle: a TypeError for a bool, float or string (``int()`` had made 1.5, True and '1' handle
    1, another object's). A ``torch.SymInt`` (an int argument a trace made symbolic) is taken as before."""
    if not is_int(h) and not isinstance(h, torch.SymInt):
        raise TypeError(f"dwdp op: handle must be an int (dwdp_ops.torch.handle(obj) gives one), got {h!r} "
                        f"({type(h).__name__})")
    return int(h)


def release_handle(h: int) -> None:
    """Forgets a handle (the ops raise for it afterwards), and its dispatch not yet combined (its buffers' views).
    A handle that is not an int raises TypeError."""
    h = _as_handle(h)
    with _LOCK:
        _REGISTRY.pop(h, None)
        _PENDING.pop(h, None)


def lookup(h: int, kind: str | None = None) -> Any:
    """The object behind handle ``h``; a DwdpError names a stale handle or one of the wrong kind (``kind``: a class
    name, matched against the object's class and its bases, so that a subclass is of its base's kind); a TypeError a
    handle that is not an int."""
    obj = _REGISTRY.get(_as_handle(h))
    if obj is None:
        raise DwdpError(f"dwdp op: handle {h} is not registered (dwdp_ops.torch.handle(obj) gives one)")
    if kind is not None and type(obj).__name__ != kind and all(c.__name__ != kind for c in type(obj).__mro__):
        raise DwdpError(f"dwdp op: handle {h} is a {type(obj).__name__}, this op needs a {kind}")
    return obj


def _stream(op: str, name: str, t: torch.Tensor):
    """PyTorch's current stream on ``t``'s device (``torch.cuda.current_stream(t.device)``), where the op's kernels
    and its library calls are enqueued: not the current device's stream, which with ``t`` on cuda:1 and cuda:0
    current would order nothing the op touches. A ValueError names ``t`` (``name``) when it is not on a GPU."""
    if t.device.type != "cuda":
        raise ValueError(f"{op}: {name} must be a CUDA tensor (the op runs on its device's current stream), got "
                         f"{name} on {t.device}")
    return torch.cuda.current_stream(t.device)


def _home_device(obj: Any) -> int | None:
    """The CUDA device index of a library object where it names one (a scheduler's ``store.device``, a dispatcher's
    ``rt.device``); None for a stand-in without one."""
    for owner in ("store", "rt"):
        dev = getattr(getattr(obj, owner, None), "device", None)
        if isinstance(dev, int) and not isinstance(dev, bool) and dev >= 0:
            return dev
    return None


def _check_devices(op: str, home: int | None, **tensors: torch.Tensor | None) -> None:
    """Raises ValueError, naming every tensor's device, when the given tensors (None: absent) are not all on one
    device, or not on CUDA device ``home`` where it is known (the library object's GPU)."""
    given = {n: t for n, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        raise ValueError(f"{op}: every tensor must be on one device, got {_where(given)}")
    if home is not None and devices and devices != {torch.device("cuda", home)}:
        raise ValueError(f"{op}: the tensors must be on the library object's GPU, cuda:{home}, got {_where(given)}")


def _where(given: dict) -> str:
    return ", ".join(f"{n} on {t.device}" for n, t in given.items())


# -- expert MLP ------------------------------------------------------------------------------------------------------
@torch.library.custom_op("dwdp::expert_mlp", mutates_args=())
def expert_mlp(x_grouped: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               s13: torch.Tensor | None = None, s2: torch.Tensor | None = None) -> torch.Tensor:
    _check_mlp(x_grouped, offs, w13, w2, s13, s2)  # (as the fake does: an eager call refuses what a trace refuses)
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
    """The argument checks of ``dwdp::expert_mlp`` (module docstring), run by the op and by its fake: shapes, the
    weights' dtype, the scales, the other dtypes, then the devices. Reads attributes only (no tensor data: nothing
    synchronises, capture is unaffected), so it also takes CPU, meta and fake tensors."""
    G = w13.shape[0] if w13.dim() else -1
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or w2.shape[0] != G or offs.shape != (G,):
        raise ValueError(f"expert_mlp: x [R, H], offs [G], w13 [G, 2I, H], w2 [G, H, I]; got x {list(x.shape)}, offs "
                         f"{list(offs.shape)}, w13 {list(w13.shape)}, w2 {list(w2.shape)}")
    H, I2 = x.shape[1], w13.shape[1]
    if w13.shape[2] != H or w2.shape[1] != H or I2 != 2 * w2.shape[2]:
        raise ValueError(f"expert_mlp: w13 must be [G, 2I, {H}] and w2 [G, {H}, I], got {list(w13.shape)} and "
                         f"{list(w2.shape)}")
    if w13.dtype not in (torch.bfloat16, torch.float8_e4m3fn) or w2.dtype != w13.dtype:
        raise TypeError(f"expert_mlp: w13 and w2 must both be bfloat16, or both float8_e4m3fn with row scales; got "
                        f"{w13.dtype} and {w2.dtype}")
    fp8 = w13.dtype == torch.float8_e4m3fn
    if ((s13 is None) != (s2 is None) or (s13 is not None) != fp8
            or (s13 is not None and (s13.shape != (G, I2) or s2.shape != (G, H)))):
        raise ValueError(f"expert_mlp: fp8 weights need both row scales, s13 [G, 2I] = {[G, I2]} and s2 [G, H] = "
                         f"{[G, H]}; bf16 neither; got {w13.dtype} weights with s13 {_desc(s13)} and s2 {_desc(s2)}")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"expert_mlp: x_grouped must be bfloat16, got {x.dtype}")
    if offs.dtype != torch.int32:
        raise TypeError(f"expert_mlp: offs must be int32 (the groups' cumulative ends), got {offs.dtype}")
    if fp8 and (s13.dtype != torch.float32 or s2.dtype != torch.float32):
        raise TypeError(f"expert_mlp: the row scales s13 and s2 must be float32, got {s13.dtype} and {s2.dtype}")
    _check_devices("expert_mlp", None, x_grouped=x, offs=offs, w13=w13, w2=w2, s13=s13, s2=s2)


def _desc(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{t.dtype} {list(t.shape)}"


# -- weights: wait / release -----------------------------------------------------------------------------------------
_INT32_MAX = 2**31 - 1


def _check_ids_dtype(layer: int, ids: torch.Tensor | None) -> None:
    if ids is not None and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
        raise TypeError(f"dwdp::wait({layer}): ids must be the router's integer expert ids (its top-k indices), got "
                        f"{ids.dtype}")


def _expert_ids(layer: int, ids: torch.Tensor, num_experts: int | None) -> torch.Tensor:
    """``ids`` (any shape, an integer dtype) as the contiguous 1-D int32 list the store's fetch takes. On the CPU:
    range-checked here (ValueError; against ``[0, num_experts)`` where known). On the GPU: no host read (the op must
    not synchronise); a dtype wider than int32 is clamped to ``[-1, 2**31 - 1]`` on the device before the cast, so that
    a value outside int32 becomes an id outside every store's range (the fetch kernel skips it and
    ``store.nvshmem.check_errors()`` reports it) instead of wrapping onto a real expert."""
    flat = ids.reshape(-1)
    if not ids.is_cuda:
        if flat.numel():
            bound = num_experts if num_experts is not None else _INT32_MAX + 1
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= bound:
                raise ValueError(f"dwdp::wait({layer}): expert id {lo if lo < 0 else hi} is outside [0, {bound})")
        return flat.to(torch.int32).contiguous()
    if ids.dtype not in (torch.int32, torch.int16, torch.int8, torch.uint8):
        if ids.dtype != torch.int64:
            flat = flat.to(torch.int64)  # (unsigned 32/64-bit: clamp is defined on int64)
        flat = flat.clamp(-1, _INT32_MAX)
    return flat.to(torch.int32).contiguous()


@torch.library.custom_op("dwdp::wait", mutates_args=("w13", "w2"))
def wait(w13: torch.Tensor, w2: torch.Tensor, sched: int, layer: int, ids: torch.Tensor | None = None) -> None:
    s = _check_wait(w13, w2, sched, layer, ids)
    stream = _stream(f"dwdp::wait({layer})", "w13", w13)
    if s.step_policy == "on_demand":
        if ids is None:
            raise ValueError(f"dwdp::wait({layer}): the on_demand step needs the router's ids")
        store = getattr(s, "store", None)
        s.wait(layer, stream, ids=_expert_ids(layer, ids, getattr(store, "E", None)))
    else:
        s.wait(layer, stream)


def _check_wait(w13, w2, sched, layer, ids) -> Any:
    """The checks of ``dwdp::wait`` run by the op and by its fake (which had checked the ids' dtype only, so that a
    trace accepted a stale handle, a handle of a dispatcher, or views on another GPU than the scheduler's, all of
    which the op refuses): the handle, the ids' dtype, the devices. Returns the scheduler."""
    s = lookup(sched, "PrefetchScheduler")
    _check_ids_dtype(layer, ids)
    # (ids may be a host list, range-checked by _expert_ids; ids on a GPU must be on the views' device)
    _check_devices(f"dwdp::wait({layer})", _home_device(s), w13=w13, w2=w2,
                   ids=ids if ids is not None and ids.is_cuda else None)
    return s


@wait.register_fake
def _(w13, w2, sched, layer, ids=None):
    _check_wait(w13, w2, sched, layer, ids)
    return None


def _check_release(w13, moe_out, sched, layer) -> Any:
    """The checks of ``dwdp::release``, run by the op and by its fake (which had checked nothing): the handle, the
    devices. Returns the scheduler."""
    s = lookup(sched, "PrefetchScheduler")
    _check_devices(f"dwdp::release({layer})", _home_device(s), w13=w13, moe_out=moe_out)
    return s


@torch.library.custom_op("dwdp::release", mutates_args=("w13",))
def release(w13: torch.Tensor, moe_out: torch.Tensor, sched: int, layer: int) -> None:
    s = _check_release(w13, moe_out, sched, layer)
    s.release(layer, _stream(f"dwdp::release({layer})", "w13", w13))


@release.register_fake
def _(w13, moe_out, sched, layer):
    _check_release(w13, moe_out, sched, layer)
    return None


# -- tokens: dispatch / combine --------------------------------------------------------------------------------------
_PENDING: dict[int, Any] = {}  # dispatcher handle -> the DispatchHandle of its latest dispatch


@torch.library.custom_op("dwdp::dispatch", mutates_args=())
def dispatch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, disp: int,
             max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = lookup(disp, "TokenDispatcher")
    _check_dispatch(d, x, topk_ids, topk_weights, max_rows)
    _check_devices("dwdp::dispatch", _home_device(d), x=x, topk_ids=topk_ids, topk_weights=topk_weights)
    h = d.dispatch(x, topk_ids, topk_weights, _stream("dwdp::dispatch", "x", x),
                   max_rows=None if max_rows < 0 else max_rows)
    _PENDING[disp] = h
    xg, offs = h.torch()
    return xg, offs


def _check_max_rows(max_rows: int) -> None:
    """-1 (the capacity) or a row bound >= 1 (the dispatcher checks it against its capacity); any other negative
    value had been taken as -1."""
    if max_rows < -1 or max_rows == 0:
        raise ValueError(f"dwdp::dispatch: max_rows must be -1 (the capacity) or a row bound >= 1, got {max_rows}")


def _check_dispatch(d: Any, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, max_rows: int) -> None:
    """The argument checks of ``dwdp::dispatch``, run by the op and by its fake (which had checked only max_rows, and
    returned ``[max_rows, x's H]`` for what the dispatcher refuses: max_rows above max_pairs, x of another hidden
    size or dtype, ids / weights of another dtype or shape): the dispatcher's own checks (``TokenDispatcher``), with
    its exception types, on attributes only (no tensor data)."""
    _check_max_rows(max_rows)
    if max_rows > d.max_pairs:
        raise ValueError(f"dwdp::dispatch: max_rows must be -1 (the capacity) or in [1, max_pairs = {d.max_pairs}], "
                         f"got {max_rows}")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"dwdp::dispatch: x must be bfloat16, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != d.hidden or not x.is_contiguous():
        raise ValueError(f"dwdp::dispatch: x must be a contiguous [T, {d.hidden}] bf16 tensor, got shape "
                         f"{list(x.shape)}")
    T = x.shape[0]
    if T > d.max_tokens:
        raise ValueError(f"dwdp::dispatch: {T} tokens exceed the dispatcher's max_tokens = {d.max_tokens}")
    if ids.dtype not in (torch.int32, torch.int64) or tuple(ids.shape) != (T, d.top_k) or not ids.is_contiguous():
        raise TypeError(f"dwdp::dispatch: topk_ids must be a contiguous int32/int64 [{T}, {d.top_k}] tensor, got "
                        f"{ids.dtype} {list(ids.shape)}")
    if w.dtype != torch.float32 or tuple(w.shape) != (T, d.top_k) or not w.is_contiguous():
        raise TypeError(f"dwdp::dispatch: topk_weights must be a contiguous float32 [{T}, {d.top_k}] tensor, got "
                        f"{w.dtype} {list(w.shape)}")


@dispatch.register_fake
def _(x, topk_ids, topk_weights, disp, max_rows):
    d = lookup(disp, "TokenDispatcher")
    _check_dispatch(d, x, topk_ids, topk_weights, max_rows)
    _check_devices("dwdp::dispatch", _home_device(d), x=x, topk_ids=topk_ids, topk_weights=topk_weights)
    rows = d.max_pairs if max_rows < 0 else max_rows
    return (x.new_empty((rows, x.shape[1]), dtype=torch.bfloat16),
            x.new_empty((d.partition.experts_per_rank,), dtype=torch.int32))


@torch.library.custom_op("dwdp::combine", mutates_args=())
def combine(y_grouped: torch.Tensor, x: torch.Tensor, disp: int) -> torch.Tensor:
    d = lookup(disp, "TokenDispatcher")
    h = _PENDING.get(disp)
    if h is None:
        raise DwdpError(f"dwdp::combine: dispatcher {disp} has no dispatch to combine")
    if tuple(x.shape) != (h.num_tokens, d.hidden):
        # (the fake gives the output x's rows: a traced graph and the eager op agree only for the dispatch's input)
        raise ValueError(f"dwdp::combine: x must be the dispatch's input, [T, H] = [{h.num_tokens}, {d.hidden}] (it "
                         f"gives the output's shape), got {list(x.shape)}")
    _check_combine(d, y_grouped, x)
    _check_devices("dwdp::combine", _home_device(d), y_grouped=y_grouped, x=x)
    stream = _stream("dwdp::combine", "y_grouped", y_grouped)
    out = torch.empty((h.num_tokens, d.hidden), dtype=torch.bfloat16, device=y_grouped.device)
    d.combine(y_grouped, h, out=out, stream=stream)
    _PENDING.pop(disp, None)  # only once combined: a combine that raised stays pending, so that it can be retried
    return out


def _check_combine(d: Any, y: torch.Tensor, x: torch.Tensor) -> None:
    """The checks of ``dwdp::combine`` that need no dispatch, run by the op and by its fake (which had returned
    ``[T, y_grouped's width]`` for a y_grouped the dispatcher refuses, and raised IndexError for a 1-D one):
    ``y_grouped`` a contiguous bf16 ``[rows, H]`` (TypeError, as ``TokenDispatcher.combine``), ``x`` a ``[T, H]``
    (ValueError), H the dispatcher's hidden size."""
    if y.dtype != torch.bfloat16 or y.dim() != 2 or y.shape[1] != d.hidden or not y.is_contiguous():
        raise TypeError(f"dwdp::combine: y_grouped must be a contiguous bf16 [rows, {d.hidden}] tensor, got {y.dtype} "
                        f"{list(y.shape)}")
    if x.dim() != 2 or x.shape[1] != d.hidden:
        raise ValueError(f"dwdp::combine: x must be the dispatch's input, [T, {d.hidden}], got {list(x.shape)}")


@combine.register_fake
def _(y_grouped, x, disp):
    d = lookup(disp, "TokenDispatcher")
    _check_combine(d, y_grouped, x)
    _check_devices("dwdp::combine", _home_device(d), y_grouped=y_grouped, x=x)  # (as the op: the fake had not)
    return x.new_empty((x.shape[0], d.hidden), dtype=torch.bfloat16)
