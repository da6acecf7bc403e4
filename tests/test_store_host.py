"""ExpertStore construction on the CPU: a fake native backend and control plane. A failure in any phase, on this rank
or on a peer, makes this rank raise a DwdpError naming the phase and the failed ranks, after releasing every resource
it created exactly once; release errors are reported, not swallowed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from dwdp_ops import DwdpError, ExpertLayout, ExpertPartition, ExpertStore

MIB = 1 << 20
PHASES = ["local storage", "registration", "slots and views"]


class FakeBackend:
    def __init__(self, fail_on=None, fail_release=None):
        self.fail_on = fail_on or {}  # function name -> the call number (1-based) that raises
        self.fail_release = fail_release
        self.calls = Counter()
        self.live = Counter()  # kind -> resources alive
        self.next = 1 << 40

    def _call(self, name):
        self.calls[name] += 1
        if self.fail_on.get(name) == self.calls[name]:
            raise RuntimeError(f"injected failure in {name}")

    def _new(self, kind):
        self.next += 64 * MIB
        self.live[kind] += 1
        return self.next

    def _free(self, kind, name):
        self._call(name)
        if name == self.fail_release:
            raise RuntimeError(f"injected release failure in {name}")
        assert self.live[kind] > 0, f"{kind} released more often than created"
        self.live[kind] -= 1

    def register_unit(self):
        return 2 * MIB

    def vmm_granularity(self, dev):
        return 2 * MIB

    def vmm_create(self, n, dev):
        self._call("vmm_create")
        return self._new("handle")

    def vmm_release(self, h):
        self._free("handle", "vmm_release")

    def vmm_reserve(self, n, align):
        self._call("vmm_reserve")
        return self._new("range")

    def vmm_free(self, va, n):
        self._free("range", "vmm_free")

    def vmm_map(self, va, n, h, off, dev):
        self._call("vmm_map")
        self.live["map"] += 1

    def vmm_unmap(self, va, n):
        self._free("map", "vmm_unmap")

    def register_symmetric(self, va, n):
        self._call("register_symmetric")
        return self._new("registration")

    def unregister_symmetric(self, sym, n):
        self._free("registration", "unregister_symmetric")

    def symmetric_peer_ptr(self, sym, p):
        return sym + p


class FakeRendezvous:
    def __init__(self, world, peer_failures=None):
        self.world, self.peer_failures = world, peer_failures or {}  # collective name -> message of rank 1

    def allgather(self, name, payload):
        peer = self.peer_failures.get(name, b"" if name.startswith("ExpertStore:") else payload)
        return [payload, peer] + [b"" if name.startswith("ExpertStore:") else payload] * (self.world - 2)

    def barrier(self, name):
        pass


class FakeRuntime:
    def __init__(self, backend, rdv, world=2):
        self.backend, self.rendezvous, self.device, self.world = backend, rdv, 0, world
        self.state = "initialized"

    def require(self, what):
        if self.state != "initialized":
            raise DwdpError(f"{what}: the dwdp_ops runtime was finalized")

    def rank(self):
        return 0

    def world_size(self):
        return self.world


@pytest.fixture(autouse=True)
def no_gpu_sync(monkeypatch):
    monkeypatch.setattr(ExpertStore, "_synchronize", lambda self: None)


def make(backend, peer_failures=None, layers=2):
    part = ExpertPartition.disjoint(8, 2)
    layout = ExpertLayout.moe(256, 128, "bfloat16")
    rt = FakeRuntime(backend, FakeRendezvous(2, peer_failures))
    return ExpertStore(part, layout, layers, runtime=rt), rt


def test_built_store_releases_everything_once_on_close():
    be = FakeBackend()
    store, rt = make(be)
    assert be.live["registration"] == 4 and be.live["handle"] > 4
    store.close()
    assert not +be.live, f"left alive: {+be.live}"
    store.close()  # idempotent
    assert not +be.live


@pytest.mark.parametrize("fn, nth, phase", [
    ("vmm_create", 1, "local storage"), ("vmm_create", 3, "local storage"), ("vmm_map", 2, "local storage"),
    ("register_symmetric", 1, "registration"), ("register_symmetric", 4, "registration"),
    ("vmm_create", 6, "slots and views"), ("vmm_reserve", 9, "slots and views"), ("vmm_map", 8, "slots and views"),
])
def test_failure_on_this_rank_in_each_phase(fn, nth, phase):
    be = FakeBackend(fail_on={fn: nth})
    with pytest.raises(DwdpError, match=rf"phase '{phase}' on rank\(s\) \[0\].*injected failure in {fn}"):
        make(be)
    assert not +be.live, f"left alive after the rollback: {+be.live}"


@pytest.mark.parametrize("phase", PHASES)
def test_failure_on_a_peer_makes_this_rank_raise_and_roll_back(phase):
    be = FakeBackend()
    with pytest.raises(DwdpError, match=rf"phase '{phase}' on rank\(s\) \[1\].*out of memory"):
        make(be, peer_failures={f"ExpertStore:{phase}": b"RuntimeError: out of memory"})
    assert not +be.live, f"left alive after the rollback: {+be.live}"
    done = PHASES.index(phase)
    assert be.calls["register_symmetric"] == (4 if done >= 1 else 0)  # never entered a collective the peer skipped


def test_release_errors_are_reported_not_swallowed():
    be = FakeBackend(fail_on={"register_symmetric": 2}, fail_release="vmm_free")
    with pytest.raises(DwdpError) as info:
        make(be)
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "release step(s) failed" in notes and "vmm_free" in notes
    be = FakeBackend(fail_release="vmm_unmap")
    store, _ = make(be)
    with pytest.raises(DwdpError, match="release step.*vmm_unmap"):
        store.close()


def test_calls_after_finalize_raise():
    store, rt = make(FakeBackend())
    rt.state = "finalized"
    with pytest.raises(DwdpError, match="finalized"):
        store.composite(0, "w13")
    with pytest.raises(DwdpError, match="finalized"):
        store.copy_engine.fetch(0)


def test_close_with_a_failed_barrier_keeps_its_memory_and_a_retry_releases_it():
    """A failed closing barrier means a peer is gone: close() then releases nothing (unregistering symmetric memory
    is collective and would wait for that peer forever) and raises a DwdpError saying so, the barrier's error its
    cause; the store is unusable from then on. Before, the barrier came after marking the store closed, and a second
    close() returned at once with everything still allocated; now it tries the barrier again (this fake barrier can
    pass again; dwdp_ops's rendezvous cannot: see the next test)."""
    be = FakeBackend()
    store, rt = make(be)
    held = +be.live

    def bad_barrier(name):
        raise DwdpError("rendezvous timeout: rank 1 missing")

    rt.rendezvous.barrier = bad_barrier
    with pytest.raises(DwdpError, match="closing barrier failed.*rendezvous timeout.*keeps its memory") as info:
        store.close()
    assert isinstance(info.value.__cause__, DwdpError)
    assert +be.live == held  # nothing released behind the missing peer's back
    with pytest.raises(DwdpError, match="closed"):
        store.slot_address(0, 0, 5)
    rt.rendezvous.barrier = lambda name: None
    store.close()
    assert not +be.live
    store.close()


def test_close_after_a_failed_barrier_on_the_real_rendezvous_fails_again_and_does_not_promise_a_retry():
    """close()'s docstring and error said "close() again retries from the barrier", but a failed collective breaks
    dwdp_ops's rendezvous for good: the retry fails at once ("failed earlier") and the memory stays. Both now say so."""
    import threading

    from dwdp_ops.launch import free_port
    from dwdp_ops.rendezvous import Rendezvous

    port, peer = free_port(), {}
    t = threading.Thread(target=lambda: peer.setdefault(1, Rendezvous(1, 2, port=port, timeout=5.0)))
    t.start()
    r0 = Rendezvous(0, 2, port=port, timeout=5.0)
    t.join()
    be = FakeBackend()
    store, rt = make(be)
    held = +be.live
    rt.rendezvous = r0
    peer[1].close()  # the peer is gone
    try:
        with pytest.raises(DwdpError, match=r"closing barrier failed.*disconnected.*breaks the rendezvous for good, "
                                            r"so a later close\(\) fails the same way") as info:
            store.close()
        assert "retries" not in str(info.value)
        with pytest.raises(DwdpError, match="closing barrier failed.*failed earlier and cannot be used"):
            store.close()
        assert +be.live == held
        assert "retries from the barrier" not in ExpertStore.close.__doc__
    finally:
        r0.close()


def test_close_retries_exactly_the_release_steps_that_failed():
    be = FakeBackend(fail_release="vmm_unmap")
    store, rt = make(be)
    n_maps = be.live["map"]
    with pytest.raises(DwdpError, match=rf"{n_maps} release step\(s\) failed: vmm_unmap"):
        store.close()
    assert +be.live == Counter(map=n_maps)  # everything else was released
    be.fail_release = None
    store.close()  # retries the unmaps only (a second release of anything else would trip FakeBackend's assert)
    assert not +be.live
    store.close()


def test_address_helpers_check_range_kind_and_closed():
    store, rt = make(FakeBackend())
    assert store.lo == 0 and store.hi == 4 and store.E == 8
    assert store.slot_address(0, 0, 7) == store.expert_address(0, 0, 7)
    assert store.local_address(1, 1, 3) == store.expert_address(1, 1, 3)
    for bad in (8, 100, -1):
        with pytest.raises(ValueError, match=rf"slot_address: expert {bad} is outside \[0, 8\)"):
            store.slot_address(0, 0, bad)
        with pytest.raises(ValueError, match=r"expert_address: expert .* is outside \[0, 8\)"):
            store.expert_address(0, 0, bad)
    with pytest.raises(ValueError, match=r"local_address: expert 5 is outside \[0, 4\)"):
        store.local_address(0, 0, 5)
    with pytest.raises(ValueError, match=r"tensor kind 2 is outside \[0, 2\)"):
        store.slot_address(0, 2, 5)
    with pytest.raises(ValueError, match=r"layer 2 is outside \[0, 2\)"):
        store.expert_address(2, 0, 5)
    with pytest.raises(ValueError, match="expert True"):
        store.expert_address(0, 0, True)
    assert store.expert_address(np.int64(1), 0, 5) == store.expert_address(1, 0, 5)
    with pytest.raises(ValueError, match=r"release: layer True is outside \[0, 2\)"):  # it had released layer 1
        store.release(True)
    assert store.expert_address(1, 0, 5) > 0  # layer 1 still usable
    store.release(np.int64(1))
    store.close()
    for fn in (store.slot_address, store.expert_address, store.local_address):
        with pytest.raises(DwdpError, match="closed"):
            fn(0, 0, 1 if fn is store.local_address else 5)


@pytest.mark.parametrize("layers, err", [(True, TypeError), (2.5, TypeError), ("2", TypeError), (0, ValueError)])
def test_num_layers_must_be_an_int_before_anything_is_built(layers, err):
    """num_layers=True had built a one-layer store whose num_layers was True, 2.5 failed inside the first phase as
    "'float' object cannot be interpreted as an integer" (after a collective) and '2' with a comparison TypeError.
    Refused by name before any collective or allocation; numpy integers pass."""
    be = FakeBackend()
    with pytest.raises(err, match=r"num_layers must be .*>= 1, got"):
        make(be, layers=layers)
    assert not be.calls
    store, _ = make(FakeBackend(), layers=np.int64(3))
    assert store.num_layers == 3 and type(store.num_layers) is int
    store.close()


def test_ce_copies_checks_its_layer_like_the_other_plans():
    """ce_copies (the copy-engine plan fetch_ce and the scheduler build) raised KeyError (5, 0) for layer 5 and
    KeyError (-1, 0) for -1, and planned a released layer's copies although release() says its plans raise."""
    store, _ = make(FakeBackend())
    assert len(store.copy_engine.copies(1)) == 2
    for bad in (5, -1):
        with pytest.raises(ValueError, match=rf"ce_copies: layer {bad} is outside \[0, 2\)"):
            store.copy_engine.copies(bad)
    store.release(0)
    with pytest.raises(DwdpError, match="ce_copies: layer 0 was released"):
        store.copy_engine.copies(0)
    store.close()
    with pytest.raises(DwdpError, match="ce_copies: the ExpertStore is closed"):
        store.copy_engine.copies(1)


def test_close_after_finalize_says_so_instead_of_blaming_a_peer():
    """After dwdp_ops.finalize() the runtime's control plane raises; close() reported that as a failed closing barrier
    ('a peer is missing', 'close() again retries from the barrier'), neither of which is true: no retry can
    succeed. It now names the order (close stores before finalize) and releases nothing (NVSHMEM is gone)."""
    be = FakeBackend()
    store, rt = make(be)
    held = +be.live

    class Finalized:
        def barrier(self, name):
            raise DwdpError("rendezvous: the dwdp_ops runtime was finalized")

    rt.rendezvous, rt.state = Finalized(), "finalized"
    for _ in range(2):
        with pytest.raises(DwdpError, match=r"ExpertStore.close: the dwdp_ops runtime was finalized before") as info:
            store.close()
        assert "peer" not in str(info.value) and "retries" not in str(info.value)
    assert +be.live == held


class _FakeDeviceArray:
    """A device array over a fake address, as ``device_constant`` / ``_scratch_for`` return (no GPU touched)."""

    def __init__(self, host, shape=None):
        self.host = host
        self.data = type("Ptr", (), {"ptr": 1 << 20})()
        self.__cuda_array_interface__ = {"data": (1 << 20, False), "shape": host.shape if shape is None else shape,
                                         "typestr": host.dtype.str, "version": 3}


@pytest.mark.parametrize("kw, err, match", [
    ({"count": True}, TypeError, r"count must be an int or a device int32 scalar, got True \(bool\)"),
    ({"count": 2.7}, TypeError, "count must be an int"),
    ({"count": "3"}, TypeError, "count must be an int"),
    ({"num_blocks": 2.0}, TypeError, r"num_blocks must be an int in \[1, 65535\], got 2.0 \(float\)"),
    ({"num_blocks": True}, TypeError, "num_blocks must be an int in"),
    ({"num_blocks": 0}, ValueError, r"num_blocks must be an int in \[1, 65535\], got 0"),
    ({"threads": 100}, ValueError, r"threads must be a multiple of 32 in \[32, 1024\], got 100"),
    ({"threads": 256.0}, TypeError, "threads must be a multiple of 32"),
    ({"chunk": 32.0}, TypeError, r"chunk must be a multiple of 16 bytes in \[16, 2\*\*62\], got 32.0 \(float\)"),
    ({"chunk": 2**70}, ValueError, "chunk must be a multiple of 16 bytes"),
    ({"chunk": 24}, ValueError, "chunk must be a multiple of 16 bytes"),
    ({"peer_ptr": "no"}, TypeError, r"peer_ptr must be True, False or None, got 'no'"),
])
def test_fetch_nvshmem_checks_its_scalars_by_name_before_building_anything(kw, err, match):
    """count=True fetched one id, 2.7 two and '3' three (``int()``); num_blocks=True launched one block; threads=100
    reached the native call unchecked; num_blocks=2.0, threads=256.0, chunk=32.0, chunk=2**70 and peer_ptr='no' met
    pybind's unnamed "incompatible function arguments" -- each after the layer's descriptor table had been built
    (a device allocation and a synchronisation). All are refused by name first."""
    be = FakeBackend()
    launched = []
    be.stream_is_capturing = lambda s: False
    be.fetch_experts = lambda *args: launched.append(args)
    store, _ = make(be)
    store.device_constant = lambda host, what, remedy: _FakeDeviceArray(host)
    store.nvshmem._scratch_for = lambda s: (_FakeDeviceArray(np.zeros(2, np.int32)), _FakeDeviceArray(np.zeros(8, np.int32)))
    with pytest.raises(err, match=rf"^fetch_nvshmem: {match}"):
        store.nvshmem.fetch(0, stream=0, **kw)
    assert launched == [] and 0 not in store.nvshmem._tables
    store.nvshmem.fetch(0, count=np.int64(3), stream=0, num_blocks=np.int32(4), threads=256, chunk=1 << 16,
                        peer_ptr=np.bool_(True))
    (args,) = launched
    assert args[5:7] == (3, 1 << 16) and args[10:13] == (True, 4, 256)
    assert [type(a) for a in args[10:13]] == [bool, int, int]
    store.close()


@pytest.mark.parametrize("kw, err, match", [
    ({"schedule": ["staggered"]}, ValueError, r"fetch_ce: schedule must be 'per_peer', 'staggered' or 'interleaved', "
                                              r"got \['staggered'\]"),
    ({"batched": "no"}, TypeError, r"fetch_ce: batched must be True or False, got 'no' \(str\)"),
    ({"batched": None}, TypeError, r"fetch_ce: batched must be True or False, got None"),
])
def test_fetch_ce_names_a_bad_schedule_or_batched_flag(kw, err, match):
    """A list as schedule raised a bare "unhashable type: 'list'" (the plan cache's key); batched='no' reached the
    native call and met pybind's unnamed "incompatible function arguments", and batched=None was taken as False."""
    be = FakeBackend()
    copied = []
    be.ce_copy = lambda *args: copied.append(args)
    store, _ = make(be)
    with pytest.raises(err, match=match):
        store.copy_engine.fetch(0, 0, **kw)
    assert copied == []
    assert store.copy_engine.fetch(0, 0, batched=np.bool_(False)) > 0
    assert copied[0][3:] == (0, False)
    store.close()


@pytest.mark.parametrize("kw, err, match", [
    ({"layers": 5}, TypeError, r"layers must be a sequence of layer indices \(ints\) or None, got 5 \(int\)"),
    ({"layers": "01"}, TypeError, r"layers must be a sequence of layer indices \(ints\) or None, got '01' \(str\)"),
    ({"layers": [0, 5]}, ValueError, r"layer 5 is outside \[0, 2\)"),
    ({"layers": [True]}, TypeError, r"layers must hold ints, got True \(bool\)"),
    ({"layers": [1.0]}, TypeError, r"layers must hold ints, got 1.0 \(float\)"),
    ({"streams": 0}, TypeError, r"streams must be a sequence of streams, got 0 \(int\)"),
    ({"streams": None}, TypeError, r"streams must be a sequence of streams, got None"),
    ({"streams": [0, "x"]}, TypeError, r"streams\[1\]: stream must be a CuPy/PyTorch/cuda.core stream"),
    ({"streams": [-1]}, ValueError, r"streams\[0\]: stream: an integer handle must be in \[0, 2\*\*64\)"),
])
def test_prepare_checks_layers_and_streams_by_name_before_building_anything(monkeypatch, kw, err, match):
    """prepare(layers=5) and prepare(streams=0) raised a bare "'int' object is not iterable" (streams=0 after every
    layer's table had been built); layers=[0, 5] built layer 0's table before nvshmem_table refused layer 5, and a bad
    stream failed after the tables, without saying it was one of prepare's streams. Each is refused by name first."""
    be = FakeBackend()
    store, _ = make(be)
    store.device_constant = lambda host, what, remedy: _FakeDeviceArray(host)
    scratch = []
    store.nvshmem._scratch_for = scratch.append
    with pytest.raises(err, match=rf"^prepare: {match}"):
        store.nvshmem.prepare(**kw)
    assert store.nvshmem._tables == {} and store.nvshmem._all_ids is None and scratch == []
    import cupy

    monkeypatch.setattr(cupy.cuda, "Device", lambda d: type("Dev", (), {"synchronize": lambda self: None})())
    store.nvshmem.prepare(layers=(np.int64(1),), streams=[7])
    assert set(store.nvshmem._tables) == {1} and store.nvshmem._all_ids is not None and scratch == [7]
    store.close()


@pytest.mark.parametrize("shape, dtype, err, match", [
    ((8, 256, 256), np.float16, TypeError,
     r"merge out: expected storage dtype uint16 for bfloat16 weights, got float16"),
    ((8, 256, 256), np.int16, TypeError, "merge out: expected storage dtype uint16"),
    ((2048, 256), np.uint16, ValueError, r"merge out: expected a contiguous array of shape \[8, 256, 256\], got shape "
                                         r"\[2048, 256\]"),
    ((8, 65536), np.uint16, ValueError, r"got shape \[8, 65536\]"),
    ((8, 256, 512), np.uint8, TypeError, "got uint8"),
])
def test_merge_refuses_an_out_of_another_dtype_or_shape_before_copying(shape, dtype, err, match):
    """merge(out=...) checked only out's byte size and contiguity: a float16 [E, *shape] array or a uint16 array of
    another shape but the same byte size was accepted and written as raw bytes. out must be [E, *shape] of the storage
    dtype (as its docstring says); anything else is refused by name before the copy is launched."""
    be = FakeBackend()
    copied = []
    be.ce_copy = lambda *args: copied.append(args)
    store, _ = make(be)
    with pytest.raises(err, match=match):
        store.merge(0, "w13", out=_FakeDeviceArray(np.empty(0, dtype), shape), stream=0)
    assert copied == []
    good = _FakeDeviceArray(np.empty(0, np.uint16), (8, 256, 256))
    assert store.merge(0, "w13", out=good, stream=0) is good
    assert len(copied) == 1
    store.close()


def test_address_helpers_refuse_a_released_layer_and_a_finalized_runtime_like_the_views():
    """local_address / slot_address / expert_address refused a closed store only: for a released layer, or after
    dwdp_ops.finalize(), they still returned addresses (the views raised). They now share the views' check."""
    store, rt = make(FakeBackend())
    helpers = [(store.local_address, 1), (store.slot_address, 5), (store.expert_address, 1), (store.expert_address, 5)]
    store.release(1)
    for fn, expert in helpers:
        with pytest.raises(DwdpError, match=rf"^{fn.__name__}: layer 1 was released"):
            fn(1, 0, expert)
        assert fn(0, 0, expert) > 0  # layer 0 still usable
    with pytest.raises(DwdpError, match="local: layer 1 was released"):
        store.local(1, "w13")
    rt.state = "finalized"
    for fn, expert in helpers:
        with pytest.raises(DwdpError, match=rf"ExpertStore.{fn.__name__}: the dwdp_ops runtime was finalized"):
            fn(0, 0, expert)
    rt.state = "initialized"
    store.close()


@pytest.mark.parametrize("first, bad, err", [
    (None, [1 << 20], TypeError), (1 << 20, float(1 << 20), TypeError), (1 << 20, np.float64(1 << 20), TypeError),
    (None, 0, ValueError),
])
def test_fetch_ce_checks_slice_bytes_before_the_plan_cache(first, bad, err):
    """The copy plans are cached by slice_bytes, which order_copies checked only when a plan was built: a list met a
    bare "unhashable type: 'list'" from the cache key, and 2.0 (or True) after a fetch with 2 (or 1) hit that plan and
    was taken, though a first call with it was refused (True is not tested: a 1-byte plan takes a minute to build).
    Checked before the cache, every time; numpy ints are taken."""
    be = FakeBackend()
    copied = []
    be.ce_copy = lambda *args: copied.append(args)
    store, _ = make(be)
    if first is not None:
        store.copy_engine.fetch(0, 0, schedule="interleaved", slice_bytes=first)
    with pytest.raises(err, match=r"^slice_bytes must be a positive int \(bytes\), got "):
        store.copy_engine.fetch(0, 0, schedule="interleaved", slice_bytes=bad)
    assert len(copied) == (first is not None)
    assert store.copy_engine.fetch(0, 0, schedule="interleaved", slice_bytes=np.int64(1 << 20)) > 0
    store.close()


def test_a_pointer_table_built_inside_a_capture_names_table_not_prepare(monkeypatch):
    """table()'s docstring said "prepare() first" and its refusal inside a CUDA-graph capture said "call
    store.prepare()", but prepare() builds the NVSHMEM descriptor tables, not table()'s pointer arrays: a caller who
    followed the advice met the same refusal. Both now name table() itself; the fetch tables still name prepare()
    (``store.nvshmem.prepare()`` since the fetch engines moved to ``dwdp_ops.fetch``)."""
    import cupy

    class Ctx:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cupy.cuda, "Device", lambda d: Ctx())
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: type("S", (), {"ptr": 5})())
    be = FakeBackend()
    be.stream_is_capturing = lambda s: True
    store, _ = make(be)
    with pytest.raises(DwdpError, match=r"the table plan .* capture; call store\.table\(1, 'w2'\) \(or run the step "
                                        r"once eagerly\) before capturing"):
        store.table(1, "w2")
    with pytest.raises(DwdpError, match=r"the NVSHMEM descriptor plan .* capture; call store\.nvshmem\.prepare\(\) \(or run"):
        store.nvshmem.table(1)
    assert "prepare() first" not in ExpertStore.table.__doc__
    store.close()


