"""Our DeepSeek-R1 as Hugging Face transformers' ``DeepseekV3ForCausalLM`` (transformers 5.x): the configuration
(``hf_config``) and the weights of ``init_weights`` (or a checkpoint read by ``load_safetensors``) under Hugging Face's
parameter names (``hf_state_dict``), and back (``from_hf_state_dict``). The external check of our numpy reference and
``GpuModel`` (``tests/test_hf_external_check.py``, ``tests/test_gpu_transformers.py``) loads the same weights into both.

What the mapping rests on (read in transformers 5.17.0, ``models/deepseek_v3/modeling_deepseek_v3.py``):

  * names: ``attn_norm`` / ``ffn_norm`` are ``input_layernorm`` / ``post_attention_layernorm``; ``wq_a``, ``q_norm``,
    ``wq_b``, ``wkv_a``, ``kv_norm``, ``wkv_b``, ``wo`` are ``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``,
    ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``; ``w1`` / ``w3`` / ``w2`` are ``gate_proj`` /
    ``up_proj`` / ``down_proj`` (dense MLP and shared experts); the router is ``mlp.gate.weight`` with the buffer
    ``mlp.gate.e_score_correction_bias`` (``gate_bias``); every ``[out, in]`` as ours, no transposition;
  * routed experts: ``mlp.experts.gate_up_proj [E, 2I, H]`` (the gate rows, then the up rows: ``chunk(2)``) and
    ``mlp.experts.down_proj [E, H, I]``, our fp8 e4m3 codes dequantised with their 128 x 128 block scales
    (``dequant_fp8``); Hugging Face holds them in the model dtype;
  * RoPE: ``rope_interleave=True`` rotates adjacent pairs ``(x[2i], x[2i+1])`` as the official code does (its output
    is de-interleaved, for q and k alike, which leaves q.k unchanged), so the rope rows of ``wq_b`` and ``wkv_a`` need
    no permutation;
  * YaRN (when ``max_seq_len > original_seq_len``, as in the official ``precompute_freqs_cis``): ``rope_type 'yarn'``
    with ``factor``, ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow`` and the default
    ``truncate=True`` (floor / ceil of the correction range) gives the official frequencies. Hugging Face also
    multiplies cos and sin by an ``attention_factor`` (``mscale / mscale_all_dim`` ratio of YaRN's mscale, or
    ``0.1 ln(factor) + 1`` when either is unset), which the official code does not: it is set to ``1.0`` here. The
    softmax scale's ``mscale**2`` comes from ``mscale_all_dim`` (``yarn_apply_mscale``), set to our ``mscale``;
  * the router (``DeepseekV3TopkRouter``): float32 logits, sigmoid, ``+ e_score_correction_bias``, groups ranked by
    the sum of their top-2, the dropped groups' experts masked with ``-inf`` (line 162 in 5.17.0; earlier releases
    masked with ``0.0``, see ``tests/test_hf_external_check.py``), top-k, weights the unbiased scores normalised
    (``norm_topk_prob=True``, ``+ 1e-20`` in the denominator) times ``routed_scaling_factor``;
  * ``first_k_dense_replace`` is ``n_dense_layers``; no multi-token-prediction layer (``num_mtp_layers=0``); no
    bos / eos / pad token (our model has none: ``generate`` never stops early).

Configurations Hugging Face cannot express raise ``ValueError`` naming why (``check_expressible``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .config import DeepSeekConfig
from .weights import dequant_fp8

__all__ = ["check_expressible", "from_hf_state_dict", "hf_config", "hf_model", "hf_name_map", "hf_state_dict"]

# ours (after "layers.{l}.") -> Hugging Face's (after "model.layers.{l}.")
_ATTN = (("attn_norm", "input_layernorm.weight"), ("ffn_norm", "post_attention_layernorm.weight"),
         ("attn.wq_a", "self_attn.q_a_proj.weight"), ("attn.q_norm", "self_attn.q_a_layernorm.weight"),
         ("attn.wq_b", "self_attn.q_b_proj.weight"), ("attn.wkv_a", "self_attn.kv_a_proj_with_mqa.weight"),
         ("attn.kv_norm", "self_attn.kv_a_layernorm.weight"), ("attn.wkv_b", "self_attn.kv_b_proj.weight"),
         ("attn.wo", "self_attn.o_proj.weight"))
_DENSE = (("ffn.w1", "mlp.gate_proj.weight"), ("ffn.w3", "mlp.up_proj.weight"), ("ffn.w2", "mlp.down_proj.weight"))
_MOE = (("ffn.gate", "mlp.gate.weight"), ("ffn.gate_bias", "mlp.gate.e_score_correction_bias"),
        ("ffn.shared.w1", "mlp.shared_experts.gate_proj.weight"), ("ffn.shared.w3", "mlp.shared_experts.up_proj.weight"),
        ("ffn.shared.w2", "mlp.shared_experts.down_proj.weight"))
_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# rotary buffers, not weights: non-persistent in transformers 5.x, saved by older versions (also per attention layer)
_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


def check_expressible(cfg: DeepSeekConfig) -> None:
    """Raises ``ValueError`` naming what of ``cfg`` Hugging Face's DeepSeek-V3 (or our weights' layout in it) cannot
    express; returns None otherwise."""
    per_group = cfg.n_routed_experts // cfg.n_expert_groups
    if cfg.n_moe_layers and per_group < 2:
        raise ValueError(f"Hugging Face's router ranks a group by the sum of its top-2 scores (topk(2) over the "
                         f"group): it needs >= 2 experts per group, this config has {per_group} "
                         f"({cfg.n_routed_experts} experts in {cfg.n_expert_groups} groups)")
    if cfg.q_lora_rank <= 0:
        raise ValueError(f"q_lora_rank {cfg.q_lora_rank}: our weights always have the LoRA query (wq_a, q_norm, wq_b); "
                         f"a direct query projection (Hugging Face's q_lora_rank=None) has no counterpart here")
    if cfg.max_seq_len > cfg.original_seq_len and cfg.rope_factor < 1:
        raise ValueError(f"rope_factor {cfg.rope_factor} < 1 with YaRN on: the official softmax scale uses "
                         f"0.1 * mscale * ln(factor) + 1 for any factor, Hugging Face's yarn_get_mscale returns 1.0 "
                         f"for factor <= 1")


def hf_config(cfg: DeepSeekConfig, **overrides: Any):
    """A ``transformers.DeepseekV3Config`` of the same model (module docstring); ``overrides`` are passed on (for
    example ``attn_implementation``). Raises ``ValueError`` on what it cannot express (``check_expressible``)."""
    import transformers

    check_expressible(cfg)
    if cfg.max_seq_len > cfg.original_seq_len:
        rope = {"rope_type": "yarn", "rope_theta": float(cfg.rope_theta), "factor": float(cfg.rope_factor),
                "original_max_position_embeddings": int(cfg.original_seq_len), "beta_fast": float(cfg.beta_fast),
                "beta_slow": float(cfg.beta_slow), "mscale": float(cfg.mscale), "mscale_all_dim": float(cfg.mscale),
                "attention_factor": 1.0}
    else:  # the official code uses plain RoPE and the plain softmax scale then
        rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    kw = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.inter_dim,
        moe_intermediate_size=cfg.moe_inter_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=float(cfg.route_scale), kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups, num_experts_per_tok=cfg.n_activated_experts,
        first_k_dense_replace=cfg.n_dense_layers, norm_topk_prob=True, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=float(cfg.rms_eps), rope_parameters=rope,
        rope_interleave=True, attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False,
        num_mtp_layers=0, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    kw.update(overrides)
    return transformers.DeepseekV3Config(**kw)


def hf_name_map(cfg: DeepSeekConfig) -> dict[str, str]:
    """Our name -> Hugging Face's name of every tensor other than the routed experts (1:1, same shape)."""
    out = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}
    for layer in range(cfg.n_layers):
        pairs = _ATTN + (_DENSE if layer < cfg.n_dense_layers else _MOE)
        out.update({f"layers.{layer}.{a}": f"model.layers.{layer}.{b}" for a, b in pairs})
    return out


