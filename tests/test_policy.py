"""The per-step mode rule (dwdp_ops.policy): each mode wins where the formulas say, the boundaries, ties, the
minimax over ranks, DeepSeek-R1 sizes, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dwdp_ops import ExpertPartition
from dwdp_ops.policy import MODES, ModeChoice, Rates, choose_mode, pair_shares

# DeepSeek-R1 MoE layer: 256 experts, hidden 7168, intermediate 2048, top-8; bf16 expert = 3 * H * I * 2 bytes
R1_BYTES = 3 * 7168 * 2048 * 2
R1_2 = ExpertPartition.disjoint(256, 2)


@pytest.mark.parametrize("tokens", [1, 8, 64, 128, 256])
def test_r1_decode_at_two_ranks_moves_tokens(tokens):
    c = choose_mode([tokens, tokens], R1_2, R1_BYTES, 7168, 8)
    assert c.mode == "dispatch", c.table()


@pytest.mark.parametrize("tokens", [32768, 65536])
def test_r1_large_prefill_at_two_ranks_moves_weights(tokens):
    c = choose_mode([tokens, tokens], R1_2, R1_BYTES, 7168, 8)
    assert c.mode == "prefetch_all", c.table()


def test_r1_uneven_decode_still_dispatch_and_table_prints():
    c = choose_mode([256, 3], R1_2, R1_BYTES, 7168, 8)
    assert c.mode == "dispatch"
    assert "<- chosen" in c.table() and set(c.cost_us) == set(MODES)


def test_costs_equal_the_formulas_by_hand():
    """Two ranks, two experts, one each, top-1: q = m = 1/2 per remote dest."""
    part = ExpertPartition.disjoint(2, 2)
    r = Rates(ce_gbps=100, sm_gbps=50, dispatch_gbps=10, dispatch_latency_us=7, gemm_tflops=1)
    X, H, T0, T1 = 10**6, 100, 40, 10
    c = choose_mode([T0, T1], part, X, H, 1, r, param_bytes=2, token_bytes=2, partial_bytes=4)
    pair = 2 * (X / 2) / 1e12
    fetch = X / 100e9
    for rank, T in enumerate((T0, T1)):
        assert c.per_rank_us["prefetch_all"][rank] == pytest.approx(max(T * pair, fetch) * 1e6)
        distinct = 2 * (1 - (1 - 1 / 2) ** T)
        assert c.per_rank_us["on_demand"][rank] == pytest.approx((T * pair + distinct / 2 * X / 50e9) * 1e6)
    for rank, (T, other) in enumerate(((T0, T1), (T1, T0))):
        rows = max(T, other) / 2
        work = (T + other) / 2 * pair
        want = 2 * 7e-6 + rows * (H * 2 + 8 + H * 4) / 10e9 + work
        assert c.per_rank_us["dispatch"][rank] == pytest.approx(want * 1e6)
    for m in MODES:
        assert c.cost_us[m] == max(c.per_rank_us[m])


def test_prefetch_overlap_boundary():
    """prefetch_all's exposed fetch is max(0, fetch - compute): flat up to T* = fetch / pair time, linear after."""
    part = ExpertPartition.disjoint(4, 2)
    X = 10**6
    r = Rates(ce_gbps=1, gemm_tflops=1)  # fetch = 2 X / 1e9 = 2 ms; pair = 2 * X / 2 / 1e12 = 1 us
    costs = {T: choose_mode([T, 0], part, X, 8, 1, r, allowed=("prefetch_all",)).cost_us["prefetch_all"]
             for T in (0, 1000, 2000, 2001, 4000)}
    assert costs[0] == costs[1000] == pytest.approx(2000.0)
    assert costs[2000] == pytest.approx(2000.0) and costs[2001] == pytest.approx(2001.0)
    assert costs[4000] == pytest.approx(4000.0)


