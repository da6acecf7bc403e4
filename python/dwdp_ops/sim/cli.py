"""Predict DWDP against DEP for DeepSeek-R1 prefill on a context-only server (CPU only, seconds).

Each rank drains its own queue of prefill requests; an iteration takes whole requests up to --max-tokens (a longer
request is chunked into --max-tokens pieces). Request lengths: --ratio R (uniform in [R x ISL, ISL], the paper's) or
--cv C (gamma, mean ISL, coefficient of variation C); seeded per rank, the same queues for both modes. DWDP moves
weights (copy engine, behind compute); DEP moves tokens (dispatch + combine at every MoE layer, where every rank
waits for the slowest). Rates come from the hardware profile's calibration file (h200: our measurements; gb200: the
paper's breakdown and public link figures); the --*-gbps / --attention-tflops / --interference / --rank-slowdown
options replace one rate for a what-if. The model, its equations and its limits: docs/simulator.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .._cli import HelpFormatter, existing_file, nonnegative_int, plain, positive_float, writable_path
from .analysis import is_paper_setting, paper_comparison, sweep, validate_e2e, validation_table
from .costs import CATEGORIES, PROFILES, Overrides
from .model import MAX_ISL, MAX_REQUESTS_PER_ITERATION, MAX_TOKENS, SimConfig, simulate, work_error
from .plot import MISSING, have_matplotlib, plot, plot_format

__all__ = ["build_parser", "main"]


def _bounded_int(lo: int, hi: int, what: str):
    def check(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}] ({what}), got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}] ({what}), got {v}")
        return v

    check.__name__ = f"int_{lo}_{hi}"
    return check


def _float_in(lo: float, hi: float, lo_open: bool, what: str):
    def check(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {what}, got {text!r}") from None
        if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(f"expected a number in {what}, got {text!r}")
        return v

    check.__name__ = "number"
    return check


def build_parser(prog: str = "python -m dwdp_ops sim") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=plain(__doc__), formatter_class=HelpFormatter)
    ap.add_argument("--hardware", choices=PROFILES, default="h200",
                    help="calibration profile shipped in dwdp_ops/sim/calibration")
    ap.add_argument("--calibration", type=existing_file, default=None,
                    help="a calibration JSON file to use instead of --hardware's (schema: docs/simulator.md); with "
                         "--hardware, only a file of that hardware")
    ap.add_argument("--gpus", type=_bounded_int(1, 256, "GPUs of one DWDP / DEP group, at most one expert each"),
                    default=2, help="group size N")
    ap.add_argument("--isl", type=_bounded_int(1, MAX_ISL, "tokens per request"), default=8192,
                    help=f"input sequence length: the longest (--ratio) or mean (--cv) request, tokens (at most "
                         f"{MAX_ISL})")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--ratio", type=_float_in(0.0, 1.0, True, "(0, 1]"), default=None,
                     help="request lengths uniform in [RATIO x ISL, ISL] (default when neither is given: 0.8)")
    src.add_argument("--cv", type=_float_in(0.0, 5.0, False, "[0, 5]"), default=None,
                     help="request lengths gamma-distributed with mean ISL and this coefficient of variation")
    ap.add_argument("--max-tokens", type=_bounded_int(1, MAX_TOKENS, "tokens per rank and iteration"), default=32768,
                    help=f"token budget of one iteration per rank (at most {MAX_TOKENS}, and at most "
                         f"{MAX_REQUESTS_PER_ITERATION} x --isl: about {MAX_REQUESTS_PER_ITERATION} requests per "
                         "iteration)")
    ap.add_argument("--layers", type=_bounded_int(1, 61, "DeepSeek-R1 has 61"), default=61,
                    help="model depth (R1: 61 = 3 dense + 58 MoE)")
    ap.add_argument("--dense-layers", type=_bounded_int(0, 61, "at most --layers"), default=None,
                    help="dense layers first (default: min(3, --layers); 0: MoE layers only)")
    ap.add_argument("--iterations", type=_bounded_int(1, 10000, "per rank"), default=32,
                    help="iterations simulated per rank")
    ap.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the request lengths")
    ap.add_argument("--attention-tflops", type=positive_float, default=None,
                    help="what-if: core attention rate, TFLOP/s, flat in length (default: the profile's curve)")
    ap.add_argument("--fetch-gbps", type=positive_float, default=None,
                    help="what-if: copy-engine fetch rate per reader, GB/s (default: the profile's)")
    ap.add_argument("--dispatch-gbps", type=positive_float, default=None,
                    help="what-if: dispatch / combine rate per rank, GB/s (default: the profile's)")
    ap.add_argument("--dispatch-latency-us", type=_float_in(0.0, 1e6, False, "[0, 1e6]"), default=None,
                    help="what-if: latency of one dispatch or combine, us (default: the profile's)")
    ap.add_argument("--interference", type=_float_in(-0.5, 10.0, True, "(-0.5, 10]"), default=None,
                    help="what-if: slowdown of every compute category while a copy runs, e.g. 0.05 "
                         "(default: the profile's per-category factors)")
    ap.add_argument("--rank-slowdown", type=_float_in(0.0, 0.99, False, "[0, 0.99]"), default=None,
                    help="what-if: the slowest rank's compute time against the mean of ranks, e.g. 0.01; 0: identical "
                         "GPUs (default: the profile's rank_speed, 0 if it has none)")
    ap.add_argument("--owner-load", type=_owner_load, default=None, metavar="L0,L1,...",
                    help="relative routed pairs per DEP owner rank (one per GPU, e.g. 0.55,1.45 for a router that "
                         "gives the second rank 2.6x the first's pairs; the pairs are conserved, so with uneven "
                         "experts per rank equal loads are equal pairs; an owner takes at most min(top-k, its "
                         "experts) pairs a token, the excess going to the others); default: uniform routing")
    ap.add_argument("--redundant-experts", type=nonnegative_int, default=None, metavar="R",
                    help="DEP's redundant expert slots (EPLB: replicas of the hottest ranks' experts even out the "
                         "pairs per rank), an integer in [0, (--gpus - 1) x 256]; values that make sense: "
                         "ceil(256 / N) x N - 256 + j x N (every rank the same slots: 0, N, 2N, ... where N divides "
                         "256; 32, 104, ... at N = 72); 0: every expert on one rank (default: the smallest R that "
                         "gives every rank the same slots, 32 at N = 72)")
    ap.add_argument("--sweep", action="store_true",
                    help="also sweep CV 0/10/20/30 %% and budgets 16K/32K (plus a row at --ratio's setting, 0.8 by "
                         "default, when --cv is not given)")
    ap.add_argument("--validate", type=existing_file, default=None, metavar="FILE",
                    help="instead of a prediction: the validation table of a bench/e2e_dwdp_vs_dep.py result FILE "
                         "(every point simulated with the --hardware or --calibration profile and the what-ifs; "
                         "measured against predicted iteration, TPS/GPU and categories); the workload options, "
                         "--sweep and --plot are refused with it (the FILE's points give the workload)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--plot", type=writable_path, default=None, metavar="FILE",
                    help="write a figure (category bars; DEP sync share and DWDP gain against CV) to FILE, in the "
                         "format of its extension (png without one)")
    return ap


def _owner_load(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}") from None
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return vals


# options that --validate never reads: the FILE's points give the workload; --sweep and --plot are predictions'
VALIDATE_UNUSED = ("gpus", "isl", "ratio", "cv", "max_tokens", "layers", "dense_layers", "iterations", "seed",
                   "sweep", "plot")


def given_options(ap: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The ``dest`` of every option on the command line ``argv`` (None: ``sys.argv[1:]``), whatever its value (an
    explicit default included): argparse fills a default only where the namespace lacks the attribute, so a marker
    left in place means not given. ``argv`` must parse (parse it with ``ap`` first)."""
    marker = object()
    ns = argparse.Namespace(**{a.dest: marker for a in ap._actions if a.dest != argparse.SUPPRESS})
    ap.parse_args(argv, namespace=ns)
    return {d for d, v in vars(ns).items() if v is not marker}


