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

The store owns one fetch engine of each kind (``fetch``: moving weights, the sibling of ``dispatch``), which fill a
layer's remote slots from the owners: ``store.copy_engine`` (``CopyEngineFetch``: the copy engines, every remote
expert) and ``store.nvshmem`` (``NvshmemFetch``: an SM-driven kernel over a device-resident list of expert ids). The
store gives them addresses (``slot_address``, ``owner_address``, ``reachable_peers``) and ends their plans with its
layers (``release``) and itself (``close``).

Invariants:
  * Geometry (partition, layout, layer count) is identical on every rank: checked collectively at construction.
  * Layers of the same parity share slots: fetching layer l overwrites what layer l-2 fetched. The caller orders
    this (the prefetch scheduler's consumed events); the store does not.
  * Construction is collective and runs in three phases (local storage, symmetric registration, slots and views);
    after each phase the ranks agree on the control plane, so a failure on any rank makes every rank release what it
    created (in reverse order) and raise the same error naming the failed ranks, instead of leaving peers waiting in
    NVSHMEM. Where an agreement itself fails (the control plane: a peer is gone), the release stops before the
    collective unregistration, as ``close()`` does after a failed barrier: the registered local storage stays until
    the process exits (a note on the error says so). Errors met while releasing are reported (an exception note, or
    a DwdpError from ``close()``), never swallowed. ``close()`` is collective (it unregisters symmetric memory).
  * Stream order: everything a call enqueues (kernels, copies, and the temporaries it allocates, such as a host id
    list copied to the device) goes on the caller's stream; a temporary returns to the memory pool of that stream
    (CuPy's pool is stream-ordered), so it is reused only behind the work that reads it. Plans and descriptor tables
    are built once, synchronously, before any stream reads them (``store.nvshmem.prepare``, and ``table`` for the
    pointer arrays); a CUDA-graph capture never builds one.
  * Lifetimes: ``release(layer)`` makes the layer's views and its engines' fetches raise, but its device tables stay
    alive until ``close()`` (a fetch already queued may still read them). After ``dwdp_ops.finalize()`` every call
    raises.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._checks import is_int
from .errors import DwdpError
from .fetch import CopyEngineFetch, NvshmemFetch
from .interop import cupy_stream, device_buffer, stream_handle
from .layout import ExpertLayout, local_allocation_bytes, registration_overhead
from .partition import ExpertPartition
from .runtime import Runtime, get_runtime


class ExpertStore:
    """The expert storage, slots and views of one rank (module docstring).

    Construction is collective: every rank constructs it at the same point with the same partition, layout and
    ``num_layers`` (checked on the control plane). Raises DwdpError before ``init()``, for a
    geometry that differs between ranks, for an NVSHMEM registration unit that does not divide the local blocks, or
    when a construction phase failed on any rank (every rank raises); ValueError for a partition of another world
    size, ``num_layers < 1`` or a layout page that is not a multiple of the VMM granularity; TypeError for a
    ``num_layers`` that is not an int, or a partition / layout that is not an ``ExpertPartition`` /
    ``ExpertLayout``. Views and fetches are local unless their docstring says otherwise; they and the
    address helpers raise DwdpError after ``close()``, for a released layer, and after ``dwdp_ops.finalize()``.

    ``copy_engine`` (``fetch.CopyEngineFetch``) and ``nvshmem`` (``fetch.NvshmemFetch``) are its fetch engines."""

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
        for name, v, cls in (("partition", partition, ExpertPartition), ("layout", layout, ExpertLayout)):
            if not isinstance(v, cls):  # (their attributes were met deep inside: "'str' object has no attribute ...")
                raise TypeError(f"ExpertStore: {name} must be an {cls.__name__}, got {type(v).__name__}")
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
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._released: set[int] = set()
        self._closed = False
        self._released_barrier = False  # close() passed its barrier (the release may then run, and be retried)
        self._control_failed = False  # a construction agreement's all-gather raised (a peer is missing)
        self._cache: dict[Any, Any] = {}  # ("table", layer, ti) -> device pointer array
        self._retired: list[Any] = []  # device tables of released layers, freed at close()
        self.copy_engine, self.nvshmem = CopyEngineFetch(self), NvshmemFetch(self)
        # the device's VMM granularity is part of the geometry: checked after the collective on a rank alone (a node
        # of mixed GPUs), its ValueError had left the peers waiting in the first phase's agreement until the timeout
        gran = self.be.vmm_granularity(self.device)
        geometry = json.dumps(
            [partition.num_experts, partition.experts_per_rank, partition.stride, num_layers,
             [[t.name, list(t.shape), t.dtype] for t in layout.tensors], layout.page, register_unit, gran]
        ).encode()
        views = rt.rendezvous.allgather("ExpertStore", geometry)
        if any(v != geometry for v in views):
            bad = [r for r, v in enumerate(views) if v != views[0]]
            raise DwdpError(f"ExpertStore: rank(s) {bad} describe a different partition, layout, layer count, "
                            "registration unit or VMM granularity than rank 0")
        # (after the collective: the unit is this rank's environment's; raised alone, the peers waited in it)
        if self.registration_overhead:
            raise DwdpError(
                f"ExpertStore: NVSHMEM registers buffers in units of {register_unit} bytes, which do not divide this "
                f"rank's local expert blocks ({[self.L * s for s in layout.strides]} bytes); a padded block could not "
                "be mapped whole into the composite view. Leave NVSHMEM_CUMEM_GRANULARITY unset (dwdp_ops.init sets "
                "2 MiB) or set it to the page size."
            )
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
            # A failed agreement means a peer is missing: unregistering symmetric memory is collective and would wait
            # for it forever, so the rollback stops there (as close() does after a failed barrier).
            self._rollback(e, stop_at="unregister_symmetric" if self._control_failed else None)
            raise

    # -- construction ----------------------------------------------------------------------------------------
    def _agree(self, phase: str, failure: BaseException | None) -> None:
        """All ranks report how ``phase`` went; if it failed anywhere, every rank raises the same DwdpError."""
        mine = b"" if failure is None else f"{type(failure).__name__}: {failure}".encode()
        try:
            views = self.rt.rendezvous.allgather(f"ExpertStore:{phase}", mine)
        except BaseException:
            self._control_failed = True
            raise
        failed = {r: v.decode(errors="replace") for r, v in enumerate(views) if v}
        if failed:
            detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items()))
            raise DwdpError(
                f"ExpertStore construction failed in phase '{phase}' on rank(s) {sorted(failed)} ({detail}); every "
                "rank released what it had created"
            ) from failure

    def _push(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def _rollback(self, cause: BaseException | None = None, keep_failed: bool = False,
                  stop_at: str | None = None) -> None:
        """Releases everything created so far, in reverse order. Every step is attempted; failures are reported on
        ``cause`` (as a note) or, without one, raised as one DwdpError. With ``keep_failed`` the failed steps stay
        queued (in their order), so a later call retries them; the ones that succeeded never run again. With
        ``stop_at`` (and a ``cause``) the release stops at the first step of that name, which stays queued with
        everything created before it, and a note on ``cause`` says so."""
        errors = []
        failed: list[tuple[str, Callable[[], None]]] = []
        while self._undo:
            if stop_at is not None and self._undo[-1][0] == stop_at:
                kept = len(self._undo)
                if cause is not None and hasattr(cause, "add_note"):
                    cause.add_note(f"ExpertStore: the control plane failed after the symmetric registration; "
                                   f"{kept} release step(s) were not run (unregister_symmetric is collective and a "
                                   "peer is missing): this rank's local expert storage stays until the process "
                                   "exits")
                break
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
    def check_open(self, what: str) -> None:
        """DwdpError, ``what`` naming the caller, unless the runtime is live and the store open."""
        self.rt.require(f"ExpertStore.{what}")
        if self._closed:
            raise DwdpError(f"{what}: the ExpertStore is closed")

    def check_layer(self, layer: int, what: str) -> None:
        """The views', fetch engines' and address helpers' shared check, ``what`` naming the caller in its errors: a
        live runtime (DwdpError), an open store (DwdpError), an integer layer in range (ValueError) that was not
        released (DwdpError)."""
        self.check_open(what)
        if not is_int(layer) or not 0 <= layer < self.num_layers:  # (bools refused: True is not layer 1)
            raise ValueError(f"{what}: layer {layer} is outside [0, {self.num_layers})")
        if layer in self._released:
            raise DwdpError(f"{what}: layer {layer} was released")

    def _check(self, layer: int, name: str, what: str) -> int:
        self.check_layer(layer, what)
        return self.layout.index(name)

    def _where(self, what: str, layer: int, ti: int, expert: int, lo: int, hi: int) -> None:
        """Cheap host-side checks shared by the address helpers: the views' layer check (live runtime, open store,
        layer in range and not released), then an integer tensor kind and expert in range."""
        self.check_layer(layer, what)
        n = len(self.layout.strides)
        if not is_int(ti) or not 0 <= ti < n:
            raise ValueError(f"{what}: tensor kind {ti!r} is outside [0, {n})")
        if not is_int(expert) or not lo <= expert < hi:
            raise ValueError(f"{what}: expert {expert!r} is outside [{lo}, {hi})")

    def local_address(self, layer: int, ti: int, expert: int) -> int:
        """Address of this rank's copy of local expert ``expert`` (in ``[lo, hi)``) of ``layer``, tensor kind ``ti``."""
        self._where("local_address", layer, ti, expert, self.lo, self.hi)
        return self._local[layer, ti][1] + (expert - self.lo) * self.layout.strides[ti]

    def owner_address(self, layer: int, ti: int, expert: int, peer: int, base: str) -> int:
        """Address of ``peer``'s copy of ``expert`` (``peer`` owns it): ``base="sym"``, the symmetric address (for
        NVSHMEM gets), else its P2P mapping (loads, copy engine; DwdpError where ``peer`` is not P2P-reachable).
        Unchecked beyond the layer's (the fetch engines pass owners from the partition)."""
        self.check_layer(layer, "owner_address")
        _h, _va, sym, peers = self._local[layer, ti]
        start = self.partition.local_range(peer)[0]
        root = sym if base == "sym" else peers[peer]
        if root == 0:
            raise DwdpError(f"PE {peer} is not P2P-reachable from PE {self.rank}: use the NVSHMEM engine")
        return root + (expert - start) * self.layout.strides[ti]

    def reachable_peers(self, layer: int) -> list[bool]:
        """``[world]``: whether each PE's local storage of ``layer`` is P2P-mapped here (loads and copy-engine copies
        can read it); this rank's own entry is True."""
        self.check_layer(layer, "reachable_peers")
        return [p == self.rank or bool(ptr) for p, ptr in enumerate(self._local[layer, 0][3])]

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
        CUDA-graph capture: call ``table`` once before capturing, ``nvshmem.prepare()`` does not build these),
        cached and owned by the store until ``close()``. Local; raises as ``local``."""

        ti = self._check(layer, name, "table")
        key = ("table", layer, ti)
        if key not in self._cache:
            ptrs = np.array([self.expert_address(layer, ti, e) for e in range(self.E)], dtype=np.uint64)
            self._cache[key] = self.device_constant(ptrs, "table", f"call store.table({layer}, {name!r})")
        return self._cache[key]

    def device_constant(self, host: np.ndarray, what: str, remedy: str):
        """A device copy (a CuPy array on the store's device) of ``host`` that every stream may read, for the store's
        tables and its engines' plans: copied and synchronised now (plans are built once, before use). Refused with
        DwdpError while a CUDA graph is being captured (a synchronisation would break the capture), the error naming
        the ``what`` plan and saying to ``remedy`` first."""
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

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def release(self, layer: int) -> None:
        """Marks a layer released: its views, plans and fetches raise from now on. Its device tables stay alive
        until ``close()``, since a fetch already queued on some stream may still read them."""
        self.check_layer(layer, "release")
        self._released.add(layer)
        for k in [k for k in self._cache if k[1] == layer]:
            self._retired.append(self._cache.pop(k))
        self.copy_engine._release(layer)
        self.nvshmem._release(layer)

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
            self.copy_engine._clear()
            self.nvshmem._clear()
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


