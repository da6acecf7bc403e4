"""DeepSeek-R1 on one GPU rank, with its MoE layers on DWDP: the GPU twin of ``reference.ReferenceModel``.

A rank serves its own requests (data parallel). ``GpuModel.forward`` takes one token list per request: a prefill
(the whole prompt, from position 0) or a decode step (one token per request, after the cached ones). Math follows
the numpy reference; the implementation choices are:

  * attention: MLA with the KV cache holding only the normalised 512-dim latent and the rotated 64-dim rope key per
    position (the absorbed cache). Prefill expands K/V per head from the latent for the step's packed prompts and
    runs ``models.attention.prefill_attention`` (cuDNN: one call over all prompts of equal length, else one per
    prompt; V at its own head dim); decode runs the absorbed form batched over the requests
    (``q_nope`` folded into the latent space by ``wkv_b``'s K part, ``wkv_b``'s V part applied after attention);
  * router: the official gate (``select_experts``) on float32 logits;
  * routed experts: token-expert pairs sorted by expert, then one grouped GEMM per projection
    (``torch._grouped_mm`` in bf16, or ``torch._scaled_grouped_mm`` for fp8 experts with rowwise scales and
    per-token fp8 activations (``fp8.py``); groups aligned to 16 rows) reading the experts in place from their
    ``[E, ...]`` view, which for DWDP is the store's composite range (local experts zero-copy, remote ones in the
    slots: no merge copy). A float32 model (the check against numpy) loops over the selected experts;
  * experts come from an ``ExpertSource``: ``DwdpExperts`` (ExpertStore + PrefetchScheduler: ``begin_step``,
    ``wait`` after the router, ``release`` after the expert kernels are enqueued) or ``LocalExperts`` (every expert
    on this GPU: the all-local baseline and oracle, optionally regenerated layer by layer into one buffer);
  * moving tokens instead of weights (DEP): when the scheduler's step mode is ``dispatch`` (forced, or chosen by
    ``auto``), a MoE layer sends its tokens to the experts' owners (``TokenDispatcher``), runs the same grouped
    GEMMs over the rows it received with its own local experts (the store's ``local`` view), and combines the
    weighted outputs back; attention stays data parallel. Every rank joins every such layer. The tokens travel in
    bf16 (a bf16 model; its experts bf16 or fp8);
  * determinism: no atomics anywhere in a step (the expert outputs are combined by a small batched GEMM, not
    ``index_add_``), so the DWDP and all-local runs of the same requests give identical logits. With random weights
    the logits have many near ties, and an ``index_add_``'s order-dependent bf16 rounding (1e-3) flipped greedy tokens.
    The router weights are rounded to the activation dtype before the combine in every mode; the DEP combine sums
    each token's terms per owner rank, then over ranks (float32, one rounding), so a DEP layer may differ from the
    all-local one in the last bit of a few elements: its logits agree to rounding, not bit for bit.

All work is enqueued on ``stream`` (a CuPy stream; PyTorch runs on it through ``ExternalStream``). Timing (CUDA
events around attention, expert GEMMs and the wait for experts) is collected when ``timing`` is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..._checks import int_at_least, is_int
from ..attention import prefill_attention
from ..routed import combine_pairs, routed_experts
from .config import DeepSeekConfig
from .gpu_weights import dense_shapes, require_torch
from .reference import yarn_freqs


def select_experts_torch(logits, bias, n_group: int, topk_group: int, top_k: int, scale: float):
    """The gate of ``reference.select_experts`` on the GPU (float32). Returns ``(weights [T, k], ids [T, k])``.
    Checked on the host (shapes and counts only, no sync), as the reference checks them: ``logits [T, E]``, ``bias
    [E]``, ``n_group``, ``topk_group``, ``top_k`` ints (not bools) with ``n_group`` dividing ``E``, ``1 <= topk_group
    <= n_group`` and ``1 <= top_k <= topk_group * E / n_group``; TypeError / ValueError otherwise (a top_k past the
    kept groups' experts had returned masked experts' ids, a bias of one element or one per token broadcast)."""
    torch = require_torch()
    for name, v in (("n_group", n_group), ("topk_group", topk_group), ("top_k", top_k)):
        if not is_int(v):
            raise TypeError(f"select_experts_torch: {name} must be an int, got {v!r} ({type(v).__name__})")
    if logits.dim() != 2:
        raise ValueError(f"select_experts_torch: logits must be [tokens, experts], got {list(logits.shape)}")
    T, E = logits.shape
    if n_group < 1 or E % n_group:
        raise ValueError(f"select_experts_torch: n_group must be an int >= 1 dividing the {E} experts, got {n_group}")
    per = E // n_group
    if tuple(bias.shape) != (E,):
        raise ValueError(f"select_experts_torch: bias must have shape [{E}] (one per expert), got {list(bias.shape)}")
    if not 1 <= topk_group <= n_group or not 1 <= top_k <= topk_group * per:
        raise ValueError(f"select_experts_torch: need 1 <= topk_group <= {n_group} and 1 <= top_k <= topk_group * "
                         f"{per}, got topk_group {topk_group}, top_k {top_k}")
    n_group, topk_group, top_k = int(n_group), int(topk_group), int(top_k)
    scores = logits.float().sigmoid()
    sel = scores + bias
    top2 = sel.view(T, n_group, per).topk(min(2, per), dim=-1).values.sum(-1)  # a group of one: its one score
    keep = top2.topk(topk_group, dim=-1).indices
    drop = torch.ones((T, n_group), dtype=torch.bool, device=logits.device).scatter_(1, keep, False)
    sel = sel.masked_fill(drop.repeat_interleave(per, 1), float("-inf"))
    ids = sel.topk(top_k, dim=-1).indices
    w = scores.gather(1, ids)
    return w / w.sum(-1, keepdim=True) * scale, ids


GRAPH_MODES = ("on_demand", "dispatch", "local")  # a prefetch_all step waits on copy-stream events: eager
CACHE_ALIGN = 64  # positions of the KV caches are allocated in multiples of this (GpuModel.cache_len)


# -- expert sources ----------------------------------------------------------------------------------------------------
class LocalExperts:
    """Every expert of every MoE layer on this GPU (``regenerate``: one ``[E, ...]`` buffer refilled from the weight
    source at each layer, for models whose experts do not all fit)."""

    def __init__(self, weights, cfg: DeepSeekConfig, regenerate: bool = False):
        torch = require_torch()
        self.weights, self.cfg, self.regenerate = weights, cfg, regenerate
        self.fp8 = getattr(weights, "expert_dtype", None) == torch.float8_e4m3fn
        if regenerate:
            self._buf = self._load(0)
            self._held = 0  # the buffer holds MoE position 0
        else:
            self._layers = [self._load(p) for p in range(cfg.n_moe_layers)]

    def _load(self, p: int, out=None) -> tuple:
        """``(w13, w2, s13, s2)`` of every expert of MoE position p (scales None unless fp8)."""
        layer, E = self.cfg.n_dense_layers + p, self.cfg.n_routed_experts
        if self.fp8:
            (w13, w2), (s13, s2) = self.weights.experts_fp8(layer, 0, E)
            return w13, w2, s13, s2
        return (*self.weights.experts(layer, 0, E, out=None if out is None else out[:2]), None, None)

    def begin_step(self, tokens: int) -> str:
        return "local"

    def weights_for(self, p: int, ids, stream) -> tuple:
        """``(w13 [E, 2I, H], w2 [E, H, I], s13 [E, 2I] | None, s2 [E, H] | None)``."""
        if not self.regenerate:
            return self._layers[p]
        if self._held != p:
            self._buf = self._load(p, out=None if self.fp8 else self._buf)
            self._held = p
        return self._buf

    def release(self, p: int, stream) -> None:
        pass

    def prepare_capture(self, stream) -> None:
        pass

    def abort(self) -> None:
        pass


class DwdpExperts:
    """The experts of a rank's ``ExpertStore`` under a ``PrefetchScheduler``. MoE position p is store layer p.

    Weight modes (``prefetch_all`` / ``on_demand``): ``weights_for`` returns the layer's ``[E, ...]`` composite
    views. ``dispatch`` mode (the scheduler holds a ``TokenDispatcher``): ``dispatch`` / ``combine`` move the tokens
    and ``local_weights`` returns this rank's ``[L, ...]`` experts (no slot is read)."""

    def __init__(self, store, scheduler, dtype, scales: list | None = None):
        """``dtype``: the experts' torch dtype in the store (the model dtype, or float8_e4m3fn with ``scales``: per
        MoE position ``(s13 [E, 2I], s2 [E, H])`` float32, ``serve.expert_scales``)."""
        torch = require_torch()
        if (dtype == torch.float8_e4m3fn) != (scales is not None):
            raise ValueError("fp8 experts need their rowwise scales (scales=serve.expert_scales(...)), and only they")
        if scales is not None and len(scales) != store.num_layers:
            raise ValueError(f"scales: one (s13, s2) pair per store layer ({store.num_layers}), got {len(scales)}")
        self.store, self.sched = store, scheduler
        sc = scales or [(None, None)] * store.num_layers
        self.views = [(*(_torch_view(store.composite(p, n), dtype) for n in ("w13", "w2")), *sc[p])
                      for p in range(store.num_layers)]
        lo, hi = store.lo, store.hi
        self.local = [(*(_torch_view(store.local(p, n), dtype) for n in ("w13", "w2")),
                       *(None if s is None else s[lo:hi] for s in sc[p])) for p in range(store.num_layers)]

    def begin_step(self, tokens: int) -> str:
        return self.sched.begin_step(tokens=tokens)

    @property
    def dispatch_capturable(self) -> bool:
        """Whether this step's dispatcher may run inside a CUDA graph (ours: yes; the NCCL baseline: no)."""
        return bool(getattr(self.sched.dispatcher, "capturable", False))

    @property
    def moves_tokens(self) -> bool:
        """Whether this step's MoE layers dispatch tokens (DEP) instead of reading fetched weights."""
        return self.sched.step_policy == "dispatch"

    def local_weights(self, p: int) -> tuple:
        """``(w13 [L, 2I, H], w2 [L, H, I], s13 | None, s2 | None)``: this rank's experts (dispatch mode)."""
        return self.local[p]

    def dispatch(self, p: int, x, w, ids, stream):
        """``x [T, H]`` bf16, ``w [T, k]`` float32, ``ids [T, k]`` int64 -> the dispatcher's handle (collective)."""
        return self.sched.dispatch(p, x, ids, w, stream)

    def combine(self, p: int, y_grouped, handle, out, stream) -> None:
        """``y_grouped [rows, H]`` bf16 -> ``out [T, H]`` bf16, caller-allocated (collective)."""
        self.sched.combine(p, y_grouped, handle, stream, out=out)

    def weights_for(self, p: int, ids, stream) -> tuple:
        """``(w13 [E, 2I, H], w2 [E, H, I], s13 | None, s2 | None)`` over the composite range, once fetched."""
        if self.sched.step_policy == "on_demand":
            # the router's ids as they are: the fetch kernel fetches a repeated expert once
            self.sched.wait(p, stream, ids=ids.reshape(-1).to(require_torch().int32).contiguous())
        else:
            self.sched.wait(p, stream)
        return self.views[p]

    def release(self, p: int, stream) -> None:
        self.sched.release(p, stream)

    def prepare_capture(self, stream) -> None:
        """Before a CUDA-graph capture on ``stream``: the store's plans and this stream's fetch scratch exist."""
        self.store.nvshmem.prepare(streams=[stream])

    def abort(self) -> None:
        """After a step failed half-way (``PrefetchScheduler.abort``)."""
        self.sched.abort()

    @property
    def step_tokens(self):
        return self.sched.step_tokens


