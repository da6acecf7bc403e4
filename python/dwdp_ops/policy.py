"""Per-step choice between moving weights and moving tokens (pure host logic, no CUDA).

Modes of one step (every MoE layer of the step uses it):
  ``prefetch_all``  every remote expert of layer l+1 by the copy engine while layer l computes (DWDP);
  ``on_demand``     after the router, only the remote experts some local token selected, by the SM (NVSHMEM) fetch;
  ``dispatch``      tokens go to the experts' owners and the weighted results come back (DEP; collective).

The rule (per MoE layer, times in seconds; rank r has T_r tokens; every rank the same configuration):
  E experts, L = experts_per_rank, k = top_k, H = hidden, X = layout_bytes_per_expert, P = X / param_bytes
  parameters per expert, so one (token, expert) pair costs 2P FLOP.  Rates: B_ce, B_sm, B_d (GB/s), latency lat (µs,
  per collective), C (TFLOP/s: ``gemm_tflops``, or ``fp8_gemm_tflops`` for 1-byte weights).
    gemm(pairs)       = pairs * 2P / C
    prefetch_all_r    = gemm(T_r k) + max(0, (E - L) X_f / B_ce - gemm(T_r k)) = max(gemm(T_r k), (E - L) X_f / B_ce)
                        (the prefetch of layer l+1 is hidden behind layer l's compute; only the excess is exposed;
                        X_f = ``fetch_bytes_per_expert``, the padded stride the copy engine moves, default X)
    on_demand_r       = gemm(T_r k) + D(T_r) (E - L) / E * X / B_sm,   D(T) = E (1 - (1 - k/E)^T)
                        (the expected distinct experts of T tokens, ``expected_distinct``; not overlapped:
                        the fetch needs the router's ids)
    dispatch_r        = 2 lat + (max(S_r, R_r) (H b_x + 8k) + max(S_r, R_r) H b_p) / B_d + gemm(W_r)
                        S_r = T_r sum_{d != r} q(r, d)   rows r sends,   R_r = sum_{s != r} T_s q(s, d=r)   rows r gets
                        W_r = sum_s T_s m(s, r)          pairs r computes
                        m(s, d): expected pairs per token of s that the owner rule (dispatch_plan) sends to d, under
                        uniform routing: (k / E) sum_e [s owns e and d == s] + [s does not own e, d owns e] / owners(e)
                        q(s, d) = 1 - prod_{i<k} (E - n - i) / (E - i) with n = m(s, d) E / k: the probability that a
                        token of s sends a row to d (exact, hypergeometric, for one owner per expert).
                        b_x = token_bytes (bf16: 2), b_p = partial_bytes (the contract's float32 partials: 4);
                        8k bytes of per-row metadata; the combine moves the same rows the other way. Not overlapped.
  The step's mode minimises max_r cost_r (dispatch waits for the slowest rank; the table reports the others the same
  way). Ties (equal maxima) go to the first of ``MODES`` = (prefetch_all, on_demand, dispatch): the modes that couple
  ranks less come first. ``allowed`` restricts the candidates (``("dispatch",)`` forces a mode).

Agreement: ``dispatch`` needs every rank in the layer, so the mode must be the same on every rank. It is a
deterministic function of shared information: ``tokens_per_rank`` comes from ONE small collective per step (an
all-gather of each rank's T, e.g. ``all_gather_into_tensor`` of one int64 or the rendezvous allgather), the rest is
configuration every rank holds; the same float operations on the same inputs give every rank the same mode.

The default ``Rates`` are H200 figures: B_ce and B_sm measured (docs/benchmarks.md), C the measured bf16 expert GEMM
rate, B_d and lat fitted to ``bench/dispatch_bandwidth.py``'s 2 x H200 run.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field

from ._checks import int_at_least, is_finite_real, is_real
from .partition import ExpertPartition

__all__ = ["MODES", "ModeChoice", "Rates", "choose_mode", "expected_distinct", "pair_shares"]

MODES = ("prefetch_all", "on_demand", "dispatch")
"""The step modes ``choose_mode`` picks from, in tie-break order (the modes that couple ranks less come first)."""


@dataclass(frozen=True)
class Rates:
    """Measured rates of one machine. Bandwidths in GB/s (1e9 bytes/s), latency in µs per collective (dispatch and
    combine are one each), GEMM rate in TFLOP/s."""

    ce_gbps: float = 370.0  # copy-engine fetch of remote experts, H200 (docs/benchmarks.md: 373.9-374.2)
    sm_gbps: float = 320.0  # on-demand NVSHMEM fetch on 32 SMs, H200
    # our dispatch + combine on 2 x H200 with the default grid (every SM; bench/results/dispatch_bandwidth_H200_N2.json,
    # layers timed back to back): a straight line through 1K-32K tokens per rank gives 0.26 us per row of 43 KB
    # (bf16 row, metadata, float32 partial back), and one token takes 163 us for the pair: ~80 us per collective
    dispatch_gbps: float = 165.0
    dispatch_latency_us: float = 80.0
    gemm_tflops: float = 640.0  # bf16 grouped expert GEMM, H200 (docs/benchmarks.md: 635-658)
    # fp8 rowwise grouped expert GEMM (used when param_bytes == 1): the bf16 figure times the 1094 / 804 TFLOP/s
    # that torch._scaled_grouped_mm / torch._grouped_mm reached on one H200 (issue 13's probe: 32 groups x 512 rows,
    # N 4096, K 7168); to be replaced by bench/expert_gemm.py's measurement at R1 shapes
    fp8_gemm_tflops: float = 870.0

    def __post_init__(self) -> None:
        """Every field a real number (Python or numpy; numpy values become floats): TypeError otherwise (bools
        included); ValueError unless finite and > 0 (the latency >= 0)."""
        for name in ("ce_gbps", "sm_gbps", "dispatch_gbps", "gemm_tflops", "fp8_gemm_tflops", "dispatch_latency_us"):
            v = getattr(self, name)
            if not is_real(v):
                raise TypeError(f"Rates.{name} must be a finite number, got {v!r} ({type(v).__name__})")
            if type(v) not in (int, float):
                v = float(v)
                object.__setattr__(self, name, v)
            if not is_finite_real(v):  # (math.isfinite of an int beyond floats' range raised OverflowError)
                raise ValueError(f"Rates.{name} must be a finite number, got {v!r}")
            if v < 0 or (v == 0 and name != "dispatch_latency_us"):
                raise ValueError(f"Rates.{name} must be > 0 (latency >= 0), got {v}")


@dataclass(frozen=True)
class ModeChoice:
    """``mode``: the step's mode. ``cost_us[mode]``: the maximum over ranks of the per-layer cost (µs) of each
    candidate; ``per_rank_us[mode]``: the per-rank costs (µs, rank order). For logs: ``table()``."""

    mode: str
    cost_us: dict = field(default_factory=dict)
    per_rank_us: dict = field(default_factory=dict)

    def table(self) -> str:
        rows = [f"{m:13s} {self.cost_us[m]:12.1f} us (max over ranks)  per rank "
                + " ".join(f"{c:.1f}" for c in self.per_rank_us[m]) + ("  <- chosen" if m == self.mode else "")
                for m in self.cost_us]
        return "\n".join(rows)


def expected_distinct(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts selected by ``tokens`` tokens each choosing ``top_k`` of ``num_experts`` uniformly.
    Integers (Python or numpy): ``num_experts >= 1`` (within floats' range), ``top_k`` in ``[1, num_experts]``,
    ``tokens >= 0``; TypeError / ValueError naming the argument otherwise."""
    num_experts = int_at_least("num_experts", num_experts, 1)
    top_k = int_at_least("top_k", top_k, 1)
    if top_k > num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}] (num_experts), got {top_k}")
    tokens = int_at_least("tokens", tokens, 0)
    if not is_finite_real(num_experts):
        raise ValueError(f"num_experts must be at most {sys.float_info.max:.6g} (a float's range), got {num_experts}")
    # base ** tokens is 0.0 for any base < 1 long before 2^1000 tokens (base <= 1 - 2^-53); a Python int exponent
    # beyond floats' range raised OverflowError
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** min(tokens, 2**1000))


