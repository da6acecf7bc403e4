"""Running a rank's requests on the GPU model, DWDP set-up and the all-local check: shared by the ``demo`` command,
the integration test and ``bench/deepseek_forward.py``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..._checks import int_at_least, is_real
from .config import DeepSeekConfig
from .gpu import StepTiming
from .gpu_weights import require_torch


def torch_to_cupy(t):
    """A CuPy view of a torch tensor (bf16 as uint16 bits, the store's storage dtype)."""
    import cupy as cp

    torch = require_torch()
    if t.dtype == torch.bfloat16:
        return cp.from_dlpack(t.view(torch.int16)).view(cp.uint16)
    if t.dtype == torch.float8_e4m3fn:
        return cp.from_dlpack(t.view(torch.uint8))
    return cp.from_dlpack(t)


def layout_dtype(dtype) -> str:
    """The ``ExpertLayout`` dtype name of a torch dtype (bfloat16, float32, float16 or float8_e4m3fn); TypeError for
    a ``dtype`` that is not a torch.dtype, ValueError for another torch dtype (had been a bare KeyError)."""
    torch = require_torch()
    names = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16",
             torch.float8_e4m3fn: "float8_e4m3fn"}
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"layout_dtype: dtype must be a torch.dtype (one of {list(names.values())}), got {dtype!r} "
                        f"({type(dtype).__name__})")
    if dtype not in names:
        raise ValueError(f"layout_dtype: the expert store holds {list(names.values())}, got {dtype}")
    return names[dtype]


def build_store(cfg: DeepSeekConfig, weights, progress: bool = False):
    """An ``ExpertStore`` over this rank's runtime holding its slice of every MoE layer's experts, loaded from
    ``weights`` (collective): in the model dtype, or fp8 bytes when ``weights.expert_dtype`` is float8_e4m3fn (the
    rowwise scales are not in the store: ``expert_scales``). Returns after every rank has loaded: a peer may fetch from this rank's storage as soon
    as it returns (without the closing barrier a fast rank copied a slow rank's experts before they were written)."""
    from tqdm import tqdm

    from ...layout import ExpertLayout
    from ...partition import ExpertPartition
    from ...runtime import get_runtime
    from ...store import ExpertStore

    rt = get_runtime()
    part = ExpertPartition.disjoint(cfg.n_routed_experts, rt.world_size())
    xdt = getattr(weights, "expert_dtype", weights.dtype)
    layout = ExpertLayout.moe(cfg.dim, cfg.moe_inter_dim, layout_dtype(xdt))
    store = ExpertStore(part, layout, cfg.n_moe_layers)
    fp8 = layout.tensors[0].dtype == "float8_e4m3fn"
    try:
        for p in tqdm(range(cfg.n_moe_layers), desc="loading experts", disable=not progress, leave=False):
            if fp8:  # the fp8 bytes only: every rank holds the scales whole (expert_scales)
                (w13, w2), _ = weights.experts_fp8(cfg.n_dense_layers + p, store.lo, store.hi)
            else:
                w13, w2 = weights.experts(cfg.n_dense_layers + p, store.lo, store.hi)
            store.load(p, "w13", torch_to_cupy(w13))
            store.load(p, "w2", torch_to_cupy(w2))
            del w13, w2
        rt.barrier()
    except BaseException:
        store.close()
        raise
    return store


def expert_scales(cfg: DeepSeekConfig, weights) -> list | None:
    """Per MoE position, ``(s13 [E, 2I], s2 [E, H])`` float32 rowwise scales of every expert (fp8 weights), or None
    (other dtypes). Every rank computes all of them (``weights.expert_scales``), so none is sent."""
    torch = require_torch()
    if getattr(weights, "expert_dtype", None) != torch.float8_e4m3fn:
        return None
    return [weights.expert_scales(cfg.n_dense_layers + p) for p in range(cfg.n_moe_layers)]


