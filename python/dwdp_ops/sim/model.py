"""Iteration-level simulation of DWDP (``prefetch_all``) and DEP for DeepSeek-R1 prefill on N GPUs.

Both modes serve the same per-rank queues (``workload``: same seed, same batches); every rank replicates attention,
dense layers, shared expert and router (attention data parallelism), and each MoE layer's routed experts are
partitioned over the N ranks: for DWDP's fetch an ``ExpertPartition`` (disjoint where N divides 256, else the
largest stride with neighbours overlapping, as the paper's N=3/5/7 examples), for DEP each expert on one rank
(``dep_expert_counts``: E / N each, else the floor or the ceiling of it). Layers: ``dense_layers`` dense ones first
(R1: 3), then MoE ones (R1: 58). Per-operation times come from ``costs.CostModel``.

One rank's work in one iteration of T tokens (chunks of lengths S_c after prefixes P_c), per layer:
  attention block = MLA projections (dense GEMMs) + elementwise others (T c_att) + core attention (sum over chunks)
  dense layer     + dense MLP (dense GEMMs)
  MoE layer       + shared expert and router (dense GEMMs) + MoE others(T) + routed expert GEMMs
and the LM head of the requests that finish in the iteration.

DWDP (each rank on its own; no collective): the expert GEMMs of MoE layer j run over all E experts
(p = T k pairs, m = T k / E rows per expert) once MoE layer j's E - L remote experts have arrived. The copy engine
fetches them, F = (E - L) X / B_fetch per layer, one layer after another on one copy stream, into two slots: layers
0 and 1 are issued when the iteration starts (hidden behind the dense layers and the first attention), layer j >= 2
when layer j - 2's expert GEMMs have finished with its slot. Compute waits only where a fetch is late (exposed
fetch); while a copy is in flight every compute category runs (1 + s_cat) slower (measured interference). This is an
exact two-stream event simulation, so in a steady state of identical layers of compute C the exposed fetch is
max(0, F - C (1 + s)) per layer. A rank's iteration time is its own; TPS/GPU = mean over ranks of its tokens / its
time.

DEP (tokens move; every MoE layer is a collective): at MoE layer j rank r arrives after its own work since the last
combine (A_r: attention block, shared expert, router, others; for j = 0 also the dense layers), the dispatch starts
when the slowest rank arrives, then each rank runs its expert GEMMs over the W_r = sum_s T_s m(s, r) pairs it
receives (uniform routing: m(s, r) = k c_r / E) on its c_r experts, the combine starts when the slowest rank's GEMMs
end; dispatch and combine take max_r (lat + rows_r H b / B_disp), rows_r = max(rows sent, rows received)
(hypergeometric, as ``policy.choose_mode``). Synchronisation wait of rank r = sum over layers of
(max A - A_r) + (max G - G_r) (+ the LM-head tail). All ranks run iteration i together; the iteration takes
sum_j (max_r A_r + dispatch + max_r G_r + combine) + max_r tail_r. With N = 1 or no MoE layer there is no collective:
each rank keeps its own time, as in DWDP.

Rank speed (``CostModel.rank_factors``): with a calibration's ``rank_speed`` s > 0, every compute time of the last
rank is x (1 + s) and of the others x (1 - s / (N - 1)) (mean 1: the calibration is a mean of ranks), in both modes.
In DEP the others wait for the slow rank at every collective (synchronisation wait even at CV 0); in DWDP each rank
keeps its own time, so TPS/GPU moves only at second order in s, ``iteration_ms`` (mean over ranks) not at first
order, and ``slowest_rank_iteration_ms`` (the slow rank's time, what a benchmark's per-step maximum measures) grows
by about s.

Categories (the paper's Table 3): attention (core), expert_gemm, dense_gemm, others, communication (dispatch +
combine), sync_wait, exposed_fetch; they add up to each rank's iteration time; DWDP's compute categories include
their interference slowdown (reported also as ``interference_ms``); ``overlapped_copy_ms`` is the copy engine's busy
time, hidden or not, outside the sum.

Routing imbalance (``SimConfig.owner_load``): relative token-expert pairs per DEP owner rank (only the ratios count;
None = the uniform routing above). Owner r takes the fraction ``owner_load[r] / sum(owner_load)`` of all the pairs,
T k per token of the group whatever the expert counts: its expert GEMMs carry f_r times its uniform share (k c_r / E
pairs per token) with f_r = (owner_load[r] / mean(owner_load)) (E / N) / c_r (``SimConfig.owner_factors``), so that
sum_r c_r f_r = E and the pairs are conserved; where N divides E, f_r is owner_load[r] / mean(owner_load). With
uneven counts (E / N not an integer, c_r the floor or the ceiling) equal loads mean equal pairs per owner, not the
uniform routing's pairs in proportion to c_r (a measured uniform routing has owner_load proportional to c_r, f_r = 1).
Invariant: an owner takes at most min(k, c_r) pairs per token (a token's expert ids are distinct), f_r <= E / max(k,
c_r); only c_r < k can bind it (N > E / k). A load beyond it (at N = 72, where c_r is 3 or 4: an owner of 3 experts
at more than 42.6x the other 71) takes exactly the bound and its excess goes to the other owners in proportion to
their loads, the pairs still T k (always feasible: sum_r min(k, c_r) >= k).
A token sends owner r a row with the probability of at least one of its pairs (capped at top-k); DWDP's expert GEMMs
are not changed (every rank computes its own tokens on all E experts: skew only reshapes its groups, a second-order
effect not modelled). ``bench/e2e_dwdp_vs_dep.py`` records the measured per-owner pairs with every point, so a
validation simulates the router the run had.

Redundant expert slots (EPLB, ``SimConfig.redundant_experts`` = R; ``dep_eplb``): DEP's E experts keep their home
ranks (c_r above, ``dep_expert_counts``; the owner loads are measured on that placement, and which of an owner's
experts are hot is not known, so an owner's experts carry equal pairs), and R redundant slots hold replicas of them.
In units of k / E pairs per token of the group, every home expert of rank r carries u_r = f_r (f: ``owner_factors``,
sum_r c_r f_r = E), rank r P_r = c_r u_r, the mean is P = sum_r P_r / N = E / N.
  slots     c_r + x_r: the R redundant slots go one at a time to the rank with the fewest slots (ties: the smaller
            P_r, then the lower rank), so every rank holds ceil(E / N) at R = ceil(E / N) N - E, and (E + R) / N
            wherever N divides E + R
  level     M = min {M >= P : sum_r ceil((P_r - M)+ / u_r) <= sum_{d : P_d <= M} x_d and X <= S}, with the excess
            X = sum_r (P_r - M)+ and the room S = sum_{d : x_d > 0} (M - P_d)+ (M = max P_r always qualifies)
  pairs     L_r = M where P_r > M; P_r + (M - P_r) X / S where P_r < M and x_r > 0; else P_r
A rank above the level moves its excess off in replicas of its own experts, each carrying at most one expert's pairs
(u_r: a token's pair goes to one instance of its expert, the pairs split over the instances in any proportion, the best
any replica choice can do); a replica sits in a redundant slot of a rank at or below M, and the ranks with a slot take
the moved pairs in proportion to their room (fluid: an exact split over whole replicas can need up to one more replica
a receiving rank, and a rank's intake is not checked against its slots times one expert's pairs). Invariants:
sum_r L_r = sum_r P_r; min(P_r, M) <= L_r <= M; at most R replicas carry pairs (``replicas_used``, U); a redundant
slot on a rank above M carries none (it would add to an overloaded rank), so an excess larger than the replicas below
M can carry stays (M > P). With no replica used (R = 0, or too few slots below M to lower the fullest rank:
M = max P_r) L_r = P_r and every DEP formula is the R = 0 one, bit for bit. Rank r's expert GEMMs run over
L_r k / E pairs per token of the group (W_r above times L_r / c_r, = f_r at R = 0) on c_r + h_r experts,
h_r = min(x_r, ceil(U (M - P_r) / S)) the replicas it holds where it takes pairs (else 0), and a token sends it a row
with the probability of at least one of L_r k / E pairs (``_p_row`` as above: dispatch and combine follow the
balanced pairs).
With equal loads whole experts limit what replicas can do: at N = 72 each of the 40 ranks of 4 home experts
(P_r = 4, P = 256 / 72 = 3.56) needs a replica, so the even layout's R = 32 (one slot on each 3-expert rank) lowers
none of them (any placement of whole experts leaves at least 8 ranks with 4 unreplicated experts); R = 40 (4 or 5
slots a rank) or 104 (5 each) evens them out.

Not modelled: hot experts inside an owner's slice (and so EPLB moving hot experts between ranks), overlap of
communication with compute in DEP (no two-batch overlap), many-to-one copy-engine contention and the 2 MiB-slice
mitigation, CUDA-graph/launch overheads, KV-cache transfer, memory capacity (the full 61-layer R1 in bf16 does not fit
on 2 H200s, and redundant slots beyond ceil(E / N) a rank take memory not counted: the simulator only times it),
decode.
"""

