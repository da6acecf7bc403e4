"""How many warps a sample the specialised co-action forward and backward take (``split_warps``): the launch's
pick, the ``DWDP_COACTION_SPLIT`` override and its errors. Host logic: no GPU needed (the GPU tests of the split kernel are in
test_gpu_coaction_split.py)."""

from __future__ import annotations

import pytest
from dwdp_ops.coaction import CoActionSpec
from dwdp_ops.coaction.fused import launch_shape, split_warps, uses_fast_kernels, uses_specialized_kernels

# The picks on an H200 (132 SMs), each the fastest K of 1-16 measured there (or within 1.1 % of it):
# docs/benchmarks.md, "Sixteenth session"; bench/results/coaction_split_H200.json.
H200 = [((1, 100), 4), ((64, 100), 4), ((256, 100), 4), ((1024, 100), 1), ((4096, 100), 1),
        ((1, 1000), 16), ((64, 1000), 16), ((256, 1000), 8), ((1024, 1000), 2), ((2048, 1000), 1),
        ((1, 2000), 16), ((256, 2000), 8), ((1024, 2000), 2),
        # the co-action benchmark's sizes all stay at one warp a sample
        ((1024, 50), 1), ((8192, 50), 1), ((8192, 100), 1), ((2048, 1000), 1), ((16384, 200), 1),
        # a sample of one chunk (T <= 32) is never split
        ((1, 1), 1), ((1, 32), 1), ((1, 33), 2)]


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv("DWDP_COACTION_SPLIT", raising=False)
    monkeypatch.delenv("DWDP_COACTION_SPECIALIZED", raising=False)


@pytest.mark.parametrize(("bt", "k"), H200, ids=[f"{b}x{t}" for (b, t), _ in H200])
def test_the_h200_picks(bt, k):
    B, T = bt
    assert split_warps(CoActionSpec(), B, T, 132) == k
    assert split_warps(CoActionSpec(), B, T, 132, "bfloat16") == k


