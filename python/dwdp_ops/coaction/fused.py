"""The fused CUDA co-action op (``_C.coaction_forward`` / ``_C.coaction_backward``) for CuPy arrays, with the same
semantics as ``reference``.

Induction rows come gathered (``induction [B, D']``), from a table (``induction [rows, D']`` with ``ind_ids [B]``,
int64) or from a ``ShardedTable`` split over the GPUs (``ind_ids`` are global row ids); feed rows come gathered
(``feed [B, T, D]``) or from a table (``feed [rows, D]`` with ``feed_ids [B, T]``, int64). A warp runs one sample:
it reads the sample's induction row (the micro-MLP's weights) once into shared memory (a peer's row one-sidedly over
NVLink) and reuses it for all the sample's behaviours and orders; its lanes take the unmasked behaviours (the mask
compacted with ballots), one (sample, behaviour) pair each, with the activations in registers. Pooled sums and
weight gradients are column sums over the lanes' staged rows in shared memory, so no per-sample weight matrix, no
``[B, T, ...]`` intermediate and no global atomic inside a sample. Layers wider than 32 (after padding to a multiple
of 4) run on the older shared-memory kernels (``uses_fast_kernels`` tells), with the same results; the CAN reference
shape (16 -> 8 -> 4, linear last layer, 1-4 orders) runs on specialised kernels with the same organisation and
compile-time widths (``uses_specialized_kernels``; docs/coaction.md). The specialised and the general register-path
kernels run each sample of a batch too small to fill the GPU on K warps, forward and backward (``split_warps``;
``DWDP_COACTION_SPLIT``).
``dtype`` is ``float32`` or ``bfloat16`` (stored as uint16 bits, as CuPy has no bf16); the output has the input's
storage dtype, gradients are float32. With table inputs the gradients are table-shaped and accumulated atomically
(repeated ids add up: the warps of a block first add the rows of equal induction ids, the lanes of a round the rows
of equal feed ids); a sharded table's row gradients are added to the owner's ``grad`` shard by remote atomics.

Stream order: outputs, gradient buffers and the id checks are allocated and run on the caller's ``stream`` (CuPy's
pool is stream-ordered, so a buffer freed later is reused only behind the kernels that wrote it). The id check is
one small kernel over both id arrays on that stream, and the host waits for it (and for what the stream ran before
it): the forward launches its kernel behind the check first and waits after, so the wait overlaps the launch; the
backward waits before launching. A feed id at a masked position (mask 0) is not checked: that position contributes
nothing whatever its id, so padding may hold any value (-1, say), as in the float64 reference. The kernels never
touch memory outside the tables whatever the ids (an induction id outside the table reads a zero row, a feed id row
0), so an unchecked bad id gives a wrong result, not a fault.

Limits: 1-8 layers, layer widths up to 256, orders up to 8, and one warp's shared memory within 227 KiB
(``launch_shape`` tells); beyond them a ValueError says which. B up to 2**31 - 1 samples and T up to 2**31 - 129
positions a sample (the kernels' 32-bit indices; a ValueError beyond); a sharded table has at most 8
shards, all reachable by load/store (NVLink).
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import numpy as np

from .._checks import is_bool, is_int
from .._native import native
from ..errors import CoActionArgumentError, DwdpError
from ..interop import DeviceBuffer, cupy_stream, device_buffer, stream_handle
from .reference import CoActionSpec

_DT = {"float32": (np.dtype(np.float32), 0), "bfloat16": (np.dtype(np.uint16), 1)}
_MAX_T = 2**31 - 129  # positions a sample the kernels index (kMaxT in cpp/src/coaction.cu)


def _check_dtype(dtype) -> None:
    """ValueError unless ``dtype`` is one of ``_DT``'s names (a str: a list had raised "unhashable type", naming
    nothing)."""
    if not isinstance(dtype, str) or dtype not in _DT:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")


class ShardedTable:
    """A ``[num_rows, dim]`` embedding table split by rows over the ranks, on the NVSHMEM symmetric heap.

    Rank r owns rows ``[r * rows_per_shard, (r + 1) * rows_per_shard)`` in ``shard`` (a CuPy array) and their
    gradient in ``grad`` (float32). The fused co-action op reads any row from its owner one-sidedly and adds row
    gradients into the owner's ``grad``; the owner may read ``grad`` only after ``sync()``, which waits until every
    rank's backward has finished (device synchronisation and a barrier). Construction, ``zero_grad()`` and ``close()``
    are collective (every rank passes the same shape and dtype); construction returns only when every shard's
    ``grad`` is zero and every rank has checked that its GPU and each peer's add floats natively over their link
    (``cudaDevP2PAttrNativeAtomicSupported``), which the remote gradient adds need."""

    def __init__(self, num_rows: int, dim: int, dtype: str = "float32"):
        from ..runtime import get_runtime
        from ..symmetric import free_symmetric, peer_view, symmetric_empty

        _check_dtype(dtype)
        for name, v in (("num_rows", num_rows), ("dim", dim)):
            if not is_int(v):  # (int() had truncated a float, True was 1)
                raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        if num_rows < 1 or dim < 1:
            raise ValueError(f"a table needs num_rows >= 1 and dim >= 1, got [{num_rows}, {dim}]")
        rt = get_runtime()
        rt.require("ShardedTable")
        self.world, self.rank = rt.world_size(), rt.rank()
        if self.world > 8:
            raise ValueError(f"ShardedTable supports at most 8 shards (ranks), got {self.world}")
        self.num_rows, self.dim, self.dtype = int(num_rows), int(dim), dtype
        self.rows_per_shard = -(-self.num_rows // self.world)
        self._free = free_symmetric
        self.shard = symmetric_empty((self.rows_per_shard, self.dim), _DT[dtype][0])
        self.grad = symmetric_empty((self.rows_per_shard, self.dim), np.float32)
        self._closed = False
        try:
            self.bases = [int(peer_view(self.shard, p).data.ptr) for p in range(self.world)]
            self.grad_bases = [int(peer_view(self.grad, p).data.ptr) for p in range(self.world)]
            self._check_atomics(rt)
        except DwdpError as e:
            self.close()
            raise DwdpError(f"ShardedTable needs every peer reachable by load/store (NVLink) with native atomics: {e}") from e
        self.zero_grad()

    def _check_atomics(self, rt) -> None:
        be = rt.backend
        buses = [b.decode() for b in rt.rendezvous.allgather("ShardedTable:bus", be.pci_bus_id().encode())]
        verdict = {p: be.p2p_native_atomics(bus) for p, bus in enumerate(buses) if p != self.rank}
        bad = {p: v for p, v in verdict.items() if v != 1}
        views = rt.rendezvous.allgather("ShardedTable:atomics", repr(sorted(bad.items())).encode())
        problems = [f"rank {r}: {v.decode()}" for r, v in enumerate(views) if v != b"[]"]
        if problems:
            raise DwdpError(
                "peer GPUs without native atomics over their link (value 0) or not visible to the rank (value -1), "
                "as (peer, value): " + "; ".join(problems)
            )

    def zero_grad(self) -> None:
        """Zeroes this rank's ``grad`` shard. Collective: waits until every rank has finished its earlier work
        (their remote adds into this shard included), zeroes, and waits again so that no peer's next backward can
        add into a shard before it is zeroed."""
        import cupy as cp

        from ..runtime import barrier

        cp.cuda.Device().synchronize()
        barrier()
        self.grad.fill(0)
        cp.cuda.Device().synchronize()
        barrier()

    @property
    def local_rows(self) -> tuple[int, int]:
        """The global row range ``[lo, hi)`` this rank owns (both capped at ``num_rows``: empty, ``lo == hi``, on a
        rank past the last row)."""
        lo = min(self.rank * self.rows_per_shard, self.num_rows)
        return lo, min(lo + self.rows_per_shard, self.num_rows)

    def sync(self) -> None:
        """Waits for this device's work and for every rank to reach this point (then all remote gradient adds into
        this rank's ``grad`` are visible)."""
        import cupy as cp

        from ..runtime import barrier

        cp.cuda.Device().synchronize()
        barrier()

    def close(self) -> None:
        """Frees both symmetric arrays (collective). Idempotent."""
        if self._closed:
            return
        self._closed = True
        import cupy as cp

        cp.cuda.Device().synchronize()
        self._free(self.grad)
        self._free(self.shard)

    def __enter__(self) -> ShardedTable:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TableGrads:
    """Float32 gradient arrays for one coming ``coaction_backward_gpu(..., grads=this)``, zeroed ahead of it, off the
    backward's critical path.

    ``TableGrads(induction_shape, feed_shape, stream=s, zero=..., arrays=None)`` holds ``induction`` (``[rows, D']``,
    the induction table's or the gathered rows' shape) and ``feed`` (``[rows, D]`` or ``[B, T, D]``), float32: by
    default allocated in one block of CuPy's pool on ``s`` (the feed's part 256-byte aligned); ``arrays=(grad_induction,
    grad_feed)`` takes the caller's instead (contiguous float32 device arrays of those shapes on the current device,
    any framework: PyTorch tensors from ``torch.empty`` on ``s``, say; their contents are overwritten by the zeroing).
    Not collective. ``zero`` says who zeroes them:

    - ``"forward"`` (default): the next ``coaction_forward_gpu(..., zero_grads=this)`` (its shapes checked against
      the op's first); the specialised kernels zero them alongside their work, a share per sample (no separate
      memset) when each sample's share is at most 128 KiB, other kernels and larger shares by a memset on the
      forward's stream in front of the kernel. The backward refuses them until a forward has done so.
    - ``"side"``: a ``cudaMemsetAsync`` on a side stream of the current device at once, behind everything queued on
      ``s`` so far (an event), overlapping whatever ``s`` runs next.

    One instance serves one backward (a second one is refused). Stream order: a forward or backward on another stream
    than ``s`` first waits for what ``s`` had queued (the block may have been in use there before the pool handed it
    out) and ``s`` then waits for that backward, so the pool never hands the block to later work on ``s`` while the
    backward may still write it; ``ready_on(stream)`` makes ``stream`` wait for the zeroing (the backward calls it);
    ``close()`` (or the context manager's exit, or garbage collection) makes ``s`` wait for the zeroing. A wait across
    streams is an event recorded when it is asked for, so an instance made inside a CUDA-graph capture must be used
    up or closed inside it. The instance keeps the stream objects it is given (``s``, the forward's) alive until it is
    dropped; a stream given as a raw integer handle must outlive it. Memory: both arrays are held from construction
    on (a training step's forward), one pair per call: make them just before the forward whose backward takes them.
    Environment: none."""

    _sides: dict = {}

    def __init__(self, induction_shape, feed_shape, stream: Any = None, zero: str = "forward", *,
                 arrays: tuple | None = None):
        import cupy as cp

        self._closed = True  # (until construction succeeds: nothing to wait for)
        if zero not in ("forward", "side"):
            raise ValueError(f"zero must be 'forward' (the next forward zeroes them) or 'side' (a side stream, now), "
                             f"got {zero!r}")
        si, sf = _shape(induction_shape, "induction_shape"), _shape(feed_shape, "feed_shape")
        self._shapes = si, sf
        self._h = stream_handle(stream)  # the allocating stream (a raw handle: no stream object per call)
        # the stream objects behind the handles this instance may wait on or make wait (close() runs from __del__,
        # possibly after the caller dropped its stream: a destroyed stream's handle would crash the driver call)
        self._streams = [stream if stream is not None else cp.cuda.get_current_stream()]
        if arrays is None:
            ni, nf = math.prod(si), math.prod(sf)
            # one pool block for both (a training step's hot path: one allocation), feed's part 256-byte aligned
            off = -(-ni // 64) * 64
            with cupy_stream(stream):
                mem = cp.cuda.alloc(4 * (off + nf))
            self.induction = cp.ndarray(si, cp.float32, mem)
            self.feed = cp.ndarray(sf, cp.float32, mem + 4 * off)
            self._device = mem.device_id
            self._targets = [mem.ptr, mem.ptr + 4 * off], [ni, nf]
        else:
            if not isinstance(arrays, tuple | list) or len(arrays) != 2:
                raise TypeError(f"arrays must be a pair (grad_induction, grad_feed), got {type(arrays).__name__}")
            pi, pf = _grad_pair(arrays, (si, sf), "the current device is")
            self.induction, self.feed = arrays
            self._device = cp.cuda.runtime.getDevice()
            self._targets = [pi, pf], [math.prod(si), math.prod(sf)]
        self._by = None  # the stream (handle) that queued the zeroing (None: not queued yet)
        self._event = None  # zero="side": recorded behind the side stream's memsets
        self._failed = self._used = False
        if zero == "side":
            dev = self._device
            side = TableGrads._sides.get(dev)
            if side is None:
                side = TableGrads._sides[dev] = cp.cuda.Stream(non_blocking=True)
            _stream_wait(side.ptr, self._h)
            for ptr, n in zip(*self._targets):
                if n:
                    cp.cuda.runtime.memsetAsync(ptr, 0, 4 * n, side.ptr)
            self._event = cp.cuda.Event(disable_timing=True)
            self._event.record(side)
            self._by = side.ptr
        self._closed = False

    @property
    def arrays(self):
        """``(induction, feed)``: the two gradient arrays (zero once the zeroing has run; see ``ready_on``)."""
        return self.induction, self.feed

    def _check_device(self, op: str) -> None:
        import cupy as cp

        dev = cp.cuda.runtime.getDevice()
        if self._device != dev:
            raise ValueError(f"these TableGrads are on device {self._device}, the {op} runs on device {dev}")

    def _zero_targets(self, ind_shape: tuple, feed_shape: tuple, h: int) -> tuple[list[int], list[int]]:
        """For the forward (on stream handle ``h``, the current device) that zeroes them: their addresses and float
        counts, once the shapes, the device and the state are checked and ``h`` waits for the allocating stream."""
        if self._failed:
            raise ValueError("the forward that was to zero these TableGrads raised: make new ones")
        if self._by is not None:
            raise ValueError("these TableGrads are zeroed already (zero='side', or passed to a forward before): make "
                             "new ones for each backward")
        if self._shapes != (ind_shape, feed_shape):
            raise CoActionArgumentError(f"these TableGrads are {list(self._shapes[0])} and {list(self._shapes[1])}, "
                                        f"the op's gradients are {list(ind_shape)} (induction) and "
                                        f"{list(feed_shape)} (feed)")
        self._check_device("forward")
        _stream_wait(h, self._h)
        return self._targets

    def _wait(self, h: int) -> None:
        """Stream ``h`` waits for the queued zeroing."""
        import cupy as cp

        if self._event is not None:
            cp.cuda.runtime.streamWaitEvent(h, self._event.ptr, 0)
        else:
            _stream_wait(h, self._by)

    def ready_on(self, stream: Any = None) -> None:
        """Makes ``stream`` (None: CuPy's current stream) wait for the zeroing; asynchronous. Raises ValueError
        before any zeroing was queued (``zero='forward'`` and no forward took them yet) or after the forward that was
        to queue it raised."""
        if self._failed:
            raise ValueError("the forward that was to zero these TableGrads raised: make new ones")
        if self._by is None:
            raise ValueError("these TableGrads (zero='forward') are not zeroed yet: pass them to coaction_forward_gpu "
                             "as zero_grads before the backward takes them")
        self._wait(stream_handle(stream))

    def _take(self, h: int) -> tuple:
        """For the backward on stream handle ``h``: the arrays, once the state and device are checked and ``h`` waits
        for the zeroing (and for the allocating stream, if another)."""
        if self._used:
            raise ValueError("these TableGrads were used by a backward already: make new ones for each backward")
        self._check_device("backward")
        self.ready_on(h)
        _stream_wait(h, self._h)
        self._used = True
        return self.induction, self.feed

    def _release_after(self, h: int) -> None:
        """The backward was queued on stream handle ``h``: the allocating stream waits for it if it is another one."""
        _stream_wait(self._h, h)

    def close(self) -> None:
        """Makes the allocating stream wait for the zeroing, if one was queued (see the class docstring).
        Idempotent."""
        if not self._closed:
            self._closed = True
            if self._by is None or (self._event is None and self._by == self._h):
                return  # nothing queued, or queued on the allocating stream itself
            import cupy as cp

            with cp.cuda.Device(self._device):  # (from __del__ another device may be current)
                self._wait(self._h)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the streams may be gone already
            pass

    def __enter__(self) -> TableGrads:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stream_wait(waiter: int, on: int) -> None:
    """Stream ``waiter`` waits for what stream ``on`` has queued so far (raw handles of the current device; nothing
    when they are the same stream): an event recorded on ``on`` now (its handle may be released at once: the wait
    holds)."""
    if waiter != on:
        import cupy as cp

        ev = cp.cuda.Event(disable_timing=True)
        cp.cuda.runtime.eventRecord(ev.ptr, on)
        cp.cuda.runtime.streamWaitEvent(waiter, ev.ptr, 0)


def _shape(shape, name: str) -> tuple:
    """``shape`` as a tuple of ints >= 0 (at least one), or a TypeError / ValueError naming ``name``."""
    try:
        values = tuple(shape)
        if any(is_bool(v) for v in values):  # (operator.index takes True as 1; sizes elsewhere refuse bools too)
            raise TypeError
        shape = tuple(operator.index(v) for v in values)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of ints, got {shape!r}") from None
    if not shape or any(v < 0 for v in shape):
        raise ValueError(f"{name} must be a non-empty tuple of sizes >= 0, got {list(shape)}")
    return shape


def _spec(spec: Any) -> CoActionSpec:
    """``spec``, or the default CoActionSpec for None; anything else is a TypeError (the reference's older keyword
    form, ``layer_dims`` and ``orders``, is not this op's)."""
    if spec is None:
        return CoActionSpec()
    if not isinstance(spec, CoActionSpec):
        raise TypeError(f"spec must be a CoActionSpec (or None for the default), got {type(spec).__name__}: {spec!r}")
    return spec


@functools.lru_cache(maxsize=256)
def _spec_args(spec: CoActionSpec):
    """The kernels' shape arguments of ``spec`` (cached per spec: the fused calls are on a training step's hot path).
    A width or an order count a C int cannot hold is refused here with the native check's own message (the binding
    had refused the call as "incompatible function arguments", a TypeError naming no limit)."""
    if spec.orders >= 2**31 or any(x >= 2**31 for d in spec.layer_dims for x in d):
        if len(spec.layer_dims) > 8:  # (the native checks' order: layers, widths, orders; cpp/src/coaction.cu)
            raise ValueError("co-action: 1 to 8 layers, din and dout of one length")
        if any(x > 256 for d in spec.layer_dims for x in d):
            raise ValueError("co-action: layer dims must be in [1, 256]")
        raise ValueError("co-action: orders must be in [1, 8]")
    return (tuple(i for i, _ in spec.layer_dims), tuple(o for _, o in spec.layer_dims), spec.orders, spec.bias,
            spec.order_independent, spec.variant == "paper")


def _backward_flag(backward: Any) -> bool:
    """``backward`` checked to be a bool (numpy's included), as a Python bool: None or 0 had been taken as the
    forward without a word, a string refused by the binding naming no argument."""
    if not is_bool(backward):
        raise TypeError(f"backward must be a bool, got {type(backward).__name__}: {backward!r}")
    return bool(backward)


def launch_shape(spec: CoActionSpec, backward: bool = False) -> tuple[int, int]:
    """``(warps per block, shared-memory bytes per block)`` of the kernel for ``spec`` (0 warps: one warp's shared
    memory does not fit); a spec beyond the op's limits (module docstring) is a ValueError naming the limit."""
    return tuple(native().coaction_launch_shape(*_spec_args(_spec(spec)), _backward_flag(backward)))


def uses_fast_kernels(spec: CoActionSpec, backward: bool = False) -> bool:
    """Whether ``spec`` runs on the register (fast) kernels; False: the shared-memory fallback for wide layers (or
    nothing fits, see ``launch_shape``)."""
    return bool(native().coaction_fast_path(*_spec_args(_spec(spec)), _backward_flag(backward)))


def uses_specialized_kernels(spec: CoActionSpec, backward: bool = False) -> bool:
    """Whether ``spec`` runs on the specialised kernels (compile-time widths: the CAN reference shape, D = 16,
    16 -> 8 -> 4, orders 1-4, bias, order independence, not the paper variant); ``DWDP_COACTION_SPECIALIZED=0``
    sends every shape to the general kernels (read at each call)."""
    return bool(native().coaction_specialized(*_spec_args(_spec(spec)), _backward_flag(backward)))


def split_warps(spec: CoActionSpec, B: int, T: int, sms: int, dtype: str = "float32", backward: bool = False) -> int:
    """Warps a sample the forward (``backward=True``: the backward) of ``B`` samples of ``T`` positions takes on a GPU
    of ``sms`` multiprocessors, as the launch picks it (``DWDP_COACTION_SPLIT`` included, read at each call;
    docs/environment.md). 0: no split: ``spec`` runs on the shared-memory fallback kernels (layers wider than 32:
    ``uses_fast_kernels`` is False), which take a warp a sample, or on no kernel at all (one warp's shared memory past
    227 KiB: ``launch_shape`` gives 0 warps, and the op raises ValueError at its launch). 1: a warp a sample, and a
    sample's results do not depend on ``B``. K > 1 (a batch that one warp a sample leaves short of one wave; the
    specialised kernels and the general register-path ones): a block of K warps a sample, each a segment of its
    positions; sums inside a sample are added in a fixed order for a given K (table and feed gradients by atomics, as
    at K = 1), and differ from K = 1's in rounding. ``B``, ``T`` and ``sms`` may be up to 2**31 - 1 (the pick's
    arithmetic); the op itself takes T <= 2**31 - 129."""
    _check_dtype(dtype)
    backward = _backward_flag(backward)
    for name, v in (("B", B), ("T", T), ("sms", sms)):
        if not is_int(v):
            raise TypeError(f"{name} must be an integer, got {type(v).__name__}: {v!r}")
        if not 1 <= v < 2**31:
            raise ValueError(f"{name} must be in [1, 2**31), got {v}")
    elem = 4 if dtype == "float32" else 2
    return int(native().coaction_split_warps(*_spec_args(_spec(spec)), backward, elem, int(B), int(T), int(sms),
                                             -1))


@functools.lru_cache(maxsize=256)
def _dims(spec: CoActionSpec) -> tuple[tuple, tuple[int, int, int]]:
    """``(_spec_args(spec), (feed_dim, induction_dim, out_dim))``: one cache lookup a call (a frozen dataclass hashes
    its fields at every lookup; the dimensions are properties that sum over the layers)."""
    return _spec_args(spec), (spec.feed_dim, spec.induction_dim, spec.out_dim)


def _args(spec: CoActionSpec, induction, feed, mask, ind_ids, feed_ids, dtype):
    _check_dtype(dtype)
    storage, code = _DT[dtype]
    spec_args, dims = _dims(spec)
    feed_dim, induction_dim, _ = dims
    fd, mk = device_buffer(feed, "feed"), device_buffer(mask, "mask")
    if mk.dtype != np.float32 or len(mk.shape) != 2 or not mk.contiguous:
        raise CoActionArgumentError(f"mask must be a contiguous float32 [B, T] array, got "
                                    f"{'' if mk.contiguous else 'a non-contiguous '}{mk.dtype} {list(mk.shape)}")
    B, T = mk.shape
    if B >= 2**31 or T > _MAX_T:  # (the binding takes them as C ints: it had refused the call as "incompatible
        # function arguments", naming neither)
        raise ValueError(f"the mask is [B, T] = [{B}, {T}]: the kernels take B <= 2**31 - 1 samples of "
                         f"T <= 2**31 - 129 positions")
    if isinstance(induction, ShardedTable):
        if induction._closed:
            raise DwdpError("the ShardedTable is closed")
        if induction.dtype != dtype:
            raise TypeError(f"the sharded table holds {induction.dtype}, the op was asked for {dtype}")
        if induction.dim != induction_dim:
            raise CoActionArgumentError(f"induction rows must hold D' = {induction_dim} values, the table has "
                                        f"{induction.dim}")
        if ind_ids is None:
            raise ValueError("a ShardedTable needs ind_ids (global row ids)")
        rows = (induction.bases, induction.rows_per_shard, induction.num_rows)
    else:
        ind = device_buffer(induction, "induction")
        if ind.dtype != storage:
            raise TypeError(f"induction must hold {dtype} ({storage}), got {ind.dtype}")
        if not ind.contiguous:
            raise ValueError("induction must be contiguous")
        if len(ind.shape) != 2 or ind.shape[1] != induction_dim:
            raise CoActionArgumentError(f"induction rows must hold D' = {induction_dim} values, got shape "
                                        f"{list(ind.shape)}")
        if ind_ids is None and ind.shape[0] != B:
            raise CoActionArgumentError(f"induction has {ind.shape[0]} rows but the mask has batch {B}")
        rows = ([ind.ptr], max(ind.shape[0], 1), ind.shape[0])
    if fd.dtype != storage:
        raise TypeError(f"feed must hold {dtype} ({storage}), got {fd.dtype}")
    if not fd.contiguous:
        raise ValueError("feed must be contiguous")
    ids_ptr = 0
    if ind_ids is not None:
        ib = device_buffer(ind_ids, "ind_ids")
        if ib.dtype != np.int64 or ib.shape != (B,) or not ib.contiguous:
            raise CoActionArgumentError(f"ind_ids must be a contiguous int64 [{B}] array, got "
                                        f"{'' if ib.contiguous else 'a non-contiguous '}{ib.dtype} {list(ib.shape)}")
        ids_ptr = ib.ptr
        if rows[2] == 0 and B > 0:
            raise ValueError("ind_ids must be in [0, 0): the induction table is empty")
    fids_ptr = 0
    if feed_ids is not None:
        fb = device_buffer(feed_ids, "feed_ids")
        if fb.dtype != np.int64 or fb.shape != (B, T) or not fb.contiguous:
            raise CoActionArgumentError(f"feed_ids must be a contiguous int64 [{B}, {T}] array, got "
                                        f"{'' if fb.contiguous else 'a non-contiguous '}{fb.dtype} {list(fb.shape)}")
        if len(fd.shape) != 2 or fd.shape[1] != feed_dim:
            raise CoActionArgumentError(f"the feed table must be [rows, {feed_dim}], got {list(fd.shape)}")
        fids_ptr = fb.ptr
        if fd.shape[0] == 0 and B * T > 0:  # no row for the kernels to fall back on (see the module docstring)
            raise ValueError("feed_ids must be in [0, 0): the feed table is empty")
    elif fd.shape != (B, T, feed_dim):
        raise CoActionArgumentError(f"feed must be [B, T, D] = {[B, T, feed_dim]}, got {list(fd.shape)}")
    # every input on the device the kernels run on: an array on another GPU would be read through its address (an
    # illegal access without peer mappings, a slow remote read with them); a ShardedTable's shards are remote by design
    here = [("feed", feed, fd.ptr), ("mask", mask, mk.ptr)]
    if not isinstance(induction, ShardedTable):
        here.append(("induction", induction, rows[0][0]))
    here += [(n, a, p) for n, a, p in (("ind_ids", ind_ids, ids_ptr), ("feed_ids", feed_ids, fids_ptr)) if p]
    _check_devices(here, "the op runs on the current device")
    # an address off its element size (an __cuda_array_interface__ at 0x1002 for float32) passed every check and
    # would be a misaligned access in the kernels, which ends the CUDA context; int64 ids, float32 mask, rows
    ind_ptr = 0 if isinstance(induction, ShardedTable) else rows[0][0]
    if (fd.ptr | ind_ptr) % storage.itemsize or mk.ptr % 4 or (ids_ptr | fids_ptr) % 8:
        for name, _, ptr in here:  # (the slow path: name the first)
            size = 8 if name.endswith("ids") else 4 if name == "mask" else storage.itemsize
            if ptr % size:
                raise ValueError(f"{name}: its address {ptr:#x} is not a multiple of its element size ({size} "
                                 "bytes); the kernels cannot read it")
    geo = (*spec_args, code, B, T)
    return geo, rows, fd, mk, ids_ptr, fids_ptr, storage, dims


def _check_runnable(spec_args: tuple, backward: bool) -> None:
    """ValueError naming the limit unless a kernel runs ``spec_args`` (``_spec_args``' tuple): the check the native
    launch makes, for the calls that launch nothing (B = 0), so that a spec beyond the limits is refused whatever
    the batch."""
    if not native().coaction_launch_shape(*spec_args, backward)[0]:  # (the limits raise in there)
        raise ValueError("co-action: one warp's induction row and activations need more than 227 KiB of shared "
                         "memory (use smaller layers or fewer orders)")


def _raise_bad_ids(bad: int, nrows: int, frows: int) -> None:
    """The ValueError for the id check's bits (bit 0: an ind id out of range, bit 1: a feed id), if any."""
    if bad & 1:
        raise ValueError(f"ind_ids must be in [0, {nrows}) (the table's rows)")
    if bad & 2:
        raise ValueError(f"feed_ids must be in [0, {frows}) (the table's rows)")


def _check_ids(ip: int, B: int, nrows: int, fp: int, T: int, frows: int, stream: int, mask: int) -> None:
    """Range check of both id arrays on the device, on the caller's stream (``stream``: its handle; behind whatever
    wrote the ids): one kernel, then the host waits for it. ``mask``: the float32 [B, T] mask's address; feed ids
    where it is 0 are not checked (a masked position contributes nothing), as in the forward's own check."""
    _raise_bad_ids(native().coaction_check_ids(ip, B, nrows, fp, B * T, frows, stream, mask), nrows, frows)


def check_flag(check_ids: Any) -> None:
    """``check_ids`` must be a bool (numpy's included): None or 0 had turned the id check off without a word."""
    if not is_bool(check_ids):
        raise TypeError(f"check_ids must be a bool (True: range-check the ids on the device), got "
                        f"{type(check_ids).__name__}: {check_ids!r}")


def coaction_forward_gpu(induction: Any, feed: Any, mask: Any, spec: CoActionSpec | None = None, *, ind_ids=None,
                         feed_ids=None, dtype: str = "float32", stream: Any = None, check_ids: bool = True,
                         zero_grads: TableGrads | None = None, out: Any = None):
    """Fused forward; returns ``[B, spec.out_dim]`` of the input storage dtype: a new CuPy array, or ``out`` (a
    caller-allocated contiguous device array of that shape and dtype on the current device, any framework, ready on
    ``stream``: a PyTorch tensor, say; the kernel overwrites it).

    The arrays (contiguous device arrays on the current device, any framework; ``dtype`` is ``"float32"`` or
    ``"bfloat16"``, the latter stored as uint16 bits or a bf16 tensor):

    - ``induction``: gathered rows ``[B, D']``, a table ``[rows, D']`` with ``ind_ids``, or a ``ShardedTable``
      (with ``ind_ids``, global row ids), of ``dtype``;
    - ``feed``: gathered rows ``[B, T, D]`` or a table ``[rows, D]`` with ``feed_ids``, of ``dtype``;
    - ``mask``: contiguous float32 ``[B, T]``, a behaviour present where nonzero (counted once, whatever the value);
    - ``ind_ids``: int64 ``[B]``; ``feed_ids``: int64 ``[B, T]`` (None: gathered rows).

    ``check_ids`` range-checks table ids on the device in front of the forward's kernel and waits for the check (not
    for the forward) before returning (feed ids at masked positions are not checked: they may hold any value, -1
    say); bad ids raise ValueError: a new output is dropped, but a caller's ``out`` has
    been overwritten by then (the kernel is launched before the check's result is read; it stays inside the tables,
    so the values are only meaningless). ``zero_grads``: a
    ``TableGrads(zero="forward")`` this call zeroes for the backward (see ``TableGrads``). Not collective (a
    ``ShardedTable``'s rows are read from their owners one-sidedly). ``check_ids`` must be a bool (TypeError).

    Raises ``CoActionArgumentError`` (a TypeError and a ValueError) for an array whose shape does not fit ``spec``
    or the mask, or a mask / ids / ``out`` of another dtype or not contiguous; TypeError for an induction / feed of
    another dtype than ``dtype``, a non-device array or a ``zero_grads`` that is not a ``TableGrads``; ValueError for
    a non-contiguous induction / feed, B or T beyond the kernels' limits, an array on another device, ids out of
    range (with ``check_ids``) or a spec beyond the kernels' limits; DwdpError for a closed ``ShardedTable``."""
    check_flag(check_ids)
    spec = _spec(spec)
    return _forward(_args(spec, induction, feed, mask, ind_ids, feed_ids, dtype), induction, dtype, stream,
                    check_ids, zero_grads, out)


def _forward(a: tuple, induction: Any, dtype: str, stream: Any, check_ids: bool, zero_grads: Any, out: Any):
    """``coaction_forward_gpu`` past its argument checks: ``a`` is ``_args``'s result for these arrays."""
    import cupy as cp

    geo, (bases, rps, nrows), fd, mk, ip, fp, storage, (_, induction_dim, out_dim) = a
    B, T = geo[-2], geo[-1]
    if B == 0:  # (launches nothing: the spec's limits are checked here)
        _check_runnable(geo[:6], False)
    h = stream_handle(stream)
    if zero_grads is None:
        zp, zn = [], []
    elif isinstance(zero_grads, TableGrads):
        if isinstance(induction, ShardedTable):
            raise ValueError("a ShardedTable's row gradients go to its grad shards: pass zero_grads=None")
        zp, zn = zero_grads._zero_targets((nrows, induction_dim), tuple(fd.shape), h)
    else:
        raise TypeError(f"zero_grads must be a TableGrads or None, got {type(zero_grads).__name__}")
    if out is None:
        with cupy_stream(stream):  # the output belongs to the stream that writes it
            # T == 0: nothing to pool, the output is zero (the kernel is not launched)
            out = cp.zeros((B, out_dim), dtype=storage) if T == 0 else cp.empty((B, out_dim), dtype=storage)
        out_ptr = out.data.ptr
    else:
        ob = device_buffer(out, "out")
        if ob.dtype != storage or ob.shape != (B, out_dim) or not ob.contiguous:
            raise CoActionArgumentError(f"out must be a contiguous {dtype} [{B}, {out_dim}] array ({storage} "
                                        f"storage), got {'contiguous' if ob.contiguous else 'non-contiguous'} "
                                        f"{ob.dtype} {list(ob.shape)}")
        _check_device_of("out", out, ob.ptr, "the forward runs on device")
        out_ptr = ob.ptr
        if T == 0 and B:
            cp.cuda.runtime.memsetAsync(out_ptr, 0, B * out_dim * storage.itemsize, h)
    frows = fd.shape[0]
    if zero_grads is not None:  # (before the call: a launch that fails may have queued a memset already)
        zero_grads._by = h  # queued there: ready_on / close wait for that stream from here on
        zero_grads._streams.append(stream if stream is not None else cp.cuda.get_current_stream())
    if B == 0:  # no sample: nothing to read or check, out is [0, out_dim]; only the gradients to zero, on the stream
        for ptr, n in zip(zp, zn):
            if ptr and n > 0:
                cp.cuda.runtime.memsetAsync(ptr, 0, 4 * n, h)
        return out
    # without ids there is nothing to check (and no wait: the launch keeps the GIL)
    try:
        bad = native().coaction_forward(*geo, bases, rps, nrows, ip, fd.ptr, fp, frows, mk.ptr, out_ptr, h,
                                        bool(check_ids and (ip or fp)), zp, zn)
    except BaseException:
        if zero_grads is not None:
            zero_grads._failed = True  # (close() still waits for that stream)
        raise
    _raise_bad_ids(bad, nrows, frows)
    return out


def coaction_backward_gpu(induction: Any, feed: Any, mask: Any, grad_out: Any, spec: CoActionSpec | None = None, *,
                          ind_ids=None, feed_ids=None, dtype: str = "float32", stream: Any = None,
                          check_ids: bool = True, grads: Any = None):
    """Fused backward; returns float32 ``(grad_induction, grad_feed)`` shaped like ``induction`` and ``feed``
    (table-shaped when ids are given). For a ``ShardedTable`` the row gradients go to their owners' ``grad``
    shards and ``grad_induction`` is this rank's ``grad`` (complete after ``table.sync()``).

    ``induction`` (gathered rows ``[B, D']``, a table ``[rows, D']`` with ``ind_ids``, or a ``ShardedTable``),
    ``feed`` (``[B, T, D]``, or a table ``[rows, D]`` with ``feed_ids``), ``mask`` (contiguous float32 ``[B, T]``),
    ``ind_ids`` (int64 ``[B]``), ``feed_ids`` (int64 ``[B, T]``), ``dtype`` (``"float32"`` or ``"bfloat16"``) and
    ``spec`` are the forward's; ``grad_out`` is d loss / d output, a contiguous float32 ``[B, spec.out_dim]`` device
    array (float32 for a bf16 forward too). ``check_ids``: the forward's id check, awaited before the launch.

    ``grads``: where the gradients go. None: two new arrays, zeroed on ``stream`` in front of the kernel. A
    ``TableGrads``: its two arrays (zeroed ahead; ``stream`` waits for that zeroing first), returned. A pair
    ``(grad_induction, grad_feed)`` of caller-allocated contiguous float32 arrays shaped like the induction and feed
    tables, on the op's device and ready on ``stream``, with ``ind_ids`` and ``feed_ids`` given: the backward **adds**
    into them (gradient accumulation) and returns them (gathered rows' gradients are written, not added, so a pair
    needs both ids). A ``ShardedTable`` takes only None. Not collective (a ``ShardedTable``'s remote adds aside).
    ``check_ids`` must be a bool (TypeError). Raises as ``coaction_forward_gpu`` for the inputs, and
    ``CoActionArgumentError`` for a ``grad_out`` that is not a contiguous float32 ``[B, out_dim]``; misused ``grads``
    (not a pair, a pair without both ids, a used or unzeroed ``TableGrads``, grads with a ``ShardedTable``) raise
    TypeError or ValueError naming it."""
    check_flag(check_ids)
    spec = _spec(spec)
    return _backward(_args(spec, induction, feed, mask, ind_ids, feed_ids, dtype), induction,
                     ind_ids is not None and feed_ids is not None, grad_out, stream, check_ids, grads)


def _backward(a: tuple, induction: Any, both_ids: bool, grad_out: Any, stream: Any, check_ids: bool, grads: Any):
    """``coaction_backward_gpu`` past the checks of its inputs: ``a`` is ``_args``'s result for these arrays (a
    training step's forward and backward take the same ones: the autograd op computes it once, in its forward);
    ``both_ids``: both id arrays were given."""
    import cupy as cp

    geo, (bases, rps, nrows), fd, mk, ip, fp, _, (_, induction_dim, out_dim) = a
    if geo[-2] == 0:  # (launches nothing: the spec's limits are checked here)
        _check_runnable(geo[:6], True)
    h = stream_handle(stream)
    if check_ids:
        _check_ids(ip, geo[-2], nrows, fp, geo[-1], fd.shape[0], h, mk.ptr)
    g = device_buffer(grad_out, "grad_out")
    if g.dtype != np.float32 or g.shape != (geo[-2], out_dim) or not g.contiguous:
        raise CoActionArgumentError(f"grad_out must be a contiguous float32 [{geo[-2]}, {out_dim}] array, "
                                    f"got {g.dtype} {list(g.shape)}")
    sharded = isinstance(induction, ShardedTable)
    tg = grads if isinstance(grads, TableGrads) else None
    if grads is not None:
        if sharded:
            raise ValueError("a ShardedTable's row gradients go to its grad shards: pass grads=None")
        if tg is None:
            if not isinstance(grads, tuple | list) or len(grads) != 2:
                raise TypeError(f"grads must be None, a TableGrads or a pair (grad_induction, grad_feed), got "
                                f"{type(grads).__name__}")
            if not both_ids:  # gathered rows' gradients are written, not added
                raise ValueError("grads=(grad_induction, grad_feed) adds into table-shaped gradients: it needs ind_ids "
                                 "and feed_ids (gathered rows' gradients are written where the mask is set, not "
                                 "added); use a TableGrads or grads=None")
            g_ind, g_feed = grads
            gi_ptr, gf_ptr = _grad_pair(grads, ((nrows, induction_dim), tuple(fd.shape)), "the backward runs on device")
        else:  # (its arrays were checked when it was made: only their shapes against this op's; _take: the device)
            for name, have, want in zip(("grad_induction", "grad_feed"), tg._shapes,
                                        ((nrows, induction_dim), tuple(fd.shape))):
                if have != want:
                    raise CoActionArgumentError(f"{name} must be a contiguous float32 {list(want)} array (the "
                                                f"gradient it adds into), got contiguous float32 {list(have)}")
            tg._take(h)
            g_ind, g_feed = tg.arrays
            gi_ptr, gf_ptr = tg._targets[0]
        grads_ptrs = [gi_ptr]
    else:
        with cupy_stream(stream):  # zeroed on the stream whose kernel adds into them
            if sharded:
                g_ind, grads_ptrs = induction.grad, induction.grad_bases
            else:
                g_ind = cp.zeros((nrows, induction_dim), cp.float32)
                grads_ptrs = [g_ind.data.ptr]
            g_feed = cp.zeros(fd.shape, cp.float32)
        gf_ptr = g_feed.data.ptr
    if geo[-2]:  # (no sample: no gradient to add; the arrays returned are as zeroed or given)
        native().coaction_backward(*geo, bases, grads_ptrs, rps, nrows, ip, fd.ptr, fp, fd.shape[0], mk.ptr, g.ptr,
                                   gf_ptr, h)
    if tg is not None:
        tg._release_after(h)
    return g_ind, g_feed


_ONE_DEVICE: bool | None = None  # the process sees one CUDA device (no array can be on another), read once


def _array_device(a: Any, ptr: int | None = None) -> int | None:
    """The CUDA device an array is on: a ``DeviceBuffer``'s ``.device``, a CUDA PyTorch tensor's ``get_device()`` and
    CuPy's ``.data.device_id`` first (cheap: this runs for every array of every call), then any ``.device`` that is
    an int or has ``.id`` / ``.index``; for any other object, that of its address ``ptr`` when one is given
    (``cudaPointerGetAttributes``); None if neither is known."""
    if type(a) is DeviceBuffer:
        return a.device
    if getattr(a, "is_cuda", False) is True:  # PyTorch (before .data, which makes a tensor)
        return a.get_device()
    dev = getattr(getattr(a, "data", None), "device_id", None)  # CuPy's MemoryPointer (not .device: an object a call)
    if type(dev) is int:
        return dev
    d = getattr(a, "device", None)
    if type(d) is int:
        return d
    for attr in ("id", "index"):  # (ints only: NumPy's device is the string "cpu", whose .index is a method)
        dev = getattr(d, attr, None)
        if type(dev) is int:
            return dev
    if ptr:
        import cupy as cp

        return cp.cuda.runtime.pointerGetAttributes(ptr).device
    return None


def _check_devices(named: list, where: str) -> None:
    """ValueError naming the first ``(name, array, ptr)`` whose array says it is on another device than the current
    one (``_array_device`` without an address: nothing is looked up from a bare address, and an array that does not
    say passes, as an empty one does). Nothing to check in a process that sees one device."""
    global _ONE_DEVICE
    if _ONE_DEVICE:
        return
    known = [(name, on) for name, a, ptr in named if ptr and (on := _array_device(a)) is not None]
    if not known:
        return
    import cupy as cp

    if _ONE_DEVICE is None:
        _ONE_DEVICE = cp.cuda.runtime.getDeviceCount() == 1
    dev = cp.cuda.runtime.getDevice()
    for name, on in known:
        if on != dev:
            raise ValueError(f"{name} is on device {on}, {where} ({dev}): move it there, or make that device current")


def _check_device_of(name: str, a: Any, ptr: int, where: str) -> None:
    """ValueError naming ``name`` unless array ``a`` (at ``ptr``) is on the current device (an empty array, whose
    device is unknown, passes); the message ends "..., {where} {current device}"."""
    import cupy as cp

    on, dev = _array_device(a, ptr), cp.cuda.runtime.getDevice()
    if on is not None and on != dev:
        raise ValueError(f"{name} is on device {on}, {where} {dev}")


def _grad_pair(pair, shapes: tuple, where: str) -> tuple[int, int]:
    """The addresses of a caller's gradient pair ``(grad_induction, grad_feed)``, each checked to be a contiguous
    float32 array of its shape in ``shapes`` on the current device (``where``: see ``_check_device_of``)."""
    ptrs = []
    for name, a, shape in zip(("grad_induction", "grad_feed"), pair, shapes):
        ptrs.append(_grad_buffer(a, name, shape))
        _check_device_of(name, a, ptrs[-1], where)
    return ptrs[0], ptrs[1]


def _grad_buffer(a: Any, name: str, shape: tuple) -> int:
    """The device address of ``a``, checked to be a contiguous float32 array of ``shape``."""
    b = device_buffer(a, name)
    if b.dtype != np.float32 or tuple(b.shape) != tuple(shape) or not b.contiguous:
        raise CoActionArgumentError(f"{name} must be a contiguous float32 {list(shape)} array (the gradient it adds "
                                    f"into), got {'contiguous' if b.contiguous else 'non-contiguous'} {b.dtype} "
                                    f"{list(b.shape)}")
    return b.ptr
