"""CAN on the host: ``auc`` without a Python loop over the samples, the DIEN loader reading its file once, and
``CanModel.loss_and_grads`` / ``train_step`` checking a batch's labels (shape and values) when called directly."""

from __future__ import annotations

import builtins
import sys
import time

import numpy as np
import pytest
from dwdp_ops.models import can as can_mod
from dwdp_ops.models import can_data
from dwdp_ops.models import train_can as train_mod
from dwdp_ops.models.can import CanConfig, CanModel
from dwdp_ops.models.can_data import auc, build_vocab, load_amazon_books, split, synthetic
from dwdp_ops.models.train_can import train


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


# ----------------------------------------------------------------------------------------------------- the loader
def _write(path, n=300, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        k = int(rng.integers(0, 6))
        items = [f"B{int(rng.zipf(1.5)) % 50}" for _ in range(k)]
        lines.append("\t".join([str(int(rng.random() < 0.4)), f"U{int(rng.integers(0, 30))}",
                                f"B{int(rng.zipf(1.5)) % 50}", f"C{int(rng.integers(0, 8))}",
                                "\x02".join(items), "\x02".join(f"C{len(x) % 8}" for x in items)]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def opens(monkeypatch):
    """The files that can_data opens, by name."""
    seen = []

    def counting_open(file, *a, **k):
        seen.append(str(file))
        return builtins.open(file, *a, **k)

    monkeypatch.setattr(can_data, "open", counting_open, raising=False)
    return seen


def test_load_amazon_books_reads_its_file_once(tmp_path, opens):
    """Without a vocabulary the file was parsed twice: once by build_vocab, once for the samples. Same data and
    vocabulary as build_vocab followed by a load with that vocabulary."""
    path = _write(tmp_path / "train")
    want_vocab = build_vocab(path)
    want, _ = load_amazon_books(path, want_vocab, max_len=4)
    opens.clear()
    got, vocab = load_amazon_books(path, max_len=4)
    assert opens == [str(path)]
    assert vocab == want_vocab and vocab.sizes == want_vocab.sizes
    for f in want.__dataclass_fields__:
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype, f
        np.testing.assert_array_equal(a, b, err_msg=f)
    opens.clear()
    load_amazon_books(path, vocab, max_len=4)  # (with a vocabulary: one read as before)
    build_vocab(path)
    assert opens == [str(path)] * 2


def test_a_bad_line_is_still_named_by_the_single_read(tmp_path, opens):
    p = tmp_path / "bad"
    p.write_text("1\tU1\tB1\tBooks\tB2\tBooks\nmaybe\tU1\tB1\tBooks\tB2\tBooks\n")
    with pytest.raises(ValueError, match=r"bad:2: label must be 0 or 1, got 'maybe'"):
        load_amazon_books(p)
    assert opens == [str(p)]


# --------------------------------------------------------------------------------------- labels of a direct step
def _batch(n=48, seed=0):
    data, tables = synthetic(n, seq_len=6, seed=seed)
    return type(data)(*(getattr(data, f).copy() for f in data.__dataclass_fields__)), tables


def _with_label(b, label):
    b.label = label  # (assigned after construction: Batchable's own shape check does not see it)
    return b


def _state(model):
    return model.opt.t, model.bn_mean.copy(), model.bn_var.copy(), {k: v.copy() for k, v in model.P.items()}


def _assert_unchanged(model, before):
    t, mean, var, P = before
    assert model.opt.t == t
    np.testing.assert_array_equal(model.bn_mean, mean)
    np.testing.assert_array_equal(model.bn_var, var)
    for k, v in P.items():
        np.testing.assert_array_equal(model.P[k], v, err_msg=k)


@pytest.mark.parametrize("call", ["train_step", "loss_and_grads"])
@pytest.mark.parametrize("edit, exc, match", [
    (lambda y: y.__setitem__(5, np.nan) or y, ValueError,
     r"^the training batch: labels must be finite numbers in \[0, 1\]: 1 of 48 are not \(the first nan at index 5\)"),
    (lambda y: y.__setitem__(7, np.inf) or y, ValueError, r"the first inf at index 7"),
    (lambda y: y.__setitem__(9, 2.0) or y, ValueError, r"1 of 48 are not \(the first 2\.0 at index 9\)"),
    (lambda y: y.__setitem__(0, -1.0) or y, ValueError, r"the first -1\.0 at index 0"),
    (lambda y: np.array(["0", "1"] * 24), TypeError,
     r"^the training batch: labels must be numbers in \[0, 1\] \(or booleans\), got <U1"),
    (lambda y: y[:, None], ValueError,
     r"^the training batch: label must be \[B\] = \[48\] \(one per sample: uid's length\), got shape \[48, 1\]"),
    (lambda y: y[:47], ValueError, r"label must be \[B\] = \[48\] .*got shape \[47\]"),
    (lambda y: y[:1], ValueError, r"label must be \[B\] = \[48\] .*got shape \[1\]"),
    (lambda y: y[:0], ValueError, r"label must be \[B\] = \[48\] .*got shape \[0\]"),
    (lambda y: np.float32(1), ValueError, r"label must be \[B\] = \[48\] .*got shape \[\]"),
], ids=["nan", "inf", "two", "minus-one", "strings", "Bx1", "B-1", "one", "none", "scalar"])
def test_a_direct_step_names_bad_labels_before_the_model_changes(call, edit, exc, match):
    """train() checked the training labels, but train_step / loss_and_grads called directly took anything: a NaN or
    infinite label gave a NaN loss and NaN weights after the step, a 2 or a -1 a loss without its minimum; labels of
    [B, 1] (or a single one) broadcast against the [B] logits into a [B, B] loss, silently wrong; another length
    failed in numpy's words."""
    b, tables = _batch()
    model = CanModel(CanConfig(tables))
    before = _state(model)
    bad = _with_label(b, edit(b.label.copy()))
    with pytest.raises(exc, match=match):
        getattr(model, call)(bad)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("call", ["train_step", "loss_and_grads"])
def test_a_direct_step_takes_0_1_soft_and_boolean_labels(call):
    """What train() accepts (soft labels in [0, 1], booleans, integers) a direct step accepts too."""
    b, tables = _batch()
    model = CanModel(CanConfig(tables))
    hard = b.label.copy()
    for label in (hard, np.where(hard > 0, 0.9, 0.1), hard > 0, hard.astype(np.int64), hard.tolist()):
        out = getattr(model, call)(_with_label(b, label))
        assert np.isfinite(out if call == "train_step" else out[0])


def test_check_false_skips_the_label_checks(monkeypatch):
    """check=False (train()'s steps, after its one check of the whole set) runs no label check: no per-batch host
    sync on the GPU. train() checks the training labels once, not at every step."""
    calls = []
    for name in ("check_labels", "check_label_shape"):
        real = getattr(can_mod, name)
        for mod in (can_mod, train_mod):
            monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name: (calls.append((_name, a[1])),
                                                                               _real(*a))[1])
    b, tables = _batch()
    model = CanModel(CanConfig(tables))
    model.train_step(b, check=False)
    model.loss_and_grads(b, check=False)
    assert calls == []
    nan = _with_label(b, np.where(np.arange(48) == 3, np.nan, b.label))
    assert np.isnan(model.loss_and_grads(nan, check=False)[0])  # (skipped: the caller's word that it was checked)
    model.train_step(_with_label(b, np.ones(48, np.float32)))
    assert calls == [("check_label_shape", "the training batch"), ("check_labels", "the training batch")]
    calls.clear()
    data, tables = synthetic(300, seq_len=6, seed=0)
    tr, te = split(data, 0.2, 0)
    train(CanModel(CanConfig(tables)), tr, te, 2, 16, 0, progress=False)
    assert calls == [("check_label_shape", "training set"), ("check_label_shape", "test set"),
                     ("check_labels", "training set")]


@pytest.mark.parametrize("which", ["train", "test"])
def test_train_names_labels_of_the_wrong_shape_before_training(which):
    """train()'s steps and evaluations pass check=False: it checks the sets' label shapes itself, once."""
    data, tables = synthetic(300, seq_len=6, seed=0)
    sets = dict(zip(("train", "test"), split(data, 0.2, 0)))
    n = len(sets[which].uid)
    sets[which].label = sets[which].label[:, None]
    model = CanModel(CanConfig(tables))
    name = "training" if which == "train" else "test"
    with pytest.raises(ValueError, match=rf"^{name} set: label must be \[B\] = \[{n}\] \(one per sample: uid's "
                                         rf"length\), got shape \[{n}, 1\]"):
        train(model, sets["train"], sets["test"], 1, 16, 0, progress=False)
    assert model.opt.t == 0