@dataclass
class StepStats:
    kind: str  # prefill / decode
    policy: str | None
    tokens: int
    step_ms: float
    attn_ms: float
    experts_ms: float
    wait_ms: float
    attn_flops: float
    expert_flops: float
    fetch_bytes: int = 0
    fetch_ms: float = 0.0
    comm_ms: float = 0.0  # dispatch + combine (DEP steps)
    mode_costs: dict | None = None  # auto: the cost model's per-layer estimate of each mode (us, max over ranks)
    graphed: bool = False  # a CUDA-graph replay: step_ms only, the per-layer spans are 0
    wait_ms_per_layer: list = field(default_factory=list)


@dataclass
class RunResult:
    tokens: list  # [request][step]
    logits: list  # per step, [n, vocab] float32
    steps: list  # StepStats
    wall_s: float


def run_requests(model, prompts: list[list[int]], steps: int, *, scheduler=None, store=None, progress=None,
                 graph: bool = False) -> RunResult:
    """Prefill then ``steps - 1`` greedy decode steps of ``prompts`` on ``model`` with per-step timing. With a DWDP
    ``scheduler``/``store``: the bytes and time of each step's fetches (prefetch: copy-stream spans of the
    scheduler trace; on-demand: the fetch kernel spans, bytes of the distinct remote experts routed; dispatch:
    none, its dispatch + combine time is ``comm_ms``). ``graph``: decode steps run as CUDA graphs where their mode
    allows (``GpuModel.forward``); such a step has its total time only (no per-layer spans, ``graphed`` set)."""
    import time

    torch = require_torch()
    n = len(prompts)
    reqs = list(range(n))
    out, all_logits, stats = [[] for _ in range(n)], [], []
    t_start = time.perf_counter()
    for i in range(steps):
        if scheduler is not None:
            scheduler.trace = []
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record(model.tstream)
        toks = prompts if i == 0 else [[o[-1]] for o in out]
        logits = model.forward(reqs, toks, timing=True, graph=graph)
        b.record(model.tstream)
        host = logits.cpu().numpy()  # synchronises
        if scheduler is not None:
            scheduler.copy_stream.synchronize()
        tm = model.timing.resolve() if model.timing is not None else StepTiming().resolve()
        st = StepStats("prefill" if i == 0 else "decode", model.last_policy, sum(len(t) for t in toks),
                       a.elapsed_time(b), tm["attn_ms"], tm["experts_ms"], tm["wait_ms"], tm["attn_flops"],
                       tm["expert_flops"], comm_ms=tm["comm_ms"], wait_ms_per_layer=tm["wait_ms_per_layer"],
                       graphed=model.graphed)
        if scheduler is not None and getattr(scheduler, "policy", None) == "auto" and scheduler.last_choice:
            st.mode_costs = dict(scheduler.last_choice.cost_us)
        if scheduler is not None and store is not None and model.last_policy != "dispatch":  # DEP moves no weights
            if model.last_policy == "prefetch_all":
                import cupy as cp

                starts = {lay: ev for kind, lay, ev in scheduler.trace if kind == "fetch"}
                spans = [cp.cuda.get_elapsed_time(starts[lay], ev) for kind, lay, ev in scheduler.trace
                         if kind == "fetch_end"]
                st.fetch_ms, st.fetch_bytes = float(sum(spans)), len(spans) * store.remote_bytes()
            else:
                remote = 0
                for ids in model.last_ids:
                    u = np.unique(ids.cpu().numpy())
                    remote += int(((u < store.lo) | (u >= store.hi)).sum())
                st.fetch_ms, st.fetch_bytes = st.wait_ms, remote * store.layout.expert_bytes
            scheduler.trace = None
        stats.append(st)
        all_logits.append(host)
        for r in range(n):
            out[r].append(int(np.argmax(host[r])))
        if progress is not None:
            progress.update(1)
    return RunResult(out, all_logits, stats, time.perf_counter() - t_start)


