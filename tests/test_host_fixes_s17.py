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


def test_reference_moe_still_takes_nested_lists_and_an_array_of_ranks():
    """What worked stays: a rank's entry as nested lists (hidden states, ids), a stacked [N, ...] array as a
    sequence."""
    want = reference_moe([X, X], [IDS, IDS], [W, W], P2, identity)
    got = reference_moe([X.tolist(), X], [IDS.tolist(), IDS], np.stack([W, W]), P2, identity)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
