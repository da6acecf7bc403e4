"""Moving weights: the two fetch engines that fill a layer's remote slots of an ``ExpertStore`` from their owners.

They are the siblings of ``dispatch`` (which moves tokens instead of weights); the ``PrefetchScheduler`` chooses between
the three per step. Each store owns one engine of each kind (``store.copy_engine``, ``store.nvshmem``), built with it:
an engine's plans are of that store's memory and live and die with it.

  * ``CopyEngineFetch``: every remote expert of a layer by the copy engines, as whole page-rounded runs ordered by
    ``schedule.order_copies`` (per peer, staggered or interleaved slices), optionally one ``cudaMemcpyBatchAsync``.
    Its pure plan is ``partition.fetch_plan`` + ``schedule``; the copies hide behind compute on a side stream.
  * ``NvshmemFetch``: an SM-driven kernel of one-sided gets (or NVLink loads) over a device-resident list of expert
    ids, typically the router's: only the experts some token selected, on the compute stream, capturable in a graph.

Invariants:
  * Both are local and one-sided: the owners take no part. An owner's experts may be fetched once its loads are done
    and ordered by a barrier; a fetch of layer l overwrites what the layer of the same parity fetched before (the
    caller orders that; the scheduler does).
  * Plans (copy lists, NVSHMEM descriptor tables, the remote id list) are built once per layer, synchronously, before
    any stream reads them, and cached; fetching allocates nothing except a host id list's device copy, which lives
    on the caller's stream. A CUDA-graph capture never builds a plan (``NvshmemFetch.prepare`` builds them ahead).
  * Per-stream scratch: the repeat-detection array and error flag of the NVSHMEM kernel exist once per stream, so
    fetches on different streams never share them; a graph captured on stream S uses S's scratch.
  * Lifetimes follow the store's: a released layer's fetches raise (its device tables stay alive until the store's
    ``close()``, since a fetch already queued may still read them); after ``close()`` or ``dwdp_ops.finalize()``
    every call raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._checks import is_int, launch_args
from .errors import DwdpError
from .interop import cupy_stream, device_buffer, stream_handle
from .schedule import DEFAULT_SLICE, Copy, Schedule, _check_slice, order_copies, peer_order

if TYPE_CHECKING:
    from .store import ExpertStore

# Mirrors dwdp::ExpertCopy in cpp/include/dwdp/fetch.h.
EXPERT_COPY_DTYPE = np.dtype(
    [("src", "<u8"), ("src_peer", "<u8"), ("dst", "<u8"), ("bytes", "<u8"), ("pe", "<i4"), ("pad", "<i4")]
)


class CopyEngineFetch:
    """Fills a layer's remote slots with the copy engines (module docstring). Built by its ``ExpertStore``
    (``store.copy_engine``); local."""

    def __init__(self, store: ExpertStore):
        self.store = store
        self._plans: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def copies(self, layer: int) -> list[Copy]:
        """The layer's remote runs as copies (whole page-rounded strides, one per tensor kind and run)."""
        st = self.store
        st.check_layer(layer, "ce_copies")
        out = []
        for ti, stride in enumerate(st.layout.strides):
            for peer, a, b in st.partition.fetch_plan(st.rank):
                src = st.owner_address(layer, ti, a, peer, "peer")
                out.append(Copy(peer, st.slot_address(layer, ti, a), src, (b - a) * stride))
        return out

    def plan(self, layer: int, schedule: Schedule = "staggered", slice_bytes: int | None = DEFAULT_SLICE):
        """``(dsts, srcs, sizes)``: three ``[n]`` uint64 host arrays, the layer's copies in ``schedule``'s order;
        built on first use and cached. Raises as ``fetch``."""
        self.store.check_layer(layer, "ce_copies")  # (before the cache: a cached plan answered for True, 1.0, ...)
        if slice_bytes is not None:  # (before the cache key: a list was unhashable, 2.0 / True hit 2's / 1's plan)
            slice_bytes = _check_slice(slice_bytes)
        if not isinstance(schedule, str):  # (the cache is keyed by it: an unhashable one met a bare TypeError)
            raise ValueError(f"fetch_ce: schedule must be 'per_peer', 'staggered' or 'interleaved', got {schedule!r}")
        key = (layer, schedule, slice_bytes)
        if key not in self._plans:
            st = self.store
            copies = order_copies(self.copies(layer), st.rank, st.world, schedule, slice_bytes)
            self._plans[key] = tuple(np.array(x, dtype=np.uint64) for x in zip(*[(c.dst, c.src, c.nbytes) for c in copies]))
        return self._plans[key]

    def fetch(
        self, layer: int, stream: Any = None, *, schedule: Schedule = "staggered", slice_bytes: int = DEFAULT_SLICE,
        batched: bool = True,
    ) -> int:
        """Fills every remote slot of ``layer`` with the copy engine, on ``stream``. Returns the bytes moved.
        ``staggered`` (the default) reached the raw peer-copy rate on 4 x H200 while ``per_peer`` lost half of it to
        owner contention and ``interleaved`` slices a third to per-copy overhead (docs/benchmarks.md). ``batched``:
        True or False (TypeError otherwise). Local and one-sided (the owners take no part; their loads must be done,
        ordered by a barrier); the slots hold the layer once ``stream`` has run the copies, and a later fetch of a
        layer of the same parity overwrites them (the caller orders that). Needs every owner P2P-reachable (DwdpError
        otherwise: use ``NvshmemFetch``); ValueError for an unknown ``schedule``, TypeError / ValueError for a bad
        ``slice_bytes`` (None only without ``interleaved``); DwdpError for a released layer or a closed store."""
        st = self.store
        st.check_layer(layer, "fetch_ce")
        if not isinstance(schedule, str):
            raise ValueError(f"fetch_ce: schedule must be 'per_peer', 'staggered' or 'interleaved', got {schedule!r}")
        if not isinstance(batched, (bool, np.bool_)):
            raise TypeError(f"fetch_ce: batched must be True or False, got {batched!r} ({type(batched).__name__})")
        if st.E == st.L:
            if slice_bytes is not None:  # (checked as the plan checks it: every world size refuses the same values)
                _check_slice(slice_bytes)
            return 0
        dsts, srcs, sizes = self.plan(layer, schedule, slice_bytes)
        st.be.ce_copy(dsts, srcs, sizes, stream_handle(stream), batched)
        return int(sizes.sum())

    def _release(self, layer: int) -> None:
        for k in [k for k in self._plans if k[0] == layer]:  # host arrays: nothing on the device to keep alive
            del self._plans[k]

    def _clear(self) -> None:
        self._plans.clear()


