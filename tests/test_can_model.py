"""CAN-DNN on the CPU: data format, synthetic generator, AUC, the model's gradients, and that co-action helps."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.coaction import CoActionSpec
from dwdp_ops.models.can import CanConfig, CanModel
from dwdp_ops.models.can_data import auc, build_vocab, load_amazon_books, split, synthetic
from dwdp_ops.models.train_can import train

FIXTURE = [
    ("1", "U1", "B3", "Books", ["B1", "B2"], ["Books", "Fiction"]),
    ("0", "U1", "B9", "Fiction", ["B1", "B2"], ["Books", "Fiction"]),
    ("1", "U2", "B2", "Fiction", ["B1", "B4", "B3"], ["Books", "Books", "Books"]),
    ("0", "U3", "B7", "Poetry", ["B2"], ["Fiction"]),
]


def write_fixture(path, rows=FIXTURE):
    with open(path, "w", encoding="utf-8") as f:
        for label, u, m, c, hm, hc in rows:
            f.write("\t".join([label, u, m, c, "\x02".join(hm), "\x02".join(hc)]) + "\n")
    return path


def test_amazon_books_format(tmp_path):
    path = write_fixture(tmp_path / "local_train_splitByUser")
    data, vocab = load_amazon_books(path, max_len=2)
    assert len(data) == 4 and vocab.sizes == (4, 7, 4)
    assert vocab.mid["B2"] == 1  # most frequent first (B2 appears 4 times), id 0 is padding
    np.testing.assert_array_equal(data.label, [1, 0, 1, 0])
    # the most recent max_len behaviours are kept, in order
    assert list(data.hist_mid[2]) == [vocab.mid["B4"], vocab.mid["B3"]]
    np.testing.assert_array_equal(data.mask[3], [1, 0])
    assert data.hist_mid[3, 1] == 0
    test_path = write_fixture(tmp_path / "local_test_splitByUser", [("1", "U9", "B404", "Books", ["B1"], ["Books"])])
    test, _ = load_amazon_books(test_path, vocab, max_len=2)
    assert test.uid[0] == 0 and test.mid[0] == 0 and test.cat[0] == vocab.cat["Books"]  # unseen ids map to 0


@pytest.mark.parametrize(
    "line, match",
    [("1\tU1\tB1\tBooks\tB2", "expected 6 tab-separated fields"),
     ("1\tU1\tB1\tBooks\tB2\x02B3\tBooks", "item history has 2 entries but category history 1"),
     ("yes\tU1\tB1\tBooks\tB2\tBooks", "label must be 0 or 1")],
)
def test_bad_lines_are_named(tmp_path, line, match):
    p = tmp_path / "bad"
    p.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        build_vocab(p)


def test_auc_matches_the_pair_count():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = np.round(rng.random(300), 2)  # ties included
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in s[y] for b in s[~y]]
    assert auc(y, s) == pytest.approx(np.mean(pairs))
    with pytest.raises(ValueError, match="both positive and negative"):
        auc(np.ones(3), np.arange(3))


def test_synthetic_is_deterministic_and_balanced():
    a, tables = synthetic(2000, seed=4)
    b, _ = synthetic(2000, seed=4)
    np.testing.assert_array_equal(a.label, b.label)
    assert 0.3 < a.label.mean() < 0.7 and tables == (501, 401, 21)
    assert np.all(a.hist_mid[a.mask == 0] == 0)
    tr, te = split(a, 0.25, 0)
    assert len(tr) == 1500 and len(te) == 500


def _tiny_model(use_coaction):
    cfg = CanConfig((5, 7, 4), use_coaction=use_coaction, coaction=CoActionSpec(((4, 3), (3, 2)), 2, True),
                    hidden=(6, 5), seed=1)
    m = CanModel(cfg)
    for k, v in m.P.items():
        if k.endswith("_feed"):
            m.P[k] = np.random.default_rng(2).normal(0, 0.5, v.shape)  # feed dim 4 from the tiny spec
    return m


@pytest.mark.parametrize("use_coaction", [True, False])
def test_model_gradients_match_finite_differences(use_coaction):
    data, _ = synthetic(12, n_users=4, n_items=6, n_cats=3, seq_len=5, seed=3)
    model = _tiny_model(use_coaction)
    _, grads = model.loss_and_grads(data)
    rng = np.random.default_rng(0)
    for name, p in model.P.items():
        for _ in range(4):
            idx = tuple(rng.integers(0, s) for s in p.shape)
            old = p[idx]
            p[idx] = old + 1e-6
            up, _ = model.loss_and_grads(data)
            p[idx] = old - 1e-6
            down, _ = model.loss_and_grads(data)
            p[idx] = old
            assert grads[name][idx] == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-9), name


@pytest.mark.timeout(600)
def test_coaction_beats_the_dnn_on_a_planted_interaction():
    data, tables = synthetic(10000, seed=1, strength=4.0)
    tr, te = split(data, 0.25, 1)
    aucs = {}
    for use in (True, False):
        model = CanModel(CanConfig(tables, use_coaction=use, seed=1, lr=2e-3))
        aucs[use] = train(model, tr, te, epochs=2, batch_size=128, seed=1, progress=False)[-1]["test_auc"]
    assert aucs[True] > aucs[False] + 0.02, aucs


def test_auc_refuses_nan_scores_and_mismatched_lengths():
    """A NaN score used to get a rank of its own (AUC 0.75 for [nan, .5, .2, nan]); mismatched lengths raised numpy's
    boolean-index IndexError."""
    with pytest.raises(ValueError, match=r"scores must not be NaN \(2 of 4 are\)"):
        auc([0, 1, 0, 1], [np.nan, 0.5, 0.2, np.nan])
    with pytest.raises(ValueError, match=r"one score per label: got 3 labels and 4 scores"):
        auc([0, 1, 0], [0.1, 0.5, 0.2, 0.3])
    assert auc([0, 1], [-np.inf, np.inf]) == 1.0  # infinities still order


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_batches_refuse_a_batch_size_that_is_not_a_positive_integer(bad, exc):
    """batches(-3) yielded nothing (predict then failed in concatenate, training would do no step), batches(0) raised
    range()'s 'arg 3 must not be zero', batches(True) gave batches of one."""
    data, _ = synthetic(10)
    with pytest.raises(exc, match=r"batch_size must be an integer >= 1"):
        list(data.batches(bad))
    assert [len(b) for b in data.batches(np.int64(4))] == [4, 4, 2]


