"""CPU review of the fp8 quantisation, the checkpoint weights helpers, prefill attention's host checks, the routed
step's host checks and serve's host helpers: bad inputs are refused by name, and block sizes larger than the matrix
cost no more memory than a block that covers it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
quant = pytest.importorskip("dwdp_ops.quant")
fp8 = pytest.importorskip("dwdp_ops.models.deepseek_r1.fp8")
weights = pytest.importorskip("dwdp_ops.models.deepseek_r1.weights")
serve = pytest.importorskip("dwdp_ops.models.deepseek_r1.serve")
attention = pytest.importorskip("dwdp_ops.models.attention")
routed = pytest.importorskip("dwdp_ops.models.routed")


# -- quant: a block larger than the matrix ---------------------------------------------------------------------------


def test_a_block_larger_than_the_matrix_is_one_block_without_a_huge_temporary():
    """Block scales were expanded by repeating each scale ``block`` times before cutting to the matrix: a block of
    2**40 tried to allocate 4 TiB (MemoryError; PyTorch: RuntimeError), and 2**16 on a 4096 x 4096 matrix 1 GiB. A
    block that covers the whole matrix is one block: the same result as block = max(N, K)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    big = 2**40
    q, s = quant.quant_block(w, big)
    q7, s7 = quant.quant_block(w, 7)
    np.testing.assert_array_equal(q, q7)
    np.testing.assert_array_equal(s, s7)
    np.testing.assert_array_equal(quant.dequant_block(q, s, big), quant.dequant_block(q7, s7, 7))
    for a, b in zip(quant.requant_rowwise_from_block(q, s, big), quant.requant_rowwise_from_block(q7, s7, 7)):
        np.testing.assert_array_equal(a, b)
    assert quant.requant_error(q, s, big) == quant.requant_error(q7, s7, 7)
    qt, st = fp8.requant_block(torch.from_numpy(q), torch.from_numpy(s), big)
    q7t, s7t = fp8.requant_block(torch.from_numpy(q7), torch.from_numpy(s7), 7)
    assert torch.equal(qt.view(torch.uint8), q7t.view(torch.uint8)) and torch.equal(st, s7t)


