"""DeepSeek-R1 forward on DWDP: attention and expert-GEMM TFLOP/s against the dense GEMM rate, and exposed fetch.

    python -m dwdp_ops.launch -n 2 bench/deepseek_forward.py [--tokens 4096,16384,32768] [--repeats 10]

Real R1 dimensions (bf16), 1 dense + 3 MoE layers, vocab 8192, experts split over the N ranks. For each number of
tokens per rank, a prefill of 16 requests of tokens/16 each under ``PrefetchScheduler(prefetch_all)``, --repeats
timed repeats (default 10, the count docs/benchmarks.md states for every figure) after a warm-up, all ranks starting
each repeat together after a barrier; figures are medians over repeats; per repeat the CUDA-event spans of the
attention blocks, of the two grouped expert GEMMs (with the activation between them) and of the waits for experts. The dense bf16 GEMM rate (8192^3) is measured in
the same run. Output: bench/results/deepseek_forward_<card>_N<n>.json (and $OUT).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dwdp_ops
import torch
from common import machine_facts, result_name, write_json
from dwdp_ops.models.deepseek_r1 import DeepSeekConfig
from dwdp_ops.models.deepseek_r1.gpu import DwdpExperts, GpuModel, dense_gemm_tflops
from dwdp_ops.models.deepseek_r1.gpu_weights import DeviceWeights
from dwdp_ops.models.deepseek_r1.serve import build_store, prompts_for, run_requests
from dwdp_ops.scheduler import PrefetchScheduler


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,16384,32768")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10, help="timed prefill repeats per token count (after a warm-up)")
    ns = ap.parse_args()
    with dwdp_ops.init(timeout=900) as rt:
        me, n = rt.rank(), rt.world_size()
        torch.cuda.set_device(rt.device)
        cfg = DeepSeekConfig.r1(n_layers=4, vocab_size=8192).replace(n_dense_layers=1)
        weights = DeviceWeights(cfg, 0, torch.bfloat16)
        store = build_store(cfg, weights)
        sched = PrefetchScheduler(store, policy="prefetch_all", top_k=cfg.n_activated_experts)
        rows = []
        dense = dense_gemm_tflops()
        try:
            for T in [int(x) for x in ns.tokens.split(",")]:
                per = T // ns.requests
                model = GpuModel(cfg, weights, DwdpExperts(store, sched, weights.dtype), max_requests=ns.requests,
                                 max_seq=per + 1)
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
                       "fetch_GBps": median(s.fetch_bytes / (s.fetch_ms * 1e-3) / 1e9 for s in reps)}
                rec["expert_of_dense"] = rec["expert_tflops"] / dense
                rows.append(rec)
                del model
                torch.cuda.empty_cache()
        finally:
            dwdp_ops.barrier()
            store.close()
        gathered = rt.rendezvous.allgather("deepseek_forward", json.dumps({"rank": me, "dense_tflops": dense, "rows": rows}).encode())
        if me == 0:
            per_rank = [json.loads(g) for g in gathered]
            data = dict(benchmark="deepseek_forward", world_size=n, layers=cfg.n_layers, moe_layers=cfg.n_moe_layers,
                        dtype="bfloat16", repeats=ns.repeats, requests=ns.requests, **machine_facts(), ranks=per_rank)
            print(f"wrote {write_json(result_name('deepseek_forward', data['card'], f'_N{n}'), data)}")
            for i, r0 in enumerate(per_rank[0]["rows"]):
                worst = min(p["rows"][i]["expert_of_dense"] for p in per_rank)
                print(f"T={r0['tokens']:6d}: attention {r0['attn_tflops']:.0f} TFLOP/s, expert GEMMs {r0['expert_tflops']:.0f} "
                      f"TFLOP/s = {r0['expert_of_dense']:.1%} of dense {per_rank[0]['dense_tflops']:.0f} (worst rank {worst:.1%}); "
                      f"step {r0['step_ms']:.1f} ms, waits {[round(w, 2) for w in r0['wait_ms_per_layer']]} ms")
        dwdp_ops.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
