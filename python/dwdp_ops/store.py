"""Where a rank's experts live, and the per-layer views of all E experts (``composite``, ``table``, ``merge``).

``ExpertStore`` owns, for the MoE layers of one model on this rank:
  * local storage: one VMM allocation per (layer, tensor kind) holding this rank's L experts, its size rounded up to
    NVSHMEM's registration unit, registered symmetric so that peers read it one-sidedly;
  * remote slots: two ping-pong page pools per tensor kind (layer parity 0 and 1), each with room for the
    ``E - L`` experts a layer fetches, as two allocations (the experts below and above the local range);
  * a composite virtual range per (layer, tensor kind): ``[E, ...]`` with this rank's physical local pages mapped
    zero-copy in the middle and the pages of the layer parity's slot pool around them. ``cuMemMap`` maps an
    allocation only from offset 0, which is why each piece is an allocation of its own.

Views of a layer (all of the same bytes, no copy for the first two):
  * ``composite(layer, name)``: a plain strided ``[E, ...]`` array any MoE kernel can read;
  * ``table(layer, name)``: a device array of E pointers (local storage or slot), for pointer-array grouped GEMMs;
  * ``merge(layer, name)``: a device-to-device copy into a dense ``[E, ...]`` buffer (the baseline).

Fetch engines fill a layer's remote slots from the owners: ``fetch_ce`` (copy engine, per-peer or interleaved
slices, optionally one ``cudaMemcpyBatchAsync``) and ``fetch_nvshmem`` (SM-driven kernel over a device-resident
list of expert ids). Plans are built once per layer and cached; fetching allocates nothing.

Invariants:
  * Geometry (partition, layout, layer count) is identical on every rank: checked collectively at construction.
  * Layers of the same parity share slots: fetching layer l overwrites what layer l-2 fetched. The caller orders
    this (the prefetch scheduler's consumed events); the store does not.
  * Construction is collective and runs in three phases (local storage, symmetric registration, slots and views);
    after each phase the ranks agree on the control plane, so a failure on any rank makes every rank release what it
    created (in reverse order) and raise the same error naming the failed ranks, instead of leaving peers waiting in
    NVSHMEM. Errors met while releasing are reported (an exception note, or a DwdpError from ``close()``), never
    swallowed. ``close()`` is collective (it unregisters symmetric memory).
  * Stream order: everything a call enqueues (kernels, copies, and the temporaries it allocates, such as a host id
    list copied to the device) goes on the caller's stream; a temporary returns to the memory pool of that stream
    (CuPy's pool is stream-ordered), so it is reused only behind the work that reads it. Plans and descriptor tables
    are built once, synchronously, before any stream reads them (``prepare``); a CUDA-graph capture never builds one.
  * Per-stream scratch: the repeat-detection array and the error flag of ``fetch_nvshmem`` exist once per stream, so
    fetches on different streams never share them. A graph captured on stream S uses S's scratch.
  * Lifetimes: ``release(layer)`` makes the layer's views and fetches raise, but its device tables stay alive until
    ``close()`` (a fetch already queued may still read them). After ``dwdp_ops.finalize()`` every call raises.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ._checks import is_int, launch_args
from .errors import DwdpError
from .interop import cupy_stream, device_buffer, stream_handle
from .layout import ExpertLayout, local_allocation_bytes, registration_overhead
from .partition import ExpertPartition
from .runtime import Runtime, get_runtime
from .schedule import DEFAULT_SLICE, Copy, Schedule, _check_slice, order_copies, peer_order

# Mirrors dwdp::ExpertCopy in cpp/include/dwdp/fetch.h.
EXPERT_COPY_DTYPE = np.dtype(
    [("src", "<u8"), ("src_peer", "<u8"), ("dst", "<u8"), ("bytes", "<u8"), ("pe", "<i4"), ("pad", "<i4")]
)


class ExpertStore:
    """The expert storage, slots and views of one rank (module docstring).

    Construction is collective: every rank constructs it at the same point with the same partition, layout and
    ``num_layers`` (checked on the control plane). Raises DwdpError before ``init()``, for a
    geometry that differs between ranks, for an NVSHMEM registration unit that does not divide the local blocks, or
    when a construction phase failed on any rank (every rank raises); ValueError for a partition of another world
    size, ``num_layers < 1`` or a layout page that is not a multiple of the VMM granularity; TypeError for a
    ``num_layers`` that is not an int. Views and fetches are local unless their docstring says otherwise; they and the
    address helpers raise DwdpError after ``close()``, for a released layer, and after ``dwdp_ops.finalize()``."""

    def __init__(
        self,
        partition: ExpertPartition,
        layout: ExpertLayout,
        num_layers: int,
        *,
        runtime: Runtime | None = None,
    ):
        rt = runtime or get_runtime()
        rt.require("ExpertStore")
        if partition.world_size != rt.world_size():
            raise ValueError(
                f"partition is for world size {partition.world_size} but the runtime has {rt.world_size()} ranks"
            )
        if not is_int(num_layers):
            raise TypeError(f"num_layers must be an int >= 1, got {num_layers!r} ({type(num_layers).__name__})")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        num_layers = int(num_layers)  # numpy integers: the geometry is JSON
        self.rt, self.be = rt, rt.backend
        self.partition, self.layout, self.num_layers = partition, layout, num_layers
        self.rank, self.world, self.device = rt.rank(), rt.world_size(), rt.device
        self.E, self.L = partition.num_experts, partition.experts_per_rank
        self.lo, self.hi = partition.local_range(self.rank)
        self.register_unit = register_unit = self.be.register_unit()
        self.registration_overhead = registration_overhead(layout, self.L, register_unit)
        if self.registration_overhead:
            raise DwdpError(
                f"ExpertStore: NVSHMEM registers buffers in units of {register_unit} bytes, which do not divide this "
                f"rank's local expert blocks ({[self.L * s for s in layout.strides]} bytes); a padded block could not "
                "be mapped whole into the composite view. Leave NVSHMEM_CUMEM_GRANULARITY unset (dwdp_ops.init sets "
                "2 MiB) or set it to the page size."
            )
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._released: set[int] = set()
        self._closed = False
        self._released_barrier = False  # close() passed its barrier (the release may then run, and be retried)
        self._cache: dict[Any, Any] = {}
        self._scratch: dict[int, tuple[Any, Any]] = {}  # stream handle -> (error flag [2], first occurrence [E])
        self._retired: list[Any] = []  # device tables of released layers, freed at close()
        geometry = json.dumps(
            [partition.num_experts, partition.experts_per_rank, partition.stride, num_layers,
             [[t.name, list(t.shape), t.dtype] for t in layout.tensors], layout.page, register_unit]
        ).encode()
        views = rt.rendezvous.allgather("ExpertStore", geometry)
        if any(v != geometry for v in views):
            bad = [r for r, v in enumerate(views) if v != views[0]]
            raise DwdpError(f"ExpertStore: rank(s) {bad} describe a different partition/layout/layer count than rank 0")
        gran = self.be.vmm_granularity(self.device)
        if layout.page % gran:
            raise ValueError(f"layout page {layout.page} is not a multiple of the device's VMM granularity {gran}")
        try:
            for phase, build in (("local storage", self._build_local), ("registration", self._build_register),
                                 ("slots and views", self._build_views)):
                failure = None
                try:
                    build()
                except Exception as e:  # noqa: BLE001 - every rank must learn of it before anyone raises
                    failure = e
                self._agree(phase, failure)
        except BaseException as e:
            self._rollback(e)
            raise

    # -- construction ----------------------------------------------------------------------------------------
    def _agree(self, phase: str, failure: BaseException | None) -> None:
        """All ranks report how ``phase`` went; if it failed anywhere, every rank raises the same DwdpError."""
        mine = b"" if failure is None else f"{type(failure).__name__}: {failure}".encode()
        views = self.rt.rendezvous.allgather(f"ExpertStore:{phase}", mine)
        failed = {r: v.decode(errors="replace") for r, v in enumerate(views) if v}
        if failed:
            detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items()))
            raise DwdpError(
                f"ExpertStore construction failed in phase '{phase}' on rank(s) {sorted(failed)} ({detail}); every "
                "rank released what it had created"
            ) from failure

    def _push(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def _rollback(self, cause: BaseException | None = None, keep_failed: bool = False) -> None:
        """Releases everything created so far, in reverse order. Every step is attempted; failures are reported on
        ``cause`` (as a note) or, without one, raised as one DwdpError. With ``keep_failed`` the failed steps stay
        queued (in their order), so a later call retries them; the ones that succeeded never run again."""
        errors = []
        failed: list[tuple[str, Callable[[], None]]] = []
        while self._undo:
            what, fn = self._undo.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - release the rest, then report
                errors.append(f"{what}: {e}")
                failed.append((what, fn))
        if keep_failed:
            self._undo = failed[::-1]
        if errors:
            msg = f"ExpertStore: {len(errors)} release step(s) failed: " + "; ".join(errors[:8])
            if cause is None:
                raise DwdpError(msg)
            if hasattr(cause, "add_note"):
                cause.add_note(msg)
            else:  # Python 3.10
                import warnings

                warnings.warn(msg, stacklevel=3)

    def _physical(self, nbytes: int) -> tuple[int, int]:
        """(handle, va) of a new allocation mapped at a fresh virtual range."""
        be, dev = self.be, self.device
        h = be.vmm_create(nbytes, dev)
        self._push("vmm_release", lambda: be.vmm_release(h))
        va = be.vmm_reserve(nbytes, 0)
        self._push("vmm_free", lambda: be.vmm_free(va, nbytes))
        be.vmm_map(va, nbytes, h, 0, dev)
        self._push("vmm_unmap", lambda: be.vmm_unmap(va, nbytes))
        return h, va

    def _build_local(self) -> None:
        """Phase 1 (local): one allocation per (layer, tensor kind) for this rank's experts."""
        self._local: dict[tuple[int, int], tuple[int, int, int, list[int]]] = {}  # handle, va, sym, peer bases
        for layer in range(self.num_layers):
            for ti, t in enumerate(self.layout.tensors):
                size = local_allocation_bytes(self.layout, t.name, self.L, self.register_unit)
                h, va = self._physical(size)
                self._local[layer, ti] = (h, va, 0, [])

    def _build_register(self) -> None:
        """Phase 2 (collective in NVSHMEM, same order and sizes on every rank): register the local allocations."""
        be = self.be
        for (layer, ti), (h, va, _sym, _peers) in sorted(self._local.items()):
            size = local_allocation_bytes(self.layout, self.layout.tensors[ti].name, self.L, self.register_unit)
            sym = be.register_symmetric(va, size)
            self._push("unregister_symmetric", lambda sym=sym, size=size: be.unregister_symmetric(sym, size))
            self._local[layer, ti] = (h, va, sym, [be.symmetric_peer_ptr(sym, p) for p in range(self.world)])

    def _build_views(self) -> None:
        """Phase 3 (local): slot pools and the composite ranges."""
        be, dev, lay = self.be, self.device, self.layout
        # Remote slots per (parity, tensor kind): the experts below the local range, and those above it.
        self.parities = min(2, self.num_layers)
        self._slot: dict[tuple[int, int, str], tuple[int, int]] = {}
        for parity in range(self.parities):
            for ti, stride in enumerate(lay.strides):
                if self.lo:
                    self._slot[parity, ti, "below"] = self._physical(self.lo * stride)
                if self.hi < self.E:
                    self._slot[parity, ti, "above"] = self._physical((self.E - self.hi) * stride)
        # Composite ranges: [0, lo) and [hi, E) from the slot allocations, [lo, hi) from local storage.
        self._composite: dict[tuple[int, int], int] = {}
        for layer in range(self.num_layers):
            parity = layer % self.parities
            for ti, stride in enumerate(lay.strides):
                size = self.E * stride
                va = be.vmm_reserve(size, 0)
                self._push("vmm_free", lambda va=va, size=size: be.vmm_free(va, size))
                pieces = [(self.lo * stride, self.L * stride, self._local[layer, ti][0])]
                if self.lo:
                    pieces.append((0, self.lo * stride, self._slot[parity, ti, "below"][0]))
                if self.hi < self.E:
                    pieces.append((self.hi * stride, (self.E - self.hi) * stride, self._slot[parity, ti, "above"][0]))
                for off, n, handle in pieces:
                    be.vmm_map(va + off, n, handle, 0, dev)
                    self._push("vmm_unmap", lambda a=va + off, n=n: be.vmm_unmap(a, n))
                self._composite[layer, ti] = va

    # -- addressing --------------------------------------------------------------------------------------------
    def _check_layer(self, layer: int, what: str) -> None:
        """The views', plans' and address helpers' shared check: a live runtime, an open store, an integer layer in
        range that was not released."""
        self.rt.require(f"ExpertStore.{what}")
        if self._closed:
            raise DwdpError(f"{what}: the ExpertStore is closed")
        if not is_int(layer) or not 0 <= layer < self.num_layers:  # (bools refused: True is not layer 1)
            raise ValueError(f"{what}: layer {layer} is outside [0, {self.num_layers})")
        if layer in self._released:
            raise DwdpError(f"{what}: layer {layer} was released")

    def _check(self, layer: int, name: str, what: str) -> int:
        self._check_layer(layer, what)
        return self.layout.index(name)

    def _where(self, what: str, layer: int, ti: int, expert: int, lo: int, hi: int) -> None:
        """Cheap host-side checks shared by the address helpers: the views' layer check (live runtime, open store,
        layer in range and not released), then an integer tensor kind and expert in range."""
        self._check_layer(layer, what)
        n = len(self.layout.strides)
        if not is_int(ti) or not 0 <= ti < n:
            raise ValueError(f"{what}: tensor kind {ti!r} is outside [0, {n})")
        if not is_int(expert) or not lo <= expert < hi:
            raise ValueError(f"{what}: expert {expert!r} is outside [{lo}, {hi})")

    def local_address(self, layer: int, ti: int, expert: int) -> int:
        """Address of this rank's copy of local expert ``expert`` (in ``[lo, hi)``) of ``layer``, tensor kind ``ti``."""
        self._where("local_address", layer, ti, expert, self.lo, self.hi)
        return self._local[layer, ti][1] + (expert - self.lo) * self.layout.strides[ti]

    def _owner_address(self, layer: int, ti: int, expert: int, peer: int, base: str) -> int:
        """Address of ``peer``'s copy of ``expert``: symmetric (for NVSHMEM gets) or its P2P mapping (loads, CE)."""
        _h, _va, sym, peers = self._local[layer, ti]
        start = self.partition.local_range(peer)[0]
        root = sym if base == "sym" else peers[peer]
        if root == 0:
            raise DwdpError(f"PE {peer} is not P2P-reachable from PE {self.rank}: use the NVSHMEM engine")
        return root + (expert - start) * self.layout.strides[ti]

    def slot_address(self, layer: int, ti: int, expert: int) -> int:
        """Where remote expert ``expert`` (in ``[0, E)``, outside ``[lo, hi)``) of ``layer`` lands (its slot)."""
        self._where("slot_address", layer, ti, expert, 0, self.E)
        if self.lo <= expert < self.hi:
            raise ValueError(f"expert {expert} is local to rank {self.rank}; it has no slot")
        parity = layer % self.parities
        if expert < self.lo:
            return self._slot[parity, ti, "below"][1] + expert * self.layout.strides[ti]
        return self._slot[parity, ti, "above"][1] + (expert - self.hi) * self.layout.strides[ti]

    def expert_address(self, layer: int, ti: int, expert: int) -> int:
        """Address of expert ``expert`` (in ``[0, E)``) of ``layer``: its local copy or its slot."""
        self._where("expert_address", layer, ti, expert, 0, self.E)
        if self.lo <= expert < self.hi:
            return self.local_address(layer, ti, expert)
        return self.slot_address(layer, ti, expert)

    def _array(self, ptr: int, shape: tuple[int, ...], ti: int, n: int, owner: Any):
        import cupy as cp

        spec = self.layout.tensors[ti]
        dt = spec.storage
        inner = [dt.itemsize]
        for d in reversed(spec.shape[1:]):
            inner.insert(0, inner[0] * d)
        strides = (self.layout.strides[ti], *inner)
        nbytes = (n - 1) * self.layout.strides[ti] + spec.nbytes
        mem = cp.cuda.UnownedMemory(ptr, nbytes, owner, device_id=self.device)
        return cp.ndarray((n, *shape), dt, cp.cuda.MemoryPointer(mem, 0), strides)

    # -- views ---------------------------------------------------------------------------------------------------
    def local(self, layer: int, name: str):
        """This rank's ``[L, *shape]`` experts of ``layer`` (``shape``: the tensor kind ``name``'s), a CuPy array of
        its storage dtype (uint8 for fp8, uint16 for bf16 bits) over local storage, strided by the page-rounded stride
        (not contiguous across experts). Returned, no copy, valid until ``close()``. Local. Raises ValueError for a
        layer outside ``[0, num_layers)``, KeyError for a ``name`` the layout does not hold."""
        ti = self._check(layer, name, "local")
        return self._array(self.local_address(layer, ti, self.lo), self.layout.tensors[ti].shape, ti, self.L, self)

    def composite(self, layer: int, name: str):
        """``[E, *shape]`` over the layer's composite range: local experts zero-copy, remote ones in the slots. A
        CuPy array of the storage dtype, strided as ``local``; returned, no copy, valid until ``close()``. The remote
        rows hold layer ``layer`` only after its fetch has run (on the fetching stream) and until a fetch of another
        layer of the same parity overwrites the slots. Local; raises as ``local``."""
        ti = self._check(layer, name, "composite")
        return self._array(self._composite[layer, ti], self.layout.tensors[ti].shape, ti, self.E, self)

    def table(self, layer: int, name: str):
        """A device array ``[E]`` uint64 of pointers to each expert's tensor (local storage or slot), for
        pointer-array grouped GEMMs. Built on first use (copied and synchronised; refused with DwdpError inside a
        CUDA-graph capture: call ``table`` once before capturing, ``prepare()`` does not build these), cached and
        owned by the store until ``close()``. Local; raises as ``local``."""

        ti = self._check(layer, name, "table")
        key = ("table", layer, ti)
        if key not in self._cache:
            ptrs = np.array([self.expert_address(layer, ti, e) for e in range(self.E)], dtype=np.uint64)
            self._cache[key] = self._device_const(ptrs, "table", remedy=f"call store.table({layer}, {name!r})")
        return self._cache[key]

    def _device_const(self, host: np.ndarray, what: str, remedy: str = "call store.prepare()"):
        """A device copy of ``host`` that every stream may read: copied and synchronised now (plans are built once,
        before use). Refused while a CUDA graph is being captured (a synchronisation would break the capture), the
        error saying to ``remedy`` first."""
        import cupy as cp

        with cp.cuda.Device(self.device):
            s = cp.cuda.get_current_stream()
            if self.be.stream_is_capturing(s.ptr):
                raise DwdpError(
                    f"ExpertStore: the {what} plan is built on first use, which cannot happen inside a CUDA graph "
                    f"capture; {remedy} (or run the step once eagerly) before capturing"
                )
            dev = cp.asarray(host)
            s.synchronize()
        return dev

    def merge(self, layer: int, name: str, out: Any = None, stream: Any = None):
        """Copies all E experts into a dense ``[E, *shape]`` array on ``stream`` (one batched copy-engine call) and
        returns it. ``out``: None (a new contiguous CuPy array of the storage dtype, allocated on ``stream``) or a
        caller-allocated contiguous device array of shape ``[E, *shape]`` and the storage dtype (uint8 for fp8, uint16
        for bf16 bits; a PyTorch bf16 / float8_e4m3fn tensor reads as those). The copy is valid once ``stream`` has run
        it; the remote experts must have been fetched before, in stream order. Local. Raises TypeError for an ``out``
        of another dtype or not a device array, ValueError for one of another shape or non-contiguous (both before
        anything is launched), and as ``local``."""
        import cupy as cp

        ti = self._check(layer, name, "merge")
        spec = self.layout.tensors[ti]
        if out is None:
            with cupy_stream(stream):  # allocated on the stream that writes it
                out = cp.empty((self.E, *spec.shape), dtype=spec.storage)
        d = device_buffer(out, "merge out")
        self._check_dtype(d.dtype, spec, "merge out")
        want = (self.E, *spec.shape)
        if tuple(d.shape) != want or not d.contiguous:
            raise ValueError(f"merge out: expected a contiguous array of shape {list(want)}, got shape "
                             f"{list(d.shape)}{'' if d.contiguous else ' (not contiguous)'}")

        dsts = np.array([d.ptr + e * spec.nbytes for e in range(self.E)], dtype=np.uint64)
        srcs = np.array([self.expert_address(layer, ti, e) for e in range(self.E)], dtype=np.uint64)
        sizes = np.full(self.E, spec.nbytes, dtype=np.uint64)
        self.be.ce_copy(dsts, srcs, sizes, stream_handle(stream), True)
        return out

    # -- loading ---------------------------------------------------------------------------------------------------
    def load(self, layer: int, name: str, experts: Any, stream: Any = None) -> None:
        """Packs this rank's experts of ``layer`` into local storage with the pack kernel. ``experts`` is a stacked
        ``[E, ...]`` (this rank's slice is taken) or ``[L, ...]`` device array, or a sequence of L per-expert device
        arrays, of the tensor's storage dtype (uint8 for fp8, uint16 for bf16 bits), each expert 16-byte aligned and a
        multiple of 16 bytes. It synchronizes ``stream`` (not the whole device) when done; peers may fetch these
        experts only after a barrier that every rank reaches after its loads. Local (the barrier is the caller's).
        Raises TypeError for another dtype or a non-device array, ValueError for a wrong shape or count, a
        non-contiguous stacked array or a misaligned expert."""
        import cupy as cp

        ti = self._check(layer, name, "load")
        spec = self.layout.tensors[ti]
        if isinstance(experts, Sequence) and not hasattr(experts, "__cuda_array_interface__"):
            if len(experts) != self.L:
                raise ValueError(f"load: expected {self.L} per-expert tensors for rank {self.rank}, got {len(experts)}")
            ptrs = [self._expert_ptr(x, spec, f"{name}[{i}]") for i, x in enumerate(experts)]
        else:
            d = device_buffer(experts, f"load {name}")
            self._check_dtype(d.dtype, spec, name)
            if d.shape[1:] != spec.shape or d.shape[0] not in (self.E, self.L):
                raise ValueError(
                    f"load {name}: expected shape [{self.E} or {self.L}, {', '.join(map(str, spec.shape))}], got {list(d.shape)}"
                )
            if not d.contiguous:
                raise ValueError(f"load {name}: the stacked tensor must be contiguous")
            first = self.lo if d.shape[0] == self.E else 0
            ptrs = [d.ptr + (first + i) * spec.nbytes for i in range(self.L)]
        bad = [p for p in ptrs if p % 16]
        if bad or spec.nbytes % 16:
            raise ValueError(f"load {name}: expert tensors must start on 16-byte boundaries and hold a multiple of 16 bytes")
        s = stream_handle(stream)
        with cupy_stream(s):  # the pointer table is copied on the stream the pack kernel runs on
            table = cp.asarray(np.array(ptrs, dtype=np.uint64))
            self.be.pack_experts(self.local_address(layer, ti, self.lo), self.layout.strides[ti], table.data.ptr,
                                 spec.nbytes, self.L, s)
            cp.cuda.get_current_stream().synchronize()  # the table lives until the kernel has read it

    @staticmethod
    def _check_dtype(dt: np.dtype, spec, name: str) -> None:
        if dt != spec.storage:
            raise TypeError(
                f"{name}: expected storage dtype {spec.storage} for {spec.dtype} weights, got {dt} "
                "(fp8 e4m3 travels as uint8 bytes, bf16 as uint16 bits)"
            )

    def _expert_ptr(self, x: Any, spec, what: str) -> int:
        d = device_buffer(x, what)
        self._check_dtype(d.dtype, spec, what)
        if d.shape != spec.shape or not d.contiguous:
            raise ValueError(f"{what}: expected a contiguous tensor of shape {list(spec.shape)}, got {list(d.shape)}")
        return d.ptr

    # -- fetch: copy engine ------------------------------------------------------------------------------------------
    def ce_copies(self, layer: int) -> list[Copy]:
        """The layer's remote runs as copies (whole page-rounded strides, one per tensor kind and run)."""
        self._check(layer, self.layout.tensors[0].name, "ce_copies")
        out = []
        for ti, stride in enumerate(self.layout.strides):
            for peer, a, b in self.partition.fetch_plan(self.rank):
                src = self._owner_address(layer, ti, a, peer, "peer")
                out.append(Copy(peer, self.slot_address(layer, ti, a), src, (b - a) * stride))
        return out

    def _ce_plan(self, layer: int, schedule: Schedule, slice_bytes: int):
        if slice_bytes is not None:  # (before the cache key: a list was unhashable, 2.0 / True hit 2's / 1's plan)
            slice_bytes = _check_slice(slice_bytes)
        key = ("ce", layer, schedule, slice_bytes)
        if key not in self._cache:
            copies = order_copies(self.ce_copies(layer), self.rank, self.world, schedule, slice_bytes)
            self._cache[key] = tuple(np.array(x, dtype=np.uint64) for x in zip(*[(c.dst, c.src, c.nbytes) for c in copies]))
        return self._cache[key]

    def fetch_ce(
        self, layer: int, stream: Any = None, *, schedule: Schedule = "staggered", slice_bytes: int = DEFAULT_SLICE,
        batched: bool = True,
    ) -> int:
        """Fills every remote slot of ``layer`` with the copy engine, on ``stream``. Returns the bytes moved.
        ``staggered`` (the default) reached the raw peer-copy rate on 4 x H200 while ``per_peer`` lost half of it to
        owner contention and ``interleaved`` slices a third to per-copy overhead (docs/benchmarks.md). ``batched``:
        True or False (TypeError otherwise). Local and one-sided (the owners take no part; their loads must be done,
        ordered by a barrier); the slots hold the layer once ``stream`` has run the copies, and a later fetch of a
        layer of the same parity overwrites them (the caller orders that). Needs every owner P2P-reachable (DwdpError
        otherwise: use ``fetch_nvshmem``); ValueError for an unknown ``schedule``, TypeError / ValueError for a bad
        ``slice_bytes`` (None only without ``interleaved``)."""
        self._check(layer, self.layout.tensors[0].name, "fetch_ce")
        if not isinstance(schedule, str):  # (the plan cache is keyed by it: an unhashable one met a bare TypeError)
            raise ValueError(f"fetch_ce: schedule must be 'per_peer', 'staggered' or 'interleaved', got {schedule!r}")
        if not isinstance(batched, (bool, np.bool_)):
            raise TypeError(f"fetch_ce: batched must be True or False, got {batched!r} ({type(batched).__name__})")
        if self.E == self.L:
            return 0
        dsts, srcs, sizes = self._ce_plan(layer, schedule, slice_bytes)
        self.be.ce_copy(dsts, srcs, sizes, stream_handle(stream), batched)
        return int(sizes.sum())

    # -- fetch: NVSHMEM, SM-driven ------------------------------------------------------------------------------------
    def nvshmem_table(self, layer: int):
        """Device array of E * T ExpertCopy records (``EXPERT_COPY_DTYPE``, viewed as uint8 bytes; pe = -1 for local
        experts), built on first use as ``table`` is, cached and owned by the store. Local."""

        self._check(layer, self.layout.tensors[0].name, "nvshmem_table")
        key = ("nvshmem", layer)
        if key not in self._cache:
            owner = self.partition.owner_table(self.rank)
            T = len(self.layout.tensors)
            rec = np.zeros(self.E * T, dtype=EXPERT_COPY_DTYPE)
            rec["pe"] = -1
            for e in range(self.E):
                if owner[e] == self.rank:
                    continue
                for ti, spec in enumerate(self.layout.tensors):
                    i = e * T + ti
                    rec["src"][i] = self._owner_address(layer, ti, e, owner[e], "sym")
                    rec["src_peer"][i] = self._owner_address(layer, ti, e, owner[e], "peer") if self._local[layer, ti][3][owner[e]] else 0
                    rec["dst"][i] = self.slot_address(layer, ti, e)
                    rec["bytes"][i] = spec.nbytes
                    rec["pe"][i] = owner[e]
            self._cache[key] = self._device_const(rec.view(np.uint8), "NVSHMEM descriptor")
        return self._cache[key]

    def prepare(self, layers: Sequence[int] | None = None, streams: Sequence[Any] = ()) -> None:
        """Builds the NVSHMEM descriptor tables of ``layers`` (default: all; not ``table``'s pointer arrays, built by
        calling ``table``) and the fetch scratch of ``streams`` now, so that a CUDA graph captured later finds them
        (nothing may be built during a capture). ``layers`` is a sequence of ints in [0, num_layers), ``streams`` a
        sequence of streams (``interop.stream_handle``): both are checked, by name, before anything is built (a bare
        int for either is a TypeError)."""
        import cupy as cp

        for name, v, want in (("layers", layers, "a sequence of layer indices (ints) or None"),
                              ("streams", streams, "a sequence of streams")):
            if (v is not None or name == "streams") and (isinstance(v, (str, bytes)) or not isinstance(v, Iterable)):
                raise TypeError(f"prepare: {name} must be {want}, got {v!r} ({type(v).__name__})")
        todo = range(self.num_layers) if layers is None else list(layers)
        for layer in todo:
            if not is_int(layer):  # (bools refused: True is not layer 1)
                raise TypeError(f"prepare: layers must hold ints, got {layer!r} ({type(layer).__name__})")
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"prepare: layer {layer} is outside [0, {self.num_layers})")
        handles = []
        for i, st in enumerate(streams):
            try:
                handles.append(stream_handle(st))
            except (TypeError, ValueError) as e:
                raise type(e)(f"prepare: streams[{i}]: {e}") from None
        for layer in todo:
            self.nvshmem_table(layer)
        if "all_ids" not in self._cache:
            self._cache["all_ids"] = self._device_const(self.remote_ids(), "remote id list")
        for s in handles:
            self._scratch_for(s)
        cp.cuda.Device(self.device).synchronize()

    def _scratch_for(self, s: int):
        """(error flag [2], first occurrence [E]) of stream handle ``s``, created on that stream."""
        import cupy as cp

        if s not in self._scratch:
            if self.be.stream_is_capturing(s):
                raise DwdpError(
                    "fetch_nvshmem: first fetch on this stream inside a CUDA graph capture; call "
                    "store.prepare(streams=[stream]) (or fetch once eagerly on it) before capturing"
                )
            with cupy_stream(s):
                self._scratch[s] = (cp.zeros(2, dtype=cp.int32), cp.empty(self.E, dtype=cp.int32))
        return self._scratch[s]

    def remote_ids(self) -> np.ndarray:
        """The expert ids this rank fetches, grouped by owner in staggered order (the peer after this rank
        first), so that ranks fetching everything at once start at different owners."""
        order = {p: i for i, p in enumerate(peer_order(self.rank, self.world))}
        owner = self.partition.owner_table(self.rank)
        ids = [e for e in range(self.E) if not self.lo <= e < self.hi]
        return np.array(sorted(ids, key=lambda e: (order[owner[e]], e)), dtype=np.int32)

    def fetch_nvshmem(
        self,
        layer: int,
        ids: Any = None,
        count: Any = None,
        stream: Any = None,
        *,
        num_blocks: int = 32,
        threads: int = 512,
        chunk: int = 1 << 20,
        peer_ptr: bool | None = None,
    ) -> None:
        """Fetches the remote experts named in ``ids`` (a device int32 array, e.g. the router's selection; None =
        every remote expert) with the SM-driven kernel on ``num_blocks`` SMs. ``peer_ptr``: copy with vector loads
        through the NVLink mapping of the owner's buffer (None = whenever every owner is P2P-reachable, which was
        faster on H200: see docs/benchmarks.md) instead of ``nvshmemx_getmem_nbi_block``. ``count`` is an int or a device int32
        scalar read by the kernel (no host round trip). Local ids are skipped and a repeated id is fetched once, so
        a router's ids can be passed as they are; out-of-range ids in a device list are skipped and reported by
        ``check_errors()``; in a host list they raise here. ``num_blocks`` (in [1, 65535]), ``threads`` (a multiple of
        32 in [32, 1024]), ``chunk`` (bytes, a multiple of 16 in [16, 2**62]) and a host ``count`` are integers,
        ``peer_ptr`` a bool or None: checked by name before anything is built or launched.

        ``ids``: a contiguous 1-D ``[n]`` int32 device array (read by the kernel on ``stream``: it must stay alive
        until then; in a CUDA graph, as long as the graph), or a host 1-D integer sequence (copied to a temporary on
        ``stream``; refused with DwdpError inside a graph capture). ``count``: the ids to read, at most ``n`` (None:
        all). The slots hold the fetched experts once ``stream`` has run the kernel. Local and one-sided (the owners
        take no part). Raises TypeError for ids / count of another type, dtype or shape, ValueError for a host id
        outside ``[0, E)`` or a host count outside ``[0, n]``, DwdpError for ``peer_ptr=True`` with an unreachable
        owner or a first fetch on a stream inside a capture (``prepare(streams=...)`` first)."""
        import cupy as cp

        if count is not None and not hasattr(count, "__cuda_array_interface__") and not is_int(count):
            raise TypeError(f"fetch_nvshmem: count must be an int or a device int32 scalar, got {count!r} "
                            f"({type(count).__name__})")
        launch_args("fetch_nvshmem", num_blocks=num_blocks, threads=threads, chunk=chunk)
        if peer_ptr is not None and not isinstance(peer_ptr, (bool, np.bool_)):
            raise TypeError(f"fetch_nvshmem: peer_ptr must be True, False or None, got {peer_ptr!r}")
        table = self.nvshmem_table(layer)
        s = stream_handle(stream)
        if ids is None:
            if "all_ids" not in self._cache:
                self._cache["all_ids"] = self._device_const(self.remote_ids(), "remote id list")
            ids = self._cache["all_ids"]
        elif not hasattr(ids, "__cuda_array_interface__"):
            host = np.asarray(ids)
            if host.ndim != 1 or (host.size and host.dtype.kind not in "iu"):
                raise TypeError(f"fetch_nvshmem: a host id list must be a 1-D sequence of integers, got {host.dtype} {list(host.shape)}")
            if host.size and (host.min() < 0 or host.max() >= self.E):
                bad = host[(host < 0) | (host >= self.E)][0]
                raise ValueError(f"fetch_nvshmem: expert id {int(bad)} is outside [0, {self.E})")
            if self.be.stream_is_capturing(s):
                raise DwdpError(
                    "fetch_nvshmem: a host id list cannot be used inside a CUDA graph capture (the replay would read a "
                    "temporary); pass a device int32 array that lives as long as the graph"
                )
            with cupy_stream(s):  # a temporary on the caller's stream: reused only behind the kernel that reads it
                ids = cp.asarray(host.astype(np.int32))
        d = device_buffer(ids, "ids")
        if d.dtype != np.int32 or len(d.shape) != 1 or not d.contiguous:
            raise TypeError(f"fetch_nvshmem: ids must be a contiguous 1-D int32 device array, got {d.dtype} {list(d.shape)}")
        count_dev, cap = 0, d.shape[0]
        if count is not None and hasattr(count, "__cuda_array_interface__"):
            c = device_buffer(count, "count")
            if c.dtype != np.int32 or c.nbytes != 4:
                raise TypeError(f"fetch_nvshmem: a device count must be one int32, got {c.dtype} {list(c.shape)}")
            count_dev = c.ptr
        elif count is not None:
            if not 0 <= int(count) <= cap:
                raise ValueError(f"fetch_nvshmem: count {count} is outside [0, {cap}]")
            cap = int(count)
        max_bytes = max(t.nbytes for t in self.layout.tensors)
        peers = self._local[layer, 0][3]
        unreachable = [p for p in range(self.world) if p != self.rank and not peers[p]]
        if peer_ptr is None:
            peer_ptr = not unreachable
        elif peer_ptr and unreachable:
            raise DwdpError(f"fetch_nvshmem: peer_ptr=True needs every owner P2P-reachable; PE(s) {unreachable} are not")
        err, first = self._scratch_for(s)
        chunk = int(chunk)
        self.be.fetch_experts(
            table.data.ptr, self.E, len(self.layout.tensors), d.ptr, count_dev, cap, chunk, -(-max_bytes // chunk),
            err.data.ptr, first.data.ptr, bool(peer_ptr), int(num_blocks), int(threads), s,
        )

    def check_errors(self) -> None:
        """Raises DwdpError if a fetch kernel on any stream met an out-of-range expert id, then clears the flags.
        Synchronises the device first, so the flags are read and cleared with no fetch in flight. Local."""
        import cupy as cp

        if not self._scratch:
            return
        cp.cuda.Device(self.device).synchronize()
        bad = []
        for err, _first in self._scratch.values():
            flag, eid = (int(x) for x in err.get())
            if flag:
                bad.append(eid)
                err[...] = 0
        cp.cuda.Device(self.device).synchronize()
        if bad:
            more = f" (and {bad[1:]} on other streams)" if len(bad) > 1 else ""
            raise DwdpError(
                f"fetch_nvshmem: the device id list held expert id {bad[0]}{more}, outside [0, {self.E}); it was skipped"
            )

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def release(self, layer: int) -> None:
        """Marks a layer released: its views, plans and fetches raise from now on. Its device tables stay alive
        until ``close()``, since a fetch already queued on some stream may still read them."""
        self._check(layer, self.layout.tensors[0].name, "release")
        self._released.add(layer)
        for k in [k for k in self._cache if isinstance(k, tuple) and len(k) > 1 and k[1] == layer]:
            self._retired.append(self._cache.pop(k))

    def close(self) -> None:
        """Unmaps and frees everything; collective (symmetric memory is unregistered). Idempotent once it has
        succeeded.

        Invariants: the store is unusable (views, plans, fetches, addresses raise) from the first call on, even if
        that call fails. The closing barrier comes first: if it fails (a peer is gone or late), nothing is released,
        because unregistering symmetric memory is collective and would wait for that peer forever; the DwdpError
        says so (the barrier's error is its cause). A later ``close()`` tries the barrier again, but a failed
        collective leaves dwdp_ops's rendezvous broken for good, so that retry fails at once (its cause says the
        rendezvous "failed earlier") and this rank's store memory stays until the process exits. After the
        barrier every release step is attempted; those that failed are listed in one DwdpError at the end and stay
        queued, so calling ``close()`` again retries exactly those. A failed device synchronisation before the
        barrier is reported the same way, after the release. After ``dwdp_ops.finalize()`` it releases nothing and
        raises a DwdpError saying so."""
        if self._closed and self._released_barrier and not self._undo:
            return
        self._closed = True
        failure: BaseException | None = None
        if not self._released_barrier and self.rt.state == "finalized":
            raise DwdpError("ExpertStore.close: the dwdp_ops runtime was finalized before the store was closed; "
                            "NVSHMEM is gone, so nothing can be unregistered and the store's memory stays until "
                            "the process exits (close stores before dwdp_ops.finalize())")
        if not self._released_barrier:
            try:
                self._synchronize()
            except Exception as e:  # noqa: BLE001 - the peers still wait at the barrier; report after the release
                failure = DwdpError(f"ExpertStore.close: device synchronisation failed ({type(e).__name__}: {e})")
                failure.__cause__ = e
            try:
                self.rt.rendezvous.barrier("ExpertStore.close")
            except Exception as e:
                raise DwdpError(f"ExpertStore.close: the closing barrier failed ({type(e).__name__}: {e}); this rank "
                                "keeps its memory, since unregistering symmetric memory is collective and a peer is "
                                "missing; a failed collective breaks the rendezvous for good, so a later close() fails "
                                "the same way and the memory stays until the process exits") from e
            self._released_barrier = True
            self._cache.clear()
            self._retired.clear()
            self._scratch.clear()
        if failure is None:
            self._rollback(keep_failed=True)
            return
        self._rollback(failure, keep_failed=True)  # release failures become notes on ``failure``
        raise failure

    def _synchronize(self) -> None:
        import cupy as cp

        cp.cuda.Device(self.device).synchronize()

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def remote_bytes(self) -> int:
        return (self.E - self.L) * self.layout.expert_stride


