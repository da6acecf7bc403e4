"""The split forward and backward of the co-action kernels (GPU), specialised and general register-path: a block of K
warps a sample, each a segment of the sample's positions (``split_warps``; ``DWDP_COACTION_SPLIT`` forces K). Every K
against the float64 reference and against one warp a sample, on every specialised feature and on general shapes (the
paper variant, three layers, 8-, 16- and 32-wide registers); the launch's own pick; a busy caller stream and
CUDA-graph replays mixed with eager calls."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.coaction import CoActionSpec, coaction_backward, coaction_forward

SPECS = [dict(), dict(orders=4, order_independent=True, bias=True), dict(orders=1, bias=True),
         dict(orders=2, order_independent=True),
         # the general register-path kernels by register width: 8 (8 -> 8 -> 4), 16 (the paper variant), 32 (three
         # layers 24 -> 16 -> 16 -> 4; 32 -> 32 -> 4: K at most 8, a forced 16 is clamped)
         dict(layer_dims=((8, 8), (8, 4)), bias=True), dict(variant="paper", bias=True),
         dict(layer_dims=((24, 16), (16, 16), (16, 4)), orders=2, bias=True),
         dict(layer_dims=((32, 32), (32, 4)), orders=2, order_independent=True)]
WIDE = dict(layer_dims=((32, 32), (32, 4)), orders=2, bias=True)
# T = 1 and 31 leave most warps of a block an empty segment; 33 and 257 end in a partial chunk
CASES = [(1, 1), (3, 31), (3, 33), (4, 100), (2, 2000), (5, 257)]


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(spec, B, T, seed):
    rng = np.random.default_rng(seed)
    ind = rng.normal(0, 0.3, (B, spec.induction_dim)).astype(np.float32)
    feed = rng.normal(0, 0.6, (B, T, spec.feed_dim)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    if B >= 3:
        mask[1] = 0  # a sample with no behaviour
        mask[2] = 0
        mask[2, T - 1] = 1  # one whose only behaviour is its last position (the last warp's segment)
    if B >= 4:
        mask[3, : T // 2] = 0  # one whose first half is masked (the first warps' segments empty)
    return ind, feed, mask


def reference(spec, ind, feed, mask):
    return coaction_forward(ind.astype(np.float64), feed.astype(np.float64), mask, spec)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [2, 4, 8, 16])
@pytest.mark.parametrize("cfg", SPECS, ids=str)
def test_every_split_equals_the_reference_and_one_warp_a_sample(monkeypatch, cfg, k):
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu

    spec = CoActionSpec(**cfg)
    for B, T in CASES:
        ind, feed, mask = inputs(spec, B, T, B * T + k)
        args = (cp.asarray(ind), cp.asarray(feed), cp.asarray(mask), spec)
        monkeypatch.setenv("DWDP_COACTION_SPLIT", "1")
        one = coaction_forward_gpu(*args).get()
        monkeypatch.setenv("DWDP_COACTION_SPLIT", str(k))
        got = coaction_forward_gpu(*args).get()
        again = coaction_forward_gpu(*args).get()
        want = reference(spec, ind, feed, mask)
        assert rel(got, want) <= 1e-5, (B, T)
        assert rel(got, one) <= 1e-6, (B, T)
        assert np.array_equal(got, again), (B, T)  # deterministic for a given K
        if B >= 3:
            assert np.array_equal(got[1], np.zeros_like(got[1]))  # no behaviour: zeros (no bias b2 times 0 valid)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [2, 4, 8, 16])
@pytest.mark.parametrize("cfg", SPECS, ids=str)
def test_every_split_backward_equals_the_reference_and_one_warp_a_sample(monkeypatch, cfg, k):
    """Gathered rows: the sample's induction-row gradient is the warps' rows added in warp order and written once,
    the feed gradient written per position by the warp that owns it."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu

    spec = CoActionSpec(**cfg)
    for B, T in CASES:
        ind, feed, mask = inputs(spec, B, T, B * T + k + 1)
        g = np.random.default_rng(B + T).normal(size=(B, spec.out_dim)).astype(np.float32)
        args = (cp.asarray(ind), cp.asarray(feed), cp.asarray(mask), cp.asarray(g), spec)
        monkeypatch.setenv("DWDP_COACTION_SPLIT", "1")
        one = [a.get() for a in coaction_backward_gpu(*args)]
        monkeypatch.setenv("DWDP_COACTION_SPLIT", str(k))
        got = [a.get() for a in coaction_backward_gpu(*args)]
        again = [a.get() for a in coaction_backward_gpu(*args)]
        want = coaction_backward(ind.astype(np.float64), feed.astype(np.float64), mask, g.astype(np.float64), spec)
        for name, a, o, r, w in zip(("induction", "feed"), got, one, again, want, strict=True):
            assert rel(a, w) <= 1e-5, (name, B, T)
            assert rel(a, o) <= 1e-6, (name, B, T)
            assert np.array_equal(a, r), (name, B, T)  # deterministic for a given K
        if B >= 3:
            assert not got[0][1].any() and not got[1][1].any()  # no behaviour: no gradient


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [dict(orders=3, bias=True), dict(variant="paper", bias=True), WIDE], ids=str)
def test_split_bf16_inputs(monkeypatch, cfg):
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu

    def bf16(a):  # round to nearest even, keep the top 16 bits
        u = a.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

    def f32(u):
        return (u.astype(np.uint32) << 16).view(np.float32)

    spec = CoActionSpec(**cfg)
    ind, feed, mask = inputs(spec, 4, 300, 7)
    bi, bfd = bf16(ind), bf16(feed)
    want = reference(spec, f32(bi), f32(bfd), mask)
    g = np.random.default_rng(1).normal(size=(4, spec.out_dim)).astype(np.float32)
    wi, wf = coaction_backward(f32(bi).astype(np.float64), f32(bfd).astype(np.float64), mask, g.astype(np.float64),
                               spec)
    for k in (1, 4, 16):
        monkeypatch.setenv("DWDP_COACTION_SPLIT", str(k))
        got = coaction_forward_gpu(cp.asarray(bi), cp.asarray(bfd), cp.asarray(mask), spec, dtype="bfloat16").get()
        assert rel(f32(got), want) <= 2e-2, k
        gi, gf = coaction_backward_gpu(cp.asarray(bi), cp.asarray(bfd), cp.asarray(mask), cp.asarray(g), spec,
                                       dtype="bfloat16")
        assert rel(gi.get(), wi) <= 2e-2 and rel(gf.get(), wf) <= 2e-2, k


