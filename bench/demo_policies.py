"""``demo`` under two policies on the same machine, store and prompts, interleaved: does moving tokens for decode pay,
and does ``auto`` keep large prefills on moving weights?

    python bench/demo_policies.py [--policies auto,on_demand] [--pairs 3] [--dtype float8_e4m3fn]
                                  [--prompts 8 --min-len 1024 --max-len 4096 --steps 16]
    python bench/demo_policies.py --dry-run      # the command it runs; needs no GPU

One job of the GPU demo's rank workers (``dwdp_ops.demo_gpu``, all GPUs of the machine, one rank per GPU, the same
command ``python -m dwdp_ops demo`` launches) with ``--compare-policy``: the weights are generated and the store
built once; the first policy serves the prompts (prefill + greedy decode, its own warm-up first), then the second
policy's warm-up, then ``--pairs`` pairs of whole runs of the same prompts on the same store, one run per policy,
the leading policy alternating per pair (A B, B A, A B, ...); every run of both policies is checked against the
all-local run of the same requests (the first ``--check-steps`` steps, default 4). Decode steps are CUDA graphs in
every run (``--no-graphs``: eager). Figures per rank: prefill and decode tokens/s of each run (CUDA events around
each step, ``serve.summarize``), over all decode steps and at the median decode step (the first decode step after a
prefill whose mode leaves the ranks independent absorbs the wait for the slowest rank's prefill when decode moves
tokens); the ratios are medians over the pairs of the per-pair ratios, first policy over second. When either policy
moves tokens the job reserves the dispatcher's memory for both, so it may fit fewer MoE layers than a standalone
``demo --policy on_demand`` (the layer count is in the report). The table's mode columns sum each mode's steps over every run of the policy.

Output: bench/results/demo_policies_<card>_N<n>[_tag].json (the demo report with every run's summary and check,
the per-pair and median ratios) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import file_tag, machine_facts, result_name, write_json  # noqa: E402

POLICIES = ("auto", "prefetch_all", "on_demand", "dispatch")


def parse(argv=None):
    from dwdp_ops._cli import positive_int, seed_int
    from dwdp_ops.demo_gpu import check_steps, moe_layers_arg
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="auto,on_demand", help="two policies, comma-separated; ratios first / second")
    ap.add_argument("--pairs", type=int, default=3, help="interleaved pairs of whole runs")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--vocab", type=positive_int, default=32768)
    ap.add_argument("--moe-layers", type=moe_layers_arg, default=None, help="1 to R1's 58 or 'all'; default: as many as fit")
    ap.add_argument("--timeout", type=positive_int, default=540,
                    help="seconds for the whole job (set-up, the first policy's run, its warm-up, 2 x --pairs runs, "
                         "the all-local check); within one 10-minute device call")
    ap.add_argument("--no-graphs", action="store_true", help="decode steps eager in every run (default: CUDA graphs)")
    ap.add_argument("--dtype", default="float8_e4m3fn", choices=["bfloat16", "float8_e4m3fn"], help="routed experts")
    ap.add_argument("--router", choices=("balanced", "skewed"), default="balanced",
                    help="the random model's router (models.deepseek_r1.gpu_weights.ROUTERS)")
    ap.add_argument("--gpus", type=positive_int, default=None, help="default: every GPU of the machine")
    ap.add_argument("--tag", type=file_tag, default="")
    ap.add_argument("--dry-run", action="store_true", help="print the command and exit")
    ns = ap.parse_args(argv)
    ns.policy_list = [p for p in ns.policies.split(",") if p]
    if len(ns.policy_list) != 2 or len(set(ns.policy_list)) != 2 or any(p not in POLICIES for p in ns.policy_list):
        ap.error(f"--policies needs two different policies of {', '.join(POLICIES)}, got {ns.policies!r}")
    if ns.pairs < 1 or ns.prompts < 1 or ns.steps < 2 or not 1 <= ns.min_len <= ns.max_len:
        ap.error("--pairs and --prompts must be >= 1, --steps >= 2 and 1 <= --min-len <= --max-len")
    # what every rank worker of dwdp_ops.demo_gpu refuses, refused here before the job starts on every GPU
    if ns.vocab > DeepSeekConfig.r1().vocab_size:
        ap.error(f"argument --vocab: expected at most {DeepSeekConfig.r1().vocab_size} (DeepSeek-R1's vocabulary), "
                 f"got {ns.vocab}")
    check_steps(ap, ns.steps, ns.max_len)
    return ns


def command(ns, gpus: int, out: str) -> list[str]:
    """The demo's own launcher command (``dwdp_ops.demo.gpu_command``) with the interleaved comparison added."""
    from dwdp_ops.demo import gpu_command

    demo_ns = argparse.Namespace(prompts=ns.prompts, steps=ns.steps, min_len=ns.min_len, max_len=ns.max_len,
                                 vocab=ns.vocab, policy=ns.policy_list[0], seed=ns.seed, dtype=ns.dtype,
                                 moe_layers=ns.moe_layers, no_check=False, no_graphs=ns.no_graphs, timeout=ns.timeout,
                                 router=ns.router)
    return gpu_command(demo_ns, gpus, out) + ["--compare-policy", ns.policy_list[1], "--pairs", str(ns.pairs)]


