"""The external check of our DeepSeek-R1 (issue 15): the same random weights in Hugging Face's ``DeepseekV3ForCausalLM``
(transformers 5.17, float32, eager attention and experts) and in our numpy ``ReferenceModel``, through
``models.deepseek_r1.hf_convert``; and Hugging Face's router against the official gate where masking the dropped
groups with 0.0 instead of -inf changes the choice. The bf16 check of ``GpuModel`` is in ``test_gpu_transformers.py``.

Tolerance of the float32 comparison: ``TOL = 1e-5`` (relative, 2-norm over the vocabulary, per request and step).
Both sides compute the same float32 arithmetic in different orders (numpy vs PyTorch GEMMs, rope frequencies in
float64 vs float32, both naive MLA); float32 rounds at 2**-24 = 6e-8 per operation, and the measured error is 3-5e-7 (the figure is printed and in docs/usage.md), so TOL leaves a factor 25-50 for other
prompts and seeds. What a mapping error costs is measured by ``test_the_check_sees_a_wrong_mapping``: 1.3e-2 to 6.5e-2, over 1000
times TOL (the check's weights make the layers, not the embedding, carry the logits: ``hf_external.check_weights``).
"""

from __future__ import annotations

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, ReferenceModel, select_experts  # noqa: E402
from dwdp_ops.models.deepseek_r1 import hf_convert as hc  # noqa: E402
from dwdp_ops.models.deepseek_r1.reference import yarn_freqs  # noqa: E402
from hf_external import (  # noqa: E402
    CONFIG,
    PROMPTS,
    STEPS,
    check_weights,
    comparable_error,
    hf_greedy,
    reference_greedy,
)

TOL = 1e-5
NO_YARN = CONFIG.replace(max_seq_len=CONFIG.original_seq_len)  # plain RoPE and softmax scale (prompts + steps fit)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def moe_layers(model):
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]


def zero_masked_router_forward(self, hidden_states):
    """``DeepseekV3TopkRouter`` as transformers 4.x had it (``get_topk_indices``: the dropped groups' experts
    ``masked_fill(~score_mask.bool(), 0.0)``; huggingface/transformers at commit 00b676f8, for example). Everything
    else as 5.17 (float32 logits, sigmoid, top-2 group sums, normalised weights times the scaling factor)."""
    x = hidden_states.view(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(x.float(), self.weight.float())
    scores = logits.sigmoid()
    choice = scores + self.e_score_correction_bias
    E, G = self.num_experts, self.num_group
    group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
    choice = choice.masked_fill(~score_mask.bool(), 0.0)
    idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * self.routed_scaling_factor
    return logits, w, idx


# -- the converter -----------------------------------------------------------------------------------------------------
def test_converter_maps_every_tensor_and_refuses_what_hugging_face_cannot_express():
    cfg, W = CONFIG, check_weights()
    model = hc.hf_model(cfg, W)
    sd = hc.hf_state_dict(cfg, W)
    want = model.state_dict()
    assert set(sd) == set(want)
    assert all(tuple(sd[k].shape) == tuple(want[k].shape) for k in sd)
    # YaRN: the official frequencies, the official softmax scale, cos/sin not scaled
    attn = model.model.layers[0].self_attn
    assert attn.scaling == pytest.approx(cfg.softmax_scale, rel=1e-12)
    assert model.model.rotary_emb.attention_scaling == 1.0
    np.testing.assert_allclose(model.model.rotary_emb.inv_freq.numpy(), yarn_freqs(cfg)[1], rtol=1e-6)
    plain = hc.hf_model(NO_YARN, W)
    assert plain.config.rope_parameters["rope_type"] == "default"
    assert plain.model.layers[0].self_attn.scaling == pytest.approx(NO_YARN.qk_head_dim**-0.5, rel=1e-12)
    # bf16 as from_pretrained holds it: the correction bias and the rope frequencies stay float32
    bf = hc.hf_model(cfg, W, torch.bfloat16)
    assert bf.lm_head.weight.dtype == torch.bfloat16 and bf.model.rotary_emb.inv_freq.dtype == torch.float32
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for _, m in moe_layers(bf))
    # the inverse: everything but the routed experts exactly, those to fp8 rounding
    back = hc.from_hf_state_dict(cfg, sd)
    assert set(back) == set(W)
    assert set(hc.from_hf_state_dict(cfg, want, strict=True)) == set(W)  # every key of a real state dict consumed
    for k in W:
        if ".experts." not in k:
            np.testing.assert_array_equal(back[k], W[k])
    from dwdp_ops.models.deepseek_r1 import dequant_fp8

    for e in (0, 33, 63):
        p = f"layers.2.ffn.experts.{e}.w3"
        a, b = (dequant_fp8(V[p], V[p + ".scale"], cfg.block) for V in (back, W))
        assert rel(a, b) < 0.05  # e4m3: 3 mantissa bits, ~2.5 % RMS rounding
    with pytest.raises(ValueError, match="needs >= 2 experts per group, this config has 1"):
        hc.hf_config(DeepSeekConfig.tiny(n_routed_experts=8, n_expert_groups=8, n_limited_groups=4))
    with pytest.raises(ValueError, match="q_lora_rank must be >= 1, got 0: our weights always have the LoRA query"):
        DeepSeekConfig.tiny(q_lora_rank=0)  # refused by the config itself since it checks its fields
    with pytest.raises(ValueError, match="rope_factor 0.5 < 1 with YaRN"):
        hc.hf_config(DeepSeekConfig.tiny(rope_factor=0.5))
    with pytest.raises(KeyError, match="layers.1.ffn.gate"):
        hc.hf_state_dict(cfg, {k: v for k, v in W.items() if k != "layers.1.ffn.gate"})