def test_crossover_prefetch_all_dispatch_at_the_computed_token_count():
    """k = 1, E = 2 over 2 ranks, compute negligible: prefetch_all = X / B_ce; dispatch = 2 lat + T/2 * row / B_d.
    With X / B_ce = 1000 us, lat = 100 us, row = 2*100 + 8 + 4*100 = 608 bytes, B_d = 0.608 GB/s (1 us per row):
    T* = 2 * (1000 - 200) = 1600."""
    part = ExpertPartition.disjoint(2, 2)
    r = Rates(ce_gbps=1, dispatch_gbps=0.608, dispatch_latency_us=100, gemm_tflops=1e9)
    X = 10**6  # 1000 us at 1 GB/s

    def mode(T):
        return choose_mode([T, T], part, X, 100, 1, r, allowed=("prefetch_all", "dispatch")).mode

    assert mode(1598) == "dispatch" and mode(1602) == "prefetch_all"


def test_on_demand_wins_when_dispatch_latency_is_huge_and_few_tokens():
    r = Rates(dispatch_latency_us=1e6)
    c = choose_mode([1, 1], R1_2, R1_BYTES, 7168, 8, r)
    assert c.mode == "on_demand", c.table()
    # on demand fetches ~8 * 128/256 = 4 remote experts instead of 128
    assert c.cost_us["on_demand"] < c.cost_us["prefetch_all"] / 20


def test_ties_go_in_the_documented_order():
    one = ExpertPartition.disjoint(8, 1)  # nothing remote: prefetch_all == on_demand == compute
    c = choose_mode([100], one, 10**6, 16, 2, Rates(dispatch_latency_us=0))
    assert c.cost_us["prefetch_all"] == c.cost_us["on_demand"] and c.mode == "prefetch_all"
    c = choose_mode([100], one, 10**6, 16, 2, Rates(dispatch_latency_us=0), allowed=("dispatch", "on_demand"))
    assert c.cost_us["on_demand"] == c.cost_us["dispatch"] and c.mode == "on_demand"
    c = choose_mode([0, 0], R1_2, R1_BYTES, 7168, 8, Rates(dispatch_latency_us=0))
    assert c.cost_us["on_demand"] == c.cost_us["dispatch"] == 0 and c.mode == "on_demand"


def test_the_slowest_rank_decides():
    """Rank 1 has no tokens (on_demand costs it nothing) but rank 0's large batch decides for both."""
    c = choose_mode([32768, 0], R1_2, R1_BYTES, 7168, 8)
    best_alone = [min(MODES, key=lambda m, r=r: c.per_rank_us[m][r]) for r in range(2)]
    assert best_alone[1] == "on_demand"
    assert c.mode == min(MODES, key=lambda m: max(c.per_rank_us[m])) == best_alone[0]
    assert c.mode != "on_demand"


def test_allowed_forces_a_mode():
    c = choose_mode([1, 1], R1_2, R1_BYTES, 7168, 8, allowed=("prefetch_all",))
    assert c.mode == "prefetch_all" and set(c.cost_us) == {"prefetch_all"}
    assert isinstance(c, ModeChoice)


@pytest.mark.parametrize("part", [ExpertPartition.disjoint(16, 4), ExpertPartition(10, 3, 6, 2),
                                  ExpertPartition(9, 2, 6, 3)], ids=str)