@pytest.mark.gpu
@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("cfg", [dict(orders=3, bias=True), dict(variant="paper", bias=True), WIDE], ids=str)
def test_split_table_ids_repeated_and_table_grads_zeroed(monkeypatch, k, cfg):
    """The table path with heavily repeated ids equals the gathered rows; a TableGrads given to a split forward is
    zeroed (by the warps of each sample's block: poisoned with NaN before); the split backward into it (the warps'
    rows of a sample added in warp order, then one atomic an element) equals one warp a sample's and the float64
    reference."""
    import cupy as cp
    from dwdp_ops.coaction import TableGrads, coaction_backward_gpu, coaction_forward_gpu

    spec = CoActionSpec(**cfg)
    rng = np.random.default_rng(k)
    B, T, rows = 6, 700, 5  # 700 positions over 5 feed rows: every row repeated ~140 times a sample
    table = cp.asarray(rng.normal(0, 0.3, (rows, spec.induction_dim)).astype(np.float32))
    ftable = cp.asarray(rng.normal(0, 0.6, (rows, spec.feed_dim)).astype(np.float32))
    ids = cp.asarray(rng.integers(0, 2, B))
    fids = cp.asarray(rng.integers(0, rows, (B, T)))
    mask = cp.asarray((rng.random((B, T)) < 0.8).astype(np.float32))
    g = cp.asarray(rng.normal(size=(B, spec.out_dim)).astype(np.float32))
    monkeypatch.setenv("DWDP_COACTION_SPLIT", str(k))
    want = reference(spec, table.get()[ids.get()], ftable.get()[fids.get()], mask.get())
    tg = TableGrads(table.shape, ftable.shape)
    tg.induction.fill(np.nan)
    tg.feed.fill(np.nan)
    out = coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids, zero_grads=tg)
    assert rel(out.get(), want) <= 1e-5
    assert not tg.induction.any() and not tg.feed.any()  # (NaN is truthy)
    gi, gf = coaction_backward_gpu(table, ftable, mask, g, spec, ind_ids=ids, feed_ids=fids, grads=tg)
    monkeypatch.setenv("DWDP_COACTION_SPLIT", "1")  # one warp a sample: the baseline
    wi, wf = coaction_backward_gpu(table, ftable, mask, g, spec, ind_ids=ids, feed_ids=fids)
    assert np.isfinite(gi.get()).all() and np.isfinite(gf.get()).all()
    assert rel(gi.get(), wi.get()) <= 1e-5 and rel(gf.get(), wf.get()) <= 1e-5
    ri, rf = coaction_backward(table.get()[ids.get()].astype(np.float64), ftable.get()[fids.get()].astype(np.float64),
                               mask.get(), g.get().astype(np.float64), spec)
    wi64, wf64 = np.zeros(table.shape), np.zeros(ftable.shape)
    np.add.at(wi64, ids.get(), ri)
    np.add.at(wf64, fids.get(), rf)
    assert rel(gi.get(), wi64) <= 1e-5 and rel(gf.get(), wf64) <= 1e-5


