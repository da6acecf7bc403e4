"""Host logic of the runtime lifecycle, exercised with a fake native backend (no GPU), plus the real _C's
behaviour where there is no GPU."""

from __future__ import annotations

import threading

import dwdp_ops
import numpy as np
import pytest
from dwdp_ops.errors import DwdpError
from dwdp_ops.launch import free_port
from dwdp_ops.runtime import Runtime


class FakeBackend:
    """Stands in for dwdp_ops._C: records calls, hands out fake symmetric addresses."""

    def __init__(self, devices=4):
        self.devices = devices
        self.calls = []
        self.pe = self.npes = None
        self.next_ptr = 1 << 40

    def cuda_device_count(self):
        return (self.devices, "" if self.devices else "cudaErrorNoDevice: no CUDA-capable device is detected")

    def unique_id_size(self):
        return 128

    def get_unique_id(self, device):
        return bytes(range(128))

    def init(self, uid, rank, world, device):
        assert uid == bytes(range(128))
        self.calls.append(("init", rank, world, device))
        self.pe, self.npes = rank, world

    def my_pe(self):
        return self.pe

    def n_pes(self):
        return self.npes

    def barrier_all(self):
        self.calls.append(("barrier_all",))

    def symmetric_malloc(self, nbytes, alignment):
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + ((nbytes + alignment - 1) // alignment) * alignment
        self.calls.append(("malloc", nbytes))
        return ptr

    def symmetric_free(self, ptr):
        self.calls.append(("free", ptr))

    def finalize(self):
        self.calls.append(("finalize",))


def _env(rank, world, port, local_world=None):
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(local_world or world), "MASTER_PORT": str(port)}


def _all_ranks(world, fn, devices=4):
    port, out = free_port(), {}

    def body(r):
        rt = Runtime(FakeBackend(devices))
        try:
            rt.init(environ=_env(r, world, port), timeout=5)
            out[r] = fn(rt, r)
        except Exception as e:  # noqa: BLE001
            out[r] = e
        finally:
            try:
                rt.finalize()
            except Exception as e:  # noqa: BLE001
                out[r] = e

    ts = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    [t.start() for t in ts]
    [t.join(30) for t in ts]
    return out


def test_lifecycle_single_rank():
    be = FakeBackend()
    rt = Runtime(be)
    with rt.init(environ={}, timeout=5) as r:
        assert r is rt and rt.rank() == 0 and rt.world_size() == 1 and rt.local_rank() == 0
        rt.barrier()
    assert be.calls == [("init", 0, 1, 0), ("barrier_all",), ("finalize",)]
    rt.finalize()  # idempotent
    assert be.calls.count(("finalize",)) == 1


def test_second_init_same_args_is_a_noop_and_other_args_raise():
    rt = Runtime(FakeBackend())
    rt.init(environ={}, timeout=5)
    assert rt.init(environ={}, timeout=5) is rt
    with pytest.raises(DwdpError, match=r"called again with other arguments.*device=0.*device=1"):
        rt.init(environ={}, device=1, timeout=5)
    rt.finalize()


def test_use_after_finalize_raises():
    rt = Runtime(FakeBackend())
    rt.init(environ={}, timeout=5)
    rt.finalize()
    for call in (rt.rank, rt.world_size, rt.local_rank, rt.barrier):
        with pytest.raises(DwdpError, match="finalized"):
            call()
    with pytest.raises(DwdpError, match="cannot be initialised twice"):
        rt.init(environ={}, timeout=5)


def test_calls_before_init_raise():
    with pytest.raises(DwdpError, match=r"call dwdp_ops.init\(\) first"):
        Runtime(FakeBackend()).rank()


def test_no_gpu_is_reported_before_anything_starts():
    be = FakeBackend(devices=0)
    with pytest.raises(DwdpError, match=r"rank 0 of 1: no CUDA GPU is usable \(no NVIDIA GPU found"):
        Runtime(be).init(environ={}, timeout=5)
    assert be.calls == []


def test_fewer_gpus_than_ranks():
    with pytest.raises(DwdpError, match=r"4 ranks run on this node but only 2 GPU\(s\) are visible"):
        Runtime(FakeBackend(devices=2)).init(environ=_env(0, 4, free_port()), timeout=5)


