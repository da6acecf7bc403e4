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
     ahead, so at most two layers are in flight and each slot has at most one writer. In a ``prefetch_all`` step
     ``release(p)`` is accepted only for the oldest layer in flight, after its ``wait(p)``: a second release, or
     a release out of order or before the read, raises before anything is enqueued.
  4. No call synchronizes the host, and nothing is allocated after construction but the NVSHMEM fetch's scratch:
     events, streams, copy plans and the NVSHMEM descriptor tables are built in ``__init__`` (``on_demand`` layers
     read the router's device-resident ids; the host never sees them). The first ``on_demand`` fetch on a stream
     allocates that stream's scratch (and a host id list a temporary), so capture a decode step only after
     ``store.nvshmem.prepare(streams=[compute])`` or an eager step on that stream.
  5. An ``on_demand`` layer is fetched on the compute stream itself, right after its router: ordered behind the
     previous user of its slot by stream order, waiting on no event recorded outside, which is what makes a decode
     step capturable in a CUDA graph. Its ``release`` still records consumed, so that a later prefetch into the
     slot waits for these reads; a fetched layer not released makes the next ``begin_step`` raise (``abort()``),
     as does its slot's next ``wait`` (that fetch would overwrite experts its MoE may not have read yet).
  6. Graphs and eager steps mix: inside a capture, ``release`` records consumed as an *external* event-record node,
     so every replay records it again and an eager ``prefetch_all`` step after replays waits for their reads.
  7. A step that fails half-way (an exception between ``begin_step`` and the last ``release``) is ended by
     ``abort()``, which waits for the prefetches in flight and clears them (and records consumed behind an
     ``on_demand`` fetch not released); ``with sched.step(tokens=T):`` calls it on an exception. The next
     ``begin_step`` then starts cleanly.

Modes (per step; the scheduler's ``policy`` forces one, or ``auto`` picks one per step):
  ``prefetch_all``  every remote expert of the layer, before routing, by the copy engine (hidden behind compute);
  ``on_demand``     after the router, only the remote experts some token selected, by the NVSHMEM kernel;
  ``dispatch``      no weights move: tokens go to the experts' owners and the weighted results come back
                    (DEP, through the ``TokenDispatcher`` given as ``dispatcher``; every rank joins every layer);
  ``auto``          the mode ``policy.choose_mode`` picks from measured ``rates`` and the step's token counts (its
                    docstring has the rule). ``dispatch`` is a candidate only with a ``dispatcher`` and when every
                    rank's tokens fit its ``max_tokens``.

Agreement: ``dispatch`` needs every rank in the layer, so with a dispatcher ``auto`` must give every rank the same
mode. ``begin_step(tokens=T)`` then gathers every rank's T with ONE host all-gather per step (the control plane's
``rendezvous.allgather``; an engine that already knows every rank's count passes ``tokens_per_rank`` and no
collective runs), and ``choose_mode`` is a deterministic function of that list and of configuration every rank
shares. Without a dispatcher the two weight modes are rank-local and ``auto`` decides on this rank's T alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any, Literal

from ._checks import as_count, is_bool, is_int, rank_counts
from .interop import stream_handle
from .policy import MODES, Rates, choose_mode
from .schedule import DEFAULT_SLICE, Schedule
from .store import ExpertStore

Policy = Literal["prefetch_all", "on_demand", "dispatch", "auto"]
POLICIES = ("prefetch_all", "on_demand", "dispatch", "auto")


