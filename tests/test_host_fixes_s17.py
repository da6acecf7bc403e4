"""CPU tests of two host-side fixes: ``reference_moe``'s check of every rank's inputs, and the simulator's bound on
an owner's pairs per token under extreme routing skew."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops import ExpertPartition
from dwdp_ops.dispatch_plan import reference_moe

# -- reference_moe: every rank's entry of the three per-rank sequences checked up front ------------------------------
P2 = ExpertPartition.disjoint(8, 2)
X = np.ones((1, 4), np.float32)
IDS = np.array([[0, 5]], np.int32)
W = np.ones((1, 2), np.float32)


def identity(rank, le, x):
    return x


class Opaque:
    """An object numpy can only hold as an object (no array interface)."""


def _args(which: str, bad) -> tuple[list, list, list]:
    xs, ids, ws = [X, X], [IDS, IDS], [W, W]
    {"xs_per_rank": xs, "ids_per_rank": ids, "w_per_rank": ws}[which][1] = bad
    return xs, ids, ws


EXPECTED = {"xs_per_rank": "a floating-point \\[T, H\\] array", "ids_per_rank": "an integer \\[T, k\\] array",
            "w_per_rank": "a float32 \\[T, k\\] array"}


@pytest.mark.parametrize("which", list(EXPECTED))
@pytest.mark.parametrize("bad, shown", [(None, "None \\(NoneType\\)"), (Opaque(), "\\(Opaque\\)"),
                                        ([None, None], "non-numeric objects")])
def test_reference_moe_names_a_rank_entry_that_is_not_an_array(which, bad, shown):
    """None (or an object numpy holds only as an object) as one rank's entry had been a dtype complaint about
    ``object`` for xs, a ValueError about "() tokens" for the ids, and for the weights plan_send's TypeError naming
    ``topk_weights`` but neither ``w_per_rank`` nor the rank. Now a TypeError naming the argument, the rank, what is
    expected and what was given, for each of the three sequences, before any planning."""
    with pytest.raises(TypeError, match=rf"^{which}\[1\] must be {EXPECTED[which]}.*got .*{shown}"):
        reference_moe(*_args(which, bad), P2, identity)


@pytest.mark.parametrize("which", list(EXPECTED))
def test_reference_moe_names_a_ragged_rank_entry(which):
    """A ragged nesting had reached the caller as numpy's own "inhomogeneous shape" ValueError, naming nothing."""
    ragged = [[1, 2], [3]]
    with pytest.raises(ValueError, match=rf"^{which}\[1\] must be {EXPECTED[which]}.*not one rectangular array"):
        reference_moe(*_args(which, ragged), P2, identity)


@pytest.mark.parametrize("which, bad, exc, match", [
    ("ids_per_rank", np.zeros((1, 2), np.float32), TypeError,
     r"^ids_per_rank\[1\] must be an integer \[T, k\] array \(rank 1's topk_ids\), got dtype float32"),
    ("w_per_rank", np.ones((1, 2), np.float64), TypeError,
     r"^w_per_rank\[1\]: rank 1's topk_weights must be float32 \(the contract's weight dtype\), got float64"),
    ("ids_per_rank", np.int32(3), ValueError,
     r"^ids_per_rank\[1\] must be an integer \[T, k\] array \(2-D\), got shape \(\)"),
    ("ids_per_rank", np.zeros((2, 2), np.int32), ValueError,
     r"^ids_per_rank\[1\] has 2 tokens \(rows\), xs_per_rank\[1\] has 1; expected one row per token"),
    ("w_per_rank", np.ones((1, 3), np.float32), ValueError,
     r"^w_per_rank\[1\] must have ids_per_rank\[1\]'s shape \(1, 2\), got \(1, 3\)"),
])
def test_reference_moe_names_the_rank_of_a_routing_array_of_a_wrong_dtype_or_shape(which, bad, exc, match):
    """The routing arrays' dtypes and shapes are checked with the hidden states', so the message names the rank."""
    with pytest.raises(exc, match=match):
        reference_moe(*_args(which, bad), P2, identity)


@pytest.mark.parametrize("which", list(EXPECTED))
@pytest.mark.parametrize("seq", [None, 3, iter([X, X])])
def test_reference_moe_names_a_per_rank_argument_that_is_not_a_sequence(which, seq):
    """None (or an iterator, an int) in place of a whole sequence had been Python's "has no len()"."""
    args = dict(zip(EXPECTED, ([X, X], [IDS, IDS], [W, W])))
    args[which] = seq
    with pytest.raises(TypeError, match=rf"^{which} must be a sequence of .*one per rank \(2\), got "):
        reference_moe(args["xs_per_rank"], args["ids_per_rank"], args["w_per_rank"], P2, identity)