def test_the_fetch_engines_end_with_the_stores_layers_and_the_store():
    """The fetch engines live in ``dwdp_ops.fetch`` and their plans follow the store's lifetimes: a released layer's
    copy plan is dropped and its NVSHMEM descriptor table retired (kept alive, since a queued fetch may read it) until
    ``close()``, which drops everything; every engine call on a released layer or a closed store raises, naming it."""
    from dwdp_ops.fetch import EXPERT_COPY_DTYPE, CopyEngineFetch, NvshmemFetch

    be = FakeBackend()
    be.ce_copy = lambda *args: None
    store, _ = make(be)
    assert isinstance(store.copy_engine, CopyEngineFetch) and isinstance(store.nvshmem, NvshmemFetch)
    store.device_constant = lambda host, what, remedy: _FakeDeviceArray(host)
    # rank 0 of 2 holds experts [0, 4): the four others come from rank 1, one record per (expert, tensor kind)
    assert store.reachable_peers(0) == [True, True]
    table = store.nvshmem.table(0)
    recs = np.frombuffer(table.host.tobytes(), EXPERT_COPY_DTYPE).reshape(8, 2)
    assert (recs["pe"][:4] == -1).all() and (recs["pe"][4:] == 1).all()
    assert recs["dst"][4, 1] == store.slot_address(0, 1, 4) and recs["src"][5, 0] == store.owner_address(0, 0, 5, 1, "sym")
    assert list(store.nvshmem.remote_ids()) == [4, 5, 6, 7]
    assert store.copy_engine.fetch(0, 0) == sum(c.nbytes for c in store.copy_engine.copies(0)) > 0
    assert store.copy_engine.fetch(1, 0) > 0 and len(store.copy_engine._plans) == 2
    store.release(0)
    assert store.nvshmem._retired == [table] and 0 not in store.nvshmem._tables
    assert [k[0] for k in store.copy_engine._plans] == [1]
    for call in (lambda: store.copy_engine.fetch(0, 0), lambda: store.nvshmem.fetch(0, stream=0),
                 lambda: store.nvshmem.table(0), lambda: store.owner_address(0, 0, 5, 1, "sym")):
        with pytest.raises(DwdpError, match="layer 0 was released"):
            call()
    store.close()
    assert store.nvshmem._retired == [] and store.nvshmem._tables == {} and store.copy_engine._plans == {}
    with pytest.raises(DwdpError, match="fetch_ce: the ExpertStore is closed"):
        store.copy_engine.fetch(1, 0)
    with pytest.raises(DwdpError, match="nvshmem_table: the ExpertStore is closed"):
        store.nvshmem.fetch(1, stream=0)


