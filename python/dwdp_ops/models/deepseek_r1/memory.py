"""Per-rank memory plan of DeepSeek-R1 under DWDP (the GPU demo's model), item by item, before anything is allocated.

Items, bytes per rank (``plan_memory``):
  routed experts      the rank's L = E / N experts of each MoE layer, ``expert_itemsize`` bytes a weight (1 fp8,
                      2 bf16), each tensor kind (w13, w2) rounded to 2 MiB pages exactly as the store's
                      ``ExpertLayout.moe`` strides (so plan == allocation for any shape); fp8 adds every expert's
                      float32 row scales of each layer, held whole on every rank
  prefetch slots      ``min(2, MoE layers)`` slots of the E - L remote experts of one layer (the store's parities)
  attention           MLA projections of every layer (bf16)
  dense MLPs          the dense layers' MLPs (bf16)
  shared experts      the shared expert of every MoE layer (bf16; the router's float32 gate is counted with it)
  embedding and head  two [vocab, H] bf16 tables
  KV cache            latent + rope key per position: requests x cache_len x layers x (kv_lora_rank + rope) x 2
  activations         the largest step's working set: ``ACT_BYTES_PER_TOKEN[expert_itemsize]`` per token of that
                      step, measured: the peak of PyTorch's allocator over a 20022-token prefill of the demo's model
                      with every expert local on one H200 (``bench/decode_breakdown.py``, 2026-12-01T03:53Z: 6.04 GiB
                      with fp8 experts, 6.85 GiB with bf16; the 29 GiB of a 2026-11-30 demo predates the one-gather
                      routing and the fused quantisation)
  dispatcher          the token dispatcher's local buffers when a step may move tokens (given by the caller)
  headroom            not a use but a reserve the fit decision keeps: ``HEADROOM_FRACTION`` of the activations
                      (the caching allocator's fragmentation) plus ``HEADROOM_FIXED`` (CUDA context, cuBLAS / cuDNN
                      workspaces, NCCL)

``MemoryPlan.check`` raises before any allocation when the total exceeds the free memory, naming every item and the
shortfall. The activation coefficients are the only measured ones; the demo records each rank's measured use next to
the plan so that a run checks it (issue 18 asks for the peak within 5 %).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..._checks import is_int
from ...layout import ExpertLayout
from .config import DeepSeekConfig

GiB = 1 << 30
ACT_BYTES_PER_TOKEN = {1: 6485169664 // 20022, 2: 7355736064 // 20022}  # fp8 / bf16 experts (module docstring)
HEADROOM_FRACTION = 0.25
HEADROOM_FIXED = 3 * GiB
SLOT_PAGE = 2 << 20  # the store's layout page: each tensor kind of an expert is rounded up to 2 MiB
_DTYPE = {1: "float8_e4m3fn", 2: "bfloat16"}


def _count(value, what: str, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``: integers only (bools, floats, strings raise TypeError)."""
    if not is_int(value):
        raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class MemoryPlan:
    """``items``: name -> bytes per rank (insertion order is the printed order); ``free``: bytes free on the GPU."""

    items: dict[str, int] = field(default_factory=dict)
    free: int = 0

    @property
    def total(self) -> int:
        return sum(self.items.values())

    @property
    def predicted_use(self) -> int:
        """The bytes the plan predicts the run uses: every item but the headroom."""
        return self.total - self.items.get("headroom", 0)

    @property
    def fits(self) -> bool:
        return self.total <= self.free

    def table(self) -> str:
        """One line per item and a total, in GiB (an empty plan: the total alone)."""
        w = max((len(k) for k in self.items), default=len("total"))
        rows = [f"  {k:<{w}s} {v / GiB:8.2f} GiB" for k, v in self.items.items()]
        rows.append(f"  {'total':<{w}s} {self.total / GiB:8.2f} GiB of {self.free / GiB:.2f} GiB free")
        return "\n".join(rows)

    def check(self, what: str = "the model") -> None:
        """Raises ValueError, before any allocation, when the plan does not fit; the message has every item."""
        if not self.fits:
            raise ValueError(f"{what} does not fit: it needs {self.total / GiB:.2f} GiB per rank, "
                             f"{self.free / GiB:.2f} GiB are free (short by {(self.total - self.free) / GiB:.2f} GiB):"
                             f"\n{self.table()}\nUse fp8 experts (--dtype float8_e4m3fn), fewer MoE layers, a smaller "
                             "vocabulary, fewer or shorter prompts, or more GPUs.")