def _torch_view(a, dtype):
    """A zero-copy PyTorch view of a store view (bf16 is stored as uint16 bits)."""
    torch = require_torch()
    t = torch.from_dlpack(a.view(np.int16) if a.dtype.itemsize == 2 and a.dtype.kind == "u" else a)
    return t.view(dtype) if t.dtype != dtype else t


# -- the model ---------------------------------------------------------------------------------------------------------
@dataclass
class StepTiming:
    """Per-step CUDA-event spans (milliseconds once ``resolve``d): attention blocks, the two expert GEMMs with the
    activation between them (not the sort, gather and weighted scatter around them), and the wait for a layer's
    experts (the exposed prefetch, or the on-demand fetch itself); under ``dispatch``, the dispatch and the combine
    (``comm``: the token traffic and the wait for the slowest peer, which one span cannot tell apart)."""

    attn: list = field(default_factory=list)
    experts: list = field(default_factory=list)
    wait: list = field(default_factory=list)
    comm: list = field(default_factory=list)
    attn_flops: float = 0.0
    expert_flops: float = 0.0

    def resolve(self) -> dict:
        def total(pairs):
            return float(sum(a.elapsed_time(b) for a, b in pairs))

        return {"attn_ms": total(self.attn), "experts_ms": total(self.experts), "wait_ms": total(self.wait),
                "comm_ms": total(self.comm),
                "wait_ms_per_layer": [a.elapsed_time(b) for a, b in self.wait],
                "attn_flops": self.attn_flops, "expert_flops": self.expert_flops}