def test_the_copy_engine_plan_checks_its_layer_before_its_cache():
    """``CopyEngineFetch.plan`` looked its cache up before checking the layer: once layer 1's plan was cached,
    ``plan(True)`` and ``plan(1.0)`` returned it, and after ``dwdp_ops.finalize()`` ``plan(1)`` still answered."""
    store, rt = make(FakeBackend())
    plan = store.copy_engine.plan(1)
    assert store.copy_engine.plan(1) is plan
    for bad in (True, 1.0):
        with pytest.raises(ValueError, match=r"ce_copies: layer .* is outside \[0, 2\)"):
            store.copy_engine.plan(bad)
    rt.state = "finalized"
    with pytest.raises(DwdpError, match="finalized"):
        store.copy_engine.plan(1)


def test_check_errors_after_close_says_the_store_is_closed():
    """NvshmemFetch.check_errors returned quietly after close() (its flags dropped, so an out-of-range id met by a
    fetch queued before close was never reported), although every call raises after close; it now says so."""
    store, rt = make(FakeBackend())
    store.close()
    with pytest.raises(DwdpError, match="check_errors: the ExpertStore is closed"):
        store.nvshmem.check_errors()
    store2, rt2 = make(FakeBackend())
    rt2.state = "finalized"
    with pytest.raises(DwdpError, match="finalized"):
        store2.nvshmem.check_errors()


