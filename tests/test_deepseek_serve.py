"""Host logic of the GPU demo and the integration check: run comparison, step summaries, per-rank prompts, the
layer budget."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from dwdp_ops.demo_gpu import plan_layers
from dwdp_ops.models.deepseek_r1 import DeepSeekConfig
from dwdp_ops.models.deepseek_r1.serve import RunResult, StepStats, compare, prompts_for, summarize


def test_compare_reports_the_worst_step_and_token_agreement():
    rng = np.random.default_rng(0)
    base = [rng.normal(size=(3, 50)).astype(np.float32) for _ in range(4)]
    near = [b + 1e-4 * rng.normal(size=b.shape).astype(np.float32) for b in base]
    far = [b.copy() for b in base]
    far[2][1] += 1.0
    a = RunResult([[1, 2], [3, 4], [5, 6]], base, [], 0.0)
    c = compare(RunResult([[1, 2], [3, 4], [5, 6]], near, [], 0.0), a)
    assert c["tokens_equal"] and c["max_rel_err"] < 1e-3 and len(c["rel_err_per_step"]) == 4
    c = compare(RunResult([[1, 2], [3, 4], [5, 7]], far, [], 0.0), a)
    assert not c["tokens_equal"] and c["max_rel_err"] == pytest.approx(c["rel_err_per_step"][2]) and c["max_rel_err"] > 1e-2


def _greedy(logits):
    return [[int(np.argmax(step[r])) for step in logits] for r in range(logits[0].shape[0])]


def test_a_flip_ends_the_comparison_of_its_request_and_is_reported_with_its_margin():
    rng = np.random.default_rng(1)
    base = [rng.normal(size=(2, 20)) for _ in range(3)]
    base[1][0, :2] = [5.0, 4.9999]  # request 0, step 1: a near tie (margin 1e-4)
    b = RunResult(_greedy(base), base, [], 0.0)
    tie = [x + 1e-3 * rng.normal(size=x.shape) for x in base]
    tie[1][0, :2] = [4.9995, 5.0005]  # flipped by a difference of 5e-4
    tie[2][0] += 50.0  # after the flip the inputs differ: not compared
    c = compare(RunResult(_greedy(tie), tie, [], 0.0), b)
    assert not c["tokens_equal"] and c["comparable_rel_err"] < 1e-2 < c["max_rel_err"]
    (f,) = c["flips"]
    assert (f["request"], f["step"]) == (0, 1) and f["margin"] == pytest.approx(1e-4) and f["max_abs_diff"] < 1e-2
    far = [x.copy() for x in base]
    far[0][1, 7] = 100.0  # request 1 takes another token at the prefill through a large error: caught
    c = compare(RunResult(_greedy(far), far, [], 0.0), b)
    assert c["comparable_rel_err"] > 1e-2 and c["flips"][0]["step"] == 0


def test_compare_refuses_runs_of_another_shape():
    """Runs of different request or step counts had been compared anyway: one request's logits [1, V] broadcast
    against three requests' [3, V] into a meaningless error before an IndexError, a shorter run was compared on the
    common steps only (silently), two empty runs raised "max() arg is an empty sequence"."""
    rng = np.random.default_rng(2)
    three = [rng.normal(size=(3, 50)).astype(np.float32) for _ in range(2)]
    base = RunResult(_greedy(three), three, [], 0.0)
    one = [x[:1] for x in three]
    with pytest.raises(ValueError, match=r"compare: the runs differ in shape: 1 request\(s\) x 2 step\(s\) against 3 x 2"):
        compare(RunResult(_greedy(one), one, [], 0.0), base)
    with pytest.raises(ValueError, match=r"1 step\(s\) against 3 x 2"):
        compare(RunResult([t[:1] for t in base.tokens], three[:1], [], 0.0), base)
    wide = [np.concatenate([x, x], axis=1) for x in three]
    with pytest.raises(ValueError, match=r"step 0's logits have shape \(3, 100\) against \(3, 50\)"):
        compare(RunResult(base.tokens, wide, [], 0.0), base)
    c = compare(RunResult([[], []], [], [], 0.0), RunResult([[], []], [], [], 0.0))
    assert c["max_rel_err"] == 0.0 and c["tokens_equal"] and c["rel_err_per_step"] == [] and not c["flips"]


def test_compare_refuses_logits_without_one_row_per_request():
    """Both runs alike but their logits not [requests, vocab]: fewer rows than requests had raised numpy's IndexError
    from inside the loop, more rows had left the extra rows out of the comparable error and the flips without a
    word, 1-D logits had been compared as scalars."""
    rng = np.random.default_rng(3)
    two = [rng.normal(size=(2, 50)) for _ in range(2)]
    three_tokens = RunResult([[1, 2], [3, 4], [5, 6]], two, [], 0.0)
    with pytest.raises(ValueError, match=r"step 0's logits must be \[requests, vocab\] .*\(3\), got shape \(2, 50\)"):
        compare(three_tokens, three_tokens)
    one_token = RunResult([[1, 2]], two, [], 0.0)
    with pytest.raises(ValueError, match=r"with one row per request \(1\), got shape \(2, 50\)"):
        compare(one_token, one_token)
    flat = RunResult([[1, 2], [3, 4]], [x.ravel() for x in two], [], 0.0)
    with pytest.raises(ValueError, match=r"got shape \(100,\)"):
        compare(flat, flat)


def test_summary_splits_prefill_and_decode():
    steps = [StepStats("prefill", "prefetch_all", 1000, 100.0, 20.0, 50.0, 10.0, 4e12, 25e12, 8 << 30, 40.0),
             StepStats("decode", "on_demand", 4, 10.0, 2.0, 1.0, 5.0, 1e9, 1e9, 1 << 30, 5.0),
             StepStats("decode", "on_demand", 4, 10.0, 2.0, 1.0, 5.0, 1e9, 1e9, 1 << 30, 5.0)]
    s = summarize(steps)
    assert s["prefill"]["tokens_per_s"] == pytest.approx(1000 / 0.1)
    assert s["prefill"]["expert_tflops"] == pytest.approx(25e12 / 0.05 / 1e12)
    assert s["prefill"]["fetch_GBps"] == pytest.approx((8 << 30) / 0.04 / 1e9)
    assert s["decode"]["steps"] == 2 and s["decode"]["policies"] == ["on_demand"]
    assert s["decode"]["exposed_fetch_frac"] == pytest.approx(0.5)



def _step(kind="decode", tokens=4, step_ms=10.0, attn_ms=2.0, experts_ms=1.0, wait_ms=5.0, attn_flops=1e9,
          expert_flops=1e9, fetch_bytes=1 << 30, fetch_ms=5.0, graphed=False, policy="on_demand"):
    return StepStats(kind, policy, tokens, step_ms, attn_ms, experts_ms, wait_ms, attn_flops, expert_flops, fetch_bytes,
                     fetch_ms, graphed=graphed)


def test_summary_of_untimed_steps_reports_none_rates():
    """A step time of 0 (nothing measured) raised ZeroDivisionError (tokens/s, the median step's tokens/s, the exposed
    fetch fraction), and a zero attention / expert / fetch time gave 0.0 (no FLOPs: a graphed step's) or FLOPs over a
    1e-12 s clamp (1e9 TFLOP/s for one GFLOP) instead of saying that nothing was timed."""
    s = summarize([_step(step_ms=0.0, wait_ms=0.0, attn_ms=0.0, experts_ms=0.0, fetch_ms=0.0)])["decode"]
    assert s["tokens_per_s"] is None and s["tokens_per_s_median_step"] is None and s["median_step_ms"] is None
    assert s["exposed_fetch_frac"] is None and s["attn_tflops"] is None and s["expert_tflops"] is None
    assert s["fetch_GBps"] is None and s["untimed_steps"] == 1 and s["ms"] == 0.0 and s["tokens"] == 4
    assert s["untimed"] == ["attn_tflops", "expert_tflops", "exposed_fetch_frac", "fetch_GBps", "median_step_ms",
                            "tokens_per_s", "tokens_per_s_median_step"]
    # CUDA-graph replays only: the step time is measured, the per-layer spans and FLOPs are not (0)
    g = summarize([_step(attn_ms=0.0, experts_ms=0.0, wait_ms=0.0, fetch_ms=0.0, attn_flops=0.0, expert_flops=0.0,
                         graphed=True)] * 3)["decode"]
    assert g["tokens_per_s"] == pytest.approx(12 / 0.03) and g["untimed_steps"] == 0
    assert g["untimed"] == ["attn_tflops", "expert_tflops", "fetch_GBps"] and g["exposed_fetch_frac"] == 0.0
    # FLOPs counted but no time: not 1e9 TFLOP/s
    assert summarize([_step(attn_ms=0.0)])["decode"]["attn_tflops"] is None


def test_summary_rates_use_the_timed_steps_only():
    """One untimed step among timed ones: its tokens are not credited to the others' time, and the median step's
    tokens/s is over the timed steps (it had raised ZeroDivisionError)."""
    s = summarize([_step(step_ms=10.0), _step(step_ms=0.0, wait_ms=0.0, fetch_ms=0.0), _step(step_ms=30.0)])["decode"]
    assert s["tokens"] == 12 and s["untimed_steps"] == 1 and s["untimed"] == []
    assert s["tokens_per_s"] == pytest.approx(8 / 0.04)
    assert s["tokens_per_s_median_step"] == pytest.approx(np.median([4 / 0.01, 4 / 0.03]))
    assert s["median_step_ms"] == pytest.approx(20.0)
    assert summarize([]) == {}  # no step: no kind (callers skip a missing kind)


@pytest.mark.parametrize("field, value", [("step_ms", -1.0), ("step_ms", float("nan")), ("attn_ms", float("inf")),
                                          ("wait_ms", -0.5), ("fetch_ms", None), ("comm_ms", True)])
def test_summary_refuses_impossible_times(field, value):
    """A negative or NaN time had given a negative or NaN rate silently."""
    st = _step()
    setattr(st, field, value)
    with pytest.raises(ValueError, match=rf"summarize: stats\[1\]\.{field} must be a finite number of milliseconds "
                                         rf">= 0, got {re.escape(repr(value))}"):
        summarize([_step(), st])


@pytest.mark.parametrize("field", ["step_ms", "attn_ms", "fetch_ms"])
def test_summary_refuses_a_time_below_a_nanosecond(field):
    """A subnormal step time (5e-324 ms) had raised ZeroDivisionError (ms * 1e-3 underflows to 0), a tiny one an
    infinite rate; no timer resolves such a time, so it is refused by name, and 1 ns is still taken."""
    st = _step()
    setattr(st, field, 5e-324)
    with pytest.raises(ValueError, match=rf"stats\[1\]\.{field} = 5e-324 ms is below 1e-06 ms"):
        summarize([_step(), st])
    setattr(st, field, 1e-6)
    assert all(v is None or math.isfinite(v) for rec in summarize([_step(), st]).values()
               for v in rec.values() if isinstance(v, float))


def test_demo_prints_a_summary_with_untimed_rates(capsys):
    """print_gpu formats every rate of the summary: a None (not timed) is printed as n/a, not a TypeError."""
    from dwdp_ops.demo import print_gpu

    timed = [_step("prefill", 100, 50.0, policy="prefetch_all")]
    graphed = [_step(attn_ms=0.0, experts_ms=0.0, wait_ms=0.0, fetch_ms=0.0, attn_flops=0.0, expert_flops=0.0,
                     graphed=True)] * 2
    untimed = [_step("prefill", 100, 0.0, 0.0, 0.0, 0.0, fetch_ms=0.0, policy="prefetch_all")]
    rep = {"config": {"layers": 4, "dense_layers": 3, "moe_layers": 1, "experts": 256, "top_k": 8, "vocab": 32768},
           "gpus": 2, "card": "X", "policy": "auto", "graphs": True,
           "ranks": [{"rank": 0, "summary": summarize(timed + graphed), "dense_tflops": 600.0},
                     {"rank": 1, "summary": summarize(untimed + graphed), "dense_tflops": 600.0}]}
    print_gpu(rep)
    out = capsys.readouterr().out
    assert "n/a GB/s" in out and "attention n/a TFLOP/s, expert GEMMs n/a TFLOP/s" in out
    assert "rank 1 prefill (prefetch_all x1):    100 tokens       n/a tok/s" in out
    assert "all ranks: prefill 2000 tok/s (ranks with a step time only), decode 800.0 tok/s;" in out


def test_prompts_differ_by_rank_and_respect_bounds():
    a, b = prompts_for(0, 5, 3, 40, 100), prompts_for(1, 5, 3, 40, 100)
    assert a != b and a == prompts_for(0, 5, 3, 40, 100)
    assert all(3 <= len(p) <= 40 and max(p) < 100 for p in a + b)


@pytest.mark.parametrize("args, exc, msg", [
    ((0, -2, 1, 5, 100), ValueError, r"prompts_for: count must be an int >= 0, got -2"),  # had returned []
    ((0, 3, 0, 5, 100), ValueError, r"prompts_for: lo must be an int >= 1, got 0"),  # empty prompts possible
    ((0, 3, -3, 5, 100), ValueError, r"prompts_for: lo must be an int >= 1"),  # numpy's 'negative dimensions'
    ((0, 2, 5, 3, 100), ValueError, r"prompts_for: hi must be >= lo .*lo=5 hi=3"),  # numpy's bare 'low >= high'
    ((0, 2, 1.5, 5, 100), TypeError, r"prompts_for: lo must be an int >= 1, got 1.5"),  # had been taken
    ((0, 2, 1, 5, True), TypeError, r"prompts_for: vocab must be an int >= 1, got True"),  # all-zero tokens
    ((0, 2, 1, 5, 0), ValueError, r"prompts_for: vocab must be an int >= 1, got 0"),  # numpy's 'high <= 0'
    ((-1, 2, 1, 5, 100), ValueError, r"prompts_for: rank must be an int >= 0, got -1"),
    ((0, 2, 1, 5, 100, -1), ValueError, r"prompts_for: seed must be an int >= 0, got -1"),
])
def test_prompts_for_names_a_bad_argument(args, exc, msg):
    """Bad counts, lengths or vocabularies had given no prompts, empty or all-zero prompts without a word, or numpy's
    messages naming no argument."""
    with pytest.raises(exc, match=msg):
        prompts_for(*args)
    assert prompts_for(0, 0, 1, 1, 1) == [] and prompts_for(np.int64(0), 2, 4, 4, 2) == prompts_for(0, 2, 4, 4, 2)


def test_layer_budget_grows_with_memory_and_ranks():
    cfg = DeepSeekConfig.r1(vocab_size=32768)
    GiB = 1 << 30
    h200 = plan_layers(cfg, 4, None, 139 * GiB, 12 * GiB)
    h100 = plan_layers(cfg, 4, None, 78 * GiB, 12 * GiB)
    assert h200 > h100 >= 1
    assert plan_layers(cfg, 2, None, 139 * GiB, 12 * GiB) < h200  # more local experts per layer
    assert plan_layers(cfg, 4, 3, 139 * GiB, 12 * GiB) == 3
    assert plan_layers(cfg, 4, None, 20 * GiB, 12 * GiB) == 0
    # a reserve above the free memory: no layer fits (it had raised 'free (bytes) must be >= 0' from the plan, so
    # bench/e2e_dwdp_vs_dep.py's rank died instead of voting 0 and naming the free memory)
    assert plan_layers(cfg, 4, None, 10 * GiB, 12 * GiB) == 0
