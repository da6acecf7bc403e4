"""GPU tests of the expert store: layout packing, composite/table/merge views, copy-engine and NVSHMEM fetch."""

from __future__ import annotations

import pytest
from conftest import GPU_COUNT


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1])
def test_single_rank_store(run_ranks, seed):
    proc = run_ranks(1, "store_check.py", str(seed))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "[rank 0] rank 0: store checks passed" in proc.stdout


@pytest.mark.multigpu(n=2)
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_store_across_ranks(run_ranks, n, seed):
    """Random valid partition (seeded), random expert lists; fp16 / bf16 / fp8 layouts in turn."""
    if GPU_COUNT < n:
        pytest.skip(f"needs {n} GPUs; found {GPU_COUNT}")
    proc = run_ranks(n, "store_check.py", str(seed), timeout=200)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    for r in range(n):
        assert f"[rank {r}] rank {r}: store checks passed" in proc.stdout