class NvshmemFetch:
    """Fetches a layer's remote experts by an SM-driven kernel over a device list of expert ids (module docstring).
    Built by its ``ExpertStore`` (``store.nvshmem``); local."""

    def __init__(self, store: ExpertStore):
        self.store = store
        self._tables: dict[int, Any] = {}  # layer -> device ExpertCopy records
        self._unreachable: dict[int, list[int]] = {}  # layer -> the owners not P2P-mapped here (with its table)
        self._max_bytes = max(t.nbytes for t in store.layout.tensors)  # the largest tensor of an expert
        self._all_ids: Any = None  # device copy of remote_ids()
        self._scratch: dict[int, tuple[Any, Any]] = {}  # stream handle -> (error flag [2], first occurrence [E])
        self._retired: list[Any] = []  # device tables of released layers, freed at the store's close()

    def table(self, layer: int):
        """Device array of E * T ExpertCopy records (``EXPERT_COPY_DTYPE``, viewed as uint8 bytes; pe = -1 for local
        experts), built on first use (refused inside a CUDA-graph capture: ``prepare`` first), cached and owned by the
        engine until the store's ``close()``. Local."""
        st = self.store
        st.check_layer(layer, "nvshmem_table")
        if layer not in self._tables:
            owner = st.partition.owner_table(st.rank)
            T = len(st.layout.tensors)
            rec = np.zeros(st.E * T, dtype=EXPERT_COPY_DTYPE)
            rec["pe"] = -1
            reachable = st.reachable_peers(layer)
            self._unreachable[layer] = [p for p in range(st.world) if not reachable[p]]
            for e in range(st.E):
                if owner[e] == st.rank:
                    continue
                for ti, spec in enumerate(st.layout.tensors):
                    i = e * T + ti
                    rec["src"][i] = st.owner_address(layer, ti, e, owner[e], "sym")
                    rec["src_peer"][i] = st.owner_address(layer, ti, e, owner[e], "peer") if reachable[owner[e]] else 0
                    rec["dst"][i] = st.slot_address(layer, ti, e)
                    rec["bytes"][i] = spec.nbytes
                    rec["pe"][i] = owner[e]
            self._tables[layer] = st.device_constant(rec.view(np.uint8), "NVSHMEM descriptor", "call store.nvshmem.prepare()")
        return self._tables[layer]

    def remote_ids(self) -> np.ndarray:
        """``[E - L]`` int32 host array: the expert ids this rank fetches, grouped by owner in staggered order (the
        peer after this rank first), so that ranks fetching everything at once start at different owners."""
        st = self.store
        order = {p: i for i, p in enumerate(peer_order(st.rank, st.world))}
        owner = st.partition.owner_table(st.rank)
        ids = [e for e in range(st.E) if not st.lo <= e < st.hi]
        return np.array(sorted(ids, key=lambda e: (order[owner[e]], e)), dtype=np.int32)

    def _remote_ids_device(self):
        if self._all_ids is None:
            self._all_ids = self.store.device_constant(self.remote_ids(), "remote id list", "call store.nvshmem.prepare()")
        return self._all_ids

    def prepare(self, layers: Sequence[int] | None = None, streams: Sequence[Any] = ()) -> None:
        """Builds the descriptor tables of ``layers`` (default: every layer not released; not ``store.table``'s
        pointer arrays, built by calling ``table``), the remote id list and the scratch of ``streams`` now, so that a
        CUDA graph captured later finds them (nothing may be built during a capture). ``layers`` is a sequence of ints
        in [0, num_layers), ``streams`` a sequence of streams (``interop.stream_handle``): both are checked, by name,
        before anything is built (a bare int for either is a TypeError; a released layer, a closed store or a
        finalized runtime a DwdpError). Synchronises the device. Local."""
        import cupy as cp

        st = self.store
        for name, v, want in (("layers", layers, "a sequence of layer indices (ints) or None"),
                              ("streams", streams, "a sequence of streams")):
            if (v is not None or name == "streams") and (isinstance(v, (str, bytes)) or not isinstance(v, Iterable)):
                raise TypeError(f"prepare: {name} must be {want}, got {v!r} ({type(v).__name__})")
        todo = [la for la in range(st.num_layers) if la not in st._released] if layers is None else list(layers)
        for layer in todo:
            if not is_int(layer):  # (bools refused: True is not layer 1)
                raise TypeError(f"prepare: layers must hold ints, got {layer!r} ({type(layer).__name__})")
            if not 0 <= layer < st.num_layers:
                raise ValueError(f"prepare: layer {layer} is outside [0, {st.num_layers})")
        # the store's state and released layers, before anything is built (a closed store's id list and scratch
        # would be device memory nothing frees; a released layer met after earlier layers' tables were built)
        st.check_open("prepare")
        for layer in todo:
            st.check_layer(layer, "prepare")
        handles = []
        for i, s in enumerate(streams):
            try:
                handles.append(stream_handle(s))
            except (TypeError, ValueError) as e:
                raise type(e)(f"prepare: streams[{i}]: {e}") from None
        for layer in todo:
            self.table(layer)
        self._remote_ids_device()
        for s in handles:
            self._scratch_for(s)
        cp.cuda.Device(st.device).synchronize()

    def _scratch_for(self, s: int):
        """(error flag [2], first occurrence [E]) of stream handle ``s``, created on that stream."""
        import cupy as cp

        if s not in self._scratch:
            if self.store.be.stream_is_capturing(s):
                raise DwdpError(
                    "fetch_nvshmem: first fetch on this stream inside a CUDA graph capture; call "
                    "store.nvshmem.prepare(streams=[stream]) (or fetch once eagerly on it) before capturing"
                )
            with cupy_stream(s):
                self._scratch[s] = (cp.zeros(2, dtype=cp.int32), cp.empty(self.store.E, dtype=cp.int32))
        return self._scratch[s]

    def fetch(
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
        faster on H200: see docs/benchmarks.md) instead of ``nvshmemx_getmem_nbi_block``. ``count`` is an int or a
        device int32 scalar read by the kernel (no host round trip). Local ids are skipped and a repeated id is
        fetched once, so a router's ids can be passed as they are; out-of-range ids in a device list are skipped and
        reported by ``check_errors()``; in a host list they raise here. ``num_blocks`` (in [1, 65535]), ``threads`` (a
        multiple of 32 in [32, 1024]), ``chunk`` (bytes, a multiple of 16 in [16, 2**62]) and a host ``count`` are
        integers, ``peer_ptr`` a bool or None: checked by name before anything is built or launched.

        ``ids``: a contiguous 1-D ``[n]`` int32 device array (read by the kernel on ``stream``: it must stay alive
        until then; in a CUDA graph, as long as the graph), or a host 1-D integer sequence (copied to a temporary on
        ``stream``; refused with DwdpError inside a graph capture). ``count``: the ids to read, at most ``n`` (None:
        all). The slots hold the fetched experts once ``stream`` has run the kernel. Local and one-sided (the owners
        take no part). Raises TypeError for ids / count of another type, dtype or shape, ValueError for a host id
        outside ``[0, E)`` or a host count outside ``[0, n]``, DwdpError for ``peer_ptr=True`` with an unreachable
        owner, a first fetch on a stream inside a capture (``prepare(streams=...)`` first), a released layer or a
        closed store."""
        import cupy as cp

        st = self.store
        if count is not None and not hasattr(count, "__cuda_array_interface__") and not is_int(count):
            raise TypeError(f"fetch_nvshmem: count must be an int or a device int32 scalar, got {count!r} "
                            f"({type(count).__name__})")
        launch_args("fetch_nvshmem", num_blocks=num_blocks, threads=threads, chunk=chunk)
        if peer_ptr is not None and not isinstance(peer_ptr, (bool, np.bool_)):
            raise TypeError(f"fetch_nvshmem: peer_ptr must be True, False or None, got {peer_ptr!r}")
        table = self.table(layer)
        s = stream_handle(stream)
        if ids is None:
            ids = self._remote_ids_device()
        elif not hasattr(ids, "__cuda_array_interface__"):
            host = np.asarray(ids)
            if host.ndim != 1 or (host.size and host.dtype.kind not in "iu"):
                raise TypeError(f"fetch_nvshmem: a host id list must be a 1-D sequence of integers, got {host.dtype} {list(host.shape)}")
            if host.size and (host.min() < 0 or host.max() >= st.E):
                bad = host[(host < 0) | (host >= st.E)][0]
                raise ValueError(f"fetch_nvshmem: expert id {int(bad)} is outside [0, {st.E})")
            if st.be.stream_is_capturing(s):
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
        unreachable = self._unreachable[layer]  # (found with the table: fixed for the store's life)
        if peer_ptr is None:
            peer_ptr = not unreachable
        elif peer_ptr and unreachable:
            raise DwdpError(f"fetch_nvshmem: peer_ptr=True needs every owner P2P-reachable; PE(s) {unreachable} are not")
        err, first = self._scratch_for(s)
        chunk = int(chunk)
        st.be.fetch_experts(
            table.data.ptr, st.E, len(st.layout.tensors), d.ptr, count_dev, cap, chunk, -(-self._max_bytes // chunk),
            err.data.ptr, first.data.ptr, bool(peer_ptr), int(num_blocks), int(threads), s,
        )

    def check_errors(self) -> None:
        """Raises DwdpError if a fetch kernel on any stream met an out-of-range expert id, then clears the flags.
        Synchronises the device first, so the flags are read and cleared with no fetch in flight. Local. After the
        store's ``close()`` (its flags are gone) or ``dwdp_ops.finalize()`` it raises DwdpError saying so."""
        import cupy as cp

        self.store.check_open("check_errors")  # (it had returned quietly: the flags of fetches before close were lost)
        if not self._scratch:
            return
        cp.cuda.Device(self.store.device).synchronize()
        bad = []
        for err, _first in self._scratch.values():
            flag, eid = (int(x) for x in err.get())
            if flag:
                bad.append(eid)
                err[...] = 0
        cp.cuda.Device(self.store.device).synchronize()
        if bad:
            more = f" (and {bad[1:]} on other streams)" if len(bad) > 1 else ""
            raise DwdpError(
                f"fetch_nvshmem: the device id list held expert id {bad[0]}{more}, outside [0, {self.store.E}); it "
                "was skipped"
            )

    def _release(self, layer: int) -> None:
        if layer in self._tables:  # a fetch already queued may still read it: kept until the store's close()
            self._retired.append(self._tables.pop(layer))
            del self._unreachable[layer]

    def _clear(self) -> None:
        self._tables.clear()
        self._unreachable.clear()
        self._retired.clear()
        self._scratch.clear()
        self._all_ids = None