@pytest.mark.parametrize("kw, exc, match", [
    ({"n_cats": 0}, ValueError, r"n_cats must be an integer >= 1, got 0"),
    ({"seq_len": 0}, ValueError, r"seq_len must be an integer >= 1, got 0"),
    ({"n": -1}, ValueError, r"n must be an integer >= 0, got -1"),
    ({"n_items": 7.5}, TypeError, r"n_items must be an integer >= 1, got 7.5"),
    ({"n_users": True}, TypeError, r"n_users must be an integer >= 1, got True"),
    ({"strength": float("nan")}, ValueError, r"strength must be a finite number, got nan"),
])
def test_synthetic_names_a_bad_argument(kw, exc, match):
    """These raised numpy's 'low >= high' / 'negative dimensions', or (floats, bools, a NaN strength: every label 0)
    went through."""
    with pytest.raises(exc, match=match):
        synthetic(**{"n": 10, **kw})


@pytest.mark.parametrize("bad, exc", [(2.5, TypeError), (True, TypeError), (0, ValueError)])
def test_load_amazon_books_names_a_bad_max_len(tmp_path, bad, exc):
    path = write_fixture(tmp_path / "train")
    with pytest.raises(exc, match=r"max_len must be an integer >= 1"):
        load_amazon_books(path, max_len=bad)


def _rows(data, n):
    return type(data)(*(getattr(data, f)[:n] for f in data.__dataclass_fields__))


def test_train_refuses_an_empty_training_set():
    """No batch meant no step: the epoch's loss was nan (numpy's mean of nothing) and the untrained model's AUC was
    reported as the result."""
    data, tables = synthetic(200, seed=0)
    tr, te = split(data, 0.25, 0)
    with pytest.raises(ValueError, match=r"the training set is empty"):
        train(CanModel(CanConfig(tables)), _rows(tr, 0), te, 1, 16, 0, progress=False)


