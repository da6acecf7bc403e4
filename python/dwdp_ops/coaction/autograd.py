"""The fused co-action op for PyTorch: a ``torch.autograd.Function`` over ``coaction_forward_gpu`` /
``coaction_backward_gpu``, so a PyTorch CTR model trains with the fused kernels.

``coaction(induction, feed, mask, spec, ind_ids=..., feed_ids=...)`` takes and returns ``torch.Tensor``s on one CUDA
device; the kernels read and write the tensors in place (their addresses, bf16 as its 16-bit pattern), the output and
the gradients are allocated by PyTorch's caching allocator, and everything runs on PyTorch's current stream of that
device (the backward on the stream autograd gives it, the forward's). No DLPack exchange and no CuPy array is made
on this path, and each tensor's attributes are read once a step (``_checked``, then one ``DeviceBuffer`` a tensor,
which both fused ops take as it is): a step's host work is those checks and the two launches
(``bench/coaction_host.py``).
``loss.backward()`` fills ``induction.grad`` and ``feed.grad`` like any PyTorch op would: shaped like the inputs
(table-shaped when ids are given, repeated ids added up) and of the inputs' dtype (the kernels accumulate in float32;
a bf16 input gets its float32 gradient rounded once to bf16). The mask and the ids get no gradient.
When a gradient is needed (grad mode on and ``induction`` or ``feed`` requiring grad), the forward makes the
backward's float32 gradient tensors (``torch.empty``, shaped like ``induction`` and ``feed``: table-sized with ids,
handed to the kernels as ``TableGrads(arrays=...)``) and its kernel zeroes them alongside its work, so they are held
from the forward to the backward, a pair per call (memory a plain backward would allocate only when it runs).

Importing this module needs PyTorch; ``dwdp_ops.coaction`` imports it only when ``coaction`` or
``CoActionFunction`` is first used, so the CuPy ops stay usable without PyTorch.

Not supported here: a ``ShardedTable`` (its row gradients land in the owners' shards, not in a tensor's ``.grad``;
use ``coaction_forward_gpu`` / ``coaction_backward_gpu`` with it) and double backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..errors import CoActionArgumentError
from ..interop import DeviceBuffer, _torch_types, cupy_stream
from .fused import check_flag
from .reference import CoActionSpec

__all__ = ["CoActionFunction", "coaction"]

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
# the library's storage dtype of each tensor dtype (bf16 as its 16-bit pattern), as ``interop.device_buffer`` reads
# tensors (torch is imported here, so ``_torch_types`` has it)
_STORAGE = _torch_types()[1]


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device: torch.device) -> int:
    """PyTorch's current stream on ``device`` as a raw handle. ``torch._C._cuda_getCurrentRawStream`` (what Triton and
    Inductor's generated code call) where it exists: ``torch.cuda.current_stream`` builds a Stream object through
    several Python calls (~10 us a call on the GPU machines' hosts); the public call otherwise."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _buffer(t: Any, device: int) -> Any:
    """A contiguous tensor on CUDA device ``device`` (as ``_checked`` leaves them) as the ``DeviceBuffer`` the fused
    ops take as it is: its attributes read once a step, not again by each op's checks (which still check its dtype
    and shape). Anything else (``CoActionFunction.apply`` called without ``coaction``'s checks) is returned as it is,
    for the fused ops' own checks to refuse by name."""
    if t is None:
        return None
    st = _STORAGE.get(t.dtype)
    if st is None or t.get_device() != device or not t.is_contiguous():
        return t
    return DeviceBuffer(t.data_ptr() if t.numel() else 0, tuple(t.shape), st, None, device)


def _to_torch(a, dtype: torch.dtype) -> torch.Tensor:
    """A tensor sharing CuPy array ``a``'s memory, viewed as ``dtype`` (bf16 from its uint16 bits)."""
    import cupy as cp

    if dtype == torch.bfloat16:
        return torch.from_dlpack(a.view(cp.int16)).view(torch.bfloat16)
    return torch.from_dlpack(a)


def _checked(induction, feed, mask, spec, ind_ids, feed_ids):
    """Validates the tensors' types, dtypes, shapes and devices, in that order (clear messages before any kernel
    runs); returns them contiguous, the ids as int64, the mask as float32, and the kernels' dtype name."""
    from .fused import ShardedTable

    if isinstance(induction, ShardedTable):
        raise TypeError("coaction (the autograd op) does not take a ShardedTable: its row gradients go to the owners' "
                        "shards, not to a tensor's .grad; call coaction_forward_gpu / coaction_backward_gpu with it")
    if not isinstance(spec, CoActionSpec):
        raise TypeError(f"spec must be a CoActionSpec, got {type(spec).__name__}")
    named = {"induction": induction, "feed": feed, "mask": mask}
    if ind_ids is not None:
        named["ind_ids"] = ind_ids
    if feed_ids is not None:
        named["feed_ids"] = feed_ids
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        # (a sparse tensor had reached .contiguous(), PyTorch's 'unsupported memory format' on a GPU, a nested one
        # the shape messages, whose .shape raises)
        if t.is_nested or t.layout is not torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got "
                            f"{'a nested tensor' if t.is_nested else t.layout}")
    if induction.dtype not in _DTYPES:
        raise TypeError(f"induction must be float32 or bfloat16, got {induction.dtype}")
    if feed.dtype != induction.dtype:
        raise TypeError(f"feed must have induction's dtype ({induction.dtype}), got {feed.dtype}")
    if mask.dtype not in (torch.float32, torch.bool):
        raise TypeError(f"mask must be float32 (nonzero where a behaviour is present) or bool, got {mask.dtype}")
    if mask.dim() != 2:
        raise CoActionArgumentError(f"mask must be [B, T], got shape {list(mask.shape)}")
    B, T = mask.shape
    for name, ids in (("ind_ids", ind_ids), ("feed_ids", feed_ids)):
        if ids is not None and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
            raise TypeError(f"{name} must be integer row ids, got {ids.dtype}")
    if induction.dim() != 2 or induction.shape[1] != spec.induction_dim:
        raise CoActionArgumentError(f"induction must be [{'rows' if ind_ids is not None else 'B'}, "
                                    f"D' = {spec.induction_dim}] for {spec}, got shape {list(induction.shape)}")
    if ind_ids is None:
        if induction.shape[0] != B:
            raise CoActionArgumentError(f"induction has {induction.shape[0]} rows but the mask has batch {B} (pass "
                                        "ind_ids to read the rows from a table)")
    elif tuple(ind_ids.shape) != (B,):
        raise CoActionArgumentError(f"ind_ids must be [B] = [{B}], got shape {list(ind_ids.shape)}")
    if feed_ids is None:
        if tuple(feed.shape) != (B, T, spec.feed_dim):
            raise CoActionArgumentError(f"feed must be [B, T, D] = {[B, T, spec.feed_dim]}, got shape "
                                        f"{list(feed.shape)} (pass feed_ids to read the rows from a table)")
    else:
        if feed.dim() != 2 or feed.shape[1] != spec.feed_dim:
            raise CoActionArgumentError(f"with feed_ids the feed table must be [rows, D = {spec.feed_dim}], got shape "
                                        f"{list(feed.shape)}")
        if tuple(feed_ids.shape) != (B, T):
            raise CoActionArgumentError(f"feed_ids must be [B, T] = [{B}, {T}], got shape {list(feed_ids.shape)}")
    dev = induction.device
    if dev.type != "cuda" or any(t.device != dev for t in named.values()):
        where = ", ".join(f"{n} on {t.device}" for n, t in named.items())
        if any(t.device.type != "cuda" for t in named.values()):
            raise ValueError(f"coaction runs the fused CUDA kernels: every tensor must be on a CUDA device, got "
                             f"{where} (move them with .cuda(), or use dwdp_ops.coaction.coaction_forward on numpy "
                             "arrays)")
        raise ValueError(f"coaction needs every tensor on one CUDA device, got {where}")
    # (each conversion only where needed: even a no-op .to() / .contiguous() is a dispatcher call on the step's path)
    if ind_ids is not None and (ind_ids.dtype != torch.int64 or not ind_ids.is_contiguous()):
        ind_ids = ind_ids.to(torch.int64).contiguous()
    if feed_ids is not None and (feed_ids.dtype != torch.int64 or not feed_ids.is_contiguous()):
        feed_ids = feed_ids.to(torch.int64).contiguous()
    if mask.dtype != torch.float32 or not mask.is_contiguous():
        mask = mask.to(torch.float32).contiguous()
    if not induction.is_contiguous():
        induction = induction.contiguous()
    if not feed.is_contiguous():
        feed = feed.contiguous()
    return induction, feed, mask, ind_ids, feed_ids, _DTYPES[induction.dtype]


