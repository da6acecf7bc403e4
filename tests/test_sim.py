"""The DWDP / DEP simulator (``dwdp_ops.sim``, ``python -m dwdp_ops sim``): request-length statistics and batching,
the cost models against the calibration points they were built from, the DEP synchronisation and DWDP exposed-fetch
mechanics, degenerate cases, the paper's GB200 setting, the command line and the calibration files. CPU only."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from dwdp_ops import __main__ as top
from dwdp_ops.models.deepseek_r1.config import DeepSeekConfig
from dwdp_ops.sim import calibrate, cli, plot
from dwdp_ops.sim.analysis import E2E_CATEGORIES, paper_comparison, sweep, validate, validate_e2e, validation_table
from dwdp_ops.sim.costs import CATEGORIES, PROFILES, CostModel, Overrides, load_calibration, validate_calibration
from dwdp_ops.sim.model import RankStep, SimConfig, dep_iteration, dwdp_timeline, partition_for, simulate
from dwdp_ops.sim.workload import batch_requests, rank_iterations, request_lengths, workload

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
R1 = DeepSeekConfig.r1()
NO_SLOW = {c: 0.0 for c in ("attention", "expert_gemm", "dense_gemm", "others")}


def run_main(argv, capsys, main=cli.main):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# -------------------------------------------------------------------------------------------------------- workload
def test_ratio_lengths_are_uniform_in_their_bounds():
    x = request_lengths(40000, 8192, ratio=0.8, rng=np.random.default_rng(1))
    assert x.min() >= math.ceil(0.8 * 8192) and x.max() <= 8192
    assert x.min() == 6554 and x.max() == 8192  # both ends drawn in 40000 samples of 1639 values
    assert abs(x.mean() / ((6554 + 8192) / 2) - 1) < 0.005
    assert abs(x.std() / ((8192 - 6554 + 1) / math.sqrt(12)) - 1) < 0.02


@pytest.mark.parametrize("cv", [0.1, 0.2, 0.3, 0.6])
def test_cv_lengths_have_the_mean_and_cv_asked_for(cv):
    x = request_lengths(40000, 8192, cv=cv, rng=np.random.default_rng(2)).astype(float)
    assert x.min() >= 1
    assert abs(x.mean() / 8192 - 1) < 0.01
    assert abs((x.std() / x.mean()) / cv - 1) < 0.03


def test_cv_zero_gives_exactly_isl_and_draws_are_seeded():
    assert set(request_lengths(100, 8192, cv=0.0, rng=np.random.default_rng(0)).tolist()) == {8192}
    a = rank_iterations(0, 8, 8192, 32768, cv=0.2, seed=3)
    assert a == rank_iterations(0, 8, 8192, 32768, cv=0.2, seed=3)
    assert a != rank_iterations(1, 8, 8192, 32768, cv=0.2, seed=3)
    assert a != rank_iterations(0, 8, 8192, 32768, cv=0.2, seed=4)


@pytest.mark.parametrize("kw, match", [
    (dict(), "give exactly one of ratio"), (dict(ratio=0.8, cv=0.2), "give exactly one of ratio"),
    (dict(ratio=0.0), r"ratio must be a number in \(0, 1\], got 0.0$"),
    (dict(ratio=1.5), r"ratio must be a number in \(0, 1\], got 1.5$"),
    (dict(cv=-0.1), "cv must be a finite number >= 0, got -0.1$"),
    (dict(cv=float("nan")), "cv must be a finite number >= 0, got nan$")])
def test_length_source_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        request_lengths(4, 8192, rng=np.random.default_rng(0), **kw)


@pytest.mark.parametrize("max_tokens", [1000, 8192, 16384, 32768])
def test_batching_never_exceeds_the_budget_and_keeps_every_token_in_order(max_tokens):
    lengths = request_lengths(400, 8192, cv=0.6, rng=np.random.default_rng(5))
    its = batch_requests(lengths, max_tokens)
    assert all(0 < it.tokens <= max_tokens for it in its)
    seen: dict[int, int] = {}
    order = []
    for it in its:
        for c in it.chunks:
            assert c.prefix == seen.get(c.request, 0)  # pieces in order, each after the previous
            seen[c.request] = c.prefix + c.length
            if c.last:
                order.append(c.request)
    assert order == list(range(len(lengths)))
    assert [seen[i] for i in range(len(lengths))] == lengths.tolist()
    for it in its:  # only a request longer than the budget is ever cut
        for c in it.chunks:
            if not (c.prefix == 0 and c.last):
                assert lengths[c.request] > max_tokens
    for a, b in zip(its, its[1:]):  # an iteration closes only when the next whole request did not fit
        nxt = b.chunks[0]
        if nxt.prefix == 0:
            assert a.tokens + min(lengths[nxt.request], max_tokens + 1) > max_tokens


def test_chunking_of_a_long_request():
    its = batch_requests([5000, 70000, 3000, 2000], 32768)
    got = [[(c.request, c.prefix, c.length, c.last) for c in it.chunks] for it in its]
    assert got == [[(0, 0, 5000, True)],
                   [(1, 0, 32768, False)],
                   [(1, 32768, 32768, False)],
                   [(1, 65536, 4464, True), (2, 0, 3000, True), (3, 0, 2000, True)]]
    assert [it.finished for it in its] == [1, 0, 0, 3]


def test_rank_iterations_and_workload_shapes():
    w = workload(3, 5, 8192, 16384, ratio=0.8, seed=1)
    assert len(w) == 3 and all(len(r) == 5 for r in w)
    with pytest.raises(ValueError, match="request lengths must be >= 1, got 0 at position 1$"):
        batch_requests([10, 0], 100)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1, got 0$"):
        batch_requests([10], 0)


def test_batching_is_lazy_and_reads_only_up_to_the_request_that_closes_an_iteration():
    """``iter_batches`` yields an iteration as soon as it is closed: the pieces of a long request come without reading
    the request behind it, and nothing past the request that closed the k-th iteration is read."""
    from dwdp_ops.sim.workload import iter_batches

    def queue():
        yield from (5000, 70000)
        raise AssertionError("read past the request that closed the iterations asked for")

    its = list(itertools.islice(iter_batches(queue(), 32768), 3))
    assert [[(c.request, c.prefix, c.length, c.last) for c in it.chunks] for it in its] == [
        [(0, 0, 5000, True)], [(1, 0, 32768, False)], [(1, 32768, 32768, False)]]
    endless = iter_batches(itertools.repeat(1 << 40), 1)  # one request of 2^40 tokens: pieces of 1, built lazily
    assert [it.tokens for it in itertools.islice(endless, 4)] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="max_tokens"):  # checked when called, not when first read
        iter_batches([10], 0)


def test_draws_are_the_same_values_whatever_the_block_size():
    """``rank_iterations`` draws in blocks of at most ``DRAW_BLOCK_MAX``: numpy gives one stream for one call of n or
    several calls adding up to n, so the queues are those of a single draw."""
    for src in (dict(ratio=0.8), dict(ratio=0.05), dict(cv=0.3), dict(cv=5.0)):
        one = request_lengths(3000, 8192, rng=np.random.default_rng([4, 1]), **src)
        rng = np.random.default_rng([4, 1])
        parts = np.concatenate([request_lengths(n, 8192, rng=rng, **src) for n in (1, 63, 1000, 7, 1929)])
        assert np.array_equal(one, parts), src


@pytest.mark.parametrize("args, tokens, chunks, last", [
    # max(64, iterations (max_tokens // isl + 2)) > DRAW_BLOCK_MAX: drawn in several blocks now, in one before;
    # the fingerprints were taken with the single-draw code
    ((0, 40, 100, 32768, dict(cv=0.5), 3), 1308661, 13036, (13035, 0, 52, True)),
    ((1, 64, 8, 8192, dict(ratio=0.3), 0), 524127, 95347, (95346, 0, 8, True)),
])
def test_block_draws_leave_the_queues_bit_identical(args, tokens, chunks, last):
    rank, iterations, isl, budget, src, seed = args
    its = rank_iterations(rank, iterations, isl, budget, seed=seed, **src)
    assert len(its) == iterations
    assert sum(it.tokens for it in its) == tokens and sum(len(it.chunks) for it in its) == chunks
    c = its[-1].chunks[-1]
    assert (c.request, c.prefix, c.length, c.last) == last


def test_a_long_request_cut_into_many_pieces_is_fast():
    """ISL 2^20 (the bound) with a budget of 1 token: every request is 2^20 pieces; only the 2 iterations asked for
    are built (the whole first draw of 64 requests, 2^26 iterations, was built before)."""
    cmd = [sys.executable, "-m", "dwdp_ops", "sim", "--isl", str(1 << 20), "--max-tokens", "1", "--iterations", "2",
           "--layers", "1", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["workload"]["tokens_per_iteration"] == 1.0
    w = workload(2, 3, 1 << 20, 1, cv=0.0)
    assert [[(c.prefix, c.length, c.last) for c in it.chunks] for it in w[0]] == [[(0, 1, False)], [(1, 1, False)],
                                                                                  [(2, 1, False)]]


# ----------------------------------------------------------------------------------------------------------- costs
@pytest.fixture(scope="module", params=PROFILES)
def model(request):
    return CostModel(load_calibration(request.param), R1)


def test_cost_models_are_monotone(model):
    S = np.arange(1, 70000, 997)
    att = [model.attention_ms(0, s) for s in S]
    assert all(b > a for a, b in zip(att, att[1:]))
    att_prefix = [model.attention_ms(p, 4096) for p in range(0, 65536, 4096)]
    assert all(b > a for a, b in zip(att_prefix, att_prefix[1:]))
    for experts in (256, 128, 64, 32, 1):
        t = [model.expert_ms(p, experts) for p in range(0, 600000, 3001)]
        assert all(b >= a for a, b in zip(t, t[1:])) and t[-1] > t[1] > 0
    oth = [model.moe_others_ms(T) for T in range(0, 70000, 500)]
    assert all(b >= a for a, b in zip(oth, oth[1:]))
    d = [model.dispatch_ms(r) + model.combine_ms(r) for r in range(0, 100000, 1000)]
    assert all(b > a for a, b in zip(d, d[1:]))
    assert model.fetch_ms(2) == pytest.approx(2 * model.fetch_ms(1))


def test_cost_models_reproduce_their_calibration_points(model):
    cal, ops = model.cal, model.ops
    for p in cal["expert_gemm"]["points"]:
        for experts in (256, 32):
            pairs = p["rows_per_expert"] * experts
            want = pairs * ops.expert_flops_per_pair / (p["tflops"] * 1e12) * 1e3
            assert model.expert_ms(pairs, experts) == pytest.approx(want, rel=1e-9)
    for p in cal["attention"]["core_points"]:
        S = p["seq_len"]
        want = float(ops.core_flops(0, S)) / (p["tflops"] * 1e12) * 1e3
        assert model.attention_ms(0, S) == pytest.approx(want, rel=1e-9)
    for p in cal["others"]["points"]:
        assert model.moe_others_ms(p["tokens"]) == pytest.approx(p["tokens"] * p["ns_per_token"] * 1e-6, rel=1e-9,
                                                                 abs=1e-12)
    assert model.dense_ms(1e12) == pytest.approx(1e3 / cal["dense_gemm"]["tflops"])
    assert model.fetch_ms(1) == pytest.approx(cal["weights"]["expert_bytes"] / cal["fetch"]["gbps"] * 1e-6)
    # below the first point one expert's time is constant (every expert's weights are read whatever the rows)
    p0 = cal["expert_gemm"]["points"][0]
    assert model.expert_ms(p0["rows_per_expert"] * 256 / 4, 256) == pytest.approx(model.expert_ms(
        p0["rows_per_expert"] * 256, 256))


@pytest.mark.skipif(not (RESULTS / "attention_probe_H200.json").is_file(), reason="bench/results not here")
def test_h200_attention_reproduces_the_probe():
    """Mixed lengths: the per-request loop's rate per request (core_points), summed, against each mix record's
    measured time; equal lengths: the one-call rate (equal_length_points)."""
    m = CostModel(load_calibration("h200"), R1)
    probe = json.loads((RESULTS / "attention_probe_H200.json").read_text())
    for r in probe["records"]:
        if r["kind"] == "mix":
            L = np.array(r["lengths"], dtype=float)
            got = sum(m.attention_ms(0, x) for x in L)
            assert got == pytest.approx(r["cases"]["packed:loop"]["median_ms"], rel=0.03), r["S"]
        else:
            got = m.attention_ms(np.zeros(r["requests"]), np.full(r["requests"], r["S"]))
            assert got == pytest.approx(r["cases"]["packed:dense"]["median_ms"], rel=1e-3), r["S"]
    # a step of requests of one length runs at the equal-length rate, any other step per request
    assert m.attention_ms([0, 0], [8192, 8192]) < m.attention_ms([0, 0], [8192, 8191])
    assert m.attention_ms(0, 8192) == pytest.approx(float(m.ops.core_flops(0, 8192)) / (
        float(np.interp(8192, m._s, m._r_att)) * 1e12) * 1e3)


def test_attention_override_is_flat():
    m = CostModel(load_calibration("h200"), R1, Overrides(attention_tflops=400))
    for S in (256, 8192, 30000):
        assert float(m.ops.core_flops(0, S)) / (m.attention_ms(0, S) * 1e-3) / 1e12 == pytest.approx(400)


@pytest.mark.skipif(not (RESULTS / "deepseek_forward_H200_N2.json").is_file(), reason="bench/results not here")
def test_h200_model_reproduces_the_measurements():
    m = CostModel(load_calibration("h200"), R1)
    fwd = json.loads((RESULTS / "deepseek_forward_H200_N2.json").read_text())
    for T in (4096, 16384, 32768):
        rows = [r for rk in fwd["ranks"] for r in rk["rows"] if r["tokens"] == T]
        S = T // rows[0]["requests"]
        # attention block: projections + others + core at the equal-length rate (16 equal requests: one cuDNN
        # call), per layer, as measured (mean of ranks); others is the mean over the rows, so within a few %
        measured = np.mean([r["attn_ms"] for r in rows]) / fwd["layers"]
        model = (m.dense_ms(T * m.ops.proj_flops_per_token) + m.attention_others_ms(T)
                 + m.attention_ms(np.zeros(rows[0]["requests"]), np.full(rows[0]["requests"], S)))
        assert model == pytest.approx(measured, rel=0.05)
        exp = np.mean([r["expert_tflops"] for r in rows])
        got = T * 8 * m.ops.expert_flops_per_pair / (m.expert_ms(T * 8, 256) * 1e-3) / 1e12
        assert got == pytest.approx(exp, rel=0.03)
    dsp = json.loads((RESULTS / "dispatch_bandwidth_H200_N2.json").read_text())
    for r in dsp["records"]:
        if r["tokens_per_rank"] >= 1024:
            rows = max(r["rows_sent_per_rank"] + r["rows_received_per_rank"])
            assert m.dispatch_ms(rows) + m.combine_ms(rows) == pytest.approx(r["modes"]["ours"]["time_ms"], rel=0.06)


@pytest.mark.skipif(not (RESULTS / "deepseek_forward_H200_N2.json").is_file(), reason="bench/results not here")
def test_shipped_calibration_files_regenerate_from_bench_results(capsys):
    assert calibrate.main(["--check"]) == 0, capsys.readouterr().err


def test_calibration_regeneration_writes_valid_files(tmp_path):
    if not (RESULTS / "deepseek_forward_H200_N2.json").is_file():
        pytest.skip("bench/results not here")
    assert calibrate.main(["--out-dir", str(tmp_path)]) == 0
    for name in PROFILES:
        validate_calibration(json.loads((tmp_path / f"{name}.json").read_text()))
    assert calibrate.main(["--check", "--out-dir", str(tmp_path)]) == 0
    (tmp_path / "gb200.json").write_text("{}")
    assert calibrate.main(["--check", "--out-dir", str(tmp_path)]) == 1


def test_calibration_out_dir_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    """--out-dir naming an existing file had ended in mkdir's FileExistsError traceback after the work."""
    f = tmp_path / "x.json"
    f.write_text("{}")
    with pytest.raises(SystemExit) as e:
        calibrate.main(["--out-dir", str(f)])
    assert e.value.code == 2 and "argument --out-dir: " in capsys.readouterr().err and f.read_text() == "{}"


