"""Review of the CPU-reachable core (scheduler, store, fetch engines): each test failed on the code before its fix."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from dwdp_ops import DwdpError, ExpertLayout, ExpertPartition, ExpertStore
from dwdp_ops.scheduler import PrefetchScheduler
from test_scheduler_host import Event, FakeStore, Stream, execute
from test_scheduler_host import FakeDispatcher as _Dispatcher
from test_store_host import MIB, FakeBackend, FakeRendezvous, FakeRuntime, make


@pytest.fixture(autouse=True)
def no_gpu_sync(monkeypatch):
    monkeypatch.setattr(ExpertStore, "_synchronize", lambda self: None)


def _simulated(policy="on_demand", layers=4):
    """A scheduler whose streams log (stream, op) in host order, as test_scheduler_host.run_protocol's do, with the
    fetches of both engines logged as writes of their stream."""
    host = []

    class S(Stream):
        def wait_event(self, ev):
            host.append((self, ("wait", ev)))

    class E(Event):
        def record(self, stream):
            host.append((stream, ("record", self)))

    store = FakeStore(layers)
    store.fetch_ce = lambda layer, stream, **kw: host.append((stream, ("write", layer)))
    store.fetch_nvshmem = lambda layer, ids, count, stream, num_blocks: host.append((stream, ("write", layer)))
    compute, copy = S("compute"), S("copy")
    sched = PrefetchScheduler(store, policy=policy, top_k=1, copy_stream=copy, event_factory=lambda: E([]))
    return sched, host, compute, copy


def test_abort_of_an_on_demand_step_orders_its_slot_writes_before_the_next_prefetch():
    """An on_demand layer is fetched into slot layer % 2 on the compute stream. abort() after a failure between that
    fetch and the layer's release forgot the layer without recording consumed, so the next prefetch_all step's copy
    into that slot waited for an older consumed record only: the failed step's on-demand write, still queued on the
    compute stream, could land after the copy and the next step's layer 0 read the failed layer 2's experts (a
    write-write race on the slot that corrupts a good step). abort() now records consumed of each fetched, unreleased
    layer on the stream that fetched it."""
    for seed in range(40):
        rng = random.Random(seed)
        sched, host, compute, copy = _simulated()
        with pytest.raises(KeyError), sched.step() as mode:
            assert mode == "on_demand"
            for p in range(2):
                sched.wait(p, compute, ids="ids")
                host.append((compute, ("read", p)))
                sched.release(p, compute)
            sched.wait(2, compute, ids="ids")  # slot 0, written on compute; the step fails before release(2)
            raise KeyError("the model failed after the router")
        sched.set_policy("prefetch_all")
        assert sched.begin_step() == "prefetch_all"
        for p in range(4):
            sched.wait(p, compute)
            host.append((compute, ("read", p)))
            sched.release(p, compute)
        for _ in range(20):
            seen = execute(host, compute, copy, rng)
            assert all(layer == got for layer, got in seen), f"seed {seed}: {seen}"


class _Recording(FakeRendezvous):
    def __init__(self, world, peer_failures=None, fail_at=None):
        super().__init__(world, peer_failures)
        self.names, self.fail_at = [], fail_at

    def allgather(self, name, payload):
        self.names.append(name)
        if name == self.fail_at:
            raise DwdpError(f"rendezvous: {name} timed out (rank 1 missing)")
        return super().allgather(name, payload)


def test_a_registration_unit_that_does_not_fit_is_refused_after_the_geometry_collective():
    """The registration-unit check raised before the geometry all-gather: the unit comes from this rank's
    environment (NVSHMEM_CUMEM_GRANULARITY), so a rank whose unit did not divide its blocks raised alone and its peers
    waited in the "ExpertStore" all-gather until the control plane timed out. The check now runs after that
    collective (which compares the units, part of the geometry), so every rank raises."""
    be = FakeBackend()
    be.register_unit = lambda: 512 * MIB
    rdv = _Recording(2)
    rt = FakeRuntime(be, rdv)
    with pytest.raises(DwdpError, match="NVSHMEM registers buffers in units of"):
        ExpertStore(ExpertPartition.disjoint(8, 2), ExpertLayout.moe(256, 128, "bfloat16"), 2, runtime=rt)
    assert rdv.names == ["ExpertStore"] and not be.calls


def test_a_failed_agreement_after_registration_does_not_unregister_behind_a_missing_peer():
    """When a phase's agreement itself failed (the control plane: a peer is gone), construction rolled back
    everything, unregister_symmetric included: that is collective in NVSHMEM and would wait for the missing peer
    forever (close() refuses to for that reason). The rollback now releases what was created after the registration
    and keeps the registered local storage (it stays until the process exits), saying so in a note."""
    be = FakeBackend()
    rdv = _Recording(2, fail_at="ExpertStore:slots and views")
    rt = FakeRuntime(be, rdv)
    with pytest.raises(DwdpError, match="timed out") as info:
        ExpertStore(ExpertPartition.disjoint(8, 2), ExpertLayout.moe(256, 128, "bfloat16"), 2, runtime=rt)
    assert be.calls["unregister_symmetric"] == 0 and be.live["registration"] == 4
    assert +be.live == Counter(registration=4, handle=4, range=4, map=4)  # the local storage only
    assert "unregister" in "".join(getattr(info.value, "__notes__", []))
    # a failed agreement before the registration still releases everything
    be = FakeBackend()
    rt = FakeRuntime(be, _Recording(2, fail_at="ExpertStore:local storage"))
    with pytest.raises(DwdpError, match="timed out"):
        ExpertStore(ExpertPartition.disjoint(8, 2), ExpertLayout.moe(256, 128, "bfloat16"), 2, runtime=rt)
    assert not +be.live


def test_prepare_refuses_a_released_layer_or_a_closed_store_before_building_anything(monkeypatch):
    """prepare() checked its layers' type and range only: a released layer in ``layers`` was met by nvshmem_table
    after the tables of the layers before it had been built (the docstring says both arguments are checked before
    anything is built), prepare() with its default (every layer) always failed once any layer was released, and on
    a closed store (or after finalize) prepare(layers=[]) built the remote id list and stream scratch, device memory
    nothing would free. The store's layer check now runs first, for each layer; the default is every layer not
    released."""
    import cupy
    from test_store_host import _FakeDeviceArray

    monkeypatch.setattr(cupy.cuda, "Device", lambda d: type("Dev", (), {"synchronize": lambda self: None})())
    store, rt = make(FakeBackend(), layers=3)
    store.device_constant = lambda host, what, remedy: _FakeDeviceArray(host)
    scratch = []
    store.nvshmem._scratch_for = scratch.append
    store.release(1)
    with pytest.raises(DwdpError, match="^prepare: layer 1 was released"):
        store.nvshmem.prepare(layers=[0, 1], streams=[7])
    assert store.nvshmem._tables == {} and store.nvshmem._all_ids is None and scratch == []
    store.nvshmem.prepare(streams=[7])
    assert set(store.nvshmem._tables) == {0, 2} and scratch == [7]
    rt.state = "finalized"
    with pytest.raises(DwdpError, match="finalized"):
        store.nvshmem.prepare(layers=[], streams=[8])
    rt.state = "initialized"
    store.close()
    with pytest.raises(DwdpError, match="^prepare: the ExpertStore is closed"):
        store.nvshmem.prepare(layers=[], streams=[8])
    assert store.nvshmem._all_ids is None and scratch == [7]


def _execute_with_syncs(host, compute, copy, rng):
    """test_scheduler_host.execute, with a host synchronisation of a stream (abort's) modelled as what it is: every op
    the host enqueues after it, on any stream, starts after everything enqueued on that stream before it."""
    out = []
    for st, op in host:
        if op[0] == "sync":
            marker = object()
            out.append((st, ("record", marker)))
            out += [(s, ("wait", marker)) for s in (compute, copy)]
        else:
            out.append((st, op))
    return execute(out, compute, copy, rng)


@pytest.mark.parametrize("seed", range(100))
def test_random_steps_with_failures_never_let_a_clean_step_read_another_layer(seed):
    """Property: random policies (set_policy between steps, auto's per-step choice), step lengths, failures injected
    in the body (after a wait, after a read, before a release) and in the prefetches; refused calls mid-step
    (begin_step, set_policy) change nothing. In every interleaving of the two streams, each read of a step that
    completed sees its own layer in the slot, whatever the failed steps before it left queued."""
    rng = random.Random(seed)
    layers = rng.randint(1, 6)
    sched, host, compute, copy = _simulated("prefetch_all", layers)
    compute.synchronize = lambda: host.append((compute, ("sync", None)))
    copy.synchronize = lambda: host.append((copy, ("sync", None)))
    store = sched.store
    clean_reads = []  # (host index of the read) for steps that completed
    for _ in range(rng.randint(1, 6)):
        sched.set_policy(rng.choice(["prefetch_all", "on_demand", "auto"]))
        n = rng.randint(1, layers)
        fail_fetch = rng.choice([None] * 3 + list(range(n)))

        def fetch_ce(layer, stream, fail_fetch=fail_fetch, **kw):
            if layer == fail_fetch:
                raise RuntimeError("injected copy failure")
            host.append((stream, ("write", layer)))

        store.fetch_ce = fetch_ce
        fail_at = rng.choice([None] * 2 + [(p, where) for p in range(n) for where in ("wait", "read", "release")])
        reads = []
        try:
            with sched.step(tokens=rng.choice([1, 4096]), num_layers=n) as mode:
                for p in range(n):
                    sched.wait(p, compute, ids="ids")
                    if fail_at == (p, "wait"):
                        raise KeyError("after wait")
                    reads.append(len(host))
                    host.append((compute, ("read", p)))
                    if fail_at == (p, "read"):
                        raise KeyError("after read")
                    if rng.random() < 0.2:  # refused mid-step: nothing enqueued, nothing changed
                        before = (len(host), sorted(sched._in_flight), dict(sched._fetched))
                        with pytest.raises(RuntimeError):
                            sched.begin_step(tokens=1)
                        with pytest.raises(RuntimeError):
                            sched.set_policy("on_demand")
                        assert (len(host), sorted(sched._in_flight), dict(sched._fetched)) == before, mode
                    if fail_at == (p, "release"):
                        raise KeyError("before release")
                    sched.release(p, compute)
        except (KeyError, RuntimeError) as e:
            assert isinstance(e, KeyError) or "injected" in str(e)
            assert not sched._in_flight and not sched._fetched and sched._dispatched is None
            continue
        clean_reads += reads
    for _ in range(10):
        seen = _execute_with_syncs(host, compute, copy, rng)
        # every read is on the compute stream, so they run (and are seen) in host order
        k_of = {i: k for k, i in enumerate(i for i, (_st, op) in enumerate(host) if op[0] == "read")}
        bad = [seen[k_of[i]] for i in clean_reads if seen[k_of[i]][0] != seen[k_of[i]][1]]
        assert not bad, f"clean-step reads saw another layer's slot: {bad}"


def test_choose_and_policy_for_name_bad_counts_before_any_collective():
    """choose() with a dispatcher took max() of the raw list first: [5, None] or [5, '3'] raised "'>' not supported
    between instances ...", and list() turned a {rank: T} dict into its keys ([0, 1]: two ranks of 0 and 1 tokens, a
    mode silently chosen for the wrong counts). policy_for checked tokens only through the gather: -1 and 2.5 were
    sent to every rank in the collective before anyone refused them, and auto without tokens met None deep in the
    rule. Each is now a TypeError / ValueError naming the argument, before any gather."""
    store = FakeStore(2)
    gathered = []
    d = _Dispatcher(store.partition, 2)
    with_d = PrefetchScheduler(store, policy="auto", top_k=2, dispatcher=d,
                               gather=lambda t: gathered.append(t) or [t, t], copy_stream=Stream("c"),
                               event_factory=lambda: Event([]))
    without = PrefetchScheduler(store, policy="auto", top_k=2, copy_stream=Stream("c"),
                                event_factory=lambda: Event([]))
    for s in (with_d, without):
        for bad, match in (([5, None], r"tokens_per_rank\[1\] must be an int >= 0, got None"),
                           ([5, "3"], r"tokens_per_rank\[1\] must be an int >= 0, got '3'"),
                           ({0: 4, 1: 4}, "got a dict"), (5, "tokens_per_rank must be a sequence")):
            with pytest.raises(TypeError, match=match):
                s.choose(bad)
        assert s.choose(np.array([4, 4])).mode == s.choose([4, 4]).mode
        for bad in (-1, 2.5, True):
            with pytest.raises(ValueError, match=r"^policy_for: tokens must be an int >= 0 or None, got "):
                s.policy_for(bad)
        with pytest.raises(ValueError, match="^policy_for: the auto policy needs the number of tokens"):
            s.policy_for(None)
    assert gathered == []
    assert with_d.choose([4, 4]).mode == "dispatch" and with_d.policy_for(np.int64(4)) == "dispatch"
    assert gathered == [4]


@pytest.mark.parametrize("which", ["partition", "layout"])
def test_store_names_a_partition_or_layout_of_another_type(which):
    """ExpertStore took any object as partition and layout: a str partition raised "'str' object has no attribute
    'world_size'", a layout dict "'dict' object has no attribute 'strides'" from inside registration_overhead.
    TypeError naming the argument, before any collective or allocation."""
    be = FakeBackend()
    rdv = _Recording(2)
    args = {"partition": ExpertPartition.disjoint(8, 2), "layout": ExpertLayout.moe(256, 128, "bfloat16")}
    args[which] = {"experts": 8}
    with pytest.raises(TypeError, match=rf"^ExpertStore: {which} must be an Expert"):
        ExpertStore(args["partition"], args["layout"], 2, runtime=FakeRuntime(be, rdv))
    assert not be.calls and rdv.names == []