def test_bad_heap_size_and_timeout():
    with pytest.raises(ValueError, match="is not a size"):
        Runtime(FakeBackend()).init(environ={}, heap_size="lots")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Runtime(FakeBackend()).init(environ={}, timeout=0)


@pytest.mark.parametrize("raw", ["abc", "-1"])
def test_bad_timeout_variable_is_named_before_anything_starts(monkeypatch, raw):
    """DWDP_TIMEOUT goes through ``env.timeout_from_environ``: the error names the variable and its value (it said
    "could not convert string to float" and "timeout must be > 0 seconds"), and no GPU call was made."""
    monkeypatch.setenv("DWDP_TIMEOUT", raw)
    be = FakeBackend()
    with pytest.raises(ValueError, match=rf"DWDP_TIMEOUT='{raw}': expected a finite number of seconds > 0"):
        Runtime(be).init(environ={})
    assert be.calls == []
    rt = Runtime(FakeBackend())
    rt.init(environ={}, timeout=5)  # an explicit timeout does not read the variable
    rt.finalize()


def test_multi_rank_init_and_collective_allocation():
    def fn(rt, r):
        a = rt.symmetric_alloc(1 << 20, "a")
        b = rt.symmetric_alloc(4096, "b")
        rt.symmetric_free(a)
        rt.barrier()
        return (a.index, b.index, rt.backend.calls)

    out = _all_ranks(3, fn)
    for r in range(3):
        ai, bi, calls = out[r]
        assert (ai, bi) == (0, 1)
        assert calls[0] == ("init", r, 3, r)
        # b is still alive at finalize and is freed there, before NVSHMEM finalize
        assert [c[0] for c in calls] == ["init", "malloc", "malloc", "free", "barrier_all", "free", "finalize"]


def test_allocation_size_disagreement_names_ranks():
    out = _all_ranks(2, lambda rt, r: rt.symmetric_alloc(1024 * (r + 1), "x"))
    for r in range(2):
        assert isinstance(out[r], DwdpError)
        assert "every rank must ask for the same size" in str(out[r]) and "rank 1: [2048" in str(out[r])


def test_free_order_disagreement_names_ranks():
    def fn(rt, r):
        bufs = [rt.symmetric_alloc(256, "x"), rt.symmetric_alloc(256, "y")]
        rt.symmetric_free(bufs[r])

    out = _all_ranks(2, fn)
    assert all(isinstance(out[r], DwdpError) and "must free the same buffer" in str(out[r]) for r in range(2))


def test_double_free_is_refused():
    rt = Runtime(FakeBackend())
    rt.init(environ={}, timeout=5)
    b = rt.symmetric_alloc(256, "x")
    rt.symmetric_free(b)
    with pytest.raises(DwdpError, match="is not live"):
        rt.symmetric_free(b)
    rt.finalize()


def test_real_module_without_gpu_raises_clearly():
    count, _why = dwdp_ops.get_runtime().backend.cuda_device_count()
    if count:
        pytest.skip("a GPU is present: this checks the no-GPU message")
    with pytest.raises(DwdpError, match="no CUDA GPU is usable"):
        Runtime().init(environ={}, timeout=5)


@pytest.mark.parametrize("size, err, match", [
    ("0", ValueError, r"^heap_size '0' is 0 bytes; it must be positive$"),
    ("-4g", ValueError, r"^heap_size '-4g' is -4294967296 bytes; it must be positive$"),
    # (had been "is 0 bytes")
    ("0.0001k", ValueError, r"^heap_size '0.0001k' is 0.1024 bytes, not a whole number of bytes$"),
    ("1.3k", ValueError, r"^heap_size '1.3k' is 1331.2 bytes, not a whole number of bytes$"),  # (had been 1331 bytes)
    ("-0.1k", ValueError, r"^heap_size '-0.1k' is -102.4 bytes, not a whole number of bytes$"),
    ("inf g", ValueError, r"^heap_size 'inf g' is not a size"),
    ("nang", ValueError, r"^heap_size 'nang' is not a size"),
    (True, TypeError, r"^heap_size must be a size in bytes .*, got True$"),
    (False, TypeError, r"^heap_size must be a size in bytes .*, got False$"),
    (np.True_, TypeError, r"^heap_size must be a size in bytes .*, got (np\.)?True_?$"),  # (had been a ValueError)
    (np.int64(0), ValueError, r"^heap_size must be positive, got 0$"),
], ids=["0", "-4g", "0.0001k", "1.3k", "-0.1k", "inf-g", "nang", "True", "False", "np.True_", "np.int64(0)"])
def test_heap_size_must_be_a_positive_finite_size(size, err, match):
    """A heap size given as a string went unchecked: '0' and '-4g' reached NVSHMEM_SYMMETRIC_SIZE as 0 and
    -4294967296, 'inf g' raised a bare OverflowError; True was taken as 1 byte; '1.3k' was truncated to 1331 bytes
    (the docstring refuses any size that is not a whole number of bytes). Each is refused before anything starts,
    naming the value (the match had been the word 'heap_size' alone, in every message, under either error
    type)."""
    be = FakeBackend()
    with pytest.raises(err, match=match):
        Runtime(be).init(environ={}, heap_size=size)
    assert be.calls == []


