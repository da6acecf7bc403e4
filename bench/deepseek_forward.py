"""DeepSeek-R1 forward on DWDP: attention and expert-GEMM TFLOP/s against the dense GEMM rate, and exposed fetch.

    python -m dwdp_ops.launch -n 2 bench/deepseek_forward.py [--tokens 4096,16384,32768] [--repeats 10]
        [--dtype bfloat16|float8_e4m3fn]

Real R1 dimensions (bf16 model; routed experts bf16, or with ``--dtype float8_e4m3fn`` fp8 e4m3 with rowwise scales
through the path ``demo --dtype float8_e4m3fn`` takes: ``DeviceWeights(expert_dtype=float8_e4m3fn)``, the store
holding the fp8 bytes, every rank all experts' scales, ``DwdpExperts(store, sched, float8_e4m3fn, scales)``, the
expert MLP over ``torch._scaled_grouped_mm``), 1 dense + 3 MoE layers, vocab 8192, experts split over the N ranks. For each number of
tokens per rank, a prefill of 16 requests of tokens/16 each under ``PrefetchScheduler(prefetch_all)``, --repeats
timed repeats (default 10, the count docs/benchmarks.md states for every figure) after a warm-up, all ranks starting
each repeat together after a barrier; figures are medians over repeats; per repeat the CUDA-event spans of the
attention blocks, of the two grouped expert GEMMs (with the activation between them; in fp8 also the per-token
activation quantisation before each) and of the waits for experts, and the fetched bytes and copy time per step.
The dense bf16 GEMM rate (8192^3) is measured in the same run, and in fp8 also the dense fp8 rate (rowwise
``torch._scaled_mm``), which is then the yardstick of ``expert_of_dense``. Output:
bench/results/deepseek_forward_<card>_N<n>.json for bf16 (the name the simulator's tests read) and
deepseek_forward_<card>_N<n>_fp8.json for fp8 (and $OUT); the JSON's ``dtype`` names the experts' dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dwdp_ops
from common import int_list, machine_facts, result_name, write_json
from dwdp_ops._cli import positive_int
from dwdp_ops.models.deepseek_r1 import DeepSeekConfig
from dwdp_ops.scheduler import PrefetchScheduler


def _gpu_imports() -> None:
    """torch and the GPU model, imported by ``main`` only after the arguments are checked (a bad value fails at once)."""
    global torch, DwdpExperts, GpuModel, dense_gemm_tflops, DeviceWeights, build_store, expert_scales, prompts_for
    global run_requests
    import torch
    from dwdp_ops.models.deepseek_r1.gpu import DwdpExperts, GpuModel, dense_gemm_tflops
    from dwdp_ops.models.deepseek_r1.gpu_weights import DeviceWeights
    from dwdp_ops.models.deepseek_r1.serve import build_store, expert_scales, prompts_for, run_requests

DTYPES = ("bfloat16", "float8_e4m3fn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="deepseek_forward.py")
    ap.add_argument("--tokens", default="4096,16384,32768")
    ap.add_argument("--requests", type=positive_int, default=16)
    ap.add_argument("--repeats", type=positive_int, default=10, help="timed prefill repeats per token count (after a warm-up)")
    ap.add_argument("--router", choices=("balanced", "skewed"), default="balanced",
                    help="the random model's router (models.deepseek_r1.gpu_weights.ROUTERS; the runs before "
                         "2026-12-01T03:00Z were skewed)")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                    help="routed experts: bf16, or fp8 e4m3 with rowwise scales (the demo's --dtype float8_e4m3fn)")
    ns = ap.parse_args(argv)
    ns.token_counts = int_list(ap, "--tokens", ns.tokens)
    if any(T < ns.requests or T % ns.requests for T in ns.token_counts):
        ap.error(f"--tokens: every count must be a positive multiple of --requests ({ns.requests}), got {ns.tokens}")
    return ns


def result_suffix(n: int, dtype: str) -> str:
    """The result file's suffix: ``_N<n>`` for bf16 (the name earlier runs and tests/test_sim.py use), ``_N<n>_fp8``
    for fp8 experts."""
    return f"_N{n}" + ("_fp8" if dtype == "float8_e4m3fn" else "")


def dense_fp8_tflops(n: int = 8192, repeats: int = 10) -> float:
    """The dense fp8 GEMM rate (``n^3``, rowwise scales, ``torch._scaled_mm``, bf16 out; median of ``repeats``), the
    yardstick of the fp8 expert GEMMs as ``dense_gemm_tflops`` is of the bf16 ones."""
    from dwdp_ops.models.deepseek_r1.fp8 import quant_rows

    qa, sa = quant_rows(torch.randn((n, n), device="cuda").to(torch.bfloat16))
    qb, sb = quant_rows(torch.randn((n, n), device="cuda").to(torch.bfloat16))
    times = []
    for i in range(repeats + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch._scaled_mm(qa, qb.T, sa[:, None], sb[None, :], out_dtype=torch.bfloat16)
        e.record()
        e.synchronize()
        if i >= 2:
            times.append(s.elapsed_time(e))
    return 2.0 * n**3 / (median(times) * 1e-3) / 1e12


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    _gpu_imports()
    fp8 = ns.dtype == "float8_e4m3fn"
    with dwdp_ops.init(timeout=900) as rt:
        me, n = rt.rank(), rt.world_size()
        torch.cuda.set_device(rt.device)
        cfg = DeepSeekConfig.r1(n_layers=4, vocab_size=8192).replace(n_dense_layers=1)
        weights = DeviceWeights(cfg, 0, torch.bfloat16, expert_dtype=torch.float8_e4m3fn if fp8 else None,
                                router=ns.router)
        scales = expert_scales(cfg, weights)  # fp8: every expert's rowwise scales on every rank; bf16: None
        store = build_store(cfg, weights)
        remote_bytes = store.remote_bytes()  # one layer's fetch: fp8 halves it
        sched = PrefetchScheduler(store, policy="prefetch_all", top_k=cfg.n_activated_experts)
        rows = []
        dense = dense_gemm_tflops()
        dense8 = dense_fp8_tflops() if fp8 else None
        yardstick = dense8 if fp8 else dense  # the dense rate of the experts' dtype
        try:
            for T in ns.token_counts:
                per = T // ns.requests
                model = GpuModel(cfg, weights, DwdpExperts(store, sched, weights.expert_dtype, scales),
                                 max_requests=ns.requests, max_seq=per + 1)
                prompts = prompts_for(me, ns.requests, per, per, cfg.vocab_size)
                run_requests(model, prompts, 1, scheduler=sched, store=store)  # warm-up
                reps = []
                for _ in range(ns.repeats):
                    dwdp_ops.barrier()
                    reps.append(run_requests(model, prompts, 1, scheduler=sched, store=store).steps[0])
                rec = {"tokens": T, "requests": ns.requests,
                       "attn_tflops": median(s.attn_flops / (s.attn_ms * 1e-3) / 1e12 for s in reps),
                       "expert_tflops": median(s.expert_flops / (s.experts_ms * 1e-3) / 1e12 for s in reps),
                       "step_ms": median(s.step_ms for s in reps), "attn_ms": median(s.attn_ms for s in reps),
                       "experts_ms": median(s.experts_ms for s in reps), "wait_ms": median(s.wait_ms for s in reps),
                       "wait_ms_per_layer": [median(s.wait_ms_per_layer[i] for s in reps) for i in range(cfg.n_moe_layers)],
                       "fetch_GBps": median(s.fetch_bytes / (s.fetch_ms * 1e-3) / 1e9 for s in reps),
                       "fetch_bytes": median(s.fetch_bytes for s in reps), "fetch_ms": median(s.fetch_ms for s in reps)}
                rec["expert_of_dense"] = rec["expert_tflops"] / yardstick
                rows.append(rec)
                del model
                torch.cuda.empty_cache()
        finally:
            dwdp_ops.barrier()
            store.close()
        mine = {"rank": me, "dense_tflops": dense, "dense_fp8_tflops": dense8, "remote_bytes_per_layer": remote_bytes,
                "rows": rows}
        gathered = rt.rendezvous.allgather("deepseek_forward", json.dumps(mine).encode())
        if me == 0:
            per_rank = [json.loads(g) for g in gathered]
            data = dict(benchmark="deepseek_forward", router=ns.router, world_size=n, layers=cfg.n_layers, moe_layers=cfg.n_moe_layers,
                        dtype=ns.dtype, model_dtype="bfloat16", repeats=ns.repeats, requests=ns.requests,
                        expert_of_dense="expert GEMM rate / dense GEMM rate of the experts' dtype (fp8: dense_fp8_tflops)",
                        **machine_facts(), ranks=per_rank)
            print(f"wrote {write_json(result_name('deepseek_forward', data['card'], result_suffix(n, ns.dtype)), data)}")
            r = per_rank[0]
            print(f"experts {ns.dtype}: one layer's fetch {r['remote_bytes_per_layer'] / 1e9:.3f} GB; dense bf16 "
                  f"{r['dense_tflops']:.0f} TFLOP/s" + (f", dense fp8 {r['dense_fp8_tflops']:.0f} TFLOP/s" if fp8 else ""))
            for i, r0 in enumerate(per_rank[0]["rows"]):
                worst = min(p["rows"][i]["expert_of_dense"] for p in per_rank)
                print(f"T={r0['tokens']:6d}: attention {r0['attn_tflops']:.0f} TFLOP/s, expert GEMMs {r0['expert_tflops']:.0f} "
                      f"TFLOP/s = {r0['expert_of_dense']:.1%} of dense (worst rank {worst:.1%}); fetch "
                      f"{r0['fetch_GBps']:.0f} GB/s; step {r0['step_ms']:.1f} ms, waits {[round(w, 2) for w in r0['wait_ms_per_layer']]} ms")
        dwdp_ops.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
