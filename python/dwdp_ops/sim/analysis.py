"""Studies built on ``simulate``: the CV x token-budget sweep, validation against measured end-to-end points, and the
comparison with the paper's GB200 context-only result.

``sweep``     DWDP and DEP over request-length CVs (default 0, 10, 20, 30 %) and token budgets (16K, 32K), plus the
              paper's ratio-0.8 setting per budget; one row per setting.
``validate``  predictions against measured points (e.g. issue 14's ``bench/e2e_dwdp_vs_dep.py`` output): each point a
              dict with ``mode`` ("dwdp" or "dep"), ``N`` (or ``gpus``), ``cv`` or ``ratio``, ``max_tokens``,
              ``iteration_ms`` and ``tps_per_gpu`` (optional: ``isl``, ``layers``, ``dense_layers``, ``seed``,
              ``iterations``, ``warmup``, ``hardware``); reports the relative error (predicted / measured - 1) of
              both figures per point and whether it is within ``tolerance``. The measured iteration is the
              benchmark's: the slowest rank's step, averaged over iterations (``slowest_rank_iteration_ms``; for
              DEP, in lockstep, the same as ``iteration_ms``). DEP is simulated with no redundant expert slots
              (``redundant_experts=0``): the benchmark's DEP places every expert once.
``e2e_categories``  a prediction regrouped as ``bench/e2e_dwdp_vs_dep.py`` groups its CUDA-event spans: ``attn`` (the
              whole MLA block: core + MLA projections + the block's elementwise work), ``experts`` (expert GEMMs),
              ``other`` (dense MLPs, shared expert + router, MoE-layer others, LM head), ``comm``, ``sync_wait``,
              ``wait`` (exposed fetch), ``step`` (their sum: the mean step of a rank).
``validate_e2e``  ``validate`` on an e2e result file's ``points``, with each point's measured categories (from the
              file's ``records``) next to ``e2e_categories`` of the prediction; a calibration of other expert bytes
              per parameter than the file's ``dtype`` is refused, and so is a malformed file (ValueError naming the
              point or record).
``paper_comparison``  the paper's Table 3 next to a prediction of its setting (GB200, N=4, ISL 8K, ratio 0.8, 32768
              tokens, 61 layers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .._checks import is_finite_real, is_int
from ..models.deepseek_r1.config import DeepSeekConfig
from .costs import CATEGORIES, Overrides, load_calibration
from .model import SimConfig, simulate
from .paper import PAPER

__all__ = ["DTYPE_PARAM_BYTES", "E2E_CATEGORIES", "calibration_param_bytes", "e2e_categories", "is_paper_setting",
           "paper_comparison", "sweep", "validate", "validate_e2e", "validation_table"]


def _row(res: dict, setting: dict) -> dict:
    dw, dep = res["dwdp"], res["dep"]
    return {
        **setting,
        "tokens_per_iteration": res["workload"]["tokens_per_iteration"],
        "dwdp": {"tps_per_gpu": dw["tps_per_gpu"], "iteration_ms": dw["iteration_ms"],
                 "exposed_fetch_share": dw["shares"]["exposed_fetch"]},
        "dep": {"tps_per_gpu": dep["tps_per_gpu"], "iteration_ms": dep["iteration_ms"],
                "sync_share": dep["shares"]["sync_wait"], "communication_share": dep["shares"]["communication"]},
        "ratio": res["ratio"],
        "iteration_latency_change": res["iteration_latency_change"],
    }


def sweep(hardware: str = "h200", gpus: int = 2, *, isl: int = 8192, cvs: Sequence[float] = (0.0, 0.1, 0.2, 0.3),
          budgets: Sequence[int] = (16384, 32768), ratio: float | None = 0.8, layers: int = 61,
          dense_layers: int | None = None, seed: int = 0, iterations: int = 32,
          overrides: Overrides | None = None, redundant_experts: int | None = None) -> list[dict]:
    """One row per (budget, CV), and per budget the ``ratio`` setting (None: none). Rows: ``cv`` or ``input_ratio``,
    ``max_tokens``, ``dwdp`` / ``dep`` (TPS/GPU, iteration ms, DEP's sync and communication shares, DWDP's exposed
    fetch share), ``ratio`` (DWDP / DEP TPS/GPU) and ``iteration_latency_change``. ``redundant_experts``: DEP's
    (``SimConfig``; None: its default)."""
    def numbers(name: str, v) -> tuple:  # None or 16384 had failed bare, "16384" by character; a generator of
        if not isinstance(v, (str, bytes)):  # cvs had given CV rows for the first budget only
            try:
                return tuple(v)
            except TypeError:
                pass
        raise TypeError(f"{name} must be a sequence of numbers (e.g. {(0.0, 0.1) if name == 'cvs' else (16384,)}), "
                        f"got {v!r}")

    cvs, budgets = numbers("cvs", cvs), numbers("budgets", budgets)
    rows = []
    ov = overrides or Overrides()
    for budget in budgets:
        base = dict(hardware=hardware, gpus=gpus, isl=isl, max_tokens=budget, layers=layers,
                    dense_layers=dense_layers, seed=seed, iterations=iterations, overrides=ov,
                    redundant_experts=redundant_experts)
        # the rows hold the setting as SimConfig normalised it (Python int / float): a numpy budget or cv had gone
        # into them as given, which json.dumps refuses ("Object of type int64 is not JSON serializable")
        if ratio is not None:
            cfg = SimConfig(ratio=ratio, **base)
            rows.append(_row(simulate(cfg), {"input_ratio": cfg.ratio, "max_tokens": cfg.max_tokens}))
        for cv in cvs:
            cfg = SimConfig(cv=cv, **base)
            rows.append(_row(simulate(cfg), {"cv": cfg.cv, "max_tokens": cfg.max_tokens}))
    return rows


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and is_finite_real(v)


def _point_config(p, defaults: dict, where: str) -> SimConfig:
    """``where``: how an error names the point (``measured point 3``)."""
    if not isinstance(p, dict):
        raise ValueError(f"{where} must be an object (mode, N, cv or ratio, max_tokens, iteration_ms, tps_per_gpu), "
                         f"got {type(p).__name__} {p!r}")
    missing = [k for k in ("mode", "max_tokens", "iteration_ms", "tps_per_gpu") if k not in p]
    if "N" not in p and "gpus" not in p:
        missing.append("N")
    if ("cv" in p) == ("ratio" in p):
        missing.append("exactly one of cv and ratio")
    if missing:
        raise ValueError(f"{where} {p!r} lacks {', '.join(missing)}")
    if p["mode"] not in ("dwdp", "dep"):
        raise ValueError(f"{where}: mode must be 'dwdp' or 'dep', got {p['mode']!r}")
    if "N" in p and "gpus" in p and p["N"] != p["gpus"]:
        raise ValueError(f"{where}: N and gpus name the same group size, got N={p['N']!r} and gpus={p['gpus']!r}")
    for k in ("cv", "ratio"):  # a null would leave SimConfig neither and so its default, ratio 0.8
        if k in p and p[k] is None:
            raise ValueError(f"{where}: {k} must be a number (the point's request lengths), got None")
    for k in ("iteration_ms", "tps_per_gpu"):
        if not _finite(p[k]) or not p[k] > 0:
            raise ValueError(f"{where}: measured {k} must be a finite number > 0, got {p[k]!r}")
    kw = dict(defaults)
    for k in ("isl", "layers", "dense_layers", "seed", "iterations", "warmup", "hardware"):
        if k in p:
            kw[k] = p[k]
    ol = p.get("owner_load")
    if ol is not None and (not isinstance(ol, list) or not all(_finite(x) for x in ol)):
        raise ValueError(f"{where}: owner_load must be a list of numbers (one per GPU), got {ol!r}")
    try:  # redundant_experts=0: the benchmark's DEP (bench/e2e_dwdp_vs_dep.py) places every expert once
        return SimConfig(gpus=p.get("N", p.get("gpus")), cv=p.get("cv"), ratio=p.get("ratio"),
                         max_tokens=p["max_tokens"], owner_load=None if ol is None else tuple(float(x) for x in ol),
                         redundant_experts=0, **kw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def validate(measured_points: Iterable[dict], *, hardware: str = "h200", isl: int = 8192, layers: int = 61,
             dense_layers: int | None = None, seed: int = 0, iterations: int = 32, tolerance: float = 0.10,
             overrides: Overrides | None = None) -> dict:
    """Predicted against measured, point by point (module docstring). Returns ``points`` (each measured point with
    ``predicted_iteration_ms`` (the slowest rank's, as the benchmark measures it), ``predicted_tps_per_gpu``,
    ``rel_err_iteration_ms``, ``rel_err_tps_per_gpu``, ``within_tolerance``, ``predicted_categories_ms``
    (``e2e_categories``)), ``max_abs_rel_err`` and ``all_within``. Settings shared by several points are simulated
    once. A point that is not an object, lacks a field, or has a measured figure that is not a finite number > 0
    raises ValueError naming the point (``measured point i``, counted from 0) and the field; so do no point at all
    and a ``tolerance`` that is not a finite number >= 0; ``measured_points`` that is not an iterable of points (a
    number, None, a single point's dict, a string) raises TypeError naming it."""
    if isinstance(measured_points, (str, bytes, dict)) or not isinstance(measured_points, Iterable):
        raise TypeError(f"measured_points must be a list (or other iterable) of point objects (dicts), got "
                        f"{type(measured_points).__name__} {measured_points!r}")  # 5 had failed bare: not iterable
    if not (is_finite_real(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0 (a relative error, e.g. 0.10), got {tolerance!r}")
    tolerance = float(tolerance)
    defaults = dict(hardware=hardware, isl=isl, layers=layers, dense_layers=dense_layers, seed=seed,
                    iterations=iterations, overrides=overrides or Overrides())
    cache: dict[SimConfig, dict] = {}
    out = []
    for i, p in enumerate(measured_points):
        cfg = _point_config(p, defaults, f"measured point {i}")
        if cfg not in cache:
            cache[cfg] = simulate(cfg)
        pred = cache[cfg][p["mode"]]
        it_ms = pred["slowest_rank_iteration_ms"]
        e_it = it_ms / p["iteration_ms"] - 1.0
        e_tps = pred["tps_per_gpu"] / p["tps_per_gpu"] - 1.0
        out.append({**p, "predicted_iteration_ms": it_ms, "predicted_tps_per_gpu": pred["tps_per_gpu"],
                    "rel_err_iteration_ms": e_it, "rel_err_tps_per_gpu": e_tps,
                    "within_tolerance": abs(e_it) <= tolerance and abs(e_tps) <= tolerance,
                    "predicted_categories_ms": e2e_categories(pred)})
    if not out:
        raise ValueError("no measured point to validate against (give at least one)")
    worst = max(max(abs(x["rel_err_iteration_ms"]), abs(x["rel_err_tps_per_gpu"])) for x in out)
    return {"tolerance": tolerance, "points": out, "max_abs_rel_err": worst,
            "all_within": all(x["within_tolerance"] for x in out)}


E2E_CATEGORIES = ("attn", "experts", "other", "comm", "sync_wait", "wait", "step")


def e2e_categories(mode_result: dict) -> dict:
    """One mode's prediction (``simulate(...)["dwdp"]`` or ``["dep"]``) in the e2e benchmark's categories (module
    docstring), ms per rank and iteration (means over ranks and iterations, as the benchmark's ``categories_ms``)."""
    d, b = mode_result["detail_ms"], mode_result["breakdown_ms"]
    out = {
        "attn": d["attention"] + d["dense_gemm:mla_proj"] + d["others:attn_block"],
        "experts": b["expert_gemm"],
        "other": (d["dense_gemm:dense_mlp"] + d["dense_gemm:shared_router"] + d["dense_gemm:lm_head"]
                  + d["others:moe"]),
        "comm": b["communication"],
        "sync_wait": b["sync_wait"],
        "wait": b["exposed_fetch"],
    }
    out["step"] = sum(out.values())
    return out


# the benchmark's name of each e2e category in a record's ``categories_ms`` (``copy_ms``, optional, is reported
# next to them as ``overlapped_copy``)
_MEASURED = {"attn": "attn_ms", "experts": "experts_ms", "other": "other_ms", "comm": "comm_ms",
             "sync_wait": "sync_wait_ms", "wait": "wait_ms", "step": "step_ms"}

# bytes per expert-weight parameter of each expert dtype that ``bench/e2e_dwdp_vs_dep.py`` runs (its ``dtype``)
DTYPE_PARAM_BYTES = {"bfloat16": 2.0, "float8_e4m3fn": 1.0}
_BYTES_NAME = {2.0: "bf16", 1.0: "fp8", 0.5625: "nvfp4"}


def calibration_param_bytes(cal: dict) -> float:
    """Bytes per expert-weight parameter that a calibration was measured (or assumed) with: its
    ``weights.param_bytes``, or, for a file without one, ``weights.expert_bytes`` over the parameters of one
    DeepSeek-R1 expert (3 x hidden x moe_inter_dim)."""
    w = cal["weights"]
    if "param_bytes" in w:
        if not _finite(w["param_bytes"]) or not w["param_bytes"] > 0:
            raise ValueError(f"the calibration's weights.param_bytes must be a finite number > 0, "
                             f"got {w['param_bytes']!r}")
        return float(w["param_bytes"])
    r1 = DeepSeekConfig.r1()
    return float(w["expert_bytes"]) / (3 * r1.dim * r1.moe_inter_dim)


def _check_dtype(result: dict, hardware: str) -> None:
    """A calibration of other expert weights than the result's (e.g. bf16 against fp8) is refused, whatever its name
    or path: the bytes per parameter of the calibration against those of the result's ``dtype``."""
    dtype = result.get("dtype", "bfloat16")
    if not isinstance(dtype, str) or dtype not in DTYPE_PARAM_BYTES:
        raise ValueError(f"the result's dtype must be one of {', '.join(DTYPE_PARAM_BYTES)}, got {dtype!r}")
    want = DTYPE_PARAM_BYTES[dtype]
    have = calibration_param_bytes(load_calibration(hardware))
    if abs(have - want) > 1e-9:
        name = _BYTES_NAME.get(have, f"{have:g}-byte")
        raise ValueError(f"the calibration {hardware!r} is of {name} experts ({have:g} B per parameter); this "
                         f"result has {dtype} experts ({want:g} B per parameter): use a calibration measured with "
                         f"{dtype} experts")


def _check_records(records) -> list[dict]:
    """A result's ``records`` (absent or null: none) checked for the types the matching reads: a list of objects,
    each ``modes`` (if present) an object of objects."""
    if records is None:
        return []
    if not isinstance(records, list):
        raise ValueError(f"the result's 'records' must be a list of objects, got {type(records).__name__}")
    for j, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"records[{j}] must be an object (budget, dist, modes), got {type(r).__name__} {r!r}")
        modes = r.get("modes", {})
        if not isinstance(modes, dict) or not all(isinstance(m, dict) for m in modes.values()):
            raise ValueError(f"records[{j}].modes must be an object of one object per mode, got {modes!r}")
    return records


def _measured_categories(record: dict, mode: str, where: str) -> dict:
    """``where``: how an error names the record's mode (``records[3].modes.dwdp``)."""
    c = record["modes"][mode].get("categories_ms")
    if not isinstance(c, dict):
        raise ValueError(f"{where}.categories_ms must be an object, got {c!r}")
    missing = [k for k in _MEASURED.values() if k not in c]
    if missing:
        raise ValueError(f"{where}.categories_ms lacks {', '.join(missing)}")
    out = {cat: c[key] for cat, key in _MEASURED.items()} | {"overlapped_copy": c.get("copy_ms", 0.0)}
    for cat, key in (*_MEASURED.items(), ("overlapped_copy", "copy_ms")):
        if not _finite(out[cat]):
            raise ValueError(f"{where}.categories_ms.{key} must be a finite number, got {out[cat]!r}")
    return out


def validate_e2e(result: dict, *, hardware: str = "h200", tolerance: float = 0.10,
                 overrides: Overrides | None = None) -> dict:
    """``validate`` on the ``points`` of a ``bench/e2e_dwdp_vs_dep.py`` result (its JSON as a dict), each point
    simulated with the benchmark's iterations after its ``warmup`` (the same draws: the benchmark uses
    ``sim.workload``), plus ``measured_categories_ms`` from the matching record (budget, distribution, mode). A
    calibration whose expert weights have other bytes per parameter than the result's ``dtype`` (e.g. a bf16
    profile against an fp8 result) is refused, by its contents, not its name. Every malformed part (a point or
    record that is not an object, a missing field or category, a measured value that is not a finite number)
    raises ValueError naming it (``measured point i``, ``records[j]``, counted from 0)."""
    if not isinstance(result, dict) or not isinstance(result.get("points"), list) or not result["points"]:
        raise ValueError("an e2e result needs a non-empty 'points' list (bench/e2e_dwdp_vs_dep.py's output)")
    for i, p in enumerate(result["points"]):
        if not isinstance(p, dict):
            raise ValueError(f"measured point {i} must be an object (mode, N, cv or ratio, max_tokens, "
                             f"iteration_ms, tps_per_gpu), got {type(p).__name__} {p!r}")
        if "hardware" in p and not isinstance(p["hardware"], str):
            raise ValueError(f"measured point {i}: hardware must be a profile name or calibration path, "
                             f"got {p['hardware']!r}")
    for hw in dict.fromkeys([hardware] + [p["hardware"] for p in result["points"] if "hardware" in p]):
        _check_dtype(result, hw)
    warmup = result.get("warmup", 0)
    if not is_int(warmup) or warmup < 0:
        raise ValueError(f"the result's warmup must be an integer >= 0, got {warmup!r}")
    warmup = int(warmup)
    records = _check_records(result.get("records"))
    points = [{"warmup": warmup, **p} for p in result["points"]]
    v = validate(points, hardware=hardware, tolerance=tolerance, overrides=overrides)
    for p in v["points"]:
        dist = {k: p[k] for k in ("cv", "ratio") if k in p}
        j = next((j for j, r in enumerate(records) if r.get("budget") == p["max_tokens"] and r.get("dist") == dist
                  and p["mode"] in r.get("modes", {})), None)
        if j is not None:
            where = f"records[{j}].modes.{p['mode']}"
            p["measured_categories_ms"] = _measured_categories(records[j], p["mode"], where)
    return v


def validation_table(v: dict) -> str:
    """``validate_e2e``'s result as text: per point the iteration and TPS/GPU (measured, predicted, error) and per
    category measured / predicted ms per rank and iteration."""
    cats = ("attn", "experts", "other", "comm", "sync_wait", "wait", "step")
    head = (f"{'mode':5s} {'budget':>6s} {'lengths':9s} {'it meas':>8s} {'it pred':>8s} {'err':>7s} "
            f"{'TPS meas':>8s} {'TPS pred':>8s} {'err':>7s}  " + " ".join(f"{c:>13s}" for c in cats))
    lines = [head]
    for p in v["points"]:
        name = f"cv{p['cv']:g}" if "cv" in p else f"ratio{p['ratio']:g}"
        mc, pc = p.get("measured_categories_ms"), p["predicted_categories_ms"]
        cells = " ".join(f"{(mc[c] if mc else float('nan')):6.1f}/{pc[c]:<6.1f}" for c in cats)
        lines.append(f"{p['mode']:5s} {p['max_tokens']:6d} {name:9s} {p['iteration_ms']:8.1f} "
                     f"{p['predicted_iteration_ms']:8.1f} {100 * p['rel_err_iteration_ms']:+6.1f}% "
                     f"{p['tps_per_gpu']:8.0f} {p['predicted_tps_per_gpu']:8.0f} {100 * p['rel_err_tps_per_gpu']:+6.1f}%  "
                     + cells)
    n_in = sum(1 for p in v["points"] if p["within_tolerance"])
    lines.append(f"categories: measured/predicted ms per rank and iteration (e2e_categories); {n_in} of "
                 f"{len(v['points'])} points within {100 * v['tolerance']:.0f} % on both figures; worst "
                 f"{100 * v['max_abs_rel_err']:.1f} %")
    return "\n".join(lines)


def is_paper_setting(config: dict) -> bool:
    """Whether a result's ``config`` is the paper's context-only setting (any hardware): its group size, lengths,
    budget and the full R1 (61 layers, 3 of them dense)."""
    return (config.get("gpus") == PAPER["gpus"] and config.get("isl") == PAPER["isl"]
            and config.get("ratio") == PAPER["ratio"] and config.get("max_tokens") == PAPER["max_tokens"]
            and config.get("layers") == PAPER["layers"] and config.get("dense_layers") == PAPER["dense_layers"])


def paper_comparison(result: dict) -> dict:
    """The paper's Table 3 (GB200, DEP4 against DWDP4) next to ``result``: iteration latency change, DEP's
    communication and synchronisation shares, per-category ms of both modes and the overlapped copy."""
    dep3, dw3 = PAPER["table3_dep4_ms"], PAPER["table3_dwdp4_ms"]
    names = {"attention": "attention", "expert_gemm": "grouped_gemm", "dense_gemm": "dense_gemm", "others": "others",
             "communication": "communication", "sync_wait": "sync_wait"}
    rows = {}
    for cat in CATEGORIES:
        key = names.get(cat)
        rows[cat] = {"paper_dep_ms": dep3.get(key, 0.0) if key else 0.0,
                     "paper_dwdp_ms": dw3.get(key, 0.0) if key else 0.0,
                     "predicted_dep_ms": result["dep"]["breakdown_ms"][cat],
                     "predicted_dwdp_ms": result["dwdp"]["breakdown_ms"][cat]}
    return {
        "paper_iteration_latency_change": dw3["iteration"] / dep3["iteration"] - 1.0,
        "predicted_iteration_latency_change": result["iteration_latency_change"],
        "paper_dep_communication_share": dep3["communication"] / dep3["iteration"],
        "predicted_dep_communication_share": result["dep"]["shares"]["communication"],
        "paper_dep_sync_share": dep3["sync_wait"] / dep3["iteration"],
        "predicted_dep_sync_share": result["dep"]["shares"]["sync_wait"],
        "paper_overlapped_copy_ms": dw3["overlapped_copy"],
        "predicted_overlapped_copy_ms": result["dwdp"]["overlapped_copy_ms"],
        "paper_iteration_ms": {"dep": dep3["iteration"], "dwdp": dw3["iteration"]},
        "predicted_iteration_ms": {"dep": result["dep"]["iteration_ms"], "dwdp": result["dwdp"]["iteration_ms"]},
        "categories": rows,
        "note": "the paper's Table 3 is read as ms per iteration (its units are doubtful); the gb200 profile takes "
                "DEP4's compute categories and the interference from this table, so only communication, "
                "synchronisation wait and the fetch are predicted independently",
    }