class GpuModel:
    def __init__(self, cfg: DeepSeekConfig, weights, experts, *, max_requests: int, max_seq: int | None = None,
                 stream: Any = None, grouped: bool | None = None, align: int = 16):
        torch = require_torch()
        # counts, not truncated or defaulted: max_seq=0 had become cfg.max_seq_len (every cache that long),
        # max_requests=2.9 two slots and True one
        self.max_requests = int_at_least("max_requests", max_requests, 1)
        self.max_seq = cfg.max_seq_len if max_seq is None else int_at_least("max_seq", max_seq, 1)
        # the expert groups' row alignment, checked as routed_experts checks it (int(align) had made 2.9 2, True 1)
        self.align = int_at_least("align", align, 1)
        import cupy as cp

        self.cfg, self.experts = cfg, experts
        self.dtype, self.device = weights.dtype, weights.device
        if self.max_seq > cfg.max_seq_len:
            raise ValueError(f"max_seq {self.max_seq} exceeds the model's max_seq_len {cfg.max_seq_len}")
        self.stream = stream or cp.cuda.Stream(non_blocking=True)
        self.tstream = torch.cuda.ExternalStream(self.stream.ptr, device=self.device)
        self.grouped = (self.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")) if grouped is None else grouped
        self._step_pairs = 0  # this step's token-expert pairs on this rank (set by forward)
        self.P = {n: weights.dense(n) for n in dense_shapes(cfg)}
        ang = yarn_freqs(cfg)[: self.max_seq]
        self.cos = torch.from_numpy(np.cos(ang)).float().to(self.device)
        self.sin = torch.from_numpy(np.sin(ang)).float().to(self.device)
        # the caches hold cache_len >= max_seq positions, a multiple of CACHE_ALIGN: a decode step attends over all of
        # them (masked past each request's own), and a length that is not a multiple of 8 sent cuBLAS to
        # alignment-1 kernels (bench/decode_breakdown.py, 2026-12-01: 1.6 ms of a 9.4 ms decode step)
        self.cache_len = -(-self.max_seq // CACHE_ALIGN) * CACHE_ALIGN
        R, S = self.max_requests, self.cache_len
        # one [R, S, kv_lora_rank + rope] cache per layer, the latent and the rope key side by side, so that a decode
        # step reads both in one pass and scores them with one GEMM; cache_latent / cache_pe are views of it
        c = cfg.kv_lora_rank
        self.cache_kv = [torch.zeros((R, S, c + cfg.qk_rope_head_dim), dtype=self.dtype, device=self.device)
                         for _ in range(cfg.n_layers)]
        self.cache_latent = [kv[..., :c] for kv in self.cache_kv]
        self.cache_pe = [kv[..., c:] for kv in self.cache_kv]
        self.lengths = [0] * R
        self.timing: StepTiming | None = None
        self.last_policy = None
        self.last_ids: list = []
        self.graphed = False  # whether the latest step was a graph replay
        self._graphs: dict = {}
        self._graph_pool = None

    # -- small blocks ------------------------------------------------------------------------------------------------
    def _rms(self, x, w):
        torch = require_torch()
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg.rms_eps) * w).to(self.dtype)

    def _rope(self, x, pos):
        """Rotates adjacent pairs of the last axis of ``x [N, ..., r]`` by the angles of positions ``pos [N]``."""
        torch = require_torch()
        c = self.cos[pos].view(pos.shape[0], *([1] * (x.dim() - 2)), -1)
        s = self.sin[pos].view(pos.shape[0], *([1] * (x.dim() - 2)), -1)
        xr = x.float().unflatten(-1, (-1, 2))
        a, b = xr[..., 0], xr[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2).to(self.dtype)

    def _mlp(self, x, w1, w3, w2):
        torch = require_torch()
        return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T

    def _event(self):
        torch = require_torch()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.tstream)
        return ev

    # -- attention ---------------------------------------------------------------------------------------------------
    def _device_ints(self, values):
        """A host int list as an int64 tensor on this GPU without draining the stream (pinned, non-blocking: a
        pageable copy waits for every kernel queued before it, which made each decode layer launch-bound)."""
        torch = require_torch()
        return torch.tensor(values, dtype=torch.int64).pin_memory().to(self.device, non_blocking=True)

    def warm_prefill_attention(self, lengths) -> float:
        """Runs the prefill attention once on zeros laid out exactly as ``_attention`` passes them (q, k contiguous;
        V a slice of the K/V expansion), for requests of ``lengths`` tokens, and returns its milliseconds (CUDA
        events; synchronises). cuDNN builds and caches a plan per new length and stride pattern the first time it
        meets one; a benchmark comparing steps calls this first so that no step pays it (the plan is then this
        process's for every layer and later request of that length)."""
        torch = require_torch()
        cfg = self.cfg
        T, H, nope = sum(lengths), cfg.n_heads, cfg.qk_nope_head_dim
        with torch.cuda.stream(self.tstream):
            qk = torch.zeros((T, H, nope + cfg.qk_rope_head_dim), dtype=self.dtype, device=self.device)
            kvb = torch.zeros((T, H, nope + cfg.v_head_dim), dtype=self.dtype, device=self.device)
            a = self._event()
            prefill_attention(qk, qk, kvb[..., nope:], list(lengths), cfg.softmax_scale)
            b = self._event()
        b.synchronize()
        return a.elapsed_time(b)

    def _attention(self, layer: int, x, pos, segments, decode: bool, req=None):
        torch = require_torch()
        cfg, p = self.cfg, f"layers.{layer}.attn."
        P = self.P
        N, H, nope, rope, vd = x.shape[0], cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = (self._rms(x @ P[p + "wq_a"].T, P[p + "q_norm"]) @ P[p + "wq_b"].T).view(N, H, nope + rope)
        q_nope, q_pe = q[..., :nope], self._rope(q[..., nope:], pos)
        kv = x @ P[p + "wkv_a"].T
        latent = self._rms(kv[:, : cfg.kv_lora_rank], P[p + "kv_norm"])
        k_pe = self._rope(kv[:, cfg.kv_lora_rank :].unsqueeze(1), pos).squeeze(1)
        wkv_b = P[p + "wkv_b"].view(H, nope + vd, cfg.kv_lora_rank)
        cl, cp_ = self.cache_latent[layer], self.cache_pe[layer]
        flops = 2.0 * N * (cfg.dim * (cfg.q_lora_rank + cfg.kv_lora_rank + rope) + cfg.q_lora_rank * H * (nope + rope)
                           + H * vd * cfg.dim)
        if decode:
            r = req  # the requests' cache slots (one token each), made once per step
            cl[r, pos] = latent
            cp_[r, pos] = k_pe
            # every cached position up to cache_len, masked past each request's own: the shapes do not depend on the
            # step (a decode step is a CUDA graph), and eager and graphed steps compute the same sums
            T = self.cache_len
            slots = [sg[0] for sg in segments] if segments else []
            ckv = self.cache_kv[layer]
            if slots and slots == list(range(slots[0], slots[0] + len(slots))):
                cache = ckv[slots[0] : slots[0] + len(slots)]  # the requests' caches as a view: no gather
            else:
                cache = ckv[r]  # [N, T, c + rope]
            q_lat = torch.einsum("nhd,hdc->nhc", q_nope, wkv_b[:, :nope])
            # latent and rope scores in one GEMM over [c + rope] (float32 accumulation, one rounding)
            scores = torch.bmm(torch.cat([q_lat, q_pe], -1), cache.transpose(1, 2)).float()
            scores *= cfg.softmax_scale
            scores.masked_fill_(torch.arange(T, device=self.device)[None, None, :] > pos[:, None, None], float("-inf"))
            o_lat = torch.bmm(scores.softmax(-1).to(self.dtype), cache[..., : cfg.kv_lora_rank])
            o = torch.einsum("nhc,hdc->nhd", o_lat, wkv_b[:, nope:])
            # useful FLOPs: each request's own positions (the masked rest of the cache is computed but not counted)
            seen = sum(self.lengths[s[0]] + 1 for s in segments) if segments else N * T
            flops += 2.0 * H * (N * nope * cfg.kv_lora_rank + seen * (2 * cfg.kv_lora_rank + rope)
                                + N * cfg.kv_lora_rank * vd)
        else:
            # the whole step's prompts at once: cache writes by (slot, position) per token, one attention call
            cl[req, pos] = latent
            cp_[req, pos] = k_pe
            kvb = (latent @ P[p + "wkv_b"].T).view(N, H, nope + vd)
            k = torch.cat([kvb[..., :nope], k_pe[:, None, :].expand(N, H, rope)], -1)
            qq = torch.cat([q_nope, q_pe], -1)
            lengths = [b - a for _, a, b in segments]
            o = prefill_attention(qq, k, kvb[..., nope:], lengths, cfg.softmax_scale)
            flops += 2.0 * N * cfg.kv_lora_rank * H * (nope + vd) + sum(
                2.0 * H * S * S * (nope + rope + vd) / 2 for S in lengths)
        if self.timing is not None:
            self.timing.attn_flops += flops
        return o.reshape(N, H * vd) @ P[p + "wo"].T

    # -- MoE ---------------------------------------------------------------------------------------------------------
    def _grouped_swiglu(self, xg, offs, w13, w2, s13=None, s2=None):
        """The expert MLP over rows grouped by expert: ``xg [R, H]`` bf16 (fp8 experts: or its rows already
        quantised, ``(q, scale)``, see ``fp8.grouped_swiglu_fp8``), group g in rows ``[offs[g-1], offs[g])``
        (``offs [G]`` int32), ``w13 [G, 2I, H]``, ``w2 [G, H, I]`` -> ``[R, H]`` bf16 (rows past ``offs[-1]`` are
        not meaningful). Two ``torch._grouped_mm`` with the SwiGLU between, or with fp8 weights and their rowwise
        scales ``s13 [G, 2I]`` / ``s2 [G, H]`` two ``torch._scaled_grouped_mm`` (``fp8.grouped_swiglu_fp8``); the
        one expert kernel of every mode."""
        torch = require_torch()
        I = self.cfg.moe_inter_dim
        if s13 is not None:
            from .fp8 import grouped_swiglu_fp8, use_fast_accum

            # small and large steps accumulate in the tensor cores' fast mode (measured faster there, the same error
            # against bf16: fp8.use_fast_accum), decided by this rank's own token-expert pairs of the step, not by a
            # buffer's worst-case size (in DEP the GEMM also carries other ranks' tokens, whose own steps may fall on
            # the other side of the bound)
            fast = use_fast_accum(self._step_pairs)
            return grouped_swiglu_fp8(xg, offs, w13, w2, s13, s2, I, fast_accum=fast)
        h = torch._grouped_mm(xg, w13.transpose(-2, -1), offs=offs)
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        return torch._grouped_mm(a, w2.transpose(-2, -1), offs=offs)

    def _routed_dispatch(self, pos: int, x, w, ids):
        """A DEP layer: tokens to their experts' owners, this rank's experts over the rows it received, weighted
        results back (collective: every rank runs it for the layer)."""
        torch = require_torch()
        if self.dtype != torch.bfloat16 or not self.grouped:
            raise ValueError(f"moving tokens (dispatch) needs the bf16 grouped-GEMM model, this one is {self.dtype}")
        timed = self.timing is not None
        c0 = self._event() if timed else None
        handle = self.experts.dispatch(pos, x, w.float(), ids, self.stream)
        c1 = self._event() if timed else None
        xg, offs = handle.torch()
        ys = self._grouped_swiglu(xg, offs, *self.experts.local_weights(pos))
        c2 = self._event() if timed else None
        out = torch.empty_like(x)
        self.experts.combine(pos, ys, handle, out, self.stream)
        if timed:
            c3 = self._event()
            self.timing.comm += [(c0, c1), (c2, c3)]
            self.timing.experts.append((c1, c2))
            N, k = ids.shape
            # the FLOPs of this rank's own pairs: the pairs it received are not known on the host (no sync)
            self.timing.expert_flops += 2.0 * N * k * 3 * self.cfg.moe_inter_dim * self.cfg.dim
        return out

    def _routed(self, x, w, ids, w13, w2, s13=None, s2=None):
        """The routed experts of one MoE layer (``models.routed``: sort, aligned groups, grouped MLP, deterministic
        combine); a float32 model loops over the selected experts instead."""
        torch = require_torch()
        cfg = self.cfg
        N, k = ids.shape
        I = cfg.moe_inter_dim
        timed = self.timing is not None
        spans = []

        def mlp(xg, offs):
            t0 = self._event() if timed else None
            y = self._grouped_swiglu(xg, offs, w13, w2, s13, s2)
            spans.append((t0, self._event() if timed else None))
            return y

        if self.grouped:
            quantize = None
            if s13 is not None:  # fp8 experts: each token quantised once, its fp8 row gathered (models.routed)
                from .fp8 import quant_rows as quantize
            out = routed_experts(x, w, ids, mlp, num_experts=cfg.n_routed_experts, align=self.align,
                                 quantize=quantize)
        else:
            flat = ids.reshape(-1)
            order = torch.argsort(flat, stable=True)
            xs = x[order // k]
            counts = torch.bincount(flat, minlength=cfg.n_routed_experts).tolist()
            ys = torch.empty((N * k, cfg.dim), dtype=self.dtype, device=self.device)
            t0 = self._event() if timed else None
            s = 0
            for e, c in enumerate(counts):
                if c:
                    a13, a2 = w13[e], w2[e]
                    if s13 is not None:  # fp8: dequantise this expert's rows
                        a13 = (a13.float() * s13[e][:, None]).to(self.dtype)
                        a2 = (a2.float() * s2[e][:, None]).to(self.dtype)
                    ys[s : s + c] = self._mlp(xs[s : s + c], a13[:I], a13[I:], a2)
                    s += c
            spans.append((t0, self._event() if timed else None))
            out = combine_pairs(ys, order, w)
        if timed:
            self.timing.experts += spans
            self.timing.expert_flops += 2.0 * N * k * 3 * I * cfg.dim
        return out

    def _moe(self, layer: int, x):
        cfg, P, p = self.cfg, self.P, f"layers.{layer}.ffn."
        pos = layer - cfg.n_dense_layers
        logits = x.float() @ P[p + "gate"].T
        w, ids = select_experts_torch(logits, P[p + "gate_bias"], cfg.n_expert_groups, cfg.n_limited_groups,
                                      cfg.n_activated_experts, cfg.route_scale)
        self.last_ids.append(ids)
        w = w.to(self.dtype)  # rounded once, the same in every mode (see the module docstring)
        if getattr(self.experts, "moves_tokens", False):
            y = self._routed_dispatch(pos, x, w, ids)
        else:
            t0 = self._event() if self.timing is not None else None
            experts = self.experts.weights_for(pos, ids, self.stream)
            if t0 is not None:
                t1 = self._event()
                self.timing.wait.append((t0, t1))
            y = self._routed(x, w, ids, *experts)
        self.experts.release(pos, self.stream)  # after the expert kernels are enqueued
        return y + self._mlp(x, P[p + "shared.w1"], P[p + "shared.w3"], P[p + "shared.w2"])

    # -- the step ----------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.lengths = [0] * self.max_requests

    def forward(self, requests: list[int], tokens: list[list[int]], timing: bool = False, graph: bool = False):
        """One step for ``requests`` (slots in ``[0, max_requests)``): a prefill (every token list a whole prompt,
        starting at position 0) or a decode (one token each, after the cached positions). Returns float32 logits of
        the last position of each request, ``[len(requests), vocab]`` (a torch tensor on this GPU). Token ids are
        integers in ``[0, vocab_size)`` (floats and bools raise TypeError, as in the reference, not truncated).

        ``graph``: a decode step whose mode moves tokens (with a capturable dispatcher), fetches on demand or reads
        local experts runs as a CUDA graph, captured on first use for its (requests, mode, every rank's token count) and replayed after (the
        mode is chosen on the host first, so ``auto`` picks among graphs; a ``prefetch_all`` step, which waits on
        the copy stream's events, runs eagerly). A graphed step has no per-layer timing (``timing`` gives only the
        step's own span to the caller's events); its numbers equal the eager step's."""
        torch = require_torch()
        cfg = self.cfg
        if len(requests) != len(tokens) or len(requests) == 0:  # (not `not requests`: an array has no truth value)
            raise ValueError("forward needs one non-empty token list per request")
        # each request's tokens as a 1-D array (a list, tuple, numpy array or CPU tensor): an int in place of a list
        # had failed on len(), an array or tensor on its truth value, and a nested list passed as [1, 2]-shaped ids
        # (lists as given, on the step's host path; anything else through _token_list, as Python ints)
        tokens = [t if type(t) is list else _token_list(i, t).tolist() for i, t in enumerate(tokens)]
        if (len(set(requests)) != len(requests)
                or not all(is_int(r) and 0 <= r < self.max_requests for r in requests)):
            raise ValueError(f"requests must be distinct slots (ints) in [0, {self.max_requests}), got {requests!r}")
        cont = [len(t) == 1 and self.lengths[r] > 0 for r, t in zip(requests, tokens)]
        decode = all(cont)
        if any(cont) and not decode:
            raise ValueError("a step is either a prefill of every request (whole prompts) or a decode of every "
                             "request (one token each after a prefill); this one mixes both")
        segments, pos, flat, a = [], [], [], 0
        for r, t in zip(requests, tokens):
            if len(t) == 0:
                raise ValueError(f"request {r}: empty token list")
            start = self.lengths[r] if decode else 0  # a prefill starts a new sequence in the slot
            if start + len(t) > self.max_seq:
                raise ValueError(f"request {r}: {start + len(t)} positions exceed max_seq {self.max_seq}")
            segments.append((r, a, a + len(t)))
            pos.extend(range(start, start + len(t)))
            flat.extend(t)
            a += len(t)
        try:
            ids = np.asarray(flat)
        except ValueError:  # ragged nested lists
            ids = None
        if ids is None or ids.ndim != 1:  # a nested list: named by _token_list (only on this error path)
            for i, t in enumerate(tokens):
                _token_list(i, t)
            raise ValueError("tokens must be flat lists of token ids, one per request")
        if ids.dtype.kind not in "iu":  # as the reference: floats and bools are refused, not truncated
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64)
        self._step_pairs = a * cfg.n_activated_experts
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        if not decode:  # only once the step is accepted: a refused prefill leaves the cached sequences
            for r in requests:
                self.lengths[r] = 0
        with torch.cuda.stream(self.tstream):
            mode = self.experts.begin_step(a) if cfg.n_moe_layers else "local"
            self.last_policy = mode if cfg.n_moe_layers else None
            # LocalExperts(regenerate=True) draws weights inside the step: never captured
            self.graphed = bool(graph and decode and mode in GRAPH_MODES and not getattr(self.experts, "regenerate", False)
                                and (mode != "dispatch" or getattr(self.experts, "dispatch_capturable", False)))
            self.timing = StepTiming() if timing and not self.graphed else None
            try:
                if self.graphed:
                    logits = self._replay(requests, ids, pos, mode)
                else:
                    self.last_ids = []
                    # each token's cache slot (decode: one token per request)
                    req_t = self._device_ints(np.repeat([r for r, _, _ in segments], [b - a for _, a, b in segments]))
                    last = None if decode else self._device_ints([b - 1 for _, _, b in segments])
                    logits = self._body(self._device_ints(ids.tolist()), self._device_ints(pos), req_t, last,
                                        segments, decode)
            except BaseException:
                # end the scheduler's step so that the next begin_step is accepted on this rank (a failed DEP
                # layer still leaves the peers waiting: they trap at the dispatcher's timeout, naming this rank)
                self.experts.abort()
                raise
        # the caller's stream may read the logits: order it behind this step (our stream is non-blocking)
        torch.cuda.current_stream(self.device).wait_stream(self.tstream)
        for r, a, b in segments:
            self.lengths[r] += b - a
        return logits

    def _body(self, tok, pos_t, req_t, last, segments, decode: bool):
        """The layers of one step, enqueued on the model's stream: tokens ``tok [N]``, positions ``pos_t [N]``, the
        tokens' cache slots ``req_t [N]`` and the rows of each request's last token ``last`` (prefill;
        decode: every row). Returns float32 logits ``[requests, vocab]``."""
        cfg = self.cfg
        timing = self.timing is not None
        x = self.P["embed"][tok]
        for layer in range(cfg.n_layers):
            p = f"layers.{layer}."
            t0 = self._event() if timing else None
            x = x + self._attention(layer, self._rms(x, self.P[p + "attn_norm"]), pos_t, segments, decode, req_t)
            if timing:
                self.timing.attn.append((t0, self._event()))
            h = self._rms(x, self.P[p + "ffn_norm"])
            if layer < cfg.n_dense_layers:
                x = x + self._mlp(h, self.P[p + "ffn.w1"], self.P[p + "ffn.w3"], self.P[p + "ffn.w2"])
            else:
                x = x + self._moe(layer, h)
        return (self._rms(x if last is None else x[last], self.P["norm"]) @ self.P["head"].T).float()

    def _replay(self, requests, ids, pos, mode: str):
        """A graphed decode step (see ``forward``): new inputs copied into the graph's static buffers, then replay."""
        torch = require_torch()
        key = (tuple(requests), mode, tuple(getattr(self.experts, "step_tokens", None) or ()))
        entry = self._graphs.get(key)
        if entry is None:
            n = len(requests)
            static = [torch.zeros(n, dtype=torch.int64, device=self.device) for _ in range(3)]
            self.experts.prepare_capture(self.stream)
            graph = torch.cuda.CUDAGraph()
            self.last_ids = []
            with torch.cuda.graph(graph, stream=self.tstream, pool=self._graph_pool, capture_error_mode="thread_local"):
                # one token per request (the slots decide whether the decode attention reads the caches as a view)
                out = self._body(static[0], static[1], static[2], None, [(r, i, i + 1) for i, r in enumerate(requests)],
                                 True)
            self._graph_pool = graph.pool()
            entry = self._graphs[key] = (graph, static, out, list(self.last_ids))
        graph, static, out, last_ids = entry
        for buf, values in zip(static, (ids.tolist(), pos, list(requests))):
            buf.copy_(torch.tensor(values, dtype=torch.int64).pin_memory(), non_blocking=True)
        graph.replay()
        self.last_ids = last_ids
        return out.clone()  # the next replay overwrites the static output


