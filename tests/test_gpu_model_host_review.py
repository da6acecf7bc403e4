"""Host-side review of the GPU forward of DeepSeek-R1 (``models.deepseek_r1.gpu``), its weight sources
(``gpu_weights``) and CAN's data (``models.can_data``): argument checks that run on the CPU, before any CUDA call."""

from __future__ import annotations

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from dwdp_ops.models.can_data import split, synthetic  # noqa: E402
from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, init_weights  # noqa: E402
from dwdp_ops.models.deepseek_r1.gpu import GpuModel, select_experts_torch  # noqa: E402
from dwdp_ops.models.deepseek_r1.gpu_weights import DeviceWeights, NumpyWeights  # noqa: E402
from dwdp_ops.models.deepseek_r1.reference import select_experts  # noqa: E402


def _model(lengths):
    m = GpuModel.__new__(GpuModel)
    m.cfg, m.max_requests, m.max_seq, m.lengths = DeepSeekConfig.tiny(), len(lengths), 16, list(lengths)
    return m


@pytest.mark.parametrize("requests, tokens, err, msg", [
    ([0], [5], TypeError, r"tokens\[0\] must be a list of token ids .*got 5 \(int\)"),  # had been len()'s TypeError
    ([0], ["abc"], TypeError, r"tokens\[0\] must be a list of token ids"),
    ([0], [[[1, 2]]], ValueError, r"tokens\[0\] must be a flat list of token ids, got shape \[1, 2\]"),  # had passed
    ([0, 1], [[1, 2], [[2, 3], 4]], ValueError, r"tokens\[1\] must be a flat list of token ids"),  # numpy's message
    ([0], [np.array([1.5, 2.0])], TypeError, "token ids must be integers, got float64"),  # truth value of an array
    ([0], [torch.tensor([True, False])], TypeError, "token ids must be integers, got bool"),  # ... of a tensor
    ([0], [np.array([1, 200])], ValueError, r"token ids must be in \[0, 97\)"),
])
def test_forward_checks_each_token_list_before_any_cuda_call(requests, tokens, err, msg):
    """A bare id in place of a list failed on len(), a numpy array or a tensor of several ids on its truth value
    (``if not t``), and a nested list went on as 2-D ids with one position; each is now refused naming ``tokens[i]``
    (arrays and CPU tensors of ids are token lists like any other), the cached lengths kept."""
    m = _model([0, 0])
    with pytest.raises(err, match=msg):
        m.forward(requests, tokens)
    assert m.lengths == [0, 0]


def test_forward_takes_requests_as_an_array_by_its_length():
    """``not requests`` on a one-slot numpy array is ``not 0`` (True: "needs one non-empty token list" for a
    valid step) and on a longer one an ambiguous-truth ValueError; the checks now read its length."""
    m = _model([0, 0])
    with pytest.raises(TypeError, match="token ids must be integers, got float64"):  # past the request checks
        m.forward(np.array([0]), [[1.5]])
    with pytest.raises(TypeError, match="token ids must be integers, got float64"):
        m.forward(np.array([0, 1]), [[1.5], [2.5]])
    with pytest.raises(ValueError, match="forward needs one non-empty token list per request"):
        m.forward(np.array([], dtype=int), [])


@pytest.mark.parametrize("align, err", [(2.9, TypeError), (True, TypeError), (0, ValueError), (-16, ValueError)])
def test_constructor_refuses_an_align_it_would_truncate(align, err):
    """``int(align)`` made 2.9 an alignment of 2 and True one of 1 (0 went on to routed_experts' error at the first
    MoE layer of the first step); refused before any CUDA call, as routed_experts refuses it."""
    w = types.SimpleNamespace(dtype=None, device="cuda")
    with pytest.raises(err, match=f"align must be an int >= 1, got {align!r}"):
        GpuModel(DeepSeekConfig.tiny(), w, None, max_requests=1, max_seq=8, align=align)


@pytest.mark.parametrize("args, err, msg", [
    ((torch.zeros(2, 16), torch.zeros(16), 4, 2, 9, 1.0), ValueError, r"1 <= top_k <= topk_group \* 4"),
    ((torch.zeros(2, 16), torch.zeros(16), 4, 5, 2, 1.0), ValueError, r"1 <= topk_group <= 4"),
    ((torch.zeros(2, 16), torch.zeros(16), 3, 1, 2, 1.0), ValueError, "n_group must be an int >= 1 dividing the 16"),
    ((torch.zeros(2, 16), torch.zeros(1), 4, 2, 2, 1.0), ValueError, r"bias must have shape \[16\]"),
    ((torch.zeros(2, 16), torch.zeros(2, 16), 4, 2, 2, 1.0), ValueError, r"bias must have shape \[16\]"),
    ((torch.zeros(16), torch.zeros(16), 4, 2, 2, 1.0), ValueError, r"logits must be \[tokens, experts\]"),
    ((torch.zeros(2, 16), torch.zeros(16), 4, 2, 2.0, 1.0), TypeError, "top_k must be an int, got 2.0"),
    ((torch.zeros(2, 16), torch.zeros(16), 4, True, 2, 1.0), TypeError, "topk_group must be an int, got True"),
])
def test_the_torch_gate_checks_its_arguments_as_the_reference_does(args, err, msg):
    """``select_experts_torch`` checked nothing: a top_k past the kept groups' experts returned the ids of masked
    (-inf) experts as if chosen, a one-element or per-token bias broadcast, and a bad group count failed in
    ``view``/``topk`` ("selected index k out of range"). The reference refuses each."""
    with pytest.raises(err, match=msg):
        select_experts_torch(*args)
    logits, bias = args[0], args[1]
    if logits.dim() == 2 and tuple(bias.shape) == (16,) and all(isinstance(a, int) for a in args[2:5]):
        with pytest.raises((TypeError, ValueError)):
            select_experts(logits.numpy(), bias.numpy(), *args[2:])


