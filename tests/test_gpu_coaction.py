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


# ---- issue 16: the (sample, behaviour) kernels at their edges, against the float64 reference --------------------


def bf16_bits(a):
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_value(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def run_both(spec, ind, feed, mask, g, dtype="float32", ind_ids=None, feed_ids=None):
    """GPU forward and backward (fp32 results) and the float64 reference on the same (dtype-rounded) inputs."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu

    if dtype == "bfloat16":
        ind_in, feed_in = bf16_bits(ind), bf16_bits(feed)
        ind, feed = bf16_value(ind_in), bf16_value(feed_in)
    else:
        ind_in, feed_in = ind, feed
    kw = {} if ind_ids is None else dict(ind_ids=cp.asarray(ind_ids))
    if feed_ids is not None:
        kw["feed_ids"] = cp.asarray(feed_ids)
    args = (cp.asarray(ind_in), cp.asarray(feed_in), cp.asarray(mask))
    out = coaction_forward_gpu(*args, spec, dtype=dtype, **kw).get()
    if dtype == "bfloat16":
        out = bf16_value(out)
    gi, gf = coaction_backward_gpu(*args, cp.asarray(g), spec, dtype=dtype, **kw)
    rkw = {} if ind_ids is None else dict(ind_ids=ind_ids)
    if feed_ids is not None:
        rkw["feed_ids"] = feed_ids
    f64 = (ind.astype(np.float64), feed.astype(np.float64), mask)
    want = coaction_forward(*f64, spec, **rkw)
    wi, wf = coaction_backward(*f64, g.astype(np.float64), spec, **rkw)
    return (out, gi.get(), gf.get()), (want, wi, wf)


def assert_close(got, want, tol):
    for name, a, b in zip(("forward", "grad_induction", "grad_feed"), got, want):
        if not np.any(b):  # e.g. everything masked: exactly zero
            assert not np.any(a), name
        else:
            assert rel(a, b) <= tol, (name, rel(a, b))


TOL = {"float32": 1e-5, "bfloat16": 2e-2}
EDGE_SPECS = [CoActionSpec(), CoActionSpec(orders=4, bias=True, order_independent=True),
              CoActionSpec(((5, 4),), orders=2, bias=True),
              CoActionSpec(((6, 5), (5, 4), (4, 2)), orders=3, bias=True, order_independent=True),
              CoActionSpec(bias=True, variant="paper")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("spec", EDGE_SPECS, ids=lambda s: f"{s.layer_dims}-o{s.orders}-b{int(s.bias)}-"
                         f"oi{int(s.order_independent)}-{s.variant}")
@pytest.mark.parametrize("B, T", [(1, 1), (5, 1), (1, 33), (4, 2000), (1, 2000), (300, 37)])
def test_edges_of_batch_and_sequence(spec, dtype, B, T):
    """T = 1, T = 2000, B = 1 (and rounds that are not multiples of 32), with sample 0 all masked when B > 1."""
    ind, feed, mask, g = inputs(spec, B, T, 7 * B + T)
    if B > 1:
        mask[0] = 0
    got, want = run_both(spec, ind, feed, mask, g, dtype)
    assert_close(got, want, TOL[dtype])
    if B > 1:
        assert not np.any(got[0][0]) and not np.any(got[2][0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_all_masked_batch_gives_zeros(dtype):
    spec = CoActionSpec(bias=True)
    ind, feed, mask, g = inputs(spec, 9, 40, 3)
    got, _ = run_both(spec, ind, feed, np.zeros_like(mask), g, dtype)
    for a in got:
        assert not np.any(a)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n_ind, n_feed", [(1, 1), (3, 5), (50, 2)])
@pytest.mark.parametrize("spec", [CoActionSpec(), CoActionSpec(orders=2, bias=True, order_independent=True),
                                  CoActionSpec(((6, 5), (5, 3)), orders=2, bias=True, order_independent=True)],
                         ids=["default", "specialised-bias-oi", "odd"])
def test_heavily_repeated_table_ids(spec, dtype, n_ind, n_feed):
    """Tables of a few rows, so that ids repeat inside a block (induction) and inside a round (feed): the row
    gradients add up exactly as scatter-add."""
    rng = np.random.default_rng(n_ind * 10 + n_feed)
    B, T = 203, 70
    table = rng.normal(0, 0.3, (n_ind, spec.induction_dim)).astype(np.float32)
    ftable = rng.normal(0, 0.6, (n_feed, spec.feed_dim)).astype(np.float32)
    ids = rng.integers(0, n_ind, B)
    fids = rng.integers(0, n_feed, (B, T))
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    g = rng.normal(size=(B, spec.out_dim)).astype(np.float32)
    got, want = run_both(spec, table, ftable, mask, g, dtype, ind_ids=ids, feed_ids=fids)
    assert_close(got, want, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("density, skip", [(0.05, 0), (0.8, 100), (0.5, 40)],
                         ids=["sparse", "first-100-masked", "half"])
def test_first_rounds_feed_ids_inside_and_past_the_early_window(density, skip):
    """The specialised forward takes a sample's first two rounds' feed ids from ids loaded beside its mask (the first
    96 positions) and loads the rest: masks whose first 64 unmasked positions end inside, across and far past those
    96 (sparse rows, the first 100 positions masked) give the reference's forward and gradients; with out-of-range
    ids at both kinds of position and the check off, the forward reads row 0 for them, as the reference given id 0."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu
    from dwdp_ops.coaction.fused import uses_specialized_kernels

    spec = CoActionSpec()
    assert uses_specialized_kernels(spec)
    rng = np.random.default_rng(int(density * 100) + skip)
    B, T, rows = 60, 700, 90
    table = rng.normal(0, 0.3, (rows, spec.induction_dim)).astype(np.float32)
    ftable = rng.normal(0, 0.6, (rows, spec.feed_dim)).astype(np.float32)
    ids = rng.integers(0, rows, B)
    fids = rng.integers(0, rows, (B, T))
    mask = (rng.random((B, T)) < density).astype(np.float32)
    mask[:, :skip] = 0.0
    g = rng.normal(size=(B, spec.out_dim)).astype(np.float32)
    got, want = run_both(spec, table, ftable, mask, g, ind_ids=ids, feed_ids=fids)
    assert_close(got, want, TOL["float32"])
    bad = rng.random((B, T)) < 0.05
    out = coaction_forward_gpu(cp.asarray(table), cp.asarray(ftable), cp.asarray(mask), spec, ind_ids=cp.asarray(ids),
                               feed_ids=cp.asarray(np.where(bad, rows + 7, fids)), check_ids=False).get()
    ref = coaction_forward(table.astype(np.float64), ftable.astype(np.float64), mask, spec, ind_ids=ids,
                           feed_ids=np.where(bad, 0, fids))
    assert rel(out, ref) <= TOL["float32"]


def _fast_spec(n):
    return CoActionSpec(((32, 32),) * n, orders=8, bias=True, order_independent=True)


def _fallback_spec(w):
    return CoActionSpec(((w, w),), orders=1, bias=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["fast", "fallback"])
def test_widths_at_the_shared_memory_limit(which, dtype):
    """fast: 32-wide layers (the register kernels' widest), 8 orders with their own slices, as many layers as the
    fast kernels' shared memory takes; fallback: one square layer as wide as one warp's shared memory allows (the
    next width, 8 more, is refused by name). Both against the float64 reference."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu, launch_shape
    from dwdp_ops.coaction.fused import uses_fast_kernels

    if which == "fast":
        n = max(k for k in range(1, 9) if uses_fast_kernels(_fast_spec(k), backward=True))
        spec = _fast_spec(n)
    else:
        n = max(w for w in range(64, 257, 8) if launch_shape(_fallback_spec(w), backward=True)[0] >= 1)
        spec = _fallback_spec(n)
        assert not uses_fast_kernels(spec, backward=True)
        big = _fallback_spec(n + 8)
        with pytest.raises(ValueError, match="shared memory"):
            coaction_backward_gpu(cp.zeros((1, big.induction_dim), cp.float32),
                                  cp.zeros((1, 2, big.feed_dim), cp.float32), cp.ones((1, 2), cp.float32),
                                  cp.zeros((1, big.out_dim), cp.float32), big)
    B, T = 6, 45
    rng = np.random.default_rng(n)
    ind = (rng.normal(0, 1.0, (B, spec.induction_dim)) / np.sqrt(spec.feed_dim)).astype(np.float32)
    feed = rng.normal(0, 0.6, (B, T, spec.feed_dim)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    g = rng.normal(size=(B, spec.out_dim)).astype(np.float32)
    got, want = run_both(spec, ind, feed, mask, g, dtype)
    assert_close(got, want, TOL[dtype])


@pytest.mark.gpu
def test_fast_and_fallback_kernels_agree():
    """A 36-wide first layer runs on the fallback, a 32-wide one on the fast kernels: padding the feed with zero
    columns (and their weight rows with anything) must not change either's answer."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu
    from dwdp_ops.coaction.fused import uses_fast_kernels

    narrow, wide = CoActionSpec(((32, 8), (8, 4))), CoActionSpec(((36, 8), (8, 4)))
    assert uses_fast_kernels(narrow) and not uses_fast_kernels(wide)
    ind, feed, mask, _ = inputs(narrow, 50, 90, 11)
    wi = np.zeros((50, wide.induction_dim), np.float32)
    wi[:, : 32 * 8] = ind[:, : 32 * 8]
    wi[:, 32 * 8 : 36 * 8] = 0.5  # weight rows of the zero feed columns
    wi[:, 36 * 8 :] = ind[:, 32 * 8 :]
    wf = np.concatenate([feed, np.zeros((50, 90, 4), np.float32)], -1)
    a = coaction_forward_gpu(cp.asarray(ind), cp.asarray(feed), cp.asarray(mask), narrow).get()
    b = coaction_forward_gpu(cp.asarray(wi), cp.asarray(wf), cp.asarray(mask), wide).get()
    assert rel(a, b) <= 1e-6


@pytest.mark.gpu
def test_id_check_names_the_bad_array():
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu

    spec = CoActionSpec()
    table = cp.zeros((10, spec.induction_dim), cp.float32)
    ftable = cp.zeros((7, spec.feed_dim), cp.float32)
    mask = cp.ones((4, 5), cp.float32)
    ids, fids = cp.arange(4, dtype=cp.int64), cp.zeros((4, 5), cp.int64)
    with pytest.raises(ValueError, match=r"feed_ids must be in \[0, 7\)"):
        coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids - 1)
    with pytest.raises(ValueError, match=r"ind_ids must be in \[0, 10\)"):
        coaction_backward_gpu(table, ftable, mask, cp.zeros((4, 36), cp.float32), spec, ind_ids=ids + 7,
                              feed_ids=fids)
    coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids + 6)  # the last rows are fine


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["specialized", "fast", "fallback"])
def test_unchecked_bad_ids_never_leave_the_tables(which):
    """``check_ids=False`` with ids far outside the tables (negative, past the end, 2^40): every kernel family stays
    inside them, as its contract says: an induction id outside the table is a zero row whose gradient goes nowhere, a
    feed id outside it is row 0 (read forward, added into backward). Checked exactly against the float64 reference on
    those substitutions, then the context is still healthy (a checked call afterwards)."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu
    from dwdp_ops.coaction.fused import uses_fast_kernels, uses_specialized_kernels

    spec = {"specialized": CoActionSpec(), "fast": CoActionSpec(((6, 5), (5, 4)), orders=2, bias=True),
            "fallback": _fallback_spec(64)}[which]
    assert uses_specialized_kernels(spec) == (which == "specialized")
    assert uses_fast_kernels(spec) == (which != "fallback")
    rng = np.random.default_rng(17)
    B, T, rows, frows = 24, 70, 30, 20
    table = (rng.normal(0, 1.0, (rows, spec.induction_dim)) / np.sqrt(spec.feed_dim)).astype(np.float32)
    ftable = rng.normal(0, 0.6, (frows, spec.feed_dim)).astype(np.float32)
    ids = rng.integers(0, rows, B)
    fids = rng.integers(0, frows, (B, T))
    ids[[1, 5, 9]] = [-1, rows, 1 << 40]
    fids[2, :7] = [-1, frows, 1 << 40, -(1 << 40), frows + 3, -5, 1 << 62]
    fids[7, 3] = -1
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    mask[2, :7] = 1.0
    mask[7, 3] = 1.0
    g = rng.normal(size=(B, spec.out_dim)).astype(np.float32)
    good = (ids >= 0) & (ids < rows)
    ind_rows = np.where(good[:, None], table[np.where(good, ids, 0)], 0.0)  # a bad induction id: a zero row
    fsub = np.where((fids >= 0) & (fids < frows), fids, 0)  # a bad feed id: row 0
    args = (cp.asarray(table), cp.asarray(ftable), cp.asarray(mask), spec)
    kw = dict(ind_ids=cp.asarray(ids), feed_ids=cp.asarray(fids), check_ids=False)
    out = coaction_forward_gpu(*args, **kw).get()
    want = coaction_forward(ind_rows.astype(np.float64), ftable[fsub].astype(np.float64), mask, spec)
    assert rel(out, want) <= 1e-5
    gi, gf = coaction_backward_gpu(*args[:3], cp.asarray(g), spec, **kw)
    ri, rf = coaction_backward(ind_rows.astype(np.float64), ftable[fsub].astype(np.float64), mask,
                               g.astype(np.float64), spec)
    wi, wf = np.zeros(table.shape), np.zeros(ftable.shape)
    np.add.at(wi, ids[good], ri[good])
    np.add.at(wf, fsub, rf)
    assert rel(gi.get(), wi) <= 1e-5 and rel(gf.get(), wf) <= 1e-5
    with pytest.raises(ValueError, match=r"ind_ids must be in \[0, 30\)"):
        coaction_forward_gpu(*args, ind_ids=cp.asarray(ids), feed_ids=cp.asarray(fsub))
    with pytest.raises(ValueError, match=r"feed_ids must be in \[0, 20\)"):
        coaction_forward_gpu(*args, ind_ids=cp.asarray(np.where(good, ids, 0)), feed_ids=cp.asarray(fids))
    ok = coaction_forward_gpu(*args, ind_ids=cp.asarray(np.where(good, ids, 0)), feed_ids=cp.asarray(fsub))
    cp.cuda.Device().synchronize()
    assert np.isfinite(ok.get()).all()


@pytest.mark.gpu
def test_id_check_sees_ids_written_on_the_stream_just_before():
    """The forward's check runs on the caller's stream behind what is queued there (a large copy, then a kernel that
    writes the ids) and the host waits for it after launching the forward: ids made bad, or made good, by the
    stream's last kernel are judged as written; a failed check leaves the stream and the pool usable."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu

    spec = CoActionSpec()
    rng = np.random.default_rng(3)
    B, T, rows = 300, 60, 50
    table = cp.asarray(rng.normal(0, 0.3, (rows, spec.induction_dim)).astype(np.float32))
    ftable = cp.asarray(rng.normal(0, 0.6, (rows, spec.feed_dim)).astype(np.float32))
    mask = cp.asarray((rng.random((B, T)) < 0.8).astype(np.float32))
    good_ids = cp.asarray(rng.integers(0, rows, B))
    fids = cp.asarray(rng.integers(0, rows, (B, T)))
    big = cp.ones(1 << 27, cp.float32)
    s = cp.cuda.Stream(non_blocking=True)
    want = coaction_forward_gpu(table, ftable, mask, spec, ind_ids=good_ids, feed_ids=fids).get()
    for _ in range(3):
        with s:
            dst = cp.empty_like(big)
            dst[...] = big  # queued ahead
            ids = good_ids + rows  # written on s, behind the copy: all bad
            with pytest.raises(ValueError, match=r"ind_ids must be in \[0, 50\)"):
                coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids, stream=s)
            dst[...] = big
            ids -= rows  # good again, written on s just before the call
            out = coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids, stream=s)
            del dst
            scratch = cp.empty(1 << 27, cp.float32)  # the pool's freed block, reused behind the op
            scratch.fill(3)
        s.synchronize()
        assert np.array_equal(out.get(), want)