@pytest.mark.parametrize("size, want", [("1.5g", 3 << 29), ("0.5k", 512), ("4096", 4096), (1 << 30, 1 << 30),
                                        (" 2M ", 2 << 20), (np.int64(1 << 30), 1 << 30)])
def test_heap_size_good_values(size, want):
    from dwdp_ops.runtime import _parse_size

    got = _parse_size(size)
    assert got == want and type(got) is int


@pytest.mark.parametrize("device", [1.7, True, "1"])
def test_device_must_be_an_int(device):
    """init(device=1.7) ran on GPU 1 and device=True on GPU 1 (int() truncated them). TypeError before anything
    starts; numpy integers pass."""
    be = FakeBackend()
    with pytest.raises(TypeError, match="device must be an int"):
        Runtime(be).init(environ={}, device=device)
    assert be.calls == []


_NVSHMEM_VARS = ("NVSHMEM_DISABLE_NVLS", "NVSHMEM_REMOTE_TRANSPORT", "NVSHMEM_CUMEM_GRANULARITY",
                 "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "NVSHMEM_BOOTSTRAP_UID_SOCK_FAMILY", "NVSHMEM_SYMMETRIC_SIZE")


@pytest.mark.parametrize("where", ["rendezvous", "get_unique_id", "init"])
def test_failed_init_restores_the_nvshmem_variables(monkeypatch, where):
    """A failed init() left the NVSHMEM_* variables it had set in os.environ, so a retry without heap_size kept the
    failed attempt's NVSHMEM_SYMMETRIC_SIZE. Each goes back to its value before (here: one set by the caller, the
    others unset), whether the control plane, the unique ID or NVSHMEM's init failed; a retry starts clean."""
    import os

    import dwdp_ops.runtime as rt_mod

    for name in _NVSHMEM_VARS:  # set, then deleted: monkeypatch puts back the session's values afterwards
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setenv("NVSHMEM_REMOTE_TRANSPORT", "ibrc")
    before = {k: v for k, v in os.environ.items() if k.startswith("NVSHMEM_")}
    real_rendezvous = rt_mod.Rendezvous

    def boom(*_a, **_k):
        raise OSError("injected failure")

    be = FakeBackend()
    if where == "rendezvous":
        monkeypatch.setattr(rt_mod, "Rendezvous", boom)  # e.g. the port is taken
    else:
        monkeypatch.setattr(be, where, boom)
    rt = Runtime(be)
    with pytest.raises((OSError, DwdpError), match="injected failure"):
        rt.init(environ={}, heap_size="1g", timeout=5)
    assert {k: v for k, v in os.environ.items() if k.startswith("NVSHMEM_")} == before
    assert rt.state == ("finalized" if where == "init" else "new")

    if where != "init":  # NVSHMEM never touched: a retry without heap_size gets no heap size from the first try
        monkeypatch.setattr(rt_mod, "Rendezvous", real_rendezvous)
        rt._backend = FakeBackend()
        rt.init(environ={}, timeout=5)
        assert "NVSHMEM_SYMMETRIC_SIZE" not in os.environ and os.environ["NVSHMEM_REMOTE_TRANSPORT"] == "ibrc"
        rt.finalize()
