"""Layer-ahead, double-buffered prefetch of remote experts (the paper's DWDP pipeline), with a routed on-demand
alternative that the NVIDIA implementation lacks.

MoE layers are numbered by position (0 .. num_layers-1, the ``ExpertStore`` layers); position p uses slot
``p % 2``. Per slot there is a *ready* event (recorded on the copy stream after p's copies, waited by compute before
p's MoE) and a *consumed* event (recorded on the compute stream after p's MoE kernels are enqueued, waited by the
copy stream before it overwrites the slot with p + 2).

Invariants:
  1. ``consumed[s]`` is recorded by ``release`` *after* the MoE kernels of the layer are enqueued, never before
     (the bug TensorRT-LLM fixed: recording earlier lets the copy stream overwrite a slot still being read).
  2. The copy stream waits ``consumed[s]`` before every prefetch into slot s; compute waits ``ready[s]`` before
     reading a prefetched layer. Both consumed events are recorded once at construction, so the first two
     prefetches do not wait.
  3. ``begin_step`` prefetches positions 0 and 1; ``release(p)`` enqueues position p + 2. Nothing else fetches
     ahead, so at most two layers are in flight and each slot has at most one writer.
  4. No call synchronizes the host, and nothing is allocated after construction: events, streams, copy plans and
     the NVSHMEM descriptor tables are built in ``__init__`` (``on_demand`` layers read the router's device-resident
     ids; the host never sees them).
  5. An ``on_demand`` layer is fetched on the compute stream itself, right after its router: ordered behind the
     previous user of its slot by stream order, waiting on no event recorded outside, which is what makes a decode
     step capturable in a CUDA graph. Its ``release`` still records consumed, so that a later prefetch into the
     slot waits for these reads.
  6. Graphs and eager steps mix: inside a capture, ``release`` records consumed as an *external* event-record node,
     so every replay records it again and an eager ``prefetch_all`` step after replays waits for their reads.
  7. A step that fails half-way (an exception between ``begin_step`` and the last ``release``) is ended by
     ``abort()``, which waits for the prefetches in flight and clears them; ``with sched.step(tokens=T):`` calls it
     on an exception. The next ``begin_step`` then starts cleanly.

Policies (per step, from ``begin_step(tokens=...)`` when the scheduler's policy is ``auto``):
  ``prefetch_all``  every remote expert of the layer, before routing, by the copy engine (hidden behind compute);
  ``on_demand``     after the router, only the remote experts some token selected, by the NVSHMEM kernel;
  ``auto``          ``on_demand`` when fetching the expected distinct remote experts at the SM engine's bandwidth
                    takes less time than fetching all remote experts at the copy engine's bandwidth:
                    ``D * (E - L) / E / B_sm < (E - L) / B_ce`` with ``D = E * (1 - (1 - k / E) ** T)``; else
                    ``prefetch_all``. (The prefetch is hidden only when compute is long enough; when it is not,
                    on-demand moves fewer bytes, which is the decode case.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

from .interop import stream_handle
from .schedule import DEFAULT_SLICE, Schedule
from .store import ExpertStore

Policy = Literal["prefetch_all", "on_demand", "auto"]


def expected_distinct(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts selected by ``tokens`` tokens each choosing ``top_k`` of ``num_experts`` uniformly."""
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def choose_policy(num_experts: int, experts_per_rank: int, top_k: int, tokens: int, ce_gbps: float, sm_gbps: float) -> str:
    """The ``auto`` rule (pure): see the module docstring."""
    if ce_gbps <= 0 or sm_gbps <= 0:
        raise ValueError("bandwidths must be positive")
    remote = num_experts - experts_per_rank
    if remote == 0:
        return "prefetch_all"
    on_demand = expected_distinct(num_experts, top_k, tokens) * remote / num_experts / sm_gbps
    return "on_demand" if on_demand < remote / ce_gbps else "prefetch_all"


