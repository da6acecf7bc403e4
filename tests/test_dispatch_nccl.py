"""The all_to_all_single DEP baseline (dwdp_ops.dispatch_nccl): gloo processes on the CPU (and NCCL on GPUs) against
the pure reference, through tests/multiproc/dispatch_nccl_check.py; input validation in one process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import GPU_COUNT, ROOT, launcher_free_env

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch): the NCCL/gloo baseline needs it")
dist = pytest.importorskip("torch.distributed", reason="this torch build has no torch.distributed")

from dwdp_ops import ExpertPartition  # noqa: E402
from dwdp_ops.dispatch_nccl import NcclDispatcher, init_process_group_from_env  # noqa: E402
from dwdp_ops.errors import DwdpError  # noqa: E402
from dwdp_ops.launch import free_port  # noqa: E402


def _ok(proc, n, backend, dtype):
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    for r in range(n):
        assert f"[rank {r}] rank {r}: dispatch_nccl" in proc.stdout and f"scenarios OK ({backend}, {dtype})" in proc.stdout
    assert "MISMATCH" not in proc.stdout


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed has no gloo")
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gloo_dispatch_combine_equal_reference(run_ranks, n, dtype):
    proc = run_ranks(n, "dispatch_nccl_check.py", "--backend", "gloo", "--dtype", dtype, "--seeds", "2", timeout=240)
    _ok(proc, n, "gloo", dtype)


@pytest.mark.multigpu(n=2)
@pytest.mark.parametrize("n", [2, 4])
def test_nccl_dispatch_combine_equal_reference(run_ranks, n):
    if GPU_COUNT < n:
        pytest.skip(f"needs {n} GPUs; found {GPU_COUNT}")
    proc = run_ranks(n, "dispatch_nccl_check.py", "--backend", "nccl", "--dtype", "bfloat16", timeout=300)
    _ok(proc, n, "nccl", "bfloat16")


# -- one process ------------------------------------------------------------------------------------------------------
@pytest.fixture
def world1(monkeypatch):
    """A gloo group of one rank in this process, destroyed afterwards."""
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port() - 1)).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DWDP_NCCL_PORT", raising=False)
    if dist.is_initialized():
        pytest.skip("torch.distributed is already initialised in this process")
    env = init_process_group_from_env("gloo", timeout_s=30)
    yield env
    dist.destroy_process_group()


def test_dispatcher_needs_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("torch.distributed is already initialised in this process")
    with pytest.raises(DwdpError, match="init_process_group_from_env"):
        NcclDispatcher(ExpertPartition.disjoint(8, 1), 16, 2)


@pytest.mark.parametrize("raw, match", [("abc", "DWDP_NCCL_PORT='abc' is not an integer"), ("70000", "not a TCP port")])
def test_bad_port_is_named(monkeypatch, raw, match):
    monkeypatch.setenv("DWDP_NCCL_PORT", raw)
    with pytest.raises(ValueError, match=match):
        init_process_group_from_env("gloo")


def test_one_rank_round_trip_and_group_reuse(world1):
    assert world1.rank == 0 and dist.get_backend() == "gloo"
    assert init_process_group_from_env("gloo") == world1  # already initialised: kept
    part = ExpertPartition.disjoint(8, 1)
    d = NcclDispatcher(part, 16, 2, align=4)
    x = torch.randn(5, 16)
    ids = torch.tensor([[0, 7], [3, -1], [-1, -1], [7, 0], [2, 3]], dtype=torch.int32)
    w = torch.rand(5, 2)
    h = d.dispatch(x, ids, w)
    assert h.offs.dtype == torch.int32 and h.offs.tolist() == [4, 4, 8, 12, 12, 12, 12, 16]
    out = d.combine(h.x_grouped, h)  # identity experts
    want = x * (w * (ids >= 0)).sum(1, keepdim=True)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert out[2].abs().sum() == 0  # no pair: 0


def test_numpy_sizes_are_taken_as_ints_and_bools_refused(world1):
    """hidden, top_k and align had to be Python ints (np.int64 was refused); any integer now, kept as ints."""
    np = pytest.importorskip("numpy")
    part = ExpertPartition.disjoint(8, 1)
    d = NcclDispatcher(part, np.int64(16), np.int32(2), align=np.int64(4))
    assert (d.hidden, d.top_k, d.align) == (16, 2, 4) and {type(d.hidden), type(d.top_k), type(d.align)} == {int}
    x, ids, w = torch.randn(3, 16), torch.tensor([[0, 7], [3, -1], [2, 3]], dtype=torch.int32), torch.rand(3, 2)
    h = d.dispatch(x, ids, w)
    torch.testing.assert_close(d.combine(h.x_grouped, h), x * (w * (ids >= 0)).sum(1, keepdim=True))
    with pytest.raises(ValueError, match=r"^top_k must be an int >= 1, got True$"):
        NcclDispatcher(part, 16, True)


@pytest.mark.parametrize("args, kwargs, err, match", [
    ((ExpertPartition.disjoint(8, 2), 16, 2), {}, ValueError, "group has 1 ranks but the partition's world_size is 2"),
    ((ExpertPartition.disjoint(8, 1), 0, 2), {}, ValueError, "hidden must be an int >= 1"),
    ((ExpertPartition.disjoint(8, 1), 16, 9), {}, ValueError, r"top_k must be in \[1, 8\]"),
    ((ExpertPartition.disjoint(8, 1), 16, 2), {"align": 0}, ValueError, "align"),
    (((8, 1), 16, 2), {}, TypeError, "ExpertPartition"),
])
def test_constructor_rejects_bad_arguments(world1, args, kwargs, err, match):
    with pytest.raises(err, match=match):
        NcclDispatcher(*args, **kwargs)


@pytest.mark.parametrize("x, ids, w, err, match", [
    (torch.zeros(3, 8), torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 2), ValueError, r"x must be \[T, 16\]"),
    (torch.zeros(3, 16, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 2), TypeError,
     "floating"),
    (torch.zeros(3, 16), torch.zeros(3, 3, dtype=torch.int32), torch.zeros(3, 2), ValueError, "topk_ids must be"),
    (torch.zeros(3, 16), torch.zeros(3, 2), torch.zeros(3, 2), TypeError, "integer"),
    (torch.zeros(3, 16), torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.float64), TypeError,
     "float32"),
    (torch.zeros(3, 16), torch.tensor([[0, 8]] * 3, dtype=torch.int32), torch.zeros(3, 2), ValueError,
     r"rank\(s\) \[0\] hold expert ids outside \[-1, 8\)"),
    ([[0.0] * 16], torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 2), TypeError, "torch.Tensor"),
])
def test_dispatch_rejects_bad_input(world1, x, ids, w, err, match):
    d = NcclDispatcher(ExpertPartition.disjoint(8, 1), 16, 2)
    with pytest.raises(err, match=match):
        d.dispatch(x, ids, w)


def test_combine_rejects_a_wrong_shape(world1):
    d = NcclDispatcher(ExpertPartition.disjoint(8, 1), 16, 2)
    h = d.dispatch(torch.zeros(2, 16), torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), torch.ones(2, 2))
    with pytest.raises(ValueError, match=rf"\[>= {h.num_rows}, 16\]"):
        d.combine(torch.zeros(h.num_rows - 1, 16), h)
    with pytest.raises(ValueError, match=rf"\[>= {h.num_rows}, 16\]"):
        d.combine(torch.zeros(h.num_rows, 8), h)
    with pytest.raises(TypeError, match="NcclDispatchHandle"):
        d.combine(h.x_grouped, object())
    with pytest.raises(ValueError, match=r"out must be a \[2, 16\] torch.float32"):
        d.combine(h.x_grouped, h, out=torch.zeros(3, 16))


def test_an_out_of_memory_error_in_a_collective_is_not_called_a_rank_failure(world1, monkeypatch):
    """``_collective`` turns torch.distributed's RuntimeErrors into a DwdpError naming the ranks behind; an
    allocation failing in the same call (torch.OutOfMemoryError, a RuntimeError: the receive buffer, the host copy of
    the counts) was wrapped too, as "... failed on rank 0 ... torch.distributed said: CUDA out of memory", and a
    caller catching torch.OutOfMemoryError missed it. It passes through as itself."""
    d = NcclDispatcher(ExpertPartition.disjoint(8, 1), 16, 2)
    x, ids, w = torch.zeros(2, 16), torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), torch.ones(2, 2)
    h = d.dispatch(x, ids, w)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(d, "_a2a_rows", oom)
    for call in (lambda: d.dispatch(x, ids, w), lambda: d.combine(h.x_grouped, h)):
        with pytest.raises(torch.OutOfMemoryError, match=r"^CUDA out of memory"):
            call()


def test_combine_refuses_a_non_tensor_with_type_error_as_dispatch_does(world1):
    """combine raised ValueError for a non-tensor ``y_grouped`` / ``out`` where dispatch raises TypeError for its
    non-tensors; a tensor of the wrong shape stays a ValueError (test_combine_rejects_a_wrong_shape)."""
    d = NcclDispatcher(ExpertPartition.disjoint(8, 1), 16, 2)
    h = d.dispatch(torch.zeros(2, 16), torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), torch.ones(2, 2))
    for bad in (h.x_grouped.numpy(), h.x_grouped.tolist(), None):
        with pytest.raises(TypeError, match=rf"^y_grouped must be a torch.Tensor, got {type(bad).__name__}$"):
            d.combine(bad, h)
    for bad in (np.zeros((2, 16), np.float32), [[0.0] * 16] * 2):
        with pytest.raises(TypeError, match=rf"^out must be a torch.Tensor, got {type(bad).__name__}$"):
            d.combine(h.x_grouped, h, out=bad)
    assert d.combine(h.x_grouped, h, out=None).shape == (2, 16)  # out=None is still "a new tensor"


def test_the_scheduler_protocol_matches_the_nvlink_dispatcher(world1):
    """What PrefetchScheduler and GpuModel call on a dispatcher: rows_for, max_tokens, dispatch(stream, max_rows),
    handle.torch() / rows, combine(out=, stream=) with extra rows, check_errors, abandon."""
    d = NcclDispatcher(ExpertPartition.disjoint(8, 1), 16, 2)
    assert d.max_tokens >= 2**31 - 1 and d.rows_for([3]) == 3 * 2 + 8 * 15
    x = torch.randn(3, 16)
    ids = torch.tensor([[0, 1], [1, 2], [7, -1]], dtype=torch.int64)
    w = torch.rand(3, 2)
    h = d.dispatch(x, ids, w, None, max_rows=d.rows_for([3]))
    xg, offs = h.torch()
    assert xg is h.x_grouped and offs is h.offs and h.rows == h.num_rows
    y = torch.cat([xg, torch.full((5, 16), float("nan"))])  # rows past num_rows are never read
    out = torch.empty(3, 16)
    assert d.combine(y, h, out=out, stream=None) is out
    want = x * (w * (ids >= 0)).sum(1, keepdim=True)
    torch.testing.assert_close(out, want)
    d.check_errors()
    d.abandon()
    with pytest.raises(ValueError, match=r"more grouped rows than max_rows on rank\(s\) 0 \(64 > 1\)"):
        d.dispatch(x, ids, w, max_rows=1)
    for bad in (0, -1, 2.5, "8", True):
        with pytest.raises(ValueError, match="max_rows must be None or an int >= 1"):
            d.dispatch(x, ids, w, max_rows=bad)
    # rows_for took int() of any entries of any length: [-3] gave a bound below the step's rows, [2.9] a truncated one
    assert d.rows_for(np.array([3])) == d.rows_for([np.int64(3)]) == 3 * 2 + 8 * 15
    for bad in ([-3], [2.9], [True], ["3"], [3, 1], 3):
        with pytest.raises(ValueError, match=r"rows_for: tokens_per_rank must hold every rank's tokens \(1 ints >= 0\)"):
            d.rows_for(bad)


def test_the_watched_store_is_let_go_at_exit():
    """Rank 0's store stays in the module's ``_WATCH`` past ``destroy_process_group`` (for a later dispatch's message);
    it was destroyed only in the interpreter's teardown, where its server thread sometimes aborted rank 0 ("terminate
    called without an active exception", SIGABRT, after 'scenarios OK': test_gloo_dispatch_combine_equal_reference at
    n = 3 failed so in about one run in four). An atexit handler now drops it first; a handler registered before the
    import runs after it (LIFO) and sees it gone."""
    code = textwrap.dedent("""
        import atexit
        import sys
        atexit.register(lambda: print("at exit, watched:", sys.modules["dwdp_ops.dispatch_nccl"]._WATCH is not None))
        import torch.distributed as dist
        from dwdp_ops.dispatch_nccl import init_process_group_from_env
        init_process_group_from_env("gloo", timeout_s=30)
        dist.destroy_process_group()
        print("after destroy, watched:", sys.modules["dwdp_ops.dispatch_nccl"]._WATCH is not None)
    """)
    env = launcher_free_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port() - 1))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "after destroy, watched: True" in proc.stdout, proc.stdout  # kept for the dispatches, as designed
    assert "at exit, watched: False" in proc.stdout, proc.stdout


def test_a_new_world_numbers_its_dispatches_from_one(world1):
    """The default group's dispatch numbers went on counting across destroy_process_group and a new
    init_process_group_from_env: the new world's first dispatch was recorded as #3 in its store (whose progress keys
    _join had just set to 0), and a failure message named a dispatch the new world never had."""
    from dwdp_ops import dispatch_nccl

    part = ExpertPartition.disjoint(8, 1)
    x, ids, w = torch.randn(2, 16), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.rand(2, 2)
    for _ in range(2):
        NcclDispatcher(part, 16, 2).dispatch(x, ids, w)
    assert dispatch_nccl._WATCH.store.get(f"{dispatch_nccl._AT}0") == b"2"
    dist.destroy_process_group()
    init_process_group_from_env("gloo", timeout_s=30)
    NcclDispatcher(part, 16, 2).dispatch(x, ids, w)
    assert dispatch_nccl._WATCH.store.get(f"{dispatch_nccl._AT}0") == b"1"


def test_a_new_worlds_failure_reports_are_keyed_apart_from_an_earlier_worlds(world1):
    """The store's server outlives destroy_process_group (a new set-up on the same port shares its keys), and a new
    world numbers its dispatches from 1 again: rank 0's wait for the others' failure reports of dispatch #1 would have
    been answered at once by an earlier world's reports of its own dispatch #1. The keys now carry the world."""
    from types import SimpleNamespace

    from dwdp_ops import dispatch_nccl

    waited = []
    store = SimpleNamespace(multi_get=lambda keys: [b"1"] * len(keys), wait=lambda keys, t: waited.append(keys),
                            set=lambda k, v: None)

    def report():
        d = object.__new__(NcclDispatcher)
        d.rank, d.partition = 0, ExpertPartition.disjoint(8, 2)
        d._watch = dispatch_nccl._Watch(store, 0, 2, 5.0, None)
        d._failure("all_to_all", 1, False, 0.0, RuntimeError("peer gone"))

    report()
    dist.destroy_process_group()
    init_process_group_from_env("gloo", timeout_s=30)
    report()
    assert len(waited) == 2 and waited[0] != waited[1], waited
