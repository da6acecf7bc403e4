"""Review of the host logic of dispatch_plan, policy and TokenDispatcher's argument checks (CPU only): bad input that
had crashed deep inside (a bare IndexError, AttributeError, OverflowError or StopIteration) or given a silently wrong
answer now raises a TypeError / ValueError naming the argument and what is expected."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from dwdp_ops.dispatch_plan import plan_recv, plan_send, reference_moe
from dwdp_ops.partition import ExpertPartition
from dwdp_ops.policy import Rates, choose_mode, expected_distinct

P2 = ExpertPartition.disjoint(8, 2)
IDS = np.array([[0, 5], [7, -1]])
W = np.ones((2, 2), np.float32)
SENDS = [plan_send(IDS, W, P2, r, 4) for r in range(2)]


# -- SendPlan.rows_for / RecvPlan.rows_from -----------------------------------------------------------------------------
@pytest.mark.parametrize("d", [-1, 2, 10])
def test_rows_for_refuses_a_dest_outside_the_world(d):
    """rows_for(-1) returned the LAST dest's rows (numpy's negative index), silently, and rows_for(2) a bare
    IndexError; rows_from the same. ValueError naming the dest and the world now."""
    with pytest.raises(ValueError, match=r"d must be a rank in \[0, 2\)"):
        SENDS[0].rows_for(d)
    rp = plan_recv(SENDS, P2, 0)
    with pytest.raises(ValueError, match=r"s must be a rank in \[0, 2\)"):
        rp.rows_from(d)


@pytest.mark.parametrize("d", [1.0, True, "1", None])
def test_rows_for_refuses_a_dest_that_is_not_an_int(d):
    with pytest.raises(TypeError, match=r"d must be a rank in \[0, 2\)"):
        SENDS[0].rows_for(d)
    with pytest.raises(TypeError, match=r"s must be a rank in \[0, 2\)"):
        plan_recv(SENDS, P2, 0).rows_from(d)


def test_rows_for_takes_numpy_ints():
    assert SENDS[0].rows_for(np.int64(1)) == SENDS[0].rows_for(1)
    rp = plan_recv(SENDS, P2, 1)
    assert rp.rows_from(np.uint8(1)) == rp.rows_from(1)


# -- reference_moe's storage ------------------------------------------------------------------------------------------
def _moe(**kw):
    xs = [np.ones((2, 4), np.float32)] * 2
    return reference_moe(xs, [IDS] * 2, [W] * 2, P2, lambda r, le, x: x * (le + 1), **kw)


@pytest.mark.parametrize("storage", [lambda a: np.float32(0), lambda a: a[:1], lambda a: a.reshape(-1)],
                         ids=["scalar", "fewer-rows", "flat"])
def test_a_storage_of_another_shape_is_refused(storage):
    """A storage that returned a scalar made every output a 0-d scalar, one that dropped rows gave [1, H] outputs for
    T = 2 tokens, silently (broadcast into the grouped rows, returned as the result). ValueError naming storage."""
    with pytest.raises(ValueError, match=r"storage must return a float array of its argument's shape"):
        _moe(storage=storage)


def test_a_storage_returning_none_is_named():
    """storage returning None raised AttributeError: 'NoneType' object has no attribute 'astype'."""
    with pytest.raises(TypeError, match=r"storage must return a float array of its argument's shape"):
        _moe(storage=lambda a: None)


def test_a_good_storage_is_unchanged():
    out = _moe(storage=lambda a: a)
    assert [o.shape for o in out] == [(2, 4), (2, 4)] and all(o.dtype == np.float32 for o in out)
    np.testing.assert_array_equal(out[0], _moe()[0])


# -- policy: numbers beyond floats' range ---------------------------------------------------------------------------
ARGS = dict(tokens_per_rank=[1, 1], partition=P2, layout_bytes_per_expert=10**6, hidden=16, top_k=2)


@pytest.mark.parametrize("kwargs, name", [
    (dict(layout_bytes_per_expert=10**400), "layout_bytes_per_expert"),
    (dict(hidden=10**400), "hidden"),
    (dict(tokens_per_rank=[10**400, 1]), "tokens_per_rank"),
    (dict(param_bytes=10**400), "param_bytes"),
    (dict(token_bytes=10**400), "token_bytes"),
    (dict(fetch_bytes_per_expert=10**400), "fetch_bytes_per_expert"),
])
def test_choose_mode_sizes_beyond_floats_are_value_errors(kwargs, name):
    """An integer size beyond floats' range raised a bare OverflowError ('int too large to convert to float') from
    the rate model's arithmetic. ValueError naming the argument now."""
    with pytest.raises(ValueError, match=name):
        choose_mode(**{**ARGS, **kwargs})


def test_rates_beyond_floats_are_value_errors():
    """Rates(ce_gbps=10**400) raised OverflowError from math.isfinite."""
    with pytest.raises(ValueError, match=r"Rates.ce_gbps must be a finite number"):
        Rates(ce_gbps=10**400)


