"""``python -m dwdp_ops demo`` (also ``dwdp-demo``): DWDP on DeepSeek-R1.

With two or more GPUs it launches one rank per GPU (``dwdp_ops.demo_gpu``): a layer-truncated real-dimension
DeepSeek-R1 that fits, every rank serving its own prompts with prefill and greedy decode, each step moving weights
(DWDP) or tokens (DEP) as ``--policy auto`` picks from measured rates (or as forced), and prints per rank the modes
chosen, tokens/s, fetch GB/s, exposed fetch time, dispatch time and the check against an all-local run of the same
requests. Without GPUs
it prints each rank's expert partition and fetch plan for the real R1 MoE layer (expert weights in ``--dtype``,
fp8 like the GPU demo unless asked otherwise) and runs every rank's prompts
through the tiny-config numpy reference, saying plainly that the kernels need NVIDIA GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
from tqdm import tqdm

from ._cli import HelpFormatter, divisor_of, plain, positive_float, positive_int, seed_int, usable_gpus
from .layout import ExpertLayout
from .partition import ExpertPartition

DEMO_DTYPES = ("bfloat16", "float8_e4m3fn")
POLICIES = ("auto", "prefetch_all", "on_demand", "dispatch")
CPU_RANKS = 4  # ranks the CPU path plans for without --ranks
CPU_PROMPT_LENS = (3, 16)  # shortest and longest prompt of the CPU path, in tokens (drawn uniformly per request)
GPU_ONLY = "GPU:"  # the help of every option that only the GPU demo uses starts so; the CPU path reports them unused


def cpu_max_steps() -> int:
    """The most ``--steps`` the CPU path takes: ``ReferenceModel.generate(prompt, steps)`` feeds back all but the
    last new token, so a request holds ``len(prompt) + steps - 1`` positions, at most the tiny config's
    ``max_seq_len`` for the longest prompt (``CPU_PROMPT_LENS``)."""
    from .models.deepseek_r1 import DeepSeekConfig

    return DeepSeekConfig.tiny().max_seq_len - CPU_PROMPT_LENS[1] + 1


def plan_report(ranks: int, dtype: str = "bfloat16") -> list[dict]:
    """Each rank's local experts and fetch plan for one real R1 MoE layer with expert weights in ``dtype``."""
    from .models.deepseek_r1 import DeepSeekConfig

    r1 = DeepSeekConfig.r1()
    part = ExpertPartition.disjoint(r1.n_routed_experts, ranks)
    lay = ExpertLayout.moe(r1.dim, r1.moe_inter_dim, dtype)
    out = []
    for r in range(ranks):
        runs = part.fetch_plan(r)
        out.append({"rank": r, "local_experts": list(part.local_range(r)),
                    "fetch_plan": [{"peer": p, "experts": [a, b], "MiB": (b - a) * lay.expert_stride / 2**20}
                                   for p, a, b in runs],
                    "fetch_GiB_per_layer": part.num_remote * lay.expert_stride / 2**30})
    return out


def run_cpu(ranks: int, prompts_per_rank: int, steps: int, seed: int, progress: bool) -> dict:
    """Every rank's prompts (lengths in ``CPU_PROMPT_LENS``) through the tiny-config numpy reference, ``steps``
    greedy tokens each; ``1 <= steps <= cpu_max_steps()`` (ValueError otherwise, before any work)."""
    from .models.deepseek_r1 import DeepSeekConfig, ReferenceModel, init_weights

    if not 1 <= steps <= cpu_max_steps():
        raise ValueError(f"steps must be in [1, {cpu_max_steps()}] (the tiny config's max_seq_len holds the longest "
                         f"prompt, {CPU_PROMPT_LENS[1]} tokens, and steps - 1 more), got {steps}")
    cfg = DeepSeekConfig.tiny()
    weights = init_weights(cfg, seed)
    rng = np.random.default_rng(seed)
    lo, hi = CPU_PROMPT_LENS
    results = []
    t0 = time.perf_counter()
    total = 0
    bar = tqdm(total=ranks * prompts_per_rank, desc="requests", disable=not progress)
    for r in range(ranks):
        for i in range(prompts_per_rank):
            prompt = rng.integers(0, cfg.vocab_size, size=int(rng.integers(lo, hi + 1))).tolist()
            tokens, _ = ReferenceModel(cfg, weights).generate(prompt, steps)
            total += len(prompt) + steps
            results.append({"rank": r, "request": i, "prompt_len": len(prompt), "tokens": tokens})
            bar.update()
    bar.close()
    dt = time.perf_counter() - t0
    return {"config": "tiny", "requests": results, "tokens_per_s": total / dt, "seconds": dt}


