"""The numpy reference forward pass of DeepSeek-R1 (float32 math on dequantised weights), the oracle of the GPU
forward and of the DWDP integration test.

Follows the official ``inference/model.py``: pre-norm blocks ``x += attn(attn_norm(x)); x += ffn(ffn_norm(x))``;
MLA with LoRA-compressed queries and keys/values, interleaved-pair RoPE on the 64 rope dims with YaRN frequencies
when ``max_seq_len > original_seq_len``; the first ``n_dense_layers`` use a dense SwiGLU MLP, the others a MoE:
``sum_k w_k * expert_k(x) + shared(x)`` with the gate of ``select_experts``; final RMSNorm and the LM head on the last
position. Attention runs naively with a K/V cache (``attend``) or in the absorbed form that caches only the
512-dim latent and the rope key (``attend_absorbed``, the decode path of the GPU forward); both give the same
result.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from ..._checks import is_int, is_real
from .config import DeepSeekConfig
from .weights import dequant_fp8


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x**2, last axis) + eps) * w`` in float32: ``x`` ``[..., d]``, ``w`` ``[d]``; returns float32
    ``[..., d]``. A ``w`` of another shape raises ValueError (one of shape ``[1]`` or ``[n, 1]`` had been broadcast
    without a word)."""
    x, w = np.asarray(x), np.asarray(w)
    if x.ndim < 1 or w.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: w must have shape (d,) for x of shape [..., d] = {x.shape}, got {w.shape}")
    x32 = x.astype(np.float32)
    return (x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


def silu(x):
    return x / (1.0 + np.exp(-x))


def select_experts(router_logits, correction_bias, n_group, topk_group, top_k, routed_scaling_factor):
    """The DeepSeek-V3 gate (official code): ``s = sigmoid(logits)``; groups ranked by the sum of the top-2 of
    ``s + bias``; the other groups masked with ``-inf``; the top-k of ``s + bias`` chosen; weights are the unbiased
    ``s`` of the chosen experts, normalised to sum 1, times ``routed_scaling_factor``.
    Returns ``(weights [T, k] float32, ids [T, k] int64)``, ids ordered by descending selection score. The counts
    ``n_group``, ``topk_group``, ``top_k`` are ints (bools refused: TypeError); ``routed_scaling_factor`` a finite
    real number (TypeError for a bool, str or array: an array had scaled each of the k slots by its own factor).
    NaN logits and a non-finite bias raise ValueError."""
    for name, v in (("n_group", n_group), ("topk_group", topk_group), ("top_k", top_k)):
        if not is_int(v):
            raise TypeError(f"select_experts: {name} must be an int, got {v!r} ({type(v).__name__})")
    if not is_real(routed_scaling_factor):
        raise TypeError(f"select_experts: routed_scaling_factor must be a real number, got {routed_scaling_factor!r} "
                        f"({type(routed_scaling_factor).__name__})")
    if not math.isfinite(routed_scaling_factor):
        raise ValueError(f"select_experts: routed_scaling_factor must be finite, got {routed_scaling_factor}")
    if n_group < 1:
        raise ValueError(f"select_experts: n_group must be >= 1, got {n_group}")
    n_group, topk_group, top_k = int(n_group), int(topk_group), int(top_k)
    logits = np.asarray(router_logits, dtype=np.float32)
    if logits.ndim != 2:
        raise ValueError(f"router_logits must be [tokens, experts], got {logits.shape}")
    T, E = logits.shape
    if E % n_group:
        raise ValueError(f"{E} experts do not split into {n_group} groups")
    bias = np.asarray(correction_bias, dtype=np.float32)
    if bias.shape != (E,):
        raise ValueError(f"correction_bias must have shape ({E},), got {bias.shape}")
    # (NaN had given NaN weights for the experts argsort happens to put first; +-inf logits saturate the sigmoid)
    if np.isnan(logits).any():
        raise ValueError(f"router_logits must not be NaN (token {int(np.isnan(logits).any(-1).argmax())})")
    if not np.isfinite(bias).all():
        raise ValueError("correction_bias must be finite")
    per = E // n_group
    if not 1 <= topk_group <= n_group or not 1 <= top_k <= topk_group * per:
        raise ValueError(f"need 1 <= topk_group <= {n_group} and 1 <= top_k <= topk_group * {per}")
    scores = 1.0 / (1.0 + np.exp(-logits))
    sel = scores + bias
    grouped = sel.reshape(T, n_group, per)
    top2 = -np.sort(-grouped, axis=-1)[:, :, :2].sum(-1)
    keep = np.argsort(-top2, axis=-1, kind="stable")[:, :topk_group]
    mask = np.ones((T, n_group), bool)
    np.put_along_axis(mask, keep, False, axis=-1)
    masked = np.where(np.repeat(mask, per, axis=1), -np.inf, sel)
    ids = np.argsort(-masked, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(scores, ids, axis=-1)
    w = w / w.sum(-1, keepdims=True) * routed_scaling_factor
    return w.astype(np.float32), ids.astype(np.int64)


def yarn_freqs(cfg: DeepSeekConfig) -> np.ndarray:
    """Rotation angles ``[max_seq_len, rope_dim / 2]`` (official ``precompute_freqs_cis``)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if cfg.max_seq_len > cfg.original_seq_len:

        def corr_dim(rot):
            return dim * math.log(cfg.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(corr_dim(cfg.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / cfg.rope_factor * (1 - smooth) + freqs * smooth
    return np.outer(np.arange(cfg.max_seq_len), freqs)


def apply_rope(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rotates adjacent pairs ``(x[2i], x[2i+1])`` of the last axis of ``x`` (``[S, ..., dim]``, dim even) by
    ``angles`` (``[S, dim/2]``, broadcast over the axes between S and the last); returns float32 ``[S, ..., dim]``.
    Other shapes raise ValueError (an ``angles`` of one row or one column had been broadcast over every position or
    every pair without a word)."""
    x, angles = np.asarray(x), np.asarray(angles)
    if x.ndim < 2 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x must be [S, ..., dim] with dim even, got shape {x.shape}")
    if angles.shape != (x.shape[0], x.shape[-1] // 2):
        raise ValueError(f"apply_rope: angles must be [S, dim/2] = {(x.shape[0], x.shape[-1] // 2)} for x of shape "
                         f"{x.shape}, got {angles.shape}")
    xr = x.reshape(*x.shape[:-1], -1, 2)
    a = angles.reshape(angles.shape[0], *([1] * (x.ndim - 2)), angles.shape[1])
    c, s = np.cos(a), np.sin(a)
    out = np.stack([xr[..., 0] * c - xr[..., 1] * s, xr[..., 0] * s + xr[..., 1] * c], axis=-1)
    return out.reshape(x.shape).astype(np.float32)


class ReferenceModel:
    """One sequence at a time, with a per-layer cache. ``prefill(tokens)`` then ``decode(token)`` repeatedly; or
    ``generate(tokens, steps)`` for greedy tokens. ``absorbed=True`` caches the MLA latent instead of K/V."""

    def __init__(self, cfg: DeepSeekConfig, weights: dict[str, np.ndarray], absorbed: bool = False):
        if not isinstance(cfg, DeepSeekConfig):  # (had failed in yarn_freqs with AttributeError)
            raise TypeError(f"ReferenceModel: cfg must be a DeepSeekConfig, got {type(cfg).__name__}")
        self.cfg, self.W, self.absorbed = cfg, weights, absorbed
        self.angles = yarn_freqs(cfg)
        self._experts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        self.cache: list[dict[str, np.ndarray]] = [{} for _ in range(self.cfg.n_layers)]
        self.last_ids: list[np.ndarray | None] = [None] * self.cfg.n_layers

    # -- blocks ----------------------------------------------------------------------------------------------------
    def expert(self, layer: int, e: int):
        key = (layer, e)
        if key not in self._experts:
            p = f"layers.{layer}.ffn.experts.{e}."
            self._experts[key] = tuple(
                dequant_fp8(self.W[p + n], self.W[p + n + ".scale"], self.cfg.block) for n in ("w1", "w3", "w2")
            )
        return self._experts[key]

    def mlp(self, x, w1, w3, w2):
        return (silu(x @ w1.T) * (x @ w3.T)) @ w2.T

    def moe(self, layer: int, x: np.ndarray) -> np.ndarray:
        cfg, W, p = self.cfg, self.W, f"layers.{layer}.ffn."
        weights, ids = select_experts(x @ W[p + "gate"].T, W[p + "gate_bias"], cfg.n_expert_groups,
                                      cfg.n_limited_groups, cfg.n_activated_experts, cfg.route_scale)
        self.last_ids[layer] = ids
        y = np.zeros_like(x)
        for e in np.unique(ids):
            rows, slot = np.nonzero(ids == e)
            y[rows] += weights[rows, slot][:, None] * self.mlp(x[rows], *self.expert(layer, int(e)))
        return y + self.mlp(x, W[p + "shared.w1"], W[p + "shared.w3"], W[p + "shared.w2"])

    def _qkv(self, layer: int, x: np.ndarray, start: int):
        cfg, W, p = self.cfg, self.W, f"layers.{layer}.attn."
        S, H = x.shape[0], cfg.n_heads
        q = rms_norm(x @ W[p + "wq_a"].T, W[p + "q_norm"], cfg.rms_eps) @ W[p + "wq_b"].T
        q = q.reshape(S, H, cfg.qk_head_dim)
        q_nope, q_pe = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim :]
        ang = self.angles[start : start + S]
        q_pe = apply_rope(q_pe, ang)
        kv = x @ W[p + "wkv_a"].T
        latent, k_pe = kv[:, : cfg.kv_lora_rank], kv[:, cfg.kv_lora_rank :]
        k_pe = apply_rope(k_pe[:, None, :], ang)[:, 0]
        return q_nope, q_pe, rms_norm(latent, W[p + "kv_norm"], cfg.rms_eps), k_pe

    @staticmethod
    def _softmax(s):
        s = s - s.max(-1, keepdims=True)
        e = np.exp(s)
        return e / e.sum(-1, keepdims=True)

    def attend(self, layer: int, x: np.ndarray, start: int) -> np.ndarray:
        """Naive MLA: materialises K and V per head and caches them."""
        cfg, W, p = self.cfg, self.W, f"layers.{layer}.attn."
        S, H, nope = x.shape[0], cfg.n_heads, cfg.qk_nope_head_dim
        q_nope, q_pe, latent, k_pe = self._qkv(layer, x, start)
        kv = (latent @ W[p + "wkv_b"].T).reshape(S, H, nope + cfg.v_head_dim)
        k = np.concatenate([kv[..., :nope], np.broadcast_to(k_pe[:, None, :], (S, H, cfg.qk_rope_head_dim))], -1)
        v = kv[..., nope:]
        c = self.cache[layer]
        c["k"] = k if start == 0 else np.concatenate([c["k"], k])
        c["v"] = v if start == 0 else np.concatenate([c["v"], v])
        q = np.concatenate([q_nope, q_pe], -1)
        scores = np.einsum("shd,thd->hst", q, c["k"]) * cfg.softmax_scale
        scores = scores + self._causal(S, start)
        o = np.einsum("hst,thd->shd", self._softmax(scores), c["v"])
        return o.reshape(S, -1) @ W[p + "wo"].T

    def attend_absorbed(self, layer: int, x: np.ndarray, start: int) -> np.ndarray:
        """Absorbed MLA: ``q_nope`` is multiplied into the latent space by the K part of ``wkv_b``; only the latent
        and the rope key are cached; the V part of ``wkv_b`` is applied after attention."""
        cfg, W, p = self.cfg, self.W, f"layers.{layer}.attn."
        S, H, nope = x.shape[0], cfg.n_heads, cfg.qk_nope_head_dim
        q_nope, q_pe, latent, k_pe = self._qkv(layer, x, start)
        wkv_b = W[p + "wkv_b"].reshape(H, nope + cfg.v_head_dim, cfg.kv_lora_rank)
        c = self.cache[layer]
        c["latent"] = latent if start == 0 else np.concatenate([c["latent"], latent])
        c["k_pe"] = k_pe if start == 0 else np.concatenate([c["k_pe"], k_pe])
        q_lat = np.einsum("shd,hdc->shc", q_nope, wkv_b[:, :nope])
        scores = (np.einsum("shc,tc->hst", q_lat, c["latent"]) + np.einsum("shr,tr->hst", q_pe, c["k_pe"]))
        scores = scores * cfg.softmax_scale + self._causal(S, start)
        o_lat = np.einsum("hst,tc->shc", self._softmax(scores), c["latent"])
        o = np.einsum("shc,hdc->shd", o_lat, wkv_b[:, nope:])
        return o.reshape(S, -1) @ W[p + "wo"].T

    @staticmethod
    def _causal(S: int, start: int) -> np.ndarray:
        T = start + S
        return np.where(np.arange(T)[None, :] > (start + np.arange(S))[:, None], -np.inf, 0.0)[None]

    # -- model -------------------------------------------------------------------------------------------------------
    def _checked(self, tokens, start: int) -> np.ndarray:
        """``tokens`` as int64 after every check ``forward`` documents (start, dtype, range, max_seq_len)."""
        cfg = self.cfg
        if not is_int(start):
            raise TypeError(f"start must be an int, got {start!r} ({type(start).__name__})")
        if start != 0 and start != self.pos:
            raise ValueError(f"start must be 0 (a new sequence) or the cached length {self.pos} (continue it), "
                             f"got {start}")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence of ids")
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got dtype {tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        if start + tokens.size > cfg.max_seq_len:
            raise ValueError(f"sequence of {start + tokens.size} tokens exceeds max_seq_len {cfg.max_seq_len}")
        return tokens.astype(np.int64)

    @contextmanager
    def _undo_on_error(self):
        """Restores position, caches and routing record when the block raises (the layers update their caches one
        by one; the cached arrays are replaced, never written in place, so shallow copies keep them)."""
        saved = self.pos, [dict(c) for c in self.cache], list(self.last_ids)
        try:
            yield
        except BaseException:
            self.pos, self.cache, self.last_ids = saved
            raise

    def forward(self, tokens, start: int) -> np.ndarray:
        """Logits ``[S, vocab]`` of ``tokens`` at positions ``start .. start + S - 1``, updating the cache.

        ``start`` is 0 (a new sequence: every layer's cache is replaced) or ``self.pos`` (continue the cached one);
        ``tokens`` are integer ids in ``[0, vocab_size)`` (floats and bools raise TypeError, not truncated). Every
        argument is checked before any cache is touched, so a refused call leaves the model as it was; a call that
        fails later (a missing weight, say) restores the caches it had updated."""
        cfg, W = self.cfg, self.W
        tokens = self._checked(tokens, start)
        with self._undo_on_error():
            x = W["embed"][tokens].astype(np.float32)
            for layer in range(cfg.n_layers):
                p = f"layers.{layer}."
                h = rms_norm(x, W[p + "attn_norm"], cfg.rms_eps)
                x = x + (self.attend_absorbed if self.absorbed else self.attend)(layer, h, start)
                h = rms_norm(x, W[p + "ffn_norm"], cfg.rms_eps)
                if layer < cfg.n_dense_layers:
                    x = x + self.mlp(h, W[p + "ffn.w1"], W[p + "ffn.w3"], W[p + "ffn.w2"])
                else:
                    x = x + self.moe(layer, h)
            logits = rms_norm(x, W["norm"], cfg.rms_eps) @ W["head"].T
        self.pos = start + tokens.size
        return logits

    def prefill(self, tokens) -> np.ndarray:
        """Logits of the last prompt position; resets the cache (only once ``tokens`` passed the checks; a prefill
        that fails later leaves the previous sequence cached)."""
        tokens = self._checked(tokens, 0)
        with self._undo_on_error():
            self.reset()
            return self.forward(tokens, 0)[-1]

    def decode(self, token: int) -> np.ndarray:
        return self.forward([token], self.pos)[-1]

    def generate(self, tokens, steps: int) -> tuple[list[int], list[np.ndarray]]:
        """Greedy continuation: ``steps`` new tokens and the logits that chose each (``steps`` an int >= 0;
        ``steps == 0`` returns ``([], [])`` and runs nothing; negative or non-integer raises before any work)."""
        if not is_int(steps):
            raise TypeError(f"steps must be an int, got {steps!r} ({type(steps).__name__})")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if steps == 0:
            return [], []
        logits = [self.prefill(tokens)]
        out = [int(np.argmax(logits[-1]))]
        for _ in range(steps - 1):
            logits.append(self.decode(out[-1]))
            out.append(int(np.argmax(logits[-1])))
        return out, logits