def _token_list(i: int, t) -> np.ndarray:
    """``tokens[i]`` of ``GpuModel.forward`` as a 1-D numpy array (its dtype checked by the caller): TypeError for a
    bare id or a string, ValueError for a nested or ragged list."""
    if isinstance(t, (str, bytes)) or not hasattr(t, "__len__"):
        raise TypeError(f"tokens[{i}] must be a list of token ids (one list per request), got {t!r} "
                        f"({type(t).__name__})")
    try:
        a = np.asarray(t)
    except ValueError as e:  # ragged
        raise ValueError(f"tokens[{i}] must be a flat list of token ids, got a nested one ({e})") from None
    if a.ndim != 1:
        raise ValueError(f"tokens[{i}] must be a flat list of token ids, got shape {list(a.shape)}")
    return a


def dense_gemm_tflops(n: int = 8192, dtype: Any = None, repeats: int = 10) -> float:
    """The dense GEMM rate of this GPU (``n^3``, median of ``repeats``, CUDA events): the yardstick of the expert
    GEMM rate."""
    torch = require_torch()
    dtype = dtype or torch.bfloat16
    a = torch.randn((n, n), device="cuda", dtype=dtype)
    b = torch.randn((n, n), device="cuda", dtype=dtype)
    times = []
    for i in range(repeats + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        if i >= 2:
            times.append(s.elapsed_time(e))
    return 2.0 * n**3 / (float(np.median(times)) * 1e-3) / 1e12

