"""Diagnosis (2 ranks): is the DWDP composite equal to the all-local experts, and does the grouped expert GEMM
(unaligned / aligned groups) equal the per-expert loop? Prints one line per check."""

import sys

import dwdp_ops
import torch
from dwdp_ops.models.deepseek_r1 import DeepSeekConfig
from dwdp_ops.models.deepseek_r1.gpu import DwdpExperts, GpuModel, LocalExperts
from dwdp_ops.models.deepseek_r1.gpu_weights import DeviceWeights
from dwdp_ops.models.deepseek_r1.serve import build_store
from dwdp_ops.scheduler import PrefetchScheduler

with dwdp_ops.init(timeout=200) as rt:
    torch.cuda.set_device(rt.device)
    me = rt.rank()
    cfg = DeepSeekConfig.mini(n_layers=3)
    w = DeviceWeights(cfg, 0)
    store = build_store(cfg, w)
    for p in range(cfg.n_moe_layers):
        store.fetch_ce(p)
    torch.cuda.synchronize()
    dw = DwdpExperts(store, PrefetchScheduler(store), torch.bfloat16)
    local = LocalExperts(w, cfg)
    for p in range(cfg.n_moe_layers):
        eq = [torch.equal(a, b) for a, b in zip(dw.views[p], local._layers[p])]
        print(f"rank {me}: layer {p} composite == local: {eq}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(5 + me)
    for N in (7, 300, 2000):
        x = (torch.randn((N, cfg.dim), generator=g, device="cuda") * 0.5).to(torch.bfloat16)
        ids = torch.randint(0, 256, (N, 8), generator=g, device="cuda")
        ids[: N // 2, 0] = 3  # an unbalanced expert
        wt = torch.rand((N, 8), generator=g, device="cuda")
        res = {}
        for name, grouped, align in (("loop", False, 0), ("grouped", True, 1), ("grouped16", True, 16)):
            m = GpuModel(cfg, w, local, max_requests=1, max_seq=8, grouped=grouped, align=align)
            with torch.cuda.stream(m.tstream):
                r1 = m._routed(x, wt, ids, *local._layers[0])
                r2 = m._routed(x, wt, ids, *local._layers[0])
                r3 = m._routed(x, wt, ids, *dw.views[0])
            torch.cuda.synchronize()
            res[name] = (r1.float(), r2.float(), r3.float())
        ref = res["loop"][0]
        for name, (r1, r2, r3) in res.items():
            e = [float((r - ref).norm() / ref.norm()) for r in (r1, r2, r3)]
            print(f"rank {me}: N={N} {name}: rel err vs loop local/local-again/composite = "
                  f"{e[0]:.2e} {e[1]:.2e} {e[2]:.2e}", flush=True)
    dwdp_ops.barrier()
    store.close()
sys.exit(0)
