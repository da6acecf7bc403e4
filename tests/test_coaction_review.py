"""Host-side review of CAN-DNN's per-call checks (``CanModel.loss_and_grads`` / ``train_step`` / ``predict`` /
``evaluate``): the mask, the ``check`` flag and the batch's type are refused by name, before the model changes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from dwdp_ops.models.can import CanConfig, CanModel
from dwdp_ops.models.can_data import Batchable, synthetic


def _model_and_data():
    data, tables = synthetic(40, seq_len=4, seed=0)
    return CanModel(CanConfig(tables)), data


def _with(data: Batchable, **fields) -> Batchable:
    d = {f: getattr(data, f) for f in data.__dataclass_fields__}
    d.update(fields)
    return Batchable(**d)


def _state(model: CanModel):
    return copy.deepcopy((model.P, model.opt.m, model.opt.v, model.opt.t, model.bn_mean, model.bn_var))


def _same(a, b) -> bool:
    flat = lambda s: [x for part in s for x in (part.values() if isinstance(part, dict) else [part])]  # noqa: E731
    return all(np.array_equal(x, y) for x, y in zip(flat(a), flat(b)))


@pytest.mark.parametrize("value", [2.0, 0.5, -1.0, np.nan])
def test_train_step_refuses_a_mask_that_is_not_0_or_1_before_any_change(value):
    """``train`` refused such a mask, ``train_step`` / ``loss_and_grads`` (``check=True``) had taken it: a mask of 2
    or 0.5 trained on history sums weighted by it while the co-action counted the behaviour once (a silently
    inconsistent feature), a NaN one raised NonFiniteLossError ("the training loss is nan") naming no input."""
    model, data = _model_and_data()
    mask = data.mask.copy()
    mask[2, 0] = value
    before = _state(model)
    with pytest.raises(ValueError, match=r"^the training batch: mask must be 0 \(padding\) or 1 \(a behaviour\): 1 "
                                         r"of 160 are not \(the first .* at \[2, 0\]\)"):
        model.train_step(_with(data, mask=mask))
    assert _same(before, _state(model))


def test_train_step_and_predict_refuse_a_mask_that_is_not_numbers():
    """A string mask had failed in numpy's multiply ("ufunc 'multiply' did not contain a loop"), naming no field."""
    model, data = _model_and_data()
    bad = _with(data, mask=data.mask.astype(str))
    with pytest.raises(TypeError, match="^the training batch: mask must hold 0 / 1 numbers or booleans"):
        model.train_step(bad)
    with pytest.raises(TypeError, match="^predict's data: mask must hold 0 / 1 numbers or booleans"):
        model.predict(bad)


def test_predict_refuses_a_nan_mask():
    """A NaN mask value had made the predictions NaN without a word."""
    model, data = _model_and_data()
    mask = data.mask.copy()
    mask[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"^predict's data: mask must be 0 \(padding\) or 1 .* at \[5, 1\]"):
        model.predict(_with(data, mask=mask))


def test_boolean_and_integer_masks_still_pass():
    model, data = _model_and_data()
    loss = model.train_step(_with(data, mask=data.mask.astype(bool)))
    assert np.isfinite(loss)
    assert model.predict(_with(data, mask=data.mask.astype(np.int64))).shape == (len(data),)


@pytest.mark.parametrize("flag", [None, 0, 1, "no"])
def test_the_check_flag_must_be_a_bool(flag):
    """``check=None`` (or 0) had skipped the id and label checks without a word, as ``check_ids=None`` had in the
    fused ops (refused there by ``check_flag``); ``check="no"`` had run them."""
    model, data = _model_and_data()
    before = _state(model)
    for call in (lambda: model.train_step(data, check=flag), lambda: model.loss_and_grads(data, check=flag),
                 lambda: model.predict(data, check=flag), lambda: model.evaluate(data, check=flag)):
        with pytest.raises(TypeError, match=r"^check must be a bool"):
            call()
    assert _same(before, _state(model))
    model.train_step(data, check=np.bool_(False))  # (numpy's bool passes)


@pytest.mark.parametrize("what", [None, {}, (1, 2)])
def test_train_step_and_predict_refuse_what_is_not_a_batchable(what):
    """Anything else had raised AttributeError ("'NoneType' object has no attribute 'uid'")."""
    model, _ = _model_and_data()
    with pytest.raises(TypeError, match=r"^the training batch must be a Batchable"):
        model.train_step(what)
    with pytest.raises(TypeError, match=r"^predict's data must be a Batchable"):
        model.predict(what)


