"""Weights of the GPU forward: deterministic random weights generated on the GPU, or a numpy dict uploaded.

Both sources hand out the same things: ``dense(name)`` (a non-expert tensor, ``[out, in]`` like ``nn.Linear``; norms
and the gate's correction bias in float32, the rest in the model dtype) and ``experts(layer, lo, hi)`` (the routed
experts ``lo .. hi-1`` of a MoE layer as ``w13 [n, 2I, H]`` (gate rows then up rows) and ``w2 [n, H, I]``,
dequantised from fp8 e4m3 codes with 128 x 128 block scales to the model dtype).

``DeviceWeights`` draws every tensor from its own generator, seeded by ``(seed, name)`` (experts by
``(seed, layer, expert)``), so any rank rebuilds any slice without communication and a second, all-local run gets
the same bytes: the property the DWDP integration check rests on. It has the distribution of ``weights.init_weights``
but not its values (numpy and CUDA generators differ); ``NumpyWeights`` serves the numpy weights themselves (the tiny
configuration against the numpy reference, or a checkpoint read by ``load_safetensors``).
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from .config import DeepSeekConfig
from .weights import dequant_fp8


def require_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError(
            "the GPU forward of DeepSeek-R1 needs PyTorch for its bf16 GEMMs, grouped expert GEMM and attention "
            "(CuPy has no bfloat16 dtype and no grouped GEMM); install torch for your CUDA version"
        ) from e
    return torch


def _is_fp32(name: str) -> bool:
    """RMSNorm weights and the router stay in float32."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf.endswith("norm") or leaf in ("gate", "gate_bias")


def dense_shapes(cfg: DeepSeekConfig) -> dict[str, tuple[tuple[int, ...], float | str]]:
    """Name -> (shape, std or 'ones' / 'norm' / 'bias') of every non-expert tensor, as in ``init_weights``."""
    d, H = cfg.dim, cfg.n_heads
    out: dict[str, tuple[tuple[int, ...], float | str]] = {
        "embed": ((cfg.vocab_size, d), 1.0), "norm": ((d,), "ones"), "head": ((cfg.vocab_size, d), 0.02)}
    for layer in range(cfg.n_layers):
        p = f"layers.{layer}."
        out[p + "attn_norm"] = ((d,), "norm")
        out[p + "ffn_norm"] = ((d,), "norm")
        out[p + "attn.wq_a"] = ((cfg.q_lora_rank, d), 0.02)
        out[p + "attn.q_norm"] = ((cfg.q_lora_rank,), "ones")
        out[p + "attn.wq_b"] = ((H * cfg.qk_head_dim, cfg.q_lora_rank), 0.05)
        out[p + "attn.wkv_a"] = ((cfg.kv_lora_rank + cfg.qk_rope_head_dim, d), 0.02)
        out[p + "attn.kv_norm"] = ((cfg.kv_lora_rank,), "ones")
        out[p + "attn.wkv_b"] = ((H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), 0.05)
        out[p + "attn.wo"] = ((d, H * cfg.v_head_dim), 0.02)
        if layer < cfg.n_dense_layers:
            for n, shape in (("w1", (cfg.inter_dim, d)), ("w3", (cfg.inter_dim, d)), ("w2", (d, cfg.inter_dim))):
                out[p + f"ffn.{n}"] = (shape, 0.02)
            continue
        E, Is = cfg.n_routed_experts, cfg.moe_inter_dim * cfg.n_shared_experts
        out[p + "ffn.gate"] = ((E, d), 0.05)
        out[p + "ffn.gate_bias"] = ((E,), "bias")
        for n, shape in (("w1", (Is, d)), ("w3", (Is, d)), ("w2", (d, Is))):
            out[p + f"ffn.shared.{n}"] = (shape, 0.02)
    return out