def test_pair_shares_follow_the_owner_rule(part):
    import numpy as np
    from dwdp_ops.dispatch_plan import plan_send

    k = 2
    m = pair_shares(part, k)
    for s in range(part.world_size):
        assert sum(m[s]) == pytest.approx(k)
        # each expert on 12 consecutive tokens (12 is a multiple of every owner count here): the rotation (t + e)
        # visits each owner equally, so the empirical share equals m exactly
        ids = np.array([[e, -1] for e in range(part.num_experts) for _i in range(12)], np.int32)
        dest = plan_send(ids, np.ones(ids.shape, np.float32), part, s).dest[:, 0]
        for d in range(part.world_size):
            assert (dest == d).mean() * k == pytest.approx(m[s][d])


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(tokens_per_rank=[1]), ValueError, r"one count per rank .* \(2\), got 1"),
    (dict(tokens_per_rank=[1, -1]), ValueError, r"tokens_per_rank\[1\] must be an int >= 0, got -1$"),
    (dict(tokens_per_rank=[1, 2.5]), TypeError, r"tokens_per_rank\[1\] must be an int >= 0, got 2.5 \(float\)"),
    (dict(tokens_per_rank=[True, 1]), TypeError, r"tokens_per_rank\[0\] .* got True \(bool\)"),
    (dict(top_k=257), ValueError, r"^top_k must be in \[1, 256\] \(the layer's experts\), got 257$"),
    (dict(layout_bytes_per_expert=0), ValueError, r"^layout_bytes_per_expert must be an int >= 1, got 0$"),
    (dict(hidden=0), ValueError, r"^hidden must be an int >= 1, got 0$"),
    (dict(allowed=()), ValueError, r"^allowed must be a non-empty subset of .* without repeats, got \(\)$"),
    (dict(allowed=("prefetch_all", "fetch")), ValueError, r"non-empty subset .*, got \('prefetch_all', 'fetch'\)$"),
    (dict(rates=(370, 320)), TypeError, r"^rates must be a Rates, got tuple$"),
    (dict(partition=(256, 2)), TypeError, r"^partition must be an ExpertPartition, got tuple$"),
    (dict(param_bytes=0), ValueError, r"^param_bytes must be a number > 0, got 0$"),
])
def test_bad_input_is_named(kwargs, err, match):
    """Each refusal names the argument, what it must be and the value given (a bare argument name matched any
    message that mentioned it)."""
    args = dict(tokens_per_rank=[1, 1], partition=R1_2, layout_bytes_per_expert=R1_BYTES, hidden=7168, top_k=8)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        choose_mode(**args)


@pytest.mark.parametrize("field, value, err", [("ce_gbps", 0, ValueError), ("gemm_tflops", -1, ValueError),
                                               ("dispatch_latency_us", -1, ValueError),
                                               ("sm_gbps", math.inf, ValueError), ("gemm_tflops", math.nan, ValueError),
                                               ("dispatch_gbps", "300", TypeError), ("ce_gbps", True, TypeError)])
def test_bad_rates(field, value, err):
    with pytest.raises(err, match=f"Rates.{field}"):
        Rates(**{field: value})
    assert Rates(dispatch_latency_us=0).dispatch_latency_us == 0


def test_one_byte_weights_use_the_fp8_gemm_rate():
    """With 1-byte weights a pair is 2 X FLOP (X parameters) at ``fp8_gemm_tflops``, with 2-byte weights 2 X / 2 at
    ``gemm_tflops``; the fetch term depends on the bytes alone. Costs by hand."""
    part = ExpertPartition.disjoint(2, 2)
    X = 10**6  # bytes of one expert
    r = Rates(ce_gbps=1, gemm_tflops=1, fp8_gemm_tflops=4)
    bf16 = choose_mode([10, 10], part, X, 8, 1, r, ("prefetch_all",), param_bytes=2)
    fp8 = choose_mode([10, 10], part, X, 8, 1, r, ("prefetch_all",), param_bytes=1)
    # prefetch_all = max(gemm, fetch): fetch of one remote expert = X / 1e9 s = 1000 us in both;
    # gemm = T k 2 (X / pb) / C: bf16 10 * 2 * 5e5 / 1e12 = 10 us, fp8 10 * 2 * 1e6 / 4e12 = 5 us
    assert bf16.cost_us["prefetch_all"] == pytest.approx(1000.0)
    big = 10**6
    b = choose_mode([big, big], part, X, 8, 1, r, ("prefetch_all",), param_bytes=2).cost_us["prefetch_all"]
    f = choose_mode([big, big], part, X, 8, 1, r, ("prefetch_all",), param_bytes=1).cost_us["prefetch_all"]
    assert b == pytest.approx(big * 2 * 5e5 / 1e12 * 1e6) and f == pytest.approx(big * 2 * 1e6 / 4e12 * 1e6)
    assert fp8.cost_us["prefetch_all"] == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="fp8_gemm_tflops must be > 0"):
        Rates(fp8_gemm_tflops=0)