# -- the model in float32 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [CONFIG, NO_YARN], ids=["yarn", "plain_rope"])
def test_hugging_face_and_the_reference_agree_in_float32(cfg):
    """Prefill logits of every position, greedy tokens and logits over STEPS steps through Hugging Face's KV cache and
    through ``generate()``, and per MoE layer the routed experts and the layer's output on the same input."""
    W = check_weights(cfg)
    model = hc.hf_model(cfg, W)
    caught = []
    hooks = [m.register_forward_hook(lambda mod, a, out, i=i: caught.append((i, a[0].detach(), out.detach())))
             for i, m in moe_layers(model)]
    hooks += [m.gate.register_forward_hook(lambda mod, a, out, i=i: caught.append((i, "ids", out[2].detach())))
              for i, m in moe_layers(model)]
    with torch.no_grad():
        full = model(torch.tensor(PROMPTS)).logits.numpy()
    for h in hooks:
        h.remove()
    prefill_errs, layer_errs = [], []
    for r, prompt in enumerate(PROMPTS):
        ref = ReferenceModel(cfg, W)
        want = ref.forward(prompt, 0)  # every position
        prefill_errs.append(max(rel(full[r, s], want[s]) for s in range(len(prompt))))
        for layer, x, y in [c for c in caught if not isinstance(c[1], str)]:
            xr = x[r].numpy()
            layer_errs.append(rel(y[r].numpy(), ref.moe(layer, xr)))
            hf_ids = next(c[2] for c in caught if c[0] == layer and isinstance(c[1], str)).view(len(PROMPTS), -1,
                                                                                                  cfg.n_activated_experts)
            assert [sorted(t) for t in hf_ids[r].tolist()] == [sorted(t) for t in ref.last_ids[layer].tolist()], layer
    tokens, logits = hf_greedy(model, PROMPTS, STEPS)
    ref_tokens, ref_logits = reference_greedy(cfg, W, PROMPTS, STEPS)
    err, pairs = comparable_error(tokens, logits, ref_tokens, ref_logits)
    with torch.no_grad():
        gen = model.generate(torch.tensor(PROMPTS), max_new_tokens=STEPS, do_sample=False)
    msg = (f"{cfg.n_routed_experts} experts, float32: prefill rel err {max(prefill_errs):.2e} (every position), "
           f"greedy {err:.2e} over {pairs} steps, MoE layer outputs {max(layer_errs):.2e}; TOL {TOL:g}")
    print(msg)
    assert tokens == ref_tokens, msg
    assert gen[:, len(PROMPTS[0]):].tolist() == ref_tokens, msg
    assert max(prefill_errs) <= TOL and err <= TOL and max(layer_errs) <= TOL, msg


def _build(cfg, sd, **overrides):
    config = hc.hf_config(cfg, attn_implementation="eager", experts_implementation="eager", **overrides)
    m = transformers.DeepseekV3ForCausalLM(config)
    m.load_state_dict(sd, strict=True)
    return m.eval()


def _swap_gate_up(cfg, sd):
    I = cfg.moe_inter_dim
    for k in [k for k in sd if k.endswith("gate_up_proj")]:
        sd[k] = torch.cat([sd[k][:, I:], sd[k][:, :I]], 1)
    return sd


def _no_bias(cfg, sd):
    for k in [k for k in sd if k.endswith("e_score_correction_bias")]:
        sd[k] = torch.zeros_like(sd[k])
    return sd