@pytest.mark.parametrize("which", list(EXPECTED))
@pytest.mark.parametrize("keys", [("a", "b"), (1, 2), (0, 1)])
def test_reference_moe_refuses_a_dict_in_place_of_a_per_rank_sequence(which, keys):
    """A dict passed the "has __getitem__ and a length" test and was then indexed by rank: keys other than 0..N-1
    gave a bare ``KeyError: 0`` naming nothing. Now a TypeError naming the argument and the keys, whatever they are."""
    args = dict(zip(EXPECTED, ([X, X], [IDS, IDS], [W, W])))
    args[which] = dict(zip(keys, args[which]))
    with pytest.raises(TypeError, match=rf"^{which} must be a sequence of .*one per rank \(2\), got a dict with keys"):
        reference_moe(args["xs_per_rank"], args["ids_per_rank"], args["w_per_rank"], P2, identity)


def test_reference_moe_names_the_rank_whose_top_k_differs():
    """Ranks with different top_k reached plan_recv, whose ValueError named ``send_plans`` (an argument the caller
    never passed) and no rank. Now the check of the inputs names ``ids_per_rank[1]`` and both top_k."""
    ids1, w1 = np.array([[0, 5, 6]], np.int32), np.ones((1, 3), np.float32)
    with pytest.raises(ValueError, match=r"^ids_per_rank\[1\] has top_k=3 slots per token but ids_per_rank\[0\] has 2"):
        reference_moe([X, X], [IDS, ids1], [W, w1], P2, identity)


@pytest.mark.parametrize("expert_fn, storage, match", [
    (None, None, r"^expert_fn must be a callable .*got None \(NoneType\)"),
    ("identity", None, r"^expert_fn must be a callable .*got 'identity' \(str\)"),
    (identity, 3, r"^storage must be None or a callable .*got 3 \(int\)"),
])
def test_reference_moe_refuses_an_expert_fn_or_storage_that_is_not_callable(expert_fn, storage, match):
    """Had been Python's bare "'NoneType' object is not callable" from inside the combine loop."""
    with pytest.raises(TypeError, match=match):
        reference_moe([X, X], [IDS, IDS], [W, W], P2, expert_fn, storage=storage)


def test_reference_moe_still_takes_nested_lists_and_an_array_of_ranks():
    """What worked stays: a rank's entry as nested lists (hidden states, ids), a stacked [N, ...] array as a
    sequence."""
    want = reference_moe([X, X], [IDS, IDS], [W, W], P2, identity)
    got = reference_moe([X.tolist(), X], [IDS.tolist(), IDS], np.stack([W, W]), P2, identity)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


# -- the simulator: an owner's pairs per token never exceed min(k, c_r) ------------------------------------------------
SKEWS = [1.0, 1.5, 3.0, 10.0, 100.0, 1e4, 1e12]


def _loads(gpus: int, skew: float, hot: tuple[int, ...]) -> tuple[float, ...]:
    """``skew`` x the load of the other owners on the ``hot`` ones."""
    return tuple(skew if r in hot else 1.0 for r in range(gpus))