def test_predict_of_no_sample_is_empty():
    """``predict`` of an empty set (a direct call: ``train`` refuses an empty training set) had raised numpy's
    'need at least one array to concatenate'; it gives no probability."""
    data, tables = synthetic(50, seed=0)
    model = CanModel(CanConfig(tables))
    p = model.predict(_rows(data, 0))
    assert isinstance(p, np.ndarray) and p.shape == (0,)
    assert model.predict(_rows(data, 3)).shape == (3,)


@pytest.mark.parametrize("which", ["train", "test"])
def test_train_names_ids_beyond_the_model_tables(which):
    """Data from a larger vocabulary than the model's tables: numpy's IndexError named no table on the CPU (and the
    GPU kernels, called with check_ids=False, would read out of bounds)."""
    data, tables = synthetic(200, seed=0)
    tr, te = split(data, 0.25, 0)
    small = (tables[0], 5, tables[2])
    model = CanModel(CanConfig(small))
    ok = type(data)(*(np.minimum(getattr(tr if which == "test" else te, f), 4) if f in ("mid", "hist_mid")
                      else getattr(tr if which == "test" else te, f) for f in data.__dataclass_fields__))
    args = (ok, te) if which == "test" else (tr, ok)
    with pytest.raises(ValueError, match=rf"{which} set: item ids \(mid, hist_mid\) reach \d+ but the model's item "
                                         r"table has 5 rows \(CanConfig.tables\[1\]\)"):
        train(model, *args, 1, 16, 0, progress=False)


@pytest.mark.parametrize("kw, exc, match", [
    ({"tables": (10, 10)}, ValueError, r"tables must be three table sizes \(users, items, categories\), got \(10, 10\)"),
    ({"tables": (10, 0, 3)}, ValueError, r"tables\[1\] must be an integer >= 1, got 0"),
    ({"tables": (10, 4.5, 3)}, TypeError, r"tables\[1\] must be an integer >= 1, got 4.5"),
    ({"hidden": (0,)}, ValueError, r"hidden\[0\] must be an integer >= 1, got 0"),
    ({"lr": float("nan")}, ValueError, r"lr must be a finite number > 0, got nan"),
    ({"lr": -1e-3}, ValueError, r"lr must be a finite number > 0, got -0.001"),
])
def test_can_model_names_a_bad_config(kw, exc, match):
    """Two table sizes raised 'not enough values to unpack', a hidden width 0 a ZeroDivisionError at the first step,
    a NaN learning rate made every weight NaN at the first step (reported later as a diverging loss) and a negative
    one ascended the loss."""
    with pytest.raises(exc, match=match):
        CanModel(CanConfig(**{"tables": (10, 10, 3), **kw}))
    CanModel(CanConfig((np.int64(10), 10, 3), hidden=(np.int32(8),)))  # numpy integers pass


@pytest.mark.parametrize("kw, exc, match", [
    ({"use_coaction": "no"}, TypeError, r"use_coaction must be a bool, got 'no' \(str\)"),
    ({"use_coaction": 0}, TypeError, r"use_coaction must be a bool, got 0 \(int\)"),
    ({"coaction": ((16, 8), (8, 4))}, TypeError, r"coaction must be a CoActionSpec, got \(\(16, 8\), \(8, 4\)\)"),
    ({"hidden": 200}, TypeError, r"hidden must be a sequence of hidden layer widths \(a tuple, a list or a 1-D numpy "
                                 r"array\), got 200 \(int\)"),
    ({"tables": 500}, TypeError, r"tables must be three table sizes \(users, items, categories\) \(a tuple"),
    ({"seed": None}, TypeError, r"seed must be an integer >= 0, got None"),
    ({"seed": True}, TypeError, r"seed must be an integer >= 0, got True"),
    ({"seed": 1.5}, TypeError, r"seed must be an integer >= 0, got 1.5"),
    ({"seed": -1}, ValueError, r"seed must be an integer >= 0, got -1"),
    ({"device": None}, TypeError, r"device must be 'cpu' or 'gpu', got None \(NoneType\)"),
])
def test_can_model_names_a_config_field_of_the_wrong_kind(kw, exc, match):
    """use_coaction='no' (truthy) had built CAN-DNN, a seed of None drew fresh entropy (no two models alike) and True
    was seed 1; a tuple for coaction, an int for hidden, a float or negative seed failed inside with messages naming
    no field ('tuple' object has no attribute 'induction_dim', 'int' object is not iterable, numpy's 'expected
    non-negative integer'); device=None was a ValueError. A 1-D numpy array of table sizes had been refused as 'not
    three table sizes'; it passes, as do numpy bools and integers."""
    with pytest.raises(exc, match=match):
        CanModel(CanConfig(**{"tables": (10, 10, 3), **kw}))
    model = CanModel(CanConfig(np.array([10, 10, 3]), use_coaction=np.bool_(False), seed=np.int64(3)))
    assert model.predict(synthetic(5, n_users=9, n_items=9, n_cats=2)[0]).shape == (5,)