def check_args(ap: argparse.ArgumentParser, ns: argparse.Namespace, given: set[str] | None = None) -> None:
    """Checks that involve several options; a bad combination exits with code 2 and one ``error:`` line. ``given``:
    the options on the command line (``given_options``; None: those whose value differs from the default)."""
    if given is None:
        given = {a.dest for a in ap._actions if getattr(ns, a.dest, a.default) != a.default}
    if ns.validate:
        unused = [a.option_strings[0] for a in ap._actions if a.dest in VALIDATE_UNUSED and a.dest in given]
        if unused:
            ap.error(f"argument --validate: not with {', '.join(unused)} (the FILE's points give the workload of "
                     "every prediction; --validate prints the validation table only)")
    top = (ns.gpus - 1) * 256
    if ns.redundant_experts is not None and ns.redundant_experts > top:
        ap.error(f"argument --redundant-experts: expected an integer in [0, (--gpus - 1) x 256 = {top}] (at the top "
                 f"every rank holds every expert), got {ns.redundant_experts}")
    if ns.validate and "redundant_experts" in given:
        ap.error("argument --redundant-experts: not with --validate (the benchmark's DEP places every expert once: "
                 "the validation simulates R = 0)")
    if ns.owner_load is not None and len(ns.owner_load) != ns.gpus:
        ap.error(f"argument --owner-load: expected {ns.gpus} values (one per GPU), got {len(ns.owner_load)}")
    if ns.owner_load is not None and (ns.sweep or ns.plot or ns.validate):
        ap.error("argument --owner-load: not with --sweep, --plot or --validate (they take even routing, or the "
                 "loads each measured point recorded)")
    budgets = [ns.max_tokens] + ([16384, 32768] if ns.sweep else [])
    if not ns.validate and max(budgets) > MAX_REQUESTS_PER_ITERATION * ns.isl:
        what = "--sweep's budgets (16384, 32768)" if ns.max_tokens <= MAX_REQUESTS_PER_ITERATION * ns.isl else \
            f"--max-tokens ({ns.max_tokens})"
        ap.error(f"argument --max-tokens: expected at most {MAX_REQUESTS_PER_ITERATION} x --isl "
                 f"({MAX_REQUESTS_PER_ITERATION * ns.isl} for --isl {ns.isl}: about {MAX_REQUESTS_PER_ITERATION} "
                 f"requests per iteration), got {what}")
    err = None if ns.validate else work_error(ns.gpus, ns.iterations, 0, ns.layers, ns.isl, max(budgets))
    if err:
        ap.error(f"argument --iterations: {err} (fewer --iterations, --gpus or --layers, or a smaller --max-tokens / "
                 "--isl)")
    if ns.dense_layers is not None and ns.dense_layers > ns.layers:
        ap.error(f"argument --dense-layers: expected at most --layers ({ns.layers}), got {ns.dense_layers}")
    if ns.plot and not have_matplotlib():
        ap.error(MISSING)
    if ns.plot:
        try:
            plot_format(ns.plot)
        except ValueError as e:
            ap.error(f"argument --plot: {e}")
    if ns.calibration:
        from .costs import load_calibration

        try:
            cal = load_calibration(ns.calibration)
        except ValueError as e:
            ap.error(f"argument --calibration: {e}")
        if "hardware" in given and cal["hardware"] != ns.hardware:
            ap.error(f"argument --calibration: {ns.calibration} is a {cal['hardware']!r} profile, not with --hardware "
                     f"{ns.hardware} (--calibration replaces --hardware's profile: give one of them)")