@pytest.mark.gpu
def test_a_refused_forward_leaves_no_stale_id_flag():
    """The forward launches its id check before its own launch is refused (a layer too wide for shared memory: a
    ValueError from the native call). That check, on bad ids and queued behind a large copy, must not set the flags
    of the next call's check: the refused call waits for it before letting go of them (on a stale check the next,
    good call would raise "ind_ids must be in ...")."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu, launch_shape

    wide = _fallback_spec(next(w for w in range(64, 264, 8) if launch_shape(_fallback_spec(w))[0] < 1))
    spec = CoActionSpec()
    s = cp.cuda.Stream(non_blocking=True)
    big = cp.ones(1 << 28, cp.float32)
    mask = cp.ones((2, 3), cp.float32)
    table, ftable = cp.zeros((4, spec.induction_dim), cp.float32), cp.zeros((4, spec.feed_dim), cp.float32)
    ids, fids = cp.zeros(2, cp.int64), cp.zeros((2, 3), cp.int64)
    for _ in range(3):
        with s:
            dst = cp.empty_like(big)
            dst[...] = big  # the refused call's check runs behind this
            with pytest.raises(ValueError, match="shared memory"):
                coaction_forward_gpu(cp.zeros((4, wide.induction_dim), cp.float32),
                                     cp.zeros((4, wide.feed_dim), cp.float32), mask, wide, ind_ids=ids + 99,
                                     feed_ids=fids, stream=s)
            out = coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids, stream=s)
            del dst
        s.synchronize()
        assert np.array_equal(out.get(), np.zeros((2, spec.out_dim), np.float32))


@pytest.mark.gpu
def test_empty_tables_with_ids_are_refused_before_any_launch():
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu

    spec = CoActionSpec()
    mask = cp.ones((2, 3), cp.float32)
    with pytest.raises(ValueError, match=r"feed_ids must be in \[0, 0\): the feed table is empty"):
        coaction_forward_gpu(cp.zeros((4, spec.induction_dim), cp.float32), cp.zeros((0, spec.feed_dim), cp.float32),
                             mask, spec, ind_ids=cp.zeros(2, cp.int64), feed_ids=cp.zeros((2, 3), cp.int64),
                             check_ids=False)
    with pytest.raises(ValueError, match=r"ind_ids must be in \[0, 0\): the induction table is empty"):
        coaction_forward_gpu(cp.zeros((0, spec.induction_dim), cp.float32), cp.zeros((4, spec.feed_dim), cp.float32),
                             mask, spec, ind_ids=cp.zeros(2, cp.int64), feed_ids=cp.zeros((2, 3), cp.int64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ids", [False, True], ids=["gathered", "table"])
def test_a_batch_of_no_sample(ids, dtype):
    """B = 0, as the reference takes it: the forward gives [0, out_dim], the backward zero gradients (table-shaped
    with ids), a TableGrads passed to the forward is zeroed all the same, and the PyTorch op does as much. The
    gathered path had failed with 'co-action: shard 0 has no address' (the empty rows' address), naming nothing the
    caller passed."""
    import cupy as cp
    from dwdp_ops.coaction import TableGrads, coaction_backward_gpu, coaction_forward_gpu

    spec = CoActionSpec()
    st = np.float32 if dtype == "float32" else np.uint16
    T, rows = 7, 5
    if ids:
        ind, feed = cp.ones((rows, spec.induction_dim), st), cp.ones((rows, spec.feed_dim), st)
        kw = dict(ind_ids=cp.zeros(0, cp.int64), feed_ids=cp.zeros((0, T), cp.int64))
    else:
        ind, feed = cp.zeros((0, spec.induction_dim), st), cp.zeros((0, T, spec.feed_dim), st)
        kw = {}
    mask, g = cp.zeros((0, T), cp.float32), cp.zeros((0, spec.out_dim), cp.float32)
    s = cp.cuda.Stream(non_blocking=True)
    out = coaction_forward_gpu(ind, feed, mask, spec, dtype=dtype, stream=s, **kw)
    assert out.shape == (0, spec.out_dim) and out.dtype == st
    gi, gf = coaction_backward_gpu(ind, feed, mask, g, spec, dtype=dtype, stream=s, **kw)
    s.synchronize()
    assert gi.shape == ind.shape and gf.shape == feed.shape and not gi.any() and not gf.any()
    tg = TableGrads(ind.shape, feed.shape, stream=s)
    for a in tg.arrays:
        a.fill(np.nan)  # what a reused pool block may hold
    coaction_forward_gpu(ind, feed, mask, spec, dtype=dtype, stream=s, zero_grads=tg, **kw)
    gi, gf = coaction_backward_gpu(ind, feed, mask, g, spec, dtype=dtype, stream=s, grads=tg, **kw)
    s.synchronize()
    assert not cp.isnan(gi).any() and not gi.any() and not gf.any()
    torch = pytest.importorskip("torch")
    from dwdp_ops.coaction import coaction

    tt, tf = torch.from_dlpack(ind), torch.from_dlpack(feed)
    if dtype == "bfloat16":
        tt, tf = tt.view(torch.bfloat16), tf.view(torch.bfloat16)
    tt, tf = tt.clone().requires_grad_(True), tf.clone().requires_grad_(True)
    targs = {k: torch.from_dlpack(v) for k, v in kw.items()}
    o = coaction(tt, tf, torch.from_dlpack(mask), spec, **targs)
    assert tuple(o.shape) == (0, spec.out_dim)
    o.sum().backward()
    assert tt.grad.shape == tt.shape and not tt.grad.any() and not tf.grad.any()


@pytest.mark.gpu
def test_an_input_on_another_device_is_named_before_the_launch(monkeypatch):
    """Every input must be on the device the kernels run on: an array on another GPU had gone to the kernel by its
    address (an illegal access without peer mappings). On one GPU the check is shown with a DeviceBuffer that says it
    is on device 1 (the check reads what the array says, not its address; a process that sees one device skips it,
    so the test says it sees more)."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu, fused
    from dwdp_ops.interop import DeviceBuffer, device_buffer

    monkeypatch.setattr(fused, "_ONE_DEVICE", False)
    assert fused._array_device(cp.zeros(2)) == cp.cuda.runtime.getDevice() and fused._array_device(np.zeros(2)) is None

    spec = CoActionSpec()
    ind, feed, mask, _ = (cp.asarray(a) for a in inputs(spec, 3, 4, 0))
    for name in ("induction", "feed", "mask"):
        args = {"induction": ind, "feed": feed, "mask": mask}
        b = device_buffer(args[name])
        args[name] = DeviceBuffer(b.ptr, b.shape, b.dtype, b.strides, 1)
        with pytest.raises(ValueError, match=rf"{name} is on device 1, the op runs on the current device \(0\)"):
            coaction_forward_gpu(args["induction"], args["feed"], args["mask"], spec)
    b = device_buffer(ind)
    here = DeviceBuffer(b.ptr, b.shape, b.dtype, b.strides, 0)
    assert coaction_forward_gpu(here, feed, mask, spec).shape == (3, spec.out_dim)
    torch = pytest.importorskip("torch")
    assert fused._array_device(torch.zeros(2, device="cuda")) == torch.cuda.current_device()
    assert fused._array_device(torch.zeros(2)) is None


@pytest.mark.gpu
@pytest.mark.parametrize("general", [False, True], ids=["specialized", "general"])
def test_padding_ids_at_masked_positions_are_accepted(general, monkeypatch):
    """Feed ids at masked positions (mask 0) may hold any value (-1 here): the id check skips them, in the forward
    and in the backward, and the results equal those with valid ids there (a masked position contributes nothing).
    The check had refused them. An unmasked bad id is still refused, by both ops and the PyTorch op."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu

    if general:
        monkeypatch.setenv("DWDP_COACTION_SPECIALIZED", "0")
    spec = CoActionSpec(bias=True)
    rng = np.random.default_rng(3)
    B, T, rows = 33, 70, 11
    table = cp.asarray(rng.normal(0, 0.3, (rows, spec.induction_dim)).astype(np.float32))
    ftable = cp.asarray(rng.normal(0, 0.6, (rows, spec.feed_dim)).astype(np.float32))
    ids = cp.asarray(rng.integers(0, rows, B))
    fids = rng.integers(0, rows, (B, T))
    m = (rng.random((B, T)) < 0.5).astype(np.float32)
    mask, g = cp.asarray(m), cp.asarray(rng.normal(size=(B, spec.out_dim)).astype(np.float32))
    padded = cp.asarray(np.where(m != 0, fids, -1))
    fids = cp.asarray(fids)
    want = coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids)
    got = coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=padded)
    cp.testing.assert_array_equal(got, want)
    ref = coaction_forward(table.get().astype(np.float64), ftable.get().astype(np.float64), m, spec,
                           ind_ids=ids.get(), feed_ids=padded.get())
    assert rel(got.get(), ref) <= 1e-5
    wg = coaction_backward_gpu(table, ftable, mask, g, spec, ind_ids=ids, feed_ids=fids)
    gg = coaction_backward_gpu(table, ftable, mask, g, spec, ind_ids=ids, feed_ids=padded)
    for a, b in zip(gg, wg):
        assert rel(a.get(), b.get()) <= 1e-6  # (table gradients: atomics, summed in any order)
    bad = padded.copy()
    r, c = np.argwhere(m != 0)[0]
    bad[int(r), int(c)] = -1
    with pytest.raises(ValueError, match=r"feed_ids must be in \[0, 11\)"):
        coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=bad)
    with pytest.raises(ValueError, match=r"feed_ids must be in \[0, 11\)"):
        coaction_backward_gpu(table, ftable, mask, g, spec, ind_ids=ids, feed_ids=bad)
    torch = pytest.importorskip("torch")
    from dwdp_ops.coaction import coaction

    tt = torch.from_dlpack(table).clone().requires_grad_(True)
    o = coaction(tt, torch.from_dlpack(ftable), torch.from_dlpack(mask), spec, ind_ids=torch.from_dlpack(ids),
                 feed_ids=torch.from_dlpack(padded))
    torch.testing.assert_close(o, torch.from_dlpack(want), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"feed_ids must be in \[0, 11\)"):
        coaction(tt, torch.from_dlpack(ftable), torch.from_dlpack(mask), spec, ind_ids=torch.from_dlpack(ids),
                 feed_ids=torch.from_dlpack(bad))


# every (orders, order independence) instance of the specialised kernels, with and without bias
SPECIALIZED = [CoActionSpec(), CoActionSpec(bias=True), CoActionSpec(orders=1), CoActionSpec(orders=2),
               CoActionSpec(orders=4, bias=True), CoActionSpec(orders=1, order_independent=True),
               CoActionSpec(order_independent=True), CoActionSpec(orders=2, bias=True, order_independent=True),
               CoActionSpec(orders=4, bias=True, order_independent=True)]  # the most shared memory it takes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("spec", SPECIALIZED, ids=lambda s: f"o{s.orders}-b{int(s.bias)}-oi{int(s.order_independent)}")
@pytest.mark.parametrize("ids", [False, True], ids=["gathered", "table"])
def test_specialized_kernels_equal_the_reference_and_the_general_kernels(spec, dtype, ids, monkeypatch):
    """The reference shape (16 -> 8 -> 4, linear last layer) runs on the specialised kernels, with every option they
    take (orders 1-4, bias, order independence, table ids or gathered rows, fp32 and bf16): against the float64
    reference, and against the general fast kernels on the same inputs (DWDP_COACTION_SPECIALIZED=0)."""
    from dwdp_ops.coaction.fused import uses_fast_kernels, uses_specialized_kernels

    assert uses_specialized_kernels(spec) and uses_specialized_kernels(spec, backward=True)
    rng = np.random.default_rng(spec.orders * 7 + int(spec.bias) + 2 * int(spec.order_independent))
    B, T = 130, 75
    ind, feed, mask, g = inputs(spec, B, T, 5)
    kw = {}
    if ids:  # tables smaller than the batch: induction ids repeat inside blocks, feed ids inside rounds
        kw = dict(ind_ids=rng.integers(0, 40, B), feed_ids=rng.integers(0, 300, (B, T)))
        ind = rng.normal(0, 0.3, (40, spec.induction_dim)).astype(np.float32)
        feed = rng.normal(0, 0.6, (300, spec.feed_dim)).astype(np.float32)
    got, want = run_both(spec, ind, feed, mask, g, dtype, **kw)
    assert_close(got, want, TOL[dtype])
    monkeypatch.setenv("DWDP_COACTION_SPECIALIZED", "0")
    assert not uses_specialized_kernels(spec) and uses_fast_kernels(spec)
    general, _ = run_both(spec, ind, feed, mask, g, dtype, **kw)
    # the specialised kernels' tanh (ex2 / rcp approximations, ~2e-7 absolute) is not the general kernels' tanhf
    for name, a, b in zip(("forward", "grad_induction", "grad_feed"), got, general):
        assert rel(a, b) <= (3e-6 if dtype == "float32" else 1e-2), name


@pytest.mark.gpu
def test_shapes_the_specialized_kernels_do_not_take():
    from dwdp_ops.coaction.fused import uses_specialized_kernels

    for spec in (CoActionSpec(variant="paper", bias=True), CoActionSpec(orders=5), CoActionSpec(((16, 8), (8, 8))),
                 CoActionSpec(((8, 8), (8, 4))), CoActionSpec(((16, 8), (8, 4), (4, 4)))):
        assert not uses_specialized_kernels(spec), spec.layer_dims


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [CoActionSpec(), CoActionSpec(orders=4, bias=True, order_independent=True)],
                         ids=["reference", "o4-b1-oi1"])
def test_specialized_kernels_are_deterministic_on_a_busy_stream(spec):
    """Gathered rows (no atomics): two runs give bit-identical outputs and gradients, the second on a non-blocking
    stream with a large copy still queued ahead of it (the kernels read their inputs behind it) and the pool's
    blocks reused at once."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu

    ind, feed, mask, g = inputs(spec, 777, 130, 21)
    args = (cp.asarray(ind), cp.asarray(feed), cp.asarray(mask))
    first = [coaction_forward_gpu(*args, spec).get(), *(a.get() for a in coaction_backward_gpu(*args, cp.asarray(g), spec))]
    s = cp.cuda.Stream(non_blocking=True)
    big = cp.ones(1 << 27, cp.float32)
    with s:
        dst = cp.empty_like(big)
        dst[...] = big  # queued ahead of the op on the same stream
        out = coaction_forward_gpu(*args, spec, stream=s)
        gi, gf = coaction_backward_gpu(*args, cp.asarray(g), spec, stream=s)
        del dst
        scratch = cp.empty(1 << 27, cp.float32)  # reuses the freed block, behind the op on this stream
        scratch.fill(7)
    s.synchronize()
    for a, b in zip(first, (out.get(), gi.get(), gf.get())):
        assert np.array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [1e-3, 3e-2, 1.0])
