"""Regenerate the simulator's calibration files: ``h200.json`` from our measured ``bench/results`` and ``gb200.json``
from public figures plus the efficiencies measured on H200.

    python -m dwdp_ops.sim.calibrate [--results bench/results] [--out-dir DIR] [--profile h200|gb200|all] [--check]

``--check`` writes nothing and exits 1 if the files it would write differ from those in ``--out-dir`` (default: the
package's ``sim/calibration``). Every number in a file names where it came from (file and field, or source).

H200 (2 x H200 runs of 2026-11-30 and 2026-12-01, bf16 experts), from these files in ``--results``:
  attention_probe_H200.json       the attention core rate of ``models/attention.py``'s ``prefill_attention`` as
                                  ``auto`` runs it for mixed lengths (the per-request cuDNN loop, case
                                  ``packed:loop`` of the ``mix`` records: lengths uniform in [0.8 S, S]), one point
                                  per S at the FLOP-weighted length; the equal-length rate (``packed:dense``, one
                                  cuDNN call) recorded beside it (``attention_points``)
  deepseek_forward_H200_N2.json   dense GEMM rate; expert GEMM rate at 128 / 512 / 1024 rows per expert; the
                                  attention block's elementwise work (per-token time of the block minus the MLA
                                  projections at the dense rate and the core at the probe's equal-length rate:
                                  these rows are 16 requests of equal length); the MoE layers' other
                                  work (step - attention - expert GEMMs - fetch waits - modelled dense GEMMs, per
                                  MoE layer and token); the fetch rate measured inside the model while it computes;
                                  the per-rank speed spread (``rank_speed``: both ranks ran the same rows, so the
                                  slowest rank's step - wait over the rows with >= 16384 tokens, against the mean of
                                  ranks)
  prefetch_overlap_H200_N2.json   expert GEMM rate at 32 / 64 / 256 / 2048 rows per expert (torch.bmm, same shapes,
                                  within 1 % of the grouped GEMM where both measured); the GEMM slowdown under a
                                  concurrent copy at 16K tokens (the copy outlasts the GEMM: fully overlapped)
  dispatch_bandwidth_H200_N2.json our dispatch + combine (all SMs): lat and B by least squares of
                                  time = 2 lat + payload / B over the records with >= 1024 tokens per rank
Monotone time: expert per-expert times and MoE-others totals are made non-decreasing in rows / tokens (running
maximum; ``measured_*`` keeps the raw value), which only moves points that measurement noise put out of order.

GB200 (one Blackwell GPU of GB200 NVL72, TensorRT-LLM, DeepSeek-R1 NVFP4: the paper's setting; nothing measured by
us). Compute: effective rates from the paper's own DEP4 breakdown (Table 3 read as ms per iteration; the expected
workload of its setting, 4 requests of U[6554, 8192] tokens per rank and iteration): attention core FLOPs / 269.67 ms,
expert pairs x 88 MFLOP / 342.40 ms (HBM-bound below the knee: 8 TB/s x the HBM efficiency our H200 GEMMs reach),
dense-GEMM FLOPs / 177.50 ms, others 241.69 ms per token and layer. DEP4's compute is therefore the paper's by
construction; what the simulator predicts on its own is communication, synchronisation wait, the fetch and how the
interference falls. Links from public figures: fetch = NVLink 5's 900 GB/s per direction x the fraction of H200's
NVLink our copy engine reaches inside the model; dispatch from DeepEP's normal kernels on H100 (dispatch 329 /
combine 287 GB/s of 450) and pplx-kernels' one-token latency (42 us); interference: the paper's per-category DWDP4 /
DEP4 ratios, applied while a copy is in flight. Each entry's ``source`` states its assumption.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from statistics import mean

import numpy as np

from .._checks import is_finite_real, is_int
from ..models.deepseek_r1.config import DeepSeekConfig
from .costs import SCHEMA, R1Ops, validate_calibration
from .paper import PAPER

__all__ = ["gb200_calibration", "h200_calibration", "main", "paper_workload"]

PACKAGE_DIR = Path(__file__).resolve().parent / "calibration"
REPO_RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results"

H200_HBM_GBPS = 4800.0  # H200 HBM3e (NVIDIA H200 datasheet)
GB200 = {"hbm_gbps": 8000.0, "nvlink_gbps": 900.0}  # one GPU of GB200 NVL72
GB200_SPEC = ("HBM3e 8 TB/s per GPU; NVLink 5 1.8 TB/s bidirectional = 900 GB/s per direction (NVIDIA GB200 NVL72 "
              "specification; https://glennklockwood.com/garden/processors/B200)")


def _r(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def _load(results: Path, name: str) -> dict:
    """The JSON object of ``results / name``, its fields checked (``_CHECKS``): ValueError naming the file and the
    field that is missing or wrong, instead of a KeyError / TypeError / IndexError where it is used."""
    path = results / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the H200 calibration is built from it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    _CHECKS[name](data, str(path))
    return data


_MISSING = object()


def _bad(file: str, field: str, want: str, got: object) -> None:
    raise ValueError(f"{file}: {field} must be {want}, got {'nothing (missing)' if got is _MISSING else repr(got)}")


def _objects(d: dict, key: str, file: str, field: str, empty: bool = False) -> list[dict]:
    v = d.get(key, _MISSING)
    if not isinstance(v, list) or (not v and not empty):
        _bad(file, field, "a list of objects" if empty else "a non-empty list of objects", v)
    for i, x in enumerate(v):
        if not isinstance(x, dict):
            _bad(file, f"{field}[{i}]", "an object", x)
    return v


def _number(d: dict, key: str, file: str, field: str, lo: float = 0.0, strict: bool = True) -> None:
    v = d.get(key, _MISSING)
    if not (is_finite_real(v) and (v > lo if strict else v >= lo)):
        _bad(file, field, f"a finite number {'>' if strict else '>='} {lo:g}", v)


INT64_MAX = 2**63 - 1  # the largest integer read: 10**400 had raised OverflowError (float(T)), ZeroDivisionError


def _integer(d: dict, key: str, file: str, field: str, lo: int = 1) -> None:
    v = d.get(key, _MISSING)
    if not (is_int(v) and lo <= v <= INT64_MAX):
        _bad(file, field, f"an integer in [{lo}, 2**63 - 1]", v)


def _date(d: dict, file: str) -> None:
    if "date" in d and not isinstance(d["date"], str):
        _bad(file, "date", "a string", d["date"])


def _check_probe(p: dict, f: str) -> None:
    _date(p, f)
    for i, r in enumerate(_objects(p, "records", f, "records")):
        w = f"records[{i}]"
        if not isinstance(r.get("kind"), str):
            _bad(f, f"{w}.kind", "a string ('mix' or 'equal')", r.get("kind", _MISSING))
        _integer(r, "S", f, f"{w}.S")
        cases = r.get("cases", _MISSING)
        if not isinstance(cases, dict):
            _bad(f, f"{w}.cases", "an object", cases)
        case = {"mix": "packed:loop", "equal": "packed:dense"}.get(r["kind"])
        if case not in cases:
            continue
        if not isinstance(cases[case], dict):
            _bad(f, f"{w}.cases[{case!r}]", "an object", cases[case])
        _number(cases[case], "tflops", f, f"{w}.cases[{case!r}].tflops")
        if r["kind"] == "mix":
            _number(cases[case], "median_ms", f, f"{w}.cases[{case!r}].median_ms")
            L = r.get("lengths", _MISSING)
            if not (isinstance(L, list) and L and all(is_int(x) and 1 <= x <= INT64_MAX for x in L)):
                _bad(f, f"{w}.lengths", "a non-empty list of integers in [1, 2**63 - 1]", L)
        else:
            _integer(r, "requests", f, f"{w}.requests")


def _check_forward(d: dict, f: str) -> None:
    _date(d, f)
    _integer(d, "layers", f, "layers")
    _integer(d, "moe_layers", f, "moe_layers")
    if d["moe_layers"] > d["layers"]:
        _bad(f, "moe_layers", f"at most layers ({d['layers']})", d["moe_layers"])
    for i, rk in enumerate(_objects(d, "ranks", f, "ranks")):
        _number(rk, "dense_tflops", f, f"ranks[{i}].dense_tflops")
        for j, row in enumerate(_objects(rk, "rows", f, f"ranks[{i}].rows")):
            w = f"ranks[{i}].rows[{j}]"
            for key in ("tokens", "requests"):
                _integer(row, key, f, f"{w}.{key}")
            for key in ("step_ms", "attn_ms", "experts_ms", "expert_tflops", "fetch_GBps"):
                _number(row, key, f, f"{w}.{key}")
            _number(row, "wait_ms", f, f"{w}.wait_ms", strict=False)
    if not any(row["tokens"] >= RANK_SPEED_MIN_TOKENS for rk in d["ranks"] for row in rk["rows"]):
        _bad(f, "ranks[*].rows[*].tokens", f"at least {RANK_SPEED_MIN_TOKENS} in some row (the fetch rate is read "
             "from those rows)", sorted({row["tokens"] for rk in d["ranks"] for row in rk["rows"]}))


def _check_overlap(d: dict, f: str) -> None:
    for i, rk in enumerate(_objects(d, "ranks", f, "ranks")):
        _number(rk, "fetch_ce_gbps", f, f"ranks[{i}].fetch_ce_gbps")
        for j, x in enumerate(_objects(rk, "exposed", f, f"ranks[{i}].exposed", empty=True)):
            _integer(x, "tokens", f, f"ranks[{i}].exposed[{j}].tokens")
            _number(x, "gemm_tflops", f, f"ranks[{i}].exposed[{j}].gemm_tflops")
        for j, x in enumerate(_objects(rk, "slowdown", f, f"ranks[{i}].slowdown")):
            w = f"ranks[{i}].slowdown[{j}]"
            _integer(x, "tokens", f, f"{w}.tokens")
            _number(x, "slowdown_ce", f, f"{w}.slowdown_ce", lo=-1.0)
            if not isinstance(x.get("fetch_longer_than_gemm"), bool):
                _bad(f, f"{w}.fetch_longer_than_gemm", "true or false", x.get("fetch_longer_than_gemm", _MISSING))
    if not any(x["fetch_longer_than_gemm"] for rk in d["ranks"] for x in rk["slowdown"]):
        _bad(f, "ranks[*].slowdown[*].fetch_longer_than_gemm", "true somewhere (the interference is read from "
             "those points)", False)


def _check_dispatch(d: dict, f: str) -> None:
    payloads = set()
    for i, r in enumerate(_objects(d, "records", f, "records")):
        _integer(r, "tokens_per_rank", f, f"records[{i}].tokens_per_rank")
        if r["tokens_per_rank"] < 1024:  # only these are fitted
            continue
        ours = r.get("modes", {}).get("ours", _MISSING) if isinstance(r.get("modes"), dict) else _MISSING
        if not isinstance(ours, dict):
            _bad(f, f"records[{i}].modes.ours", "an object", ours)
        pb = ours.get("payload_bytes_per_rank", _MISSING)
        if not (isinstance(pb, list) and pb and all(is_finite_real(x) and x > 0 for x in pb)):
            _bad(f, f"records[{i}].modes.ours.payload_bytes_per_rank", "a non-empty list of finite numbers > 0", pb)
        _number(ours, "time_ms", f, f"records[{i}].modes.ours.time_ms")
        payloads.add(max(pb))
    if len(payloads) < 2:
        _bad(f, "records[tokens_per_rank>=1024]", "at least 2 records of different payloads (a line is fitted "
             "through them)", len(payloads))


def _check_fetch(d: dict, f: str) -> None:
    _integer(_objects(d, "records", f, "records")[0], "expert_bytes", f, "records[0].expert_bytes")


PROBE = "attention_probe_H200.json"
LATER_PROBE = "attention_probe_H200_with_flex.json"  # a later run of the same probe at S = 1024 and 8192 only
_CHECKS = {PROBE: _check_probe, LATER_PROBE: _check_probe, "deepseek_forward_H200_N2.json": _check_forward,
           "prefetch_overlap_H200_N2.json": _check_overlap, "dispatch_bandwidth_H200_N2.json": _check_dispatch,
           "fetch_bandwidth_H200_N2_bfloat16.json": _check_fetch}


def attention_points(results: Path, ops: R1Ops) -> tuple[list[dict], list[dict], str]:
    """The attention core rate of ``models/attention.py``'s ``prefill_attention`` under ``auto`` from
    ``bench/results/attention_probe_H200.json``: ``core_points`` from the ``mix`` records (lengths uniform in
    [0.8 S, S], up to 32768 tokens), case ``packed:loop`` (what auto runs for mixed lengths: one cuDNN SDPA call per
    request), each placed at the FLOP-weighted length of its requests (sum L^3 / sum L^2, the length whose rate the
    record's time averages); ``equal_points`` from the ``equal`` records, case ``packed:dense`` (what auto runs for
    equal lengths: one cuDNN call over views), at S. Returns both lists and a description for the ``source``."""
    probe = _load(results, PROBE)
    P = f"bench/results/{PROBE}"
    core, equal = [], []
    for r in sorted(probe["records"], key=lambda r: (r["kind"], r["S"])):
        if r["kind"] == "mix" and "packed:loop" in r["cases"]:
            L = np.array(r["lengths"], dtype=float)
            s_eff = int(round(float((L**3).sum() / (L**2).sum())))
            flops = float(ops.core_flops(0, L).sum())
            rate = flops / (r["cases"]["packed:loop"]["median_ms"] * 1e-3) / 1e12
            core.append({"seq_len": s_eff, "tflops": _r(rate), "measured_tflops": _r(r["cases"]["packed:loop"]["tflops"]),
                         "requests": len(L), "lengths": [int(L.min()), int(L.max())],
                         "source": f"{P} records[S={r['S']}, kind=mix].cases['packed:loop'] ({len(L)} requests of "
                                   f"{int(L.min())}-{int(L.max())} tokens, {int(L.sum())} in all; seq_len: sum L^3 / "
                                   "sum L^2; rate: core FLOPs of costs.R1Ops / median_ms)"})
        elif r["kind"] == "equal" and "packed:dense" in r["cases"]:
            equal.append({"seq_len": int(r["S"]), "tflops": _r(r["cases"]["packed:dense"]["tflops"]),
                          "source": f"{P} records[S={r['S']}, kind=equal].cases['packed:dense'] ({r['requests']} "
                                    f"requests of {r['S']} tokens, one cuDNN call)"})
    if not core or not equal:
        raise ValueError(f"{P} has no mix records with packed:loop or no equal records with packed:dense")
    core.sort(key=lambda p: p["seq_len"])
    equal.sort(key=lambda p: p["seq_len"])
    desc = (f"{P} ({probe.get('date', '?')}, torch {probe.get('torch', '?')}, cuDNN {probe.get('cudnn', '?')}, one "
            f"H200; S = {', '.join(str(r['S']) for r in probe['records'] if r['kind'] == 'mix')}): the rate of "
            "prefill_attention's per-request cuDNN loop ('packed:loop', what auto runs when a step's requests have "
            "different lengths) on requests uniform in [0.8 S, S], placed at the FLOP-weighted length; "
            "interpolated linearly in length between the points, constant outside them (below "
            f"{core[0]['seq_len']} and above {core[-1]['seq_len']} tokens)")
    later = results / LATER_PROBE
    if later.is_file():
        lp = _load(results, LATER_PROBE)
        diffs = []
        for r in lp["records"]:
            if r["kind"] == "mix" and "packed:loop" in r["cases"]:
                ref = next((x for x in probe["records"] if x["kind"] == "mix" and x["S"] == r["S"]), None)
                if ref is not None:
                    diffs.append(f"S={r['S']}: {r['cases']['packed:loop']['tflops']:.0f} against "
                                 f"{ref['cases']['packed:loop']['tflops']:.0f}")
        if diffs:
            desc += (f"; a later run with only S = 1024 and 8192 (bench/results/{LATER_PROBE}) measured "
                     f"packed:loop {', '.join(diffs)} TFLOP/s (not used: it lacks 2048 and 4096)")
    return core, equal, desc


def h200_calibration(results: Path = REPO_RESULTS) -> dict:
    """The H200 profile from the measured result files (module docstring)."""
    fwd = _load(results, "deepseek_forward_H200_N2.json")
    ovl = _load(results, "prefetch_overlap_H200_N2.json")
    dsp = _load(results, "dispatch_bandwidth_H200_N2.json")
    fb = _load(results, "fetch_bandwidth_H200_N2_bfloat16.json")
    if fwd.get("dtype", "bfloat16") != "bfloat16":  # bench/deepseek_forward.py --dtype float8_e4m3fn writes *_fp8.json
        raise ValueError(f"deepseek_forward_H200_N2.json has {fwd['dtype']} experts; the h200 profile is bf16")
    cfg = DeepSeekConfig.r1()
    ops = R1Ops(cfg)
    E, k = cfg.n_routed_experts, cfg.n_activated_experts
    F = "bench/results/deepseek_forward_H200_N2.json"
    O = "bench/results/prefetch_overlap_H200_N2.json"

    dense = mean(r["dense_tflops"] for r in fwd["ranks"])
    rows_by_T: dict[int, list[dict]] = {}
    for rank in fwd["ranks"]:
        for row in rank["rows"]:
            rows_by_T.setdefault(row["tokens"], []).append(row)
    Ts = sorted(rows_by_T)

    # expert GEMM rate against rows per expert (m = T k / E over the composite view of all E experts)
    pts = {}
    for T in Ts:
        pts[T * k // E] = (mean(r["expert_tflops"] for r in rows_by_T[T]),
                           f"{F} ranks[*].rows[tokens={T}].expert_tflops (mean of ranks; torch._grouped_mm bf16)")
    for T in sorted({x["tokens"] for x in ovl["ranks"][0]["exposed"]}):
        m = T * k // E
        if m not in pts:
            vals = [x["gemm_tflops"] for rk in ovl["ranks"] for x in rk["exposed"] if x["tokens"] == T]
            pts[m] = (mean(vals), f"{O} ranks[*].exposed[tokens={T}].gemm_tflops (mean of ranks; torch.bmm fp16)")
    expert_points, t_prev = [], 0.0
    for m in sorted(pts):
        r, src = pts[m]
        t = m / r  # proportional to one expert's time
        used = _r(r) if t >= t_prev else math.floor(m / t_prev * 1e3) / 1e3  # rounded down: stays monotone
        t_prev = max(m / used, t_prev)
        expert_points.append({"rows_per_expert": m, "tflops": used, "measured_tflops": _r(r), "source": src})

    # attention core: the rate of models/attention.py's prefill_attention as ``auto`` runs it, from the probe
    core_points, equal_points, att_ok = attention_points(results, ops)
    # attention block: per-token, per-layer time of deepseek_forward's rows (16 requests of equal length S: auto ran
    # one cuDNN call, the probe's "packed:dense"); what is left after the projections at the dense rate and the core
    # at the equal-length rate is the block's elementwise work (norms, RoPE, cache writes, concatenations, copies)
    proj_ns = ops.proj_flops_per_token / (dense * 1e12) * 1e9
    eq_s = np.array([p["seq_len"] for p in equal_points], dtype=float)
    eq_r = np.array([p["tflops"] for p in equal_points], dtype=float)
    resid, resid_src = {}, []
    for T in Ts:
        rs = rows_by_T[T]
        s = T / rs[0]["requests"]
        ti = mean(r["attn_ms"] for r in rs) / (fwd["layers"] * T) * 1e6  # ns per token per layer
        core_ns = float(ops.core_flops(0, s)) / s / (float(np.interp(s, eq_s, eq_r)) * 1e12) * 1e9
        resid[T] = ti - proj_ns - core_ns
        resid_src.append(f"S={s:.0f}: {ti:.4g} - {proj_ns:.4g} - {core_ns:.4g} = {resid[T]:.4g} ns"
                         + (" (S below the probe's lengths: core at its shortest point's rate)" if s < eq_s[0] else ""))
    used_T = [T for T in Ts if T / rows_by_T[T][0]["requests"] >= eq_s[0]] or Ts
    attn_others = mean(resid[T] for T in used_T)

    # others of a MoE layer, per token: what the step spends outside attention, expert GEMMs, waits and dense GEMMs
    n_moe, n_dense = fwd["moe_layers"], fwd["layers"] - fwd["moe_layers"]
    lm_head = 2.0 * cfg.dim * 8192  # the benchmark's vocabulary cut
    others_points, tot_prev = [], 0.0
    for T in Ts:
        rs = rows_by_T[T]
        rem = mean(r["step_ms"] - r["attn_ms"] - r["experts_ms"] - r["wait_ms"] for r in rs)
        dense_ms = (T * (n_dense * ops.dense_mlp_flops_per_token + n_moe * ops.shared_flops_per_token)
                    + rs[0]["requests"] * lm_head) / (dense * 1e12) * 1e3
        ns = (rem - dense_ms) / (n_moe * T) * 1e6
        used = _r(ns) if ns * T >= tot_prev else math.ceil(tot_prev / T * 1e3) / 1e3  # rounded up: monotone
        tot_prev = max(tot_prev, used * T)
        others_points.append({"tokens": T, "ns_per_token": used, "measured_ns_per_token": _r(ns),
                              "source": f"{F} rows[tokens={T}]: step_ms - attn_ms - experts_ms - wait_ms - modelled "
                                        f"dense GEMMs ({dense_ms:.3g} ms), per MoE layer ({n_moe}) and token (mean of "
                                        "ranks)"})

    rank_speed = _rank_speed(fwd, F)

    fetch_rows = [r for T in Ts if T >= 16384 for r in rows_by_T[T]]
    fetch = min(r["fetch_GBps"] for r in fetch_rows)
    copy_alone = min(r["fetch_ce_gbps"] for r in ovl["ranks"])

    recs = [r for r in dsp["records"] if r["tokens_per_rank"] >= 1024]
    x = np.array([max(r["modes"]["ours"]["payload_bytes_per_rank"]) for r in recs], dtype=float)
    y = np.array([r["modes"]["ours"]["time_ms"] for r in recs], dtype=float)
    slope, icpt = np.polyfit(x, y, 1)
    disp_gbps, lat_us = 1.0 / slope / 1e6, icpt / 2 * 1e3

    slow = [s["slowdown_ce"] for rk in ovl["ranks"] for s in rk["slowdown"] if s["fetch_longer_than_gemm"]]
    slow_T = sorted({s["tokens"] for rk in ovl["ranks"] for s in rk["slowdown"] if s["fetch_longer_than_gemm"]})
    interference = _r(mean(slow), 4)
    expert_bytes = fb["records"][0]["expert_bytes"]

    cal = {
        "schema": SCHEMA,
        "hardware": "h200",
        "description": "NVIDIA H200 SXM (NVLink 18 links, NVSwitch), DeepSeek-R1 with bf16 experts, our kernels: "
                       f"measured on 2 x H200 (deepseek_forward {fwd.get('date', '?')[:10]}, attention probe "
                       f"{_load(results, PROBE).get('date', '?')[:10]}, the other files 2026-11-30; driver 580.159.04, "
                       "CUDA runtime 13.0)",
        "generated_by": "python -m dwdp_ops.sim.calibrate --profile h200 (from bench/results)",
        "weights": {"expert_bytes": expert_bytes, "param_bytes": 2,
                    "source": "bench/results/fetch_bandwidth_H200_N2_bfloat16.json records[0].expert_bytes "
                              "(3 x 7168 x 2048 bf16)"},
        "dense_gemm": {"tflops": _r(dense),
                       "source": f"{F} ranks[*].dense_tflops (bf16 8192^3 GEMM, mean of ranks); used for every "
                                 "dense GEMM (MLA projections, shared expert, router, dense MLP, LM head)"},
        "expert_gemm": {"points": expert_points,
                        "source": "rows per expert m = tokens x 8 / 256 (every expert of the composite view); "
                                  "tflops: measured, lowered where one expert's time at this m fell below its time at a "
                                  "smaller m (measurement noise in the HBM-bound range; measured_tflops: raw)"},
        "attention": {
            "core_points": core_points,
            "equal_length_points": equal_points,
            "others_ns_per_token": _r(attn_others),
            "others_per_row_ns": {str(T): _r(v) for T, v in resid.items()},
            "source": f"core_points: {att_ok}. others_ns_per_token: {F} ranks[*].rows[*].attn_ms (the whole MLA "
                      "block of gpu.py: norm, projections, cache writes, prefill_attention, output projection; 16 "
                      f"equal requests per rank, mean of ranks) per layer ({fwd['layers']}) and token, minus the MLA "
                      f"projections at the dense rate ({proj_ns:.4g} ns) and the core at the equal-length rate "
                      f"(equal_length_points: auto's one cuDNN call for equal lengths, which these rows ran), mean "
                      f"over the rows with S >= {eq_s[0]:.0f} ({'; '.join(resid_src)}). The model applies "
                      "equal_length_points to a step whose requests all have one length (auto's one cuDNN call: "
                      "CV 0) and core_points otherwise",
        },
        "others": {"points": others_points,
                   "source": "everything of a MoE layer that is not attention, expert GEMMs or dense GEMMs (router "
                             "top-k, sort/gather/scatter, weighting, norms, residuals; the benchmark's one dense "
                             "layer's elementwise work and the embedding are folded in)"},
        "fetch": {"gbps": _r(fetch), "copy_alone_gbps": _r(copy_alone),
                  "source": f"{F} ranks[*].rows[tokens>=16384].fetch_GBps (copy engine while the model computes, "
                            f"slowest rank); alone: {O} ranks[*].fetch_ce_gbps"},
        "dispatch": {"gbps": _r(disp_gbps), "latency_us": _r(lat_us), "dispatch_bytes_per_element": 2,
                     "combine_bytes_per_element": 4,
                     "source": "bench/results/dispatch_bandwidth_H200_N2.json records[tokens_per_rank>=1024]."
                               "modes.ours (all SMs, chained pairs): least squares time_ms = 2 latency + "
                               "max(payload_bytes_per_rank) / gbps; bf16 rows out, float32 partials back"},
        "interference": {c: interference for c in ("attention", "expert_gemm", "dense_gemm", "others")}
        | {"source": f"{O} ranks[*].slowdown[tokens in {slow_T}].slowdown_ce (expert GEMMs while a layer is "
                     "fetched, the copy outlasting the GEMMs; mean of ranks); applied to every compute category "
                     "while a copy is in flight (assumption: only the expert GEMMs were measured)",
           "all_points_mean_of_ranks": {str(T): _r(mean(s["slowdown_ce"] for rk in ovl["ranks"] for s in rk["slowdown"]
                                                      if s["tokens"] == T), 4)
                                         for T in sorted({s["tokens"] for s in ovl["ranks"][0]["slowdown"]})}},
    }
    if rank_speed is not None:
        cal["rank_speed"] = rank_speed
    return validate_calibration(cal)


RANK_SPEED_MIN_TOKENS = 16384  # below this the step holds fetch waits (47 ms at 4096 tokens), which hide speed


def _rank_speed(fwd: dict, where: str) -> dict | None:
    """The slowest rank's compute against the mean of ranks, from ``deepseek_forward``'s per-rank rows (every rank
    runs the same requests: same tokens, same lengths). Compute of a row = ``step_ms - wait_ms``; over the rows with
    at least ``RANK_SPEED_MIN_TOKENS`` tokens, the slowest rank (largest sum) against the mean of ranks' sums, - 1.
    None with one rank or no such rows."""
    ranks = fwd["ranks"]
    if len(ranks) < 2:
        return None
    by_T = [{row["tokens"]: row for row in rk["rows"]} for rk in ranks]
    Ts = sorted(T for T in set.intersection(*(set(b) for b in by_T)) if T >= RANK_SPEED_MIN_TOKENS)
    if not Ts:
        return None
    comp = {T: [b[T]["step_ms"] - b[T]["wait_ms"] for b in by_T] for T in sorted(set.intersection(*(set(b)
                                                                                                   for b in by_T)))}
    tot = [sum(comp[T][r] for T in Ts) for r in range(len(ranks))]
    slow = int(np.argmax(tot))
    s = tot[slow] / mean(tot) - 1.0
    per_row = {}
    for T, c in comp.items():
        rows = [b[T] for b in by_T]
        per_row[str(T)] = {
            "compute_ms": [_r(x) for x in c],
            "slowest_vs_mean": _r(max(c) / mean(c) - 1.0, 4),
            "slowest_rank": int(np.argmax(c)),
            "attn_ms_vs_mean": [_r(r["attn_ms"] / mean(x["attn_ms"] for x in rows) - 1.0, 4) for r in rows],
            "experts_ms_vs_mean": [_r(r["experts_ms"] / mean(x["experts_ms"] for x in rows) - 1.0, 4) for r in rows],
            "used": T >= RANK_SPEED_MIN_TOKENS,
        }
    dense = [rk["dense_tflops"] for rk in ranks]
    rows_txt = ", ".join(f"{T}: {100 * per_row[str(T)]['slowest_vs_mean']:.2f} % (rank "
                         f"{per_row[str(T)]['slowest_rank']})" for T in comp)
    return {
        "slowest_vs_mean": _r(s, 4),
        "slowest_rank": slow,
        "per_row": per_row,
        "source": f"{where} ranks[*].rows[tokens>={RANK_SPEED_MIN_TOKENS}]: compute = step_ms - wait_ms (every rank "
                  f"ran the same {fwd.get('requests', '?')} requests); the slowest rank's (rank {slow}) sum over "
                  f"those rows / the mean of ranks' sums - 1. Per row (slowest against the mean): {rows_txt}; rows "
                  f"below {RANK_SPEED_MIN_TOKENS} tokens are not used (their steps hold fetch waits). Not uniform "
                  "over the kernels (per_row: attention and expert GEMM time per rank against the mean), and the "
                  f"ranks' dense_tflops (8192^3 GEMM) are {', '.join(f'{x:.1f}' for x in dense)}: one factor on all "
                  "compute is an assumption. The simulator scales the slowest rank's compute by (1 + s) and each "
                  "other's by (1 - s / (N - 1)) (the calibrated rates are means of ranks); for N > 2 (one slow GPU "
                  "among equal others) an extrapolation from these 2 ranks",
    }


def paper_workload(cfg: DeepSeekConfig) -> dict:
    """Expected tokens and causal pairs of one rank's iteration in the paper's setting (ISL 8K, ratio 0.8, 32768
    tokens): lengths uniform in [6554, 8192], always exactly 4 whole requests (4 x 8192 fits, 5 x 6554 does not)."""
    lo, hi, n = math.ceil(PAPER["ratio"] * PAPER["isl"]), PAPER["isl"], 4
    vals = np.arange(lo, hi + 1, dtype=float)
    return {"requests": n, "tokens": n * vals.mean(), "sum_sq": n * (vals**2).mean(), "lengths": (lo, hi)}


def gb200_calibration(h200: dict) -> dict:
    """The GB200 profile (module docstring): compute from the paper's Table 3, links from public figures."""
    cfg = DeepSeekConfig.r1()
    ops = R1Ops(cfg)
    fpp = ops.expert_flops_per_pair
    w = paper_workload(cfg)
    T, N, E, k = w["tokens"], PAPER["gpus"], cfg.n_routed_experts, cfg.n_activated_experts
    n_l, n_moe, n_dense = cfg.n_layers, cfg.n_moe_layers, cfg.n_dense_layers
    t3 = PAPER["table3_dep4_ms"]
    read = (f"the paper's Table 3, DEP4 column read as ms per iteration (GB200 x 4, DeepSeek-R1 NVFP4, ISL 8K, "
            f"ratio 0.8, 32768 tokens: 4 requests of [{w['lengths'][0]}, {w['lengths'][1]}] tokens, "
            f"{T:.0f} tokens per rank and iteration on average)")
    core = n_l * 2.0 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * w["sum_sq"] / 2.0
    attn_tflops = core / (t3["attention"] * 1e-3) / 1e12
    pairs = T * k  # DEP4: a rank computes as many pairs as its tokens select (uniform routing)
    m_dep = pairs / (E // N)
    exp_tflops = n_moe * pairs * fpp / (t3["grouped_gemm"] * 1e-3) / 1e12
    dense_flops = (T * (n_l * ops.proj_flops_per_token + n_moe * ops.shared_flops_per_token
                        + n_dense * ops.dense_mlp_flops_per_token) + w["requests"] * ops.lm_head_flops_per_row)
    dense_tflops = dense_flops / (t3["dense_gemm"] * 1e-3) / 1e12
    others_ns = t3["others"] * 1e6 / (T * n_l)
    nvfp4_bytes = int(3 * cfg.dim * cfg.moe_inter_dim * (0.5 + 1 / 16))  # E2M1 + one FP8 scale per 16 elements
    ep = h200["expert_gemm"]["points"]
    t_first = ep[0]["rows_per_expert"] * fpp / (ep[0]["tflops"] * 1e12)  # one bf16 expert's time at the smallest m
    hbm_eff = h200["weights"]["expert_bytes"] / t_first / (H200_HBM_GBPS * 1e9)
    BW = GB200["hbm_gbps"] * hbm_eff * 1e9
    knee = math.ceil(nvfp4_bytes / BW * exp_tflops * 1e12 / fpp)  # rows per expert where compute meets HBM
    points = [{"rows_per_expert": m, "tflops": _r(exp_tflops),
               "source": f"compute rate {exp_tflops:.4g} TFLOP/s (see expert_gemm.source); the first point sits at the knee where "
                         f"one NVFP4 expert's {nvfp4_bytes} B at {GB200['hbm_gbps']:.0f} GB/s x {hbm_eff:.3f} "
                         "take as long as its rows' FLOPs, so below it the time is the weight read (HBM-bound)"}
              for m in (knee, 4096)]
    nvlink_h200 = 18 * 26.5625
    fetch_eff = h200["fetch"]["gbps"] / nvlink_h200
    sl = {c: _r(t3_dw / t3_dep - 1.0, 4) for c, t3_dw, t3_dep in (
        ("attention", PAPER["table3_dwdp4_ms"]["attention"], t3["attention"]),
        ("expert_gemm", PAPER["table3_dwdp4_ms"]["grouped_gemm"], t3["grouped_gemm"]),
        ("dense_gemm", PAPER["table3_dwdp4_ms"]["dense_gemm"], t3["dense_gemm"]),
        ("others", PAPER["table3_dwdp4_ms"]["others"], t3["others"]))}
    cal = {
        "schema": SCHEMA,
        "hardware": "gb200",
        "description": "one Blackwell GPU of GB200 NVL72 with TensorRT-LLM's kernels, DeepSeek-R1 NVFP4 (the paper's "
                       "setting): compute rates from the paper's own DEP4 breakdown, link rates from public figures; "
                       "not measured by us",
        "generated_by": "python -m dwdp_ops.sim.calibrate --profile gb200 (from the paper's Table 3, public figures "
                        "and h200.json)",
        "weights": {"expert_bytes": nvfp4_bytes, "param_bytes": 0.5625,
                    "source": "NVFP4: 3 x 7168 x 2048 E2M1 values (0.5 B) + one FP8 block scale per 16 values; "
                              "per-expert global scales neglected (../shared/reference/dwdp.md section 3.1)"},
        "dense_gemm": {"tflops": _r(dense_tflops),
                       "source": f"{read}: DenseGEMM {t3['dense_gemm']} ms for our dense-GEMM FLOPs (MLA projections "
                                 "x 61, shared expert + router x 58, dense MLP x 3, LM head); an effective rate: it "
                                 "exceeds the FP8 dense peak (5 PFLOP/s), so the paper files some of these GEMMs "
                                 "elsewhere or runs them in FP4"},
        "expert_gemm": {"points": points,
                        "source": f"{read}: GroupedGEMM {t3['grouped_gemm']} ms for {n_moe} layers x {pairs:.0f} "
                                  f"pairs (m = {m_dep:.0f} rows per expert on a DEP4 rank) gives the compute rate; "
                                  "below the knee the HBM bound (8 TB/s, NVIDIA GB200 NVL72 specification) "
                                  "with the HBM efficiency our H200 GEMMs reach at small m (h200.json expert_gemm)"},
        "attention": {
            "core_points": [{"seq_len": s, "tflops": _r(attn_tflops),
                             "source": f"{read}: Attention {t3['attention']} ms for the causal core FLOPs of 61 "
                                       "layers (flat in length: one workload point)"} for s in (1024, 32768)],
            "others_ns_per_token": _r(others_ns),
            "source": f"core: see points; others: {read}: Others {t3['others']} ms spread over every token and "
                      "layer (all of it booked in the attention block; the MoE layers' own others are 0)",
        },
        "others": {"points": [{"tokens": 32768, "ns_per_token": 0.0,
                               "source": "booked in attention.others_ns_per_token"}],
                   "source": "see attention.others_ns_per_token"},
        "fetch": {"gbps": _r(GB200["nvlink_gbps"] * fetch_eff),
                  "source": f"{GB200_SPEC}; 900 GB/s x {fetch_eff:.3f}, the fraction of H200's NVLink "
                            "(18 x 26.5625 GB/s) that our copy engine reaches inside the model (h200.json fetch); "
                            "many-to-one copy-engine contention not modelled. Check: the paper's overlapped P2P copy "
                            "(429 ms for 58 x 192 NVFP4 experts) implies 643 GB/s"},
        "dispatch": {"gbps": _r(GB200["nvlink_gbps"] * (329 + 287) / 2 / 450), "latency_us": 42.0,
                     "dispatch_bytes_per_element": 0.5625, "combine_bytes_per_element": 2,
                     "source": "DeepEP normal kernels on 8 x H100 (4096 tokens, hidden 7168): dispatch 329, combine "
                               "287 GB/s of 450 GB/s NVLink -> 68 % of 900 GB/s; latency: pplx-kernels, one token, "
                               "41.6 / 41.7 us per collective on 8 x H100 (../shared/reference/dwdp.md section 9); "
                               "rows NVFP4 out, bf16 back (assumption for TensorRT-LLM's DEP)"},
        "interference": sl | {
            "source": "the paper's Table 3, DWDP4 / DEP4 - 1 per category (attention 320.56 / 269.67, grouped GEMM "
                      "337.42 / 342.40, dense 189.28 / 177.50, others 284.32 / 241.69), applied while a copy is in "
                      "flight: the paper's slowdowns are over the whole iteration, with the copy busy about 38 % of "
                      "it, so this applies less slowdown than the paper saw; an input from the run the prediction "
                      "is compared with"},
    }
    return validate_calibration(cal)


def _dump(cal: dict) -> str:
    return json.dumps(cal, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dwdp_ops.sim.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=REPO_RESULTS, help="folder of the measured JSON files")
    ap.add_argument("--out-dir", type=Path, default=PACKAGE_DIR, help="where the calibration files go")
    ap.add_argument("--profile", choices=("h200", "gb200", "all"), default="all", help="which file(s) to write")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files would change")
    ns = ap.parse_args(argv)
    if ns.out_dir.exists() and not ns.out_dir.is_dir():  # (mkdir had raised FileExistsError after the work)
        ap.error(f"argument --out-dir: {ns.out_dir} exists and is not a folder")
    try:
        h200 = h200_calibration(ns.results)
    except (FileNotFoundError, KeyError, ValueError) as e:
        ap.error(f"cannot build the H200 calibration from {ns.results}: {e}")
    files = {"h200": h200, "gb200": gb200_calibration(h200)}
    names = list(files) if ns.profile == "all" else [ns.profile]
    changed = []
    for name in names:
        path = ns.out_dir / f"{name}.json"
        text = _dump(files[name])
        if ns.check:
            if not path.is_file() or path.read_text() != text:
                changed.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if changed:
        print("out of date: " + ", ".join(changed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
