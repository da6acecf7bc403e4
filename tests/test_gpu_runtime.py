"""GPU tests of the foundation: NVSHMEM across processes started by dwdp_ops.launch."""

from __future__ import annotations

import pytest


@pytest.mark.gpu
def test_single_rank_symmetric_roundtrip(run_ranks):
    proc = run_ranks(1, "symmetric_pattern.py", "1048583")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[rank 0] rank 0: read 1 PEs" in proc.stdout


@pytest.mark.multigpu(n=2)
@pytest.mark.parametrize("n", [2, 4])
def test_every_rank_reads_every_peer(run_ranks, n):
    from conftest import GPU_COUNT

    if GPU_COUNT < n:
        pytest.skip(f"needs {n} GPUs; found {GPU_COUNT}")
    proc = run_ranks(n, "symmetric_pattern.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for r in range(n):
        assert f"[rank {r}] rank {r}: read {n} PEs" in proc.stdout
        assert f"[rank {r}] rank {r}: finalized" in proc.stdout


@pytest.mark.multigpu(n=2)
@pytest.mark.parametrize("n", [2, 4])
def test_killed_rank_fails_the_others_within_timeout(run_ranks, n):
    from conftest import GPU_COUNT

    if GPU_COUNT < n:
        pytest.skip(f"needs {n} GPUs; found {GPU_COUNT}")
    proc = run_ranks(n, "killed_rank.py", timeout=120, keep_going=True)
    out = proc.stdout
    assert proc.returncode != 0
    assert "barrier passed with a dead rank" not in out
    for r in range(n - 1):
        assert f"[rank {r}] SURVIVOR rank {r} failed" in out, out
    assert f"rank(s) [{n - 1}] disconnected" in out or "lost its connection to rank 0" in out
