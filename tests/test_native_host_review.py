"""Host-side (no GPU) review of ``dwdp_ops._C``'s checks and of ``_checks``: each test failed on the code before its
fix. Nothing here launches a kernel; the calls that would reach the CUDA runtime are only asked to refuse first."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops._checks import as_count, rank_counts
from dwdp_ops._native import native_or_reason

C, _why = native_or_reason()
needs_c = pytest.mark.skipif(C is None, reason=f"dwdp_ops._C unavailable: {_why}")

SPEC = ([16, 8], [8, 4], 2, True, False, False)  # din, dout, orders, bias, order_independent, paper


@needs_c
@pytest.mark.parametrize("counts", [(-1, 0), (0, -3), (-5, -5)])
def test_check_ids_refuses_a_negative_count(counts):
    """A negative n_ind / n_feed was "nothing to check": 0 (every id in range) for ids never read, no GPU asked."""
    n_ind, n_feed = counts
    with pytest.raises(ValueError, match="n_ind and n_feed"):
        C.coaction_check_ids(8, n_ind, 10, 8, n_feed, 10, 0)


@needs_c
@pytest.mark.parametrize("fn", ["quant_rows_bf16", "swiglu_quant_bf16"])
@pytest.mark.parametrize("rows", [2**63 - 1, 2**63 - 2])
def test_quant_rows_near_int64_max_are_too_many_rows(fn, rows):
    """(rows + rows_per_block - 1) wrapped to a negative block count, which passed the "too many rows" check and went
    on to the device (the launch's grid from a negative count)."""
    with pytest.raises(ValueError, match="too many rows"):
        getattr(C, fn)(16, 16, 8, 4, rows, 8, 0, 0)


@needs_c
@pytest.mark.parametrize("orders, dims", [(9, ([16, 8], [8, 4])), (0, ([16, 8], [8, 4])), (3, ([300, 8], [8, 4]))])
def test_specialized_query_checks_the_limits(orders, dims):
    """coaction_specialized answered False for a spec beyond the op's limits, where coaction_launch_shape,
    coaction_fast_path and coaction_split_warps raise naming the limit."""
    with pytest.raises(ValueError, match="orders must be|layer dims must be"):
        C.coaction_specialized(*dims, orders, True, False, False, False)


def test_uses_specialized_kernels_refuses_a_spec_beyond_the_limits():
    from dwdp_ops.coaction import CoActionSpec
    from dwdp_ops.coaction.fused import uses_specialized_kernels

    if C is None:
        pytest.skip(_why)
    with pytest.raises(ValueError, match=r"orders must be in \[1, 8\]"):
        uses_specialized_kernels(CoActionSpec(orders=9))


@needs_c
@pytest.mark.parametrize("query", ["coaction_launch_shape", "coaction_fast_path", "coaction_specialized"])
@pytest.mark.parametrize("flag", [2, None, 0.5, 1])
def test_shape_queries_take_only_bools_as_flags(query, flag):
    """backward=2, None or 0.5 had been converted to a flag (None: the forward) without a word."""
    with pytest.raises(TypeError, match="backward: bool"):
        getattr(C, query)(*SPEC, flag)
    with pytest.raises(TypeError):
        getattr(C, query)(SPEC[0], SPEC[1], SPEC[2], None, False, False, False)  # bias=None
    assert getattr(C, query)(*SPEC, np.bool_(True)) == getattr(C, query)(*SPEC, True)


@needs_c
def test_split_warps_flags_are_bools_and_arguments_named():
    assert C.coaction_split_warps(*SPEC, False, 4, 1, 100, 132, 0) >= 1
    with pytest.raises(TypeError, match="sms"):
        C.coaction_split_warps(*SPEC, 2, 4, 1, 100, 132, 0)


def _forward(bases, rows_per_shard, num_rows, zero_ptrs=(), zero_floats=()):
    # din, dout, orders, bias, oi, paper, dtype, B, T, bases, rows_per_shard, num_rows, ind_ids, feed, feed_ids,
    # feed_rows, mask, out, stream, check_ids, zero_ptrs, zero_floats
    return C.coaction_forward(*SPEC, 0, 1, 1, bases, rows_per_shard, num_rows, 16, 16, 0, 0, 16, 16, 0, False,
                              list(zero_ptrs), list(zero_floats))


@needs_c
def test_rows_check_does_not_wrap_rows_per_shard_times_shards():
    """num_rows <= rows_per_shard x shards was computed in int64: 2**61 rows a shard on 8 shards wrapped to 0 and
    refused a table of 5 rows. The check passes now; the call fails later, at the device (none here) or at the
    address 16, which is no device memory."""
    with pytest.raises((RuntimeError, ValueError)) as e:
        _forward([16] * 8, 2**61, 5)
    assert "num_rows" not in str(e.value)
    with pytest.raises(ValueError, match="num_rows"):  # a real excess is still refused
        _forward([16] * 2, 4, 9)


@needs_c
@pytest.mark.parametrize("count", [2**62, 2**63 - 1])
def test_forward_refuses_a_zero_count_whose_bytes_wrap(count):
    """zero_floats past 2**61 wrapped in the forward's sizeof(float) x count (the kernel / memset choice, the memset's
    size): refused by the binding, naming it."""
    with pytest.raises(ValueError, match="zero_floats"):
        _forward([16], 4, 4, [16], [count])


def test_as_count_refuses_bool_and_non_scalar_tensors():
    torch = pytest.importorskip("torch")
    assert as_count(torch.tensor(3)) == 3 and as_count(np.int64(3)) == 3 and as_count(np.array(5)) == 5
    assert as_count(torch.tensor(True)) is None  # "bools too": a bool tensor's __index__ had given 1
    assert as_count(torch.tensor([3])) is None  # "a 0-d integer tensor": [1] and [1, 1] had given their element
    assert as_count(torch.tensor([[4]])) is None
    with pytest.raises(ValueError, match="tokens_per_rank"):
        rank_counts("rows_for", torch.tensor([True, False]), 2)


@pytest.mark.parametrize("rank", [-1, 2, True, 1.0])
def test_rank_counts_refuses_a_rank_outside_the_world(rank):
    """rank=-1 had compared the last rank's entry (passing a list whose own entry differs), rank=world raised
    IndexError; the docstring promises a ValueError."""
    with pytest.raises(ValueError, match="rank must be an int in"):
        rank_counts("w", [1, 2], 2, rank=rank, tokens=2)
    assert rank_counts("w", [1, 2], 2, rank=1, tokens=2) == [1, 2]