# -- review fixes: numpy numbers, argument types ------------------------------------------------------------------------
def test_numpy_numbers_are_accepted_and_give_the_same_choice():
    import numpy as np

    part = ExpertPartition(8, 2, 4, 4)
    want = choose_mode([5, 5], part, 1000, 16, 2)
    for args, kw in [((np.array([5, 5]), part, 1000, 16, 2), {}),
                     (([5, 5], part, np.int64(1000), np.int64(16), np.int32(2)), {}),
                     (([np.int64(5), 5], part, 1000, 16, 2), dict(param_bytes=np.float32(2), token_bytes=np.int64(2)))]:
        got = choose_mode(*args, **kw)
        assert (got.mode, got.cost_us, got.per_rank_us) == (want.mode, want.cost_us, want.per_rank_us)
    r = Rates(ce_gbps=np.float32(300), dispatch_latency_us=np.int64(80))
    assert r.ce_gbps == 300.0 and type(r.ce_gbps) is float and r == Rates(ce_gbps=300.0, dispatch_latency_us=80.0)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(hidden="16"), TypeError, r"hidden must be an int >= 1, got '16' \(str\)"),
    (dict(top_k=2.0), TypeError, r"top_k must be an int >= 1, got 2.0 \(float\)"),
    (dict(layout_bytes_per_expert=1e6), TypeError, r"layout_bytes_per_expert .* \(float\)"),
    (dict(token_bytes="2"), TypeError, r"token_bytes must be a number > 0, got '2' \(str\)"),
    (dict(partial_bytes=True), TypeError, r"partial_bytes .* got True \(bool\)"),
    (dict(partial_bytes=-4.0), ValueError, r"partial_bytes must be a number > 0, got -4.0"),
])
def test_a_wrong_type_is_a_type_error_and_a_bad_value_a_value_error(kwargs, err, match):
    args = dict(tokens_per_rank=[1, 1], partition=R1_2, layout_bytes_per_expert=R1_BYTES, hidden=7168, top_k=8)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        choose_mode(**args)


@pytest.mark.parametrize("args, err, match", [
    ((0, 1, 2), ValueError, r"num_experts must be an int >= 1, got 0"),
    ((8, 9, 1), ValueError, r"top_k must be in \[1, 8\] \(num_experts\), got 9"),
    ((8, 0, 1), ValueError, r"top_k must be an int >= 1, got 0"),
    ((8, 2, -1), ValueError, r"tokens must be an int >= 0, got -1"),
    ((8, 2, 2.5), TypeError, r"tokens must be an int >= 0, got 2.5 \(float\)"),
    ((8, "2", 2), TypeError, r"top_k .* got '2' \(str\)"),
    ((8.0, 2, 2), TypeError, r"num_experts .* got 8.0 \(float\)"),
])
def test_expected_distinct_names_the_bad_argument(args, err, match):
    from dwdp_ops.policy import expected_distinct

    with pytest.raises(err, match=match):
        expected_distinct(*args)


def test_expected_distinct_accepts_numpy_integers():
    import numpy as np
    from dwdp_ops.policy import expected_distinct

    assert expected_distinct(np.int64(256), np.int32(8), np.int64(7)) == expected_distinct(256, 8, 7)


@pytest.mark.parametrize("top_k, err, match", [
    (0, ValueError, r"top_k must be an int >= 1, got 0"),
    (9, ValueError, r"top_k must be in \[1, 8\] \(the partition's experts\), got 9"),
    (99, ValueError, r"got 99"),
    (2.0, TypeError, r"top_k .* \(float\)"),
])
def test_pair_shares_needs_top_k_in_range(top_k, err, match):
    with pytest.raises(err, match=match):
        pair_shares(ExpertPartition(8, 2, 4, 4), top_k)
    with pytest.raises(TypeError, match="partition must be an ExpertPartition"):
        pair_shares((8, 2, 4, 4), 2)