MUTATIONS = {
    # Hugging Face's other rope layout (rotate_half over the halves, not adjacent pairs)
    "rope_interleave_false": (dict(rope_interleave=False), None),
    # YaRN as Hugging Face fills it in: cos/sin scaled by 0.1 ln(factor) + 1, no mscale**2 in the softmax scale
    "yarn_defaults": (dict(rope_parameters={"rope_type": "yarn", "rope_theta": CONFIG.rope_theta,
                                            "factor": CONFIG.rope_factor,
                                            "original_max_position_embeddings": CONFIG.original_seq_len}), None),
    "experts_gate_up_swapped": ({}, _swap_gate_up),
    "correction_bias_not_loaded": ({}, _no_bias),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_the_check_sees_a_wrong_mapping(name):
    """A plausible conversion mistake moves the prefill logits by far more than TOL: the check can tell."""
    cfg, W = CONFIG, check_weights()
    overrides, edit = MUTATIONS[name]
    sd = hc.hf_state_dict(cfg, W)
    model = _build(cfg, edit(cfg, sd) if edit else sd, **overrides)
    with torch.no_grad():
        got = model(torch.tensor(PROMPTS)).logits.numpy()
    err = max(rel(got[r], ReferenceModel(cfg, W).forward(p, 0)) for r, p in enumerate(PROMPTS))
    print(f"{name}: prefill rel err {err:.2e} ({err / TOL:.0f} x TOL)")
    assert err >= 100 * TOL, err


# -- the gate ----------------------------------------------------------------------------------------------------------
def test_hugging_faces_router_is_the_official_gate_and_zero_masking_differs_exactly_where_a_chosen_score_is_negative():
    """Where the k-th expert the official gate chooses has a negative biased score (sigmoid + correction bias < 0),
    a gate that masks the dropped groups with 0.0 picks an expert of a dropped group instead (0.0 beats it); where
    that score is positive the two agree. transformers 5.17's router masks with -inf (modeling_deepseek_v3.py line
    162) and equals the official gate (``select_experts``) in every case, ids and weights."""
    cfg, W = CONFIG, check_weights()
    layer = cfg.n_dense_layers
    router = moe_layers(hc.hf_model(cfg, W))[0][1].gate
    zero_router = types.SimpleNamespace(**{n: getattr(router, n) for n in (
        "hidden_dim", "weight", "num_experts", "num_group", "topk_group", "top_k", "routed_scaling_factor")})
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((256, cfg.dim)).astype(np.float32))
    logits = x.numpy() @ W[f"layers.{layer}.ffn.gate"].T
    counts = {}
    for name, bias in (("init", W[f"layers.{layer}.ffn.gate_bias"]),  # std 0.5
                       ("init - 0.8", W[f"layers.{layer}.ffn.gate_bias"] - 0.8),  # some tokens
                       ("-2", np.full(cfg.n_routed_experts, -2.0, np.float32))):  # every biased score < 0
        b = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
        router.e_score_correction_bias = b
        zero_router.e_score_correction_bias = b
        with torch.no_grad():
            _, hf_w, hf_ids = router(x)
            _, _, z_ids = zero_masked_router_forward(zero_router, x)
        w, ids = select_experts(logits, bias, cfg.n_expert_groups, cfg.n_limited_groups, cfg.n_activated_experts,
                                cfg.route_scale)
        # Hugging Face 5.17 = official: the same experts, the same weights
        order = hf_ids.argsort(-1)
        assert [sorted(t) for t in hf_ids.tolist()] == [sorted(t) for t in ids.tolist()], name
        np.testing.assert_allclose(np.take_along_axis(hf_w.numpy(), order.numpy(), -1),
                                   np.take_along_axis(w, np.argsort(ids, -1), -1), rtol=1e-5)
        # 0.0 masking differs exactly where the k-th chosen biased score is negative
        kth = (1 / (1 + np.exp(-np.take_along_axis(logits, ids, -1))) + bias[ids]).min(-1)
        differs = np.array([set(a) != set(z) for a, z in zip(ids.tolist(), z_ids.tolist())])
        np.testing.assert_array_equal(differs, kth < 0, err_msg=name)
        # and what 0.0 masking adds comes from the dropped groups
        per = cfg.n_routed_experts // cfg.n_expert_groups
        for a, z in zip(ids.tolist(), z_ids.tolist()):
            kept = {e // per for e in a}
            assert all(e // per not in kept for e in set(z) - set(a)), name
        counts[name] = int(differs.sum())
    print(f"tokens of 256 where 0.0 masking picks other experts: {counts}")
    assert counts["init"] == 0 and 0 < counts["init - 0.8"] < 256 and counts["-2"] == 256, counts


def test_where_zero_masking_matters_hugging_face_still_equals_the_reference_and_a_zero_masked_router_does_not():
    """The whole model with every router's correction bias at -2 (every biased score negative, the case where 0.0
    masking picks dropped groups' experts for every token): transformers 5.17 equals the reference to TOL; the same
    model with its routers masking with 0.0 (transformers 4.x) is far off."""
    cfg, W = CONFIG, check_weights()
    for layer in range(cfg.n_dense_layers, cfg.n_layers):
        W[f"layers.{layer}.ffn.gate_bias"] = np.full(cfg.n_routed_experts, -2.0, np.float32)
    model = hc.hf_model(cfg, W)
    want = [ReferenceModel(cfg, W).forward(p, 0) for p in PROMPTS]
    with torch.no_grad():
        got = model(torch.tensor(PROMPTS)).logits.numpy()
        for _, m in moe_layers(model):
            m.gate.forward = types.MethodType(zero_masked_router_forward, m.gate)
        zero = model(torch.tensor(PROMPTS)).logits.numpy()
    err = max(rel(got[r], want[r]) for r in range(len(PROMPTS)))
    err_zero = max(rel(zero[r], want[r]) for r in range(len(PROMPTS)))
    print(f"correction bias -2: transformers {transformers.__version__} rel err {err:.2e}, "
          f"0.0-masking router {err_zero:.2e}")
    assert err <= TOL, err
    assert err_zero >= 100 * TOL, err_zero