def pair_shares(partition: ExpertPartition, top_k: int) -> list[list[float]]:
    """``m[s][d]``: expected pairs per token of source s that the owner rule sends to d (incl. d == s: local),
    under uniform routing (module docstring). Each row sums to top_k. ``top_k``: an int in ``[1, num_experts]``
    (TypeError / ValueError otherwise)."""
    if not isinstance(partition, ExpertPartition):
        raise TypeError(f"partition must be an ExpertPartition, got {type(partition).__name__}")
    E, N = partition.num_experts, partition.world_size
    top_k = int_at_least("top_k", top_k, 1)
    if top_k > E:
        raise ValueError(f"top_k must be in [1, {E}] (the partition's experts), got {top_k}")
    m = [[0.0] * N for _ in range(N)]
    for e in range(E):
        owners = partition.owners(e)
        for s in range(N):
            if s in owners:
                m[s][s] += top_k / E
            else:
                for d in owners:
                    m[s][d] += top_k / E / len(owners)
    return m


@functools.lru_cache(maxsize=64)
def _shares(partition: ExpertPartition, top_k: int) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]:
    """``(m, q)`` of the module docstring for a configuration: computed once (``choose_mode`` runs every step on the
    host, ahead of the step's kernels; these O(E N + N^2 k) loops depend on the configuration alone)."""
    m = pair_shares(partition, top_k)
    E, N = partition.num_experts, partition.world_size
    q = tuple(tuple(_p_row(m[s][d], E, top_k) for d in range(N)) for s in range(N))
    return tuple(tuple(r) for r in m), q