# ----------------------------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("name", PROFILES)
def test_shipped_calibrations_follow_the_schema_and_name_every_source(name):
    text = resources.files("dwdp_ops.sim").joinpath("calibration", f"{name}.json").read_text()
    cal = validate_calibration(json.loads(text))
    assert cal["hardware"] == name
    for section in ("weights", "dense_gemm", "expert_gemm", "attention", "others", "fetch", "dispatch",
                    "interference"):
        assert len(cal[section]["source"]) > 20
    for p in cal["expert_gemm"]["points"] + cal["attention"]["core_points"] + cal["others"]["points"]:
        assert p["source"].strip()


@pytest.mark.parametrize("breakage, message", [
    (lambda c: c.update(schema="other/1"), "schema"),
    (lambda c: c.pop("fetch"), "'fetch'"),
    (lambda c: c["fetch"].update(gbps=-1), "fetch.gbps"),
    (lambda c: c["dispatch"].pop("source"), "dispatch.source"),
    (lambda c: c["expert_gemm"]["points"].reverse(), "increasing rows_per_expert"),
    (lambda c: c["attention"]["core_points"][0].update(tflops=float("inf")), "core_points[0].tflops"),
    (lambda c: c["interference"].pop("others"), "interference.others"),
    (lambda c: c["others"].update(points=[]), "others.points"),
    (lambda c: c["rank_speed"].update(slowest_vs_mean=-0.01), "rank_speed.slowest_vs_mean"),
    (lambda c: c["rank_speed"].update(slowest_vs_mean=1.0), "rank_speed.slowest_vs_mean"),
    (lambda c: c["rank_speed"].pop("source"), "rank_speed.source"),
])
def test_broken_calibrations_are_refused_with_the_problem_named(breakage, message):
    cal = copy.deepcopy(load_calibration("h200"))
    breakage(cal)
    with pytest.raises(ValueError, match="invalid calibration") as e:
        validate_calibration(cal)
    assert message in str(e.value)


def test_load_calibration_errors(tmp_path):
    with pytest.raises(ValueError, match="no calibration profile or file"):
        load_calibration("tpu")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_calibration(bad)


# ------------------------------------------------------------------------------------------------------ DWDP model
def _layers(prelude: float, a: float, g: float, M: int) -> list:
    seg = [("dense_gemm", prelude, None)]
    for j in range(M):
        seg += [("attention", a, None), ("expert_gemm", g, j)]
    return seg