class DeviceWeights:
    def __init__(self, cfg: DeepSeekConfig, seed: int = 0, dtype: Any = None, device: int | None = None):
        torch = require_torch()
        self.cfg, self.seed = cfg, int(seed)
        self.dtype = dtype or torch.bfloat16
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self.shapes = dense_shapes(cfg)

    def _gen(self, *key: Any):
        torch = require_torch()
        h = zlib.crc32(repr((self.seed, *key)).encode())
        return torch.Generator(device=self.device).manual_seed(self.seed * 0x9E3779B1 % (1 << 61) + h)

    def dense(self, name: str):
        torch = require_torch()
        if name not in self.shapes:
            raise KeyError(f"no tensor {name!r} in the {self.cfg.n_layers}-layer model")
        shape, kind = self.shapes[name]
        g = self._gen(name)
        if kind == "ones":
            t = torch.ones(shape, device=self.device)
        elif kind == "norm":
            t = 1 + 0.1 * torch.randn(shape, generator=g, device=self.device)
        elif kind == "bias":
            t = 0.5 * torch.randn(shape, generator=g, device=self.device)
        else:
            t = float(kind) * torch.randn(shape, generator=g, device=self.device)
        return t.float() if _is_fp32(name) else t.to(self.dtype)

    def _fp8(self, g, shape: tuple[int, int]):
        """Random e4m3 codes (no NaN) with block scales, dequantised (the ``random_fp8`` distribution)."""
        torch = require_torch()
        b = self.cfg.block
        codes = torch.randint(0, 256, shape, generator=g, device=self.device, dtype=torch.uint8)
        codes -= ((codes & 0x7F) == 0x7F).to(torch.uint8)
        sb = (-(-shape[0] // b), -(-shape[1] // b))
        scale = (torch.rand(sb, generator=g, device=self.device) + 0.5) * 2e-4
        full = scale.repeat_interleave(b, 0).repeat_interleave(b, 1)[: shape[0], : shape[1]]
        return (codes.view(torch.float8_e4m3fn).float() * full).to(self.dtype)

    def experts(self, layer: int, lo: int, hi: int, out: tuple[Any, Any] | None = None):
        """``(w13 [n, 2I, H], w2 [n, H, I])`` of experts ``lo .. hi-1`` of MoE layer ``layer`` (written into
        ``out`` when given)."""
        torch = require_torch()
        cfg = self.cfg
        I, d, n = cfg.moe_inter_dim, cfg.dim, hi - lo
        if out is None:
            out = (torch.empty((n, 2 * I, d), dtype=self.dtype, device=self.device),
                   torch.empty((n, d, I), dtype=self.dtype, device=self.device))
        w13, w2 = out
        for i, e in enumerate(range(lo, hi)):
            g = self._gen("expert", layer, e)
            w13[i, :I] = self._fp8(g, (I, d))
            w13[i, I:] = self._fp8(g, (I, d))
            w2[i] = self._fp8(g, (d, I))
        return w13, w2


class NumpyWeights:
    """A numpy weight dict (``init_weights`` or a checkpoint) on the GPU; experts dequantised on the host."""

    def __init__(self, cfg: DeepSeekConfig, weights: dict[str, np.ndarray], dtype: Any = None, device: int | None = None):
        torch = require_torch()
        self.cfg, self.W = cfg, weights
        self.dtype = dtype or torch.float32
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)

    def dense(self, name: str):
        torch = require_torch()
        if name not in self.W:
            raise KeyError(f"no tensor {name!r} in the weights")
        t = torch.from_numpy(np.ascontiguousarray(self.W[name], dtype=np.float32)).to(self.device)
        return t if _is_fp32(name) else t.to(self.dtype)

    def experts(self, layer: int, lo: int, hi: int, out: tuple[Any, Any] | None = None):
        torch = require_torch()
        b = self.cfg.block
        p = f"layers.{layer}.ffn.experts."

        def deq(e, n):
            return dequant_fp8(self.W[f"{p}{e}.{n}"], self.W[f"{p}{e}.{n}.scale"], b)

        w13 = np.stack([np.concatenate([deq(e, "w1"), deq(e, "w3")]) for e in range(lo, hi)])
        w2 = np.stack([deq(e, "w2") for e in range(lo, hi)])
        t13 = torch.from_numpy(w13).to(self.device, self.dtype)
        t2 = torch.from_numpy(w2).to(self.device, self.dtype)
        if out is not None:
            out[0].copy_(t13)
            out[1].copy_(t2)
            return out
        return t13, t2
