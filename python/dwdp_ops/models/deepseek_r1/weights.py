"""Deterministic random weights in the DeepSeek checkpoint formats, and fp8 e4m3 decoding.

Routed experts are fp8 e4m3 bytes with one fp32 scale per 128 x 128 block (``weight_scale_inv``); everything else
is held in float32 here (bf16 in the checkpoint). ``init_weights`` draws every tensor from a seed, so any process
can rebuild any slice without communication. Names follow the official ``convert.py`` (w1 = gate, w3 = up, w2 =
down). ``load_safetensors`` reads checkpoint shards with the ``safetensors`` package.
"""

from __future__ import annotations

import os

import numpy as np

from ..._checks import int_at_least, is_int
from ...quant import dequant_block, from_e4m3
from .config import DeepSeekConfig


def e4m3_to_float(codes: np.ndarray) -> np.ndarray:
    """Decodes float8 e4m3fn bytes to float32 (``dwdp_ops.quant.from_e4m3``: 0x7f / 0xff are NaN)."""
    return from_e4m3(codes)


def dequant_fp8(codes: np.ndarray, scale: np.ndarray, block: int = 128) -> np.ndarray:
    """``W[i, j] = e4m3(codes[i, j]) * scale[i // block, j // block]`` (the official ``weight_dequant``;
    ``dwdp_ops.quant.dequant_block``)."""
    return dequant_block(codes, scale, block)