@pytest.mark.parametrize("F", [0.0, 2.0, 4.0, 5.0])
def test_dwdp_exposed_fetch_is_zero_when_compute_per_layer_covers_the_fetch(F):
    a, g, M = 3.0, 2.0, 12  # C = 5 per layer
    res = dwdp_timeline(_layers(10.0, a, g, M), M, F, NO_SLOW)
    assert res["breakdown"]["exposed_fetch"] == 0.0
    assert res["time_ms"] == pytest.approx(10.0 + M * (a + g))
    assert res["overlapped_copy_ms"] == pytest.approx(M * F)


@pytest.mark.parametrize("s", [0.0, 0.1])
@pytest.mark.parametrize("F", [6.0, 8.0, 20.0])
def test_dwdp_exposed_fetch_equals_fetch_minus_compute_otherwise(F, s):
    a, g, M = 3.0, 2.0, 10
    slow = {c: s for c in NO_SLOW}
    prelude = F / (1 + s) - a  # the first layer's GEMMs start exactly when its fetch ends
    res = dwdp_timeline(_layers(prelude, a, g, M), M, F, slow)
    C = (a + g) * (1 + s)  # the copy is always busy until the last fetch ends, so compute runs slowed until then
    assert res["breakdown"]["exposed_fetch"] == pytest.approx((M - 1) * (F - C))
    assert res["time_ms"] == pytest.approx(M * F + g)  # the last GEMMs run after the last copy, at full speed
    assert sum(res["interference_ms"].values()) == pytest.approx(s * (prelude + M * a + (M - 1) * g))
    assert sum(res["breakdown"].values()) == pytest.approx(res["time_ms"])


def test_dwdp_copy_of_layer_j_waits_for_the_slot_of_layer_j_minus_2():
    # one long GEMM in layer 0 holds slot 0, so fetch 2 cannot start before it ends
    seg = [("dense_gemm", 1.0, None), ("expert_gemm", 50.0, 0), ("expert_gemm", 1.0, 1), ("expert_gemm", 1.0, 2)]
    res = dwdp_timeline(seg, 3, 10.0, NO_SLOW)
    # fetch 0: [0,10], GEMM 0: [10,60], fetch 1: [10,20], fetch 2: [60,70], GEMM 1: [60,61], GEMM 2 waits to 70
    assert res["breakdown"]["exposed_fetch"] == pytest.approx(9.0 + 9.0)
    assert res["time_ms"] == pytest.approx(71.0)


def test_dep_iteration_waits_for_the_slowest_rank_at_every_collective():
    cfg = DeepSeekConfig.r1(n_layers=5)  # 3 dense + 2 MoE layers
    fast = RankStep(1000, 1, attention=1.0, proj=0.5, attn_others=0.5, dense_mlp=2.0, shared=0.25, moe_others=0.25,
                    lm_head=0.1)
    slow = RankStep(1200, 1, attention=3.0, proj=0.5, attn_others=0.5, dense_mlp=2.0, shared=0.25, moe_others=0.25,
                    lm_head=0.3)
    res = dep_iteration([fast, slow], cfg, expert_ms=[4.0, 1.0], dispatch_ms=0.7, combine_ms=0.9)
    # MoE layer 0: arrive after 3 dense layers + attention block + shared + others; layer 1: attention block + ...
    a0 = [3 * (2.0 + 2.0) + 2.0 + 0.5, 3 * (4.0 + 2.0) + 4.0 + 0.5]
    a1 = [2.0 + 0.5, 4.0 + 0.5]
    want_t = sum(max(a) + 0.7 + 4.0 + 0.9 for a in (a0, a1)) + 0.3
    assert res["time_ms"] == pytest.approx(want_t)
    for r in range(2):
        b = res["breakdown"][r]
        sync = sum(max(a) - a[r] for a in (a0, a1)) + 2 * (4.0 - [4.0, 1.0][r]) + (0.3 - [0.1, 0.3][r])
        assert b["sync_wait"] == pytest.approx(sync)
        assert b["communication"] == pytest.approx(2 * (0.7 + 0.9))
        assert sum(b.values()) == pytest.approx(want_t)


# ------------------------------------------------------------------------------------------------------- simulate
def small(**kw) -> SimConfig:
    base = dict(hardware="h200", gpus=2, layers=8, iterations=8)
    base.update(kw)
    return SimConfig(**base)


SAME_GPUS = Overrides(rank_slowdown=0.0)  # identical ranks: h200.json's measured rank_speed switched off


def test_dep_sync_wait_is_zero_with_cv_zero_and_identical_ranks():
    r = simulate(small(gpus=4, cv=0.0, overrides=SAME_GPUS))
    assert r["dep"]["breakdown_ms"]["sync_wait"] == pytest.approx(0.0, abs=1e-9)
    assert r["dep"]["breakdown_ms"]["communication"] > 0
    assert simulate(small(gpus=4, ratio=0.8, overrides=SAME_GPUS))["dep"]["breakdown_ms"]["sync_wait"] > 0


def test_a_calibration_without_rank_speed_means_identical_ranks():
    cal = copy.deepcopy(load_calibration("h200"))
    s = cal.pop("rank_speed")["slowest_vs_mean"]
    assert 0.001 < s < 0.05  # measured: rank 1 about 1 % slower than the mean of the 2 ranks
    assert CostModel(validate_calibration(cal), R1).rank_factors(4) == [1.0] * 4
    old, same = simulate(small(gpus=2, cv=0.0), calibration=cal), simulate(small(gpus=2, cv=0.0, overrides=SAME_GPUS))
    assert (old["dwdp"], old["dep"], old["model"]) == (same["dwdp"], same["dep"], same["model"])
    assert "rank_speed" not in load_calibration("gb200")


@pytest.mark.parametrize("gpus", [2, 4])
def test_rank_speed_spread_gives_dep_sync_wait_at_cv_zero_and_leaves_dwdp_tps(gpus):
    s = load_calibration("h200")["rank_speed"]["slowest_vs_mean"]
    cfg = dict(gpus=gpus, cv=0.0, max_tokens=32768)
    same, spread = simulate(small(**cfg, overrides=SAME_GPUS)), simulate(small(**cfg))
    f = spread["model"]["rank_compute_factors"]
    assert f[-1] == pytest.approx(1 + s) and np.mean(f) == pytest.approx(1.0)
    # DEP: every rank waits for the slow one at every collective. At CV 0 each rank's compute C is the same, so a
    # fast rank waits (1 + s - (1 - s / (N - 1))) C, the slow one nothing: per rank on average s C
    dep0, dep1 = same["dep"], spread["dep"]
    assert dep0["breakdown_ms"]["sync_wait"] == pytest.approx(0.0, abs=1e-9)
    compute = sum(dep0["breakdown_ms"][c] for c in ("attention", "expert_gemm", "dense_gemm", "others"))
    assert dep1["breakdown_ms"]["sync_wait"] == pytest.approx(s * compute, rel=1e-6)
    assert dep1["iteration_ms"] == pytest.approx(dep0["iteration_ms"] + s * compute, rel=1e-6)
    assert dep1["tps_per_gpu"] < dep0["tps_per_gpu"]
    # DWDP: no collective, no wait; each rank its own time. The fetch stays hidden here, so the mean over ranks of
    # tokens / time and of the iteration time move only at second order (and by the interference, which lasts as
    # long as the copy, not as the compute), while the slowest rank's iteration grows by about s
    dw0, dw1 = same["dwdp"], spread["dwdp"]
    assert dw1["breakdown_ms"]["sync_wait"] == 0 and dw1["breakdown_ms"]["exposed_fetch"] == 0
    assert dw1["tps_per_gpu"] == pytest.approx(dw0["tps_per_gpu"], rel=1e-3)
    assert dw1["iteration_ms"] == pytest.approx(dw0["iteration_ms"], rel=1e-3)
    assert dw1["slowest_rank_iteration_ms"] == pytest.approx((1 + s) * dw0["slowest_rank_iteration_ms"], rel=1e-3)
    assert dw1["slowest_rank_iteration_ms"] > (1 + s / 2) * dw0["slowest_rank_iteration_ms"]
    assert spread["ratio"] > same["ratio"]


def test_dep_sync_wait_grows_with_cv():
    # many short requests per iteration: the spread of a rank's work follows the CV, not the packing
    shares = [simulate(small(gpus=4, isl=1024, max_tokens=65536, cv=cv, iterations=16,
                             overrides=SAME_GPUS))["dep"]["shares"]["sync_wait"]
              for cv in (0.0, 0.1, 0.3, 0.6)]
    assert shares[0] == pytest.approx(0.0, abs=1e-12)
    assert all(b > a for a, b in zip(shares, shares[1:])), shares


def test_categories_add_up_to_the_iteration():
    r = simulate(small(gpus=4, cv=0.3, max_tokens=16384))
    for mode in ("dwdp", "dep"):
        assert sum(r[mode]["breakdown_ms"][c] for c in CATEGORIES) == pytest.approx(r[mode]["iteration_ms"])
    assert r["dwdp"]["breakdown_ms"]["communication"] == 0 and r["dwdp"]["breakdown_ms"]["sync_wait"] == 0
    assert r["dep"]["breakdown_ms"]["exposed_fetch"] == 0 and r["dep"]["overlapped_copy_ms"] == 0
    assert r["ratio"] == pytest.approx(r["dwdp"]["tps_per_gpu"] / r["dep"]["tps_per_gpu"])