@pytest.mark.gpu
def test_the_launch_splits_a_small_batch_of_long_samples(monkeypatch):
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu
    from dwdp_ops.coaction.fused import split_warps

    monkeypatch.delenv("DWDP_COACTION_SPLIT", raising=False)
    spec = CoActionSpec()
    sms = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"]
    assert split_warps(spec, 2, 2000, sms) > 1
    assert split_warps(spec, 100 * sms, 100, sms) == 1
    ind, feed, mask = inputs(spec, 2, 2000, 3)
    got = coaction_forward_gpu(cp.asarray(ind), cp.asarray(feed), cp.asarray(mask), spec).get()
    assert rel(got, reference(spec, ind, feed, mask)) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [dict(bias=True), dict(variant="paper", bias=True)], ids=str)
def test_split_step_on_a_busy_stream_and_in_graph_replays(monkeypatch, cfg):
    """The split forward and backward on the caller's non-blocking stream behind a large copy, captured in a CUDA graph
    whose replays alternate with eager steps (whose outputs come from pool blocks poisoned with NaN): every output
    equals the first eager step's bit for bit (gathered rows: no atomics)."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu

    monkeypatch.setenv("DWDP_COACTION_SPLIT", "8")
    spec = CoActionSpec(**cfg)
    ind, feed, mask = inputs(spec, 5, 1000, 11)
    g = cp.asarray(np.random.default_rng(2).normal(size=(5, spec.out_dim)).astype(np.float32))
    ind, feed, mask = cp.asarray(ind), cp.asarray(feed), cp.asarray(mask)
    s = cp.cuda.Stream(non_blocking=True)
    big = cp.ones(1 << 27, cp.float32)

    def step():
        out = coaction_forward_gpu(ind, feed, mask, spec, stream=s)
        return (out, *coaction_backward_gpu(ind, feed, mask, g, spec, stream=s))

    with s:
        want = [a.get() for a in step()]
        s.begin_capture()
        try:
            captured = step()
        finally:
            graph = s.end_capture()
        for i in range(6):
            dst = cp.empty_like(big)
            dst[...] = big  # queued ahead of the step
            if i % 2:
                for a in captured:
                    a.fill(np.nan)
                graph.launch(s)
                got = captured
            else:
                for w in want:
                    cp.full(w.size, np.nan, cp.float32)  # NaN blocks back to the pool for the next outputs
                got = step()
            del dst
            s.synchronize()
            for a, w in zip(got, want, strict=True):
                assert np.array_equal(a.get(), w), i


@pytest.mark.gpu
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("cfg", [dict(), dict(variant="paper", bias=True)], ids=str)
@pytest.mark.parametrize("value", ["3", "32", "-1", "two"])
def test_a_bad_split_setting_is_named(monkeypatch, value, cfg, backward):
    """On the specialised and the general kernels, forward and backward: a ValueError naming the variable."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_backward_gpu, coaction_forward_gpu

    monkeypatch.setenv("DWDP_COACTION_SPLIT", value)
    spec = CoActionSpec(**cfg)
    ind, feed, mask = inputs(spec, 2, 10, 0)
    args = (cp.asarray(ind), cp.asarray(feed), cp.asarray(mask))
    with pytest.raises(ValueError, match="DWDP_COACTION_SPLIT must be 'auto' or one of 1, 2, 4, 8, 16"):
        if backward:
            coaction_backward_gpu(*args, cp.ones((2, spec.out_dim), cp.float32), spec)
        else:
            coaction_forward_gpu(*args, spec)


@pytest.mark.multigpu(n=2)
def test_split_forward_on_a_second_device(monkeypatch):
    """The split kernel's shared-memory limit is a device's attribute: a forward on device 1 after one on device 0
    (which raised it there) must raise it again (16 warps a sample need more than 48 KiB on every shape)."""
    import cupy as cp
    from dwdp_ops.coaction import coaction_forward_gpu

    monkeypatch.setenv("DWDP_COACTION_SPLIT", "16")
    spec = CoActionSpec(orders=4, order_independent=True, bias=True)
    ind, feed, mask = inputs(spec, 2, 2000, 5)
    want = reference(spec, ind, feed, mask)
    for dev in (0, 1):
        with cp.cuda.Device(dev):
            got = coaction_forward_gpu(cp.asarray(ind), cp.asarray(feed), cp.asarray(mask), spec).get()
        assert rel(got, want) <= 1e-5, dev
