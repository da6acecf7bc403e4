"""The fused co-action kernels against the numpy reference (GPU)."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.coaction import CoActionSpec, coaction_backward, coaction_forward

CONFIGS = [
    dict(layer_dims=((16, 8), (8, 4)), orders=3, bias=False),
    dict(layer_dims=((5, 4),), orders=2, bias=True),
    dict(layer_dims=((6, 5), (5, 4), (4, 2)), orders=3, bias=True, order_independent=True),
    dict(layer_dims=((16, 8), (8, 4)), orders=3, bias=True, variant="paper"),
]


def inputs(spec, B, T, seed):
    rng = np.random.default_rng(seed)
    ind = rng.normal(0, 0.3, (B, spec.induction_dim)).astype(np.float32)
    feed = rng.normal(0, 0.6, (B, T, spec.feed_dim)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    g = rng.normal(size=(B, spec.out_dim)).astype(np.float32)
    return ind, feed, mask, g


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("B, T", [(3, 1), (37, 50), (64, 257)])
def test_fp32_forward_and_backward_equal_the_reference(cfg, B, T):
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu

    spec = CoActionSpec(**cfg)
    ind, feed, mask, g = inputs(spec, B, T, B + T)
    kw = {k: v for k, v in cfg.items() if k in ("order_independent", "variant")}
    want = coaction_forward(ind.astype(np.float64), feed.astype(np.float64), mask, spec.layer_dims, spec.orders, spec.bias, **kw)
    got = coaction_forward_gpu(cp.asarray(ind), cp.asarray(feed), cp.asarray(mask), spec).get()
    assert rel(got, want) <= 1e-5
    gi, gf = coaction_backward(ind.astype(np.float64), feed.astype(np.float64), mask, g.astype(np.float64),
                               spec.layer_dims, spec.orders, spec.bias, **kw)
    gi2, gf2 = coaction_backward_gpu(cp.asarray(ind), cp.asarray(feed), cp.asarray(mask), cp.asarray(g), spec)
    assert rel(gi2.get(), gi) <= 1e-5 and rel(gf2.get(), gf) <= 1e-5


@pytest.mark.gpu
def test_table_ids_equal_gathered_rows_and_accumulate():
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu

    spec = CoActionSpec()
    rng = np.random.default_rng(5)
    B, T, rows = 40, 30, 25
    table = rng.normal(0, 0.3, (rows, spec.induction_dim)).astype(np.float32)
    ftable = rng.normal(0, 0.6, (rows, spec.feed_dim)).astype(np.float32)
    ids = rng.integers(0, rows, B)
    fids = rng.integers(0, rows, (B, T))
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    g = rng.normal(size=(B, spec.out_dim)).astype(np.float32)
    out = coaction_forward_gpu(cp.asarray(table), cp.asarray(ftable), cp.asarray(mask), spec,
                               ind_ids=cp.asarray(ids), feed_ids=cp.asarray(fids)).get()
    want = coaction_forward(table[ids].astype(np.float64), ftable[fids].astype(np.float64), mask)
    assert rel(out, want) <= 1e-5
    gi, gf = coaction_backward_gpu(cp.asarray(table), cp.asarray(ftable), cp.asarray(mask), cp.asarray(g), spec,
                                   ind_ids=cp.asarray(ids), feed_ids=cp.asarray(fids))
    ri, rf = coaction_backward(table[ids].astype(np.float64), ftable[fids].astype(np.float64), mask, g.astype(np.float64))
    wi, wf = np.zeros_like(table, np.float64), np.zeros_like(ftable, np.float64)
    np.add.at(wi, ids, ri)
    np.add.at(wf, fids, rf)
    assert rel(gi.get(), wi) <= 1e-5 and rel(gf.get(), wf) <= 1e-5
    with pytest.raises(ValueError, match=r"ind_ids must be in \[0, 25\)"):
        coaction_forward_gpu(cp.asarray(table), cp.asarray(ftable), cp.asarray(mask), spec,
                             ind_ids=cp.asarray(ids + 25), feed_ids=cp.asarray(fids))


@pytest.mark.gpu
def test_bf16_is_close_and_bad_input_is_named():
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu

    spec = CoActionSpec()
    ind, feed, mask, _ = inputs(spec, 16, 20, 1)

    def bf16(a):  # round to nearest even, keep the top 16 bits
        u = a.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

    got = coaction_forward_gpu(cp.asarray(bf16(ind)), cp.asarray(bf16(feed)), cp.asarray(mask), spec, dtype="bfloat16").get()
    as_f32 = (got.astype(np.uint32) << 16).view(np.float32)
    want = coaction_forward(ind, feed, mask)
    assert rel(as_f32, want) <= 2e-2
    with pytest.raises(ValueError, match="D' = 160"):
        coaction_forward_gpu(cp.asarray(ind[:, :100]), cp.asarray(feed), cp.asarray(mask), spec)
    with pytest.raises(TypeError, match="must hold float32"):
        coaction_forward_gpu(cp.asarray(ind.astype(np.float64)), cp.asarray(feed), cp.asarray(mask), spec)
    with pytest.raises(ValueError, match="shared memory"):
        big = CoActionSpec(layer_dims=((256, 256), (256, 256)))
        coaction_forward_gpu(cp.zeros((1, big.induction_dim), cp.float32), cp.zeros((1, 2, 256), cp.float32),
                             cp.ones((1, 2), cp.float32), big)


@pytest.mark.multigpu(n=2)
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_sharded_table_equals_single_gpu_table(run_ranks, n, seed):
    from conftest import GPU_COUNT

    if GPU_COUNT < n:
        pytest.skip(f"needs {n} GPUs; found {GPU_COUNT}")
    proc = run_ranks(n, "sharded_table_check.py", str(seed), timeout=180)
    assert proc.returncode == 0, proc.stdout[-6000:]
    for r in range(n):
        assert f"[rank {r}] rank {r}: sharded table over {n} GPUs" in proc.stdout
    assert proc.stdout.count(": OK") == n, proc.stdout[-3000:]


@pytest.mark.gpu
def test_can_model_on_fused_kernels_matches_the_cpu_model():
    """One training batch: the GPU model (float32, fused kernels on the tables) gives the CPU model's (float64,
    reference op) loss and every parameter gradient."""
    from dwdp_ops.models.can import CanConfig, CanModel
    from dwdp_ops.models.can_data import split, synthetic

    data, tables = synthetic(600, seed=3)
    train, _ = split(data, 0.2, 3)
    b = next(train.batches(128, np.random.default_rng(0)))
    cpu = CanModel(CanConfig(tables, seed=4))
    gpu = CanModel(CanConfig(tables, seed=4, device="gpu"))
    l_cpu, g_cpu = cpu.loss_and_grads(b)
    l_gpu, g_gpu = gpu.loss_and_grads(b)
    assert abs(l_cpu - l_gpu) <= 1e-5 * max(1.0, abs(l_cpu))
    assert g_cpu.keys() == g_gpu.keys()
    for k in g_cpu:
        assert rel(g_gpu[k].get(), g_cpu[k]) <= 1e-4, k