@pytest.mark.parametrize("cfg", [dict(), dict(orders=4, order_independent=True, bias=True), dict(orders=1)], ids=str)
@pytest.mark.parametrize("sms", [1, 8, 132])
def test_a_pick_is_a_power_of_two_within_the_chunks_and_the_warp_budget(cfg, sms):
    spec = CoActionSpec(**cfg)
    for T in (1, 31, 64, 100, 500, 1000, 5000):
        for B in (1, 3, 100, 1000, 10_000):
            k = split_warps(spec, B, T, sms)
            chunks = -(-T // 32)
            assert k in (1, 2, 4, 8, 16) and k <= max(1, chunks), (B, T, k)
            assert k == 1 or B * k <= 16 * sms, (B, T, k)


def test_fewer_samples_or_longer_ones_never_take_fewer_warps():
    spec = CoActionSpec()
    for T in (50, 100, 300, 1000, 2000):
        ks = [split_warps(spec, B, T, 132) for B in (1, 2, 8, 32, 128, 512, 2048, 8192)]
        assert ks == sorted(ks, reverse=True), (T, ks)
    for B in (1, 64, 256, 1024):
        ks = [split_warps(spec, B, T, 132) for T in (32, 64, 128, 256, 512, 1024, 2048)]
        assert ks == sorted(ks), (B, ks)


@pytest.mark.parametrize("value", ["1", "2", "4", "8", "16"])
def test_the_override_forces_k(monkeypatch, value):
    monkeypatch.setenv("DWDP_COACTION_SPLIT", value)
    assert split_warps(CoActionSpec(), 8192, 100, 132) == int(value)
    assert split_warps(CoActionSpec(), 1, 1, 132) == int(value)  # forced even where segments are empty


@pytest.mark.parametrize("value", ["auto", ""])
def test_auto_or_empty_is_the_pick(monkeypatch, value):
    monkeypatch.setenv("DWDP_COACTION_SPLIT", value)
    assert split_warps(CoActionSpec(), 1, 2000, 132) == 16


@pytest.mark.parametrize("value", ["0", "3", "32", "-1", "two", " 4", "4.0"])
def test_a_bad_override_is_named(monkeypatch, value):
    monkeypatch.setenv("DWDP_COACTION_SPLIT", value)
    with pytest.raises(ValueError, match=r"DWDP_COACTION_SPLIT must be 'auto' or one of 1, 2, 4, 8, 16"):
        split_warps(CoActionSpec(), 1, 100, 132)


# A shape off the specialised kernels whose layers fit the general register path (padded widths <= 32), and one
# whose layers do not (the shared-memory fallback kernels, which keep one warp a sample).
GENERAL = [CoActionSpec(variant="paper", bias=True), CoActionSpec(layer_dims=((16, 8), (8, 8))),
           CoActionSpec(layer_dims=((24, 16), (16, 16), (16, 4)), orders=2, bias=True)]
WIDE32 = CoActionSpec(layer_dims=((32, 32), (32, 4)), orders=2)
FALLBACK = CoActionSpec(layer_dims=((16, 64), (64, 4)))


@pytest.mark.parametrize("backward", [False, True])
def test_the_general_register_path_splits_by_the_same_rule(backward, monkeypatch):
    for spec in GENERAL:
        assert not uses_specialized_kernels(spec, backward) and uses_fast_kernels(spec, backward)
        for (B, T), k in H200:
            kg = split_warps(spec, B, T, 132, backward=backward)
            assert kg == k or (kg < k and kg in (1, 2, 4, 8)), (spec, B, T, k, kg)  # fewer only where 16 do not fit
    monkeypatch.setenv("DWDP_COACTION_SPECIALIZED", "0")  # the CAN shape on the general kernels
    assert split_warps(CoActionSpec(), 1, 2000, 132, backward=backward) == 16
    assert split_warps(CoActionSpec(), 8192, 100, 132, backward=backward) == 1


@pytest.mark.parametrize("backward", [False, True])
def test_32_wide_layers_take_at_most_8_warps_a_sample(backward, monkeypatch):
    assert uses_fast_kernels(WIDE32, backward) and not uses_specialized_kernels(WIDE32, backward)
    assert split_warps(WIDE32, 1, 2000, 132, backward=backward) == 8
    monkeypatch.setenv("DWDP_COACTION_SPLIT", "16")
    assert split_warps(WIDE32, 1, 2000, 132, backward=backward) == 8  # forced past the kernel's bound: clamped


def test_the_fallback_kernels_are_zero(monkeypatch):
    assert not uses_fast_kernels(FALLBACK)
    assert split_warps(FALLBACK, 1, 2000, 132) == 0
    assert split_warps(FALLBACK, 1, 2000, 132, backward=True) == 0


@pytest.mark.parametrize(("kw", "exc", "match"), [
    (dict(B=0), ValueError, r"B must be in \[1, 2\*\*31\), got 0"), (dict(T=-1), ValueError, "T must be in"),
    (dict(sms=0), ValueError, "sms must be in"), (dict(B=2**31), ValueError, "B must be in"),
    (dict(T=1.5), TypeError, "T must be an integer, got float"), (dict(B=True), TypeError, "B must be an integer"),
    (dict(sms="132"), TypeError, "sms must be an integer"),
    (dict(dtype="float16"), ValueError, "dtype must be 'float32' or 'bfloat16'"),
])
def test_bad_arguments_are_named(kw, exc, match):
    args = dict(B=4, T=100, sms=132) | kw
    with pytest.raises(exc, match=match):
        split_warps(CoActionSpec(), **args)


@pytest.mark.parametrize("dtype", [["float32"], {"float32": 1}], ids=["list", "dict"])
def test_an_unhashable_dtype_is_named(dtype):
    """A dtype given as a list (or another unhashable object) had raised "unhashable type: 'list'" from the dict
    lookup, naming no argument, in split_warps and in the fused ops' checks; now the ValueError naming dtype."""
    import numpy as np
    from dwdp_ops.coaction import coaction_forward_gpu
    from dwdp_ops.interop import DeviceBuffer

    with pytest.raises(ValueError, match="dtype must be 'float32' or 'bfloat16'"):
        split_warps(CoActionSpec(), 4, 100, 132, dtype=dtype)
    a = DeviceBuffer(0x1000, (1, 1), np.dtype(np.float32), None)
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'bfloat16'"):
        coaction_forward_gpu(a, a, a, dtype=dtype, stream=0, check_ids=False)


def test_a_bad_override_is_read_by_the_general_kernels_but_not_the_fallback(monkeypatch):
    monkeypatch.setenv("DWDP_COACTION_SPLIT", "3")
    assert split_warps(FALLBACK, 1, 2000, 132) == 0
    with pytest.raises(ValueError, match="DWDP_COACTION_SPLIT must be"):
        split_warps(CoActionSpec(variant="paper", bias=True), 1, 2000, 132)


def test_picks_near_the_int32_limit_of_t():
    spec = CoActionSpec()
    for T in (2**31 - 129, 2**31 - 1):
        assert split_warps(spec, 1, T, 132) == 16
        assert split_warps(spec, 10_000, T, 132) == 1


@pytest.mark.parametrize("cfg", [dict(), dict(orders=4, order_independent=True, bias=True)], ids=str)
def test_the_backward_picks_by_the_same_rule_within_its_shared_memory(cfg, monkeypatch):
    spec = CoActionSpec(**cfg)
    for (B, T), k in H200:
        kb = split_warps(spec, B, T, 132, backward=True)
        assert kb == k or (kb < k and kb in (1, 2, 4, 8)), (B, T, k, kb)  # fewer only where 16 warps do not fit
    monkeypatch.setenv("DWDP_COACTION_SPLIT", "16")
    kb = split_warps(spec, 1, 2000, 132, backward=True)
    assert kb in (8, 16)
    if not cfg:
        assert kb == 16 and split_warps(spec, 1, 2000, 132, backward=False) == 16
    with pytest.raises(TypeError, match="backward must be a bool"):
        split_warps(spec, 1, 100, 132, backward=None)


# The 4-order order-independent backward with bias on an H200: an SM holds 10 of its warps in 2-warp blocks and 8 in
# 4- or 8-warp blocks (19 904 bytes of shared memory a warp), and its split takes at most 8 warps a sample (its
# registers). The measured fastest K (docs/benchmarks.md, "Seventeenth session"; before the residency entered the
# pick, it took K = 2 at 1024 x 1000, 1.48x slower than K = 1, and K = 8 at 256 x 1000, 1.25x slower than K = 4).
O4OI_BACKWARD = [((1, 100), 4), ((256, 100), 4), ((1024, 100), 1), ((1, 1000), 8), ((256, 1000), 4),
                 ((1024, 1000), 1), ((2048, 1000), 1), ((1, 2000), 8), ((256, 2000), 4), ((1024, 2000), 1)]


@pytest.mark.parametrize(("bt", "k"), O4OI_BACKWARD, ids=[f"{b}x{t}" for (b, t), _ in O4OI_BACKWARD])
def test_the_pick_keeps_a_split_grid_within_what_the_sms_hold(bt, k):
    spec = CoActionSpec(orders=4, order_independent=True, bias=True)
    B, T = bt
    assert split_warps(spec, B, T, 132, backward=True) == k
    assert split_warps(spec, B, T, 132, "bfloat16", backward=True) == k


@pytest.mark.parametrize("cfg", [dict(orders=4), dict(orders=4, order_independent=True, bias=True)], ids=str)
def test_the_four_order_backward_takes_at_most_8_warps_a_sample(cfg, monkeypatch):
    spec = CoActionSpec(**cfg)
    for B in (1, 16, 256):
        for T in (1000, 2000, 100_000):
            assert split_warps(spec, B, T, 132, backward=True) <= 8
    monkeypatch.setenv("DWDP_COACTION_SPLIT", "16")
    assert split_warps(spec, 1, 2000, 132, backward=True) == 8  # forced past its bound: clamped
    assert split_warps(spec, 1, 2000, 132, backward=False) == 16  # the forward keeps 16


@pytest.mark.parametrize("backward", [False, True])
def test_a_pick_exists_exactly_for_the_kernels_that_split(backward):
    """Over random shapes (1-4 layers of widths 1-48, 1-8 orders, bias, order independence, both variants):
    ``split_warps`` is 0 exactly where the launch takes the shared-memory fallback; otherwise, for one sample of
    100 000 positions, the most warps a block takes: as many as its shared memory holds (``launch_shape``), up to
    the kernel's bound (8 for the 4-order specialised backward and 32-wide general layers, else 16)."""
    import numpy as np

    rng = np.random.default_rng(17)
    seen = set()
    for _ in range(300):
        n = int(rng.integers(1, 5))
        widths = [int(w) for w in rng.integers(1, 49, n + 1)]
        spec = CoActionSpec(layer_dims=tuple(zip(widths[:-1], widths[1:], strict=True)),
                            orders=int(rng.integers(1, 9)), bias=bool(rng.integers(2)),
                            order_independent=bool(rng.integers(2)), variant=("code", "paper")[int(rng.integers(2))])
        k = split_warps(spec, 1, 100_000, 132, backward=backward)
        fast = uses_fast_kernels(spec, backward)
        seen.add((fast, uses_specialized_kernels(spec, backward)))
        if not fast:
            assert k == 0, spec
            continue
        warps, smem = launch_shape(spec, backward)
        per = smem // warps  # one warp's shared memory: a block of K warps takes K of it (and 128 bytes, backward)
        fit = max(c for c in (1, 2, 4, 8, 16) if c * per <= 227 * 1024 - (128 if backward else 0))
        bound = 8 if (not uses_specialized_kernels(spec, backward) and max(widths) > 16) or (
            uses_specialized_kernels(spec, backward) and backward and spec.orders == 4) else 16
        # one sample of 100 000 positions: the most warps its block takes
        assert k == min(fit, bound), (spec, k, fit, bound)
    assert (False, False) in seen and (True, False) in seen  # the fallback and the general kernels both drawn
