"""Weights of the GPU forward: deterministic random weights generated on the GPU, or a numpy dict uploaded.

Both sources hand out the same things: ``dense(name)`` (a non-expert tensor, ``[out, in]`` like ``nn.Linear``; norms
and the gate's correction bias in float32, the rest in the model dtype) and ``experts(layer, lo, hi)`` (the routed
experts ``lo .. hi-1`` of a MoE layer as ``w13 [n, 2I, H]`` (gate rows then up rows) and ``w2 [n, H, I]``,
dequantised from fp8 e4m3 codes with 128 x 128 block scales to the model dtype).

With ``expert_dtype=torch.float8_e4m3fn`` the routed experts are also served as the store keeps them:
``experts_fp8(layer, lo, hi)`` gives ``(w13 [n, 2I, H], w2 [n, H, I])`` float8_e4m3fn with rowwise float32 scales
``(s13 [n, 2I], s2 [n, H])``, requantised at load from the same block-scaled codes (``fp8.requant_block``; the
numpy truth is ``dwdp_ops.quant``), and ``expert_scales(layer)`` the scales of all E experts (every rank holds them
whole; the store moves only the fp8 bytes).

``DeviceWeights`` draws every tensor from its own generator, seeded by ``(seed, name)`` (experts by
``(seed, layer, expert)``), so any rank rebuilds any slice without communication and a second, all-local run gets
the same bytes: the property the DWDP integration check rests on. It has the distribution of ``weights.init_weights``
but not its values (numpy and CUDA generators differ); ``NumpyWeights`` serves the numpy weights themselves (the tiny
configuration against the numpy reference, or a checkpoint read by ``load_safetensors``).

Routers (``DeviceWeights(router=...)``, ``ROUTERS``): the random gate's correction bias decides how concentrated the
routing is, which decides how much work each expert owner gets (DEP's balance) and how many distinct remote experts a
step routes to (on-demand fetch). ``"skewed"`` (``init_weights``' distribution, and every GPU run before
2026-12-01T03:00Z: bias ~ N(0, 0.5^2)): the
bias dominates the saturated sigmoid scores, so 2048 random tokens use 49-62 of the 256 experts, the top 16 take
70-77 % of the pairs, and the two halves of the experts (two DEP ranks) get 27-52 % / 73-48 % (``tests/test_routers.py``,
seeds 0-3). ``"balanced"`` (bias 0): the same tokens use all 256 experts with a load CV of 0.12-0.13 and halves of
50-51 %, the state DeepSeek-V3's aux-loss-free balancing bias is trained towards (a trained model's per-batch loads
sit between the two); it is the default. Benchmarks that compare DEP with DWDP say which they used.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from ..._checks import is_int
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


ROUTERS = {"skewed": 0.5, "balanced": 0.0}  # router -> std of the gate's random correction bias


def _model_dtype(torch, dtype: Any, default: Any) -> Any:
    """``dtype`` (default ``default``) if it is a torch floating dtype of 16 bits or more (the model computes in it),
    else TypeError: the string 'bfloat16' had failed in ``Tensor.to`` as a device string, and torch.int32 had served
    every dense weight rounded to integers, silently."""
    dtype = default if dtype is None else dtype
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and torch.finfo(dtype).bits >= 16):
        raise TypeError(f"dtype must be a torch floating dtype of 16 bits or more (torch.bfloat16, torch.float32, "
                        f"...), got {dtype!r}")
    return dtype


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


class _ExpertsFp8:
    """The fp8 expert methods shared by both weight sources (they need ``_block_codes(layer, e)``), and the check of
    an expert range both sources' ``experts`` share."""

    def _check_experts(self, layer: Any, lo: Any, hi: Any) -> None:
        """ValueError unless ``layer`` is a MoE layer of the config and ``lo .. hi-1`` experts of it (ints,
        ``0 <= lo <= hi <= n_routed_experts``): a random source would otherwise draw weights for experts or layers
        the model does not have, without a word."""
        cfg = self.cfg
        E = cfg.n_routed_experts
        if not (is_int(layer) and cfg.n_dense_layers <= layer < cfg.n_layers):
            raise ValueError(f"layer must be a MoE layer, an int in [{cfg.n_dense_layers}, {cfg.n_layers}), "
                             f"got {layer!r}")
        if not (is_int(lo) and is_int(hi) and 0 <= lo <= hi <= E):
            raise ValueError(f"experts lo .. hi-1 must have ints 0 <= lo <= hi <= {E} (n_routed_experts), got lo "
                             f"{lo!r}, hi {hi!r}")

    def _check_out(self, out: Any, n: int) -> None:
        """ValueError unless ``out`` is a pair ``(w13 [n, 2I, H], w2 [n, H, I])`` of tensors of the model dtype: a
        larger one had been filled in its first n experts only (DeviceWeights) or with expert lo broadcast to all of
        them (NumpyWeights' ``copy_``), without a word."""
        I, d = self.cfg.moe_inter_dim, self.cfg.dim
        want = ((n, 2 * I, d), (n, d, I))
        if (not isinstance(out, (tuple, list)) or len(out) != 2
                or any(tuple(getattr(o, "shape", ())) != w or getattr(o, "dtype", None) != self.dtype
                       for o, w in zip(out, want))):
            got = ([(tuple(getattr(o, "shape", ())), getattr(o, "dtype", type(o).__name__)) for o in out]
                   if isinstance(out, (tuple, list)) else type(out).__name__)
            raise ValueError(f"out must be (w13 {list(want[0])}, w2 {list(want[1])}) tensors of {self.dtype} for "
                             f"experts lo .. hi-1 ({n}), got {got}")

    def experts_fp8(self, layer: int, lo: int, hi: int):
        """``(w13 [n, 2I, H], w2 [n, H, I])`` float8_e4m3fn and ``(s13 [n, 2I], s2 [n, H])`` float32 of experts
        ``lo .. hi-1``: each projection's block-scaled codes requantised per output row."""
        torch = require_torch()
        from .fp8 import requant_block

        self._check_experts(layer, lo, hi)
        cfg = self.cfg
        I, d, n = cfg.moe_inter_dim, cfg.dim, hi - lo
        w13 = torch.empty((n, 2 * I, d), dtype=torch.float8_e4m3fn, device=self.device)
        w2 = torch.empty((n, d, I), dtype=torch.float8_e4m3fn, device=self.device)
        s13 = torch.empty((n, 2 * I), dtype=torch.float32, device=self.device)
        s2 = torch.empty((n, d), dtype=torch.float32, device=self.device)
        for i, e in enumerate(range(lo, hi)):
            (c1, b1), (c3, b3), (c2, b2) = self._block_codes(layer, e)
            w13[i, :I], s13[i, :I] = requant_block(c1, b1, cfg.block)
            w13[i, I:], s13[i, I:] = requant_block(c3, b3, cfg.block)
            w2[i], s2[i] = requant_block(c2, b2, cfg.block)
        return (w13, w2), (s13, s2)

    def expert_scales(self, layer: int):
        """``(s13 [E, 2I], s2 [E, H])``: the rowwise scales of every expert of ``layer`` (computed here from the
        block-scaled weights, expert by expert, so no rank needs another's)."""
        torch = require_torch()
        cfg = self.cfg
        E, I, d = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
        s13 = torch.empty((E, 2 * I), dtype=torch.float32, device=self.device)
        s2 = torch.empty((E, d), dtype=torch.float32, device=self.device)
        for e in range(E):
            _, (a, b) = self.experts_fp8(layer, e, e + 1)
            s13[e], s2[e] = a[0], b[0]
        return s13, s2


