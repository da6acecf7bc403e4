"""Review of the DeepSeek-R1 host code, the Hugging Face integration's plan and the custom ops' host checks (CPU):
bad input named where it is given, not a deep AttributeError / torch error or a silently wrong result."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dwdp_ops.models.deepseek_r1 import hf_convert  # noqa: E402
from dwdp_ops.models.deepseek_r1.config import DeepSeekConfig  # noqa: E402
from dwdp_ops.models.deepseek_r1.weights import init_weights  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    cfg = DeepSeekConfig.tiny(n_layers=2)
    return cfg, init_weights(cfg)


# -- hf_convert ------------------------------------------------------------------------------------------------------
def test_from_hf_state_dict_names_a_value_that_is_not_a_tensor(tiny):
    """A state dict of numpy arrays (safetensors.numpy.load_file) failed with "'numpy.ndarray' object has no attribute
    'is_floating_point'", naming neither the key nor what is expected."""
    cfg, W = tiny
    sd = {k: v.numpy() for k, v in hf_convert.hf_state_dict(cfg, W).items()}
    with pytest.raises(TypeError, match=r"'model.embed_tokens.weight' is a numpy.ndarray.*torch.Tensor"):
        hf_convert.from_hf_state_dict(cfg, sd)


@pytest.mark.parametrize("dtype, err", [("bfloat16", TypeError), (np.float16, TypeError), (torch.int8, ValueError)])
def test_hf_state_dict_refuses_a_dtype_that_is_not_a_floating_torch_dtype(tiny, dtype, err):
    """dtype="bfloat16" raised "Invalid device string: 'bfloat16'" (Tensor.to took it for a device), np.float16 a
    torch argument error, and torch.int8 truncated every weight to an integer without a word."""
    cfg, W = tiny
    with pytest.raises(err, match="hf_state_dict: dtype must be a floating-point torch.dtype"):
        hf_convert.hf_state_dict(cfg, W, dtype=dtype)
    assert hf_convert.hf_state_dict(cfg, W, dtype=torch.bfloat16)["lm_head.weight"].dtype == torch.bfloat16


def test_hf_state_dict_refuses_a_non_expert_weight_of_the_wrong_shape(tiny):
    """The routed experts' shapes were checked, every other tensor went into the state dict as it was: a transposed
    or cut weight came back without a word (load_state_dict then named only Hugging Face's key)."""
    cfg, W = tiny
    bad = dict(W)
    bad["layers.1.attn.wkv_b"] = W["layers.1.attn.wkv_b"].T
    with pytest.raises(ValueError, match=r"weight 'layers.1.attn.wkv_b' \(Hugging Face's "
                                         r"'model.layers.1.self_attn.kv_b_proj.weight'\) has shape \[32, 128\], this "
                                         r"config needs \[128, 32\]"):
        hf_convert.hf_state_dict(cfg, bad)


# -- integrations.transformers.plan ----------------------------------------------------------------------------------
def _hf_config(**kw):
    from types import SimpleNamespace as NS

    base = dict(model_type="deepseek_v3", hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3,
                n_routed_experts=16, num_experts_per_tok=4, first_k_dense_replace=1)
    base.update(kw)
    return NS(**base)


def test_plan_refuses_a_partition_that_is_not_an_expert_partition():
    """A tuple failed with "'tuple' object has no attribute 'num_experts'"."""
    from dwdp_ops.integrations import transformers as hf

    with pytest.raises(TypeError, match=r"partition must be a dwdp_ops.ExpertPartition or None, got tuple"):
        hf.plan(_hf_config(), 2, 0, partition=(16, 2, 8, 8), layers=[1, 2])


@pytest.mark.parametrize("field, value", [
    ("n_routed_experts", 16.7),  # had been truncated to 16 experts
    ("n_routed_experts", "16"),  # had been parsed
    ("hidden_size", 64.5),  # had been truncated
    ("hidden_size", 0),  # had been planned
    ("moe_intermediate_size", None),  # int(None): "int() argument must be ..."
    ("moe_intermediate_size", True),
])
def test_plan_names_a_config_size_that_is_not_a_positive_int(field, value):
    from dwdp_ops.integrations import transformers as hf

    with pytest.raises(ValueError, match=rf"config.{field} must be an int >= 1, got {value!r}"):
        hf.plan(_hf_config(**{field: value}), 2, 0, layers=[1, 2])
    assert hf.plan(_hf_config(hidden_size=np.int64(64)), 2, 0, layers=[1, 2]).hidden == 64


def test_plan_names_a_missing_config_size():
    """A config without moe_intermediate_size failed with AttributeError after every other check."""
    from types import SimpleNamespace as NS

    from dwdp_ops.integrations import transformers as hf

    cfg = NS(model_type="deepseek_v3", hidden_size=64, num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=4)
    with pytest.raises(ValueError, match=r"config.moe_intermediate_size must be an int >= 1, got None"):
        hf.plan(cfg, 2, 0, layers=[1, 2])


