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


@pytest.mark.gpu
def test_vmm_map_undoes_the_mapping_when_access_cannot_be_granted():
    """vmm_map maps, then grants access; when the grant failed it raised with the mapping still in place, and the
    store's rollback (which records an unmap only for a map that returned) then failed to free the range and left
    the physical memory mapped after its release. Now the mapping is undone first: the range maps again."""
    cp = pytest.importorskip("cupy")
    from dwdp_ops._native import native

    c = native()
    cp.cuda.Device(0).use()
    cp.empty(1)  # a current context for the driver calls
    g = c.vmm_granularity(0)
    h = c.vmm_create(g, 0)
    va = c.vmm_reserve(g, 0)
    try:
        with pytest.raises(RuntimeError, match="cuMemSetAccess failed"):
            c.vmm_map(va, g, h, 0, 1 << 20)  # no such device: the grant fails after the map succeeded
        c.vmm_map(va, g, h, 0, 0)  # cuMemMap refuses a range that is still mapped
        c.vmm_unmap(va, g)
    finally:
        c.vmm_free(va, g)
        c.vmm_release(h)