def compare(a: RunResult, b: RunResult) -> dict:
    """Largest per-step relative error (Frobenius over the step's ``[n, vocab]`` logits) and token agreement, plus
    the greedy comparison a numerically different (not bit-equal) run is judged by: request r's step i is comparable
    while both runs fed it the same tokens (``a.tokens[r][:i] == b.tokens[r][:i]``); ``comparable_rel_err`` is the
    largest relative error of a request's logits over its comparable steps; ``flips`` lists where the greedy tokens
    first part (request, step, ``b``'s top-2 margin there, the largest absolute logit difference). A flip needs a
    difference of at least half the margin, so with ``comparable_rel_err`` small every flip is a near tie that
    rounding decided; the steps after it are not compared (their inputs differ). The runs must have the same
    requests, steps and logits shapes, and each step's logits must be ``[requests, vocab]`` (ValueError otherwise);
    two runs of no step compare equal (errors 0.0). A step whose error is NaN (NaN logits) makes the maxima NaN."""
    if (len(a.tokens), len(a.logits)) != (len(b.tokens), len(b.logits)):
        raise ValueError(f"compare: the runs differ in shape: {len(a.tokens)} request(s) x {len(a.logits)} step(s) "
                         f"against {len(b.tokens)} x {len(b.logits)}")
    for i, (x, y) in enumerate(zip(a.logits, b.logits)):
        if np.shape(x) != np.shape(y):
            raise ValueError(f"compare: step {i}'s logits have shape {np.shape(x)} against {np.shape(y)}")
        if len(np.shape(x)) != 2 or np.shape(x)[0] != len(a.tokens):
            raise ValueError(f"compare: step {i}'s logits must be [requests, vocab] with one row per request "
                             f"({len(a.tokens)}), got shape {np.shape(x)}")
    errs = [float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)) for x, y in zip(a.logits, b.logits)]
    comparable, flips = [], []
    for r in range(len(b.tokens)):
        for i in range(min(len(a.logits), len(b.logits))):
            if a.tokens[r][:i] != b.tokens[r][:i]:
                break
            x, y = np.asarray(a.logits[i][r], np.float64), np.asarray(b.logits[i][r], np.float64)
            comparable.append(float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)))
            if i < min(len(a.tokens[r]), len(b.tokens[r])) and a.tokens[r][i] != b.tokens[r][i]:
                top2 = np.sort(y)[-2:]
                flips.append({"request": r, "step": i, "margin": float(top2[1] - top2[0]),
                              "max_abs_diff": float(np.abs(x - y).max())})
    # np.max propagates NaN (a run with NaN logits); Python's max kept whichever came first (0.0 before a NaN)
    return {"max_rel_err": float(np.max(errs)) if errs else 0.0, "rel_err_per_step": errs,
            "tokens_equal": a.tokens == b.tokens,
            "comparable_rel_err": float(np.max(comparable)) if comparable else 0.0, "flips": flips}