def _attn_params(cfg: DeepSeekConfig) -> int:
    H = cfg.n_heads
    return (cfg.q_lora_rank * cfg.dim + H * cfg.qk_head_dim * cfg.q_lora_rank
            + (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.dim
            + H * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank + cfg.dim * H * cfg.v_head_dim)


def plan_memory(cfg: DeepSeekConfig, world: int, *, expert_itemsize: int = 1, requests: int = 8,
                cache_len: int = 4096, step_tokens: int = 32768, dispatcher_bytes: int = 0,
                free: int = 0) -> MemoryPlan:
    """The per-rank plan of ``cfg`` (its layer count and vocabulary) on ``world`` ranks (module docstring);
    ``step_tokens``: the largest step's tokens on this rank (a prefill). ``world`` >= 1, ``requests``,
    ``cache_len``, ``step_tokens``, ``dispatcher_bytes`` and ``free`` >= 0: ints (bools refused; TypeError /
    ValueError naming the argument); ``cfg`` a ``DeepSeekConfig`` (TypeError)."""
    if not isinstance(cfg, DeepSeekConfig):  # (had failed with AttributeError on n_routed_experts)
        raise TypeError(f"plan_memory: cfg must be a DeepSeekConfig, got {type(cfg).__name__}")
    world = _count(world, "world", 1)
    requests, cache_len = _count(requests, "requests"), _count(cache_len, "cache_len")
    step_tokens, free = _count(step_tokens, "step_tokens"), _count(free, "free (bytes)")
    dispatcher_bytes = _count(dispatcher_bytes, "dispatcher_bytes")
    if cfg.n_routed_experts % world:
        raise ValueError(f"world must divide the {cfg.n_routed_experts} routed experts, got {world}")
    if not is_int(expert_itemsize) or expert_itemsize not in (1, 2):  # bools (numpy's too) and floats refused
        raise ValueError(f"expert_itemsize must be 1 (fp8) or 2 (bf16), got {expert_itemsize!r}")
    E, L, M, H, I = cfg.n_routed_experts, cfg.n_routed_experts // world, cfg.n_moe_layers, cfg.dim, cfg.moe_inter_dim
    paged = ExpertLayout.moe(H, I, _DTYPE[expert_itemsize], page=SLOT_PAGE).expert_stride  # the store's stride
    scales = 4 * E * (2 * I + H) if expert_itemsize == 1 else 0
    items = {
        "routed experts": M * (L * paged + scales),
        "prefetch slots": min(2, M) * (E - L) * paged if world > 1 else 0,
        "attention": 2 * cfg.n_layers * _attn_params(cfg),
        "dense MLPs": 2 * cfg.n_dense_layers * 3 * cfg.inter_dim * H,
        "shared experts and router": M * (2 * 3 * I * H * cfg.n_shared_experts + 4 * E * H),
        "embedding and head": 2 * 2 * cfg.vocab_size * H,
        "KV cache": 2 * requests * cache_len * cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        "activations": ACT_BYTES_PER_TOKEN[expert_itemsize] * step_tokens,
        "dispatcher": int(dispatcher_bytes),
    }
    items["headroom"] = int(HEADROOM_FRACTION * items["activations"]) + HEADROOM_FIXED
    return MemoryPlan(items, int(free))


def moe_layers_that_fit(world: int, free: int, *, vocab_size: int, requested: int | None = None, **kw) -> int:
    """The most MoE layers (after R1's 3 dense ones, at most R1's 58) whose plan fits ``free``; with ``requested``
    that count, or a ValueError naming the plan's items when it does not fit (never fewer layers silently).
    ``kw``: the rest of ``plan_memory``'s arguments."""
    full = DeepSeekConfig.r1(vocab_size=vocab_size).n_moe_layers

    def plan(m: int) -> MemoryPlan:
        return plan_memory(DeepSeekConfig.r1(n_layers=3 + m, vocab_size=vocab_size), world, free=free, **kw)

    world, free = _count(world, "world", 1), _count(free, "free (bytes)")
    if requested is not None:
        requested = _count(requested, "requested (MoE layers)")
        if not 1 <= requested <= full:
            raise ValueError(f"MoE layers must be in [1, {full}] (DeepSeek-R1), got {requested}")
        plan(requested).check(f"DeepSeek-R1 with {requested} MoE layers")
        return requested
    fit = 0
    for m in range(1, full + 1):
        if not plan(m).fits:
            break
        fit = m
    return fit