def test_a_block_larger_than_one_dimension_only():
    """Rows in blocks of 4, the columns in one block (the block exceeds K only): the same as quant_block's result."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((9, 3)).astype(np.float32)
    q, s = quant.quant_block(w, 4)
    assert s.shape == (3, 1)
    ref = from_blocks = quant.from_e4m3(q) * np.repeat(s, 4, axis=0)[:9]
    np.testing.assert_array_equal(quant.dequant_block(q, s, 4), from_blocks)
    qt, st = fp8.requant_block(torch.from_numpy(q), torch.from_numpy(s), 4)
    qn, sn = quant.quant_rowwise(ref)
    np.testing.assert_array_equal(qt.view(torch.uint8).numpy(), qn)
    np.testing.assert_array_equal(st.numpy(), sn)


# -- fp8.requant_block: numpy inputs ---------------------------------------------------------------------------------


def test_requant_block_refuses_numpy_arrays_by_name():
    """numpy codes were refused as 'codes must be [N, K] uint8 ..., got uint8 [4, 4]' (the dtype it asks for), and
    numpy scales failed with AttributeError ('numpy.ndarray' object has no attribute 'float')."""
    codes = np.zeros((4, 4), np.uint8)
    s = np.ones((1, 1), np.float32)
    with pytest.raises(TypeError, match=r"requant_block: codes must be a torch.Tensor .*got ndarray"):
        fp8.requant_block(codes, torch.from_numpy(s))
    with pytest.raises(TypeError, match=r"requant_block: scale_inv must be a torch.Tensor .*got ndarray"):
        fp8.requant_block(torch.from_numpy(codes), s)


# -- serve.layout_dtype ----------------------------------------------------------------------------------------------


def test_layout_dtype_names_an_unsupported_dtype():
    """torch.int8 raised a bare KeyError: torch.int8."""
    assert serve.layout_dtype(torch.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match=r"layout_dtype: the expert store holds \[.bfloat16.*got torch.int8"):
        serve.layout_dtype(torch.int8)
    with pytest.raises(TypeError, match=r"layout_dtype: .*torch.dtype.*'bfloat16' \(str\)"):
        serve.layout_dtype("bfloat16")


# -- weights ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, exc, match", [
    ((np.random.default_rng(0), (4, 4), 0), ValueError, r"block must be an int >= 1, got 0"),
    ((np.random.default_rng(0), (4, 4), 2.0), TypeError, r"block must be an int >= 1, got 2.0"),
    ((0, (4, 4), 128), TypeError, r"rng must be a numpy.random.Generator, got 0 \(int\)"),
    ((np.random.default_rng(0), (4,), 128), ValueError, r"shape must be two ints >= 0 \(rows, columns\), got \(4,\)"),
    ((np.random.default_rng(0), (4, 2.0), 128), ValueError, r"shape must be two ints >= 0"),
])
def test_random_fp8_names_bad_arguments(args, exc, match):
    """block 0 raised ZeroDivisionError, an int rng AttributeError ('int' object has no attribute 'integers'), a 1-D
    shape an IndexError (shape[1]) and a float dimension a numpy TypeError."""
    with pytest.raises(exc, match="random_fp8: " + match):
        weights.random_fp8(*args)


def test_init_weights_refuses_a_cfg_that_is_not_a_deepseek_config():
    """None failed with AttributeError: 'NoneType' object has no attribute 'dim'."""
    with pytest.raises(TypeError, match=r"init_weights: cfg must be a DeepSeekConfig, got None"):
        weights.init_weights(None)


# -- attention -------------------------------------------------------------------------------------------------------


def test_prefill_attention_refuses_non_tensors_and_a_bad_backend_type():
    q = torch.randn(5, 2, 8)
    with pytest.raises(TypeError, match=r"prefill_attention: q, k and v must be torch.Tensors, got ndarray"):
        attention.prefill_attention(q.numpy(), q, q, [2, 3], 0.1)
    with pytest.raises(TypeError, match=r"backend must be 'auto' or one of .*got \['loop'\] \(list\)"):
        attention.prefill_attention(q, q, q, [2, 3], 0.1, backend=["loop"])


def test_prefill_attention_refuses_mixed_dtypes_before_any_backend_is_tried(monkeypatch):
    """q float32 with k float64 reached the backends: under ``auto`` each one that raised on it was remembered as
    refusing these head dims and dtype for the rest of the process (with a warning), so one bad call disabled a
    working backend for every later good call."""
    monkeypatch.setenv(attention.ENV, "dense,loop")
    monkeypatch.setattr(attention, "_refused", {})
    q = torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match=r"prefill_attention: q, k and v must have one dtype and device, got "
                                         r"torch.float32 on cpu, torch.float64 on cpu, torch.float32 on cpu"):
        attention.prefill_attention(q, q.double(), q, [2, 3], 0.1)
    assert attention._refused == {}


# -- routed ----------------------------------------------------------------------------------------------------------


def test_routed_experts_refuses_non_tensors():
    x = torch.zeros(3, 8)
    w = torch.ones(3, 2)
    ids = torch.zeros(3, 2, dtype=torch.int64)
    for args, name in (((x.numpy(), w, ids), "x"), ((x, w.numpy(), ids), "w"), ((x, w, [[0, 1]] * 3), "ids")):
        with pytest.raises(TypeError, match=rf"routed_experts: {name} must be a torch.Tensor"):
            routed.routed_experts(*args, lambda xg, offs: xg, num_experts=4)


@pytest.mark.parametrize("align", [1, 16])
@pytest.mark.parametrize("bad", [4, -1])
def test_routed_experts_names_expert_ids_out_of_range_on_the_cpu(align, bad):
    """On the CPU (where reading the ids costs no synchronisation) an id of 4 with 4 experts, or -1, failed inside
    scatter_add_ ('index 4 is out of bounds for dimension 0 with size 4') without naming ids."""
    x = torch.zeros(3, 8)
    ids = torch.tensor([[0, bad], [1, 2], [2, 3]])
    with pytest.raises(ValueError, match=rf"routed_experts: ids must be in \[0, 4\) \(num_experts\), got {bad}"):
        routed.routed_experts(x, torch.ones(3, 2), ids, lambda xg, offs: xg, num_experts=4, align=align)


# -- serve.compare ---------------------------------------------------------------------------------------------------


def test_compare_does_not_hide_nan_logits_behind_an_earlier_step():
    """A run whose second step's logits were NaN compared with max_rel_err 0.0 and comparable_rel_err 0.0 (Python's
    max keeps 0.0 against a NaN that comes after it): a broken run reported as bit-equal."""
    ok = [np.ones((1, 4), np.float32), np.ones((1, 4), np.float32)]
    bad = [np.ones((1, 4), np.float32), np.full((1, 4), np.nan, np.float32)]
    for a, b in ((bad, ok), (ok, bad)):
        r = serve.compare(serve.RunResult([[0, 0]], a, [], 0.0), serve.RunResult([[0, 0]], b, [], 0.0))
        assert np.isnan(r["rel_err_per_step"][1])
        assert np.isnan(r["max_rel_err"]) and np.isnan(r["comparable_rel_err"])
    r = serve.compare(serve.RunResult([[0, 0]], ok, [], 0.0), serve.RunResult([[0, 0]], ok, [], 0.0))
    assert r["max_rel_err"] == 0.0 and r["comparable_rel_err"] == 0.0


# -- fp8.quant_rows: non-float input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_quant_rows_refuses_a_non_float_tensor(dtype):
    """An integer or bool tensor (token ids, a mask, e4m3 codes as uint8) was quantised without a word, where the
    numpy reference (``quant.quant_rowwise``) refuses non-float input."""
    with pytest.raises(ValueError, match=rf"quant_rows: x must be a floating-point tensor .*got {dtype}"):
        fp8.quant_rows(torch.ones(2, 8, dtype=dtype))
    with pytest.raises(ValueError, match=r"quant_rows: x must be a floating-point tensor"):
        fp8.quant_rows_torch(torch.ones(2, 8, dtype=dtype))