def gpu_command(ns, gpus: int, out: str) -> list[str]:
    """The launcher command of the GPU demo: ``dwdp_ops.demo_gpu`` run as a module on every rank (run as a script,
    its directory would come first on ``sys.path`` and ``import torch`` would find ``dwdp_ops/torch.py``)."""
    import sys

    cmd = [sys.executable, "-m", "dwdp_ops.launch", "-n", str(gpus), "--timeout", str(ns.timeout),
           "-m", "dwdp_ops.demo_gpu", "--",  # "--": the module's own options follow
           "--out", out, "--prompts", str(ns.prompts), "--steps", str(ns.steps),
           "--min-len", str(ns.min_len), "--max-len", str(ns.max_len), "--vocab", str(ns.vocab),
           "--policy", ns.policy, "--seed", str(ns.seed), "--dtype", ns.dtype,
           "--router", getattr(ns, "router", "balanced")]
    if ns.moe_layers:
        cmd += ["--moe-layers", str(ns.moe_layers)]
    if ns.no_check:
        cmd.append("--no-check")
    if ns.no_graphs:
        cmd.append("--no-graphs")
    return cmd


def run_gpu(ns, gpus: int) -> dict:
    """Launches ``gpus`` rank workers (one per GPU, the first ``gpus`` visible ones) and returns rank 0's report."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = gpu_command(ns, gpus, out)
        proc = subprocess.run(cmd, stdout=sys.stderr if ns.json else None, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not os.path.exists(out):
            raise SystemExit(f"the GPU demo failed (launcher exit code {proc.returncode}); see the rank output above")
        with open(out) as f:
            return json.load(f)


def json_text(report) -> str:
    """``report`` as JSON text: a float that is not finite (the check's errors with NaN logits, ``serve.compare``)
    becomes the string "NaN", "Infinity" or "-Infinity" (how JavaScript and Python spell it), since NaN and Infinity
    are not JSON and a strict parser would refuse the whole report."""
    def fix(v):
        if isinstance(v, float) and not math.isfinite(v):
            return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v

    return json.dumps(fix(report), indent=1, allow_nan=False)


def _num(value, spec: str) -> str:
    """``value`` formatted with ``spec``, or "n/a" right-aligned to the same width for None (a rate
    ``summarize`` could not time: its time was 0, as a graphed step's per-layer spans are)."""
    if value is None:
        width = spec.split(".")[0]
        return format("n/a", f">{width}") if width else "n/a"
    return format(value, spec)


def print_gpu(rep: dict) -> None:
    c = rep["config"]
    print(f"DeepSeek-R1 real dimensions, {c['layers']} layers ({c['dense_layers']} dense + {c['moe_layers']} MoE, "
          f"{c['experts']} experts, top-{c['top_k']}), vocab {c['vocab']}, experts {c.get('dtype', 'bfloat16')}, "
          f"on {rep['gpus']} x {rep['card']}, "
          f"policy {rep['policy']}, decode {'CUDA graphs' if rep.get('graphs') else 'eager'}")
    tot = {"prefill": 0.0, "decode": 0.0}
    untimed: set = set()  # a kind whose tokens/s some rank could not time (summarize: None): its total is partial
    for r in rep["ranks"]:
        s = r["summary"]
        for kind in ("prefill", "decode"):
            if kind not in s:
                continue
            x = s[kind]
            if x["tokens_per_s"] is None:
                untimed.add(kind)
            else:
                tot[kind] += x["tokens_per_s"]
            modes = ", ".join(f"{m} x{c}" for m, c in x.get("modes", {}).items()) or "/".join(x["policies"])
            print(f"rank {r['rank']} {kind:7s} ({modes}): {x['tokens']:6d} tokens "
                  f"{_num(x['tokens_per_s'], '9.1f')} tok/s | fetch {x['fetch_GB']:7.2f} GB at "
                  f"{_num(x['fetch_GBps'], '6.1f')} GB/s | exposed fetch {x['exposed_fetch_ms']:8.2f} ms "
                  f"({_num(x['exposed_fetch_frac'], '.1%')} of the step time) | "
                  f"dispatch+combine {x.get('comm_ms', 0.0):7.2f} ms | "
                  f"attention {_num(x['attn_tflops'], '.0f')} TFLOP/s, expert GEMMs {_num(x['expert_tflops'], '.0f')} "
                  "TFLOP/s")
        if "check" in r:
            ck = r["check"]
            print(f"rank {r['rank']} check against the all-local run ({ck['steps']} steps): max logits rel err "
                  f"{ck['max_rel_err']:.2e}, greedy tokens identical: {ck['tokens_equal']}")
    dense = [r["dense_tflops"] for r in rep["ranks"]]
    part = {k: " (ranks with a step time only)" if k in untimed else "" for k in tot}
    print(f"all ranks: prefill {tot['prefill']:.0f} tok/s{part['prefill']}, decode {tot['decode']:.1f} tok/s"
          f"{part['decode']}; dense bf16 GEMM "
          f"{min(dense):.0f}-{max(dense):.0f} TFLOP/s (same run)")


def build_parser(prog: str = "dwdp-demo") -> argparse.ArgumentParser:
    from .demo_gpu import max_steps, moe_layers_arg
    from .models.deepseek_r1 import DeepSeekConfig

    r1 = DeepSeekConfig.r1()
    epilog = (f"Options marked '{GPU_ONLY}' are checked on every path but used only by the GPU demo;\n"
              "the CPU path names those given in its closing note.")
    ap = argparse.ArgumentParser(prog=prog, description=plain(__doc__), formatter_class=HelpFormatter, epilog=epilog)
    ap.add_argument("--ranks", type=divisor_of(r1.n_routed_experts, "DeepSeek-R1's routed experts"), default=None,
                    help=f"ranks, one per GPU (default: every usable GPU), at least 2 and at most the usable GPUs; "
                         f"CPU path: ranks to plan for, simulated one after another (default {CPU_RANKS}); must "
                         f"divide {r1.n_routed_experts}, R1's routed experts")
    ap.add_argument("--prompts", type=positive_int, default=None,
                    help="requests per rank (default: 8 on GPUs, 2 on CPU)")
    ap.add_argument("--steps", type=positive_int, default=None,
                    help=f"greedy steps per request (default: 16 on GPUs, 8 on CPU); at most {cpu_max_steps()} on CPU "
                         f"(the tiny config's {DeepSeekConfig.tiny().max_seq_len} positions hold a prompt of up to "
                         f"{CPU_PROMPT_LENS[1]} tokens and the steps), at most {max_steps(0)} minus --max-len on GPUs "
                         "(R1's max_seq_len)")
    ap.add_argument("--seed", type=seed_int, default=0,
                    help="seed of the weights and the prompts (an integer in [0, 2^32))")
    ap.add_argument("--dtype", choices=DEMO_DTYPES, default="float8_e4m3fn",
                    help="routed-expert dtype: the GPU model's experts (fp8: e4m3 bytes with rowwise scales, "
                         "requantised from the checkpoint's 128x128 blocks), or what the CPU fetch plan is sized for")
    ap.add_argument("--cpu", action="store_true", help="run the CPU path even where GPUs are present")
    ap.add_argument("--moe-layers", type=moe_layers_arg, default=None,
                    help=f"GPU: MoE layers, 1 to {r1.n_moe_layers}, or 'all' (R1's {r1.n_moe_layers}: the whole "
                         f"{r1.n_layers}-layer model); default: as many as fit. The per-rank memory plan is printed "
                         "first, and a count that does not fit is an error naming it")
    ap.add_argument("--vocab", type=positive_int, default=32768,
                    help=f"GPU: vocabulary cut, at most the real {r1.vocab_size}")
    ap.add_argument("--min-len", type=positive_int, default=1024, help="GPU: shortest prompt, in tokens")
    ap.add_argument("--max-len", type=positive_int, default=4096, help="GPU: longest prompt, in tokens")
    ap.add_argument("--policy", default="auto", choices=POLICIES,
                    help="GPU: auto picks per step between moving weights and moving tokens (dwdp_ops.policy); "
                         "prefetch_all fetches every remote expert ahead, on_demand fetches the routed ones, "
                         "dispatch sends the tokens to the experts' owners (DEP)")
    ap.add_argument("--router", choices=("balanced", "skewed"), default="balanced",
                    help="GPU: the random model's router: balanced (gate correction bias 0: every expert used, even "
                         "loads, what a trained model's balancing bias aims at) or skewed (bias std 0.5: a few "
                         "experts take most tokens)")
    ap.add_argument("--no-check", action="store_true", help="GPU: skip the all-local comparison run")
    ap.add_argument("--no-graphs", action="store_true",
                    help="GPU: run decode steps eagerly (default: each decode step a CUDA graph where its mode allows)")
    ap.add_argument("--timeout", type=positive_float, default=1200, help="GPU: seconds before the job is ended")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.set_defaults(max_vocab=r1.vocab_size)
    return ap


def check_args(ap: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """Checks that involve several options, and ``--max-len`` against R1's ``max_seq_len`` (on every path, as the
    epilog says of the GPU options); a bad value exits with code 2 and one ``error:`` line."""
    from .demo_gpu import check_max_len

    check_max_len(ap, ns.max_len)
    if ns.min_len > ns.max_len:
        ap.error(f"--min-len ({ns.min_len}) must be <= --max-len ({ns.max_len})")
    if ns.vocab > ns.max_vocab:
        ap.error(f"argument --vocab: expected at most {ns.max_vocab} (DeepSeek-R1's vocabulary), got {ns.vocab}")


def check_path_args(ap: argparse.ArgumentParser, ns: argparse.Namespace, on_gpus: bool, gpus: int = 0) -> None:
    """Fills the path's defaults of ``--ranks`` (every one of the ``gpus`` usable GPUs, or ``CPU_RANKS``),
    ``--prompts`` and ``--steps``, checks ``--ranks`` against the GPUs on the GPU path and ``--steps`` against the
    path's longest sequence (``cpu_max_steps()`` on CPU, ``demo_gpu.max_steps(--max-len)`` on GPUs); a bad value
    exits with code 2 and one ``error:`` line naming the limit, before any work. The default ``--ranks`` on GPUs
    must divide R1's routed experts as a given one must (6 GPUs: a usage error asking for ``--ranks``)."""
    from .demo_gpu import check_steps
    from .models.deepseek_r1 import DeepSeekConfig

    if on_gpus and ns.ranks is not None and not 2 <= ns.ranks <= gpus:
        ap.error(f"argument --ranks: the GPU demo runs one rank per GPU, from 2 to the {gpus} usable here, got "
                 f"{ns.ranks} (--cpu plans for any divisor of R1's experts on the numpy reference)")
    experts = DeepSeekConfig.r1().n_routed_experts
    if on_gpus and ns.ranks is None and experts % gpus:
        fits = [d for d in range(2, gpus + 1) if experts % d == 0]
        ap.error(f"argument --ranks: its default, every one of the {gpus} usable GPUs, does not divide DeepSeek-R1's "
                 f"{experts} routed experts; give --ranks, one of {fits}")
    ns.ranks = (gpus if on_gpus else CPU_RANKS) if ns.ranks is None else ns.ranks
    ns.prompts = (8 if on_gpus else 2) if ns.prompts is None else ns.prompts
    ns.steps = (16 if on_gpus else 8) if ns.steps is None else ns.steps
    if on_gpus:
        check_steps(ap, ns.steps, ns.max_len)
    elif ns.steps > cpu_max_steps():
        ap.error(f"argument --steps: expected at most {cpu_max_steps()} on the CPU path (the tiny config's "
                 f"max_seq_len holds a prompt of up to {CPU_PROMPT_LENS[1]} tokens and steps - 1 more), got {ns.steps}")


def unused_gpu_options(ap: argparse.ArgumentParser, ns: argparse.Namespace) -> list[str]:
    """The GPU-only options (help starting with ``GPU_ONLY``) given a value other than their default: what the CPU
    path leaves unused and says so."""
    return [a.option_strings[0] for a in ap._actions
            if (a.help or "").startswith(GPU_ONLY) and getattr(ns, a.dest) != a.default]


def main(argv: list[str] | None = None, prog: str = "dwdp-demo") -> int:
    """Entry point of ``dwdp-demo`` and ``python -m dwdp_ops demo`` (which passes its own ``prog``)."""
    ap = build_parser(prog)
    ns = ap.parse_args(argv)
    check_args(ap, ns)
    gpus, why = usable_gpus()
    on_gpus = gpus >= 2 and not ns.cpu
    check_path_args(ap, ns, on_gpus, gpus)
    if on_gpus:
        rep = run_gpu(ns, ns.ranks)
        if ns.json:
            print(json_text(rep))
        else:
            print_gpu(rep)
        return 0
    report = {"gpus": gpus, "dtype": ns.dtype, "plans": plan_report(ns.ranks, ns.dtype)}
    report["cpu_reference"] = run_cpu(ns.ranks, ns.prompts, ns.steps, ns.seed, progress=not ns.json)
    if gpus == 1 and not ns.cpu:
        note = ("DWDP needs two or more GPUs (one rank per GPU) and this machine has one, so this ran the tiny "
                "configuration on the numpy reference.")
    elif ns.cpu and gpus:
        note = "--cpu: ran the tiny configuration on the numpy reference."
    else:
        note = ("The DWDP kernels need NVIDIA GPUs (none usable here: " + why + "), so this ran the tiny "
                "configuration on the numpy reference; with two or more GPUs the demo runs the real-dimension model.")
    unused = unused_gpu_options(ap, ns)
    if unused:
        note += f" Not used on this path (GPU only): {', '.join(unused)}."
    report["note"] = note
    if ns.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"Fetch plan of one DeepSeek-R1 MoE layer over {ns.ranks} rank(s), expert weights in {ns.dtype}:")
    for p in report["plans"]:
        runs = ", ".join(f"{x['experts'][0]}-{x['experts'][1] - 1} from rank {x['peer']}" for x in p["fetch_plan"])
        print(f"rank {p['rank']}: keeps experts {p['local_experts'][0]}-{p['local_experts'][1] - 1}; "
              f"fetches {runs or 'nothing'} ({p['fetch_GiB_per_layer']:.2f} GiB per MoE layer in {ns.dtype})")
    for r in report["cpu_reference"]["requests"]:
        print(f"rank {r['rank']} request {r['request']} (prompt {r['prompt_len']} tokens): {r['tokens']}")
    print(f"tokens/s (numpy reference, tiny config): {report['cpu_reference']['tokens_per_s']:.1f}")
    print(note)
    return 0
