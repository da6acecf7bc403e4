"""The prefetch protocol on the CPU: a simulated pair of streams executed in random (dependency-respecting)
orders must never let a layer read a slot that holds another layer, and the auto rule behaves as documented."""

from __future__ import annotations

import random

import pytest
from dwdp_ops.scheduler import PrefetchScheduler, choose_policy, expected_distinct


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
    def __init__(self, layers, E=8, L=4):
        self.num_layers, self.parities, self.E, self.L = layers, min(2, layers), E, L
        self.plans = []

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
    sched = PrefetchScheduler(store, policy="auto", copy_stream=copy, event_factory=lambda: E(log))
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
        if op[0] == "record":
            done[id(op[1])] = op[2]
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
    # decode (few tokens): on demand; prefill (many tokens): prefetch everything
    assert choose_policy(256, 64, 8, 4, 370, 320) == "on_demand"
    assert choose_policy(256, 64, 8, 4096, 370, 320) == "prefetch_all"
    # the crossover is where D / E * 1/B_sm == 1/B_ce
    t = next(t for t in range(1, 1000) if choose_policy(256, 64, 8, t, 370, 320) == "prefetch_all")
    assert expected_distinct(256, 8, t) / 256 / 320 >= 1 / 370 > expected_distinct(256, 8, t - 1) / 256 / 320
    with pytest.raises(ValueError):
        expected_distinct(8, 9, 1)
    with pytest.raises(ValueError):
        choose_policy(8, 4, 2, 1, 0, 1)


@pytest.mark.parametrize("kw, match", [
    ({"policy": "fast"}, "policy must be 'prefetch_all', 'on_demand' or 'auto'"),
    ({"top_k": 0}, r"top_k must be in \[1, 8\]"),
    ({"top_k": 2.5}, r"top_k must be in \[1, 8\]"),
    ({"schedule": "random"}, "schedule must be"),
    ({"nvshmem_blocks": 0}, "nvshmem_blocks must be"),
    ({"ce_gbps": 0}, "must be positive"),
])
def test_bad_arguments_are_named_before_any_gpu_work(kw, match):
    """No stand-in streams or events: the constructor must fail on the argument before creating CUDA objects."""
    with pytest.raises(ValueError, match=match):
        PrefetchScheduler(FakeStore(2), **kw)


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
    with pytest.raises(RuntimeError, match="call abort"):
        sched.begin_step(tokens=10)
        sched.begin_step(tokens=10)
