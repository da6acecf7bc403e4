"""The routed-expert step around a grouped expert MLP, shared by ``GpuModel`` and the Hugging Face integration:
token-expert pairs sorted by expert, gathered in one pass into groups that start on multiples of ``align`` (padding
rows between groups), the grouped MLP over all groups at once, one gather back to token order and the deterministic
combine.

Invariants: no host round trip (the padded size is bounded by shapes alone: at most ``min(E, T k)`` groups are
non-empty), so the step is capturable in a CUDA graph; no atomics (the combine is a batched GEMM with float32
accumulation in slot order), so two runs of the same routing give the same bits whatever experts are local.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._checks import int_at_least


def routed_experts(x: Any, w: Any, ids: Any, mlp: Callable[[Any, Any], Any], *, num_experts: int,
                   align: int = 16, quantize: Callable[[Any], tuple[Any, Any]] | None = None) -> Any:
    """``x [T, H]``, router weights ``w [T, k]`` (combined in ``x``'s dtype's precision: rounded to it first),
    expert ids ``ids [T, k]`` int64 in ``[0, num_experts)``; ``mlp(x_grouped [R, H], offs [E] int32) -> [R, H]`` the
    grouped expert MLP (group e in rows ``[offs[e-1], offs[e])``). Returns ``[T, H]`` in ``x``'s dtype: token t's
    ``sum_j w[t, j] * expert_{ids[t, j]}(x[t])``.

    ``quantize(x) -> (q [T, H] float8_e4m3fn, scale [T] float32)``: a per-row quantisation (fp8 experts). Each token
    is then quantised once, before the gather, and ``mlp`` receives the gathered pair ``(q_grouped, scale_grouped)``
    instead of bf16 rows: the same bits as quantising the gathered rows (a row's quantisation depends on that row
    only), with k times fewer rows quantised and half the gather's bytes.

    ``num_experts`` and ``align``: integers >= 1 (Python or numpy; ``align=1``: groups packed back to back), checked
    on the host before anything is enqueued (TypeError / ValueError naming the argument), as are the shapes and
    ``ids``' dtype (ValueError; the ids' range only on the CPU: on a GPU reading them would synchronise the device).
    TypeError for an ``x``, ``w`` or ``ids`` that is not a torch.Tensor."""
    import torch

    for name, t in (("x", x), ("w", w), ("ids", ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"routed_experts: {name} must be a torch.Tensor, got {type(t).__name__}")
    int_at_least("num_experts", num_experts, 1, "an integer")
    align = int_at_least("align", align, 1, "an integer")
    if ids.dim() != 2 or ids.dtype != torch.int64:
        raise ValueError(f"routed_experts: ids must be [T, k] int64 expert ids, got {ids.dtype} {list(ids.shape)}")
    T, k = ids.shape
    if x.dim() != 2 or x.shape[0] != T or tuple(w.shape) != (T, k):
        raise ValueError(f"routed_experts: x must be [T, H] and w [T, k] with ids' T = {T}, k = {k}, got x "
                         f"{list(x.shape)}, w {list(w.shape)}")
    if ids.device.type == "cpu" and ids.numel():  # free on the host (scatter_add_ had named no argument)
        bad = ids[(ids < 0) | (ids >= num_experts)]
        if bad.numel():
            raise ValueError(f"routed_experts: ids must be in [0, {int(num_experts)}) (num_experts), got "
                             f"{int(bad[0])}")
    if quantize is not None:
        xq, xsc = quantize(x)

        def take(index):
            return gather_rows(xq, xsc, index)
    else:
        def take(index):
            return x[index]
    E = int(num_experts)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # per-expert counts without bincount (which reads its input's maximum back to the host: not capturable)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    if align > 1:
        padded = (counts + align - 1) // align * align
        pstart = padded.cumsum(0) - padded
        start = counts.cumsum(0) - counts
        e_sorted = flat[order]
        dst = pstart[e_sorted] + torch.arange(T * k, device=x.device) - start[e_sorted]  # sorted pair -> its row
        rows = T * k + (align - 1) * min(E, T * k)
        # one gather builds the grouped rows: each row names its token (padding rows read token 0: finite values
        # whose outputs are never read back); no [T k, H] staging copy, no memset, no scatter
        src = torch.zeros(rows, dtype=torch.int64, device=x.device)
        src[dst] = order // k
        xp = take(src)
        del src  # large prefills: every temporary goes back to the (stream-ordered) pool once its reader is enqueued
        offs = padded.cumsum(0).to(torch.int32)
        offs[-1:].fill_(rows)  # the last group takes the tail of padding rows (fill: capturable, no copy)
        y = mlp(xp, offs)
        del xp
        pos = torch.empty_like(dst)
        pos[order] = dst  # pair j (token-major: t k + slot) -> its row
        yt = y[pos]  # one gather back to token-major order
        del y
        return torch.bmm(w.to(yt.dtype).unsqueeze(1), yt.view(T, k, yt.shape[1])).squeeze(1)
    xs = take(order // k)
    ys = mlp(xs, counts.cumsum(0).to(torch.int32))
    return combine_pairs(ys, order, w)


def gather_rows(q: Any, scale: Any, index: Any) -> tuple[Any, Any]:
    """Rows ``index [R]`` (int64) of quantised activations ``q [T, K]`` (a one-byte float type, e.g. float8_e4m3fn) /
    ``scale [T]``: ``(q[index], scale[index])``, the bytes gathered as uint8 (half a bf16 gather's traffic)."""
    import torch

    return q.view(torch.uint8)[index].view(q.dtype), scale[index]


def combine_pairs(ys: Any, order: Any, w: Any) -> Any:
    """Expert outputs of the pairs in sorted order ``ys [T k, H]`` back to token order (``order`` the sort's
    permutation), weighted by ``w [T, k]`` (rounded to ``ys``'s dtype) and summed over the k slots by a batched GEMM
    (float32 accumulation, slot order): ``[T, H]``."""
    import torch

    T, k = w.shape
    yt = torch.empty_like(ys)
    yt[order] = ys
    return torch.bmm(w.to(ys.dtype).unsqueeze(1), yt.view(T, k, ys.shape[1])).squeeze(1)