@pytest.mark.parametrize("bad, exc", [("0.2", TypeError), (True, TypeError), (None, TypeError), (1.0, ValueError)])
def test_split_names_a_bad_test_fraction(bad, exc):
    """split's test_fraction had not been type-checked: a string failed in a bare comparison TypeError naming
    nothing, True (1) in the range check as 'got True'."""
    data, _ = synthetic(50, seed=0)
    with pytest.raises(exc, match=r"test_fraction must be"):
        split(data, bad)
    tr, te = split(data, np.float32(0.2))
    assert len(tr) + len(te) == 50


def test_a_training_step_on_no_sample_is_refused_before_the_model_changes():
    """An empty batch's BatchNorm mean and variance are NaN: train_step returned a NaN loss and made the running
    statistics NaN, so every later prediction was NaN (evaluate then failed on 'scores must not be NaN')."""
    data, tables = synthetic(60, seed=0)
    model = CanModel(CanConfig(tables))
    before = model.predict(data)
    with pytest.raises(ValueError, match=r"a training batch needs at least one sample"):
        model.train_step(_rows(data, 0))
    assert model.opt.t == 0 and np.isfinite(model.bn_mean).all() and np.isfinite(model.bn_var).all()
    np.testing.assert_array_equal(model.predict(data), before)
    assert np.isfinite(model.train_step(_rows(data, 1)))  # one sample is a batch (its variance is 0)


@pytest.mark.parametrize("call", ["predict", "evaluate", "train_step", "loss_and_grads"])
@pytest.mark.parametrize("field, value, match", [
    ("mid", -1, r"item ids \(mid, hist_mid\) reach -1 but the model's item table has 401 rows"),
    ("hist_cat", 21, r"category ids \(cat, hist_cat\) reach 21 but the model's category table has 21 rows"),
    ("uid", 10**6, r"user ids \(uid\) reach 1000000 but the model's user table has 501 rows"),
])
def test_the_model_names_ids_beyond_its_tables(call, field, value, match):
    """Only train() checked ids: predict / evaluate / train_step on the CPU took a negative id as a row from the end
    (a silent wrong answer) and a large one as numpy's IndexError naming no table; on the GPU the fused kernels,
    called with check_ids=False, would have read out of bounds. A refused training step changes nothing."""
    data, tables = synthetic(40, seed=0)
    model = CanModel(CanConfig(tables))
    bad = type(data)(*(getattr(data, f).copy() for f in data.__dataclass_fields__))
    getattr(bad, field)[3] = value
    with pytest.raises(ValueError, match=match):
        getattr(model, call)(bad)
    assert model.opt.t == 0
    with pytest.raises(TypeError, match=r"mid must hold integer ids, got float64"):
        getattr(model, call)(type(data)(*(getattr(data, f).astype(float) if f == "mid" else getattr(data, f)
                                          for f in data.__dataclass_fields__)))


@pytest.mark.parametrize("bad, exc", [(None, TypeError), (True, TypeError), (1.5, TypeError), ("7", TypeError),
                                      (-1, ValueError)])
@pytest.mark.parametrize("call", ["synthetic", "split", "train"])
def test_a_seed_that_is_not_an_integer_at_least_0_is_named(call, bad, exc):
    """A seed of None drew fresh entropy (other data, another split or other shuffles on every call: no
    reproducibility where a seed is asked for) and True was seed 1; a float, a string or a negative seed raised
    numpy's messages, which name no argument."""
    data, tables = synthetic(40, seed=0)
    tr, te = split(data, 0.25, 0)
    calls = {"synthetic": lambda s: synthetic(10, seed=s), "split": lambda s: split(data, 0.25, s),
             "train": lambda s: train(CanModel(CanConfig(tables)), tr, te, 1, 16, s, progress=False)}
    with pytest.raises(exc, match=r"^seed must be an integer >= 0, got "):
        calls[call](bad)
    calls[call](np.int64(3))  # numpy integers pass


