"""The prefetch protocol on the CPU: a simulated pair of streams executed in random (dependency-respecting)
orders must never let a layer read a slot that holds another layer, and the auto rule behaves as documented."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from dwdp_ops.layout import ExpertLayout
from dwdp_ops.partition import ExpertPartition
from dwdp_ops.policy import Rates, choose_mode, expected_distinct
from dwdp_ops.scheduler import PrefetchScheduler


class Event:
    def __init__(self, log):
        self.log, self.version = log, 0

    def record(self, stream):
        stream.ops.append(("record", self))


class Stream:
    def __init__(self, name):
        self.name, self.ops = name, []

    def wait_event(self, ev):
        self.ops.append(("wait", ev))


class FakeStore:
    """The store surface the scheduler uses: geometry (a real partition and the real-dimension bf16 layout, so that
    the auto rule sees DeepSeek-R1's expert size), plans and the two fetch engines recorded as stream ops."""

    def __init__(self, layers, E=8, L=4, rank=0):
        self.num_layers, self.parities, self.E, self.L = layers, min(2, layers), E, L
        self.partition = ExpertPartition.disjoint(E, E // L)
        self.layout = ExpertLayout.moe(7168, 2048, "bfloat16")
        self.rank = rank
        self.plans = []
        # the engines call back into these methods at call time, so a test may replace store.fetch_ce and the like
        self.copy_engine = SimpleNamespace(plan=lambda *a: self._ce_plan(*a), fetch=lambda *a, **k: self.fetch_ce(*a, **k))
        self.nvshmem = SimpleNamespace(table=lambda layer: self.nvshmem_table(layer),
                                       fetch=lambda *a, **k: self.fetch_nvshmem(*a, **k))

    def _ce_plan(self, layer, schedule, slice_bytes):
        self.plans.append(layer)

    def nvshmem_table(self, layer):
        pass

    def fetch_ce(self, layer, stream, **kw):
        stream.ops.append(("write", layer))

    def fetch_nvshmem(self, layer, ids, count, stream, num_blocks):
        stream.ops.append(("ondemand", layer))


def run_protocol(layers, steps, rng, release_before_read=False, vary_layers=True):
    """Drives the scheduler as a model's forward would; returns the host-order list of (stream, op)."""
    log = []
    store = FakeStore(layers)
    host = []  # global host order of (stream, op)

    class S(Stream):
        def __init__(self, name):
            super().__init__(name)

        def wait_event(self, ev):
            host.append((self, ("wait", ev)))

    compute, copy = S("compute"), S("copy")

    def ev_record(ev, stream):
        host.append((stream, ("record", ev)))

    class E(Event):
        def record(self, stream):
            ev_record(self, stream)

    def fetch_ce(layer, stream, **kw):
        host.append((stream, ("write", layer)))

    def fetch_nvshmem(layer, ids, count, stream, num_blocks):
        host.append((stream, ("write", layer)))

    store.fetch_ce = fetch_ce
    store.fetch_nvshmem = fetch_nvshmem
    sched = PrefetchScheduler(store, policy="auto", top_k=1, copy_stream=copy, event_factory=lambda: E(log))
    for _ in range(steps):
        active = rng.randint(1, layers) if vary_layers else layers
        # decode-sized steps go on demand (written on the compute stream), prefill-sized ones prefetch everything
        tokens = rng.choice([1, 4096]) if vary_layers else 4096
        sched.begin_step(tokens=tokens, num_layers=active)
        for p in range(active):
            sched.wait(p, compute, ids="router-ids")
            if release_before_read:  # the bug TensorRT-LLM fixed: consumed recorded before the kernel
                sched.release(p, compute)
            host.append((compute, ("read", p)))
            if not release_before_read:
                sched.release(p, compute)
    return host, compute, copy


def execute(host, compute, copy, rng):
    """Random execution respecting stream order and event semantics; returns the reads' observed slot layers."""
    queues = {compute: [], copy: []}
    # each wait is bound to the number of records of that event enqueued so far (the one it must see)
    records_enq = {}
    for st, op in host:
        if op[0] == "record":
            records_enq[id(op[1])] = records_enq.get(id(op[1]), 0) + 1
            queues[st].append(("record", op[1], records_enq[id(op[1])]))
        elif op[0] == "wait":
            queues[st].append(("wait", op[1], records_enq.get(id(op[1]), 0)))
        else:
            queues[st].append(op)
    done = {}
    slot = {}
    seen = []
    pos = {compute: 0, copy: 0}
    while any(pos[s] < len(queues[s]) for s in queues):
        runnable = []
        for s in queues:
            if pos[s] < len(queues[s]):
                op = queues[s][pos[s]]
                if op[0] != "wait" or done.get(id(op[1]), 0) >= op[2]:
                    runnable.append(s)
        assert runnable, "deadlock"
        s = rng.choice(runnable)
        op = queues[s][pos[s]]
        pos[s] += 1
        if op[0] == "record":  # an event is what its latest record says: an older record completing later is moot
            done[id(op[1])] = max(done.get(id(op[1]), 0), op[2])
        elif op[0] == "write":
            slot[op[1] % 2] = op[1]
        elif op[0] == "read":
            seen.append((op[1], slot.get(op[1] % 2)))
    return seen


@pytest.mark.parametrize("seed", range(40))
def test_no_stale_or_overwritten_slot_in_any_interleaving(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 9)
    host, compute, copy = run_protocol(layers, rng.randint(1, 5), rng)
    for _ in range(20):
        for layer, got in execute(host, compute, copy, rng):
            assert got == layer, f"layer {layer} read slot holding {got}"


def test_the_simulation_catches_consumed_recorded_before_the_kernel():
    rng = random.Random(1)
    host, compute, copy = run_protocol(4, 1, rng, release_before_read=True, vary_layers=False)
    bad = [(layer, got) for _ in range(200) for layer, got in execute(host, compute, copy, rng) if got != layer]
    assert bad, "a random execution should expose the overwrite"


def test_consumed_recorded_after_the_read_and_before_the_next_prefetch():
    host, compute, copy = run_protocol(4, 1, random.Random(0), vary_layers=False)
    ops = [(st.name, op[0], op[1] if op[0] in ("read", "write") else None) for st, op in host]
    # read of layer 0 comes before the record that lets the copy stream write layer 2
    i_read0 = ops.index(("compute", "read", 0))
    i_write2 = ops.index(("copy", "write", 2))
    between = ops[i_read0:i_write2]
    assert ("compute", "record", None) in between and ("copy", "wait", None) in between
    assert [o for o in ops if o[1] == "write"] == [("copy", "write", p) for p in range(4)]


def test_wait_without_prefetch_and_bad_layers_raise():
    store = FakeStore(3)
    copy = Stream("copy")
    sched = PrefetchScheduler(store, copy_stream=copy, event_factory=lambda: Event([]))
    with pytest.raises(RuntimeError, match="was never prefetched"):
        sched.wait(0, Stream("compute"))
    with pytest.raises(ValueError, match=r"layer 3 is outside \[0, 3\)"):
        sched.release(3, Stream("compute"))
    with pytest.raises(ValueError, match="policy must be"):
        PrefetchScheduler(store, policy="eager", copy_stream=copy, event_factory=lambda: Event([]))
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 8\]"):
        PrefetchScheduler(store, top_k=9, copy_stream=copy, event_factory=lambda: Event([]))
    od = PrefetchScheduler(store, policy="on_demand", copy_stream=copy, event_factory=lambda: Event([]))
    od.begin_step()
    with pytest.raises(ValueError, match="needs the router's expert ids"):
        od.wait(0, Stream("compute"))
    auto = PrefetchScheduler(store, policy="auto", copy_stream=copy, event_factory=lambda: Event([]))
    with pytest.raises(ValueError, match="needs the number of tokens"):
        auto.begin_step()
    pf = PrefetchScheduler(store, copy_stream=copy, event_factory=lambda: Event([]))
    with pytest.raises(ValueError, match=r"num_layers 4 is outside \[1, 3\]"):
        pf.begin_step(num_layers=4)
    pf.begin_step(num_layers=2)
    with pytest.raises(RuntimeError, match=r"layers \[0, 1\] of the previous step were not released"):
        pf.begin_step()


def test_on_demand_fetches_on_the_compute_stream_without_events():
    store = FakeStore(2)
    copy, compute = Stream("copy"), Stream("compute")
    sched = PrefetchScheduler(store, policy="on_demand", copy_stream=copy, event_factory=lambda: Event([]))
    n_copy = len(copy.ops)
    assert sched.begin_step() == "on_demand"
    for p in range(2):
        sched.wait(p, compute, ids="device-ids")
        sched.release(p, compute)
    assert [op for op in compute.ops if op[0] != "record"] == [("ondemand", 0), ("ondemand", 1)]
    assert [op[0] for op in compute.ops].count("record") == 2  # consumed, for a later step's prefetch
    assert len(copy.ops) == n_copy  # nothing on the copy stream


def test_expected_distinct_and_auto_rule():
    assert expected_distinct(256, 8, 0) == 0
    assert expected_distinct(256, 8, 1) == pytest.approx(8)
    assert expected_distinct(256, 8, 100000) == pytest.approx(256)
    with pytest.raises(ValueError, match=r"^top_k must be in \[1, 8\] \(num_experts\), got 9$"):
        expected_distinct(8, 9, 1)
    # without a dispatcher auto picks between the weight modes on this rank's T alone: decode on demand, prefill
    # prefetch everything, and the choice is policy.choose_mode's over the two weight modes
    store = FakeStore(2)
    sched = PrefetchScheduler(store, policy="auto", top_k=1, copy_stream=Stream("c"), event_factory=lambda: Event([]))
    assert sched.policy_for(1) == "on_demand"
    assert sched.policy_for(4096) == "prefetch_all"
    for t in (0, 1, 7, 100, 1000, 5000):
        want = choose_mode([t, t], store.partition, store.layout.expert_bytes, 1, 1, Rates(),
                           ("prefetch_all", "on_demand")).mode
        assert sched.policy_for(t) == want
    assert sched.last_choice.mode == want and set(sched.last_choice.cost_us) == {"prefetch_all", "on_demand"}


@pytest.mark.parametrize("kw, match", [
    ({"policy": "fast"}, "policy must be 'prefetch_all', 'on_demand', 'dispatch' or 'auto'"),
    ({"policy": "dispatch"}, "policy 'dispatch' moves tokens: pass dispatcher="),
    ({"top_k": 0}, r"top_k must be in \[1, 8\]"),
    ({"top_k": 2.5}, r"top_k must be in \[1, 8\]"),
    ({"schedule": "random"}, "schedule must be"),
    ({"nvshmem_blocks": 0}, "nvshmem_blocks must be"),
    ({"dispatcher": "wrong partition"}, "is not the store's"),
    ({"dispatcher": "wrong top_k"}, "differs from the scheduler's 8"),
])
def test_bad_arguments_are_named_before_any_gpu_work(kw, match):
    """No stand-in streams or events: the constructor must fail on the argument before creating CUDA objects."""
    store = FakeStore(2)
    if kw.get("dispatcher") == "wrong partition":
        kw = {"dispatcher": FakeDispatcher(ExpertPartition(8, 2, 6, 2), 8)}  # replicated: not the store's placement
    elif kw.get("dispatcher") == "wrong top_k":
        kw = {"dispatcher": FakeDispatcher(store.partition, 4)}
    with pytest.raises(ValueError, match=match):
        PrefetchScheduler(store, **kw)
    with pytest.raises(TypeError, match="rates must be a dwdp_ops.policy.Rates"):
        PrefetchScheduler(store, rates={"ce_gbps": 1})


def test_top_k_takes_a_numpy_integer_and_refuses_a_bool():
    """top_k had to be a Python int (np.int64(2) was refused); any integer now, kept as an int, bools still not."""
    sched = PrefetchScheduler(FakeStore(2), top_k=np.int64(2), copy_stream=Stream("c"), event_factory=lambda: Event([]))
    assert sched.top_k == 2 and type(sched.top_k) is int
    with pytest.raises(ValueError, match=r"^top_k must be in \[1, 8\] \(an int: the layer's experts\), got True$"):
        PrefetchScheduler(FakeStore(2), top_k=True, copy_stream=Stream("c"), event_factory=lambda: Event([]))


def test_abort_after_a_failed_step_lets_the_next_step_start():
    cs = Stream("copy")
    cs.synced = 0

    def sync():
        cs.synced += 1

    cs.synchronize = sync
    sched = PrefetchScheduler(FakeStore(4), copy_stream=cs, event_factory=lambda: Event("e"))
    compute = Stream("compute")
    with pytest.raises(KeyError):
        with sched.step(tokens=10) as policy:
            assert policy == "prefetch_all"
            sched.wait(0, compute)
            raise KeyError("the model failed between wait and release")
    assert cs.synced == 1  # abort waited for the prefetches in flight
    assert sched.begin_step(tokens=10) == "prefetch_all"  # not "layers [0, 1] were not released"
    for p in range(4):
        sched.wait(p, compute)
        sched.release(p, compute)
    assert sched.begin_step(tokens=10) == "prefetch_all"  # the completed step left nothing in flight
    with pytest.raises(RuntimeError, match=r"layers \[0, 1\] of the previous step were not released.*call abort"):
        sched.begin_step(tokens=10)


class FakeDispatcher:
    """The TokenDispatcher surface the scheduler uses; dispatch/combine recorded as stream ops."""

    def __init__(self, partition, top_k, max_tokens=64, hidden=7168):
        self.partition, self.top_k, self.max_tokens, self.hidden = partition, top_k, max_tokens, hidden
        self._pending = None

    def rows_for(self, tokens_per_rank):
        return sum(tokens_per_rank) * 2

    def dispatch(self, x, ids, w, stream, max_rows=None):
        stream.ops.append(("dispatch", x, max_rows))
        self._pending = ("handle", x)
        return self._pending

    def abandon(self):
        self._pending = None

    def combine(self, y, handle, out=None, stream=None):
        assert handle is self._pending
        stream.ops.append(("combine", y))
        self._pending = None
        return "out"


def test_dispatch_mode_moves_tokens_and_no_weights():
    store = FakeStore(3)
    copy, compute = Stream("copy"), Stream("compute")
    d = FakeDispatcher(store.partition, 2)
    sched = PrefetchScheduler(store, policy="dispatch", top_k=2, dispatcher=d, gather=lambda t: [t, t],
                              copy_stream=copy, event_factory=lambda: Event([]))
    n_copy = len(copy.ops)
    with sched.step(tokens=5) as mode:
        assert mode == "dispatch"
        for p in range(3):
            with pytest.raises(RuntimeError, match="moves tokens"):
                sched.wait(p, compute)
            h = sched.dispatch(p, p, "ids", "w", compute)
            with pytest.raises(RuntimeError, match="was dispatched and not combined"):
                sched.dispatch(p, p, "ids", "w", compute)
            with pytest.raises(RuntimeError, match="dispatched and not combined"):
                sched.release(p, compute)
            assert sched.combine(p, "y", h, compute) == "out"
            with pytest.raises(RuntimeError, match="was not dispatched"):
                sched.combine(p, "y", h, compute)
            sched.release(p, compute)
    assert len(copy.ops) == n_copy  # no weights moved
    assert [op[0] for op in compute.ops if op[0] != "record"] == ["dispatch", "combine"] * 3
    # the forced dispatch mode gathers every rank's T (default gather: the store's control plane; here a stand-in)
    # and bounds the grouped rows with it
    assert [op[2] for op in compute.ops if op[0] == "dispatch"] == [20] * 3
    bounded = PrefetchScheduler(store, policy="dispatch", top_k=2, dispatcher=d, gather=lambda t: [t, 7],
                                copy_stream=copy, event_factory=lambda: Event([]))
    bounded.begin_step(tokens=5)
    h = bounded.dispatch(0, "x", "ids", "w", compute)
    assert compute.ops[-1] == ("dispatch", "x", 24) and bounded.step_tokens == [5, 7]
    bounded.combine(0, "y", h, compute)
    # a step that raises between dispatch and combine is aborted; the next step starts
    with pytest.raises(KeyError), sched.step(tokens=5):
        sched.dispatch(0, 0, "ids", "w", compute)
        raise KeyError("boom")
    assert sched.begin_step(tokens=5) == "dispatch" and d._pending is None
    # a weight step cannot dispatch
    pf = PrefetchScheduler(store, policy="prefetch_all", top_k=2, dispatcher=d, copy_stream=copy,
                           event_factory=lambda: Event([]))
    pf.begin_step()
    with pytest.raises(RuntimeError, match="mode is 'prefetch_all', not 'dispatch'"):
        pf.dispatch(0, 0, "ids", "w", compute)


def test_auto_with_a_dispatcher_agrees_across_ranks_with_one_gather_per_step():
    """Every simulated rank passes its own T; the gather returns the same list to each, and every rank's mode is
    the same (the one choose_mode gives for the whole list): decode moves tokens, a large prefill moves weights, a
    step over the dispatcher's capacity on any rank cannot dispatch."""
    world = 2
    stores = [FakeStore(2, E=8, L=4, rank=r) for r in range(world)]
    calls = []
    steps = [[4, 4], [4, 0], [30000, 20000], [60, 70], [64, 65]]
    for step in steps:
        modes = []
        for r, store in enumerate(stores):
            d = FakeDispatcher(store.partition, 2, max_tokens=64)

            def gather(t, step=step, r=r):
                calls.append(t)
                assert t == step[r]
                return list(step)

            sched = PrefetchScheduler(store, policy="auto", top_k=2, dispatcher=d, gather=gather,
                                      copy_stream=Stream("c"), event_factory=lambda: Event([]))
            modes.append(sched.policy_for(step[r]))
            allowed = ("prefetch_all", "on_demand", "dispatch") if max(step) <= 64 else ("prefetch_all", "on_demand")
            want = choose_mode(step, store.partition, store.layout.expert_bytes, 7168, 2, Rates(), allowed).mode
            assert modes[-1] == want, (step, sched.last_choice.table())
        assert len(set(modes)) == 1
    assert len(calls) == world * len(steps)  # one gather per rank per step
    decode = PrefetchScheduler(stores[0], policy="auto", top_k=2, dispatcher=FakeDispatcher(stores[0].partition, 2),
                               gather=lambda t: [t, 4], copy_stream=Stream("c"), event_factory=lambda: Event([]))
    assert decode.policy_for(4) == "dispatch"
    assert decode.policy_for(4, tokens_per_rank=[4, 60000]) == "prefetch_all"  # over capacity: weights
    with pytest.raises(ValueError, match="tokens_per_rank must hold every rank's tokens"):
        decode.policy_for(4, tokens_per_rank=[5, 4])
    with pytest.raises(ValueError, match="tokens_per_rank must hold every rank's tokens"):
        decode.policy_for(4, tokens_per_rank=[4])
    bad = PrefetchScheduler(stores[0], policy="auto", top_k=2, dispatcher=FakeDispatcher(stores[0].partition, 2),
                            gather=lambda t: [t], copy_stream=Stream("c"), event_factory=lambda: Event([]))
    with pytest.raises(ValueError, match="gather returned 1 counts for 2 ranks"):
        bad.begin_step(tokens=3)
    with pytest.raises(ValueError, match="tokens must be an int >= 0"):
        bad.begin_step(tokens=-1)


def test_set_policy_between_steps_and_not_inside_one():
    """A benchmark interleaves two policies on one store: ``set_policy`` takes effect at the next step, refuses a
    change mid-step, an unknown policy and ``dispatch`` without a dispatcher."""
    sched = PrefetchScheduler(FakeStore(2), copy_stream=Stream("copy"), event_factory=lambda: Event("e"))
    compute = Stream("compute")
    assert sched.begin_step(tokens=4) == "prefetch_all"
    with pytest.raises(RuntimeError, match="between steps"):
        sched.set_policy("on_demand")
    for p in range(2):
        sched.wait(p, compute)
        sched.release(p, compute)
    sched.set_policy("on_demand")
    assert sched.begin_step(tokens=4) == "on_demand"
    for p in range(2):
        sched.release(p, compute)
    with pytest.raises(ValueError, match="policy must be"):
        sched.set_policy("fastest")
    with pytest.raises(ValueError, match="without a dispatcher"):
        sched.set_policy("dispatch")
    assert sched.policy == "on_demand"


def test_release_only_the_oldest_waited_layer_in_flight():
    """Invariant 3 under misuse: a second release, an out-of-order release or a release before its wait raises
    before anything is enqueued, so no slot ever gets a second writer."""
    store = FakeStore(4)
    copy, comp = Stream("copy"), Stream("compute")
    s = PrefetchScheduler(store, copy_stream=copy, event_factory=lambda: Event([]))
    s.begin_step()
    writes = lambda: [op for op in copy.ops if op[0] == "write"]  # noqa: E731
    n = len(writes())
    with pytest.raises(RuntimeError, match=r"release\(1\): layers are released in order; expected layer 0"):
        s.release(1, comp)
    with pytest.raises(RuntimeError, match=r"call wait\(0\)"):
        s.release(0, comp)
    assert len(writes()) == n
    s.wait(0, comp)
    s.release(0, comp)
    assert len(writes()) == n + 1  # layer 2
    with pytest.raises(RuntimeError, match=r"release\(0\): layer 0 was already released.*expected .* 1"):
        s.release(0, comp)
    assert len(writes()) == n + 1 and sorted(s._in_flight) == [1, 2]
    for p in (1, 2, 3):
        s.wait(p, comp)
        s.release(p, comp)
    assert len(writes()) == n + 2  # layer 3, then nothing past the last layer
    s.begin_step()  # a clean next step


def test_layers_must_be_integers_and_numpy_token_counts_are_taken():
    np = pytest.importorskip("numpy")
    s = PrefetchScheduler(FakeStore(4), copy_stream=Stream("c"), event_factory=lambda: Event([]))
    s.begin_step()
    for bad in (1.5, True, "1"):
        with pytest.raises(TypeError, match="layer must be an int"):
            s.wait(bad, Stream("compute"))
        with pytest.raises(TypeError, match="layer must be an int"):
            s.release(bad, Stream("compute"))
    s.wait(np.int64(0), Stream("compute"))
    s.release(np.int64(0), Stream("compute"))
    auto = PrefetchScheduler(FakeStore(4), policy="auto", top_k=1, copy_stream=Stream("c"),
                             event_factory=lambda: Event([]))
    assert auto.begin_step(tokens=np.int64(5)) in ("prefetch_all", "on_demand")


def test_num_layers_must_be_an_int():
    """begin_step(num_layers=2.7) ran a 2-layer step and num_layers=True a 1-layer step (int() truncated them), unlike
    every layer argument of the protocol. TypeError naming num_layers; numpy integers pass."""
    s = PrefetchScheduler(FakeStore(4), copy_stream=Stream("c"), event_factory=lambda: Event([]))
    for bad in (2.7, True, "2"):
        with pytest.raises(TypeError, match="num_layers must be an int"):
            s.begin_step(num_layers=bad)
        assert not s._in_flight  # nothing prefetched
    assert s.begin_step(num_layers=np.int64(1)) == "prefetch_all" and s.num_layers == 1



@pytest.mark.parametrize("counts", [[5, -3], [5, 2.9], [5, True], [5, "7"]])
def test_tokens_per_rank_entries_must_be_counts(counts):
    """Every rank's T bounds the dispatch step's grouped rows (rows_for): [5, -3] gave a bound 3 tokens short and
    [5, 2.9] one of 2 tokens on rank 1, so the dispatch kernels would drop the overflowing pairs. ValueError naming
    the list, before the step starts."""
    store = FakeStore(2)
    d = FakeDispatcher(store.partition, 2)
    s = PrefetchScheduler(store, policy="dispatch", top_k=2, dispatcher=d, copy_stream=Stream("c"),
                          event_factory=lambda: Event([]))
    with pytest.raises(ValueError, match="tokens_per_rank must hold every rank's tokens"):
        s.begin_step(tokens=5, tokens_per_rank=counts)
    assert s.begin_step(tokens=5, tokens_per_rank=[5, np.int64(3)]) == "dispatch" and s.step_tokens == [5, 3]


def test_an_on_demand_layer_not_released_blocks_the_next_step():
    """An on_demand layer's release records consumed after its reads; a step that forgot it was accepted, and the next
    prefetch_all step's copy into that slot waited on an older consumed record only, so it could overwrite experts
    the forgotten layer's kernels were still reading. begin_step and set_policy now refuse, as they do for a
    prefetch_all layer in flight; abort() ends such a step."""
    store = FakeStore(4)
    copy, comp = Stream("copy"), Stream("compute")
    s = PrefetchScheduler(store, policy="on_demand", copy_stream=copy, event_factory=lambda: Event([]))
    assert s.begin_step() == "on_demand"
    for p in range(4):
        s.wait(p, comp, ids="router-ids")
        if p != 2:
            s.release(p, comp)
    with pytest.raises(RuntimeError, match="between steps"):
        s.set_policy("prefetch_all")
    with pytest.raises(RuntimeError, match=r"layers \[2\] of the previous step were not released"):
        s.begin_step()
    s.abort()
    assert s.begin_step() == "on_demand"
    for p in range(4):  # a complete step: nothing left over
        s.wait(p, comp, ids="router-ids")
        s.release(p, comp)
    s.set_policy("prefetch_all")
    assert s.begin_step() == "prefetch_all"


def test_wait_on_a_released_layer_says_so():
    """wait(0) after release(0) in a prefetch_all step said 'layer 0 was never prefetched; call begin_step()', which
    sent the reader to look for a missing begin_step; it names the release now."""
    s = PrefetchScheduler(FakeStore(4), copy_stream=Stream("c"), event_factory=lambda: Event([]))
    comp = Stream("compute")
    s.begin_step()
    s.wait(0, comp)
    s.release(0, comp)
    with pytest.raises(RuntimeError, match=r"wait\(0\): layer 0 was already released in this step"):
        s.wait(0, comp)
    with pytest.raises(RuntimeError, match=r"wait\(3\): layer 3 was never prefetched"):
        s.wait(3, comp)


def test_a_refused_begin_step_leaves_the_last_steps_state():
    """begin_step had set num_layers (and cleared its sets) before picking the mode, so a step refused there (bad
    tokens_per_rank, a failed gather) left the next one's layer count with the last one's mode."""
    store = FakeStore(4)
    d = FakeDispatcher(store.partition, 2)
    s = PrefetchScheduler(store, policy="dispatch", top_k=2, dispatcher=d, copy_stream=Stream("c"),
                          event_factory=lambda: Event([]))
    assert s.begin_step(tokens=5, num_layers=4, tokens_per_rank=[5, 3]) == "dispatch" and s.num_layers == 4
    with pytest.raises(ValueError, match="tokens_per_rank must hold every rank's tokens"):
        s.begin_step(tokens=5, num_layers=1, tokens_per_rank=[5, -3])
    assert s.num_layers == 4 and s.step_policy == "dispatch"


def test_a_prefetch_failing_in_begin_step_leaves_the_scheduler_usable():
    """begin_step's second prefetch failing left layer 0 in flight: the exception came from begin_step itself, so
    ``with sched.step():`` never reached its abort(), and the next begin_step raised 'layers [0] of the previous
    step were not released'. begin_step now aborts the step it started (waiting for the prefetch enqueued) and
    re-raises; the next step starts."""
    store = FakeStore(4)
    cs = Stream("copy")
    cs.synced = 0

    def sync():
        cs.synced += 1

    cs.synchronize = sync

    def failing_fetch(layer, stream, **kw):
        if layer == 1:
            raise RuntimeError("peer copy failed")
        stream.ops.append(("write", layer))

    store.fetch_ce = failing_fetch
    s = PrefetchScheduler(store, copy_stream=cs, event_factory=lambda: Event([]))
    with pytest.raises(RuntimeError, match="peer copy failed"), s.step(tokens=4):
        pass
    assert cs.synced == 1 and not s._in_flight
    store.fetch_ce = FakeStore.fetch_ce.__get__(store)
    assert s.begin_step(tokens=4) == "prefetch_all" and sorted(s._in_flight) == [0, 1]


@pytest.mark.parametrize("gathered", [[5, -3], [5, 2.9], [5, True], [5, "7"], [4, 3]],
                         ids=["negative", "float", "bool", "str", "not-this-rank"])
def test_gathered_counts_are_checked_as_tokens_per_rank_is(gathered):
    """The gather's result went through int(): [5, -3] and [5, 2.9] started a dispatch step whose rows_for bound was
    3 or 1 token short (the kernels drop the overflowing pairs), and a list whose entry for this rank was not its T
    passed, though tokens_per_rank refuses all of these. ValueError naming the gather's result; nothing starts."""
    store = FakeStore(2)
    d = FakeDispatcher(store.partition, 2)
    s = PrefetchScheduler(store, policy="dispatch", top_k=2, dispatcher=d, gather=lambda t: gathered,
                          copy_stream=Stream("c"), event_factory=lambda: Event([]))
    with pytest.raises(ValueError, match=r"gather must return every rank's tokens \(ints >= 0, this rank's = 5"):
        s.begin_step(tokens=5)
    assert s.step_tokens is None


def test_gathered_numpy_and_tensor_counts_are_taken():
    torch = pytest.importorskip("torch")
    store = FakeStore(2)
    d = FakeDispatcher(store.partition, 2)
    for gathered in ([np.int64(5), np.uint8(3)], list(torch.tensor([5, 3]))):
        s = PrefetchScheduler(store, policy="dispatch", top_k=2, dispatcher=d, gather=lambda t, g=gathered: g,
                              copy_stream=Stream("c"), event_factory=lambda: Event([]))
        assert s.begin_step(tokens=5) == "dispatch" and s.step_tokens == [5, 3]
        assert all(type(t) is int for t in s.step_tokens)


@pytest.mark.parametrize("bad", [2.5, True, "32"])
def test_nvshmem_blocks_must_be_an_int(bad):
    """nvshmem_blocks was only range-checked: 2.5 was kept (to reach the fetch kernel's binding at the first on_demand
    layer), True ran the fetch on 1 SM, and "32" raised Python's "'<=' not supported between 'int' and 'str'"."""
    with pytest.raises(ValueError, match=r"^nvshmem_blocks must be an int in \[1, 65535\], got "):
        PrefetchScheduler(FakeStore(2), nvshmem_blocks=bad, copy_stream=Stream("c"), event_factory=lambda: Event([]))
    s = PrefetchScheduler(FakeStore(2), nvshmem_blocks=np.int64(16), copy_stream=Stream("c"),
                          event_factory=lambda: Event([]))
    assert s.nvshmem_blocks == 16 and type(s.nvshmem_blocks) is int


def test_on_demand_fetch_into_a_slot_not_released_raises():
    """An on_demand layer is fetched into slot layer % 2 on the compute stream; wait(2) while layer 0 was fetched and
    not released was accepted, so layer 0's MoE, enqueued after it, would read layer 2's experts (the prefetch_all
    step refuses the same misuse, invariant 3). RuntimeError before anything is enqueued; the other slot and a
    refetch of the same layer stay accepted."""
    comp = Stream("compute")
    s = PrefetchScheduler(FakeStore(4), policy="on_demand", copy_stream=Stream("c"), event_factory=lambda: Event([]))
    s.begin_step()
    s.wait(0, comp, ids="ids")
    s.wait(1, comp, ids="ids")  # the other slot
    n = len(comp.ops)
    with pytest.raises(RuntimeError, match=r"wait\(2\): layer 0 uses the same slot and was not released"):
        s.wait(2, comp, ids="ids")
    assert len(comp.ops) == n
    s.release(0, comp)
    s.wait(2, comp, ids="ids")
    for p in (1, 2):
        s.release(p, comp)
    s.wait(3, comp, ids="ids")
    s.release(3, comp)
    assert s.begin_step() == "on_demand"


@pytest.mark.parametrize("bad", ["no", 1, 0.0, [True]])
def test_batched_is_checked_at_construction(bad):
    """batched was not checked: a bad value was kept until the first prefetch, where fetch_ce refused it inside
    begin_step (which then aborted the step). TypeError naming batched at construction; numpy bools are taken (as
    fetch_ce takes them) and kept as bools."""
    with pytest.raises(TypeError, match=r"^batched must be True, False or None, got "):
        PrefetchScheduler(FakeStore(2), batched=bad, copy_stream=Stream("c"), event_factory=lambda: Event([]))
    s = PrefetchScheduler(FakeStore(2), batched=np.bool_(False), copy_stream=Stream("c"),
                          event_factory=lambda: Event([]))
    assert s.batched is False
    assert PrefetchScheduler(FakeStore(2), schedule="interleaved", copy_stream=Stream("c"),
                             event_factory=lambda: Event([])).batched is True


@pytest.mark.parametrize("policy", ["prefetch_all", "on_demand", "auto"])
@pytest.mark.parametrize("counts", [[5, -3], [5, 2.9], [5, True], [4, 3], [5], 5, "53", {0: 5, 1: 3}])
def test_tokens_per_rank_is_checked_under_every_policy(policy, counts):
    """policy_for checked tokens_per_rank only for auto and dispatch: prefetch_all and on_demand returned their mode
    and ignored a malformed list. The same check (and message) now runs for every policy; a valid list is kept as the
    step's counts."""
    s = PrefetchScheduler(FakeStore(2), policy=policy, top_k=2, copy_stream=Stream("c"),
                          event_factory=lambda: Event([]))
    with pytest.raises(ValueError, match=r"^tokens_per_rank must hold every rank's tokens \(2 ints >= 0, this rank's "
                                         r"= 5\), got "):
        s.policy_for(5, tokens_per_rank=counts)
    with pytest.raises(ValueError, match="tokens_per_rank must hold every rank's tokens"):
        s.begin_step(tokens=5, tokens_per_rank=counts)
    assert not s._in_flight  # refused before anything was prefetched
    mode = s.begin_step(tokens=5, tokens_per_rank=(5, np.int64(3)))
    assert mode == (mode if policy == "auto" else policy) and s.step_tokens == [5, 3]