@pytest.mark.parametrize("spec", [CoActionSpec(), CoActionSpec(bias=True)], ids=["reference", "bias"])
def test_small_pre_activations_keep_fp32_accuracy(spec, scale):
    """Induction rows scaled down (small-initialised weights: every pre-activation near 0, where 1 - 2 / (e + 1)
    cancels): outputs and gradients still within 1e-5 of the float64 reference, on the specialised kernels."""
    from dwdp_ops.coaction.fused import uses_specialized_kernels

    assert uses_specialized_kernels(spec)
    ind, feed, mask, g = inputs(spec, 150, 90, 13)
    got, want = run_both(spec, (ind * scale).astype(np.float32), feed, mask, g)
    assert_close(got, want, 1e-5)


@pytest.mark.gpu
def test_unaligned_feed_rows_take_the_scalar_loads():
    """A feed table whose base is 4 bytes past a 16-byte boundary (a view into a larger buffer): the kernels fall
    back to scalar loads and give the reference's answer, with table ids for the feed and gathered induction rows."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu

    spec = CoActionSpec()
    rng = np.random.default_rng(3)
    B, T, rows = 40, 33, 57
    ind = rng.normal(0, 0.3, (B, spec.induction_dim)).astype(np.float32)
    ftable = rng.normal(0, 0.6, (rows, spec.feed_dim)).astype(np.float32)
    fids = rng.integers(0, rows, (B, T))
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    g = rng.normal(size=(B, spec.out_dim)).astype(np.float32)
    flat = cp.zeros(rows * spec.feed_dim + 1, cp.float32)
    flat[1:] = cp.asarray(ftable.ravel())
    dft = flat[1:].reshape(rows, spec.feed_dim)  # contiguous, base pointer 4 bytes off alignment
    assert dft.data.ptr % 16 == 4
    args = (cp.asarray(ind), dft, cp.asarray(mask))
    out = coaction_forward_gpu(*args, spec, feed_ids=cp.asarray(fids)).get()
    gi, gf = coaction_backward_gpu(*args, cp.asarray(g), spec, feed_ids=cp.asarray(fids))
    f64 = (ind.astype(np.float64), ftable.astype(np.float64), mask)
    assert rel(out, coaction_forward(*f64, spec, feed_ids=fids)) <= 1e-5
    wi, wf = coaction_backward(*f64, g.astype(np.float64), spec, feed_ids=fids)
    assert rel(gi.get(), wi) <= 1e-5 and rel(gf.get(), wf) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("T", [10, 45], ids=["one-tile", "full-rounds-and-tiles"])
def test_a_nan_weight_stays_in_its_own_column(T):
    """A NaN in one first-layer weight (W1[0][1] of sample 0, shared by every order) makes that neuron's pooled sums
    and the second layer NaN for that sample and nothing else: in a round of one 16-row tensor-core tile (rows past
    the round included) as in full rounds of two, the same NaN pattern as the float64 reference, the finite values
    within 1e-5."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu

    spec = CoActionSpec()
    ind, feed, mask, _ = inputs(spec, 3, T, 8)
    ind[0, 1] = np.nan
    out = coaction_forward_gpu(cp.asarray(ind), cp.asarray(feed), cp.asarray(mask), spec).get()
    want = coaction_forward(ind.astype(np.float64), feed.astype(np.float64), mask, spec)
    assert np.isnan(want[0]).sum() == spec.orders * (1 + 4)  # neuron 1's sum and the 4 outputs after it, each order
    assert np.array_equal(np.isnan(out), np.isnan(want))
    ok = ~np.isnan(want)
    assert rel(out[ok], want[ok]) <= 1e-5