class PrefetchScheduler:
    def __init__(
        self,
        store: ExpertStore,
        *,
        policy: Policy = "prefetch_all",
        top_k: int = 8,
        schedule: Schedule = "staggered",
        slice_bytes: int = DEFAULT_SLICE,
        batched: bool | None = None,
        nvshmem_blocks: int = 32,
        ce_gbps: float = 370.0,
        sm_gbps: float = 320.0,
        copy_stream: Any = None,
        event_factory: Any = None,
    ):
        """``nvshmem_blocks``: SMs of the on-demand fetch kernel; it runs alone on the compute stream (the layer's
        GEMMs need its data), and 32 SMs reached 90 % of the copy engine on 4 x H200 (docs/benchmarks.md).
        ``copy_stream`` and ``event_factory`` (a callable returning an event with ``record(stream)``) default to
        a new non-blocking CuPy stream and ``cupy.cuda.Event(disable_timing=True)``; tests pass stand-ins."""
        # Validate everything before touching the GPU, so that a bad argument is named, not met as a CUDA error.
        if policy not in ("prefetch_all", "on_demand", "auto"):
            raise ValueError(f"policy must be 'prefetch_all', 'on_demand' or 'auto', got {policy!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= store.E:
            raise ValueError(f"top_k must be in [1, {store.E}] (an int: the layer's experts), got {top_k!r}")
        if schedule not in ("staggered", "per_peer", "interleaved"):
            raise ValueError(f"schedule must be 'staggered', 'per_peer' or 'interleaved', got {schedule!r}")
        if not 1 <= nvshmem_blocks <= 65535:
            raise ValueError(f"nvshmem_blocks must be in [1, 65535], got {nvshmem_blocks}")
        if ce_gbps <= 0 or sm_gbps <= 0:
            raise ValueError(f"ce_gbps and sm_gbps must be positive, got {ce_gbps} and {sm_gbps}")
        if store.parities != min(2, store.num_layers):
            raise ValueError("the store must have two slot parities (one for a single layer)")
        if copy_stream is None or event_factory is None:
            import cupy as cp

            copy_stream = copy_stream or cp.cuda.Stream(non_blocking=True)
            event_factory = event_factory or (lambda: cp.cuda.Event(disable_timing=True))
        self.store, self.policy, self.top_k = store, policy, top_k
        self.schedule, self.slice_bytes = schedule, slice_bytes
        self.batched = (schedule == "interleaved") if batched is None else batched
        self.nvshmem_blocks, self.ce_gbps, self.sm_gbps = nvshmem_blocks, ce_gbps, sm_gbps
        self.num_layers = store.num_layers
        self.copy_stream = copy_stream
        self.ready = [event_factory() for _ in range(2)]
        self.consumed = [event_factory() for _ in range(2)]
        for ev in self.consumed:
            ev.record(self.copy_stream)  # invariant 2: signalled from the start
        # Build every plan now (invariant 4).
        for layer in range(self.num_layers):
            if store.E != store.L:
                store._ce_plan(layer, schedule, slice_bytes)
            store.nvshmem_table(layer)
        self.step_policy = "prefetch_all" if policy == "auto" else policy
        self._in_flight: set[int] = set()
        self.trace: list | None = None  # set to [] to record (kind, layer, event) of every prefetch (benchmarks)

    # -- the protocol -----------------------------------------------------------------------------------------
    def policy_for(self, tokens: int) -> str:
        if self.policy != "auto":
            return self.policy
        s = self.store
        return choose_policy(s.E, s.L, self.top_k, tokens, self.ce_gbps, self.sm_gbps)

    def begin_step(self, tokens: int | None = None, num_layers: int | None = None) -> str:
        """Starts a forward step over the first ``num_layers`` MoE layers (default: all): picks the step's policy
        (``auto`` needs ``tokens``) and, for ``prefetch_all``, prefetches the first two. Returns the policy."""
        if self.policy == "auto" and tokens is None:
            raise ValueError("begin_step: the auto policy needs the number of tokens on this rank")
        n = self.store.num_layers if num_layers is None else int(num_layers)
        if not 1 <= n <= self.store.num_layers:
            raise ValueError(f"begin_step: num_layers {n} is outside [1, {self.store.num_layers}]")
        if self._in_flight:
            raise RuntimeError(
                f"begin_step: layers {sorted(self._in_flight)} of the previous step were not released; release them, "
                "or call abort() after a failed step"
            )
        self.num_layers = n
        self.step_policy = self.policy_for(tokens or 0)
        if self.step_policy == "prefetch_all":
            for p in range(min(2, self.num_layers)):
                self._prefetch(p)
        return self.step_policy

    def abort(self) -> None:
        """Ends a step that failed half-way: waits for the prefetches in flight (the copy stream) and forgets them.
        Consumed events stay as recorded, so the next prefetch into a slot still waits for the reads queued before."""
        if self._in_flight:
            self.copy_stream.synchronize()
            self._in_flight.clear()

    @contextlib.contextmanager
    def step(self, tokens: int | None = None, num_layers: int | None = None):
        """``with sched.step(tokens=T) as policy:`` runs ``begin_step`` and, if the body raises, ``abort()``."""
        policy = self.begin_step(tokens=tokens, num_layers=num_layers)
        try:
            yield policy
        except BaseException:
            self.abort()
            raise

    def _record(self, event: Any, stream: Any) -> None:
        """Records ``event`` on ``stream``; inside a capture as an external node (invariant 6)."""
        ptr = getattr(event, "ptr", None)
        if isinstance(ptr, int) and hasattr(self.store, "be"):
            self.store.be.event_record(ptr, stream_handle(stream))
        else:  # stand-in events of the protocol tests
            event.record(stream)

    def _prefetch(self, layer: int) -> None:
        slot = layer % 2
        cs = self.copy_stream
        cs.wait_event(self.consumed[slot])
        if self.trace is not None:  # timing only: allocates events, off by default
            self.trace.append(("fetch", layer, self._timed_event(cs)))
        self.store.fetch_ce(layer, cs, schedule=self.schedule, slice_bytes=self.slice_bytes, batched=self.batched)
        if self.trace is not None:
            self.trace.append(("fetch_end", layer, self._timed_event(cs)))
        self.ready[slot].record(cs)
        self._in_flight.add(layer)

    @staticmethod
    def _timed_event(stream):
        import cupy as cp

        ev = cp.cuda.Event()
        ev.record(stream)
        return ev

    def wait(self, layer: int, stream: Any, *, ids: Any = None, count: Any = None) -> None:
        """Before layer ``layer``'s MoE on ``stream``. ``prefetch_all``: waits for its prefetch. ``on_demand``:
        fetches the remote experts named by the router's device ids (``ids``, int32; ``count`` optional, host int
        or device int32) on ``stream``."""
        self._check(layer)
        if self.step_policy == "prefetch_all":
            if layer not in self._in_flight:
                raise RuntimeError(
                    f"wait({layer}): layer {layer} was never prefetched; call begin_step() and release() each layer"
                )
            stream.wait_event(self.ready[layer % 2])
            return
        if ids is None:
            raise ValueError(f"wait({layer}): the on_demand policy needs the router's expert ids")
        self.store.fetch_nvshmem(layer, ids, count, stream, num_blocks=self.nvshmem_blocks)

    def release(self, layer: int, stream: Any) -> None:
        """After layer ``layer``'s MoE kernels are enqueued on ``stream``: records consumed, then enqueues the
        prefetch of the MoE layer two positions ahead (``prefetch_all``)."""
        self._check(layer)
        slot = layer % 2
        # Recorded under every policy: an on_demand step's reads must also hold off a later step's prefetch.
        self._record(self.consumed[slot], stream)
        if self.step_policy == "prefetch_all":
            self._in_flight.discard(layer)
            if layer + 2 < self.num_layers:
                self._prefetch(layer + 2)

    def _check(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside [0, {self.num_layers})")