@pytest.mark.parametrize("hardware", PROFILES)
def test_one_gpu_is_the_same_in_both_modes(hardware):
    r = simulate(small(hardware=hardware, gpus=1, cv=0.3))
    assert r["ratio"] == pytest.approx(1.0, abs=1e-12)
    assert r["dwdp"]["overlapped_copy_ms"] == 0 and sum(r["dwdp"]["interference_ms"].values()) == 0
    assert r["dep"]["breakdown_ms"]["communication"] == 0 and r["dep"]["breakdown_ms"]["sync_wait"] == 0
    assert r["model"]["partition"]["remote_experts"] == 0


def test_no_moe_layer_means_no_collective_and_no_fetch():
    r = simulate(small(gpus=4, layers=3, ratio=0.8))
    assert r["config"]["moe_layers"] == 0
    assert r["dep"]["breakdown_ms"]["communication"] == 0 and r["dwdp"]["overlapped_copy_ms"] == 0


def test_more_gpus_move_more_rows_and_fetch_more():
    rs = [simulate(small(gpus=n, cv=0.0, overrides=Overrides(attention_tflops=400))) for n in (2, 4, 8)]
    comm = [r["dep"]["shares"]["communication"] for r in rs]
    fetch = [r["model"]["fetch_ms_per_moe_layer"] for r in rs]
    assert comm[0] < comm[1] < comm[2] and fetch[0] < fetch[1] < fetch[2]


def test_fetch_exposed_when_the_budget_is_small():
    r = simulate(small(gpus=8, isl=1024, max_tokens=1024, cv=0.0))
    assert r["dwdp"]["breakdown_ms"]["exposed_fetch"] > 0
    assert r["dwdp"]["breakdown_ms"]["exposed_fetch"] < r["dwdp"]["overlapped_copy_ms"]


@pytest.mark.parametrize("n, per, stride", [(2, 128, 128), (3, 86, 85), (5, 52, 51), (7, 40, 36), (8, 32, 32)])
def test_partition_for_any_group_size(n, per, stride):
    p = partition_for(256, n)
    assert (p.experts_per_rank, p.stride) == (per, stride)
    r = simulate(small(gpus=n, cv=0.1, iterations=2, layers=5))
    assert r["model"]["partition"]["remote_experts"] == 256 - per


@pytest.mark.parametrize("n, lo, hi", [(2, 128, 128), (3, 85, 86), (7, 36, 37), (72, 3, 4)])
def test_dep_places_each_expert_once(n, lo, hi):
    """DEP's experts are disjoint, as even as N allows (DWDP's overlapping placement serves its fetch only). DEP had
    used DWDP's placement: at N = 72 each rank held 43 experts and the lowest owners took most pairs (DWDP / DEP
    2.06 on GB200, 1.64 at N = 64 and 1.74 at N = 128 beside it); now N = 72 lies between its neighbours."""
    from dwdp_ops.sim.model import dep_expert_counts

    c = dep_expert_counts(256, n)
    assert sum(c) == 256 and (min(c), max(c)) == (lo, hi) and len(c) == n
    r = simulate(small(gpus=n, cv=0.1, iterations=2, layers=5))
    assert r["model"]["partition"]["dep_experts_per_rank"] == [lo, hi]
    if n == 72:
        ratio = {g: simulate(small(gpus=g, cv=0.3, iterations=4, layers=5, hardware="gb200"))["ratio"]
                 for g in (64, 72, 128)}
        assert ratio[64] < ratio[72] < ratio[128], ratio


def test_simulation_is_deterministic_per_seed():
    assert simulate(small(cv=0.2, seed=7)) == simulate(small(cv=0.2, seed=7))
    assert simulate(small(cv=0.2, seed=7))["dep"]["iteration_ms"] != simulate(small(cv=0.2, seed=8))["dep"][
        "iteration_ms"]


