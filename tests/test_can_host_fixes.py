"""CAN on the host: ``auc`` without a Python loop over the samples."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from dwdp_ops.models.can_data import auc


# -------------------------------------------------------------------------------------------------------------- auc
def _auc_loop(label, score) -> float:
    """The straightforward average-rank Mann-Whitney AUC (the loop ``auc`` had): a run of equal scores shares the
    mean of its 1-based sorted positions."""
    pos = np.asarray(label) == 1
    score = np.asarray(score, np.float64)
    order = np.argsort(score, kind="mergesort")
    s, ranks = score[order], np.empty(len(score))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [2, 7, 100, None])  # (None: continuous scores, no ties)
def test_auc_equals_the_average_rank_loop_on_tied_scores(seed, levels):
    rng = np.random.default_rng(seed)
    n = 5000
    label = rng.random(n) < 0.3
    score = rng.random(n) if levels is None else rng.integers(0, levels, n) / levels
    score[:50] = np.inf  # equal infinities are one group too (inf - inf is NaN: not a boundary)
    score[50:100] = -0.0  # -0.0 == 0.0: one group with the zeros
    got, want = auc(label, score), _auc_loop(label, score)
    assert abs(got - want) < 1e-12, (got, want)
    if levels == 2:  # against the pair count as well (O(n_pos x n_neg), on a slice)
        y, s = label[:600], score[:600]
        pairs = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
        assert auc(y, s) == pytest.approx(pairs.mean(), abs=1e-12)


def _lines_run_in_auc(label, score) -> int:
    """How many Python lines ``auc`` itself executes on these inputs (its own frame, not numpy's)."""
    code, count = auc.__code__, [0]

    def tracer(frame, event, arg):
        if frame.f_code is not code:
            return None
        if event == "line":
            count[0] += 1
        return tracer

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        auc(label, score)
    finally:
        sys.settrace(old)
    return count[0]


def test_auc_runs_no_python_loop_over_the_samples():
    """The ranks of ties had been found in a Python while-loop over every sample (about 1 us each: seconds for the
    millions of a real test set). Timing-free: the lines auc executes do not grow with the sample count."""
    rng = np.random.default_rng(0)
    small = _lines_run_in_auc(rng.random(100) < 0.5, rng.random(100))
    large = _lines_run_in_auc(rng.random(20000) < 0.5, rng.random(20000))
    assert large == small < 100, (small, large)


def test_auc_of_two_million_samples():
    rng = np.random.default_rng(1)
    n = 2_000_000
    label = rng.random(n) < 0.2
    score = np.round(rng.random(n) + 0.2 * label, 3)  # many ties, a real signal
    t0 = time.perf_counter()
    got = auc(label, score)
    assert time.perf_counter() - t0 < 10  # (loose: about 0.5 s; the loop had taken several)
    assert 0.5 < got < 1
    # one permutation of the samples gives the same AUC (ranks follow the scores, not the positions)
    p = rng.permutation(n)
    assert auc(label[p], score[p]) == pytest.approx(got, abs=1e-12)


def test_auc_still_checks_its_inputs():
    for label, score, exc, match in [
        ([0, 2, 1, 0], [0.1, 0.9, 0.8, 0.7], ValueError, r"labels must be 0 or 1"),
        ([0, np.nan, 1, 0], [0.1, 0.9, 0.8, 0.7], ValueError, r"labels must be 0 or 1"),
        ([1, 1, 1], [0.1, 0.9, 0.8], ValueError, r"AUC needs both positive and negative labels"),
        ([0, 1, 0, 1], [0.1, np.nan, 0.8, 0.7], ValueError, r"scores must not be NaN"),
        ([0, 1, 0], [0.1, 0.9, 0.8, 0.7], ValueError, r"one score per label"),
        ([[0, 1], [1, 0]], [[0.1, 0.2], [0.3, 0.4]], ValueError, r"1-D labels"),
        (["0", "1"], [0.1, 0.9], TypeError, r"labels must be 0 / 1 numbers or booleans"),
        ([0, 1], ["0.1", "0.9"], TypeError, r"score must hold real numbers"),
    ]:
        with pytest.raises(exc, match=match):
            auc(label, score)
    assert auc([0, 1], [0.5, 0.5]) == 0.5 and auc([1, 0], [-np.inf, np.inf]) == 0.0