def _experts(cfg: DeepSeekConfig, W: dict[str, np.ndarray], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """``(gate_up_proj [E, 2I, H], down_proj [E, H, I])`` float32 of a MoE layer, dequantised. A missing tensor
    raises KeyError, a wrong shape or a tensor ``dequant_fp8`` refuses ValueError, each naming our tensor and Hugging
    Face's."""
    p = f"layers.{layer}.ffn.experts."
    E, I, d = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
    gate_up = np.empty((E, 2 * I, d), np.float32)
    down = np.empty((E, d, I), np.float32)
    for e in range(E):
        q = f"{p}{e}."
        for n, out, src in (("w1", gate_up[e, :I], 0), ("w3", gate_up[e, I:], 0), ("w2", down[e], 1)):
            theirs = f"Hugging Face's 'model.layers.{layer}.{_EXPERTS[src]}', expert {e}"
            for k in (q + n, q + n + ".scale"):
                if k not in W:
                    raise KeyError(f"weight {k!r} ({theirs}) is missing from the weights")
            if tuple(np.shape(W[q + n])) != out.shape:  # a transposed one (with its scales) would not broadcast
                raise ValueError(f"weight {q + n!r} ({theirs}) has shape {list(np.shape(W[q + n]))}, this config "
                                 f"needs {list(out.shape)}")
            try:
                out[...] = dequant_fp8(W[q + n], W[q + n + ".scale"], cfg.block)
            except ValueError as err:  # dequant_block's message names neither the tensor nor the expert
                raise ValueError(f"weight {q + n!r} ({theirs}): {err}") from err
    return gate_up, down


def _float_dtype(where: str, dtype: Any):
    """``dtype`` (None: float32) as a floating-point ``torch.dtype``; a string or numpy dtype raises TypeError
    (Tensor.to takes a string for a device), an integer or complex torch dtype ValueError (it would truncate the
    weights)."""
    import torch

    if dtype is None:
        return torch.float32
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{where}: dtype must be a floating-point torch.dtype (torch.bfloat16, say) or None, got "
                        f"{dtype!r} ({type(dtype).__name__})")
    if not dtype.is_floating_point:
        raise ValueError(f"{where}: dtype must be a floating-point torch.dtype (torch.bfloat16, say) or None, got "
                         f"{dtype}")
    return dtype