def _p_row(m: float, E: int, k: int) -> float:
    """P(a token sends at least one pair to a dest that takes m pairs per token in expectation)."""
    n = m * E / k
    miss = 1.0
    for i in range(k):
        miss *= max(0.0, (E - n - i) / (E - i))
    return 1.0 - miss


def _iterated(kind, value, what: str):
    """``kind(value)`` (list or tuple), or a TypeError that says ``what`` and shows ``value`` when it is not iterable."""
    try:
        return kind(value)
    except TypeError:
        raise TypeError(f"{what}, got {value!r} ({type(value).__name__})") from None


def choose_mode(tokens_per_rank: Sequence[int], partition: ExpertPartition, layout_bytes_per_expert: int,
                hidden: int, top_k: int, rates: Rates | None = None, allowed: Sequence[str] = MODES, *,
                param_bytes: float = 2.0, token_bytes: float = 2.0, partial_bytes: float = 4.0,
                fetch_bytes_per_expert: int | None = None) -> ModeChoice:
    """The step's mode by the rule of the module docstring. ``tokens_per_rank``: every rank's T this step (the same
    list on every rank); ``layout_bytes_per_expert``: one expert's bytes (``ExpertLayout.expert_bytes``);
    ``param_bytes``: bytes per weight parameter (2 bf16, 1 fp8) for the GEMM FLOPs; ``token_bytes``: bytes per
    hidden element in dispatch; ``partial_bytes``: bytes per element of the combine's partials;
    ``fetch_bytes_per_expert``: what the copy-engine prefetch moves per expert (``ExpertLayout.expert_stride``: the
    padded stride, more than ``expert_bytes`` for a shape with padding; None: ``layout_bytes_per_expert``). Pure; not a
    collective (the caller gathers ``tokens_per_rank``). Counts and sizes may be Python or numpy numbers (converted);
    a wrong type (bools included) raises TypeError, a bad value ValueError, each naming the argument (a count or size
    beyond floats' range included); rates and sizes that give a cost beyond floats' range (infinite, or NaN) raise
    ValueError naming them all."""
    if not isinstance(partition, ExpertPartition):
        raise TypeError(f"partition must be an ExpertPartition, got {type(partition).__name__}")
    rates = Rates() if rates is None else rates
    if not isinstance(rates, Rates):
        raise TypeError(f"rates must be a Rates, got {type(rates).__name__}")
    E, N = partition.num_experts, partition.world_size
    if isinstance(tokens_per_rank, (Mapping, Set)):  # a {rank: T} dict lists its keys; a set has no rank order
        raise TypeError(f"tokens_per_rank must be a sequence of one count per rank, in rank order (a list, tuple or "
                        f"1-D array), got a {type(tokens_per_rank).__name__}: {tokens_per_rank!r}")
    tokens = _iterated(list, tokens_per_rank, "tokens_per_rank must be a sequence of one count per rank, in rank "
                                              "order (a list, tuple or 1-D array)")
    if len(tokens) != N:
        raise ValueError(f"tokens_per_rank needs one count per rank of the partition's world ({N}), got {len(tokens)}")
    tokens = [int_at_least(f"tokens_per_rank[{r}]", t, 0) for r, t in enumerate(tokens)]
    X = int_at_least("layout_bytes_per_expert", layout_bytes_per_expert, 1)
    Xf = X if fetch_bytes_per_expert is None else int_at_least("fetch_bytes_per_expert", fetch_bytes_per_expert, X)
    H = int_at_least("hidden", hidden, 1)
    k = int_at_least("top_k", top_k, 1)
    if k > E:
        raise ValueError(f"top_k must be in [1, {E}] (the layer's experts), got {k}")
    for name, v in ([(f"tokens_per_rank[{r}]", t) for r, t in enumerate(tokens)]
                    + [("layout_bytes_per_expert", X), ("fetch_bytes_per_expert", Xf), ("hidden", H)]):
        if not is_finite_real(v):  # (the rate model's float arithmetic raised OverflowError)
            raise ValueError(f"{name} must be at most {sys.float_info.max:.6g} (a float's range), got {v}")
    sizes = {}
    for name, v in (("param_bytes", param_bytes), ("token_bytes", token_bytes), ("partial_bytes", partial_bytes)):
        if not is_real(v):
            raise TypeError(f"{name} must be a number > 0, got {v!r} ({type(v).__name__})")
        if not v > 0:
            raise ValueError(f"{name} must be a number > 0, got {v!r}")
        if not is_finite_real(v):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        sizes[name] = v if type(v) in (int, float) else float(v)
    param_bytes, token_bytes, partial_bytes = sizes["param_bytes"], sizes["token_bytes"], sizes["partial_bytes"]
    if isinstance(allowed, str):  # tuple("dispatch") would be its letters
        raise ValueError(f"allowed must be a sequence of mode names, got the string {allowed!r} "
                         f"(write ({allowed!r},))")
    allowed = _iterated(tuple, allowed, f"allowed must be a sequence of mode names from {MODES}")
    unknown = [a for a in allowed if a not in MODES]
    if not allowed or unknown or len(set(allowed)) != len(allowed):
        raise ValueError(f"allowed must be a non-empty subset of {MODES} without repeats, got {allowed}")

    try:
        per_rank = _costs(tokens, partition, rates, X, Xf, H, k, param_bytes, token_bytes, partial_bytes, allowed)
    except OverflowError:
        per_rank = None
    bad = None if per_rank is None else next(((md, r, c) for md, cs in per_rank.items() for r, c in enumerate(cs)
                                              if not math.isfinite(c)), None)
    if per_rank is None or bad is not None:
        # a NaN cost (0 tokens x an infinite pair time) had made the choice below raise a bare StopIteration, an
        # infinite one a meaningless choice
        what = "a cost" if bad is None else f"the {bad[0]} cost of rank {bad[1]} ({bad[2]} us)"
        raise ValueError(f"choose_mode: {what} is beyond floats' range: rates={rates}, tokens_per_rank={tokens}, "
                         f"layout_bytes_per_expert={X}, fetch_bytes_per_expert={Xf}, hidden={H}, top_k={k}, "
                         f"param_bytes={param_bytes}, token_bytes={token_bytes}, partial_bytes={partial_bytes}; "
                         "expected rates and sizes that give finite times")
    cost = {mode: max(c) for mode, c in per_rank.items()}
    best = min(cost.values())
    mode = next(md for md in MODES if md in cost and cost[md] == best)
    return ModeChoice(mode, cost, per_rank)