@pytest.mark.parametrize("labels, exc, match", [
    ([0, 1, np.nan, 1], ValueError, r"labels must be 0 or 1: 1 of 4 are not \(the first nan at 2\)"),
    ([0, 2, 1, 0], ValueError, r"labels must be 0 or 1: 1 of 4 are not \(the first 2 at 1\)"),
    ([-1, 1, -1, 1], ValueError, r"labels must be 0 or 1: 2 of 4 are not \(the first -1 at 0\)"),
    (["0", "1", "0", "1"], TypeError, r"labels must be 0 / 1 numbers or booleans, got <U1"),
])
def test_auc_refuses_labels_that_are_not_0_or_1(labels, exc, match):
    """Labels had been split at 0.5 without a word: a NaN label counted as a non-click (AUC 0.75 here), a 2 as a click;
    strings failed in numpy's comparison. Booleans and 0 / 1 of any numeric dtype pass."""
    with pytest.raises(exc, match=match):
        auc(labels, [0.1, 0.9, 0.8, 0.7])
    for ok in ([0, 1, 0, 1], [False, True, False, True], np.array([0, 1, 0, 1], np.float32)):
        assert auc(ok, [0.1, 0.9, 0.8, 0.7]) == 0.75


@pytest.mark.parametrize("test_labels, match", [
    ("clicks", r"test set \(50 samples\): AUC needs both positive and negative labels; its AUC is taken after every "
               r"epoch"),
    ("empty", r"test set \(0 samples\): AUC needs both positive and negative labels"),
    ("nan", r"test set \(50 samples\): labels must be 0 or 1: 1 of 50 are not"),
])
def test_train_checks_the_test_labels_before_training(test_labels, match):
    """A test set without both classes (or with a label that is not 0 / 1) had been found out by the AUC after the
    whole first epoch of training (ValueError then, the epoch lost); now before the first step."""
    data, tables = synthetic(250, seed=0)
    tr, te = split(data, 0.2, 0)
    te = type(te)(*(getattr(te, f).copy() for f in te.__dataclass_fields__))
    if test_labels == "clicks":
        te.label[:] = 1
    elif test_labels == "nan":
        te.label[7] = np.nan
    else:
        te = _rows(te, 0)
    model = CanModel(CanConfig(tables))
    with pytest.raises(ValueError, match=match):
        train(model, tr, te, 1, 16, 0, progress=False)
    assert model.opt.t == 0  # no step ran


@pytest.mark.parametrize("field, cut, match", [
    ("label", lambda a: a[:40], r"uid must be \[N\] = \[40\] \(label's N\), got shape \[50\]"),
    ("uid", lambda a: a[:40], r"uid must be \[N\] = \[50\] \(label's N\), got shape \[40\]"),
    ("cat", lambda a: a[:, None], r"cat must be \[N\] = \[50\] \(label's N\), got shape \[50, 1\]"),
    ("mask", lambda a: a[:, :5], r"hist_mid must be \[N, T\] = \[50, 5\] \(mask's shape\), got shape \[50, 20\]"),
    ("mask", lambda a: a[:45], r"mask must be \[N, T\] with N = 50 \(label's N\), got shape \[45, 20\]"),
    ("hist_cat", lambda a: a[:, :19], r"hist_cat must be \[N, T\] = \[50, 20\] \(mask's shape\), got shape \[50, 19\]"),
    ("label", lambda a: a[:, None], r"label must be \[N\], got shape \[50, 1\]"),
])
def test_a_batchable_whose_fields_disagree_is_refused(field, cut, match):
    """The fields' shapes had not been checked: 40 labels beside 50 samples' ids gave 40 predictions of the first 40
    samples without a word (a silent misalignment when the labels came from elsewhere), fewer ids than labels
    numpy's IndexError, a shorter mask a broadcasting error naming no field."""
    data, _ = synthetic(50, seed=0)
    fields = {f: getattr(data, f) for f in data.__dataclass_fields__}
    fields[field] = cut(fields[field])
    with pytest.raises(ValueError, match=match):
        type(data)(**fields)


