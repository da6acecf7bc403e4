"""Padding ids at masked positions (CPU: the float64 reference; the GPU side is in tests/test_gpu_coaction.py)."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.coaction import CoActionSpec, coaction_backward, coaction_forward


def _case(seed=0, B=5, T=9, rows=7):
    rng = np.random.default_rng(seed)
    spec = CoActionSpec(bias=True)
    table = rng.normal(0, 0.3, (rows, spec.induction_dim))
    ftable = rng.normal(0, 0.6, (rows, spec.feed_dim))
    ids = rng.integers(0, rows, B)
    fids = rng.integers(0, rows, (B, T))
    mask = (rng.random((B, T)) < 0.6).astype(np.float32)
    mask[0] = 0  # an all-masked sample
    g = rng.normal(size=(B, spec.out_dim))
    return spec, table, ftable, ids, fids, mask, g


@pytest.mark.parametrize("pad", [-1, 10**9, np.iinfo(np.int64).min])
def test_feed_ids_at_masked_positions_may_hold_any_value(pad):
    """A masked position contributes nothing, so its feed id is neither checked nor read: padding with -1 (or any
    value) gives what padding with a valid id gives. It had been refused ("feed_ids must be in [0, rows)"), which
    made callers remap their padding first; an unmasked bad id is still refused."""
    spec, table, ftable, ids, fids, mask, g = _case()
    padded = np.where(mask != 0, fids, pad)
    want = coaction_forward(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids)
    got = coaction_forward(table, ftable, mask, spec, ind_ids=ids, feed_ids=padded)
    np.testing.assert_array_equal(got, want)
    for a, b in zip(coaction_backward(table, ftable, mask, g, spec, ind_ids=ids, feed_ids=padded),
                    coaction_backward(table, ftable, mask, g, spec, ind_ids=ids, feed_ids=fids)):
        np.testing.assert_array_equal(a, b)
    bad = padded.copy()
    bad[np.nonzero(mask)[0][0], np.nonzero(mask)[1][0]] = pad  # one unmasked position
    with pytest.raises(ValueError, match=r"feed_ids must be in \[0, 7\)"):
        coaction_forward(table, ftable, mask, spec, ind_ids=ids, feed_ids=bad)
    with pytest.raises(ValueError, match=r"ind_ids must be in \[0, 7\)"):  # induction ids are never masked
        coaction_forward(table, ftable, mask, spec, ind_ids=np.where(np.arange(5) == 0, -1, ids), feed_ids=padded)


@pytest.mark.parametrize("mask_dtype", ["<U1", object])
def test_a_mask_that_is_not_numbers_is_refused(mask_dtype):
    """The reference took a mask of any dtype: a string mask compared '0' != 0 and counted every position (no error,
    a wrong answer); the GPU ops take float32 or bool only. Numbers and booleans pass."""
    spec, table, ftable, ids, fids, mask, g = _case()
    bad = mask.astype(int).astype(str).astype(mask_dtype)
    with pytest.raises(TypeError, match=r"mask must be numbers or booleans"):
        coaction_forward(table, ftable, bad, spec, ind_ids=ids, feed_ids=fids)
    want = coaction_forward(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids)
    for ok in (mask.astype(bool), mask.astype(np.int8), mask.astype(np.float64)):
        np.testing.assert_array_equal(coaction_forward(table, ftable, ok, spec, ind_ids=ids, feed_ids=fids), want)


@pytest.mark.parametrize("mask_dtype", ["<U1", "datetime64[s]"])
def test_a_mask_that_is_not_numbers_is_named_beside_padded_feed_ids(mask_dtype):
    """With feed ids padded (-1 at masked positions) the reference read a string or datetime mask's values to pick the
    ids to range-check before it checked the mask's dtype: every position counted as present, and the error named the
    (valid) feed_ids, "feed_ids must be in [0, 7)". Now the mask is named, forward and backward."""
    spec, table, ftable, ids, fids, mask, g = _case()
    padded = np.where(mask != 0, fids, -1)
    bad = mask.astype(int).astype(mask_dtype)
    with pytest.raises(TypeError, match=r"mask must be numbers or booleans"):
        coaction_forward(table, ftable, bad, spec, ind_ids=ids, feed_ids=padded)
    with pytest.raises(TypeError, match=r"mask must be numbers or booleans"):
        coaction_backward(table, ftable, bad, g, spec, ind_ids=ids, feed_ids=padded)
