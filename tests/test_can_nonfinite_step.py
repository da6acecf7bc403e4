"""A CAN training step whose loss is not finite leaves the model as it was.

``train_step`` applied Adam's step and ``loss_and_grads`` updated BatchNorm's running statistics before anyone looked
at the loss: a NaN / infinite loss left NaN weights, moments and running statistics behind, so a caller who caught
``train``'s FloatingPointError (to retry with a lower learning rate, as it advises) held a destroyed model. Now the
step is refused before any change: no Adam step, the same moments and step count, the same running statistics."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.models.can import CanConfig, CanModel
from dwdp_ops.models.can_data import split, synthetic
from dwdp_ops.models.train_can import train

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")


def _batch(n=48, seed=0):
    data, tables = synthetic(n, seq_len=6, seed=seed)
    return type(data)(*(getattr(data, f).copy() for f in data.__dataclass_fields__)), tables


def _state(model) -> dict:
    """Every array of the model's state (weights, Adam's moments, BatchNorm's running statistics) as bytes, and Adam's
    step count: equal states are bit-identical (NaNs included)."""
    s = {"opt.t": model.opt.t, "bn_mean": model.bn_mean, "bn_var": model.bn_var}
    for k in model.P:
        s[f"P.{k}"], s[f"m.{k}"], s[f"v.{k}"] = model.P[k], model.opt.m[k], model.opt.v[k]
    return {k: v if isinstance(v, int) else (v.dtype.str, v.shape, v.tobytes()) for k, v in s.items()}


def _assert_same(model, before: dict) -> None:
    after = _state(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if after[k] != before[k]]
    assert not changed, f"changed by the refused step: {changed}"


def _last(model) -> str:
    return f"b{model.n_fc - 1}"


# each poison edits the model or the batch so that the loss is not finite, and returns an undo
def _nan_user_row(model, b):  # NaN features: BatchNorm's batch mean and variance are NaN
    r = int(b.uid[0])
    old = model.P["uid"][r].copy()
    model.P["uid"][r] = np.nan
    return lambda: model.P["uid"].__setitem__(r, old)


def _inf_bias(model, b):  # an infinite logit: inf - inf * y is NaN for a clicked sample
    k = _last(model)
    old = model.P[k].copy()
    model.P[k][0] = np.inf
    return lambda: model.P[k].__setitem__(slice(None), old)


def _huge_weights(model, b):  # finite weights whose products overflow to inf
    old = {k: model.P[k].copy() for k in ("w0", "w1")}
    for k in old:
        model.P[k] *= 1e200
    return lambda: [model.P[k].__setitem__(slice(None), v) for k, v in old.items()]


def _nan_label(model, b):  # check=False: the caller's word that the labels were checked
    old = b.label.copy()
    b.label[3] = np.nan
    return lambda: b.label.__setitem__(slice(None), old)


POISONS = {"nan-user-row": _nan_user_row, "inf-bias": _inf_bias, "huge-weights": _huge_weights,
           "nan-label": _nan_label}


@pytest.mark.parametrize("use_coaction", [True, False], ids=["can", "dnn"])
@pytest.mark.parametrize("poison", POISONS)
def test_a_non_finite_loss_leaves_the_model_exactly_as_it_was(poison, use_coaction):
    b, tables = _batch()
    model = CanModel(CanConfig(tables, use_coaction=use_coaction))
    twin = CanModel(CanConfig(tables, use_coaction=use_coaction))
    for m in (model, twin):
        m.train_step(b)  # (Adam's moments and the running statistics are no longer their initial values)
    undo = POISONS[poison](model, b)
    before = _state(model)
    with pytest.raises(FloatingPointError, match=r"^the training loss is (nan|inf|-inf), not finite: the step was not "
                                                 r"taken \(.*BatchNorm's running statistics are as they were\)"):
        model.train_step(b, check=False)
    _assert_same(model, before)
    loss, _ = model.loss_and_grads(b, check=False)  # (returns the loss, and updates no running statistic)
    assert not np.isfinite(loss)
    _assert_same(model, before)
    undo()
    # the refused step left nothing behind: the next step is the one a model that never saw it takes
    assert model.train_step(b) == twin.train_step(b)
    assert _state(model) == _state(twin)


def test_a_refused_step_names_the_infinite_loss():
    b, tables = _batch()
    model = CanModel(CanConfig(tables))
    model.P[_last(model)][:] = -np.inf  # (every logit -inf: the loss is +inf for a clicked sample)
    b.label[:] = 1
    with pytest.raises(FloatingPointError, match=r"^the training loss is inf, not finite"):
        model.train_step(b)
    assert model.opt.t == 0


def _poison_call(model, k: int, seen: dict):
    """Make the ``k``-th feature computation of ``model`` NaN in one sample, and remember the model's state just
    before it in ``seen``."""
    real, calls = model._features, [0]

    def features(b):
        calls[0] += 1
        x = real(b)
        if calls[0] == k:
            seen["state"] = _state(model)
            x[0, 0] = np.nan
        return x

    model._features = features


@pytest.mark.parametrize("epoch, step", [(1, 1), (1, 4), (2, 3)])
def test_train_names_epoch_and_step_and_the_model_is_unchanged_by_that_step(epoch, step):
    data, tables = synthetic(300, seq_len=6, seed=0)
    tr, te = split(data, 0.2, 0)
    batch = 40
    per_epoch = -(-len(tr) // batch)
    model = CanModel(CanConfig(tables))
    seen = {}
    # (an epoch's steps, then its test set's evaluation: one batch of predict's 1024)
    _poison_call(model, (epoch - 1) * (per_epoch + 1) + step, seen)
    with pytest.raises(FloatingPointError, match=rf"^the training loss became nan at epoch {epoch}, step {step} "
                                                 r"\(learning rate 0\.001\); try a lower --lr \(the model is as it "
                                                 r"was before that step: it was not taken\)$"):
        train(model, tr, te, 3, batch, 0, progress=False)
    assert model.opt.t == (epoch - 1) * per_epoch + step - 1
    _assert_same(model, seen["state"])


@pytest.mark.parametrize("use_coaction, losses, values", [
    (True, (0.9921286083905093, 0.672459537807739),
     {"P.w0": -0.09478659746416819, "P.mid": 0.09206897155214301, "bn_mean": -0.00025393467836174225,
      "bn_var": 0.9802561224607154, "v.w1": 4.3220469831174594e-07, "P.mid_ind": 0.03864915846108212}),
    (False, (0.7944956617824532, 0.6107048789413884),
     {"P.w0": 0.11221737502814087, "P.mid": 0.08922028475255804, "bn_mean": -0.00025726799235121264,
      "bn_var": 0.9802565943023622, "v.w1": 4.551317223073344e-09}),
], ids=["can", "dnn"])
def test_a_finite_step_changes_the_model_as_before(use_coaction, losses, values):
    """The values two steps gave before the fix (seed 0, this batch): a finite step still takes Adam's step and
    updates the running statistics with the batch's."""
    data, tables = synthetic(48, seq_len=6, seed=0)
    model = CanModel(CanConfig(tables, use_coaction=use_coaction))
    x = model._features(data)
    mean, var = 0.99 * model.bn_mean + 0.01 * x.mean(0), 0.99 * model.bn_var + 0.01 * x.var(0)
    got = [model.train_step(data)]
    np.testing.assert_array_equal(model.bn_mean, mean)
    np.testing.assert_array_equal(model.bn_var, var)
    got.append(model.train_step(data))
    assert model.opt.t == 2
    np.testing.assert_allclose(got, losses, rtol=1e-12)
    at = {"P.w0": model.P["w0"][0, 0], "P.mid": model.P["mid"][1, 0], "bn_mean": model.bn_mean[0],
          "bn_var": model.bn_var[0], "v.w1": model.opt.v["w1"][0, 0]}
    if use_coaction:
        at["P.mid_ind"] = model.P["mid_ind"][1, 0]
    for k, want in values.items():
        np.testing.assert_allclose(at[k], want, rtol=1e-11, err_msg=k)


def test_after_a_refused_step_train_goes_on_at_a_lower_learning_rate():
    """What the error invites: catch it, lower the learning rate, train on; the message names Adam's rate in use."""
    data, tables = synthetic(300, seq_len=6, seed=0)
    tr, te = split(data, 0.2, 0)
    model = CanModel(CanConfig(tables))
    real = model._features
    model._features = lambda b: real(b) * np.nan
    with pytest.raises(FloatingPointError, match=r"at epoch 1, step 1 \(learning rate 0\.001\)"):
        train(model, tr, te, 1, 40, 0, progress=False)
    model.opt.lr = 1e-4
    with pytest.raises(FloatingPointError, match=r"at epoch 1, step 1 \(learning rate 0\.0001\)"):
        train(model, tr, te, 1, 40, 0, progress=False)
    model._features = real
    curve = train(model, tr, te, 1, 40, 0, progress=False)
    assert np.isfinite(curve[0]["losses"]).all() and model.opt.t == len(curve[0]["losses"])