@pytest.mark.parametrize("tokens", [0, 1, [1, 0]])
def test_rates_giving_times_beyond_floats_are_refused(tokens):
    """A GEMM rate that passes Rates' check (finite, > 0) but is so small that a pair's time is inf: with a rank of
    0 tokens the cost was 0 * inf = NaN and choose_mode raised a bare StopIteration (no mode equals a NaN minimum);
    otherwise every cost was inf and the choice meaningless. ValueError naming the rates now."""
    tokens = tokens if isinstance(tokens, list) else [tokens, tokens]
    with pytest.raises(ValueError, match=r"beyond floats' range.*rates"):
        choose_mode(**{**ARGS, "tokens_per_rank": tokens}, rates=Rates(gemm_tflops=5e-324))


def test_expected_distinct_of_many_tokens():
    """expected_distinct(8, 2, 10**400) raised OverflowError; the value is E (every expert selected)."""
    assert expected_distinct(8, 2, 10**400) == 8.0
    assert expected_distinct(8, 2, 2**2000) == 8.0
    assert expected_distinct(8, 2, 10) == 8 * (1 - 0.75**10)


def test_expected_distinct_of_too_many_experts_is_named():
    with pytest.raises(ValueError, match="num_experts"):
        expected_distinct(10**400, 2, 10)


def test_finite_math_unchanged():
    assert math.isfinite(choose_mode(**ARGS).cost_us["dispatch"])


# -- TokenDispatcher's argument checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [(8, 2), None, "8x2"])
def test_token_dispatcher_refuses_a_partition_that_is_not_one(bad):
    """A partition that is not an ExpertPartition raised AttributeError ('tuple' object has no attribute
    'num_experts') from the top_k check. TypeError naming partition now, before any allocation."""
    pytest.importorskip("cupy")
    from dwdp_ops.dispatch import TokenDispatcher

    rt = SimpleNamespace(require=lambda what: None, world_size=lambda: 2, device=0)
    with pytest.raises(TypeError, match=r"TokenDispatcher: partition must be an ExpertPartition"):
        TokenDispatcher(bad, 64, 2, 16, num_sms=4, runtime=rt)


@pytest.mark.parametrize("result", ["abc", None, [["a"] * 4] * 2, np.ones((2, 4), np.complex64)],
                         ids=["str", "none", "strings", "complex"])
def test_an_expert_fn_result_that_is_not_real_numbers_is_named(result):
    """A string result raised numpy's bare "could not convert string to float: 'abc'", None became a NaN scalar
    (reported as 'returned shape ()'), and a complex result lost its imaginary part with only a ComplexWarning.
    TypeError naming expert_fn now."""
    xs = [np.ones((2, 4), np.float32)] * 2
    with pytest.raises(TypeError, match=r"^expert_fn\(0, 0, x \(2, 4\)\) must return a real \[n, H\] array"):
        reference_moe(xs, [IDS] * 2, [W] * 2, P2, lambda r, le, x: result)


@pytest.mark.parametrize("args, err, match", [
    (("P", 5, 2, 16), TypeError, "partition must be an ExpertPartition, got str"),
    ((None, 5, 2, 16), TypeError, "partition must be an ExpertPartition, got NoneType"),
    ((True, 2, 16), TypeError, r"max_tokens must be an int, got True"),
    ((5, 2.0, 16), TypeError, r"top_k must be an int, got 2.0"),
    ((-1, 2, 16), ValueError, r"max_tokens must be >= 0, got -1"),
    ((5, 0, 16), ValueError, r"top_k must be >= 1, got 0"),
    ((5, 2, 0), ValueError, r"align must be >= 1, got 0"),
])
def test_default_max_pairs_checks_its_arguments(args, err, match):
    """default_max_pairs (public) took anything: a str partition raised AttributeError, a negative max_tokens or
    align, or a bool, gave a silent number."""
    from dwdp_ops.dispatch_plan import default_max_pairs

    part = ExpertPartition.disjoint(8, 2)
    full = args if len(args) == 4 else (part, *args)
    with pytest.raises(err, match=rf"^default_max_pairs: {match}"):
        default_max_pairs(*full)
    assert default_max_pairs(part, np.int64(5), 2, 16) == 2 * 5 * 2 + 4 * 15


def test_a_default_max_pairs_past_the_int32_range_names_max_tokens_not_max_pairs():
    """With max_pairs not given and a huge max_tokens, the error said "max_pairs must be in [1, 2^31), got ..." for
    an argument the caller never passed; it now names the default's worst case and what to lower."""
    pytest.importorskip("cupy")
    from types import SimpleNamespace

    from dwdp_ops.dispatch import TokenDispatcher

    rt = SimpleNamespace(require=lambda what: None, world_size=lambda: 2, device=0)
    with pytest.raises(ValueError, match=r"the default max_pairs, the worst case .* is not below 2\^31; lower "
                                         r"max_tokens or pass a smaller max_pairs"):
        TokenDispatcher(ExpertPartition.disjoint(8, 2), 64, 2, 2**30, num_sms=4, runtime=rt)