@pytest.mark.parametrize("field", ["uid", "hist_mid", "mask", "label"])
def test_batchable_refuses_a_field_that_is_not_an_array(field):
    """A list (its shape read by np.shape) had passed construction and then failed deep inside: ``batches`` and
    ``split`` on "only integer scalar arrays can be converted to a scalar index", ``train_step`` on "list indices
    must be integers or slices, not tuple"; assigned afterwards, it passes no later check either."""
    _, data = _model_and_data()
    with pytest.raises(TypeError, match=rf"^{field} must be an array \(numpy or CuPy\), got list"):
        _with(data, **{field: getattr(data, field).tolist()})
    setattr(data, field, getattr(data, field).tolist())
    with pytest.raises(TypeError, match=rf"^{field} must be an array \(numpy or CuPy\), got list"):
        data.batches(8)


def test_adam_refuses_params_and_grads_of_the_wrong_type():
    """Params or grads not a dict had raised AttributeError ("'list' object has no attribute 'items'"), an integer
    parameter numpy's UFuncTypeError at the first step, a list gradient "can't multiply sequence by non-int" after
    the step count had moved on."""
    from dwdp_ops.models.can import Adam

    with pytest.raises(TypeError, match=r"^params must be a dict of name -> float array, got list"):
        Adam([np.zeros(2)], 1e-3)
    with pytest.raises(TypeError, match=r"^params\['a'\] must be a floating-point array, got int64"):
        Adam({"a": np.zeros(2, np.int64)}, 1e-3)
    with pytest.raises(TypeError, match=r"^params\['a'\] must be a floating-point array, got list"):
        Adam({"a": [0.0, 1.0]}, 1e-3)
    opt = Adam({"a": np.zeros(2)}, 1e-3)
    with pytest.raises(TypeError, match=r"^Adam.step: grads must be a dict of name -> array, got list"):
        opt.step([("a", np.ones(2))])
    with pytest.raises(TypeError, match=r"^Adam.step: the gradient of 'a' must be an array of real numbers, got list"):
        opt.step({"a": [1.0, 2.0]})
    with pytest.raises(TypeError, match=r"^Adam.step: the gradient of 'a' must be an array of real numbers, got "
                                        r"array of <U1"):
        opt.step({"a": np.array(["1", "2"])})
    assert opt.t == 0 and np.array_equal(opt.p["a"], np.zeros(2))
    opt.step({"a": np.ones(2, np.float32)})
    assert opt.t == 1


@pytest.mark.parametrize("shape", [(True, 2), (4, np.True_), (False,)], ids=str)
def test_table_grads_refuses_bools_as_sizes(shape):
    """A bool had been taken as a size ((True, 2) as (1, 2)); the package's other size checks refuse bools
    (``_checks.is_int``). numpy integers still pass."""
    from dwdp_ops.coaction import TableGrads
    from dwdp_ops.coaction.fused import _shape

    with pytest.raises(TypeError, match=r"^induction_shape must be a tuple of ints"):
        _shape(shape, "induction_shape")
    with pytest.raises(TypeError, match=r"^feed_shape must be a tuple of ints"):
        TableGrads((4, 160), shape)
    assert _shape((np.int64(4), 2), "induction_shape") == (4, 2)


@pytest.mark.parametrize("backward", [False, True])
def test_split_warps_is_zero_where_no_kernel_fits(backward):
    """Eight 256 x 256 layers: one warp's shared memory is past 227 KiB (``launch_shape`` gives (0, 0); the op's
    launch raises ValueError). ``split_warps`` answers 0 there, as for the fallback kernels
    (tests/test_coaction_split.py asserts 0 wherever ``uses_fast_kernels`` is False); its docstring had said 0 meant
    the fallback only; it says both now, and ``launch_shape`` tells them apart."""
    from dwdp_ops.coaction import CoActionSpec
    from dwdp_ops.coaction.fused import launch_shape, split_warps, uses_fast_kernels

    spec = CoActionSpec(layer_dims=((256, 256),) * 8)
    assert launch_shape(spec, backward) == (0, 0) and not uses_fast_kernels(spec, backward)
    assert split_warps(spec, 1, 100, 132, backward=backward) == 0
    assert "no kernel at all" in split_warps.__doc__
    fallback = CoActionSpec(layer_dims=((64, 8),))
    assert launch_shape(fallback, backward)[0] >= 1 and split_warps(fallback, 1, 100, 132, backward=backward) == 0