def hf_state_dict(cfg: DeepSeekConfig, W: dict[str, np.ndarray], dtype: Any = None) -> dict:
    """``W`` (``init_weights(cfg)`` or a checkpoint of the same names) as ``DeepseekV3ForCausalLM``'s state dict:
    ``{name: torch.Tensor}`` in ``dtype`` (default float32), the router's ``e_score_correction_bias`` in float32 always
    (transformers keeps it so: ``_keep_in_fp32_modules_strict``); routed experts dequantised from fp8 to float32 first.
    Load with ``model.load_state_dict(sd, strict=True)``. A missing tensor raises KeyError, one of another shape than
    ``cfg`` gives ValueError (each naming our tensor and Hugging Face's); a ``dtype`` that is not a floating-point
    ``torch.dtype`` TypeError / ValueError."""
    import torch

    from .gpu_weights import dense_shapes

    dtype = _float_dtype("hf_state_dict", dtype)
    check_expressible(cfg)
    shapes = dense_shapes(cfg)

    def t(a: np.ndarray, dt=dtype):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dt)

    sd = {}
    for ours, theirs in hf_name_map(cfg).items():
        if ours not in W:
            raise KeyError(f"weight {ours!r} (Hugging Face's {theirs!r}) is missing from the weights")
        if tuple(np.shape(W[ours])) != shapes[ours][0]:  # (a transposed one had gone into the state dict as it was)
            raise ValueError(f"weight {ours!r} (Hugging Face's {theirs!r}) has shape {list(np.shape(W[ours]))}, this "
                             f"config needs {list(shapes[ours][0])}")
        sd[theirs] = t(W[ours], torch.float32 if theirs.endswith("e_score_correction_bias") else dtype)
    for layer in range(cfg.n_dense_layers, cfg.n_layers):
        gate_up, down = _experts(cfg, W, layer)
        sd[f"model.layers.{layer}.{_EXPERTS[0]}"] = t(gate_up)
        sd[f"model.layers.{layer}.{_EXPERTS[1]}"] = t(down)
    return sd


