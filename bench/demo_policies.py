"""``demo`` under each policy on the same machine and prompts: does moving tokens for decode pay, and does ``auto``
keep large prefills on moving weights?

    python bench/demo_policies.py [--policies auto,on_demand] [--prompts 8 --min-len 1024 --max-len 4096 --steps 16]

Runs ``python -m dwdp_ops demo --json`` once per policy (all GPUs of the machine, one rank per GPU), with the same
seed (same weights, same prompts per rank), the same number of MoE layers (the first run plans it from free memory
with the dispatcher's buffers reserved, the others are given that count), decode steps as CUDA graphs in every run
(``--no-graphs``: eager in every run) and the all-local check on. A whole demo
is minutes of set-up (weights generated and loaded), so the policies run one after the other, not interleaved: each
run's own warm-up (the same prompts, prefill + one decode step) precedes its timed steps, and the figures are the
per-rank prefill and decode tokens/s of the timed steps (CUDA events around each step, ``serve.summarize``): over all
decode steps, and at the median decode step (the first decode step after a prefill whose mode leaves the ranks
independent absorbs the wait for the slowest rank's prefill when decode moves tokens; both are reported).

Output: bench/results/demo_policies_<card>_N<n>.json (every run's report, per-rank ratios against the last policy
given, the modes each step used) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_facts, result_name, write_json  # noqa: E402


def run_demo(policy: str, ns, moe_layers: int | None) -> dict:
    cmd = [sys.executable, "-m", "dwdp_ops", "demo", "--json", "--policy", policy, "--prompts", str(ns.prompts),
           "--min-len", str(ns.min_len), "--max-len", str(ns.max_len), "--steps", str(ns.steps),
           "--seed", str(ns.seed), "--timeout", str(ns.timeout)]
    if moe_layers:
        cmd += ["--moe-layers", str(moe_layers)]
    if ns.no_graphs:
        cmd.append("--no-graphs")
    cmd += ["--dtype", ns.dtype]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        if proc.returncode != 0:
            log.seek(0)
            sys.stderr.write(log.read()[-6000:])
            raise SystemExit(f"demo --policy {policy} failed with exit code {proc.returncode}")
    rep = json.loads(proc.stdout)
    rep["command"] = " ".join(["python", "-m", "dwdp_ops"] + cmd[3:])
    return rep


def per_rank(rep: dict, kind: str, key: str = "tokens_per_s") -> list[float]:
    return [r["summary"][kind][key] for r in rep["ranks"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="auto,on_demand", help="comma-separated; ratios are against the last one")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--moe-layers", type=int, default=None, help="default: what the first run plans")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per demo run")
    ap.add_argument("--no-graphs", action="store_true", help="decode steps eager in every run (default: CUDA graphs)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float8_e4m3fn"], help="routed experts")
    ap.add_argument("--tag", default="")
    ns = ap.parse_args()
    policies = [p for p in ns.policies.split(",") if p]
    if len(policies) < 2:
        ap.error("--policies needs at least two policies to compare")
    runs, layers = {}, ns.moe_layers
    for p in policies:
        runs[p] = run_demo(p, ns, layers)
        layers = layers or runs[p]["config"]["moe_layers"]
        print(f"{p}: {runs[p]['config']['moe_layers']} MoE layers done", flush=True)
    base = policies[-1]
    table = ["| policy | rank | prefill modes | prefill tok/s | decode modes | decode tok/s (all steps / median step) "
             "| decode x " + base + " (all / median) | prefill x " + base + " | tokens = all-local | max logits rel err |",
             "|" + " --- |" * 10]
    ratios = {}
    for p, rep in runs.items():
        dec, pre = per_rank(rep, "decode"), per_rank(rep, "prefill")
        bdec, bpre = per_rank(runs[base], "decode"), per_rank(runs[base], "prefill")
        med, bmed = per_rank(rep, "decode", "tokens_per_s_median_step"), per_rank(runs[base], "decode", "tokens_per_s_median_step")
        ratios[p] = {"decode": [a / b for a, b in zip(dec, bdec)], "prefill": [a / b for a, b in zip(pre, bpre)],
                     "decode_median_step": [a / b for a, b in zip(med, bmed)]}
        for i, r in enumerate(rep["ranks"]):
            s = r["summary"]
            ck = r.get("check", {})
            table.append(f"| {p} | {r['rank']} | {s['prefill'].get('modes')} | {pre[i]:.0f} | {s['decode'].get('modes')} "
                         f"| {dec[i]:.1f} / {med[i]:.1f} | {ratios[p]['decode'][i]:.2f} / "
                         f"{ratios[p]['decode_median_step'][i]:.2f} | {ratios[p]['prefill'][i]:.2f} "
                         f"| {ck.get('tokens_equal')} | {ck.get('max_rel_err', float('nan')):.2e} |")
    facts = machine_facts()
    data = dict(benchmark="demo_policies", policies=policies, baseline=base, moe_layers=layers, prompts=ns.prompts,
                graphs=not ns.no_graphs, dtype=ns.dtype,
                min_len=ns.min_len, max_len=ns.max_len, steps=ns.steps, seed=ns.seed, ratios=ratios, runs=runs,
                **facts, method=__doc__)
    gpus = runs[base]["gpus"]
    name = result_name("demo_policies", facts["card"], f"_N{gpus}{'_' + ns.tag if ns.tag else ''}")
    path = write_json(name, data)
    print("\n".join(table))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