def test_batches_and_load_amazon_books_name_an_argument_of_the_wrong_type(tmp_path):
    """batches(10, rng=0) (a seed where a Generator is asked for) had raised "'int' object has no attribute
    'permutation'"; load_amazon_books with a dict of ids as vocab "'dict' object has no attribute 'uid'"."""
    data, _ = synthetic(30, seed=0)
    for bad in (0, np.random.SeedSequence(0)):
        with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator or None \(for no shuffling\)"):
            list(data.batches(10, rng=bad))
    for rng in (np.random.default_rng(0), np.random.RandomState(0)):
        assert sorted(np.concatenate([b.uid for b in data.batches(7, rng)])) == sorted(data.uid)
    path = write_fixture(tmp_path / "train")
    _, vocab = load_amazon_books(path)
    with pytest.raises(TypeError, match=r"vocab must be a Vocab .* got dict"):
        load_amazon_books(path, vocab.mid)
    assert load_amazon_books(path, vocab)[1] is vocab


@pytest.mark.parametrize("n, fraction, n_train", [(90, 0.3, 63), (10, 0.9, 1), (500, 0.07, 465), (100, 0.9, 10),
                                                  (50, np.float32(0.2), 40), (7, 0.5, 3), (20000, 0.2, 16000)])
def test_split_sizes_are_exact_for_the_fraction_as_written(n, fraction, n_train):
    """int(N * (1 - f)) in floats took a sample from the training set whenever 1 - f rounds down (643 of the (f, N)
    pairs with f = 0.01..0.99 and N <= 1000): 90 samples at 0.3 split 62 / 28, 10 at 0.9 left no training sample."""
    data, _ = synthetic(n, seed=0)
    tr, te = split(data, fraction, 0)
    assert (len(tr), len(te)) == (n_train, n - n_train)


@pytest.mark.parametrize("kw, exc, match", [
    ({"lr": float("nan")}, ValueError, r"lr must be a finite number > 0, got nan"),
    ({"lr": float("inf")}, ValueError, r"lr must be a finite number > 0, got inf"),
    ({"lr": -0.1}, ValueError, r"lr must be a finite number > 0, got -0.1"),
    ({"lr": "0.1"}, TypeError, r"lr must be a finite number > 0, got '0.1' \(str\)"),
    ({"eps": 0.0}, ValueError, r"eps must be a finite number > 0, got 0.0"),
    ({"b1": 1.0}, ValueError, r"b1 must be a number in \[0, 1\), got 1.0"),
    ({"b2": float("nan")}, ValueError, r"b2 must be a number in \[0, 1\), got nan"),
    ({"b1": True}, TypeError, r"b1 must be a number in \[0, 1\), got True \(bool\)"),
])
def test_adam_names_a_bad_hyperparameter(kw, exc, match):
    """Adam took any value: a NaN learning rate or b2 made every weight NaN at the first step, b1 = 1 divided by
    1 - b1**t = 0, eps = 0 divided 0 by 0 for a parameter whose gradient is 0, a negative lr ascended the loss."""
    from dwdp_ops.models.can import Adam

    params = {"w": np.ones(3)}
    with pytest.raises(exc, match=match):
        Adam(params, **{"lr": 1e-3, **kw})
    opt = Adam(params, np.float32(0.1), b1=0, b2=np.float64(0.5))
    opt.step({"w": np.array([1.0, -1.0, 0.0])})
    np.testing.assert_allclose(params["w"], [0.9, 1.1, 1.0])


def test_adam_step_refuses_a_gradient_not_shaped_like_its_parameter():
    """Adam.step broadcast whatever it was given: a [1, n] gradient moved every row of an [m, n] parameter by the same
    step and a scalar moved every weight alike (silently wrong); an unknown name raised a bare KeyError from its
    moments. Now either is refused, naming it, before any parameter, moment or step count changes."""
    from dwdp_ops.models.can import Adam

    params = {"w": np.ones((2, 3)), "b": np.zeros(3)}
    opt = Adam(params, 0.1)
    before = {k: v.copy() for k, v in params.items()}
    for grads, exc, match in (({"b": np.ones(3), "w": np.ones((1, 3))}, ValueError,
                               r"gradient of 'w' is shaped \[1, 3\], its parameter \[2, 3\]"),
                              ({"w": np.float64(1.0)}, ValueError, r"gradient of 'w' is shaped \[\], its parameter"),
                              ({"b": np.ones(3), "v": np.ones(3)}, KeyError, r"no parameter named 'v'")):
        with pytest.raises(exc, match=match):
            opt.step(grads)
        assert opt.t == 0 and all(np.array_equal(params[k], before[k]) for k in params)
        assert all(not m.any() for m in opt.m.values())
    opt.step({"b": np.ones(3)})  # a subset of the parameters is fine
    assert opt.t == 1 and np.array_equal(params["w"], before["w"]) and np.allclose(params["b"], -0.1)


