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