class CoActionFunction(torch.autograd.Function):
    """``CoActionFunction.apply(induction, feed, mask, spec, ind_ids, feed_ids, check_ids, zero_ahead)``: the fused
    co-action forward, with the fused backward as its gradient (for induction and feed). ``zero_ahead``: the forward
    makes the backward's gradient arrays and its kernel zeroes them (``TableGrads``) when a gradient is needed; pass
    it only when a backward will follow (``coaction`` passes ``torch.is_grad_enabled()`` and a tensor requiring
    grad). Prefer ``coaction``, which checks the arguments and has keyword defaults."""

    @staticmethod
    def forward(ctx, induction, feed, mask, spec, ind_ids, feed_ids, check_ids, zero_ahead):
        import cupy as cp

        from .fused import TableGrads, _args, _forward

        dtype = _DTYPES[induction.dtype]
        device = induction.device
        dev = device.index
        s = _stream(device)
        # the inputs as DeviceBuffers for both ops (the tensors themselves are saved for the backward: they stay
        # alive, and autograd refuses a backward after an in-place change to one of them)
        bufs = tuple(_buffer(t, dev) for t in (induction, feed, mask, ind_ids, feed_ids))
        # the fused ops' argument checks, once a step: the backward takes their result as it is (it runs on
        # autograd's device thread, whose host work the step waits for)
        args = _args(spec, *bufs, dtype)
        # the output and the backward's gradients from PyTorch's allocator, on s (the kernels' stream)
        out = torch.empty((mask.shape[0], spec.out_dim), dtype=induction.dtype, device=device)
        with cp.cuda.Device(dev):
            # the backward's gradient arrays, zeroed by this forward's kernel (no memsets in the backward's way)
            grads = gt = None
            if zero_ahead and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
                gt = (torch.empty(induction.shape, dtype=torch.float32, device=device),
                      torch.empty(feed.shape, dtype=torch.float32, device=device))
                grads = TableGrads(bufs[0].shape, bufs[1].shape, stream=s, arrays=tuple(_buffer(t, dev) for t in gt))
            _forward(args, bufs[0], dtype, s, check_ids, grads, _buffer(out, dev))
        ctx.dtype, ctx.grads, ctx.grad_tensors, ctx.args = dtype, grads, gt, args
        ctx.both_ids = ind_ids is not None and feed_ids is not None
        ctx.save_for_backward(induction, feed, mask, ind_ids, feed_ids)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        from .fused import _backward

        # (read for autograd's check that no saved tensor was changed in place since the forward; the kernels take
        # the forward's checked arguments: the same tensors' addresses)
        induction, feed, *_ = ctx.saved_tensors
        need_ind, need_feed = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_ind or need_feed):
            return (None,) * 8
        import cupy as cp

        device = induction.device
        g = grad_out  # the kernel takes float32 [B, out_dim]
        if g.dtype != torch.float32 or not g.is_contiguous():
            g = g.to(torch.float32).contiguous()
        s = _stream(device)
        with cp.cuda.Device(device.index):
            # the ids were range-checked by the forward (or the caller said not to): no second host synchronisation
            g_ind, g_feed = _backward(ctx.args, None, ctx.both_ids, _buffer(g, device.index), s, False, ctx.grads)
            if ctx.grads is None:  # (no TableGrads: zero_ahead=False, or a second backward with retain_graph)
                # CuPy arrays, zeroed and written on s: handed over inside s's context, so DLPack adds no wait
                with cupy_stream(s):
                    g_ind, g_feed = _to_torch(g_ind, torch.float32), _to_torch(g_feed, torch.float32)
            else:  # the TableGrads' arrays, as the tensors behind them
                g_ind, g_feed = ctx.grad_tensors
            ctx.grads = ctx.grad_tensors = None  # (once_differentiable: one backward)
            gi = (g_ind if induction.dtype == torch.float32 else g_ind.to(induction.dtype)) if need_ind else None
            gf = (g_feed if feed.dtype == torch.float32 else g_feed.to(feed.dtype)) if need_feed else None
        return gi, gf, None, None, None, None, None, None