class DeviceWeights(_ExpertsFp8):
    def __init__(self, cfg: DeepSeekConfig, seed: int = 0, dtype: Any = None, device: int | None = None,
                 expert_dtype: Any = None, router: str = "balanced"):
        """``expert_dtype``: ``torch.float8_e4m3fn`` to serve the routed experts as fp8 with rowwise scales
        (``experts_fp8``); default the model dtype (``experts``, dequantised). ``router``: a key of ``ROUTERS``
        (see the module docstring). ``seed``: an int (Python or numpy; TypeError for a bool, a float or a str, which
        ``int()`` had truncated or parsed: 1.5 drew seed 1's weights)."""
        if not is_int(seed):
            raise TypeError(f"DeviceWeights: seed must be an int, got {seed!r} ({type(seed).__name__})")
        torch = require_torch()
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {router!r}")
        self.router, self._bias_std = router, ROUTERS[router]
        self.cfg, self.seed = cfg, int(seed)
        self.dtype = _model_dtype(torch, dtype, torch.bfloat16)
        self.expert_dtype = expert_dtype or self.dtype
        if self.expert_dtype not in (self.dtype, torch.float8_e4m3fn):
            raise ValueError(f"expert_dtype must be the model dtype or torch.float8_e4m3fn, got {self.expert_dtype}")
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
            t = self._bias_std * torch.randn(shape, generator=g, device=self.device)
        else:
            t = float(kind) * torch.randn(shape, generator=g, device=self.device)
        return t.float() if _is_fp32(name) else t.to(self.dtype)

    def _fp8_codes(self, g, shape: tuple[int, int]):
        """Random e4m3 codes (no NaN) and 128 x 128 block scales (the ``random_fp8`` distribution)."""
        torch = require_torch()
        b = self.cfg.block
        codes = torch.randint(0, 256, shape, generator=g, device=self.device, dtype=torch.uint8)
        codes -= ((codes & 0x7F) == 0x7F).to(torch.uint8)
        sb = (-(-shape[0] // b), -(-shape[1] // b))
        scale = (torch.rand(sb, generator=g, device=self.device) + 0.5) * 2e-4
        return codes, scale

    def _fp8(self, g, shape: tuple[int, int]):
        """The block-scaled weight dequantised to the model dtype."""
        torch = require_torch()
        b = self.cfg.block
        codes, scale = self._fp8_codes(g, shape)
        full = scale.repeat_interleave(b, 0).repeat_interleave(b, 1)[: shape[0], : shape[1]]
        return (codes.view(torch.float8_e4m3fn).float() * full).to(self.dtype)

    def _block_codes(self, layer: int, e: int):
        """``((codes, scale_inv) of w1, of w3, of w2)`` of expert ``e``: the same draws as ``experts``."""
        cfg = self.cfg
        I, d = cfg.moe_inter_dim, cfg.dim
        g = self._gen("expert", layer, e)
        return self._fp8_codes(g, (I, d)), self._fp8_codes(g, (I, d)), self._fp8_codes(g, (d, I))

    def experts(self, layer: int, lo: int, hi: int, out: tuple[Any, Any] | None = None):
        """``(w13 [n, 2I, H], w2 [n, H, I])`` of experts ``lo .. hi-1`` of MoE layer ``layer`` (written into
        ``out`` when given: exactly those shapes, in the model dtype). ValueError for a layer or an expert range the
        config does not have, or another ``out``."""
        torch = require_torch()
        self._check_experts(layer, lo, hi)
        cfg = self.cfg
        I, d, n = cfg.moe_inter_dim, cfg.dim, hi - lo
        if out is not None:
            self._check_out(out, n)
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


class NumpyWeights(_ExpertsFp8):
    """A numpy weight dict (``init_weights`` or a checkpoint) on the GPU; experts dequantised on the host, or served
    as fp8 with rowwise scales (``expert_dtype=torch.float8_e4m3fn``: the block-scaled codes go to the GPU as they
    are and are requantised there)."""

    def __init__(self, cfg: DeepSeekConfig, weights: dict[str, np.ndarray], dtype: Any = None, device: int | None = None,
                 expert_dtype: Any = None):
        torch = require_torch()
        self.cfg, self.W = cfg, weights
        self.dtype = _model_dtype(torch, dtype, torch.float32)
        self.shapes = dense_shapes(cfg)
        self.expert_dtype = expert_dtype or self.dtype
        if self.expert_dtype not in (self.dtype, torch.float8_e4m3fn):
            raise ValueError(f"expert_dtype must be the model dtype or torch.float8_e4m3fn, got {self.expert_dtype}")
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)

    def _block_codes(self, layer: int, e: int):
        torch = require_torch()
        p = f"layers.{layer}.ffn.experts.{e}."

        def up(n):
            return (torch.from_numpy(np.ascontiguousarray(self.W[p + n])).to(self.device),
                    torch.from_numpy(np.ascontiguousarray(self.W[p + n + ".scale"], dtype=np.float32)).to(self.device))

        return up("w1"), up("w3"), up("w2")

    def dense(self, name: str):
        torch = require_torch()
        if name not in self.W:
            raise KeyError(f"no tensor {name!r} in the weights")
        want = self.shapes[name][0] if name in self.shapes else None
        if want is not None and tuple(np.shape(self.W[name])) != want:  # (another config's weights: failed in a GEMM)
            raise ValueError(f"weight {name!r} has shape {list(np.shape(self.W[name]))}, the config's is {list(want)}")
        t = torch.from_numpy(np.ascontiguousarray(self.W[name], dtype=np.float32)).to(self.device)
        return t if _is_fp32(name) else t.to(self.dtype)

    def experts(self, layer: int, lo: int, hi: int, out: tuple[Any, Any] | None = None):
        """As ``DeviceWeights.experts``: ``(w13 [n, 2I, H], w2 [n, H, I])`` of experts ``lo .. hi-1``, dequantised on
        the host (an empty range, lo == hi, gives n = 0)."""
        torch = require_torch()
        self._check_experts(layer, lo, hi)
        b, I, d = self.cfg.block, self.cfg.moe_inter_dim, self.cfg.dim
        if out is not None:
            self._check_out(out, hi - lo)
        p = f"layers.{layer}.ffn.experts."

        def deq(e, n):
            return dequant_fp8(self.W[f"{p}{e}.{n}"], self.W[f"{p}{e}.{n}.scale"], b)

        if lo == hi:  # np.stack refuses an empty list
            w13, w2 = np.zeros((0, 2 * I, d), np.float32), np.zeros((0, d, I), np.float32)
        else:
            w13 = np.stack([np.concatenate([deq(e, "w1"), deq(e, "w3")]) for e in range(lo, hi)])
            w2 = np.stack([deq(e, "w2") for e in range(lo, hi)])
        t13 = torch.from_numpy(w13).to(self.device, self.dtype)
        t2 = torch.from_numpy(w2).to(self.device, self.dtype)
        if out is not None:
            out[0].copy_(t13)
            out[1].copy_(t2)
            return out
        return t13, t2