def test_the_model_documents_what_its_methods_take_and_return():
    """train_step and evaluate had no docstring, loss_and_grads did not say what its gradients are, logits not what
    it returns."""
    docs = {name: " ".join((getattr(CanModel, name).__doc__ or "").split())
            for name in ("train_step", "evaluate", "loss_and_grads", "logits", "predict")}
    want = {"train_step": ["[B]", "[B, T]", "mean BCE", "Python float"], "evaluate": ["AUC", "data.label"],
            "loss_and_grads": ["shaped like the parameters", "table-shaped", "Python float"],
            "logits": ["logits [B]", "cache"], "predict": ["[len(data)]"]}
    missing = {k: [w for w in v if w not in docs[k]] for k, v in want.items()}
    assert not any(missing.values()), missing


@pytest.mark.parametrize("bad, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf"), (1.5, "1.5"),
                                        (-0.25, "-0.25")])
def test_train_refuses_training_labels_that_are_not_finite_in_0_1_before_training(bad, shown):
    """A NaN training label had made the loss NaN at the first step that drew it, and the run ended in a
    FloatingPointError advising a lower --lr (wrong advice); an infinite one the same, one outside [0, 1] trained on a
    loss without its minimum. Now a ValueError naming the training set and the first bad index, before any step."""
    data, tables = synthetic(250, seed=0)
    tr, te = split(data, 0.2, 0)
    tr = type(tr)(*(getattr(tr, f).copy() for f in tr.__dataclass_fields__))
    tr.label[[17, 42]] = bad
    model = CanModel(CanConfig(tables))
    with pytest.raises(ValueError, match=rf"training set: labels must be finite numbers in \[0, 1\]: 2 of 200 are "
                                         rf"not \(the first {shown} at index 17\)"):
        train(model, tr, te, 1, 16, 0, progress=False)
    assert model.opt.t == 0  # no step ran


def test_train_accepts_soft_training_labels_and_names_a_bad_test_label():
    """Soft labels in [0, 1] are valid targets of the BCE (only the test set's AUC needs 0 / 1)."""
    data, tables = synthetic(250, seed=0)
    tr, te = split(data, 0.2, 0)
    tr = type(tr)(*(getattr(tr, f).copy() for f in tr.__dataclass_fields__))
    tr.label[:] = np.where(tr.label > 0, 0.9, 0.1).astype(np.float32)
    tr.label[0], tr.label[1] = 0.0, 1.0
    curve = train(CanModel(CanConfig(tables)), tr, te, 1, 64, 0, progress=False)
    assert np.isfinite(curve[0]["train_loss"])
    te = type(te)(*(getattr(te, f).copy() for f in te.__dataclass_fields__))
    te.label[3] = np.inf
    with pytest.raises(ValueError, match=r"test set \(50 samples\): labels must be 0 or 1: 1 of 50 are not \(the "
                                         r"first inf at 3\)"):
        train(CanModel(CanConfig(tables)), tr, te, 1, 64, 0, progress=False)


def test_check_labels_names_labels_that_are_not_numbers():
    from dwdp_ops.models.can import check_labels

    data, _ = synthetic(4, seed=0)
    data.label = np.array(["0", "1", "0", "1"])
    with pytest.raises(TypeError, match=r"training set: labels must be numbers in \[0, 1\] \(or booleans\), got <U1"):
        check_labels(data, "training set")
    data.label = np.array([True, False, True, True])
    check_labels(data, "training set")


@pytest.mark.parametrize("score, dtype", [(["a", "b", "c", "d"], "<U1"), (["0.1", "0.9", "0.8", "0.7"], "<U3"),
                                          ([0.1, 0.9j, 0.8, 0.7], "complex128"), ([0.1, None, 0.8, 0.7], "object")])