from __future__ import annotations

import heapq
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .._checks import is_finite_real, is_int
from ..models.deepseek_r1.config import DeepSeekConfig
from ..partition import ExpertPartition
from ..policy import _p_row
from .costs import CATEGORIES, COMPUTE, PROFILES, CostModel, Overrides, load_calibration
from .workload import Iteration, _check_source, workload

__all__ = ["MAX_ISL", "MAX_ITERATIONS", "MAX_LAYER_STEPS", "MAX_REQUESTS", "MAX_REQUESTS_PER_ITERATION", "MAX_TOKENS",
           "RankStep", "SimConfig", "dep_eplb", "dep_expert_counts", "dep_iteration", "dwdp_timeline", "partition_for",
           "simulate", "work_error"]

# Upper bounds of a setting. The simulator builds every request of every iteration it simulates, so its time and
# memory grow with iterations x ranks x requests per iteration (about max_tokens / isl: both distributions have mean
# length isl, or at least isl / 2 for a ratio), and the timelines with iterations x ranks x layers. Each bound below
# alone is not enough (256 GPUs x 10000 iterations x 61 layers, every value in range, ran for about 20 minutes; 1024
# requests an iteration on top, for hours and hundreds of GB): MAX_LAYER_STEPS and MAX_REQUESTS bound the products,
# which keeps one setting within about 15 s and 1 GB.
MAX_ISL = 1 << 20  # 1048576 tokens: 6.4x DeepSeek-R1's 163840-token context
MAX_TOKENS = 1 << 20  # 1048576 tokens per rank and iteration: 32x the paper's 32768
MAX_REQUESTS_PER_ITERATION = 1024  # max_tokens <= this x isl: 16x the paper's largest batch (64 requests)
MAX_ITERATIONS = 10000  # iterations, and warmup, per rank: the CLI's --iterations bound
MAX_LAYER_STEPS = 1 << 21  # gpus x iterations x layers (timed; ~7 us each): 256 GPUs x 134 iterations at 61 layers
MAX_REQUESTS = 1 << 22  # gpus x (iterations + warmup) x max_tokens / isl: the requests built, about (~2 us each)


