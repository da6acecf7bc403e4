"""Where a decode step's time goes, kernel by kernel: the demo's model with every expert local on one GPU.

    python bench/decode_breakdown.py [--moe-layers 6] [--dtype float8_e4m3fn] [--prompts 8] [--steps 8]
    python bench/decode_breakdown.py --dry-run      # the configuration and its weight bytes; needs no GPU

One GPU. The real-dimension DeepSeek-R1 cut to 3 dense + ``--moe-layers`` MoE layers and to ``--vocab`` (the
demo's model: deterministic random weights, routed experts in ``--dtype``), every routed expert on this GPU
(``LocalExperts``, the all-local run of the demo's check). The rank-0 prompts of the demo (``serve.prompts_for``,
lengths in [--min-len, --max-len]) are prefilled, then greedy decode steps run as CUDA graphs, as ``demo`` runs them:
two warm-up steps (the capture), then ``--steps`` steps timed with CUDA events (median) and, separately,
``--steps`` steps under ``torch.profiler`` (CUDA kernels inside the graph replays are recorded), whose kernels are
summed by name and by category (expert GEMMs, dense GEMMs, attention softmax, our quantisation kernels, indexing,
other elementwise and reductions). The prefill's activation peak (PyTorch's allocator) is recorded next to the
memory plan's estimate for that step (``models.deepseek_r1.memory``). A decode step of DEP or on-demand DWDP runs
the same kernels plus its token or weight movement, so this splits the part that every mode shares from what the
modes change (bench/demo_policies.py).

Output: bench/results/decode_breakdown_<card>[_tag].json, a table on stdout.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import file_tag, machine_facts, result_name, write_json  # noqa: E402

# first match wins; kernel names of PyTorch 2.11 / CUTLASS / cuBLAS on Hopper and of dwdp_ops._C
CATEGORIES = [
    ("expert GEMMs (grouped)", r"[Gg]rouped|f8f8bf16|_grouped_mm|GroupProblemShape"),
    ("fp8 quantisation (ours)", r"quant_rows|swiglu_quant"),
    ("dense GEMMs", r"gemm|Gemm|GEMM|sm90_xmma|cutlass|nvjet|cublas|splitKreduce"),
    ("attention softmax", r"[Ss]oft[Mm]ax"),
    ("indexing (gather / scatter / sort)", r"index|Index|gather|scatter|sort|Sort|radix|cub::"),
    ("elementwise and reductions", r"elementwise|Elementwise|reduce|Reduce|vectorized|unrolled|CatArray|fill"),
]


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name):
            return cat
    return "other"


def parse(argv=None):
    from dwdp_ops._cli import seed_int
    from dwdp_ops.demo_gpu import moe_layers_arg
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe-layers", type=moe_layers_arg, default=6, help="1 to R1's 58, or 'all'")
    ap.add_argument("--dtype", default="float8_e4m3fn", choices=["bfloat16", "float8_e4m3fn"], help="routed experts")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--router", choices=("balanced", "skewed"), default="balanced",
                    help="the random model's router (models.deepseek_r1.gpu_weights.ROUTERS)")
    ap.add_argument("--top", type=int, default=15, help="kernels listed by name")
    ap.add_argument("--tag", type=file_tag, default="")
    ap.add_argument("--dry-run", action="store_true")
    ns = ap.parse_args(argv)
    if ns.moe_layers < 1 or ns.prompts < 1 or ns.steps < 1 or not 1 <= ns.min_len <= ns.max_len:
        ap.error("--moe-layers, --prompts and --steps must be >= 1 and 1 <= --min-len <= --max-len")
    if not 1 <= ns.vocab <= DeepSeekConfig.r1().vocab_size:  # the model is R1 cut to --vocab
        ap.error(f"--vocab must be in [1, {DeepSeekConfig.r1().vocab_size}] (DeepSeek-R1's vocabulary), got {ns.vocab}")
    if ns.top < 0:
        ap.error(f"--top must be >= 0, got {ns.top}")
    return ns


def main(argv=None) -> int:
    ns = parse(argv)
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig

    cfg = DeepSeekConfig.r1(n_layers=3 + ns.moe_layers, vocab_size=ns.vocab)
    per_expert = 3 * cfg.moe_inter_dim * cfg.dim * (1 if ns.dtype == "float8_e4m3fn" else 2)
    expert_gb = ns.moe_layers * cfg.n_routed_experts * per_expert / 1e9
    if ns.dry_run:
        print(f"{cfg.n_layers} layers (3 dense + {ns.moe_layers} MoE), vocab {cfg.vocab_size}, routed experts "
              f"{ns.dtype}: {expert_gb:.1f} GB of experts on one GPU; {ns.prompts} prompts of {ns.min_len}-"
              f"{ns.max_len} tokens, {ns.steps} timed + {ns.steps} profiled decode steps")
        return 0

    import torch
    from dwdp_ops.models.deepseek_r1.gpu import GpuModel, LocalExperts
    from dwdp_ops.models.deepseek_r1.gpu_weights import DeviceWeights
    from dwdp_ops.models.deepseek_r1.memory import plan_memory
    from dwdp_ops.models.deepseek_r1.serve import prompts_for
    from torch.profiler import ProfilerActivity, profile

    fp8 = ns.dtype == "float8_e4m3fn"
    weights = DeviceWeights(cfg, ns.seed, torch.bfloat16, expert_dtype=torch.float8_e4m3fn if fp8 else None,
                            router=ns.router)
    prompts = prompts_for(0, ns.prompts, ns.min_len, ns.max_len, cfg.vocab_size, ns.seed)
    n = len(prompts)
    model = GpuModel(cfg, weights, LocalExperts(weights, cfg), max_requests=n,
                     max_seq=max(map(len, prompts)) + 2 * ns.steps + 4)
    reqs = list(range(n))
    # the prefill's activation peak (PyTorch's allocator above what the weights and caches hold), next to the memory
    # plan's estimate for the same step (models.deepseek_r1.memory: issue 18 asks for the peak within 5 %)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logits = model.forward(reqs, prompts)
    toks = logits.argmax(-1).tolist()
    act_peak = torch.cuda.max_memory_allocated() - before
    step_tokens = sum(map(len, prompts))
    act_plan = plan_memory(cfg, 1, expert_itemsize=1 if fp8 else 2, requests=n, step_tokens=step_tokens,
                           cache_len=model.cache_len).items["activations"]

    def decode():
        nonlocal toks
        out = model.forward(reqs, [[t] for t in toks], graph=True)
        toks = out.argmax(-1).tolist()  # synchronises

    for _ in range(2):  # the capture, then one replay
        decode()
    times = []
    for _ in range(ns.steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(model.tstream)
        decode()
        b.record(model.tstream)
        b.synchronize()
        times.append(a.elapsed_time(b))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ns.steps):
            decode()
        torch.cuda.synchronize()
    kernels = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", 0.0) or 0.0
        if t > 0 and ev.count > 0:
            kernels[ev.key] = {"us_per_step": t / ns.steps, "calls_per_step": ev.count / ns.steps,
                               "category": category(ev.key)}
    cats: dict[str, float] = {}
    for k in kernels.values():
        cats[k["category"]] = cats.get(k["category"], 0.0) + k["us_per_step"]
    busy = sum(cats.values())
    step_ms = median(times)
    facts = machine_facts()
    data = dict(benchmark="decode_breakdown", moe_layers=ns.moe_layers, dtype=ns.dtype, router=ns.router, prompts=n,
                prompt_lens=list(map(len, prompts)), vocab=cfg.vocab_size, steps=ns.steps, seed=ns.seed,
                expert_GB=expert_gb, prefill_tokens=step_tokens, prefill_activation_peak_bytes=act_peak,
                planned_activation_bytes=act_plan, step_ms=step_ms, step_ms_all=times, kernel_busy_us_per_step=busy,
                categories_us_per_step=cats, kernels=kernels,
                **facts, method=__doc__)
    path = write_json(result_name("decode_breakdown", facts["card"], f"_{ns.tag}" if ns.tag else ""), data)
    print(f"prefill of {step_tokens} tokens: activation peak {act_peak / 2**30:.2f} GiB, memory plan "
          f"{act_plan / 2**30:.2f} GiB ({act_plan / act_peak - 1:+.1%})")
    print(f"decode step (graphed, {n} requests, {ns.moe_layers} MoE layers, experts {ns.dtype}): median {step_ms:.3f} ms;"
          f" kernels busy {busy / 1e3:.3f} ms per step")
    print("| category | us per step | share of kernel time |\n| --- | --- | --- |")
    for c, us in sorted(cats.items(), key=lambda x: -x[1]):
        print(f"| {c} | {us:.0f} | {us / busy:.1%} |")
    print("| kernel | category | us per step | calls per step |\n| --- | --- | --- | --- |")
    for name, k in sorted(kernels.items(), key=lambda x: -x[1]["us_per_step"])[: ns.top]:
        print(f"| {name[:90]} | {k['category']} | {k['us_per_step']:.0f} | {k['calls_per_step']:.0f} |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