def random_fp8(rng: np.random.Generator, shape: tuple[int, int], block: int) -> tuple[np.ndarray, np.ndarray]:
    """Random e4m3 codes (never NaN, magnitudes up to 448) and block scales, so the weights have std about 0.02.
    ``rng`` a numpy Generator, ``shape`` two ints >= 0, ``block`` an int >= 1 (TypeError / ValueError naming the
    argument otherwise: block 0 had raised ZeroDivisionError)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"random_fp8: rng must be a numpy.random.Generator, got {rng!r} ({type(rng).__name__})")
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else shape
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(is_int(n) and n >= 0 for n in shape)):
        raise ValueError(f"random_fp8: shape must be two ints >= 0 (rows, columns), got {shape!r}")
    int_at_least("random_fp8: block", block, 1)
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] -= 1  # no NaN codes
    # e4m3 codes of uniform bytes are heavy-tailed; scale each block to a typical weight magnitude
    scale = (rng.uniform(0.5, 1.5, size=(-(-shape[0] // block), -(-shape[1] // block))) * 2e-4).astype(np.float32)
    return codes, scale


def _dense(rng, shape, std=0.02):
    return (rng.standard_normal(shape) * std).astype(np.float32)


def init_weights(cfg: DeepSeekConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """All weights of the model, deterministic in ``seed``. Routed experts: ``layers.{l}.ffn.experts.{e}.{w1,w2,w3}``
    (uint8 e4m3 codes) with ``.scale`` (fp32 blocks); the rest float32 (``[out, in]`` like ``nn.Linear``).

    ``seed`` is an int in ``[0, 2**32)`` (Python or numpy; TypeError for a bool, float or str, ValueError outside the
    range): each tensor group's stream is ``SeedSequence([seed, *key])``, and a larger seed, being several uint32
    words, would draw the streams of a smaller seed's other tensors (seed 2**33's embedding was seed 0's layer 0).
    TypeError for a ``cfg`` that is not a DeepSeekConfig."""
    if not isinstance(cfg, DeepSeekConfig):
        raise TypeError(f"init_weights: cfg must be a DeepSeekConfig, got {cfg!r} ({type(cfg).__name__})")
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise (ValueError if is_int(seed) else TypeError)(
            f"init_weights: seed must be an int in [0, 2**32), got {seed!r} ({type(seed).__name__})")
    seed = int(seed)
    W: dict[str, np.ndarray] = {}

    def rng(*key: int) -> np.random.Generator:
        # one stream per tensor group, keyed by position: any process can rebuild any slice on its own
        return np.random.default_rng(np.random.SeedSequence([seed, *key]))

    d, H = cfg.dim, cfg.n_heads
    W["embed"] = _dense(rng(0), (cfg.vocab_size, d), 1.0)
    W["norm"] = np.ones(d, np.float32)
    W["head"] = _dense(rng(1), (cfg.vocab_size, d))
    for layer in range(cfg.n_layers):
        p = f"layers.{layer}."
        r = rng(2, layer)
        W[p + "attn_norm"] = (1 + 0.1 * r.standard_normal(d)).astype(np.float32)
        W[p + "ffn_norm"] = (1 + 0.1 * r.standard_normal(d)).astype(np.float32)
        W[p + "attn.wq_a"] = _dense(r, (cfg.q_lora_rank, d))
        W[p + "attn.q_norm"] = np.ones(cfg.q_lora_rank, np.float32)
        W[p + "attn.wq_b"] = _dense(r, (H * cfg.qk_head_dim, cfg.q_lora_rank), 0.05)
        W[p + "attn.wkv_a"] = _dense(r, (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d))
        W[p + "attn.kv_norm"] = np.ones(cfg.kv_lora_rank, np.float32)
        W[p + "attn.wkv_b"] = _dense(r, (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), 0.05)
        W[p + "attn.wo"] = _dense(r, (d, H * cfg.v_head_dim))
        if layer < cfg.n_dense_layers:
            for n, shape in (("w1", (cfg.inter_dim, d)), ("w3", (cfg.inter_dim, d)), ("w2", (d, cfg.inter_dim))):
                W[p + f"ffn.{n}"] = _dense(r, shape)
            continue
        E, I = cfg.n_routed_experts, cfg.moe_inter_dim
        W[p + "ffn.gate"] = _dense(r, (E, d), 0.05)
        W[p + "ffn.gate_bias"] = (r.standard_normal(E) * 0.5).astype(np.float32)  # e_score_correction_bias
        Is = I * cfg.n_shared_experts
        for n, shape in (("w1", (Is, d)), ("w3", (Is, d)), ("w2", (d, Is))):
            W[p + f"ffn.shared.{n}"] = _dense(r, shape)
        for e in range(E):
            re = rng(3, layer, e)
            for n, shape in (("w1", (I, d)), ("w3", (I, d)), ("w2", (d, I))):
                codes, scale = random_fp8(re, shape, cfg.block)
                W[p + f"ffn.experts.{e}.{n}"] = codes
                W[p + f"ffn.experts.{e}.{n}.scale"] = scale
    return W


_TORCH_ONLY = ("F8_E4M3", "F8_E5M2", "BF16")  # safetensors dtypes numpy cannot hold


def load_safetensors(paths: list[str] | str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of one or more ``.safetensors`` shards (a list of paths, or one path) as numpy arrays: float8 e4m3
    tensors (F8_E4M3, the checkpoints' weights) as their uint8 codes (bit-exact, for ``dequant_fp8``), float8 e5m2 and
    bf16 tensors widened to float32 (exact; e5m2 codes read as uint8 would have been taken for e4m3 codes by
    ``dequant_fp8``, wrong values without a word), every other dtype as stored. numpy cannot represent fp8 or bf16,
    so those tensors are read through PyTorch (the ``model`` extra); shards without them need only ``safetensors``. A
    name in two shards raises ValueError."""
    from safetensors import safe_open

    if isinstance(paths, (str, os.PathLike)):  # one shard (a str would be iterated character by character)
        paths = [paths]
    out: dict[str, np.ndarray] = {}
    for path in paths:
        special: dict[str, str] = {}
        with safe_open(path, framework="numpy") as f:
            for k in f.keys():
                if k in out or k in special:
                    raise ValueError(f"tensor {k!r} appears in more than one shard ({path})")
                dt = f.get_slice(k).get_dtype()
                if dt in _TORCH_ONLY:
                    special[k] = dt
                else:
                    out[k] = f.get_tensor(k)
        if special:
            try:
                import torch
            except ImportError as e:
                raise ImportError(f"{path}: reading {sorted(set(special.values()))} tensors needs PyTorch (pip "
                                  "install 'dwdp_ops[model]'); numpy cannot hold fp8 / bf16") from e
            with safe_open(path, framework="pt") as f:
                for k, dt in special.items():
                    t = f.get_tensor(k)
                    out[k] = t.view(torch.uint8).numpy() if dt == "F8_E4M3" else t.float().numpy()
    return out