def prompts_for(rank: int, count: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """A rank's own requests: ``count`` prompts of lengths drawn from ``[lo, hi]`` (different per rank), token ids
    in ``[0, vocab)``. ``rank``, ``count`` and ``seed`` must be ints >= 0, ``lo`` and ``vocab`` ints >= 1 and ``hi``
    an int >= ``lo`` (TypeError for a value that is not an int, a bool included; ValueError out of range)."""
    for name, v, least in (("rank", rank, 0), ("count", count, 0), ("lo", lo, 1), ("hi", hi, 1), ("vocab", vocab, 1),
                           ("seed", seed, 0)):
        int_at_least(f"prompts_for: {name}", v, least)
    if hi < lo:
        raise ValueError(f"prompts_for: hi must be >= lo (the longest prompt against the shortest), got lo={lo!r} "
                         f"hi={hi!r}")
    rng = np.random.default_rng([seed, rank, 7])
    return [rng.integers(0, vocab, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(count)]


_TIMES = ("step_ms", "attn_ms", "experts_ms", "wait_ms", "fetch_ms", "comm_ms")


MIN_MS = 1e-6  # the shortest time summarize takes as measured: 1 ns


def _rate(amount: float, ms: float, unit: float = 1.0) -> float | None:
    """``amount`` per second over ``ms`` milliseconds, in ``unit``; None where nothing was timed (``ms`` 0)."""
    return amount / (ms * 1e-3) / unit if ms > 0 else None


def summarize(stats: list[StepStats]) -> dict[str, Any]:
    """Prefill and decode totals of a run's steps: ``{"prefill": {...}, "decode": {...}}``, a kind present only if
    some step is of it (``summarize([])`` is ``{}``; callers skip a missing kind).

    A rate is None where the time it divides by is 0, i.e. was not measured, never 0, inf or NaN and never a
    ZeroDivisionError: ``tokens_per_s`` and ``exposed_fetch_frac`` with no step time (``ms`` 0);
    ``tokens_per_s_median_step`` (the median over the steps with a step time) and ``median_step_ms`` with no timed
    step; ``attn_tflops`` / ``expert_tflops`` / ``fetch_GBps`` with no attention / expert / fetch time, as in a run of
    CUDA-graph replays only (a graphed step has its step time only: its per-layer spans and FLOPs are 0) or of
    ``dispatch`` steps only (no fetch). ``untimed_steps`` counts the steps with no step time, and ``untimed`` names the
    rates that are None. Rates use only the timed steps: ``tokens_per_s`` is the tokens of the steps with a step time
    over their time (every step's, as before, whenever every step is timed, as CUDA events always are). A step time
    that is negative, not finite or between 0 and ``MIN_MS`` (1 ns) is a ValueError naming the step and the field."""
    for i, x in enumerate(stats):
        for name in _TIMES:
            v = getattr(x, name)
            if not (is_real(v) and math.isfinite(v) and v >= 0):
                raise ValueError(f"summarize: stats[{i}].{name} must be a finite number of milliseconds >= 0, got {v!r}")
            if 0 < v < MIN_MS:  # no timer resolves it (CUDA events: ~0.5 us); its rates would overflow or divide by 0
                raise ValueError(f"summarize: stats[{i}].{name} = {v!r} ms is below {MIN_MS:g} ms (1 ns): not a "
                                 "measured time; 0 means not measured")
    out = {}
    for kind in ("prefill", "decode"):
        s = [x for x in stats if x.kind == kind]
        if not s:
            continue
        ms = sum(x.step_ms for x in s)
        timed = [x for x in s if x.step_ms > 0]
        rec = {
            "steps": len(s), "tokens": sum(x.tokens for x in s), "ms": ms,
            "tokens_per_s": _rate(sum(x.tokens for x in timed), ms),
            # robust to one step that absorbs a wait for a slower peer (the first coupled step after independent ones)
            "median_step_ms": float(np.median([x.step_ms for x in timed])) if timed else None,
            "tokens_per_s_median_step": (float(np.median([x.tokens / (x.step_ms * 1e-3) for x in timed]))
                                         if timed else None),
            "untimed_steps": len(s) - len(timed),
            "policies": sorted({str(x.policy) for x in s}),
            "attn_tflops": _rate(sum(x.attn_flops for x in s), sum(x.attn_ms for x in s), 1e12),
            "expert_tflops": _rate(sum(x.expert_flops for x in s), sum(x.experts_ms for x in s), 1e12),
            "fetch_GB": sum(x.fetch_bytes for x in s) / 1e9, "fetch_ms": sum(x.fetch_ms for x in s),
            # over the steps whose fetch was timed (a graphed step's is not)
            "fetch_GBps": _rate(sum(x.fetch_bytes for x in s if not x.graphed), sum(x.fetch_ms for x in s), 1e9),
            "graphed_steps": sum(1 for x in s if x.graphed),
            "exposed_fetch_ms": sum(x.wait_ms for x in s),
            "exposed_fetch_frac": sum(x.wait_ms for x in s) / ms if ms > 0 else None,
            "comm_ms": sum(x.comm_ms for x in s), "modes": {m: sum(1 for x in s if str(x.policy) == m)
                                                           for m in sorted({str(x.policy) for x in s})},
        }
        rec["untimed"] = sorted(k for k, v in rec.items() if v is None)
        out[kind] = rec
    return out