def _costs(tokens: list[int], partition: ExpertPartition, rates: Rates, X: int, Xf: int, H: int, k: int,
           param_bytes: float, token_bytes: float, partial_bytes: float,
           allowed: tuple[str, ...]) -> dict[str, tuple[float, ...]]:
    """``choose_mode``'s per-rank costs (µs) of each allowed mode, from checked arguments (module docstring)."""
    E, N, L = partition.num_experts, partition.world_size, partition.experts_per_rank
    C = rates.fp8_gemm_tflops if param_bytes == 1 else rates.gemm_tflops
    pair_s = 2.0 * (X / param_bytes) / (C * 1e12)
    fetch_all = (E - L) * Xf / (rates.ce_gbps * 1e9)
    lat = rates.dispatch_latency_us * 1e-6
    m, q = _shares(partition, k)
    bytes_d, bytes_c = H * token_bytes + 8 * k, H * partial_bytes
    per_rank: dict[str, tuple[float, ...]] = {}
    for mode in MODES:
        if mode not in allowed:
            continue
        costs = []
        for r, T in enumerate(tokens):
            own = T * k * pair_s
            if mode == "prefetch_all":
                c = own + max(0.0, fetch_all - own)
            elif mode == "on_demand":
                c = own + expected_distinct(E, k, T) * (E - L) / E * X / (rates.sm_gbps * 1e9)
            else:
                sent = T * sum(q[r][d] for d in range(N) if d != r)
                got = sum(tokens[s] * q[s][r] for s in range(N) if s != r)
                rows = max(sent, got)
                work = sum(tokens[s] * m[s][r] for s in range(N)) * pair_s
                c = 2 * lat + rows * (bytes_d + bytes_c) / (rates.dispatch_gbps * 1e9) + work
            costs.append(c * 1e6)
        per_rank[mode] = tuple(costs)
    return per_rank