def test_the_prefetch_estimate_moves_the_padded_stride():
    """The copy-engine prefetch moves ``expert_stride`` bytes per expert (the store's fetch runs), not
    ``expert_bytes``: a padded shape's prefetch_all cost grows by its inflation; the GEMM and on-demand terms do not."""
    from dwdp_ops.layout import ExpertLayout

    lay = ExpertLayout.moe(256, 128, "float16")
    assert lay.expert_stride > lay.expert_bytes  # padded
    p = ExpertPartition.disjoint(8, 2)
    args = ([1, 1], p, lay.expert_bytes, 256, 2)
    plain = choose_mode(*args, allowed=("prefetch_all", "on_demand"))
    padded = choose_mode(*args, allowed=("prefetch_all", "on_demand"), fetch_bytes_per_expert=lay.expert_stride)
    ratio = padded.per_rank_us["prefetch_all"][0] / plain.per_rank_us["prefetch_all"][0]
    assert ratio == pytest.approx(lay.expert_stride / lay.expert_bytes)
    assert padded.per_rank_us["on_demand"] == plain.per_rank_us["on_demand"]
    with pytest.raises(ValueError, match="fetch_bytes_per_expert must be an int >= "):
        choose_mode(*args, fetch_bytes_per_expert=lay.expert_bytes - 1)


@pytest.mark.parametrize("name", ["param_bytes", "token_bytes", "partial_bytes"])
def test_an_infinite_size_is_refused(name):
    """param_bytes=inf passed the '> 0' check and made every GEMM free (prefetch_all's cost became the bare fetch);
    an infinite token or partial size made dispatch cost inf. Each is now a ValueError naming it."""
    args = dict(tokens_per_rank=[1, 1], partition=R1_2, layout_bytes_per_expert=R1_BYTES, hidden=7168, top_k=8)
    with pytest.raises(ValueError, match=rf"{name} must be a finite number > 0, got inf"):
        choose_mode(**args, **{name: math.inf})


def test_allowed_given_as_one_string_is_named():
    """allowed='dispatch' was read as the letters ('d', 'i', ...) and the error listed them."""
    args = dict(tokens_per_rank=[1, 1], partition=R1_2, layout_bytes_per_expert=R1_BYTES, hidden=7168, top_k=8)
    with pytest.raises(ValueError, match=r"allowed must be a sequence of mode names, got the string 'dispatch' "
                                         r"\(write \('dispatch',\)\)"):
        choose_mode(**args, allowed="dispatch")


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(tokens_per_rank=5), TypeError, r"^tokens_per_rank must be a sequence of one count per rank, in rank order "
                                         r"\(a list, tuple or 1-D array\), got 5 \(int\)$"),
    (dict(tokens_per_rank=np.array(5)), TypeError, r"^tokens_per_rank must be a sequence .*, got array\(5\)"),
    (dict(tokens_per_rank={0: 5, 1: 7}), TypeError, r"^tokens_per_rank must be a sequence .*, got a dict: \{0: 5"),
    (dict(tokens_per_rank={5, 7}), TypeError, r"^tokens_per_rank must be a sequence .*, got a set"),
    (dict(allowed=None), TypeError, r"^allowed must be a sequence of mode names from \('prefetch_all', .*\), "
                                    r"got None \(NoneType\)$"),
])
def test_tokens_and_allowed_that_are_not_sequences_are_named(kwargs, err, match):
    """A count (tokens_per_rank=5) or allowed=None raised list()'s "'int' object is not iterable", naming nothing; a
    {rank: T} dict was read as its keys, so {0: 5, 1: 7} planned for T = [0, 1] silently."""
    args = dict(tokens_per_rank=[1, 1], partition=R1_2, layout_bytes_per_expert=R1_BYTES, hidden=7168, top_k=8)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        choose_mode(**args)
    args["tokens_per_rank"] = np.array([5, 7])
    assert choose_mode(**{**args, "allowed": MODES}) == choose_mode(**{**args, "tokens_per_rank": (5, 7), "allowed": MODES})
