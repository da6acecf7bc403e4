"""Token dispatch and combine over NVLink (expert parallelism, DEP): moving tokens, the sibling of the weight fetch
engines in ``store``. The routing semantics (owner rule, row order, grouped layout, reduction orders) are those of
``dispatch_plan`` (the pure reference); the kernels are ``cpp/src/dispatch.cu``.

A ``TokenDispatcher`` serves one MoE model on one rank: every rank builds one with the same arguments (collective),
and every rank calls ``dispatch`` then ``combine`` once per MoE layer, in the same order (a rank with no tokens
passes ``T = 0``: its peers still wait for its empty counts).

Stream timeline of one layer (caller's stream ``s``, no host synchronisation anywhere)::

    s: route | send rows+meta to owners, flag(epoch) | wait all flags | count | scan | permute -> x_grouped
       ... caller's expert GEMMs on x_grouped (offs) -> y_grouped ...
       combine_send (weighted per-row partials -> sources, flag) | wait all flags | sum over ranks -> out

Invariants:
  * Buffers: the receive buffers (``[N, max_tokens, H]`` bf16 rows, per-slot local expert ids and weights, counts),
    the combine buffer (``[N, max_tokens, H]`` float32 partials) and two flag rows live on the symmetric heap and are
    written by peers through NVLink; ``x_grouped [max_pairs, H]``, ``offs [L]`` and the plans are local. Nothing is
    allocated per call, so a dispatch / combine pair is capturable in a CUDA graph and replays mix with eager calls.
  * Ordering: each kernel waits only on flags whose value is the step's epoch (a device counter advanced by every
    dispatch, replays included); a source overwrites a destination's buffers for step i+1 only after its combine of
    step i saw that destination finish reading them, so single buffers suffice.
  * Phases: ``dispatch`` -> ``combine`` -> ``dispatch`` ...; a combine without its dispatch, or a second dispatch
    before the combine, raises ``DwdpError``.
  * No silent hang: every device wait has a cycle budget (``timeout`` seconds at the GPU's clock); past it the kernel
    prints the rank and the peer it waited for and traps (the CUDA context is then unusable; the process must exit).
  * Determinism: no float atomics; per row the slots are summed in ascending slot order, then the ranks in ascending
    order, in float32 (no FMA contraction), rounded once to bf16: identical to ``dispatch_plan.reference_moe``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._checks import is_int, is_real, rank_counts
from .errors import DwdpError
from .interop import cupy_stream, device_buffer, stream_handle
from .partition import ExpertPartition
from .runtime import Runtime, get_runtime

DEFAULT_TIMEOUT_S = 100.0
_CLOCK_HZ = 2.0e9  # cycles per second used to turn the timeout into a spin budget (H200 boost clock ~1.98 GHz)
_MAX_TIMEOUT_S = 2.0**63 / _CLOCK_HZ  # the spin budget is a signed 64-bit cycle count (dispatch.h)


@dataclass(frozen=True)
class DispatchHandle:
    """What ``dispatch`` returns, valid until the matching ``combine``.

    x_grouped  ``[rows, H]`` uint16 (bf16 bits) CuPy array: the received rows grouped by local expert, group
               ``le`` in rows ``[offs[le-1], offs[le])`` (its real rows first, then padding up to ``align``); rows past
               ``offs[L-1]`` and the padding are never read back. Owned by the dispatcher (reused next layer).
    rows       the row bound of this call (``max_rows``, at most ``max_pairs``): the expert GEMMs need cover only
               ``x_grouped[:rows]``, and ``combine`` reads ``y_grouped[:rows]``.
    offs       ``[L]`` int32 CuPy array: cumulative group ends (multiples of ``align``), for ``torch._grouped_mm``.
    num_tokens this rank's T for this step.
    step       the dispatcher's call number (checked by ``combine``).
    """

    x_grouped: Any
    offs: Any
    num_tokens: int
    step: int
    torch_views: tuple | None = None
    rows: int = 0

    def torch(self):
        """``(x_grouped[:rows], offs)`` as PyTorch tensors (bf16 and int32), zero-copy; made from views the dispatcher
        created once (a DLPack exchange inside a CUDA-graph capture would break it)."""
        if self.torch_views is None:
            raise DwdpError("DispatchHandle.torch(): PyTorch was not importable when the dispatcher was built")
        xg, offs = self.torch_views
        return xg[: self.rows], offs


class TokenDispatcher:
    """Dispatch / combine of one rank for a model whose experts are placed by ``partition`` (DEP when
    ``stride == experts_per_rank``; with replication a pair goes to this rank when it owns the expert, else to owner
    ``(t + e) % len(owners)``).

    Args:
        partition: the expert placement, identical on every rank.
        hidden: H, a multiple of 8 (rows travel as whole 16-byte vectors).
        top_k: k, 1..16.
        max_tokens: the most tokens one rank passes to one ``dispatch``.
        align: group starts in ``x_grouped`` are multiples of this (16 suits the grouped GEMM).
        max_pairs: rows of ``x_grouped`` (default: the worst case ``N * max_tokens * min(k, L) + L * (align - 1)``);
            a step needing more sets an error ``check_errors`` reports (its overflowing pairs contribute nothing).
        num_sms: the most blocks of the copy / combine kernels (report it with any figure). Default: every SM of the
            GPU (a model's dispatch runs alone on its stream: on 2 x H200, 132 blocks moved 162 GB/s at 32K tokens
            per rank, 32 blocks 83). A call launches ``min(num_sms, ceil(rows / 16))`` blocks (at least 8), ``rows``
            being the most rows it can send or receive, so that a decode-sized call does not pay for idle blocks.
        threads: threads per block, a multiple of 32 in [64, 1024].
        timeout: seconds a device wait may spin before it reports and traps.

    Collective: construction and ``close()`` (symmetric allocations). Needs every peer reachable over NVLink, at
    most 8 ranks, and ``N * max_tokens * (6 * H + 8 * k) + 20 * N`` bytes of the NVSHMEM symmetric heap
    (``init(heap_size=...)``). Construction raises TypeError for a partition that is not an ``ExpertPartition``,
    ValueError for an argument out of range (each named), a partition of another world size or more than 8 ranks,
    and DwdpError before ``init()``, for an unreachable peer or a failed symmetric allocation (what was allocated is
    freed again).
    """

    def __init__(self, partition: ExpertPartition, hidden: int, top_k: int, max_tokens: int, *, align: int = 16,
                 max_pairs: int | None = None, num_sms: int | None = None, threads: int = 512,
                 timeout: float = DEFAULT_TIMEOUT_S, runtime: Runtime | None = None):
        import cupy as cp

        from .symmetric import free_symmetric, peer_view, symmetric_empty

        rt = runtime or get_runtime()
        rt.require("TokenDispatcher")
        if not isinstance(partition, ExpertPartition):  # (its attributes were read below: a bare AttributeError)
            raise TypeError(f"TokenDispatcher: partition must be an ExpertPartition, got {partition!r} "
                            f"({type(partition).__name__})")
        if num_sms is None:
            num_sms = int(cp.cuda.runtime.getDeviceProperties(rt.device)["multiProcessorCount"])
        for name, v, lo in (("hidden", hidden, 8), ("top_k", top_k, 1), ("max_tokens", max_tokens, 1),
                            ("align", align, 1), ("num_sms", num_sms, 1), ("threads", threads, 64)):
            if not is_int(v) or v < lo:
                raise ValueError(f"TokenDispatcher: {name} must be an int >= {lo}, got {v!r}")
        if hidden % 8:
            raise ValueError(f"TokenDispatcher: hidden must be a multiple of 8 (16-byte bf16 rows), got {hidden}")
        if top_k > 16 or top_k > partition.num_experts:
            raise ValueError(f"TokenDispatcher: top_k must be in [1, min(16, E={partition.num_experts})], got {top_k}")
        if threads > 1024 or threads % 32:
            raise ValueError(f"TokenDispatcher: threads must be a multiple of 32 in [64, 1024], got {threads}")
        if partition.world_size != rt.world_size():
            raise ValueError(f"TokenDispatcher: the partition is for {partition.world_size} ranks, the job has {rt.world_size()}")
        if rt.world_size() > 8:
            raise ValueError(f"TokenDispatcher: at most 8 ranks (one NVLink domain's node), got {rt.world_size()}")
        # (the budget int(timeout * clock) is a C++ long long: inf raised OverflowError after the allocations, and
        # past 2^63 cycles the first dispatch failed in the binding's cast; True was a silent 1 s)
        if not is_real(timeout) or not 0 < timeout < _MAX_TIMEOUT_S:
            raise ValueError(f"TokenDispatcher: timeout must be a number of seconds in (0, {_MAX_TIMEOUT_S:.3g}), "
                             f"got {timeout!r}")
        N, L = partition.world_size, partition.experts_per_rank
        worst = N * int(max_tokens) * min(int(top_k), L) + L * (int(align) - 1)
        if max_pairs is not None and not is_int(max_pairs):  # (int() had taken 2.5 as 2 and True as 1)
            raise ValueError(f"TokenDispatcher: max_pairs must be an int in [1, 2^31), got {max_pairs!r}")
        if max_pairs is None and worst >= 2**31:  # (the message had blamed a max_pairs the caller never passed)
            raise ValueError(f"TokenDispatcher: the default max_pairs, the worst case N * max_tokens * min(top_k, L) + "
                             f"L * (align - 1) = {worst} grouped rows, is not below 2^31; lower max_tokens or pass a "
                             "smaller max_pairs")
        max_pairs = worst if max_pairs is None else int(max_pairs)
        if not 1 <= max_pairs < 2**31:
            raise ValueError(f"TokenDispatcher: max_pairs must be in [1, 2^31), got {max_pairs}")
        self.partition, self.hidden, self.top_k, self.max_tokens = partition, int(hidden), int(top_k), int(max_tokens)
        self.align, self.max_pairs, self.num_sms, self.threads = int(align), max_pairs, int(num_sms), int(threads)
        self.rt, self.rank, self.world = rt, rt.rank(), N
        self._free = free_symmetric
        self._sym: list[Any] = []
        self._closed = False
        T, H, k = self.max_tokens, self.hidden, self.top_k
        try:
            def sym(shape, dtype):
                a = symmetric_empty(shape, dtype)
                self._sym.append(a)
                return a

            self.recv_x = sym((N, T, H), np.uint16)
            self.recv_meta = sym((N, T, k), np.int32)
            self.recv_w = sym((N, T, k), np.float32)
            self.recv_count = sym((N,), np.int32)
            self.comb = sym((N, T, H), np.float32)
            self.flags = sym((2, N), np.uint64)
            with cp.cuda.Device(rt.device):
                self.flags.fill(0)
                self.recv_count.fill(0)
                self.send_pos = cp.empty((T, N), cp.int32)
                self.send_count = cp.zeros(N, cp.int32)
                self.expert_count = cp.zeros(L, cp.int32)
                self.offs = cp.zeros(L, cp.int32)
                self.pair_pos = cp.full((N, T, k), -1, cp.int32)
                self.x_grouped = cp.empty((max_pairs, H), cp.uint16)
                self.state = cp.zeros(3, cp.uint64)  # epoch, two block counters, error code and value (dispatch.cu)
                cp.cuda.Device().synchronize()

            def peers(a):
                return [int(peer_view(a, p).data.ptr) for p in range(N)]

            self._args = {
                "rank": self.rank, "world": N, "hidden": H, "top_k": k, "num_experts": partition.num_experts,
                "experts_per_rank": L, "stride": partition.stride, "max_tokens": T, "max_pairs": max_pairs,
                "align": self.align, "ids_int64": 0, "num_blocks": self.num_sms, "threads": self.threads,
                "spin_budget": int(timeout * _CLOCK_HZ),
                "recv_x": peers(self.recv_x), "recv_meta": peers(self.recv_meta), "recv_w": peers(self.recv_w),
                "recv_count": peers(self.recv_count), "comb": peers(self.comb), "flags": peers(self.flags),
                "send_pos": self.send_pos.data.ptr, "send_count": self.send_count.data.ptr,
                "expert_count": self.expert_count.data.ptr, "offs": self.offs.data.ptr,
                "pair_pos": self.pair_pos.data.ptr, "x_grouped": self.x_grouped.data.ptr, "state": self.state.data.ptr,
            }
            rt.barrier()  # every rank's flags are zero before anyone can raise them
        except BaseException:
            self.close()
            raise
        self._step = 0
        self._pending: DispatchHandle | None = None
        self.capturable = True  # a dispatch / combine pair may be captured in a CUDA graph (fixed capacities)
        try:  # zero-copy PyTorch views, made now: DLPack exchanges record events, which a graph capture forbids
            import torch

            self._torch_views = (torch.from_dlpack(self.x_grouped.view(np.int16)).view(torch.bfloat16),
                                 torch.from_dlpack(self.offs))
        except ImportError:
            self._torch_views = None

    # -- sizes (for memory plans, before any allocation) ------------------------------------------------------------
    @staticmethod
    def heap_bytes(world: int, max_tokens: int, hidden: int, top_k: int) -> int:
        """Bytes of the NVSHMEM symmetric heap one dispatcher takes (receive rows, metadata, weights, counts,
        float32 combine partials, flags), before the heap's own alignment."""
        return world * max_tokens * (6 * hidden + 8 * top_k) + 4 * world + 16 * world

    @staticmethod
    def local_bytes(world: int, max_tokens: int, hidden: int, top_k: int, experts_per_rank: int, align: int = 16,
                    max_pairs: int | None = None) -> int:
        """Bytes of ordinary device memory one dispatcher takes (``x_grouped`` and the plans); the caller's expert
        outputs ``y_grouped`` need as much again as ``x_grouped``."""
        rows = (world * max_tokens * min(top_k, experts_per_rank) + experts_per_rank * (align - 1)
                if max_pairs is None else max_pairs)
        return rows * hidden * 2 + max_tokens * world * 4 + world * max_tokens * top_k * 4 + 12 * experts_per_rank

    # -- the two halves ----------------------------------------------------------------------------------------------
    def rows_for(self, tokens_per_rank) -> int:
        """The most grouped rows a step with these per-rank token counts can fill (every token's pairs at this
        rank, groups padded to ``align``), capped at ``max_pairs`` and at least 1 (``dispatch`` takes ``max_rows`` in
        ``[1, max_pairs]``; an all-empty step with ``align=1`` gets 1): the ``max_rows`` that keeps a small step's
        expert GEMMs small. Host arithmetic, no synchronisation. ``tokens_per_rank``: every rank's T (``N`` ints
        >= 0, numpy integers taken); anything else raises ValueError (a negative or truncated count would give a
        bound too small, and the kernels would drop the overflowing pairs)."""
        L = self.partition.experts_per_rank
        counts = rank_counts("rows_for", tokens_per_rank, self.partition.world_size)
        need = sum(counts) * min(self.top_k, L) + L * (self.align - 1)
        return max(1, min(self.max_pairs, need))

    def dispatch(self, x: Any, topk_ids: Any, topk_weights: Any, stream: Any = None, *,
                 max_rows: int | None = None) -> DispatchHandle:
        """Sends each token's hidden state once to every owner of its routed experts and groups what this rank
        receives by local expert. Collective: every rank must call it for the same layer, in the same order (a rank
        without tokens passes T = 0). No host synchronisation; the data moves when ``stream`` runs the kernels.

        Args:
            x: ``[T, H]`` bf16 (a PyTorch bf16 tensor, or uint16 bits), contiguous, T <= max_tokens.
            topk_ids: ``[T, k]`` int32 or int64 expert ids in ``[0, E)``, or -1 for an unused slot.
            topk_weights: ``[T, k]`` float32.
            stream: the caller's stream (any handle ``interop.stream_handle`` takes); everything is enqueued on it.
            max_rows: grouped rows this call may fill (default ``max_pairs``; ``rows_for(every rank's T)`` is a
                bound that always holds). A step needing more sets the capacity error ``check_errors`` reports.
        Returns:
            a ``DispatchHandle`` whose ``x_grouped`` / ``offs`` the caller's expert GEMMs read (owned by the
            dispatcher, valid on ``stream`` once its kernels have run, until the next dispatch overwrites them).

        Raises:
            ValueError: ``x`` not a contiguous ``[T, H]`` array, T above ``max_tokens``, a bad ``max_rows``.
            TypeError: ``x`` not bf16 / uint16 bits, ``topk_ids`` or ``topk_weights`` of another dtype or shape, or
                not contiguous; a non-device array.
            DwdpError: the previous dispatch was not combined, the dispatcher is closed, or the runtime is not
                initialised. Bad expert ids and a capacity overflow are not raised here: ``check_errors``.
        """
        self._require("dispatch")
        rows = self.max_pairs if max_rows is None else max_rows
        if not is_int(rows) or not 1 <= rows <= self.max_pairs:
            raise ValueError(f"dispatch: max_rows must be an int in [1, max_pairs = {self.max_pairs}], got {max_rows!r}")
        if self._pending is not None:
            raise DwdpError("TokenDispatcher.dispatch: the previous dispatch was not combined yet (call combine first)")
        xb, ib, wb = self._inputs(x, topk_ids, topk_weights)
        T = xb.shape[0]
        self._args["ids_int64"] = int(ib.dtype == np.int64)
        self._args["max_pairs"] = int(rows)
        # rows this call can move: T sent per destination, and about rows // min(k, L) received when max_rows came
        # from rows_for (a bound on the received rows only then; the grid size affects speed, never correctness:
        # every kernel strides over its grid)
        recv = self.world * self.max_tokens if max_rows is None else -(-int(rows) // min(self.top_k, self.partition.experts_per_rank))
        self._args["num_blocks"] = min(self.num_sms, max(8, -(-max(T, recv) // 16)))
        self.rt.backend.dispatch_tokens(self._args, xb.ptr, ib.ptr, wb.ptr, T, stream_handle(stream))
        self._step += 1
        self._pending = DispatchHandle(self.x_grouped[: int(rows)], self.offs, T, self._step, self._torch_views,
                                       int(rows))
        return self._pending

    def combine(self, y_grouped: Any, handle: DispatchHandle, out: Any = None, stream: Any = None):
        """Returns every token's weighted sum of its experts' outputs to this rank. Collective: every rank calls it
        for the layer whose dispatch it follows (it waits for every rank's partials). No host synchronisation.

        Args:
            y_grouped: ``[rows, H]`` bf16 expert outputs (a PyTorch bf16 tensor, or uint16 bits) in
                ``handle.x_grouped``'s row order, at least ``handle.rows`` rows (only rows of real pairs are read).
            handle: the handle of this layer's ``dispatch``.
            out: optional caller-allocated ``[T, H]`` bf16 output (PyTorch bf16 or uint16 bits); allocated on
                ``stream`` otherwise (CuPy uint16).
            stream: as for ``dispatch``.
        Returns:
            ``out``: ``[T, H]`` bf16, token t = sum over its valid slots of weight * expert output (0 without any),
            valid on ``stream`` once the combine kernels have run.

        Raises:
            TypeError: ``y_grouped`` or ``out`` not a contiguous 2-byte array of the right width / shape.
            ValueError: ``y_grouped`` with fewer than ``handle.rows`` rows.
            DwdpError: ``handle`` is not the latest dispatch's (or was combined already), or the dispatcher is
                closed.
        """
        import cupy as cp

        self._require("combine")
        if self._pending is None or handle is not self._pending:
            raise DwdpError("TokenDispatcher.combine: pass the handle of the latest dispatch, once")
        yb = _bf16(y_grouped, "y_grouped")
        if len(yb.shape) != 2 or yb.shape[1] != self.hidden or not yb.contiguous:
            raise TypeError(f"combine: y_grouped must be a contiguous bf16 [rows, {self.hidden}] array, got {yb.dtype} {list(yb.shape)}")
        if yb.shape[0] < handle.rows:
            raise ValueError(f"combine: y_grouped must have at least handle.rows = {handle.rows} rows (as the handle's "
                             f"x_grouped), got {yb.shape[0]}")
        T = handle.num_tokens
        s = stream_handle(stream)
        if out is None:
            with cupy_stream(s):
                out = cp.empty((T, self.hidden), cp.uint16)
        ob = _bf16(out, "out")
        if ob.shape != (T, self.hidden) or not ob.contiguous:
            raise TypeError(f"combine: out must be a contiguous bf16 [{T}, {self.hidden}] array, got {ob.dtype} {list(ob.shape)}")
        self.rt.backend.combine_tokens(self._args, yb.ptr, ob.ptr, T, s)
        self._pending = None
        return out

    def abandon(self) -> None:
        """Forgets a dispatch whose combine will never run (a step that failed between them), so that the next
        ``dispatch`` is accepted. The peers cannot be told: they wait in their combine for this rank's partials and
        trap at ``timeout``, naming this rank (a failed DEP layer ends the job)."""
        self._pending = None

    def check_errors(self) -> None:
        """Raises DwdpError (after synchronising the device) if a dispatch met an expert id outside [-1, E) or needed
        more grouped rows than its ``max_rows`` / ``max_pairs``; clears the flag. Local."""
        import cupy as cp

        cp.cuda.Device(self.rt.device).synchronize()
        code, value = (int(v) for v in self.state[2:3].view(cp.int32).get())
        if code:
            self.state[2:3].view(cp.int32)[...] = 0
            cp.cuda.Device(self.rt.device).synchronize()
            if code == 1:
                raise DwdpError(f"dispatch: an expert id {value} is outside [-1, {self.partition.num_experts}); its slot was skipped")
            raise DwdpError(f"dispatch: a step needed {value} grouped rows but its max_rows / max_pairs allowed fewer "
                            f"(max_pairs {self.max_pairs}); the overflowing pairs were dropped (raise max_pairs, or "
                            "pass a max_rows that bounds the step: rows_for(every rank's tokens))")

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _require(self, what: str) -> None:
        self.rt.require(f"TokenDispatcher.{what}")
        if self._closed:
            raise DwdpError(f"TokenDispatcher.{what}: the dispatcher is closed")

    def _inputs(self, x, ids, w):
        xb = _bf16(x, "x")
        ib, wb = device_buffer(ids, "topk_ids"), device_buffer(w, "topk_weights")
        if len(xb.shape) != 2 or xb.shape[1] != self.hidden or not xb.contiguous:
            raise ValueError(f"dispatch: x must be a contiguous [T, {self.hidden}] bf16 array, got shape {list(xb.shape)}")
        T = xb.shape[0]
        if T > self.max_tokens:
            raise ValueError(f"dispatch: {T} tokens exceed the dispatcher's max_tokens = {self.max_tokens}")
        if ib.dtype not in (np.int32, np.int64) or ib.shape != (T, self.top_k) or not ib.contiguous:
            raise TypeError(f"dispatch: topk_ids must be a contiguous int32/int64 [{T}, {self.top_k}] array, got {ib.dtype} {list(ib.shape)}")
        if wb.dtype != np.float32 or wb.shape != (T, self.top_k) or not wb.contiguous:
            raise TypeError(f"dispatch: topk_weights must be a contiguous float32 [{T}, {self.top_k}] array, got {wb.dtype} {list(wb.shape)}")
        return xb, ib, wb

    def close(self) -> None:
        """Frees the symmetric buffers (collective). Idempotent once it has succeeded.

        Invariants: the dispatcher is unusable from the first call on, even if that call fails. The frees are
        collective (every rank frees the same buffers in the same order, newest first), so the first failure stops
        them: a rank that went on after a failed free would call the next free while its peers still wait in the
        previous one. A buffer leaves ``_sym`` as soon as its free succeeds, so ``close()`` again (on every rank)
        resumes at the one that failed. A failed device synchronisation frees nothing. Failures raise a DwdpError
        naming the step and the buffers still held."""
        if self._closed and not self._sym:
            return
        self._closed = True
        import cupy as cp

        try:
            cp.cuda.Device(self.rt.device).synchronize()
        except Exception as e:
            raise DwdpError(f"TokenDispatcher.close: device synchronisation failed ({type(e).__name__}: {e}); "
                            f"{len(self._sym)} buffer(s) still held (close() again retries)") from e
        while self._sym:
            try:
                self._free(self._sym[-1])
            except Exception as e:
                raise DwdpError(f"TokenDispatcher.close: a symmetric free failed ({type(e).__name__}: {e}); "
                                f"{len(self._sym)} buffer(s) still held (close() again, on every rank, resumes at "
                                "this one)") from e
            self._sym.pop()

    def __enter__(self) -> TokenDispatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bf16(x: Any, what: str):
    """A bf16 device buffer: PyTorch bf16 tensors export '<V2' (or are viewed as int16); uint16 bits pass as they are."""
    if hasattr(x, "dtype") and str(getattr(x, "dtype", "")) == "torch.bfloat16":
        import torch

        x = x.view(torch.int16)
    b = device_buffer(x, what)
    if b.dtype.itemsize != 2 or b.dtype.kind not in "iuV":
        raise TypeError(f"{what} must be bf16 (a PyTorch bfloat16 tensor or uint16 bits), got {b.dtype}")
    return b