# -- dwdp_ops.torch --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [1.5, True, "1"])
def test_lookup_and_release_handle_refuse_a_handle_that_is_not_an_int(bad):
    """int(h) had turned 1.5, True and '1' into handle 1: lookup returned another object and release_handle forgot
    it without a word."""
    from dwdp_ops import torch as ops

    objs = [object() for _ in range(2)]
    hs = [ops.handle(o) for o in objs]
    try:
        with pytest.raises(TypeError, match=r"handle must be an int"):
            ops.lookup(bad)
        with pytest.raises(TypeError, match=r"handle must be an int"):
            ops.release_handle(bad)
        assert [ops.lookup(h) for h in hs] == objs and ops.lookup(np.int64(hs[0])) is objs[0]
    finally:
        for h in hs:
            ops.release_handle(h)


class TokenDispatcher:  # stand-in with the real class's name, on GPU 0
    def __init__(self):
        from types import SimpleNamespace as NS

        from dwdp_ops.partition import ExpertPartition

        self.partition = ExpertPartition.disjoint(16, 2)
        self.max_pairs, self.hidden, self.max_tokens, self.top_k = 4096, 64, 32, 4
        self.rt = NS(device=0)


def test_dispatch_and_combine_fakes_refuse_the_devices_the_ops_refuse():
    """The dispatch / combine fakes checked shapes and dtypes but not devices: a trace accepted tensors on another GPU
    than the dispatcher's, or on two GPUs, which the eager ops refuse (the fakes of expert_mlp, wait and release
    check them)."""
    from dwdp_ops import torch as ops
    from torch._subclasses.fake_tensor import FakeTensorMode

    h = ops.handle(TokenDispatcher())
    try:
        with FakeTensorMode():
            bf = torch.bfloat16

            def args(x_dev, ids_dev="cuda:0"):
                return (torch.empty((12, 64), dtype=bf, device=x_dev),
                        torch.empty((12, 4), dtype=torch.int64, device=ids_dev),
                        torch.empty((12, 4), device=ids_dev))

            xg, offs = torch.ops.dwdp.dispatch(*args("cuda:0"), h, -1)  # valid: traced
            assert xg.device == torch.device("cuda:0") and offs.shape == (8,)
            with pytest.raises(ValueError, match=r"dwdp::dispatch: the tensors must be on the library object's GPU, "
                                                 r"cuda:0, got x on cuda:1"):
                torch.ops.dwdp.dispatch(*args("cuda:1", "cuda:1"), h, -1)
            with pytest.raises(ValueError, match=r"dwdp::dispatch: every tensor must be on one device"):
                torch.ops.dwdp.dispatch(*args("cuda:0", "cuda:1"), h, -1)
            x0 = torch.empty((12, 64), dtype=bf, device="cuda:0")
            assert torch.ops.dwdp.combine(torch.empty((100, 64), dtype=bf, device="cuda:0"), x0, h).shape == (12, 64)
            with pytest.raises(ValueError, match=r"dwdp::combine: every tensor must be on one device, got y_grouped on "
                                                 r"cuda:1, x on cuda:0"):
                torch.ops.dwdp.combine(torch.empty((100, 64), dtype=bf, device="cuda:1"), x0, h)
    finally:
        ops.release_handle(h)


# -- memory / reference: the config argument -------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [None, {"n_layers": 61}])
def test_plan_memory_and_the_reference_model_name_a_config_that_is_not_a_deepseek_config(cfg):
    """plan_memory(None, 8) failed with "'NoneType' object has no attribute 'n_routed_experts'", ReferenceModel with
    yarn_freqs' AttributeError."""
    from dwdp_ops.models.deepseek_r1.memory import plan_memory
    from dwdp_ops.models.deepseek_r1.reference import ReferenceModel

    with pytest.raises(TypeError, match=r"plan_memory: cfg must be a DeepSeekConfig, got"):
        plan_memory(cfg, 8)
    with pytest.raises(TypeError, match=r"ReferenceModel: cfg must be a DeepSeekConfig, got"):
        ReferenceModel(cfg, {})


def test_the_gate_refuses_nan_logits_and_a_non_finite_bias():
    """NaN router logits (or a NaN / infinite bias) gave NaN weights for experts chosen by where argsort puts NaN
    (experts 8 to 11 of 16 for all-NaN logits), without a word."""
    from dwdp_ops.models.deepseek_r1.reference import select_experts

    bias = np.zeros(16)
    logits = np.zeros((2, 16))
    logits[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"router_logits must not be NaN \(token 1\)"):
        select_experts(logits, bias, 4, 2, 4, 1.0)
    bias[5] = np.inf
    with pytest.raises(ValueError, match=r"correction_bias must be finite"):
        select_experts(np.zeros((2, 16)), bias, 4, 2, 4, 1.0)
    w, _ = select_experts(np.full((1, 16), np.inf), np.zeros(16), 4, 2, 4, 1.0)  # saturated: sigmoid 1, as before
    assert np.allclose(w, 0.25)


def test_a_config_with_yarns_betas_reversed_is_refused():
    """beta_fast < beta_slow reversed YaRN's ramp (yarn_freqs: low above high), so the wrong frequency dims were
    scaled without a word; it is refused by name, and equal betas (a step ramp) still pass."""
    import dataclasses

    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig

    tiny = DeepSeekConfig.tiny()
    with pytest.raises(ValueError, match=r"beta_fast \(1\) must be >= beta_slow \(32\)"):
        dataclasses.replace(tiny, beta_fast=1, beta_slow=32)
    assert dataclasses.replace(tiny, beta_fast=4, beta_slow=4).beta_fast == 4