def coaction(induction: torch.Tensor, feed: torch.Tensor, mask: torch.Tensor, spec: CoActionSpec | None = None, *,
             ind_ids: torch.Tensor | None = None, feed_ids: torch.Tensor | None = None,
             check_ids: bool = True) -> torch.Tensor:
    """The fused co-action op on PyTorch tensors, differentiable in ``induction`` and ``feed``.

    Args:
        induction: gathered rows `[B, D']`, or a table `[rows, D']` with `ind_ids`; float32 or bfloat16.
        feed: gathered rows `[B, T, D]`, or a table `[rows, D]` with `feed_ids`; the dtype of `induction`.
        mask: `[B, T]`, float32 (nonzero where a behaviour is present, counted once) or bool.
        spec: the shape of the co-action pair (default `CoActionSpec()`: D = 16, 16 -> 8 -> 4, 3 orders).
        ind_ids: `[B]` integer row ids into the induction table (converted to int64).
        feed_ids: `[B, T]` integer row ids into the feed table (converted to int64).
        check_ids: range-check the ids on the device in front of the forward's kernel; the host waits for the check
            (not for the forward) and raises ValueError on an id outside its table.

    Returns:
        `[B, spec.out_dim]` of the inputs' dtype, on their device: a new tensor, computed on PyTorch's current stream
        of that device (the backward too). Its gradients reach `induction` and `feed` (table-shaped with ids,
        repeated ids added up), of their dtype. Local: no other rank takes part.

    Raises:
        TypeError: a non-tensor, a sparse or nested tensor, a `ShardedTable`, or a wrong dtype (induction and feed
            float32 or bfloat16 alike, mask float32 or bool, integer ids); a `check_ids` that is not a bool.
        ValueError: a tensor off CUDA or on another device than the rest, or a shape that does not fit `spec`; the
            fused op's own ValueErrors (ids out of range, a spec beyond the kernels' limits) pass through.
    """
    if spec is None:  # (not `spec or ...`: a falsy non-spec, 0 or {}, must reach the TypeError, not the default)
        spec = CoActionSpec()
    check_flag(check_ids)
    induction, feed, mask, ind_ids, feed_ids, _ = _checked(induction, feed, mask, spec, ind_ids, feed_ids)
    # a backward can follow only with grad mode on and a tensor requiring grad (ctx.needs_input_grad inside the
    # forward sees requires_grad only, not the grad mode)
    zero_ahead = torch.is_grad_enabled() and (induction.requires_grad or feed.requires_grad)
    return CoActionFunction.apply(induction, feed, mask, spec, ind_ids, feed_ids, bool(check_ids), zero_ahead)
