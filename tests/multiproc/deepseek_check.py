"""DWDP integration check of the DeepSeek-R1 GPU forward on N GPUs.

    deepseek_check.py CONFIG [STEPS]     CONFIG: mini (bf16, device-generated weights) or tiny (float32, numpy weights)

Every rank serves its own prompts of different lengths. The model runs prefill + STEPS - 1 greedy decode steps on DWDP
under ``prefetch_all`` and under ``on_demand`` (one ExpertStore, one scheduler per policy), then with every expert
local on this GPU; each DWDP run must match the all-local run (logits relative error <= 1e-2 at every step, identical
tokens). With ``tiny`` the all-local run must also match the numpy reference request by request.
"""

from __future__ import annotations

import sys

import dwdp_ops
import numpy as np
import torch
from dwdp_ops.models.deepseek_r1 import DeepSeekConfig, ReferenceModel, init_weights
from dwdp_ops.models.deepseek_r1.gpu import DwdpExperts, GpuModel, LocalExperts
from dwdp_ops.models.deepseek_r1.gpu_weights import DeviceWeights, NumpyWeights
from dwdp_ops.models.deepseek_r1.serve import build_store, compare, prompts_for, run_requests
from dwdp_ops.scheduler import PrefetchScheduler


def main() -> int:
    which = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    with dwdp_ops.init(timeout=300):
        me = dwdp_ops.rank()
        torch.cuda.set_device(dwdp_ops.get_runtime().device)
        if which == "tiny":
            cfg = DeepSeekConfig.tiny()
            W = init_weights(cfg, 0)
            weights = NumpyWeights(cfg, W, torch.float32)
            prompts = prompts_for(me, 3, 2, 9, cfg.vocab_size)
        else:
            cfg = DeepSeekConfig.mini()
            W = None
            weights = DeviceWeights(cfg, 0, torch.bfloat16)
            prompts = prompts_for(me, 4, 5, 120, cfg.vocab_size)
        max_seq = max(map(len, prompts)) + steps
        store = build_store(cfg, weights)
        runs = {}
        try:
            for policy in ("prefetch_all", "on_demand"):
                sched = PrefetchScheduler(store, policy=policy, top_k=cfg.n_activated_experts)
                model = GpuModel(cfg, weights, DwdpExperts(store, sched, weights.dtype), max_requests=len(prompts),
                                 max_seq=max_seq)
                runs[policy] = run_requests(model, prompts, steps, scheduler=sched, store=store)
                del model
            store.check_errors()
        finally:
            dwdp_ops.barrier()
            store.close()
        local = GpuModel(cfg, weights, LocalExperts(weights, cfg), max_requests=len(prompts), max_seq=max_seq)
        base = run_requests(local, prompts, steps)
        ok = True
        for policy, run in runs.items():
            c = compare(run, base)
            good = c["max_rel_err"] <= 1e-2 and c["tokens_equal"]
            ok &= good
            used = sorted({s.policy for s in run.steps})
            fetched = sum(s.fetch_bytes for s in run.steps) / 2**20
            print(f"rank {me}: {which} {policy} (steps used {used}, {fetched:.0f} MiB fetched) vs all-local: "
                  f"max rel err {c['max_rel_err']:.2e}, tokens equal {c['tokens_equal']}: {'OK' if good else 'MISMATCH'}",
                  flush=True)
        if W is not None:
            errs, same = [], True
            for r, prompt in enumerate(prompts):
                toks, logits = ReferenceModel(cfg, W, absorbed=True).generate(prompt, steps)
                same &= toks == base.tokens[r]
                errs += [float(np.linalg.norm(base.logits[i][r] - logits[i]) / np.linalg.norm(logits[i]))
                         for i in range(steps)]
            good = max(errs) <= 1e-3 and same
            ok &= good
            print(f"rank {me}: tiny all-local GPU vs numpy reference: max rel err {max(errs):.2e}, tokens equal {same}: "
                  f"{'OK' if good else 'MISMATCH'}", flush=True)
        print(f"rank {me}: tokens {base.tokens}", flush=True)
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
