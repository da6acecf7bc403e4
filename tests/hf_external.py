"""Shared by the external check of our DeepSeek-R1 against Hugging Face's ``DeepseekV3ForCausalLM``
(``test_hf_external_check.py`` on the CPU, ``test_gpu_transformers.py`` on a GPU): the configuration, the weights,
the prompts and Hugging Face's greedy loop. Not a test module (no ``test_`` prefix)."""

from __future__ import annotations

import numpy as np
from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, init_weights

# the tiny structure (MLA with LoRA ranks, YaRN on: max_seq_len 128 > original_seq_len 32, one dense layer then three
# MoE layers, a shared expert) with the router of the issue: 64 experts in 8 groups, the top 4 groups kept, top-6
CONFIG = DeepSeekConfig.tiny(vocab_size=256, n_routed_experts=64, n_expert_groups=8, n_limited_groups=4,
                             n_activated_experts=6)
SEED = 0
STEPS = 6
# two prompts of equal length: one batch for Hugging Face without padding, and one dense prefill attention call for
# GpuModel (no variable-length kernel)
_rng = np.random.default_rng(SEED)
PROMPTS = [_rng.integers(0, CONFIG.vocab_size, 12).tolist() for _ in range(2)]
EMBED_SCALE = 0.02


def check_weights(cfg: DeepSeekConfig = CONFIG, seed: int = SEED) -> dict[str, np.ndarray]:
    """``init_weights(cfg, seed)`` with two changes, the same for every model that loads them:

    * the embedding scaled by ``EMBED_SCALE`` (std 0.02, not 1): with the unit-std embedding the residual stream is
      the embedding and the layers hardly move the logits (zeroing every routed expert moves them by 0.36 %, every
      attention output by 4.7 %; with 0.02: 6.7 % and 120 %), so a check of the logits would hardly see the layers;
    * every tensor other than the fp8 routed experts rounded to bfloat16 values (kept as float32), so that the bf16
      models (Hugging Face's and ours) hold exactly these weights and differ only in how they compute (the routed
      experts, e4m3 codes times float32 block scales, are rounded to bf16 the same way by both)."""
    import torch

    W = init_weights(cfg, seed)
    W["embed"] = W["embed"] * np.float32(EMBED_SCALE)
    for k, v in W.items():
        if ".experts." not in k:
            W[k] = torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16).float().numpy()
    return W


def hf_greedy(model, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Prefill then ``steps - 1`` greedy decode steps of equal-length ``prompts`` as one batch on a Hugging Face causal
    LM, through its KV cache: ``(tokens [request][step], logits [step] -> [request, vocab] float32)``, the layout of
    ``serve.run_requests``."""
    import torch

    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    logits: list[np.ndarray] = []
    with torch.no_grad():
        o = model(input_ids=torch.tensor(prompts, device=device), use_cache=True)
        for i in range(steps):
            lg = o.logits[:, -1].float().cpu().numpy()
            logits.append(lg)
            nxt = lg.argmax(-1)
            for r in range(len(prompts)):
                out[r].append(int(nxt[r]))
            if i + 1 < steps:
                o = model(input_ids=torch.tensor(nxt, device=device)[:, None], past_key_values=o.past_key_values,
                          use_cache=True)
    return out, logits


def reference_greedy(cfg: DeepSeekConfig, W, prompts, steps):
    """The numpy reference's greedy run of each prompt, in the layout of ``hf_greedy``."""
    from dwdp_ops.models.deepseek_r1 import ReferenceModel

    runs = [ReferenceModel(cfg, W).generate(p, steps) for p in prompts]
    return [t for t, _ in runs], [np.stack([lg[i] for _, lg in runs]) for i in range(steps)]


def comparable_error(tokens, logits, ref_tokens, ref_logits) -> tuple[float, int]:
    """The largest relative error (2-norm over the vocabulary) of a request's logits against the reference's over
    the steps both runs reached with the same tokens, and how many (request, step) pairs that is."""
    errs = []
    for r in range(len(ref_tokens)):
        for i in range(len(ref_logits)):
            if tokens[r][:i] != ref_tokens[r][:i]:
                break
            x, y = np.asarray(logits[i][r], np.float64), np.asarray(ref_logits[i][r], np.float64)
            errs.append(float(np.linalg.norm(x - y) / np.linalg.norm(y)))
    return max(errs), len(errs)