def test_the_torch_gate_still_equals_the_reference():
    rng = np.random.default_rng(0)
    logits, bias = rng.normal(size=(5, 16)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    w, ids = select_experts(logits, bias, 4, 2, 8, 2.5)  # top_k = topk_group * per: the bound itself
    tw, tids = select_experts_torch(torch.from_numpy(logits), torch.from_numpy(bias), np.int64(4), 2, 8, 2.5)
    np.testing.assert_array_equal(tids.numpy(), ids)
    np.testing.assert_allclose(tw.numpy(), w, rtol=1e-6)


@pytest.mark.parametrize("n_out", [3, 0])
def test_weight_sources_refuse_an_out_of_another_expert_count(n_out):
    """``experts(layer, 0, 1, out=...)`` with an ``out`` of 3 experts: NumpyWeights' ``copy_`` broadcast expert 0
    into all three, DeviceWeights filled the first and left the others; both silent. Refused now; an ``out`` of the
    right shape is still filled as the returned stacks."""
    cfg = DeepSeekConfig.tiny()
    I, d, moe = cfg.moe_inter_dim, cfg.dim, cfg.n_dense_layers
    dev, num = DeviceWeights(cfg, device=0), NumpyWeights(cfg, init_weights(cfg, 0), device=0)
    dev.device = num.device = torch.device("cpu")
    for src in (dev, num):
        bad = (torch.zeros((n_out, 2 * I, d), dtype=src.dtype), torch.zeros((n_out, d, I), dtype=src.dtype))
        with pytest.raises(ValueError, match=r"out must be \(w13 \[1, 64, 64\], w2 \[1, 64, 32\]\) tensors of "):
            src.experts(moe, 0, 1, out=bad)
        good = (torch.zeros((1, 2 * I, d), dtype=src.dtype), torch.zeros((1, d, I), dtype=src.dtype))
        w13, w2 = src.experts(moe, 0, 1, out=good)
        want = src.experts(moe, 0, 1)
        assert torch.equal(good[0], want[0]) and torch.equal(good[1], want[1]) and w13 is good[0]


def test_weight_sources_refuse_an_out_of_another_dtype():
    cfg = DeepSeekConfig.tiny()
    I, d, moe = cfg.moe_inter_dim, cfg.dim, cfg.n_dense_layers
    num = NumpyWeights(cfg, init_weights(cfg, 0), device=0)
    num.device = torch.device("cpu")
    with pytest.raises(ValueError, match="out must be"):
        num.experts(moe, 0, 1, out=(torch.zeros((1, 2 * I, d), dtype=torch.float16),
                                    torch.zeros((1, d, I), dtype=torch.float16)))


def test_split_refuses_data_that_is_not_a_batchable():
    """``split(list)`` failed on ``data.check_shapes`` with a bare AttributeError."""
    with pytest.raises(TypeError, match="data must be a Batchable .*got list"):
        split([1, 2, 3])
    data, _ = synthetic(10)
    train, test = split(data, 0.3)
    assert len(train) == 7 and len(test) == 3


@pytest.mark.parametrize("dtype", ["bfloat16", torch.int32, torch.bool, torch.float8_e4m3fn, np.float32])
def test_weight_sources_refuse_a_model_dtype_they_cannot_compute_in(dtype):
    """``dtype='bfloat16'`` failed in ``Tensor.to`` as "Invalid device string", torch.int32 served every dense weight
    rounded to integers without a word; both sources now refuse a dtype that is not a torch float of >= 16 bits."""
    cfg = DeepSeekConfig.tiny()
    with pytest.raises(TypeError, match="dtype must be a torch floating dtype of 16 bits or more"):
        DeviceWeights(cfg, dtype=dtype, device=0)
    with pytest.raises(TypeError, match="dtype must be a torch floating dtype of 16 bits or more"):
        NumpyWeights(cfg, {}, dtype=dtype, device=0)
    assert DeviceWeights(cfg, device=0).dtype == torch.bfloat16 and NumpyWeights(cfg, {}, device=0).dtype == torch.float32
    assert NumpyWeights(cfg, {}, dtype=torch.float16, device=0).dtype == torch.float16


def test_numpy_weights_refuse_a_dense_tensor_of_another_config():
    """Weights of another config (a dim of 32 for a dim of 64) were served as they were and failed later in a GEMM;
    ``dense`` now names the tensor and both shapes."""
    cfg = DeepSeekConfig.tiny()
    num = NumpyWeights(cfg, init_weights(DeepSeekConfig.tiny(dim=32), 0), device=0)
    num.device = torch.device("cpu")
    with pytest.raises(ValueError, match=r"weight 'layers.0.attn.wq_a' has shape \[48, 32\], the config's is \[48, 64\]"):
        num.dense("layers.0.attn.wq_a")
    ok = NumpyWeights(cfg, init_weights(cfg, 0), device=0)
    ok.device = torch.device("cpu")
    assert tuple(ok.dense("layers.0.attn.wq_a").shape) == (48, 64)


@pytest.mark.parametrize("n, fraction, empty", [(1, 0.2, "training"), (2, 0.6, "training"), (3, 0.9, "training")])
def test_a_split_that_leaves_a_set_empty_is_refused(n, fraction, empty):
    """can_data.split gave an empty training set without a word (1 sample at 0.2: nothing to train on, which
    failed later); it now names the set and the fraction (the test set holds at least one sample at any fraction)."""
    from dwdp_ops.models.can_data import split, synthetic

    data, _ = synthetic(n, seq_len=6, seed=0)
    with pytest.raises(ValueError, match=rf"leaves the {empty} set empty"):
        split(data, fraction)
