"""DeepSeek-R1 configuration: the real dimensions, cut to a layer/vocab budget, and a tiny config of the same
structure for CPU tests."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from ..._checks import is_int, is_real

# Integer fields that must be >= 1 (n_shared_experts may be 0; n_dense_layers is in [0, n_layers]).
_POSITIVE = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "n_routed_experts",
             "n_activated_experts", "n_expert_groups", "n_limited_groups", "q_lora_rank", "kv_lora_rank",
             "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "original_seq_len", "beta_fast", "beta_slow",
             "max_seq_len", "block")


@dataclass(frozen=True)
class DeepSeekConfig:
    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432  # dense MLP of the first layers
    moe_inter_dim: int = 2048
    n_layers: int = 61
    n_dense_layers: int = 3
    n_heads: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    route_scale: float = 2.5
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_seq_len: int = 4096
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    max_seq_len: int = 16384
    rms_eps: float = 1e-6
    block: int = 128  # fp8 weight block (128 x 128 scales)

    def __post_init__(self) -> None:
        """Invariants: every integer field is an int (numbers.Integral, not bool; TypeError otherwise; held as a
        Python int), >= 1 except ``n_shared_experts`` (>= 0) and ``n_dense_layers`` (in ``[0, n_layers]``), with
        ``beta_fast >= beta_slow``; every float field a finite real number (not bool), with ``rope_factor > 0``,
        ``rope_theta > 1``, ``rms_eps >= 0`` and ``route_scale > 0``; the router's groups divide the experts. Errors
        name the field and what is expected."""
        ints = {f.name for f in fields(self) if f.type in ("int", int)}
        for name in sorted(ints):
            v = getattr(self, name)
            if not is_int(v):
                raise TypeError(f"DeepSeekConfig.{name} must be an int, got {v!r} ({type(v).__name__})")
            # held as a Python int: a numpy int32 / uint8 kept its width, so products of sizes (memory.plan_memory's
            # bytes, weight shapes) wrapped around silently
            object.__setattr__(self, name, int(v))
        for name in sorted(f.name for f in fields(self) if f.type in ("float", float)):
            v = getattr(self, name)
            if not is_real(v):
                raise TypeError(f"DeepSeekConfig.{name} must be a real number, got {v!r} ({type(v).__name__})")
            if not math.isfinite(v):
                raise ValueError(f"DeepSeekConfig.{name} must be finite, got {v}")
        # YaRN takes log(rope_factor) and divides by log(rope_theta); RMSNorm takes sqrt(mean square + rms_eps)
        if self.rope_factor <= 0:
            raise ValueError(f"DeepSeekConfig.rope_factor must be > 0, got {self.rope_factor}")
        if self.rope_theta <= 1:
            raise ValueError(f"DeepSeekConfig.rope_theta must be > 1, got {self.rope_theta}")
        if self.rms_eps < 0:
            raise ValueError(f"DeepSeekConfig.rms_eps must be >= 0, got {self.rms_eps}")
        if self.route_scale <= 0:  # (it scales the routed experts' sum: 0 drops it, a negative one flips it)
            raise ValueError(f"DeepSeekConfig.route_scale must be > 0, got {self.route_scale}")
        if self.q_lora_rank < 1:  # before the generic message: the reason, as hf_convert gives it
            raise ValueError(f"DeepSeekConfig.q_lora_rank must be >= 1, got {self.q_lora_rank}: our weights always "
                             "have the LoRA query (wq_a, q_norm, wq_b); a direct query projection (q_lora_rank 0, "
                             "Hugging Face's None) has no counterpart here")
        for name in _POSITIVE:
            if getattr(self, name) < 1:
                raise ValueError(f"DeepSeekConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_shared_experts < 0:
            raise ValueError(f"DeepSeekConfig.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"n_dense_layers {self.n_dense_layers} must be in [0, n_layers = {self.n_layers}]")
        if self.n_routed_experts % self.n_expert_groups:
            raise ValueError("n_routed_experts must be divisible by n_expert_groups")
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            raise ValueError("n_limited_groups must be in [1, n_expert_groups]")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_activated_experts > self.n_limited_groups * per_group:
            raise ValueError("n_activated_experts exceeds the experts of the selected groups")
        if self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even")
        if self.beta_fast < self.beta_slow:  # (YaRN's ramp runs from beta_fast's dims to beta_slow's: reversed, the
            # wrong dims were scaled, silently)
            raise ValueError(f"DeepSeekConfig.beta_fast ({self.beta_fast}) must be >= beta_slow ({self.beta_slow})")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def softmax_scale(self) -> float:
        s = self.qk_head_dim**-0.5
        if self.max_seq_len > self.original_seq_len:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            s *= m * m
        return s

    @classmethod
    def r1(cls, n_layers: int = 61, vocab_size: int = 129280, **kw) -> DeepSeekConfig:
        """The real DeepSeek-R1 dimensions with the layer count and vocabulary cut to fit a GPU budget; ``kw``
        overrides any field (``n_dense_layers`` defaults to ``min(3, n_layers)``)."""
        kw.setdefault("n_dense_layers", min(3, n_layers) if is_int(n_layers) else 3)  # a bad n_layers is named
        return cls(n_layers=n_layers, vocab_size=vocab_size, **kw)

    @classmethod
    def tiny(cls, **kw) -> DeepSeekConfig:
        """Same structure, small sizes: MLA with LoRA ranks, YaRN (max_seq_len > original_seq_len), grouped gate."""
        base = dict(
            vocab_size=97, dim=64, inter_dim=96, moe_inter_dim=32, n_layers=4, n_dense_layers=1, n_heads=4,
            n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
            q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            original_seq_len=32, max_seq_len=128, rope_factor=4.0, block=16,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def mini(cls, **kw) -> DeepSeekConfig:
        """The R1 structure at GPU-test size: the real router (256 experts, 8 groups, top-4 groups, top-8), MLA with
        the real latent and head dims, hidden 2048 and expert intermediate 512, so that each bf16 expert tensor is a
        whole number of 2 MiB pages (w13 4 MiB, w2 2 MiB: the DWDP composite view is a plain strided array)."""
        base = dict(vocab_size=8192, dim=2048, inter_dim=4096, moe_inter_dim=512, n_layers=5, n_dense_layers=1,
                    n_heads=16, q_lora_rank=512, max_seq_len=8192)
        base.update(kw)
        return cls(**base)

    def replace(self, **kw) -> DeepSeekConfig:
        return replace(self, **kw)