def assert_finite_forward_like_reference(spec, ind, feed, mask):
    """The fused forward on these gathered inputs is finite and within 1e-5 of the float64 reference, as finite."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu

    out = coaction_forward_gpu(cp.asarray(ind), cp.asarray(feed), cp.asarray(mask), spec).get()
    want = coaction_forward(ind.astype(np.float64), feed.astype(np.float64), mask, spec)
    assert np.isfinite(want).all() and np.isfinite(out).all()
    assert rel(out, want) <= 1e-5


def infinite_w1_inputs(spec, value):
    """Sample 0 with W1[0][1] = value and 21 unmasked behaviours (a round of 21: its second tile 5 rows, lanes past
    the round); 6 samples, T = 45."""
    ind, feed, mask, g = inputs(spec, 6, 45, 13)
    mask[0] = 0.0
    mask[0, :21] = 1.0
    ind[0, 1] = value
    return ind, feed, mask, g


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2]], ids=["reference-shape", "oi-3-layers"])
@pytest.mark.parametrize("kernels", ["specialized", "general"])
def test_masked_padding_and_mask_values_agree_with_the_reference(cfg, kernels, monkeypatch):
    """Padding is NaN and +-inf at masked positions (gathered rows and a feed table with ids), and the present
    positions' mask values are 1, 2, 0.5 and -1: the kernels leave masked positions out and count a nonzero mask once;
    so does the float64 reference. Outputs and gradients within 1e-5 of it, finite, and no feed gradient at a masked
    position (gathered rows) or from one (table rows no present position names)."""
    import cupy as cp

    if kernels == "general":
        monkeypatch.setenv("DWDP_COACTION_SPECIALIZED", "0")
    spec = CoActionSpec(**cfg)
    B, T = 9, 70
    ind, feed, mask, g = inputs(spec, B, T, 21)
    on = mask != 0
    pads = np.array([np.nan, np.inf, -np.inf], np.float32)
    feed[~on] = pads[np.arange(int((~on).sum())) % 3, None]
    mask[on] = np.array([1.0, 2.0, 0.5, -1.0], np.float32)[np.arange(int(on.sum())) % 4]
    (out, gi, gf), (want, wi, wf) = run_both(spec, ind, feed, mask, g)
    assert np.isfinite(out).all() and np.isfinite(gi).all() and np.isfinite(gf).all()
    assert rel(out, want) <= 1e-5 and rel(gi, wi) <= 1e-5 and rel(gf, wf) <= 1e-5
    assert not gf[~on].any()
    # a feed table with ids: the rows only masked positions name hold the padding and get no gradient
    rows = np.concatenate([feed[on], np.repeat(pads, 4)[:, None] * np.ones((1, spec.feed_dim), np.float32)])
    fids = np.zeros((B, T), np.int64)
    fids[on] = np.arange(int(on.sum()))
    fids[~on] = int(on.sum()) + np.arange(int((~on).sum())) % 12
    (out2, gi2, gf2), (want2, wi2, wf2) = run_both(spec, ind, rows, mask, g, feed_ids=fids)
    assert np.isfinite(out2).all() and np.isfinite(gf2).all()
    assert rel(out2, want2) <= 1e-5 and rel(gi2, wi2) <= 1e-5 and rel(gf2, wf2) <= 1e-5
    assert not gf2[int(on.sum()):].any()
    del cp


@pytest.mark.gpu
@pytest.mark.parametrize("value", [np.inf, -np.inf], ids=["inf", "-inf"])
def test_an_infinite_feed_value_saturates_its_behaviour(value):
    """A feed value of +-inf (sample 0, behaviour 5, unmasked): its pre-activations are +-inf and their tanh +-1, as
    in the float64 reference, so the forward's outputs are finite and within 1e-5 of it (its tile cannot be scaled
    into fp16's range and takes the CUDA cores); the other samples as usual."""
    spec = CoActionSpec()
    ind, feed, mask, _ = inputs(spec, 5, 40, 12)
    feed[0, 5, 2] = value
    mask[0, 5] = 1.0
    assert_finite_forward_like_reference(spec, ind, feed, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("value", [np.inf, -np.inf], ids=["inf", "-inf"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_an_infinite_weight_saturates_its_column(value, bias):
    """W1[0][1] = +-inf in sample 0's induction row: every behaviour's pre-activation of column 1 is +-inf (x_0 is
    never 0 here) and its tanh +-1, as in the float64 reference, so the outputs are finite and within 1e-5 of it.
    The sample's first layer takes the CUDA cores (an infinite W1 column cannot be scaled into fp16's range); its last
    tile has rows past the round, whose x = 0 times the infinite weight would be NaN if they were computed (they
    were, before: the sample's outputs were NaN)."""
    from dwdp_ops.coaction.fused import uses_specialized_kernels

    spec = CoActionSpec(bias=bias)
    assert uses_specialized_kernels(spec)
    ind, feed, mask, _ = infinite_w1_inputs(spec, value)
    assert_finite_forward_like_reference(spec, ind, feed, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("value", [np.inf, -np.inf], ids=["inf", "-inf"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("kernels", ["specialized", "general", "fallback"])
def test_an_infinite_weight_gives_the_references_gradients(value, bias, kernels, monkeypatch):
    """The backward of the case above: W1[0][1] = +-inf saturates column 1 (tanh +-1, dz = 0), so W1's, b1's and
    W2's gradients stay finite, as in the float64 reference; the feed gradient's element 0 of sample 0's unmasked
    behaviours is NaN (the infinite weight times dz = 0), as there, and a masked behaviour's feed gradient is 0, as
    there (the reference leaves masked positions out). The finite values within 1e-5. The
    sample's last round has lanes past it (21 behaviours), whose x = 0 times the infinite weight is NaN: those
    lanes' values must not reach the h1 or b1 sums (they did, before: NaN gradients of W2 and b1). ``fallback``: a
    40-wide first layer (16 -> 40 -> 4), which only the shared-memory fallback kernels take; its masked lanes had
    made the forward's outputs and every gradient of the sample NaN."""
    from dwdp_ops.coaction.fused import uses_fast_kernels

    if kernels == "general":
        monkeypatch.setenv("DWDP_COACTION_SPECIALIZED", "0")
    spec = CoActionSpec(((16, 40), (40, 4)), bias=bias) if kernels == "fallback" else CoActionSpec(bias=bias)
    fast = kernels != "fallback"
    assert uses_fast_kernels(spec) == fast and uses_fast_kernels(spec, True) == fast
    ind, feed, mask, g = infinite_w1_inputs(spec, value)
    with np.errstate(invalid="ignore"):  # the reference's infinite weight times dz = 0: the NaN asserted below
        (out, gi, gf), (want, wi, wf) = run_both(spec, ind, feed, mask, g)
    assert np.isfinite(want).all() and np.isfinite(wi).all() and np.isnan(wf[0, :21, 0]).all()
    assert np.isfinite(out).all() and rel(out, want) <= 1e-5
    assert np.isfinite(gi).all() and rel(gi, wi) <= 1e-5, rel(gi, wi)
    on = mask.astype(bool)
    assert not np.any(gf[~on]) and not np.any(wf[~on])
    a, b = gf[on], wf[on]
    assert np.array_equal(np.isnan(a), np.isnan(b)), np.argwhere(np.isnan(a) != np.isnan(b))[:5]
    ok = ~np.isnan(b)
    assert rel(a[ok], b[ok]) <= 1e-5, rel(a[ok], b[ok])


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [CoActionSpec(), CoActionSpec(orders=4, bias=True, order_independent=True)],
                         ids=["shared-w1", "o4-oi"])
def test_an_outlier_weight_costs_only_its_own_column(spec):
    """The tensor-core first layer scales each column of W1 by its own power of two: one weight 3e4 x above the
    rest (W1[0][1] of every sample, every order) leaves every output column within 1e-5 of the float64 reference,
    column by column (with one scale a sample the other columns lost accuracy to 1.4-2.7e-5 on the GPU, which a norm
    over all columns does not show); gradients within 1e-5 as usual."""
    from dwdp_ops.coaction.fused import uses_specialized_kernels

    assert uses_specialized_kernels(spec)
    ind, feed, mask, g = inputs(spec, 40, 45, 31)
    for c in range(spec.orders if spec.order_independent else 1):
        ind[:, c * spec.order_width + 1] *= 3e4
    got, want = run_both(spec, ind, feed, mask, g)
    for j in range(want[0].shape[1]):
        assert rel(got[0][:, j], want[0][:, j]) <= 1e-5, (j, rel(got[0][:, j], want[0][:, j]))
    assert_close(got, want, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "feed_scale, ind_scale, where",
    [
        (1e-7, 1.0, "all"),  # every behaviour's largest |x| below 2^-20
        (1e-7, 1.0, "one"),  # one such behaviour a sample: its tiles on the CUDA cores, the rest on the tensor cores
        (3e7, 1e-7, "all"),  # |x| above 2^24 (W1 in range: only the tiles fall back)
        (1.0, 1e-9, "all"),  # W1 below 2^-26: the sample's every tile on the CUDA cores
        (1.0, 1e12, "all"),  # W1 above 2^35
    ],
    ids=["x-small", "x-small-one", "x-large", "w1-small", "w1-large"],
)
def test_operands_out_of_fp16_range_take_the_cuda_core_first_layer(feed_scale, ind_scale, where):
    """The specialised forward runs the first layer on the tensor cores in split fp16, each behaviour's x and each
    column of a sample's W1 scaled by a power of two into fp16's range; a tile with a behaviour outside the scalable
    range, or a sample with such a W1 column, takes the CUDA-core path. Outputs and gradients within 1e-5 of the float64 reference there
    too, and in tiles next to such a behaviour."""
    from dwdp_ops.coaction.fused import uses_specialized_kernels

    spec = CoActionSpec()
    assert uses_specialized_kernels(spec)
    ind, feed, mask, g = inputs(spec, 40, 45, 21)
    if where == "all":
        feed = feed * feed_scale
    else:
        feed[:, 3] *= feed_scale
    got, want = run_both(spec, (ind * ind_scale).astype(np.float32), feed.astype(np.float32), mask, g)
    assert_close(got, want, 1e-5)


def _table_case(B=300, T=70, rows=64, seed=31):
    import cupy as cp

    spec = CoActionSpec()
    rng = np.random.default_rng(seed)
    table = cp.asarray(rng.normal(0, 0.3, (rows, spec.induction_dim)).astype(np.float32))
    ftable = cp.asarray(rng.normal(0, 0.6, (rows, spec.feed_dim)).astype(np.float32))
    ids, fids = cp.asarray(rng.integers(0, rows, B)), cp.asarray(rng.integers(0, rows, (B, T)))
    mask = cp.asarray((rng.random((B, T)) < 0.8).astype(np.float32))
    g = cp.asarray(rng.normal(size=(B, spec.out_dim)).astype(np.float32))
    return spec, table, ftable, ids, fids, mask, g


@pytest.mark.gpu
def test_backward_adds_into_given_gradients():
    """grads=(grad_induction, grad_feed): the backward adds into the caller's arrays and returns them (twice: twice the
    gradient on top of what they held; and into arrays 4 bytes off 16-byte alignment); wrong shapes, dtypes, layouts, a pair without both ids (gathered rows'
    gradients are written, not added) and arrays on two devices are refused by name."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu

    spec, table, ftable, ids, fids, mask, g = _table_case()
    kw = dict(ind_ids=ids, feed_ids=fids, check_ids=False)
    gi, gf = coaction_backward_gpu(table, ftable, mask, g, spec, **kw)
    ai, af = cp.full(table.shape, 0.5, cp.float32), cp.full(ftable.shape, -2.0, cp.float32)
    for _ in range(2):
        ri, rf = coaction_backward_gpu(table, ftable, mask, g, spec, grads=(ai, af), **kw)
        assert ri is ai and rf is af
    assert rel(ai.get(), 0.5 + 2 * gi.get()) <= 1e-6 and rel(af.get(), -2.0 + 2 * gf.get()) <= 1e-6
    # arrays 4 bytes past a 16-byte boundary: the row gradients take the scalar atomics (the induction row's and the
    # feed rows' 16-byte atomics need aligned rows); the same sums
    bi, bf = cp.full(table.size + 2, 0.5, cp.float32), cp.full(ftable.size + 2, -2.0, cp.float32)
    ui, uf = bi[1:-1].reshape(table.shape), bf[1:-1].reshape(ftable.shape)
    assert ui.data.ptr % 16 == 4 and uf.data.ptr % 16 == 4
    coaction_backward_gpu(table, ftable, mask, g, spec, grads=(ui, uf), **kw)
    assert rel(ui.get(), 0.5 + gi.get()) <= 1e-6 and rel(uf.get(), -2.0 + gf.get()) <= 1e-6
    # nothing written before or after the arrays
    assert bi[[0, -1]].tolist() == [0.5, 0.5] and bf[[0, -1]].tolist() == [-2.0, -2.0]
    with pytest.raises(ValueError, match="needs ind_ids and feed_ids"):  # gathered rows' gradients are written
        coaction_backward_gpu(table[ids], ftable, mask, g, spec, feed_ids=fids, check_ids=False,
                              grads=(cp.zeros((len(ids), 160), cp.float32), af))
    for bad, what in (((ai[:-1], af), "grad_induction must be a contiguous float32 \\[64, 160\\]"),
                      ((ai, af.astype(cp.float64)), "grad_feed must be a contiguous float32 \\[64, 16\\]"),
                      ((cp.asfortranarray(ai.reshape(160, 64)).reshape(64, 160, order="F"), af), "grad_induction"),
                      ((ai,), "grads must be None, a TableGrads or a pair")):
        with pytest.raises(TypeError, match=what):
            coaction_backward_gpu(table, ftable, mask, g, spec, grads=bad, **kw)
    if cp.cuda.runtime.getDeviceCount() > 1:
        with cp.cuda.Device(1):
            other, other_f = cp.zeros(table.shape, cp.float32), cp.zeros(ftable.shape, cp.float32)
        with pytest.raises(ValueError, match="grad_induction is on device 1, the backward runs on device 0"):
            coaction_backward_gpu(table, ftable, mask, g, spec, grads=(other, af), **kw)
        with pytest.raises(ValueError, match="grad_feed is on device 1, the backward runs on device 0"):
            coaction_backward_gpu(table, ftable, mask, g, spec, grads=(ai, other_f), **kw)



def _poison_pool(n_ind, n_feed):
    """A NaN-filled block of the size TableGrads takes for these float counts, freed back to the current stream's
    pool (the next TableGrads of those sizes gets it)."""
    import cupy as cp

    a = cp.full(-(-n_ind // 64) * 64 + n_feed, np.nan, cp.float32)
    del a


@pytest.mark.gpu
@pytest.mark.parametrize("zero", ["forward", "side"])
def test_table_grads_zeroed_ahead_on_a_busy_stream_and_in_graphs(zero):
    """TableGrads zeroed by the forward's kernel (zero='forward') or on a side stream behind what the caller's stream
    had queued (zero='side', behind a large copy) while the forward runs; the backward waits for the zeroing. The
    arrays come from pool blocks poisoned with NaN just before; eager steps and CUDA-graph replays of the same step
    alternate; every step's gradients equal a plain backward's bit for bit (gathered rows: no atomics in the way), and
    a replay rewrites the graph's outputs."""
    import cupy as cp
    from dwdp_ops.coaction import TableGrads, coaction_backward_gpu, coaction_forward_gpu

    spec, table, ftable, ids, fids, mask, g = _table_case()
    ind, feed = table[ids], ftable[fids]  # gathered rows: deterministic gradients
    want_out = coaction_forward_gpu(ind, feed, mask, spec)
    want = coaction_backward_gpu(ind, feed, mask, g, spec)
    s = cp.cuda.Stream(non_blocking=True)
    big = cp.ones(1 << 27, cp.float32)

    def step():
        tg = TableGrads(ind.shape, feed.shape, stream=s, zero=zero)
        out = coaction_forward_gpu(ind, feed, mask, spec, stream=s, zero_grads=tg if zero == "forward" else None)
        return (out, *coaction_backward_gpu(ind, feed, mask, g, spec, stream=s, grads=tg))

    with s:
        step()
        s.synchronize()
        s.begin_capture()
        try:
            captured = step()
        finally:
            graph = s.end_capture()
        for i in range(6):
            dst = cp.empty_like(big)
            dst[...] = big  # queued ahead: the zeroing comes behind it
            if i % 2:
                for a in captured:
                    a.fill(np.nan)
                graph.launch(s)
                got = captured
            else:
                _poison_pool(ind.size, feed.size)  # NaN-filled pool blocks of s for TableGrads to take
                got = step()
            del dst
            s.synchronize()
            for a, b in zip(got, (want_out, *want)):
                assert np.array_equal(a.get(), b.get()), i


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["specialized", "bf16", "general", "table", "few samples"])
def test_the_forward_zeroes_table_grads_on_every_path(case):
    """zero_grads on the specialised kernels (zeroed by the kernel; fp32 and bf16 inputs), the general ones (a memset
    in front of the kernel), with table ids (atomics: within 1e-6 of a plain backward), and with 20 samples for a
    20 000-row table (a memset: the shares are too large for the kernel): the gradients the backward adds into them
    equal a plain backward's, from NaN-poisoned pool blocks."""
    import cupy as cp
    from dwdp_ops.coaction import TableGrads, coaction_backward_gpu, coaction_forward_gpu
    from dwdp_ops.coaction.fused import uses_specialized_kernels

    spec = CoActionSpec(layer_dims=((5, 4),), orders=2, bias=True) if case == "general" else CoActionSpec()
    assert uses_specialized_kernels(spec) == (case != "general")
    B, T = 333, 45
    ind, feed, mask, g = (cp.asarray(a) for a in inputs(spec, B, T, 3))
    kw = {}
    if case == "bf16":
        ind, feed = cp.asarray(bf16_bits(ind.get())), cp.asarray(bf16_bits(feed.get()))
        kw = dict(dtype="bfloat16")
    if case in ("table", "few samples"):  # few samples: 640 KiB a sample to zero, more than the kernel takes on
        _, ind, feed, ids, fids, mask, g = _table_case(B=B, T=T) if case == "table" else _table_case(20, 9, 20000)
        kw = dict(ind_ids=ids, feed_ids=fids)
    want = coaction_backward_gpu(ind, feed, mask, g, spec, **kw)
    for _ in range(2):
        _poison_pool(ind.size, feed.size)
        tg = TableGrads(ind.shape, feed.shape)
        coaction_forward_gpu(ind, feed, mask, spec, zero_grads=tg, **kw)
        got = coaction_backward_gpu(ind, feed, mask, g, spec, grads=tg, **kw)
        for a, b in zip(got, want):
            a, b = a.get(), b.get()
            assert np.array_equal(a, b) if "table" not in kw and "ind_ids" not in kw else rel(a, b) <= 1e-6


@pytest.mark.gpu
def test_table_grads_misuse_is_refused_by_name():
    """A TableGrads(zero='forward') that no forward zeroed, or passed to a second forward or a second backward, a
    side-zeroed one passed to a forward, one whose forward raised, a wrong zero mode or shape, and a non-TableGrads
    zero_grads: each a clear exception."""
    import cupy as cp
    from dwdp_ops.coaction import TableGrads, coaction_backward_gpu, coaction_forward_gpu, launch_shape

    spec, table, ftable, ids, fids, mask, g = _table_case(B=20, T=9)
    kw = dict(ind_ids=ids, feed_ids=fids)
    tg = TableGrads(table.shape, ftable.shape)
    with pytest.raises(ValueError, match="not zeroed yet"):
        coaction_backward_gpu(table, ftable, mask, g, spec, grads=tg, **kw)
    coaction_forward_gpu(table, ftable, mask, spec, zero_grads=tg, **kw)
    with pytest.raises(ValueError, match="zeroed already"):
        coaction_forward_gpu(table, ftable, mask, spec, zero_grads=tg, **kw)
    with pytest.raises(ValueError, match="zeroed already"):
        coaction_forward_gpu(table, ftable, mask, spec, zero_grads=TableGrads(table.shape, ftable.shape, zero="side"),
                             **kw)
    with pytest.raises(TypeError, match="zero_grads must be a TableGrads"):
        coaction_forward_gpu(table, ftable, mask, spec, zero_grads=(tg.induction, tg.feed), **kw)
    coaction_backward_gpu(table, ftable, mask, g, spec, grads=tg, **kw)
    with pytest.raises(ValueError, match="used by a backward already"):
        coaction_backward_gpu(table, ftable, mask, g, spec, grads=tg, **kw)
    with pytest.raises(ValueError, match=r"these TableGrads are \[63, 160\] and \[64, 16\], the op's gradients are "
                                         r"\[64, 160\] \(induction\) and \[64, 16\] \(feed\)"):
        coaction_forward_gpu(table, ftable, mask, spec, zero_grads=TableGrads((63, 160), ftable.shape), **kw)
    wide = _fallback_spec(next(w for w in range(64, 264, 8) if launch_shape(_fallback_spec(w))[0] < 1))
    bad = TableGrads((4, wide.induction_dim), (4, wide.feed_dim))
    with pytest.raises(ValueError, match="shared memory"):  # refused by the native call, after the zeroing was due
        coaction_forward_gpu(cp.zeros((4, wide.induction_dim), cp.float32), cp.zeros((4, wide.feed_dim), cp.float32),
                             mask[:2, :3].copy(), wide, ind_ids=ids[:2] % 4, feed_ids=fids[:2, :3] % 4, zero_grads=bad)
    with pytest.raises(ValueError, match="the forward that was to zero these TableGrads raised"):
        bad.ready_on()
    with pytest.raises(ValueError, match="zero must be 'forward'"):
        TableGrads(table.shape, ftable.shape, zero="backward")
    with pytest.raises(TypeError, match="grad_induction must be a contiguous float32 \\[64, 160\\]"):
        coaction_backward_gpu(table, ftable, mask, g, spec, grads=TableGrads((63, 160), ftable.shape, zero="side"), **kw)
    if cp.cuda.runtime.getDeviceCount() > 1:
        with cp.cuda.Device(1):
            other = TableGrads(table.shape, ftable.shape)
        with pytest.raises(ValueError, match="on device 1, the forward runs on device 0"):
            coaction_forward_gpu(table, ftable, mask, spec, zero_grads=other, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("framework", ["cupy", "torch"])
@pytest.mark.parametrize("zero", ["forward", "side"])
def test_callers_arrays_as_output_and_table_grads(framework, zero):
    """out= (a caller's [B, out_dim] array) and TableGrads(arrays=...) (a caller's gradient pair) from CuPy or PyTorch,
    NaN-filled first, on a stream with a large copy queued ahead: the forward writes out, the pair is zeroed (by the
    forward or on the side stream) and the backward adds into it; outputs and gradients equal the op's own arrays'.
    T = 0 zeroes out. Wrong shapes, dtypes, layouts and devices are refused by name."""
    import cupy as cp
    from dwdp_ops.coaction import TableGrads, coaction_backward_gpu, coaction_forward_gpu

    spec, table, ftable, ids, fids, mask, g = _table_case()
    kw = dict(ind_ids=ids, feed_ids=fids)
    want = coaction_forward_gpu(table, ftable, mask, spec, **kw)
    wi, wf = coaction_backward_gpu(table, ftable, mask, g, spec, **kw)
    if framework == "torch":
        torch = pytest.importorskip("torch")

        def empty(shape):
            return torch.full(shape, float("nan"), device="cuda")

        def host(a):
            return a.cpu().numpy()
    else:
        def empty(shape):
            return cp.full(shape, np.nan, cp.float32)

        def host(a):
            return a.get()
    s = cp.cuda.Stream(non_blocking=True)
    big = cp.ones(1 << 27, cp.float32)
    with s:
        out, gi, gf = empty(want.shape), empty(table.shape), empty(ftable.shape)
        if framework == "torch":
            torch.cuda.synchronize()  # (torch.full ran on PyTorch's stream)
        dst = cp.empty_like(big)
        dst[...] = big  # queued ahead
        tg = TableGrads(table.shape, ftable.shape, stream=s, zero=zero, arrays=(gi, gf))
        assert tg.arrays[0] is gi and tg.arrays[1] is gf
        got = coaction_forward_gpu(table, ftable, mask, spec, stream=s, out=out,
                                   zero_grads=tg if zero == "forward" else None, **kw)
        ri, rf = coaction_backward_gpu(table, ftable, mask, g, spec, stream=s, grads=tg, **kw)
        assert got is out and ri is gi and rf is gf
        s.synchronize()
    assert rel(host(out), want.get()) == 0.0  # the same kernel, the same sums
    assert rel(host(gi), wi.get()) <= 1e-6 and rel(host(gf), wf.get()) <= 1e-6  # (atomics' order)
    out0 = empty((len(ids), spec.out_dim))
    assert coaction_forward_gpu(table, ftable, mask[:, :0].copy(), spec, ind_ids=ids, feed_ids=fids[:, :0].copy(),
                                out=out0) is out0
    cp.cuda.Device().synchronize()
    assert not np.any(host(out0))  # T = 0: zeros
    for bad, what in ((empty((len(ids), spec.out_dim + 1)), r"out must be a contiguous float32 \[300, 36\]"),
                      (cp.zeros(want.shape, cp.float64), "out must be"),
                      (cp.zeros((spec.out_dim, len(ids)), cp.float32).T, "got non-contiguous float32")):
        with pytest.raises(TypeError, match=what):
            coaction_forward_gpu(table, ftable, mask, spec, out=bad, **kw)
    with pytest.raises(TypeError, match=r"grad_feed must be a contiguous float32 \[64, 16\]"):
        TableGrads(table.shape, ftable.shape, arrays=(empty(table.shape), empty((64, 15))))
    with pytest.raises(TypeError, match="arrays must be a pair"):
        TableGrads(table.shape, ftable.shape, arrays=empty(table.shape))
    if cp.cuda.runtime.getDeviceCount() > 1:
        with cp.cuda.Device(1):
            other = cp.zeros(want.shape, cp.float32)
            other_g = cp.zeros(table.shape, cp.float32)
        with pytest.raises(ValueError, match="out is on device 1, the forward runs on device 0"):
            coaction_forward_gpu(table, ftable, mask, spec, out=other, **kw)
        with pytest.raises(ValueError, match="grad_induction is on device 1, the current device is 0"):
            TableGrads(table.shape, ftable.shape, arrays=(other_g, empty(ftable.shape)))


@pytest.mark.gpu
def test_table_grads_dropped_unused_hold_the_pool_behind_their_zeroing():
    """TableGrads zeroed on a side stream and dropped without a backward, behind a long copy: the allocating stream
    waits for the zeroing, so the next array from the same pool blocks, filled on that stream, keeps its fill (a
    zeroing left pending could land after it)."""
    import cupy as cp
    from dwdp_ops.coaction import TableGrads

    s = cp.cuda.Stream(non_blocking=True)
    big = cp.ones(1 << 28, cp.float32)
    with s:
        for _ in range(5):
            dst = cp.empty_like(big)
            dst[...] = big
            tg = TableGrads((1 << 20, 16), (4096, 16), stream=s, zero="side")
            ptr = tg.induction.data.ptr
            tg.close()
            del tg
            a = cp.empty((1 << 24) + 4096 * 16, cp.float32)  # the size of its block: the same block again
            assert a.data.ptr == ptr
            a.fill(3)
            del dst
            s.synchronize()
            assert bool((a == 3).all())
            del a



@pytest.mark.gpu
def test_table_grads_across_streams():
    """TableGrads allocated on stream s1 from a pool block that a 160 MB copy queued on s1 is still writing, zeroed by
    a forward on s2 and added into by a backward on s3: the forward waits for s1 first (else the copy could land on
    the zeros), the backward for the zeroing, and s1 for the backward before the block goes back to its pool; the
    gradients equal a plain backward's (within 1e-6: table atomics) every time."""
    import cupy as cp
    from dwdp_ops.coaction import TableGrads, coaction_backward_gpu, coaction_forward_gpu

    spec, table, ftable, ids, fids, mask, g = _table_case(B=4096, T=20, rows=250_000)
    kw = dict(ind_ids=ids, feed_ids=fids, check_ids=False)
    want = [a.get() for a in coaction_backward_gpu(table, ftable, mask, g, spec, **kw)]
    s1, s2, s3 = (cp.cuda.Stream(non_blocking=True) for _ in range(3))
    n = -(-table.size // 64) * 64 + ftable.size
    src = cp.full(n, 7.0, cp.float32)
    for _ in range(4):
        with s1:
            x = cp.empty(n, cp.float32)
            x[...] = src  # still writing the block when TableGrads takes it
            ptr = x.data.ptr
            del x
            tg = TableGrads(table.shape, ftable.shape, stream=s1)
        assert tg.induction.data.ptr == ptr
        coaction_forward_gpu(table, ftable, mask, spec, stream=s2, zero_grads=tg, **kw)
        gi, gf = coaction_backward_gpu(table, ftable, mask, g, spec, stream=s3, grads=tg, **kw)
        got = [gi.get(stream=s3), gf.get(stream=s3)]
        del gi, gf, tg
        for a, b in zip(got, want):
            assert rel(a, b) <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [dict(layer_dims=((32, 32), (32, 4)), orders=2, bias=True),
                                   dict(layer_dims=((24, 16), (16, 16), (16, 4)), orders=2, bias=True)],
                         ids=["wide", "deep"])
def test_32_wide_forward_at_batches_of_several_waves(shape, dtype):
    """The 32-wide one-warp forward runs its register-bounded build where the grid takes fewer waves of it
    (fast32_bounded: on an H200 from B ~ 2800, at 8 -> 12 warps a SM; the other tests' batches stay below). At
    B = 8192 against the float64 reference, and its first 1024 samples equal to a B = 1024 call (the unbounded
    build) within rounding."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu

    spec = CoActionSpec(**shape)
    B, T = 8192, 6
    ind, feed, mask, _ = inputs(spec, B, T, 11)
    if dtype == "bfloat16":
        ind_in, feed_in = bf16_bits(ind), bf16_bits(feed)
        ind, feed = bf16_value(ind_in), bf16_value(feed_in)
    else:
        ind_in, feed_in = ind, feed

    def forward(n):
        out = coaction_forward_gpu(cp.asarray(ind_in[:n]), cp.asarray(feed_in[:n]), cp.asarray(mask[:n]), spec,
                                   dtype=dtype).get()
        return bf16_value(out) if dtype == "bfloat16" else out

    got, small = forward(B), forward(1024)
    want = coaction_forward(ind.astype(np.float64), feed.astype(np.float64), mask, spec)
    assert rel(got, want) <= TOL[dtype]
    assert rel(got[:1024], small) <= (1e-6 if dtype == "float32" else 1e-3)