def _span(lo_hi: list[int]) -> str:
    return f"{lo_hi[0]}" if lo_hi[0] == lo_hi[1] else f"{lo_hi[0]}-{lo_hi[1]}"


def _text(res: dict, rows: list[dict] | None) -> str:
    c, w, m = res["config"], res["workload"], res["model"]
    eplb = m["dep_eplb"]
    src = (f"uniform in [{max(1, math.ceil(c['ratio'] * c['isl'] - 1e-9))}, {c['isl']}]" if c.get("ratio") is not None
           else f"gamma, mean {c['isl']}, CV {c['cv']:g}")
    lines = [
        f"DeepSeek-R1 prefill on {c['gpus']} x {c['calibration']}: {c['layers']} layers ({c['dense_layers']} dense + "
        f"{c['moe_layers']} MoE), request lengths {src}, at most {c['max_tokens']} tokens per iteration, "
        f"{c['iterations']} iterations per rank, seed {c['seed']}"
        + (f", what-if {c['overrides']}" if c["overrides"] else ""),
        f"per rank and iteration: {w['tokens_per_iteration']:.0f} tokens in {w['requests_per_iteration']:.2f} "
        f"requests (sampled request CV {w['request_tokens_cv']:.3f}); {m['partition']['experts_per_rank']} experts "
        f"per rank, DWDP fetches {m['partition']['remote_experts']} per MoE layer in "
        f"{m['fetch_ms_per_moe_layer']:.2f} ms; DEP moves {m['dep_rows_per_rank_per_layer']:.0f} rows per rank "
        "and layer",
        f"DEP: {_span(m['partition']['dep_experts_per_rank'])} experts per rank + {eplb['redundant_experts']} "
        f"redundant slots ({_span(eplb['slots_per_rank'])} a rank, {eplb['replicas_used']} replicas carrying pairs); "
        f"fullest rank {eplb['pairs_max_over_mean']:.3f} x the mean pairs ({eplb['owner_pairs_max_over_mean']:.3f} "
        "without replicas)",
        "",
        f"{'ms per iteration':18s} {'DWDP':>11s} {'DEP':>11s} {'(DEP-DWDP)/DEP':>15s}",
    ]
    dw, dep = res["dwdp"], res["dep"]
    for cat in CATEGORIES:
        a, b = dw["breakdown_ms"][cat], dep["breakdown_ms"][cat]
        lines.append(f"{cat:18s} {a:11.1f} {b:11.1f} {100 * (b - a) / dep['iteration_ms']:+14.2f}%")
    lines.append(f"{'iteration':18s} {dw['iteration_ms']:11.1f} {dep['iteration_ms']:11.1f} "
                 f"{-100 * res['iteration_latency_change']:+14.2f}%")
    lines.append(f"{'overlapped copy':18s} {dw['overlapped_copy_ms']:11.1f} {'-':>11s}   (not in the sum)")
    lines.append(f"{'interference':18s} {sum(dw['interference_ms'].values()):11.1f} {'-':>11s}   (in DWDP's compute "
                 "rows)")
    lines.append(f"TPS/GPU: DWDP {dw['tps_per_gpu']:.0f}, DEP {dep['tps_per_gpu']:.0f}; ratio DWDP / DEP = "
                 f"{res['ratio']:.4f}; DEP synchronisation wait {100 * dep['shares']['sync_wait']:.1f} %, "
                 f"communication {100 * dep['shares']['communication']:.1f} % of its iteration")
    if "paper" in res:
        p = res["paper"]
        lines += ["", "The paper (GB200 x 4, Table 3, read as ms per iteration) against this prediction:",
                  f"  iteration latency DWDP / DEP - 1: paper {100 * p['paper_iteration_latency_change']:+.1f} %, "
                  f"predicted {100 * p['predicted_iteration_latency_change']:+.1f} %",
                  f"  DEP communication share: paper {100 * p['paper_dep_communication_share']:.1f} %, predicted "
                  f"{100 * p['predicted_dep_communication_share']:.1f} %; synchronisation share: paper "
                  f"{100 * p['paper_dep_sync_share']:.1f} %, predicted {100 * p['predicted_dep_sync_share']:.1f} %",
                  f"  overlapped copy: paper {p['paper_overlapped_copy_ms']:.0f}, predicted "
                  f"{p['predicted_overlapped_copy_ms']:.0f}",
                  f"  ({p['note']})"]
    if rows:
        lines += ["", f"{'setting':14s} {'budget':>7s} {'tokens/it':>9s} {'DWDP TPS':>9s} {'DEP TPS':>9s} "
                      f"{'ratio':>7s} {'DEP sync':>8s} {'DEP comm':>8s} {'exposed':>8s}"]
        for r in rows:
            name = f"cv {r['cv']:g}" if "cv" in r else f"ratio {r['input_ratio']:g}"
            lines.append(f"{name:14s} {r['max_tokens']:7d} {r['tokens_per_iteration']:9.0f} "
                         f"{r['dwdp']['tps_per_gpu']:9.0f} {r['dep']['tps_per_gpu']:9.0f} {r['ratio']:7.4f} "
                         f"{100 * r['dep']['sync_share']:7.1f}% {100 * r['dep']['communication_share']:7.1f}% "
                         f"{100 * r['dwdp']['exposed_fetch_share']:7.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m dwdp_ops sim") -> int:
    ap = build_parser(prog)
    ns = ap.parse_args(argv)
    check_args(ap, ns, given_options(ap, argv))
    ov = Overrides(attention_tflops=ns.attention_tflops, fetch_gbps=ns.fetch_gbps, dispatch_gbps=ns.dispatch_gbps,
                   dispatch_latency_us=ns.dispatch_latency_us, interference=ns.interference,
                   rank_slowdown=ns.rank_slowdown)
    hardware = ns.calibration or ns.hardware
    if ns.validate:
        try:
            v = validate_e2e(json.loads(open(ns.validate).read()), hardware=hardware, overrides=ov)
        except (ValueError, KeyError, TypeError) as e:
            ap.error(f"argument --validate: {e}")
        print(json.dumps(v, indent=1) if ns.json else validation_table(v))
        return 0
    cfg = SimConfig(hardware=hardware, gpus=ns.gpus, isl=ns.isl, ratio=ns.ratio, cv=ns.cv, max_tokens=ns.max_tokens,
                    layers=ns.layers, dense_layers=ns.dense_layers, seed=ns.seed, iterations=ns.iterations,
                    overrides=ov, owner_load=ns.owner_load, redundant_experts=ns.redundant_experts)
    try:  # rates (profile or what-if) that take a time beyond floats' range
        res = simulate(cfg)
    except ValueError as e:
        ap.error(str(e))
    if is_paper_setting(res["config"]) and res["config"]["calibration"] == "gb200" and ns.owner_load is None:
        res["paper"] = paper_comparison(res)
    rows = None
    if ns.sweep or ns.plot:
        rows = sweep(hardware, ns.gpus, isl=ns.isl, ratio=cfg.ratio, layers=ns.layers,
                     dense_layers=ns.dense_layers, seed=ns.seed, iterations=ns.iterations, overrides=ov,
                     budgets=(16384, 32768) if ns.sweep else (ns.max_tokens,),
                     redundant_experts=ns.redundant_experts)
        if ns.sweep:
            res["sweep"] = rows
    # the results first: a figure that cannot be written (checked when parsed, but the file system can still refuse:
    # root in /proc, a full disk, a directory removed meanwhile) loses only itself, with one error line
    if ns.json:
        print(json.dumps(res, indent=1), flush=True)
    else:
        print(_text(res, res.get("sweep")), flush=True)
    if ns.plot:
        try:
            plot(res, ns.plot, [r for r in rows if "cv" in r])
        except OSError as e:
            print(f"{ap.prog}: error: argument --plot: the figure was not written: {e}", file=sys.stderr)
            return 1
        if not ns.json:
            print(f"figure: {ns.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