def hf_model(cfg: DeepSeekConfig, W: dict[str, np.ndarray], dtype: Any = None, device: Any = None, *,
             attn_implementation: str = "eager", experts_implementation: str = "eager"):
    """A ``DeepseekV3ForCausalLM`` holding ``W``, in eval mode, on ``device``, in ``dtype`` (default float32), held
    the way ``from_pretrained`` holds a checkpoint of that dtype: every router's ``e_score_correction_bias`` and the
    rotary inverse frequencies stay float32 (a plain ``model.to(bfloat16)`` rounds both: the first moves routing
    decisions, the second every rope angle by up to 2**-9 relative). Attention and experts default to Hugging Face's
    plain implementations (``eager``: the reference loops, not SDPA or ``grouped_mm``)."""
    import transformers

    dtype = _float_dtype("hf_model", dtype)
    config = hf_config(cfg, attn_implementation=attn_implementation, experts_implementation=experts_implementation)
    model = transformers.DeepseekV3ForCausalLM(config)
    model.load_state_dict(hf_state_dict(cfg, W), strict=True)
    # (module, buffer name, its float32 value) to restore after the cast
    rot = model.model.rotary_emb
    keep = [(rot, n, getattr(rot, n).detach().clone()) for n in ("inv_freq", "original_inv_freq") if hasattr(rot, n)]
    keep += [(layer.mlp.gate, "e_score_correction_bias", layer.mlp.gate.e_score_correction_bias.detach().clone())
             for layer in model.model.layers if hasattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias")]
    model = model.to(device=device, dtype=dtype).eval()
    for module, name, t in keep:
        setattr(module, name, t.to(getattr(module, name).device))
    return model


def from_hf_state_dict(cfg: DeepSeekConfig, sd: dict, *, strict: bool = False) -> dict[str, np.ndarray]:
    """The inverse of ``hf_state_dict``: a ``DeepseekV3ForCausalLM`` state dict (tensors of bfloat16, float16, float32
    or float64; fp8 and integer tensors raise ValueError) as our weight dict. Every tensor but the routed experts maps
    back exactly (as float32); the routed experts are encoded
    as fp8 e4m3 with ``cfg.block`` x ``cfg.block`` scales (``dwdp_ops.quant.quant_block``), which is lossy (e4m3 has
    3 mantissa bits; the scales are each block's amax / 448, not the original ones), so a round trip of
    ``hf_state_dict`` returns the experts to fp8 rounding only. Keys of ``sd`` that ``hf_state_dict`` would not
    produce for ``cfg`` (a multi-token-prediction layer such as DeepSeek-R1's ``model.layers.61.*``, another model's
    keys) are dropped with one warning giving their count and the first five, or refused with ``ValueError`` when
    ``strict``; the rotary ``inv_freq`` buffers older transformers saved are dropped silently."""
    import torch

    from ...quant import quant_block
    from .gpu_weights import dense_shapes

    def a(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in sd:
            raise KeyError(f"{name!r} is missing from the Hugging Face state dict")
        t = sd[name]
        if not isinstance(t, torch.Tensor):  # (a numpy array failed on t.is_floating_point, naming no key)
            raise TypeError(f"{name!r} is a {type(t).__module__}.{type(t).__name__}: the state dict's values must be "
                            "torch.Tensor (torch.from_numpy converts numpy arrays)")
        if tuple(t.shape) != tuple(shape):  # a transposed or other-layout tensor would be mislabelled silently
            raise ValueError(f"{name!r} has shape {list(t.shape)}, this config needs {list(shape)} (Hugging Face's "
                             "DeepseekV3 layout; check the config and the transformers version)")
        if not t.is_floating_point() or t.element_size() < 2:  # fp8 values are off by block scales held elsewhere
            raise ValueError(f"{name!r} is {t.dtype}: the weights must be bfloat16, float16 or float32 (or float64); "
                             "an fp8 checkpoint's weights need their weight_scale_inv (load it with "
                             "dequantize=True), integer ones their quantisation scales")
        return t.detach().float().cpu().numpy()

    names = hf_name_map(cfg)
    taken = set(names.values()) | {f"model.layers.{layer}.{n}" for layer in range(cfg.n_dense_layers, cfg.n_layers)
                                   for n in _EXPERTS}
    unmapped = sorted(k for k in sd if k not in taken and not str(k).endswith(_BUFFERS))
    if unmapped:
        first = ", ".join(repr(k) for k in unmapped[:5]) + (", ..." if len(unmapped) > 5 else "")
        msg = (f"from_hf_state_dict: {len(unmapped)} key(s) of the state dict have no counterpart in our weights: "
               f"{first}; this config takes the {len(taken)} keys hf_state_dict(cfg, W) produces (model.embed_tokens, "
               f"model.layers.0 to {cfg.n_layers - 1}, model.norm, lm_head; no multi-token-prediction layer)")
        if strict:
            raise ValueError(msg)
        warnings.warn(msg + "; they are dropped (strict=True refuses them)", stacklevel=2)
    shapes = dense_shapes(cfg)
    W = {ours: a(theirs, shapes[ours][0]) for ours, theirs in names.items()}
    E, I, H = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
    for layer in range(cfg.n_dense_layers, cfg.n_layers):
        gate_up, down = (a(f"model.layers.{layer}.{n}", shape)
                         for n, shape in zip(_EXPERTS, ((E, 2 * I, H), (E, H, I))))
        p = f"layers.{layer}.ffn.experts."
        for e in range(cfg.n_routed_experts):
            for n, w, src in (("w1", gate_up[e, :I], 0), ("w3", gate_up[e, I:], 0), ("w2", down[e], 1)):
                try:
                    W[f"{p}{e}.{n}"], W[f"{p}{e}.{n}.scale"] = quant_block(w, cfg.block)
                except ValueError as err:  # quant_block's message names neither the tensor nor the expert
                    raise ValueError(f"'model.layers.{layer}.{_EXPERTS[src]}', expert {e} (our {p}{e}.{n}): "
                                     f"{err}") from err
    return W