@pytest.mark.parametrize("kw, match", [
    (dict(gpus=0), "gpus must be an integer >= 1, got 0$"),
    (dict(layers=62), r"layers must be at most 61 \(DeepSeek-R1\), got 62$"),
    (dict(ratio=0.8, cv=0.1), "give one of ratio and cv, not both$"),
    (dict(dense_layers=9), r"dense_layers must be an integer in \[0, layers=8\], got 9$"),
    (dict(iterations=0), "iterations must be an integer >= 1, got 0$"),
    (dict(cv=-1.0), "cv must be a finite number >= 0, got -1.0$"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0$")])
def test_bad_configs_are_refused(kw, match):
    """Each refused for its own reason (a bare ValueError would pass if another check raised first)."""
    with pytest.raises(ValueError, match=match):
        small(**kw)


@pytest.mark.parametrize("kw, message", [
    (dict(isl=(1 << 20) + 1), "isl must be at most 1048576"),
    (dict(max_tokens=(1 << 20) + 1, isl=8192), "max_tokens must be at most 1048576"),
    (dict(max_tokens=10**14), "max_tokens must be at most 1048576"),
    (dict(isl=4, max_tokens=8192), "max_tokens must be at most 1024 x isl"),
])
def test_configs_above_the_bounds_are_refused_before_any_draw(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SimConfig(**kw)
    SimConfig(isl=1 << 20, max_tokens=1 << 20)  # the bounds themselves are allowed
    SimConfig(isl=4, max_tokens=4096)


def test_gb200_paper_setting_runs_and_reports_against_the_paper():
    r = simulate(SimConfig(hardware="gb200", gpus=4, isl=8192, ratio=0.8, max_tokens=32768, layers=61))
    p = paper_comparison(r)
    assert 0.9 < r["ratio"] < 1.5
    assert p["paper_iteration_latency_change"] == pytest.approx(-0.1426, abs=5e-4)
    # DEP4's compute categories come from the paper's Table 3 (by construction, within the sampling of lengths)
    for cat in ("attention", "expert_gemm", "dense_gemm", "others"):
        row = p["categories"][cat]
        assert row["predicted_dep_ms"] == pytest.approx(row["paper_dep_ms"], rel=0.02)
    # the independent parts: communication and the copy are near the paper's; synchronisation is well below it
    assert p["predicted_dep_communication_share"] == pytest.approx(p["paper_dep_communication_share"], abs=0.05)
    assert p["predicted_overlapped_copy_ms"] == pytest.approx(p["paper_overlapped_copy_ms"], rel=0.05)
    assert 0 < p["predicted_dep_sync_share"] < p["paper_dep_sync_share"]
    print(f"GB200 paper setting: predicted DWDP / DEP iteration {100 * r['iteration_latency_change']:+.1f} % "
          f"(paper {100 * p['paper_iteration_latency_change']:+.1f} %), TPS/GPU ratio {r['ratio']:.3f}")


# -------------------------------------------------------------------------------------------------------- analysis
def test_sweep_has_one_row_per_setting():
    rows = sweep("h200", 2, cvs=(0.0, 0.2), budgets=(16384, 32768), layers=6, iterations=4)
    assert [(r.get("cv"), r.get("input_ratio"), r["max_tokens"]) for r in rows] == [
        (None, 0.8, 16384), (0.0, None, 16384), (0.2, None, 16384),
        (None, 0.8, 32768), (0.0, None, 32768), (0.2, None, 32768)]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["dwdp"]["tps_per_gpu"] / r["dep"]["tps_per_gpu"])
    # CV 0: DEP's only wait is h200.json's rank speed spread, s C of an iteration longer than C
    assert 0 < rows[1]["dep"]["sync_share"] < load_calibration("h200")["rank_speed"]["slowest_vs_mean"]
    same = sweep("h200", 2, cvs=(0.0,), budgets=(16384,), ratio=None, layers=6, iterations=4, overrides=SAME_GPUS)
    assert same[0]["dep"]["sync_share"] == pytest.approx(0.0, abs=1e-12)


def test_validate_reports_relative_error_per_point():
    cfg = dict(layers=6, iterations=4)
    pred = simulate(SimConfig(hardware="h200", gpus=2, cv=0.1, max_tokens=16384, **cfg))
    pts = [
        {"mode": "dwdp", "N": 2, "cv": 0.1, "max_tokens": 16384,
         "iteration_ms": pred["dwdp"]["slowest_rank_iteration_ms"] / 1.05,
         "tps_per_gpu": pred["dwdp"]["tps_per_gpu"]},
        {"mode": "dep", "N": 2, "cv": 0.1, "max_tokens": 16384, "iteration_ms": pred["dep"]["iteration_ms"],
         "tps_per_gpu": pred["dep"]["tps_per_gpu"] / 1.5},
    ]
    v = validate(pts, **cfg)
    a, b = v["points"]
    assert a["rel_err_iteration_ms"] == pytest.approx(0.05) and a["rel_err_tps_per_gpu"] == pytest.approx(0.0)
    assert a["within_tolerance"] and not b["within_tolerance"]
    assert b["rel_err_tps_per_gpu"] == pytest.approx(0.5)
    assert v["max_abs_rel_err"] == pytest.approx(0.5) and not v["all_within"]
    assert pred["dep"]["slowest_rank_iteration_ms"] == pytest.approx(pred["dep"]["iteration_ms"])  # lockstep
    assert pred["dwdp"]["slowest_rank_iteration_ms"] >= pred["dwdp"]["iteration_ms"]
    for p, mode in ((a, "dwdp"), (b, "dep")):  # the e2e grouping adds up to the mean step
        c = p["predicted_categories_ms"]
        assert c["step"] == pytest.approx(pred[mode]["iteration_ms"])
        assert c["experts"] == pytest.approx(pred[mode]["breakdown_ms"]["expert_gemm"])
        assert c["attn"] > pred[mode]["breakdown_ms"]["attention"]
    with pytest.raises(ValueError, match="lacks"):
        validate([{"mode": "dep", "N": 2, "max_tokens": 16384, "iteration_ms": 1.0, "tps_per_gpu": 1.0}], **cfg)
    with pytest.raises(ValueError, match="mode"):
        validate([dict(pts[0], mode="tp")], **cfg)


def test_detail_adds_up_to_the_categories_and_warmup_drops_the_first_iterations():
    r = simulate(SimConfig(hardware="h200", gpus=2, cv=0.2, max_tokens=16384, layers=6, iterations=4))
    for mode in ("dwdp", "dep"):
        d, b = r[mode]["detail_ms"], r[mode]["breakdown_ms"]
        for cat in ("attention", "expert_gemm", "dense_gemm", "others"):
            assert sum(v for k, v in d.items() if k.split(":")[0] == cat) == pytest.approx(b[cat])
    w = simulate(SimConfig(hardware="h200", gpus=2, cv=0.2, max_tokens=16384, layers=6, iterations=3, warmup=1))
    tail = simulate(SimConfig(hardware="h200", gpus=2, cv=0.2, max_tokens=16384, layers=6, iterations=4))
    assert w["workload"]["tokens_per_iteration"] != tail["workload"]["tokens_per_iteration"]
    full = workload(2, 4, 8192, 16384, cv=0.2)
    assert w["workload"]["tokens_per_iteration"] == pytest.approx(np.mean([it.tokens for row in full
                                                                            for it in row[1:]]))


E2E = RESULTS / "e2e_dwdp_vs_dep_H200_N2.json"


@pytest.mark.skipif(not E2E.is_file(), reason="bench/results not here")
def test_validate_e2e_uses_the_benchmarks_workload_and_categories(capsys):
    data = json.loads(E2E.read_text())
    sub = dict(data, points=data["points"][:2])
    v = validate_e2e(sub)
    rec = data["records"][0]
    for p in v["points"]:
        mc = p["measured_categories_ms"]
        assert mc["step"] == pytest.approx(rec["modes"][p["mode"]]["categories_ms"]["step_ms"])
        assert set(p["predicted_categories_ms"]) == set(E2E_CATEGORIES)
    # the simulated batches are the benchmark's (sim.workload, same seeds; the first warmup iterations dropped)
    w = workload(2, data["warmup"] + data["iterations"], data["isl"], rec["budget"], seed=data["seed"], **rec["dist"])
    for rank in range(2):
        assert [it.tokens for it in w[rank][data["warmup"]:]] == [x["tokens"] for x in
                                                                  rec["modes"]["dwdp"]["rows"][rank]]
    assert "attn" in validation_table(v)
    with pytest.raises(ValueError, match="bf16"):
        validate_e2e(dict(sub, dtype="float8_e4m3fn"))
    code, out, err = run_main(["--validate", str(E2E)], capsys)
    assert code == 0 and "within 10 %" in out, err


E2E_FP8 = RESULTS / "e2e_dwdp_vs_dep_H200_N2_fp8.json"
H200_FILE = ROOT / "python" / "dwdp_ops" / "sim" / "calibration" / "h200.json"


@pytest.mark.skipif(not E2E_FP8.is_file(), reason="bench/results not here")
def test_validate_e2e_refuses_other_expert_bytes_by_the_calibrations_contents(tmp_path, capsys):
    """The check compares the calibration's expert bytes per parameter with the result's dtype, whatever the
    profile's name or path: the shipped h200.json by path, or renamed, is still bf16; an fp8 calibration is taken."""
    data = json.loads(E2E_FP8.read_text())
    sub = dict(data, points=data["points"][:2])
    cal = load_calibration("h200")
    renamed = tmp_path / "mine.json"
    renamed.write_text(json.dumps(dict(cal, hardware="mine")))
    for hw in ("h200", str(H200_FILE), str(renamed)):
        with pytest.raises(ValueError, match="bf16 experts"):
            validate_e2e(sub, hardware=hw)
    code, out, err = run_main(["--validate", str(E2E_FP8), "--calibration", str(H200_FILE)], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and out == "" and len(errors) == 1 and "float8_e4m3fn" in errors[0], err
    fp8 = tmp_path / "fp8.json"
    fp8.write_text(json.dumps(dict(cal, weights=dict(cal["weights"], expert_bytes=cal["weights"]["expert_bytes"] // 2,
                                                     param_bytes=1))))
    assert len(validate_e2e(sub, hardware=str(fp8))["points"]) == 2
    no_pb = tmp_path / "no_param_bytes.json"  # derived from expert_bytes: 88080384 / (3 x 7168 x 2048) = 2
    no_pb.write_text(json.dumps(dict(cal, weights={k: v for k, v in cal["weights"].items() if k != "param_bytes"})))
    with pytest.raises(ValueError, match="bf16 experts"):
        validate_e2e(sub, hardware=str(no_pb))
    with pytest.raises(ValueError, match="nvfp4 experts"):  # gb200 (NVFP4) against a bf16 result
        validate_e2e(dict(sub, dtype="bfloat16"), hardware="gb200")


def _malformed(data: dict, what: str) -> dict:
    p0, rec = data["points"][0], data["records"][0]
    cats = rec["modes"]["dwdp"]["categories_ms"]
    base = {k: data[k] for k in ("dtype", "warmup", "isl", "seed", "iterations")}
    return {
        "record int": dict(base, points=[p0], records=[5]),
        "records object": dict(base, points=[p0], records={"a": 1}),
        "record modes int": dict(base, points=[p0], records=[dict(rec, modes=5)]),
        "category missing": dict(base, points=[p0], records=[dict(rec, modes={"dwdp": {"categories_ms": {
            k: v for k, v in cats.items() if k != "attn_ms"}}})]),
        "category inf": dict(base, points=[p0], records=[dict(rec, modes={"dwdp": {"categories_ms": dict(
            cats, step_ms=float("inf"))}})]),
        "point int": dict(base, points=[5]),
        "second point int": dict(base, points=[p0, "x"]),
        "iteration inf": dict(base, points=[dict(p0, iteration_ms=float("inf"))]),
        "tps nan": dict(base, points=[dict(p0, tps_per_gpu=float("nan"))]),
        "max_tokens text": dict(base, points=[dict(p0, max_tokens="16384")]),
        "owner_load int": dict(base, points=[dict(p0, owner_load=3)]),
        "warmup text": dict(base, points=[p0], warmup="x"),
    }[what]


@pytest.mark.skipif(not E2E.is_file(), reason="bench/results not here")
@pytest.mark.parametrize("what, message", [
    ("record int", "records[0] must be an object"), ("records object", "'records' must be a list"),
    ("record modes int", "records[0].modes must be an object"),
    ("category missing", "records[0].modes.dwdp.categories_ms lacks attn_ms"),
    ("category inf", "records[0].modes.dwdp.categories_ms.step_ms must be a finite number"),
    ("point int", "measured point 0 must be an object"), ("second point int", "measured point 1 must be an object"),
    ("iteration inf", "measured point 0: measured iteration_ms must be a finite number > 0"),
    ("tps nan", "measured point 0: measured tps_per_gpu must be a finite number > 0"),
    ("max_tokens text", "measured point 0: max_tokens must be an integer"),
    ("owner_load int", "measured point 0: owner_load must be a list"),
    ("warmup text", "warmup must be an integer >= 0"),
])
def test_cli_malformed_validation_files_exit_2_naming_the_part(what, message, tmp_path, capsys):
    path = tmp_path / "e2e.json"
    # json.dumps writes inf / nan as Infinity / NaN, which json.loads reads back as float("inf") / float("nan"),
    # as it reads 1e400
    path.write_text(json.dumps(_malformed(json.loads(E2E.read_text()), what)).replace("Infinity", "1e400"))
    code, out, err = run_main(["--validate", str(path)], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("python -m dwdp_ops sim: error: argument --validate: "), err
    assert message in errors[0], errors[0]


# ------------------------------------------------------------------------------------------------------------- CLI
def test_cli_json_has_both_modes_and_the_ratio(capsys):
    code, out, err = run_main(["--json", "--layers", "6", "--iterations", "4", "--cv", "0.2"], capsys)
    assert code == 0, err
    d = json.loads(out)
    for mode in ("dwdp", "dep"):
        assert d[mode]["tps_per_gpu"] > 0 and d[mode]["iteration_ms"] > 0
        assert set(d[mode]["breakdown_ms"]) == set(CATEGORIES)
    assert d["ratio"] == pytest.approx(d["dwdp"]["tps_per_gpu"] / d["dep"]["tps_per_gpu"])
    assert d["config"]["cv"] == 0.2 and d["config"]["ratio"] is None


def test_cli_text_and_the_paper_comparison(capsys):
    code, out, err = run_main(["--hardware", "gb200", "--gpus", "4", "--isl", "8192", "--ratio", "0.8",
                               "--max-tokens", "32768", "--layers", "61"], capsys)
    assert code == 0, err
    assert "ms per iteration" in out and "sync_wait" in out and "ratio DWDP / DEP =" in out
    assert "paper -14.3 %" in out
    code, out, _ = run_main(["--layers", "6", "--iterations", "2", "--sweep"], capsys)
    assert code == 0 and "cv 0.3" in out and "ratio 0.8" in out and "paper" not in out


def test_cli_through_the_top_level_command(capsys):
    code, out, _ = run_main(["sim", "--help"], capsys, main=top.main)
    assert code == 0 and out.startswith("usage: python -m dwdp_ops sim ")
    code, _, err = run_main(["sim", "--gpus", "0"], capsys, main=top.main)
    assert code == 2 and "python -m dwdp_ops sim: error: argument --gpus" in err


@pytest.mark.parametrize("argv, option", [
    (["--gpus", "0"], "--gpus"), (["--gpus", "257"], "--gpus"), (["--gpus", "two"], "--gpus"),
    (["--isl", "0"], "--isl"), (["--ratio", "0"], "--ratio"), (["--ratio", "1.2"], "--ratio"),
    (["--cv", "-0.1"], "--cv"), (["--cv", "nan"], "--cv"), (["--ratio", "0.8", "--cv", "0.2"], "--cv"),
    (["--max-tokens", "-5"], "--max-tokens"), (["--layers", "62"], "--layers"), (["--layers", "0"], "--layers"),
    (["--layers", "3", "--dense-layers", "4"], "--dense-layers"), (["--iterations", "0"], "--iterations"),
    (["--seed", "-1"], "--seed"), (["--hardware", "tpu"], "--hardware"), (["--fetch-gbps", "0"], "--fetch-gbps"),
    (["--attention-tflops", "inf"], "--attention-tflops"), (["--interference", "-1"], "--interference"),
    (["--dispatch-latency-us", "-3"], "--dispatch-latency-us"), (["--plot", "/no/such/dir/x.png"], "--plot"),
    (["--calibration", "/no/such.json"], "--calibration"), (["--rank-slowdown", "-0.1"], "--rank-slowdown"),
    (["--rank-slowdown", "1"], "--rank-slowdown"),
])
def test_cli_bad_arguments_exit_2_with_one_error_line(argv, option, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 2 and out == ""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("python -m dwdp_ops sim: error: ") and option in errors[0], err


def test_cli_refuses_a_broken_calibration_file(tmp_path, capsys):
    bad = tmp_path / "cal.json"
    cal = load_calibration("h200")
    cal["fetch"]["gbps"] = 0
    bad.write_text(json.dumps(cal))
    code, _, err = run_main(["--calibration", str(bad)], capsys)
    assert code == 2 and "fetch.gbps" in err and "Traceback" not in err
    cal["fetch"]["gbps"] = 100.0
    bad.write_text(json.dumps(cal))
    code, out, err = run_main(["--calibration", str(bad), "--layers", "5", "--iterations", "2", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["config"]["hardware"] == str(bad)


def test_cli_help_shows_every_default(capsys):
    ap = cli.build_parser()
    assert "`" not in ap.format_help()
    for action in ap._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, action.option_strings
        shown = ap.formatter_class(ap.prog)._get_help_string(action)
        if action.default is not None and action.default is not False:
            assert "default" in shown, action.option_strings


def test_cli_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sim.png"
    code, out, err = run_main(["--layers", "5", "--iterations", "2", "--plot", str(path)], capsys)
    assert code == 0, err
    assert path.stat().st_size > 10000 and "figure:" in out


def test_cli_plot_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "have_matplotlib", lambda: False)
    code, _, err = run_main(["--plot", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "needs matplotlib" in err and "Traceback" not in err
    assert plot.MISSING in err


def test_owner_load_unbalances_dep_and_leaves_dwdp():
    """A router that loads one owner's experts more (``owner_load``) lengthens DEP's expert phase to that owner's
    GEMMs (the others wait) and leaves DWDP as it was; an even load is the uniform routing exactly."""
    base = dict(gpus=2, cv=0.0, max_tokens=32768, overrides=SAME_GPUS)
    even, uni = simulate(small(**base, owner_load=(1.0, 1.0))), simulate(small(**base))
    assert (even["dwdp"], even["dep"]) == (uni["dwdp"], uni["dep"])
    skew = simulate(small(**base, owner_load=(0.5, 1.5)))
    assert skew["dwdp"] == uni["dwdp"]
    assert skew["dep"]["breakdown_ms"]["sync_wait"] > 0 == uni["dep"]["breakdown_ms"]["sync_wait"]
    assert skew["dep"]["iteration_ms"] > uni["dep"]["iteration_ms"] and skew["ratio"] > uni["ratio"]
    # the slow owner's GEMMs carry 1.5x the uniform pairs, the fast owner's 0.5x and it waits for the difference:
    # about 0.5x the uniform GEMM time per rank on average (the GEMM rate depends a little on the rows)
    g = uni["dep"]["breakdown_ms"]["expert_gemm"]
    assert skew["dep"]["breakdown_ms"]["expert_gemm"] == pytest.approx(g, rel=0.05)
    assert skew["dep"]["breakdown_ms"]["sync_wait"] == pytest.approx(0.5 * g, rel=0.1)
    assert simulate(small(**base, owner_load=(2, 6)))["dep"] == skew["dep"]  # only the relative loads count


@pytest.mark.parametrize("bad", [(1.0,), (1.0, 0.0), (1.0, float("nan")), [1.0, 1.0]])
def test_owner_load_errors(bad):
    with pytest.raises(ValueError, match="owner_load"):
        small(gpus=2, owner_load=bad)


@pytest.mark.parametrize("extra, message", [(["--owner-load", "1,2,3"], "expected 2 values"),
                                            (["--owner-load", "1,-2"], "numbers > 0"),
                                            (["--owner-load", "1,2", "--sweep"], "not with --sweep")])
def test_cli_owner_load_errors(extra, message, capsys):
    from dwdp_ops.sim.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--gpus", "2", *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ EPLB (DEP's slots)
# DWDP / DEP, DEP's iteration, sync wait and rows per rank, printed by the simulator before it had redundant expert
# slots (commit 94111a6): R = 0 must give them again. The rows with owner_load over uneven experts per rank (N = 3,
# 72) are those of the same model with owner_load's pairs conserved (tests/test_sim_edges.py): before, owner r's
# factor was owner_load[r] / mean(owner_load) on a share in proportion to its c_r experts, so the pairs summed to
# 256.5 / 256 (N = 3) and 256.86 / 256 (N = 72) of tokens x top-k (then 1.142885041663377, 267.3345216098902,
# 23.969452344595386, 28329.722849971105 and 2.3083463343125064, 444.5655627815472, 120.51571362154284,
# 103608.81061750502).
BEFORE_EPLB = [
    (dict(hardware="gb200", gpus=72, layers=5, cv=0.3, max_tokens=16384, iterations=4),
     (1.645847436699605, 56.35276807356119, 16.475987970933357, 98615.94100203717)),
    (dict(gpus=2, layers=5, cv=0.0, max_tokens=16384, iterations=4, owner_load=(0.55, 1.45)),
     (1.0855297298304323, 283.443755567509, 18.59240751952788, 16383.603867004065)),
    (dict(gpus=3, layers=5, ratio=0.8, max_tokens=16384, iterations=4, owner_load=(0.5, 1.0, 1.5)),
     (1.1413167779243618, 266.96768590800934, 23.667250667725924, 28335.23816735513)),
    (dict(gpus=72, layers=5, cv=0.1, max_tokens=16384, iterations=3, owner_load=(1.0,) * 71 + (3.0,)),
     (2.1903923702060357, 421.8487504662387, 111.05483592662956, 103988.02857749301)),
]


@pytest.mark.parametrize("kw, before", BEFORE_EPLB)
def test_no_redundant_experts_reproduces_the_simulator_before_eplb(kw, before):
    r = simulate(SimConfig(redundant_experts=0, **kw))
    got = (r["ratio"], r["dep"]["iteration_ms"], r["dep"]["breakdown_ms"]["sync_wait"],
           r["model"]["dep_rows_per_rank_per_layer"])
    assert got == pytest.approx(before, rel=1e-12, abs=0)
    e = r["model"]["dep_eplb"]
    assert e["redundant_experts"] == 0 and e["replicas_used"] == 0
    assert e["pairs_max_over_mean"] == e["owner_pairs_max_over_mean"]
    assert r["config"]["redundant_experts"] == 0


@pytest.mark.parametrize("gpus, kw", [(2, dict(owner_load=(0.5, 1.5))), (8, dict(cv=0.2)), (4, dict(ratio=0.8))])
def test_default_redundant_experts_is_zero_where_the_gpus_divide_256(gpus, kw):
    """The default is the smallest R that gives every rank the same slots: none where N divides 256, so every
    prediction at N = 2, 4, 8 ... (all the tables of docs/simulator.md) is the R = 0 one, bit for bit."""
    assert SimConfig(gpus=gpus).dep_redundant_experts() == 0
    default, none = simulate(small(gpus=gpus, **kw)), simulate(small(gpus=gpus, redundant_experts=0, **kw))
    assert default["config"]["redundant_experts"] is None and none["config"]["redundant_experts"] == 0
    assert (default["dwdp"], default["dep"], default["ratio"]) == (none["dwdp"], none["dep"], none["ratio"])
    assert default["model"]["dep_eplb"] == none["model"]["dep_eplb"]


NVL72 = dict(hardware="gb200", gpus=72, layers=5, cv=0.0, max_tokens=16384, iterations=2, overrides=SAME_GPUS)


def test_nvl72_needs_a_replica_for_each_of_its_40_four_expert_ranks():
    """At N = 72, 40 ranks hold 4 experts and 32 hold 3 (4 / (256 / 72) = 1.125 x the mean pairs). The default
    R = 32 gives every rank 4 slots, but whole experts of equal load cannot even that out: each 4-expert rank needs a
    replica of its own and only 32 exist, so DEP is unchanged; R = 40 (4 or 5 slots) or 104 (5 each) balance every
    rank's pairs and expert GEMM time (CV 0, identical GPUs: the only sync wait is the GEMMs'), and DWDP / DEP drops
    below the R = 0 figure. DWDP is not changed by DEP's slots."""
    assert SimConfig(gpus=72).dep_redundant_experts() == 32
    r0 = simulate(SimConfig(redundant_experts=0, **NVL72))
    assert r0["model"]["dep_eplb"]["slots_per_rank"] == [3, 4]
    assert r0["model"]["dep_eplb"]["pairs_max_over_mean"] == pytest.approx(1.125)
    g0 = r0["dep"]["breakdown_ms"]["expert_gemm"]
    assert r0["dep"]["breakdown_ms"]["sync_wait"] > 0.05 * g0  # the 3-expert ranks wait for the 4-expert ones
    runs = {R: simulate(SimConfig(redundant_experts=R, **NVL72)) for R in (None, 39, 40, 104)}
    for R in (None, 39):  # too few replicas: the fullest ranks keep their 4 experts' pairs
        e = runs[R]["model"]["dep_eplb"]
        assert e["replicas_used"] == 0 and e["pairs_max_over_mean"] == pytest.approx(1.125)
        assert (runs[R]["dep"], runs[R]["ratio"]) == (r0["dep"], r0["ratio"])
    assert runs[None]["model"]["dep_eplb"]["slots_per_rank"] == [4, 4]
    for R, slots in ((40, [4, 5]), (104, [5, 5])):
        r, e = runs[R], runs[R]["model"]["dep_eplb"]
        assert e["redundant_experts"] == R and e["slots_per_rank"] == slots and e["replicas_used"] == 40
        assert e["pairs_max_over_mean"] == pytest.approx(1.0, rel=1e-12)
        assert r["dep"]["breakdown_ms"]["sync_wait"] == pytest.approx(0.0, abs=1e-9 * g0)  # GEMMs balanced
        assert r["dep"]["breakdown_ms"]["expert_gemm"] == pytest.approx(g0, rel=1e-9)  # the same pairs, moved
        assert r["dep"]["iteration_ms"] < r0["dep"]["iteration_ms"] and r["ratio"] < r0["ratio"]
        assert r["model"]["dep_rows_per_rank_per_layer"] < r0["model"]["dep_rows_per_rank_per_layer"]
        assert r["dwdp"] == r0["dwdp"]


def test_redundant_experts_even_out_a_skewed_owner_as_far_as_their_replicas_reach():
    """Owner loads 0.5 / 1.5 at N = 2: the hot owner's 128 experts carry 1.5 units each (k / E pairs per token), 192
    against a mean of 128. Its replicas sit in the cold rank's redundant slots (R / 2 of them; those on the hot rank
    carry nothing), each taking at most one expert's pairs: R = 16 moves 8 x 1.5 (level 180 = 1.40625 x the mean),
    R = 85 gives the cold rank the 43 slots that 64 / 1.5 needs and evens the pairs out."""
    base = dict(gpus=2, cv=0.0, max_tokens=32768, iterations=2, overrides=SAME_GPUS, owner_load=(0.5, 1.5))
    runs = {R: simulate(small(redundant_experts=R, **base)) for R in (0, 16, 84, 85, 128)}
    wait = {R: r["dep"]["breakdown_ms"]["sync_wait"] for R, r in runs.items()}
    e = {R: r["model"]["dep_eplb"] for R, r in runs.items()}
    assert e[0]["pairs_max_over_mean"] == pytest.approx(1.5) and e[0]["replicas_used"] == 0
    assert e[16]["pairs_max_over_mean"] == pytest.approx(180 / 128) and e[16]["replicas_used"] == 8
    assert e[16]["slots_per_rank"] == [136, 136]
    assert 1.0 < e[84]["pairs_max_over_mean"] < e[16]["pairs_max_over_mean"]  # 42 replicas: 63 of the 64 units
    for R in (85, 128):
        assert e[R]["pairs_max_over_mean"] == pytest.approx(1.0, rel=1e-12) and e[R]["replicas_used"] == 43
    assert wait[0] > wait[16] > wait[84] and wait[85] == wait[128]
    assert 0.6 * wait[0] < wait[16] < 0.9 * wait[0]  # partly: the excess shrinks by 8 x 1.5 of 64 units
    # even pairs leave a little wait: the cold rank runs them over 128 + 43 experts, fewer rows each (EPLB balances
    # pairs, not GEMM time)
    assert wait[85] < 0.05 * wait[0]
    assert runs[85]["ratio"] < runs[16]["ratio"] < runs[0]["ratio"]
    assert all(r["dwdp"] == runs[0]["dwdp"] for r in runs.values())


@pytest.mark.parametrize("gpus, R", [(72, 0), (72, 32), (72, 200), (3, 2), (5, 7), (2, 300), (7, 3), (256, 256)])
@pytest.mark.parametrize("seed", [0, 1])
def test_eplb_keeps_every_pair_and_never_loads_a_rank_above_its_level(gpus, R, seed):
    from dwdp_ops.sim.model import dep_eplb, dep_expert_counts

    home = dep_expert_counts(256, gpus)
    f = np.random.default_rng([seed, gpus]).lognormal(0.0, 0.5, gpus)
    load = list(f / f.mean())
    e = dep_eplb(home, load, R)
    P = [n * x for n, x in zip(home, load)]
    L = [g * n for g, n in zip(e["factor"], home)]
    M = e["level"]
    assert sum(e["slots"]) == 256 + R and max(e["slots"]) - min(e["slots"]) <= max(home) - min(home) + 1
    assert sum(L) == pytest.approx(sum(P), rel=1e-12)
    assert max(L) == pytest.approx(max(M, sum(P) / gpus), rel=1e-12)
    for p, x in zip(P, L):
        assert min(p, M) * (1 - 1e-12) <= x <= M * (1 + 1e-12)
    assert e["replicas_used"] <= R
    assert all(n <= c <= s for n, c, s in zip(home, e["gemm_experts"], e["slots"]))
    for p, x, n, c in zip(P, L, home, e["gemm_experts"]):  # a rank holds replicas where it takes moved pairs
        assert (c > n) == (x > p * (1 + 1e-12)), (p, x, n, c)
    if e["replicas_used"] == 0:
        assert e["factor"] == load and e["gemm_experts"] == home and M == max(P)
    if R == -256 % gpus:  # the even layout: every rank ceil(256 / N) slots
        assert e["slots"] == [-(-256 // gpus)] * gpus


@pytest.mark.parametrize("kw", [dict(redundant_experts=-1), dict(redundant_experts=True), dict(redundant_experts=1.5),
                                dict(redundant_experts="3"), dict(redundant_experts=257),
                                dict(gpus=1, redundant_experts=1), dict(gpus=72, redundant_experts=71 * 256 + 1)])
def test_bad_redundant_experts_are_refused(kw):
    with pytest.raises(ValueError, match=r"redundant_experts must be None or an integer in \[0, "):
        small(**kw)
    SimConfig(gpus=kw.get("gpus", 2), redundant_experts=(kw.get("gpus", 2) - 1) * 256)  # the top is allowed


@pytest.mark.parametrize("argv, message", [
    (["--redundant-experts", "-1"], "expected an integer >= 0, got -1"),
    (["--redundant-experts", "1.5"], "expected an integer >= 0, got '1.5'"),
    (["--redundant-experts", "two"], "expected an integer >= 0, got 'two'"),
    (["--redundant-experts", "257"], "expected an integer in [0, (--gpus - 1) x 256 = 256]"),
    (["--gpus", "1", "--redundant-experts", "1"], "expected an integer in [0, (--gpus - 1) x 256 = 0]"),
    (["--validate", "FILE", "--redundant-experts", "0"], "not with --validate"),
])
def test_cli_bad_redundant_experts_exit_2_with_one_error_line(argv, message, tmp_path, capsys):
    f = tmp_path / "e2e.json"
    f.write_text("{}")
    code, out, err = run_main([str(f) if a == "FILE" else a for a in argv] + ["--layers", "5"] * ("--validate" not in
                                                                                                  argv), capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and out == "" and len(errors) == 1 and "Traceback" not in err, err
    assert "argument --redundant-experts: " in errors[0] and message in errors[0], errors[0]


def test_cli_redundant_experts_reach_the_simulation_and_the_sweep(capsys):
    argv = ["--hardware", "gb200", "--gpus", "72", "--layers", "5", "--iterations", "2", "--cv", "0",
            "--rank-slowdown", "0", "--max-tokens", "16384"]
    runs = {}
    for extra in ([], ["--redundant-experts", "0"], ["--redundant-experts", "104"]):
        code, out, err = run_main(argv + extra + ["--json"], capsys)
        assert code == 0, err
        runs[tuple(extra)] = json.loads(out)
    assert runs[()]["model"]["dep_eplb"]["redundant_experts"] == 32 and runs[()]["config"]["redundant_experts"] is None
    assert runs[("--redundant-experts", "0")]["model"]["dep_eplb"]["slots_per_rank"] == [3, 4]
    even = runs[("--redundant-experts", "104")]
    assert even["model"]["dep_eplb"]["slots_per_rank"] == [5, 5] and even["config"]["redundant_experts"] == 104
    assert even["ratio"] < runs[("--redundant-experts", "0")]["ratio"] == runs[()]["ratio"]
    code, out, err = run_main(argv + ["--redundant-experts", "104"], capsys)
    assert code == 0 and "DEP: 3-4 experts per rank + 104 redundant slots (5 a rank, 40 replicas carrying pairs)" \
        in out, err
    assert "fullest rank 1.000 x the mean pairs (1.125 without replicas)" in out
    rows = {R: sweep("gb200", 72, cvs=(0.0,), budgets=(16384,), ratio=None, layers=5, iterations=2,
                     overrides=SAME_GPUS, redundant_experts=R)[0] for R in (0, 104)}
    assert rows[104]["ratio"] == pytest.approx(even["ratio"]) and rows[104]["ratio"] < rows[0]["ratio"]


def test_validation_simulates_the_benchmarks_dep_without_redundant_experts():
    """bench/e2e_dwdp_vs_dep.py's DEP places every expert once: a point is simulated with R = 0 whatever the default
    (at N = 3 the default R = 2 would lower a skewed owner's pairs)."""
    base = dict(gpus=3, layers=5, ratio=0.8, max_tokens=16384, iterations=2, owner_load=(0.5, 1.0, 1.5))
    none, default = simulate(SimConfig(redundant_experts=0, **base)), simulate(SimConfig(**base))
    assert default["model"]["dep_eplb"]["replicas_used"] > 0 and default["ratio"] != none["ratio"]
    point = {"mode": "dep", "N": 3, "ratio": 0.8, "max_tokens": 16384, "owner_load": [0.5, 1.0, 1.5],
             "iteration_ms": 100.0, "tps_per_gpu": 1000.0}
    v = validate([point], layers=5, iterations=2)
    assert v["points"][0]["predicted_iteration_ms"] == none["dep"]["slowest_rank_iteration_ms"]


@pytest.mark.parametrize("argv, option, bound", [
    (["--max-tokens", "100000000000000"], "--max-tokens", "[1, 1048576]"),
    (["--max-tokens", "10000000000"], "--max-tokens", "[1, 1048576]"),
    (["--max-tokens", "1048577"], "--max-tokens", "[1, 1048576]"),
    (["--isl", "10000000", "--max-tokens", "1", "--iterations", "1"], "--isl", "[1, 1048576]"),
    (["--isl", "4", "--max-tokens", "8192"], "--max-tokens", "1024 x --isl (4096"),
    (["--isl", "16", "--max-tokens", "16384", "--sweep"], "--max-tokens", "1024 x --isl (16384"),
])
def test_cli_isl_and_max_tokens_have_upper_bounds(argv, option, bound, capsys):
    """Parsed and checked only (``check_args``): nothing is drawn, so a value the bound misses fails here at once."""
    ap = cli.build_parser()
    with pytest.raises(SystemExit) as e:
        cli.check_args(ap, ap.parse_args(argv))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(errors) == 1, err
    assert f"argument {option}: " in errors[0] and bound in errors[0], errors[0]
    for good in (["--isl", "1048576", "--max-tokens", "1048576"], ["--isl", "4", "--max-tokens", "4096"]):
        cli.check_args(ap, ap.parse_args(good))
    assert "at most 1048576" in ap.format_help()


@pytest.mark.parametrize("extra, option", [
    (["--plot", "PLOT"], "--plot"), (["--sweep"], "--sweep"), (["--gpus", "8"], "--gpus"),
    (["--gpus", "2"], "--gpus"),  # its default, given explicitly: still not used
    (["--cv", "0.3"], "--cv"), (["--ratio", "0.8"], "--ratio"), (["--isl", "8192"], "--isl"),
    (["--max-tokens", "16384"], "--max-tokens"), (["--layers", "5"], "--layers"),
    (["--dense-layers", "1"], "--dense-layers"), (["--iterations", "4"], "--iterations"), (["--seed", "0"], "--seed"),
])
def test_cli_validate_refuses_the_options_it_does_not_use(extra, option, tmp_path, capsys):
    f = tmp_path / "e2e.json"
    f.write_text("{}")
    extra = [str(tmp_path / "x.png") if x == "PLOT" else x for x in extra]
    code, out, err = run_main(["--validate", str(f), *extra], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and out == "" and len(errors) == 1, err
    assert "argument --validate: not with " in errors[0] and option in errors[0], errors[0]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(not E2E.is_file(), reason="bench/results not here")
def test_cli_validate_takes_the_profile_options_and_json(tmp_path, capsys):
    data = json.loads(E2E.read_text())
    f = tmp_path / "e2e.json"
    f.write_text(json.dumps(dict(data, points=data["points"][:2])))
    code, out, err = run_main(["--validate", str(f), "--hardware", "h200", "--calibration", str(H200_FILE), "--json",
                               "--fetch-gbps", "300", "--rank-slowdown", "0"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["points"]) == 2


# ------------------------------------------------------------------------------------------------------------ docs
DOC = ROOT / "docs" / "simulator.md"


def _doc_validation_rows(v: dict) -> list[str]:
    """``validate_e2e``'s points as the rows of docs/simulator.md's validation tables."""
    rows = []
    for p in v["points"]:
        name = f"cv {p['cv']:g}" if "cv" in p else f"ratio {p['ratio']:g}"
        mc, pc = p["measured_categories_ms"], p["predicted_categories_ms"]
        cells = " | ".join(f"{mc[c]:.1f} / {pc[c]:.1f}" for c in ("attn", "experts", "other", "comm", "sync_wait"))
        rows.append(f"| {p['max_tokens']} | {name} | {p['mode'].upper()} | {p['iteration_ms']:.1f} / "
                    f"{p['predicted_iteration_ms']:.1f} ({100 * p['rel_err_iteration_ms']:+.1f} %) | "
                    f"{p['tps_per_gpu']:.0f} / {p['predicted_tps_per_gpu']:.0f} ({100 * p['rel_err_tps_per_gpu']:+.1f} %)"
                    f" | {cells} | {'yes' if p['within_tolerance'] else '**no**'} |")
    return rows


def test_docs_quote_what_the_simulator_prints():
    """The figures of docs/simulator.md that its commands print: the H200 latency changes, the GB200 table's
    iteration and overlapped copy, and each validation table, under the command that prints it."""
    doc = DOC.read_text()
    m = re.search(r"DWDP / DEP - 1: \*\*(\S+) % \(N = 2\), (\S+) % \(N = 4\), (\S+) % \(N = 8\)\*\*", doc)
    assert m, "the H200 latency sentence"
    for n, quoted in zip((2, 4, 8), m.groups()):
        r = simulate(SimConfig(hardware="h200", gpus=n, isl=8192, ratio=0.8, max_tokens=32768, layers=61))
        assert quoted == f"{100 * r['iteration_latency_change']:.1f}", n
    g = simulate(SimConfig(hardware="gb200", gpus=4, isl=8192, ratio=0.8, max_tokens=32768, layers=61))
    assert (f"| **iteration** | **1319.85** | **{g['dep']['iteration_ms']:.1f}** | **1131.58** | "
            f"**{g['dwdp']['iteration_ms']:.1f}** |") in doc
    assert f"| overlapped copy | 0 | 0 | 429.00 | {g['dwdp']['overlapped_copy_ms']:.1f} |" in doc
    assert "differ by < 1 %" not in doc
    for name in ("e2e_dwdp_vs_dep_H200_N2_first_run.json", "e2e_dwdp_vs_dep_H200_N2.json"):
        path = RESULTS / name
        if not path.is_file():
            continue
        command = f"`python -m dwdp_ops sim --validate bench/results/{name}`"
        captions = [i.start() for i in re.finditer(re.escape(command), doc)
                    if doc.find("| budget |", i.start()) - i.start() < 400]  # the command right above a table
        assert len(captions) == 1, name
        start = doc.index("| --- |", captions[0])
        table = [line for line in doc[start:].split("\n\n")[0].splitlines()[1:]]
        assert table == _doc_validation_rows(validate_e2e(json.loads(path.read_text()))), name



def test_docs_quote_the_redundant_expert_figures():
    """docs/simulator.md's EPLB figures: N = 72 on GB200 (5 layers, CV 0.3, 16K tokens; 8 and 32 iterations) at the
    default R = 32, at R = 0 and at R = 104, and the skewed N = 2 example at R = 16 / 32 / 79."""
    doc = " ".join(DOC.read_text().split())
    nvl = {(it, R): simulate(SimConfig(hardware="gb200", gpus=72, layers=5, cv=0.3, max_tokens=16384, iterations=it,
                                       redundant_experts=R))["ratio"] for it in (8, 32) for R in (None, 0, 104)}
    for it in (8, 32):
        assert f"{nvl[it, None]:.2f}" == f"{nvl[it, 0]:.2f}"
    assert (f"the figure stays {nvl[8, None]:.2f} ({nvl[32, None]:.2f}), the same as with R = 0" in doc)
    assert f"DWDP / DEP is {nvl[8, 104]:.2f} ({nvl[32, 104]:.2f} with 32 iterations" in doc
    quoted = []
    for R in (16, 32, 79):
        r = simulate(SimConfig(gpus=2, layers=5, cv=0.0, max_tokens=16384, owner_load=(0.55, 1.45),
                               redundant_experts=R))
        quoted.append((f"{r['model']['dep_eplb']['pairs_max_over_mean']:.3f}", f"{r['ratio']:.3f}",
                       f"{100 * r['dep']['shares']['sync_wait']:.1f}"))
    assert (f"`--redundant-experts 16` moves 8 of them ({quoted[0][0]} x the mean, DWDP / DEP 1.086 -> {quoted[0][1]}, "
            f"sync wait 6.6 -> {quoted[0][2]} %), 32 moves 16 ({quoted[1][0]}, {quoted[1][1]}), 79 gives the cold rank "
            f"the 40 slots the excess needs ({quoted[2][0]}, {quoted[2][1]}: the uniform figure)") in doc