def test_an_all_local_copy_fetch_still_checks_slice_bytes():
    """With every expert local (E == L) fetch returned 0 before checking slice_bytes, so a bad value passed on one
    world size and raised on another."""
    from dwdp_ops import ExpertLayout, ExpertPartition, ExpertStore

    part = ExpertPartition.disjoint(8, 1)
    rt = FakeRuntime(FakeBackend(), FakeRendezvous(1, None))
    rt.world_size = lambda: 1
    store = ExpertStore(part, ExpertLayout.moe(256, 128, "bfloat16"), 2, runtime=rt)
    assert store.copy_engine.fetch(0, 0) == 0
    with pytest.raises(ValueError, match=r"slice_bytes must be a positive int"):
        store.copy_engine.fetch(0, 0, schedule="interleaved", slice_bytes=-5)
    store.close()


def test_a_peer_with_another_vmm_granularity_fails_every_rank_at_the_geometry_check():
    """The device's VMM granularity was checked after the geometry all-gather, on each rank alone: on a node of mixed
    GPUs the rank whose granularity does not divide the page raised its ValueError while its peers went on into the
    first phase's agreement and waited there until the timeout. It is now part of the geometry every rank compares."""
    import json

    class PeerGranularity(FakeRendezvous):
        def allgather(self, name, payload):
            if name != "ExpertStore":
                return super().allgather(name, payload)
            peer = json.loads(payload)
            peer[-1] *= 2  # the peer's device: another granularity, everything else alike
            return [payload, json.dumps(peer).encode()]

    be = FakeBackend()
    rt = FakeRuntime(be, PeerGranularity(2))
    with pytest.raises(DwdpError, match=r"rank\(s\) \[1\] describe a different .*VMM granularity than rank 0"):
        ExpertStore(ExpertPartition.disjoint(8, 2), ExpertLayout.moe(256, 128, "bfloat16"), 2, runtime=rt)
    assert not +be.live  # nothing was built