def _check_policy(policy: str, has_dispatcher: bool, without: str) -> None:
    """Raises ValueError for a policy that is not one of ``POLICIES``, or ``dispatch`` without a dispatcher
    (``without``: what the message says about that)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be 'prefetch_all', 'on_demand', 'dispatch' or 'auto', got {policy!r}")
    if policy == "dispatch" and not has_dispatcher:
        raise ValueError(f"policy 'dispatch' moves tokens: {without}")


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
        rates: Rates | None = None,
        dispatcher: Any = None,
        gather: Callable[[int], Sequence[int]] | None = None,
        copy_stream: Any = None,
        event_factory: Any = None,
    ):
        """``nvshmem_blocks``: SMs of the on-demand fetch kernel; it runs alone on the compute stream (the layer's
        GEMMs need its data), and 32 SMs reached 90 % of the copy engine on 4 x H200 (docs/benchmarks.md).
        ``rates``: the measured rates ``auto`` decides with (``policy.Rates``; H200 figures by default).
        ``dispatcher``: a ``TokenDispatcher`` over the store's partition with the same ``top_k`` (the ``dispatch``
        mode; ``auto`` considers it only when given). ``gather``: ``T -> every rank's T`` for ``auto`` with a
        dispatcher (default: the control plane's all-gather; must be collective and return the same list everywhere).
        ``copy_stream`` and ``event_factory`` (a callable returning an event with ``record(stream)``) default to
        a new non-blocking CuPy stream and ``cupy.cuda.Event(disable_timing=True)``; tests pass stand-ins."""
        # Validate everything before touching the GPU, so that a bad argument is named, not met as a CUDA error.
        _check_policy(policy, dispatcher is not None, "pass dispatcher=TokenDispatcher(...)")
        if not is_int(top_k) or not 1 <= top_k <= store.E:
            raise ValueError(f"top_k must be in [1, {store.E}] (an int: the layer's experts), got {top_k!r}")
        top_k = int(top_k)
        if schedule not in ("staggered", "per_peer", "interleaved"):
            raise ValueError(f"schedule must be 'staggered', 'per_peer' or 'interleaved', got {schedule!r}")
        if not is_int(nvshmem_blocks) or not 1 <= nvshmem_blocks <= 65535:
            raise ValueError(f"nvshmem_blocks must be an int in [1, 65535], got {nvshmem_blocks!r}")
        nvshmem_blocks = int(nvshmem_blocks)
        if batched is not None and not is_bool(batched):  # (the copy engine refused it only at the first prefetch)
            raise TypeError(f"batched must be True, False or None, got {batched!r} ({type(batched).__name__})")
        rates = Rates() if rates is None else rates
        if not isinstance(rates, Rates):
            raise TypeError(f"rates must be a dwdp_ops.policy.Rates, got {type(rates).__name__}")
        if dispatcher is not None:
            if dispatcher.partition != store.partition:
                raise ValueError(f"the dispatcher's partition {dispatcher.partition} is not the store's "
                                 f"{store.partition}: tokens would go to ranks that do not hold their experts")
            if dispatcher.top_k != top_k:
                raise ValueError(f"the dispatcher's top_k {dispatcher.top_k} differs from the scheduler's {top_k}")
        if store.parities != min(2, store.num_layers):
            raise ValueError("the store must have two slot parities (one for a single layer)")
        if copy_stream is None or event_factory is None:
            import cupy as cp

            copy_stream = copy_stream or cp.cuda.Stream(non_blocking=True)
            event_factory = event_factory or (lambda: cp.cuda.Event(disable_timing=True))
        self.store, self.policy, self.top_k = store, policy, top_k
        self.schedule, self.slice_bytes = schedule, slice_bytes
        self.batched = (schedule == "interleaved") if batched is None else bool(batched)
        self.nvshmem_blocks, self.rates, self.dispatcher = nvshmem_blocks, rates, dispatcher
        self._gather = gather
        self.num_layers = store.num_layers
        self.copy_stream = copy_stream
        self.ready = [event_factory() for _ in range(2)]
        self.consumed = [event_factory() for _ in range(2)]
        for ev in self.consumed:
            ev.record(self.copy_stream)  # invariant 2: signalled from the start
        # Build every plan now (invariant 4).
        for layer in range(self.num_layers):
            if store.E != store.L:
                store.copy_engine.plan(layer, schedule, slice_bytes)
            store.nvshmem.table(layer)
        self.step_policy = {"auto": "prefetch_all"}.get(policy, policy)
        self.last_choice = None  # the ModeChoice of the latest auto step (costs per mode, for logs)
        self.step_tokens: list[int] | None = None  # every rank's T this step, where gathered or given
        self._in_flight: set[int] = set()
        self._waited: set[int] = set()  # prefetch_all: layers in flight whose wait() ran (release needs it)
        self._done: set[int] = set()  # prefetch_all: layers released this step (for the error message)
        self._fetched: dict[int, Any] = {}  # on_demand: layers fetched (wait) and not released yet -> their stream
        self._dispatched: int | None = None  # the layer whose tokens are out (dispatch mode)
        self.trace: list | None = None  # set to [] to record (kind, layer, event) of every prefetch (benchmarks)

    def set_policy(self, policy: Policy) -> None:
        """Changes the policy between steps (a benchmark interleaving two policies on one store, the same requests).
        Every rank must make the same change before the same step (``auto`` and ``dispatch`` steps are collective).
        Raises between ``begin_step`` and the last ``release`` of a step, and for ``dispatch`` without a dispatcher."""
        _check_policy(policy, self.dispatcher is not None, "this scheduler was built without a dispatcher")
        if self._in_flight or self._fetched or self._dispatched is not None:
            raise RuntimeError("set_policy: a step is in progress (layers not released); change the policy between "
                               "steps")
        self.policy = policy
        self.last_choice = None

    # -- the protocol -----------------------------------------------------------------------------------------
    def choose(self, tokens_per_rank: Sequence[int]):
        """The ``auto`` rule for one step (pure; ``policy.choose_mode`` with this scheduler's configuration):
        returns the ``ModeChoice``. ``tokens_per_rank``: every rank's T (the same list on every rank)."""
        s = self.store
        allowed = ("prefetch_all", "on_demand")
        d = self.dispatcher
        # (max() of the raw list raised "'>' not supported ..." for a None or a str entry, and list() made a
        # {rank: T} dict its keys: choose_mode names both)
        counts = tokens_per_rank
        if not isinstance(counts, (str, bytes, Mapping, Set)):
            with contextlib.suppress(TypeError):  # not iterable: choose_mode names it
                counts = list(counts)
        if d is not None and isinstance(counts, list) and all(is_int(t) for t in counts) \
                and max(counts, default=0) <= d.max_tokens:
            allowed = MODES
        lay = s.layout
        return choose_mode(counts, s.partition, lay.expert_bytes, d.hidden if d else 1, self.top_k,
                           self.rates, allowed, param_bytes=lay.expert_bytes / sum(
                               _numel(t.shape) for t in lay.tensors), fetch_bytes_per_expert=lay.expert_stride)

    def policy_for(self, tokens: int | None, tokens_per_rank: Sequence[int] | None = None) -> str:
        """The step's mode: the forced policy, or ``auto``'s choice (see the module docstring). With a dispatcher,
        ``tokens`` and no ``tokens_per_rank`` this is a collective (every rank must call it): every rank's T is
        gathered, which also bounds the step's grouped rows (``TokenDispatcher.rows_for``), so that a decode step's
        expert GEMMs cover a few rows rather than the dispatcher's whole capacity. A given ``tokens_per_rank`` is
        checked under every policy (ValueError unless it holds one int >= 0 per rank, this rank's equal to
        ``tokens``) and kept as ``step_tokens``."""
        # (before the collective: a bad count went into the gather, and auto's rule met None or 2.5 deep inside)
        if tokens is not None and (not is_int(tokens) or tokens < 0):
            raise ValueError(f"policy_for: tokens must be an int >= 0 or None, got {tokens!r}")
        if tokens is not None:
            tokens = int(tokens)
        self.step_tokens = None
        # Checked under every policy (a forced weight policy ignored a malformed list; it is still the step's counts)
        given = None if tokens_per_rank is None else self._check_tokens_per_rank(tokens, tokens_per_rank)
        if self.policy in ("prefetch_all", "on_demand"):
            self.step_tokens = given
            return self.policy
        if given is not None:
            self.step_tokens = given
        elif self.dispatcher is not None and tokens is not None:
            self.step_tokens = self._gather_tokens(tokens)
        if self.policy == "dispatch":
            return "dispatch"
        # auto; without a dispatcher the weight modes are rank-local: this rank's T alone
        if self.step_tokens is None and tokens is None:
            raise ValueError("policy_for: the auto policy needs the number of tokens on this rank")
        self.last_choice = self.choose(self.step_tokens or [tokens] * self.store.partition.world_size)
        return self.last_choice.mode

    def _check_tokens_per_rank(self, tokens: int | None, tokens_per_rank: Sequence[int]) -> list[int]:
        """``tokens_per_rank`` as ints: every rank's count (``_checks.rank_counts``), this rank's equal to ``tokens``;
        else ValueError naming the list."""
        return rank_counts("", tokens_per_rank, self.store.partition.world_size, rank=self.store.rank, tokens=tokens)

    def _gather_tokens(self, tokens: int) -> list[int]:
        if self._gather is not None:
            raw = list(self._gather(tokens))
            got = [as_count(t) for t in raw]
        else:
            raw = got = [int(v) for v in self.store.rt.rendezvous.allgather("PrefetchScheduler.step",
                                                                            str(tokens).encode())]
        if len(got) != self.store.partition.world_size:
            raise ValueError(f"gather returned {len(got)} counts for {self.store.partition.world_size} ranks")
        # (int() had truncated 2.9 to 2 and kept -3: a rows_for bound too small, the overflowing pairs dropped)
        if any(t is None for t in got) or got[self.store.rank] != tokens:
            raise ValueError(f"gather must return every rank's tokens (ints >= 0, this rank's = {tokens} at index "
                             f"{self.store.rank}), got {raw}")
        return got

    def begin_step(self, tokens: int | None = None, num_layers: int | None = None, *,
                   tokens_per_rank: Sequence[int] | None = None) -> str:
        """Starts a forward step over the first ``num_layers`` MoE layers (default: all): picks the step's mode
        (``auto`` needs ``tokens``, this rank's count; see the module docstring for ``tokens_per_rank`` and the
        collective) and, for ``prefetch_all``, prefetches the first two (a prefetch that raises ends the step with
        ``abort()`` before the exception propagates, so the next ``begin_step`` is accepted). Returns the mode."""
        if self.policy == "auto" and tokens is None:
            raise ValueError("begin_step: the auto policy needs the number of tokens on this rank")
        if tokens is not None and (not is_int(tokens) or tokens < 0):
            raise ValueError(f"begin_step: tokens must be an int >= 0, got {tokens!r}")
        if tokens is not None:
            tokens = int(tokens)  # numpy / torch integer scalars
        if num_layers is not None and not is_int(num_layers):
            raise TypeError(f"begin_step: num_layers must be an int or None, got {num_layers!r} "
                            f"({type(num_layers).__name__})")
        n = self.store.num_layers if num_layers is None else int(num_layers)
        if not 1 <= n <= self.store.num_layers:
            raise ValueError(f"begin_step: num_layers {n} is outside [1, {self.store.num_layers}]")
        if self._in_flight or self._fetched or self._dispatched is not None:
            busy = sorted(self._in_flight | set(self._fetched)) or [self._dispatched]
            raise RuntimeError(
                f"begin_step: layers {busy} of the previous step were not released; release them, "
                "or call abort() after a failed step"
            )
        policy = self.policy_for(tokens, tokens_per_rank)  # (first: a refusal there leaves the last step's state)
        self.num_layers = n
        self._waited.clear()
        self._done.clear()
        self.step_policy = policy
        if self.step_policy == "prefetch_all":
            try:
                for p in range(min(2, self.num_layers)):
                    self._prefetch(p)
            except BaseException:  # (a prefetch enqueued before the failure would block the next begin_step)
                self.abort()
                raise
        return self.step_policy

    def abort(self) -> None:
        """Ends a step that failed half-way: waits for the prefetches in flight (the copy stream) and forgets them.
        An ``on_demand`` layer fetched and not released gets its consumed event recorded on the stream that fetched
        it (no host synchronisation), so the next prefetch into its slot waits for that fetch's writes (and the reads
        queued behind it); other consumed events stay as recorded."""
        if self._in_flight:
            self.copy_stream.synchronize()
            self._in_flight.clear()
        self._waited.clear()
        # (forgotten without a record, the failed step's on-demand write, still queued on its stream, could land
        # after the next step's prefetch into the slot: that step's layer would read the failed layer's experts)
        fetched, self._fetched = self._fetched, {}
        for layer, stream in sorted(fetched.items(), key=lambda kv: kv[0]):
            self._record(self.consumed[layer % 2], stream)
        # A dispatch without its combine cannot be undone: the peers wait in their combine for this rank's partials
        # and trap at the dispatcher's timeout, naming this rank. The scheduler forgets it so that a process that
        # survives (one rank) can go on.
        if self._dispatched is not None:
            self._dispatched = None
            self.dispatcher.abandon()

    @contextlib.contextmanager
    def step(self, tokens: int | None = None, num_layers: int | None = None, *,
             tokens_per_rank: Sequence[int] | None = None):
        """``with sched.step(tokens=T) as policy:`` runs ``begin_step`` and, if the body raises, ``abort()``."""
        policy = self.begin_step(tokens=tokens, num_layers=num_layers, tokens_per_rank=tokens_per_rank)
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

    @staticmethod
    def _wait_event(stream: Any, event: Any) -> None:
        """``stream`` waits for ``event``: any stream ``interop.stream_handle`` takes (CuPy, PyTorch, a raw handle;
        None: CuPy's current stream); stand-in events of the protocol tests go through the stand-in stream."""
        if isinstance(getattr(event, "ptr", None), int):
            import cupy as cp

            cp.cuda.ExternalStream(stream_handle(stream)).wait_event(event)
        else:
            stream.wait_event(event)

    def _prefetch(self, layer: int) -> None:
        slot = layer % 2
        cs = self.copy_stream
        self._wait_event(cs, self.consumed[slot])
        if self.trace is not None:  # timing only: allocates events, off by default
            self.trace.append(("fetch", layer, self._timed_event(cs)))
        self.store.copy_engine.fetch(layer, cs, schedule=self.schedule, slice_bytes=self.slice_bytes, batched=self.batched)
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
        fetches the remote experts named by the router's ids (``ids``: a contiguous 1-D ``[n]`` int32 device array,
        or a host integer sequence; ``count`` optional, host int or device int32) on ``stream``
        (``store.nvshmem.fetch``, which raises for bad ids). Local: no other rank takes part. Raises TypeError /
        ValueError for a ``layer`` that is not an int in range, RuntimeError for a ``dispatch`` step, a layer not
        prefetched or already released (``prefetch_all``) or a slot still held by an unreleased layer
        (``on_demand``), ValueError for ``on_demand`` without ``ids``."""
        self._check(layer)
        if self.step_policy == "dispatch":
            raise RuntimeError(f"wait({layer}): this step moves tokens (dispatch); call dispatch() and combine()")
        if self.step_policy == "prefetch_all":
            if layer in self._done:
                raise RuntimeError(f"wait({layer}): layer {layer} was already released in this step (wait before "
                                   "the layer's MoE, release after it)")
            if layer not in self._in_flight:
                raise RuntimeError(
                    f"wait({layer}): layer {layer} was never prefetched; call begin_step() and release() each layer"
                )
            self._wait_event(stream, self.ready[layer % 2])
            self._waited.add(layer)
            return
        if ids is None:
            raise ValueError(f"wait({layer}): the on_demand policy needs the router's expert ids")
        # The fetch overwrites slot layer % 2 on this stream: a layer of that slot not released yet may not have its
        # MoE enqueued, which would then read this layer's experts.
        clash = sorted(q for q in self._fetched if q % 2 == layer % 2 and q != layer)
        if clash:
            raise RuntimeError(f"wait({layer}): layer {clash[0]} uses the same slot and was not released; release it "
                               "(after its MoE) before fetching this layer")
        self.store.nvshmem.fetch(layer, ids, count, stream, num_blocks=self.nvshmem_blocks)
        self._fetched[layer] = stream

    def dispatch(self, layer: int, x: Any, topk_ids: Any, topk_weights: Any, stream: Any):
        """``dispatch`` mode, layer ``layer``: sends this rank's tokens to their experts' owners (collective: every
        rank calls it for the layer). Tensors as ``TokenDispatcher.dispatch`` (``x [T, H]`` bf16, ``topk_ids
        [T, k]`` int32/int64, ``topk_weights [T, k]`` float32, all on this GPU); returns its ``DispatchHandle``,
        whose grouped rows the caller's expert GEMMs read with the store's ``local`` experts (owned by the
        dispatcher). Raises RuntimeError outside a ``dispatch`` step or while another layer is not combined, and what
        the dispatcher raises."""
        self._check(layer)
        if self.step_policy != "dispatch":
            raise RuntimeError(f"dispatch({layer}): this step's mode is {self.step_policy!r}, not 'dispatch'")
        if self._dispatched is not None:
            raise RuntimeError(f"dispatch({layer}): layer {self._dispatched} was dispatched and not combined")
        rows = self.dispatcher.rows_for(self.step_tokens) if self.step_tokens is not None else None
        handle = self.dispatcher.dispatch(x, topk_ids, topk_weights, stream, max_rows=rows)
        self._dispatched = layer
        return handle

    def combine(self, layer: int, y_grouped: Any, handle: Any, stream: Any, out: Any = None):
        """``dispatch`` mode: returns the weighted expert outputs of layer ``layer`` to their tokens (collective).
        ``y_grouped [rows, H]`` bf16 in ``handle``'s row order, at least ``handle.rows`` rows (the step's row bound,
        ``max_pairs`` only when no bound was set); ``out [T, H]`` bf16, caller-allocated or returned (new, on
        ``stream``). Raises RuntimeError when ``layer`` was not dispatched, and what the dispatcher's ``combine``
        raises."""
        self._check(layer)
        if self._dispatched != layer:
            raise RuntimeError(f"combine({layer}): layer {layer} was not dispatched")
        out = self.dispatcher.combine(y_grouped, handle, out=out, stream=stream)
        self._dispatched = None
        return out

    def release(self, layer: int, stream: Any) -> None:
        """After layer ``layer``'s MoE kernels are enqueued on ``stream``: records consumed, then enqueues the
        prefetch of the MoE layer two positions ahead (``prefetch_all``). Local; no host synchronisation. Raises
        RuntimeError for a dispatched layer not combined, or (``prefetch_all``) a layer that is not the oldest in
        flight or was not waited for (module docstring, invariant 3)."""
        self._check(layer)
        if self._dispatched == layer:
            raise RuntimeError(f"release({layer}): the layer was dispatched and not combined")
        if self.step_policy == "prefetch_all":
            # Invariant 3: only the oldest layer in flight, once, after its wait; else p + 2 would land in a slot
            # that a layer not yet read (or already refilled) still occupies.
            if layer not in self._in_flight:
                state = "was already released" if layer in self._done else "was never prefetched"
                raise RuntimeError(f"release({layer}): layer {layer} {state} in this step; expected the oldest layer "
                                   f"in flight, {min(self._in_flight) if self._in_flight else 'none (step done)'}")
            oldest = min(self._in_flight)
            if layer != oldest:
                raise RuntimeError(f"release({layer}): layers are released in order; expected layer {oldest} first")
            if layer not in self._waited:
                raise RuntimeError(f"release({layer}): call wait({layer}) (and enqueue the layer's MoE) before "
                                   "releasing it")
        slot = layer % 2
        # Recorded under every policy: an on_demand step's reads must also hold off a later step's prefetch.
        self._record(self.consumed[slot], stream)
        self._fetched.pop(layer, None)
        if self.step_policy == "prefetch_all":
            self._in_flight.discard(layer)
            self._waited.discard(layer)
            self._done.add(layer)
            if layer + 2 < self.num_layers:
                self._prefetch(layer + 2)

    def _check(self, layer: int) -> None:
        """``layer`` is an integer (not a bool) in ``[0, num_layers)`` of this step."""
        if not is_int(layer):
            raise TypeError(f"layer must be an int, got {layer!r} ({type(layer).__name__})")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside [0, {self.num_layers})")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