def ratios(rank: dict, a: str, b: str) -> dict:
    """Per-pair ratios a / b of one rank's runs (prefill tok/s, decode tok/s over all steps and at the median step),
    and their medians. A pair whose rate is None in either run (``summarize``: no step time) has the ratio None,
    left out of the median (None where no pair has one)."""
    keys = {"prefill": ("prefill", "tokens_per_s"), "decode": ("decode", "tokens_per_s"),
            "decode_median_step": ("decode", "tokens_per_s_median_step")}
    per = {k: [] for k in keys}
    for pair in rank["interleaved"]:
        ra, rb = pair["runs"][a]["summary"], pair["runs"][b]["summary"]
        for k, (kind, key) in keys.items():
            x, y = ra[kind][key], rb[kind][key]
            per[k].append(None if x is None or y is None else x / y)
    return {"per_pair": per, "median": {k: _median(v) for k, v in per.items()}}


def _median(values):
    """The median of the values that are not None; None if there is none."""
    known = [v for v in values if v is not None]
    return median(known) if known else None


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def modes_over(summaries: list, kind: str) -> str:
    """The steps of each mode summed over runs (``kind`` "prefill" or "decode"), e.g. "dispatch x45"."""
    total: dict = {}
    for s in summaries:
        for m, c in s[kind]["modes"].items():
            total[m] = total.get(m, 0) + c
    return ", ".join(f"{m} x{c}" for m, c in total.items()) or "-"


def table(rep: dict, a: str, b: str) -> list[str]:
    rows = [f"| rank | policy | prefill modes (steps, all runs) | decode modes (steps, all runs) | prefill tok/s (median of runs) | decode tok/s, all steps "
            f"/ median step | decode {a} / {b} (all / median step; per pair) | prefill {a} / {b} | tokens = all-local "
            f"(every run) | largest comparable rel err |", "|" + " --- |" * 10]
    for r in rep["ranks"]:
        rr = r["ratios"]
        for pol in (a, b):
            runs = [p["runs"][pol] for p in r["interleaved"]]
            s = [x["summary"] for x in runs]
            checks = [x["check"] for x in runs if x["check"]]
            ok = all(c["tokens_equal"] for c in checks) if checks else None
            err = max((c.get("comparable_rel_err", c["max_rel_err"]) for c in checks), default=float("nan"))
            dec, pre = "", ""
            if pol == a:
                dec = (f"{_num(rr['median']['decode'], '.2f')} / {_num(rr['median']['decode_median_step'], '.2f')}; "
                       + ", ".join(_num(x, ".2f") for x in rr["per_pair"]["decode"]))
                pre = _num(rr["median"]["prefill"], ".2f")
            rows.append(f"| {r['rank']} | {pol} | {modes_over(s, 'prefill')} | {modes_over(s, 'decode')} "
                        f"| {_num(_median([x['prefill']['tokens_per_s'] for x in s]), '.0f')} "
                        f"| {_num(_median([x['decode']['tokens_per_s'] for x in s]), '.1f')} / "
                        f"{_num(_median([x['decode']['tokens_per_s_median_step'] for x in s]), '.1f')} | {dec} "
                        f"| {pre} | {ok} | {err:.2e} |")
    return rows


def result(ns: argparse.Namespace, rep: dict, cmd: list[str], facts: dict, argv: list[str]) -> dict:
    """The result file's record: the run's settings, the machine (``facts``: ``machine_facts()``, whose ``command``
    this record replaces by the script's own command line as run from the repository), the demo's command and its
    report."""
    a, b = ns.policy_list
    return dict(benchmark="demo_policies", policies=[a, b], baseline=b, pairs=ns.pairs, dtype=ns.dtype,
                router=ns.router, moe_layers=rep["config"]["moe_layers"], prompts=ns.prompts, graphs=not ns.no_graphs,
                min_len=ns.min_len, max_len=ns.max_len, steps=ns.steps, seed=ns.seed,
                **dict(facts, command=" ".join(["python", "bench/demo_policies.py", *argv])),
                demo_command=" ".join(cmd[1:]), report=rep, method=__doc__)


def main(argv=None) -> int:
    ns = parse(argv)
    a, b = ns.policy_list
    if ns.dry_run:
        print(" ".join(command(ns, ns.gpus or 2, "report.json")))
        return 0
    import cupy as cp

    gpus = ns.gpus or cp.cuda.runtime.getDeviceCount()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = command(ns, gpus, out)
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not os.path.exists(out):
            raise SystemExit(f"the demo job failed (launcher exit code {proc.returncode}); see its output above")
        rep = json.loads(Path(out).read_text())
    for r in rep["ranks"]:
        r["ratios"] = ratios(r, a, b)
    facts = machine_facts()
    data = result(ns, rep, cmd, facts, argv if argv is not None else sys.argv[1:])
    name = result_name("demo_policies", facts["card"], f"_N{gpus}{'_' + ns.tag if ns.tag else ''}")
    path = write_json(name, data)
    print("\n".join(table(rep, a, b)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