def _hot_sets(gpus: int) -> list[tuple[int, ...]]:
    return [(0,), (gpus - 1,), tuple(range(0, gpus, 7))[:max(1, gpus // 8)]]


@pytest.mark.parametrize("gpus", [2, 3, 8, 72])
@pytest.mark.parametrize("skew", SKEWS)
def test_owner_pairs_per_token_never_exceed_top_k_nor_the_owners_experts(gpus, skew):
    """A token's k expert ids are distinct, so an owner of c_r experts takes at most min(k, c_r) of its pairs:
    f_r k c_r / E <= min(k, c_r). owner_factors had scaled owner_load to the pairs without that bound, so at N = 72
    (c_r = 3 or 4 < k = 8) one owner at 100x the others took 4.68 pairs a token on 3 experts (at 10^4x, 7.94). Now an
    owner takes at most its bound and the excess goes to the others in proportion to their loads: the pairs stay
    T k (sum_r c_r f_r = E), always feasible since sum_r min(k, c_r) >= k."""
    from dwdp_ops.sim.model import SimConfig, dep_eplb, dep_expert_counts

    E, k = 256, 8
    home = dep_expert_counts(E, gpus)
    for hot in _hot_sets(gpus):
        load = _loads(gpus, skew, hot)
        cfg = SimConfig(gpus=gpus, owner_load=load)
        f = cfg.owner_factors()
        per_token = [x * k * c / E for x, c in zip(f, home)]
        assert all(p <= min(k, c) * (1 + 1e-12) for p, c in zip(per_token, home)), (hot, per_token)
        assert sum(per_token) == pytest.approx(k, rel=1e-12)  # conserved: T k pairs
        assert sum(x * c for x, c in zip(f, home)) == pytest.approx(E, rel=1e-12)
        # the owners below their bound keep owner_load's ratios among themselves
        free = [r for r in range(gpus) if per_token[r] < min(k, home[r]) * (1 - 1e-12)]
        for r in free:
            assert per_token[r] / per_token[free[0]] == pytest.approx(load[r] / load[free[0]], rel=1e-12)
        if len(free) == gpus:  # no bound reached: owner_load / sum(owner_load) of the pairs, as before
            assert per_token == pytest.approx([k * x / sum(load) for x in load], rel=1e-12)
        # EPLB's replicas keep the bound on the experts a rank's GEMMs run over (home + replicas)
        for R in (0, cfg.dep_redundant_experts(), 2 * gpus):
            e = dep_eplb(home, f, R)
            after = [g * c * k / E for g, c in zip(e["factor"], home)]
            assert sum(after) == pytest.approx(k, rel=1e-12)
            assert all(p <= min(k, n) * (1 + 1e-12) for p, n in zip(after, e["gemm_experts"])), (R, hot, after)


def test_an_extreme_owner_is_capped_at_its_experts_and_the_rest_go_to_the_others():
    """N = 72: owner 0 holds 3 experts (dep_expert_counts), so at 100x the others it takes 3 pairs a token (each of
    its experts once), not 4.68; the other 71 share the other 5 evenly. The cap is exact: f_0 = E / max(k, c_0)."""
    from dwdp_ops.sim.model import SimConfig, dep_expert_counts

    home = dep_expert_counts(256, 72)
    f = SimConfig(gpus=72, owner_load=_loads(72, 100.0, (0,))).owner_factors()
    assert home[0] == 3 and f[0] == 256 / 8
    rest = [x * c * 8 / 256 for x, c in zip(f[1:], home[1:])]
    assert rest == pytest.approx([5 / 71] * 71, rel=1e-12)


@pytest.mark.parametrize("gpus", [2, 3, 8, 72])
@pytest.mark.parametrize("skew", [10.0, 100.0])
@pytest.mark.parametrize("redundant", [0, None])
def test_simulated_dep_pairs_respect_the_bound_and_are_conserved(monkeypatch, gpus, skew, redundant):
    """What DEP's expert GEMMs are timed at, per iteration: sum over ranks == the tokens x k, and rank r's pairs <=
    min(k, its GEMM experts) x the tokens (with R = 0 its own c_r)."""
    from dwdp_ops.sim.costs import CostModel
    from dwdp_ops.sim.model import SimConfig, dep_eplb, dep_expert_counts, simulate

    calls = []
    real = CostModel.expert_ms

    def recording(self, pairs, experts):
        calls.append((pairs, experts))
        return real(self, pairs, experts)

    monkeypatch.setattr(CostModel, "expert_ms", recording)
    cfg = SimConfig(gpus=gpus, layers=4, ratio=0.8, max_tokens=8192, iterations=2, owner_load=_loads(gpus, skew, (0,)),
                    redundant_experts=redundant)
    res = simulate(cfg)
    N, it, k = gpus, cfg.iterations, 8
    dwdp, dep = calls[:N * it], calls[N * it:]
    assert len(dep) == N * it
    home = dep_expert_counts(256, N)
    e = dep_eplb(home, cfg.owner_factors(), cfg.dep_redundant_experts())
    for i in range(it):
        tokens = sum(dwdp[r * it + i][0] for r in range(N)) / k
        pairs = dep[i * N:(i + 1) * N]
        assert sum(p for p, _ in pairs) == pytest.approx(tokens * k, rel=1e-12)
        for r, (p, experts) in enumerate(pairs):
            assert experts == e["gemm_experts"][r]
            assert p <= min(k, experts) * tokens * (1 + 1e-12)
            if redundant == 0:
                assert p <= min(k, home[r]) * tokens * (1 + 1e-12)
    # the reported imbalance is the bounded one: at most min(k, c_r) / (k / N) (27 at N = 72, owner 0's 3 experts)
    mean = 8 / N
    assert res["model"]["dep_eplb"]["owner_pairs_max_over_mean"] <= max(min(8, c) for c in home) / mean * (1 + 1e-12)


def test_the_cap_conserves_the_pairs_when_the_others_loads_underflow_against_the_hot_ones():
    """Loads 1e300 against 1e-300: scaled to the hot owners' load the others' round to 0, so their share of the pairs
    left by the capped owners (3 + 4 of 8 a token) must come from their loads scaled among themselves."""
    from dwdp_ops.sim.model import SimConfig, dep_expert_counts

    home = dep_expert_counts(256, 72)
    f = SimConfig(gpus=72, owner_load=(1e300, 1e300) + (1e-300,) * 70).owner_factors()
    per_token = [x * 8 * c / 256 for x, c in zip(f, home)]
    assert per_token[:2] == [3.0, 4.0]
    assert per_token[2:] == pytest.approx([1 / 70] * 70, rel=1e-12)
    assert sum(per_token) == pytest.approx(8, rel=1e-12)