def work_error(gpus: int, iterations: int, warmup: int, layers: int, isl: int, max_tokens: int) -> str | None:
    """Why a setting is too large to simulate in seconds (``MAX_LAYER_STEPS``, ``MAX_REQUESTS``), or None."""
    steps = gpus * iterations * layers
    if steps > MAX_LAYER_STEPS:
        return (f"gpus x iterations x layers must be at most {MAX_LAYER_STEPS} (2^21: about 15 s), got {gpus} x "
                f"{iterations} x {layers} = {steps}")
    requests = gpus * (iterations + warmup) * max_tokens / isl
    if requests > MAX_REQUESTS:
        return (f"gpus x (iterations + warmup) x max_tokens / isl (about the requests built) must be at most "
                f"{MAX_REQUESTS} (2^22: about 10 s and 1 GB), got {gpus} x {iterations + warmup} x {max_tokens} / "
                f"{isl} = {requests:.0f}")
    return None


@dataclass(frozen=True)
class SimConfig:
    """One simulated setting. ``hardware``: a shipped profile (``h200``, ``gb200``) or a calibration file; exactly one
    of ``ratio`` and ``cv`` (``ratio`` 0.8 if neither is given); ``dense_layers``: None = min(3, layers).
    ``isl`` <= ``MAX_ISL``, ``max_tokens`` <= ``MAX_TOKENS`` and <= ``MAX_REQUESTS_PER_ITERATION`` x ``isl``,
    ``iterations`` and ``warmup`` (untimed iterations per rank, drawn and dropped first) <= ``MAX_ITERATIONS``,
    and their products within ``MAX_LAYER_STEPS`` and ``MAX_REQUESTS`` (``work_error``).
    ``owner_load``: relative routed pairs per DEP owner rank (``gpus`` numbers > 0; None: uniform routing).
    ``redundant_experts``: DEP's redundant expert slots R (EPLB, module docstring), an integer in
    [0, (gpus - 1) x 256] (at the top every rank holds every expert); None (the default): the smallest R that gives
    every rank the same number of slots, ceil(256 / gpus) x gpus - 256 (``dep_redundant_experts``: 0 where gpus
    divides 256, 32 at 72), no more expert memory on any rank than R = 0 puts on the fullest; R = 0 places each
    expert once."""

    hardware: str = "h200"
    gpus: int = 2
    isl: int = 8192
    ratio: float | None = None
    cv: float | None = None
    max_tokens: int = 32768
    layers: int = 61
    dense_layers: int | None = None
    seed: int = 0
    iterations: int = 32
    warmup: int = 0
    overrides: Overrides = field(default_factory=Overrides)
    owner_load: tuple[float, ...] | None = None
    redundant_experts: int | None = None

    def __post_init__(self) -> None:
        hw = self.hardware
        if not isinstance(hw, (str, os.PathLike)) or not str(hw):
            raise ValueError(f"hardware must be a profile name ({', '.join(PROFILES)}) or the path of a calibration "
                             f"file, got {hw!r}")
        object.__setattr__(self, "hardware", os.fspath(hw))  # a path as str: asdict() goes into JSON
        if self.ratio is None and self.cv is None:
            object.__setattr__(self, "ratio", 0.8)
        if self.ratio is not None and self.cv is not None:
            raise ValueError("give one of ratio and cv, not both")
        ints = {"gpus": 1, "isl": 1, "max_tokens": 1, "layers": 1, "seed": 0, "iterations": 1, "warmup": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
            object.__setattr__(self, name, int(v))  # a numpy integer as int: asdict() goes into JSON
        for name in ("iterations", "warmup"):  # every one is built (the warmup's drawn and dropped)
            if getattr(self, name) > MAX_ITERATIONS:
                raise ValueError(f"{name} must be at most {MAX_ITERATIONS} per rank, got {getattr(self, name)}")
        if self.isl > MAX_ISL:
            raise ValueError(f"isl must be at most {MAX_ISL} (2^20 tokens), got {self.isl}")
        if self.max_tokens > MAX_TOKENS:
            raise ValueError(f"max_tokens must be at most {MAX_TOKENS} (2^20 tokens per rank and iteration), got "
                             f"{self.max_tokens}")
        if self.max_tokens > MAX_REQUESTS_PER_ITERATION * self.isl:
            raise ValueError(f"max_tokens must be at most {MAX_REQUESTS_PER_ITERATION} x isl "
                             f"({MAX_REQUESTS_PER_ITERATION * self.isl}: about {MAX_REQUESTS_PER_ITERATION} requests "
                             f"per iteration), got {self.max_tokens}")
        if self.layers > 61:
            raise ValueError(f"layers must be at most 61 (DeepSeek-R1), got {self.layers}")
        if self.gpus > 256:
            raise ValueError(f"gpus must be at most 256 (one expert per GPU), got {self.gpus}")
        err = work_error(self.gpus, self.iterations, self.warmup, self.layers, self.isl, self.max_tokens)
        if err:
            raise ValueError(err)
        d = self.dense_layers
        if d is not None and (not is_int(d) or not 0 <= d <= self.layers):
            raise ValueError(f"dense_layers must be an integer in [0, layers={self.layers}], got {d!r}")
        if d is not None:
            object.__setattr__(self, "dense_layers", int(d))
        _check_source(self.isl, self.ratio, self.cv)  # the workload's own rule: refused here, not at simulate()
        for name in ("ratio", "cv"):  # a numpy number as a Python float: asdict() goes into JSON
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        if self.owner_load is not None:
            ol = self.owner_load
            if (not isinstance(ol, tuple) or len(ol) != self.gpus
                    or not all(is_finite_real(x) and x > 0 for x in ol)):
                raise ValueError(f"owner_load must be a tuple of {self.gpus} finite numbers > 0 (one per GPU), "
                                 f"got {ol!r}")
            object.__setattr__(self, "owner_load", tuple(float(x) for x in ol))
        R, top = self.redundant_experts, (self.gpus - 1) * self.model_config().n_routed_experts
        if R is not None:
            if not is_int(R) or not 0 <= R <= top:
                raise ValueError(f"redundant_experts must be None or an integer in [0, (gpus - 1) x 256 = {top}] "
                                 f"(DEP's redundant expert slots; at the top every rank holds every expert), got {R!r}")
            object.__setattr__(self, "redundant_experts", int(R))

    def dep_redundant_experts(self) -> int:
        """R of DEP's EPLB: ``redundant_experts``, or where None the smallest R that gives every rank the same number
        of expert slots, ceil(E / N) N - E."""
        if self.redundant_experts is not None:
            return self.redundant_experts
        E = self.model_config().n_routed_experts
        return -(-E // self.gpus) * self.gpus - E

    def owner_factors(self) -> list[float]:
        """f_r: DEP owner r's pairs against its uniform share (k c_r / E a token, c_r = ``dep_expert_counts``), all
        1.0 without ``owner_load``. ``owner_load`` is relative pairs per owner: owner r takes ``owner_load[r] /
        sum(owner_load)`` of the T k pairs, so f_r = (owner_load[r] / mean(owner_load)) x (E / N) / c_r and
        sum_r c_r f_r = E (the pairs are conserved whatever the counts). Where N divides E the last factor is exactly
        1.0: ``owner_load`` scaled to mean 1.

        Invariant: owner r takes at most min(k, c_r) pairs a token, f_r k c_r / E <= min(k, c_r), i.e.
        f_r <= E / max(k, c_r) (a token's k expert ids are distinct: it sends each of the owner's experts one pair
        at most). Only c_r < k can bind it (N > E / k = 32 for R1; c_r is 3 or 4 at N = 72); an ``owner_load``
        beyond it (at N = 72 an owner of 3 experts at more than 42.6x the other 71) takes exactly its bound and the
        excess goes to the other owners in proportion to their loads (water-filling, repeated while another reaches
        its bound), so sum_r c_r f_r = E still: always feasible, as sum_r min(k, c_r) >= k. Where no owner reaches
        its bound the factors are the formula above, the same floats."""
        if self.owner_load is None:
            return [1.0] * self.gpus
        cfg = self.model_config()
        E, N, k = cfg.n_routed_experts, self.gpus, cfg.n_activated_experts
        counts = dep_expert_counts(E, N)
        top = max(self.owner_load)  # scaled to the largest first: a sum of loads near the float maximum overflows
        mean = sum(x / top for x in self.owner_load) / len(self.owner_load)
        # E / N / c_r: 1.0 exactly where N divides E (the same floats as before); else it turns relative pairs per
        # owner into a factor on the owner's uniform share, which is in proportion to its c_r experts
        f = [x / top / mean * (E / N / c) for x, c in zip(self.owner_load, counts)]
        return _cap_owner_factors(f, self.owner_load, counts, E, k)

    @property
    def n_dense(self) -> int:
        return min(3, self.layers) if self.dense_layers is None else self.dense_layers

    def model_config(self) -> DeepSeekConfig:
        return DeepSeekConfig.r1(n_layers=self.layers).replace(n_dense_layers=self.n_dense)


def _cap_owner_factors(f: list[float], load: tuple[float, ...], counts: list[int], E: int, k: int) -> list[float]:
    """``f`` (owner_load's factors, sum_r c_r f_r = E) with every f_r at most E / max(k, c_r)
    (``SimConfig.owner_factors``' invariant): the owners above their cap take it, the others share the rest of the
    pairs in proportion to their loads, repeated while that lifts another above its cap. ``f`` itself where none is
    above. The others' loads are scaled to the largest of them (not to the capped owners': against a load 1e300 times
    theirs they would round to 0)."""
    cap = [E / max(k, c) for c in counts]
    capped = [x > m for x, m in zip(f, cap)]
    if not any(capped):
        return f
    while True:
        room = E - sum(c * m for c, m, b in zip(counts, cap, capped) if b)
        free = [r for r, b in enumerate(capped) if not b]
        if not free or room <= 0:
            # the capped owners take every pair: only by rounding (an owner exactly at its cap computed above it), as
            # sum_r min(k, c_r) >= k leaves room otherwise; the others keep their factors, negligible against the caps
            return [m if b else x for x, m, b in zip(f, cap, capped)]
        top = max(load[r] for r in free)
        z = sum(load[r] / top for r in free)
        out = [m if b else load[r] / top / z * room / c for r, (c, m, b) in enumerate(zip(counts, cap, capped))]
        over = [r for r in free if out[r] > cap[r]]
        if not over:
            return out
        for r in over:
            capped[r] = True


def dep_expert_counts(num_experts: int, ranks: int) -> list[int]:
    """DEP's placement: every expert on one rank, rank r owning experts [r E // N, (r + 1) E // N) (E / N each where N
    divides E, else the floor or the ceiling of it: 3 or 4 of R1's 256 on 72 ranks). Not ``partition_for``'s
    overlapping placement, which serves DWDP's fetch: with it DEP's ranks held 43 of 256 experts at N = 72 and the
    lowest owners took most pairs, a baseline no DEP deployment would run."""
    return [(r + 1) * num_experts // ranks - r * num_experts // ranks for r in range(ranks)]


def dep_eplb(home: list[int], load: list[float], redundant: int) -> dict:
    """DEP's redundant expert slots (EPLB, module docstring). ``home``: c_r, each rank's home experts
    (``dep_expert_counts``); ``load``: f_r, each owner's load factor (``SimConfig.owner_factors``); ``redundant``: R.
    Returns ``slots`` (c_r + x_r), ``gemm_experts`` (the experts rank r's GEMMs run over: c_r + h_r, h_r the
    replicas it holds), ``factor`` (g_r = L_r / c_r: rank r's pairs against its uniform home share; ``load``
    itself, the same floats, where no replica is used), ``replicas_used`` and ``level`` (M, in units of k / E pairs
    per token)."""
    N = len(home)
    heap = [(n, n * f, r) for r, (n, f) in enumerate(zip(home, load))]  # fewest slots, then least pairs, then rank
    heapq.heapify(heap)
    extra = [0] * N
    for _ in range(redundant):
        c, p, r = heapq.heappop(heap)
        extra[r] += 1
        heapq.heappush(heap, (c + 1, p, r))
    slots = [n + x for n, x in zip(home, extra)]
    P = [n * f for n, f in zip(home, load)]
    mean, top = sum(P) / N, max(P)

    def need(M: float) -> int:  # replicas that bring every rank down to M (1e-9: M = P_r - j u_r counts j)
        return sum(math.ceil((p - M) / f - 1e-9) for p, f in zip(P, load) if p > M)

    def have(M: float) -> int:  # redundant slots on the ranks at or below M
        return sum(x for p, x in zip(P, extra) if p <= M)

    # the smallest M with need <= have and the room of the ranks with a slot >= the excess; need, have and the sets
    # of ranks above / at or below M are constant between consecutive candidates, the room and excess linear there
    cands = sorted({mean, top} | {p for p in P if p > mean} | {p - j * f for p, f, n in zip(P, load, home)
                                                               for j in range(1, n + 1) if p - j * f > mean})
    level = top
    for lo, hi in zip(cands, cands[1:]):
        if need(lo) > have(lo):
            continue
        over = [p for p in P if p > lo]
        under = [p for p, x in zip(P, extra) if p <= lo and x > 0]
        if not under:
            continue
        M = max(lo, (sum(over) + sum(under)) / (len(over) + len(under)))  # excess = room
        if M < hi:
            level = M
            break
    moved = sum(p - level for p in P if p > level)
    if level >= top or moved <= 0:
        return {"slots": slots, "gemm_experts": list(home), "factor": list(load), "replicas_used": 0, "level": top}
    takes = [p < level and x > 0 for p, x in zip(P, extra)]
    room = sum(level - p for p, t in zip(P, takes) if t)
    used = need(level)
    pairs = [level if p > level else p + (level - p) * moved / room if t else p for p, t in zip(P, takes)]
    held = [min(x, math.ceil(used * (level - p) / room - 1e-9)) if t else 0 for p, x, t in zip(P, extra, takes)]
    return {"slots": slots, "gemm_experts": [n + h for n, h in zip(home, held)],
            "factor": [x / n for x, n in zip(pairs, home)], "replicas_used": used, "level": level}


def partition_for(num_experts: int, ranks: int) -> ExpertPartition:
    """DWDP's placement: disjoint where ``ranks`` divides ``num_experts``; else the largest stride P with
    L = E - (N - 1) P >= P (DEP's: ``dep_expert_counts``)."""
    if num_experts % ranks == 0:
        return ExpertPartition.disjoint(num_experts, ranks)
    for stride in range(num_experts // ranks, 0, -1):
        per = num_experts - (ranks - 1) * stride
        if stride <= per:
            return ExpertPartition(num_experts, ranks, per, stride)
    raise ValueError(f"no partition of {num_experts} experts over {ranks} ranks")


@dataclass(frozen=True)
class RankStep:
    """One rank's own work in one iteration (ms, per layer where it recurs)."""

    tokens: int
    finished: int
    attention: float  # core attention per layer
    proj: float  # MLA projections per layer (dense GEMMs)
    attn_others: float  # elementwise work of the attention block per layer
    dense_mlp: float  # dense MLP of a dense layer
    shared: float  # shared expert + router of a MoE layer (dense GEMMs)
    moe_others: float  # other work of a MoE layer
    lm_head: float  # LM head of the finished requests

    @classmethod
    def of(cls, it: Iteration, costs: CostModel, speed: float = 1.0) -> RankStep:
        """``speed``: this rank's compute-time factor (``CostModel.rank_factors``), applied to every time."""
        ops, T, f = costs.ops, it.tokens, float(speed)
        pre = np.array([c.prefix for c in it.chunks], dtype=float)
        new = np.array([c.length for c in it.chunks], dtype=float)
        return cls(T, it.finished, f * costs.attention_ms(pre, new), f * costs.dense_ms(T * ops.proj_flops_per_token),
                   f * costs.attention_others_ms(T), f * costs.dense_ms(T * ops.dense_mlp_flops_per_token),
                   f * costs.dense_ms(T * ops.shared_flops_per_token), f * costs.moe_others_ms(T),
                   f * costs.dense_ms(it.finished * ops.lm_head_flops_per_row))

    def attention_block(self) -> list[tuple[str, float]]:
        return [("dense_gemm:mla_proj", self.proj), ("others:attn_block", self.attn_others),
                ("attention", self.attention)]


def _zero() -> dict[str, float]:
    return {c: 0.0 for c in CATEGORIES}


# finer labels of the compute segments ("category:part"), reported as ``detail_ms`` beside the categories so that a
# prediction can be regrouped as a benchmark groups its spans (``analysis.e2e_categories``)
DETAIL = ("attention", "dense_gemm:mla_proj", "others:attn_block", "dense_gemm:dense_mlp", "dense_gemm:shared_router",
          "others:moe", "expert_gemm", "dense_gemm:lm_head")


def _base(label: str) -> str:
    return label.split(":", 1)[0]


# ----------------------------------------------------------------------------------------------------------- DWDP
def dwdp_timeline(segments, moe_layers: int, fetch_ms: float, slowdown: dict[str, float]) -> dict:
    """Two-stream event simulation of one DWDP iteration on one rank (module docstring). ``segments``: the compute
    stream in order, ``(category, ms, j)`` with ``j`` the MoE layer whose expert GEMMs this is (it waits for fetch j
    and frees its slot when done) or None. Returns ``time_ms``, ``breakdown`` (categories, ms; compute includes
    interference), ``interference_ms`` and ``overlapped_copy_ms``."""
    M = moe_layers
    out, extra, detail = _zero(), {c: 0.0 for c in COMPUTE}, {}
    fetched = [False] * M
    t = busy = 0.0
    state = {"next": 0, "cur": None, "rem": 0.0, "freed": -1}

    def start() -> None:
        while state["cur"] is None and state["next"] < M and (state["next"] < 2 or state["freed"] >= state["next"] - 2):
            j = state["next"]
            state["next"] += 1
            if fetch_ms <= 0:
                fetched[j] = True
            else:
                state["cur"], state["rem"] = j, fetch_ms

    def finish() -> None:
        fetched[state["cur"]] = True
        state["cur"], state["rem"] = None, 0.0
        start()

    start()
    for cat, ms, j in segments:
        if j is not None:
            while not fetched[j]:
                if state["cur"] is None:  # cannot happen: fetch j is issued once expert GEMMs j-2 are done
                    raise AssertionError(f"fetch {j} neither done nor in flight")
                t += state["rem"]
                busy += state["rem"]
                out["exposed_fetch"] += state["rem"]
                finish()
        label, cat = cat, _base(cat)
        work, s = float(ms), slowdown[cat]
        detail.setdefault(label, 0.0)
        while work > 0:
            if state["cur"] is None:
                t += work
                out[cat] += work
                detail[label] += work
                work = 0.0
                continue
            need = work * (1.0 + s)
            step = min(need, state["rem"])
            done = step / (1.0 + s) if step < need else work
            t += step
            busy += step
            out[cat] += step
            detail[label] += step
            extra[cat] += step - done
            work -= done
            state["rem"] -= step
            if state["rem"] <= 1e-12:
                finish()
        if j is not None:
            state["freed"] = j
            start()
    if state["cur"] is not None or not all(fetched):
        raise AssertionError("a fetch outlived the iteration")
    return {"time_ms": t, "breakdown": out, "interference_ms": extra, "overlapped_copy_ms": busy, "detail": detail}


def dwdp_segments(step: RankStep, cfg: DeepSeekConfig, expert_ms: float) -> list:
    seg = []
    for layer in range(cfg.n_layers):
        seg += [(c, ms, None) for c, ms in step.attention_block()]
        if layer < cfg.n_dense_layers:
            seg.append(("dense_gemm:dense_mlp", step.dense_mlp, None))
        else:
            seg += [("dense_gemm:shared_router", step.shared, None), ("others:moe", step.moe_others, None),
                    ("expert_gemm", expert_ms, layer - cfg.n_dense_layers)]
    seg.append(("dense_gemm:lm_head", step.lm_head, None))
    return seg


# ------------------------------------------------------------------------------------------------------------ DEP
def dep_iteration(steps: list[RankStep], cfg: DeepSeekConfig, expert_ms: list[float], dispatch_ms: float,
                  combine_ms: float) -> dict:
    """One DEP iteration of all ranks in lockstep (module docstring). ``expert_ms[r]``: rank r's expert GEMMs of one
    MoE layer; ``dispatch_ms`` / ``combine_ms``: one collective each (the slowest rank's). Returns ``time_ms`` (the
    slowest rank's), ``rank_ms`` (each rank's: all ``time_ms`` where the ranks meet at a collective) and
    ``breakdown`` per rank. With one rank or no MoE layer there is no collective: each rank runs on its own and
    waits for no other (no sync_wait)."""
    N, M, D = len(steps), cfg.n_moe_layers, cfg.n_dense_layers
    per = [_zero() for _ in range(N)]
    detail: list[dict[str, float]] = [{} for _ in range(N)]

    def own(r: int, items) -> float:
        s = 0.0
        for c, ms in items:
            per[r][_base(c)] += ms
            detail[r][c] = detail[r].get(c, 0.0) + ms
            s += ms
        return s

    if N == 1 or M == 0:  # no collective: each rank on its own, nothing to wait for
        times = []
        for r, st in enumerate(steps):
            items = [x for _ in range(cfg.n_layers) for x in st.attention_block()]
            items += [("dense_gemm:dense_mlp", st.dense_mlp)] * D + [
                ("dense_gemm:shared_router", st.shared), ("others:moe", st.moe_others),
                ("expert_gemm", expert_ms[r])] * M
            times.append(own(r, items + [("dense_gemm:lm_head", st.lm_head)]))
        return {"time_ms": max(times), "rank_ms": times, "breakdown": per, "detail": detail}
    t = 0.0
    for j in range(M):
        arrive = []
        for r, st in enumerate(steps):
            items = []
            if j == 0:
                items += [x for _ in range(D) for x in st.attention_block()] + [("dense_gemm:dense_mlp",
                                                                                   st.dense_mlp)] * D
            items += st.attention_block() + [("dense_gemm:shared_router", st.shared), ("others:moe", st.moe_others)]
            arrive.append(own(r, items))
        gemm = [own(r, [("expert_gemm", expert_ms[r])]) for r in range(N)]
        a, g = max(arrive), max(gemm)
        for r in range(N):
            per[r]["sync_wait"] += (a - arrive[r]) + (g - gemm[r])
            per[r]["communication"] += dispatch_ms + combine_ms
        t += a + dispatch_ms + g + combine_ms
    tail = [own(r, [("dense_gemm:lm_head", st.lm_head)]) for r, st in enumerate(steps)]
    for r in range(N):
        per[r]["sync_wait"] += max(tail) - tail[r]
    return {"time_ms": t + max(tail), "rank_ms": [t + max(tail)] * N, "breakdown": per, "detail": detail}


# ------------------------------------------------------------------------------------------------------- simulate
def _summary(times: np.ndarray, tokens: np.ndarray, breakdowns: list[list[dict]], extra: dict | None,
             copy_ms: float, details: list[list[dict]]) -> dict:
    """times, tokens: [rank, iteration]."""
    cats = {c: float(np.mean([[b[c] for b in row] for row in breakdowns])) for c in CATEGORIES}
    detail = {d: float(np.mean([[b.get(d, 0.0) for b in row] for row in details])) for d in DETAIL}
    it_ms = float(times.mean())
    per_rank_tps = tokens.sum(axis=1) / (times.sum(axis=1) * 1e-3)
    out = {
        "tps_per_gpu": float(per_rank_tps.mean()),
        "iteration_ms": it_ms,
        "breakdown_ms": cats,
        "detail_ms": detail,
        "slowest_rank_iteration_ms": float(times.max(axis=0).mean()),
        "shares": {c: v / it_ms if it_ms else 0.0 for c, v in cats.items()},
        "overlapped_copy_ms": copy_ms,
    }
    if extra is not None:
        out["interference_ms"] = extra
    out["per_rank_iteration_ms"] = [float(x) for x in times.mean(axis=1)]
    return out


def _what(config: SimConfig) -> str:
    ov = {k: v for k, v in asdict(config.overrides).items() if v is not None}
    return f"the calibration {config.hardware!r}" + (f" with the what-ifs {ov}" if ov else "")


def _check_times(mode: str, times: np.ndarray, tokens: np.ndarray, config: SimConfig) -> None:
    """ValueError unless every iteration time and TPS/GPU of ``mode`` is a finite number > 0: rates that pass the
    schema (finite numbers > 0) can still overflow a time to inf or round it to 0 (e.g. expert_bytes 1e308, a dense
    rate of 1e-320 TFLOP/s), which had given a ratio of 0.0 or a ZeroDivisionError."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # refused below
        tps = tokens.sum(axis=1) / (times.sum(axis=1) * 1e-3)
    ok = np.isfinite(times) & (times > 0)
    if not (np.all(ok) and np.all(np.isfinite(tps)) and np.all(tps > 0)):
        got = float(times[~ok][0]) if not np.all(ok) else float(times.min())
        raise ValueError(f"{_what(config)} gives {mode} an iteration time of {got!r} ms, beyond floats' range (not a "
                         "finite number > 0, or a TPS/GPU that is not): a rate too small or too large, or "
                         "expert_bytes too large")


def simulate(config: SimConfig, calibration: dict | None = None) -> dict:
    """Predict DWDP and DEP for ``config`` (module docstring). ``calibration``: a calibration dict to use instead of
    loading ``config.hardware``. Returns a JSON-ready dict with ``dwdp``, ``dep``, ``ratio`` (DWDP / DEP TPS/GPU) and
    ``iteration_latency_change`` (DWDP / DEP iteration time - 1). ValueError where the calibration's rates (finite
    numbers > 0, but extreme) take a time beyond floats' range (numpy had warned and the result was inf, 0 or
    nonsense)."""
    try:
        with np.errstate(over="raise", divide="raise", invalid="raise"):
            return _simulate(config, calibration)
    except FloatingPointError as e:
        raise ValueError(f"{_what(config)} gives a time beyond floats' range ({e}): a rate too small or too large, "
                         "or expert_bytes too large") from None


def _simulate(config: SimConfig, calibration: dict | None) -> dict:
    cal = load_calibration(config.hardware) if calibration is None else calibration
    cfg = config.model_config()
    costs = CostModel(cal, cfg, config.overrides)
    N, E, k, M = config.gpus, cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_moe_layers
    part = partition_for(E, N)
    L = part.experts_per_rank
    work = workload(N, config.warmup + config.iterations, config.isl, config.max_tokens, ratio=config.ratio,
                    cv=config.cv, seed=config.seed)
    work = [row[config.warmup:] for row in work]  # a benchmark's untimed first iterations, drawn and dropped
    speed = costs.rank_factors(N)  # compute-time factor per rank (1.0 each without a rank_speed spread)
    steps = [[RankStep.of(it, costs, speed[r]) for it in row] for r, row in enumerate(work)]
    tokens = np.array([[s.tokens for s in row] for row in steps], dtype=float)

    fetch = costs.fetch_ms(E - L)

    dw_t = np.zeros((N, config.iterations))
    dw_b: list[list[dict]] = [[] for _ in range(N)]
    dw_d: list[list[dict]] = [[] for _ in range(N)]
    dw_x = {c: 0.0 for c in COMPUTE}
    dw_copy = 0.0
    for r in range(N):
        for i, st in enumerate(steps[r]):
            res = dwdp_timeline(dwdp_segments(st, cfg, speed[r] * costs.expert_ms(st.tokens * k, E)), M, fetch,
                                costs.interference)
            dw_t[r, i] = res["time_ms"]
            dw_b[r].append(res["breakdown"])
            dw_d[r].append(res["detail"])
            dw_copy += res["overlapped_copy_ms"]
            for c in COMPUTE:
                dw_x[c] += res["interference_ms"][c]
    n_it = N * config.iterations
    _check_times("DWDP", dw_t, tokens, config)
    dwdp = _summary(dw_t, tokens, dw_b, {c: v / n_it for c, v in dw_x.items()}, dw_copy / n_it, dw_d)

    owner = config.owner_factors()
    # DEP's own disjoint placement: owner d takes k n_d / E pairs of every source's token under uniform routing (its
    # own tokens' included); with a router's imbalance load[d] times that (after EPLB's replicas: L_d / n_d), and a
    # token sends a row to d with the probability of at least one of those pairs (capped at top-k)
    dep_count = dep_expert_counts(E, N)
    R = config.dep_redundant_experts()
    eplb = dep_eplb(dep_count, owner, R)
    load, gemm_experts = eplb["factor"], eplb["gemm_experts"]
    m = [[k * dep_count[d] / E for d in range(N)] for _ in range(N)]
    ql = [[_p_row(min(k, load[d] * m[s][d]), E, k) for d in range(N)] for s in range(N)]
    dep_t = np.zeros((N, config.iterations))
    dep_b: list[list[dict]] = [[] for _ in range(N)]
    dep_d: list[list[dict]] = [[] for _ in range(N)]
    rows_mean = 0.0
    for i in range(config.iterations):
        T = [steps[r][i].tokens for r in range(N)]
        pairs = [load[r] * sum(T[s] * m[s][r] for s in range(N)) for r in range(N)]
        rows = [max(T[r] * sum(ql[r][d] for d in range(N) if d != r), sum(T[s] * ql[s][r] for s in range(N) if s != r))
                for r in range(N)]
        rows_mean += sum(rows) / N / config.iterations
        disp = max(costs.dispatch_ms(x) for x in rows) if N > 1 else 0.0
        comb = max(costs.combine_ms(x) for x in rows) if N > 1 else 0.0
        res = dep_iteration([steps[r][i] for r in range(N)], cfg,
                            [speed[r] * costs.expert_ms(pairs[r], gemm_experts[r]) for r in range(N)], disp, comb)
        dep_t[:, i] = res["rank_ms"]
        for r in range(N):
            dep_b[r].append(res["breakdown"][r])
            dep_d[r].append(res["detail"][r])
    _check_times("DEP", dep_t, tokens, config)
    dep = _summary(dep_t, tokens, dep_b, None, 0.0, dep_d)
    mean_pairs = sum(x * n for x, n in zip(owner, dep_count)) / N
    if N > 1 and M > 0:
        dep["per_rank_iteration_ms"] = dep["per_rank_iteration_ms"][:1]  # lockstep: one time for all

    lengths = [c.length + c.prefix for row in work for it in row for c in it.chunks if c.last]
    return {
        "config": {k2: (list(v) if isinstance(v, tuple) else v) for k2, v in asdict(config).items()
                   if k2 != "overrides"}
        | {"overrides": {k2: v for k2, v in asdict(config.overrides).items() if v is not None},
           "dense_layers": cfg.n_dense_layers, "moe_layers": M, "calibration": cal["hardware"]},
        "workload": {
            "tokens_per_iteration": float(tokens.mean()),
            "requests_per_iteration": float(np.mean([len(it.chunks) for row in work for it in row])),
            "request_tokens_mean": float(np.mean(lengths)) if lengths else 0.0,
            "request_tokens_cv": float(np.std(lengths) / np.mean(lengths)) if lengths else 0.0,
            "chunked_iterations": int(sum(1 for row in work for it in row if any(not c.last or c.prefix
                                                                                for c in it.chunks))),
        },
        "model": {
            "partition": {"experts_per_rank": L, "stride": part.stride, "remote_experts": E - L,
                          "dep_experts_per_rank": [min(dep_count), max(dep_count)]},
            "fetch_ms_per_moe_layer": fetch,
            "dep_rows_per_rank_per_layer": rows_mean,
            "dep_eplb": {"redundant_experts": R, "slots_per_rank": [min(eplb["slots"]), max(eplb["slots"])],
                         "replicas_used": eplb["replicas_used"],
                         "pairs_max_over_mean": max(x * n for x, n in zip(load, dep_count)) / mean_pairs,
                         "owner_pairs_max_over_mean": max(x * n for x, n in zip(owner, dep_count)) / mean_pairs},
            "expert_bytes": costs.expert_bytes,
            "rank_compute_factors": speed,
        },
        "dwdp": dwdp,
        "dep": dep,
        "ratio": dwdp["tps_per_gpu"] / dep["tps_per_gpu"],
        "iteration_latency_change": dwdp["iteration_ms"] / dep["iteration_ms"] - 1.0,
    }