def test_auc_names_scores_that_are_not_numbers(score, dtype):
    """Strings had given numpy's own "could not convert string to float: 'a'" (a ValueError naming no argument), or,
    strings of digits, an AUC without a word; complex scores numpy's TypeError naming no argument, a None the
    ValueError of a NaN score."""
    with pytest.raises(TypeError, match=rf"score must hold real numbers \(one per label\), got an array of dtype "
                                        rf"{dtype}"):
        auc([0, 1, 0, 1], score)
    assert auc([0, 1, 0, 1], np.array([1, 9, 8, 7], np.int8)) == 0.75


def test_empty_history_entries_are_no_behaviours(tmp_path):
    """A doubled, leading or trailing \\x02 left an empty entry that became a vocabulary entry ('' with an id of its
    own) and a behaviour (mask 1) in the history; a trailing separator in one history only was refused as a length
    mismatch. Now skipped in the vocabulary and the loader alike: the file reads as the one without them."""
    S = "\x02"
    clean = ["1\tU1\tB3\tBooks\tB1\x02B2\tBooks\x02Fiction",
             "0\tU1\tB9\tFiction\tB1\x02B2\x02B4\tBooks\x02Fiction\x02Books",
             "1\tU2\tB2\tFiction\t\t"]
    messy = [f"1\tU1\tB3\tBooks\tB1{S}{S}B2\tBooks{S}{S}Fiction",  # doubled in both
             f"0\tU1\tB9\tFiction\t{S}B1{S}B2{S}B4{S}\tBooks{S}Fiction{S}{S}Books",  # leading + trailing / doubled
             f"1\tU2\tB2\tFiction\t{S}\t{S}{S}"]  # nothing but separators: no behaviour
    (tmp_path / "one").write_text(messy[0] + "\n")
    one, one_vocab = load_amazon_books(tmp_path / "one", max_len=4)
    assert "" not in one_vocab.mid and "" not in one_vocab.cat, one_vocab  # ('' had been item 1 and category 2)
    assert one.mask[0].tolist() == [1, 1, 0, 0]  # (had been [1, 1, 1, 0]: three behaviours)
    (tmp_path / "clean").write_text("\n".join(clean) + "\n")
    (tmp_path / "messy").write_text("\n".join(messy) + "\n")
    want, want_vocab = load_amazon_books(tmp_path / "clean", max_len=4)
    got, vocab = load_amazon_books(tmp_path / "messy", max_len=4)
    assert vocab == want_vocab == build_vocab(tmp_path / "messy")
    assert "" not in vocab.mid and "" not in vocab.cat and vocab.sizes == (3, 6, 3)
    for f in want.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
    np.testing.assert_array_equal(got.mask, [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
    assert ((got.hist_mid > 0) == (got.mask > 0)).all() and ((got.hist_cat > 0) == (got.mask > 0)).all()
    # max_len keeps the most recent behaviours, not the empty entries: [B2, B4] of the second line
    short, _ = load_amazon_books(tmp_path / "messy", vocab, max_len=2)
    assert short.hist_mid[1].tolist() == [vocab.mid["B2"], vocab.mid["B4"]] and short.mask[1].tolist() == [1, 1]
    # an empty entry does not stand for a missing category: histories of different non-empty lengths are refused
    (tmp_path / "bad").write_text(f"1\tU1\tB3\tBooks\tB1{S}{S}B2\tBooks{S}Fiction{S}Books\n")
    with pytest.raises(ValueError, match=r"bad:1: item history has 2 entries but category history 3 \(non-empty"):
        build_vocab(tmp_path / "bad")


def test_train_checks_the_ids_once_not_at_every_step(monkeypatch):
    """train() checks both sets' ids before training; its steps and evaluations do not check them again (work on
    the timed step's path that repeats the check of the whole set)."""
    from dwdp_ops.models import can as can_mod
    from dwdp_ops.models import train_can as train_mod

    data, tables = synthetic(300, seq_len=10, seed=0)
    tr, te = split(data, 0.2, 0)
    calls = []
    real = can_mod.check_ids
    monkeypatch.setattr(can_mod, "check_ids", lambda *a: (calls.append(a[2]), real(*a))[1])
    monkeypatch.setattr(train_mod, "check_ids", lambda *a: (calls.append(a[2]), real(*a))[1])
    train(CanModel(CanConfig(tables)), tr, te, 2, 16, 0, progress=False)
    assert calls == ["train set", "test set"]
