"""Prefetch overlap: does the copy-engine prefetch hide behind the expert GEMMs, and what does it cost them?

Run on N GPUs:  python -m dwdp_ops.launch -n 4 bench/prefetch_overlap.py [--tokens 1024,...,65536]

DeepSeek-R1 expert shapes (H=7168, I=2048, E=256, top-8), fp16 weights (CuPy has fp16 GEMMs; fp8 would halve the
fetch bytes and double the GEMM rate, leaving T* about the same), experts partitioned over the N ranks.
  1. slowdown: one layer's expert GEMMs alone, then with the copy-engine prefetch of another layer running, then with
     the NVSHMEM fetch (16 SMs) running; medians, same run.
  2. exposed fetch: a step over the store's MoE layers under PrefetchScheduler(prefetch_all) for tokens per rank from
     1K to 64K; per layer, the time the compute stream waits for its prefetch (layers 0-1 are the warm-up, which a
     model hides behind its dense layers and first attention; steady state is layer >= 2), next to the roofline
     T* = (E - L) * bytes_per_param * C / (2 * k * B) from the GEMM rate C and fetch bandwidth B measured here.
  3. a stream timeline of one step (copy and compute streams), as a PNG.
Output: bench/results/prefetch_overlap_<card>_N<n>.json (and $OUT), PNG timeline by bench/render.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

import cupy as cp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dwdp_ops
from common import machine_facts, result_name, time_op, write_json
from dwdp_ops import ExpertLayout, ExpertPartition, ExpertStore, PrefetchScheduler

H, I, E, K = 7168, 2048, 256, 8


class Experts:
    """Activations for T tokens per rank spread evenly over the E experts (m = T * k / E rows each)."""

    def __init__(self, tokens: int):
        self.m = max(1, tokens * K // E)
        rs = cp.random.RandomState(5)
        self.x = (rs.standard_normal((E, self.m, H), dtype=cp.float32) * 0.1).astype(cp.float16)
        self.h = cp.empty((E, self.m, 2 * I), cp.float16)
        self.y = cp.empty((E, self.m, H), cp.float16)
        self.flops = 2.0 * E * self.m * (2 * I * H + I * H)
        import torch

        self.tx, self.th, self.ty = (torch.from_dlpack(a) for a in (self.x, self.h, self.y))

    def run(self, store: ExpertStore, layer: int, stream) -> None:
        """The layer's expert GEMMs, enqueued on ``stream``. Through torch.bmm on DLPack views of the composite
        range: cupy.matmul makes a transposed operand contiguous first, i.e. copies every expert's weights
        (41 TFLOP/s against 688 for torch.bmm on H100, bench/results/gemm_probe_H100_80GB_HBM3.json)."""
        import torch

        w13 = torch.from_dlpack(store.composite(layer, "w13"))  # [E, 2I, H] fp16, read in place
        w2 = torch.from_dlpack(store.composite(layer, "w2"))  # [E, H, I]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr)):
            torch.bmm(self.tx, w13.transpose(1, 2), out=self.th)
            a = self.th[:, :, :I]  # silu(gate) * up is elementwise; its cost is small next to the GEMMs
            torch.bmm(a, w2.transpose(1, 2), out=self.ty)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1024,2048,4096,8192,16384,32768,65536")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--skip-slowdown", action="store_true", help="only the exposed-fetch sweep")
    ns = ap.parse_args()
    with dwdp_ops.init(timeout=600):
        me, n = dwdp_ops.rank(), dwdp_ops.world_size()
        part = ExpertPartition.disjoint(E, n)
        layout = ExpertLayout.moe(H, I, "float16")
        store = ExpertStore(part, layout, ns.layers)
        for layer in range(ns.layers):
            for ti, t in enumerate(layout.tensors):
                # small random fp16 values (no infs/NaNs in the GEMMs)
                loc = store.local(layer, t.name).view(cp.float16)
                rs = cp.random.RandomState(100 * me + 10 * layer + ti)
                for e in range(store.L):
                    loc[e] = (rs.standard_normal(t.shape, dtype=cp.float32) * 0.02).astype(cp.float16)
        cp.cuda.Device().synchronize()
        dwdp_ops.barrier()
        compute = cp.cuda.Stream(non_blocking=True)
        side = cp.cuda.Stream(non_blocking=True)
        # fill every slot once so that the GEMMs never read uninitialised pages
        for layer in range(ns.layers):
            store.fetch_ce(layer, side)
        side.synchronize()
        dwdp_ops.barrier()

        def bar():
            cp.cuda.Device().synchronize()
            dwdp_ops.barrier()

        # fetch bandwidth B (copy engine, staggered) and the NVSHMEM kernel, one layer, all ranks at once
        fetch_ms, _ = time_op(lambda: store.fetch_ce(1, compute), compute, ns.repeats, 2, before=bar)
        B = store.remote_bytes() / (fetch_ms * 1e6)
        nv_ms, _ = time_op(lambda: store.fetch_nvshmem(1, None, None, compute, num_blocks=16), compute, ns.repeats, 2, before=bar)
        rec = {"fetch_ce_ms": fetch_ms, "fetch_ce_gbps": B, "fetch_nvshmem16_ms": nv_ms,
               "remote_bytes": store.remote_bytes(), "slowdown": [], "exposed": [], "timeline": None}

        # 1. GEMM slowdown under concurrent fetch of another layer (layer 1 fetched while layer 0 computes)
        for T in () if ns.skip_slowdown else (16384, 32768):
            ex = Experts(T)
            alone, _ = time_op(lambda ex=ex: ex.run(store, 0, compute), compute, ns.repeats, 2, before=bar)
            with_ce, with_nv = [], []
            for _ in range(ns.repeats + 1):
                bar()
                for mode, sink in (("ce", with_ce), ("nv", with_nv)):
                    bar()
                    a, b = cp.cuda.Event(), cp.cuda.Event()
                    if mode == "ce":
                        store.fetch_ce(1, side)
                    else:
                        store.fetch_nvshmem(1, None, None, side, num_blocks=16)
                    a.record(compute)
                    ex.run(store, 0, compute)
                    b.record(compute)
                    b.synchronize()
                    side.synchronize()
                    sink.append(cp.cuda.get_elapsed_time(a, b))
            c_rate = ex.flops / (alone * 1e-3)
            rec["slowdown"].append({"tokens": T, "gemm_ms": alone, "gemm_tflops": c_rate / 1e12,
                                    "with_ce_ms": median(with_ce[1:]), "with_nvshmem16_ms": median(with_nv[1:]),
                                    "slowdown_ce": median(with_ce[1:]) / alone - 1,
                                    "slowdown_nvshmem16": median(with_nv[1:]) / alone - 1,
                                    "fetch_longer_than_gemm": fetch_ms > alone})
            del ex
            cp.get_default_memory_pool().free_all_blocks()

        # 2. exposed fetch against tokens per rank
        sched = PrefetchScheduler(store, policy="prefetch_all", copy_stream=side)
        for T in [int(x) for x in ns.tokens.split(",")]:
            need = E * max(1, T * K // E) * (2 * H + 2 * I) * 2  # x, h, y in fp16
            fits = need < cp.cuda.runtime.memGetInfo()[0] - (3 << 30)
            votes = dwdp_ops.get_runtime().rendezvous.allgather(f"fits:{T}", json.dumps(fits).encode())
            if not all(json.loads(v) for v in votes):
                rec.setdefault("skipped_tokens", []).append(T)  # the activations do not fit beside the store
                continue
            ex = Experts(T)
            compute_ms, _ = time_op(lambda ex=ex: [ex.run(store, p, compute) for p in range(ns.layers)], compute, 3, 1, before=bar)
            waits, steps = [], []
            for r in range(4):
                bar()
                evs = []
                t0 = cp.cuda.Event()
                t0.record(compute)
                sched.trace = [] if r == 3 else None
                sched.begin_step()
                for p in range(ns.layers):
                    a, b, c = cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event()
                    a.record(compute)
                    sched.wait(p, compute)
                    b.record(compute)
                    ex.run(store, p, compute)
                    c.record(compute)
                    sched.release(p, compute)
                    evs.append((a, b, c))
                evs[-1][2].synchronize()
                side.synchronize()
                if r == 0:
                    continue  # warm-up
                waits.append([cp.cuda.get_elapsed_time(a, b) for a, b, _ in evs])
                steps.append(cp.cuda.get_elapsed_time(t0, evs[-1][2]))
                if r == 3 and T in (16384, 65536):
                    tl = {"tokens": T, "compute": [], "copy": []}
                    for p, (a, b, c) in enumerate(evs):
                        tl["compute"].append([p, cp.cuda.get_elapsed_time(t0, a), cp.cuda.get_elapsed_time(t0, b),
                                              cp.cuda.get_elapsed_time(t0, c)])
                    starts = {lay: ev for kind, lay, ev in sched.trace if kind == "fetch"}
                    for kind, lay, ev in sched.trace:
                        if kind == "fetch_end":
                            tl["copy"].append([lay, cp.cuda.get_elapsed_time(t0, starts[lay]), cp.cuda.get_elapsed_time(t0, ev)])
                    rec.setdefault("timelines", []).append(tl)
            sched.trace = None
            per_layer_wait = [median(w[p] for w in waits) for p in range(ns.layers)]
            layer_ms = median(steps) / ns.layers
            steady = per_layer_wait[2:] or per_layer_wait
            gemm_layer_ms = compute_ms / ns.layers
            rec["exposed"].append({
                "tokens": T, "gemm_layer_ms": gemm_layer_ms, "gemm_tflops": ex.flops / (gemm_layer_ms * 1e-3) / 1e12,
                "step_ms": median(steps), "layer_ms": layer_ms, "wait_ms_per_layer": per_layer_wait,
                "steady_exposed_ms": max(steady), "steady_exposed_frac": max(steady) / layer_ms,
            })
            del ex
            cp.get_default_memory_pool().free_all_blocks()
        C = max(x["gemm_tflops"] for x in rec["exposed"]) * 1e12
        bpp = 2  # fp16
        rec["roofline"] = {"C_tflops": C / 1e12, "B_gbps": B, "bytes_per_param": bpp,
                           "T_star": (E - store.L) * bpp * C / (2 * K * B * 1e9)}
        gathered = dwdp_ops.get_runtime().rendezvous.allgather("overlap", json.dumps(rec).encode())
        if me == 0:
            per_rank = [json.loads(g) for g in gathered]
            data = dict(benchmark="prefetch_overlap", world_size=n, repeats=ns.repeats, layers=ns.layers,
                        dtype="float16", **machine_facts(), ranks=per_rank)
            print(f"wrote {write_json(result_name('prefetch_overlap', data['card'], f'_N{n}{ns.tag}'), data)}")
            r0 = per_rank[0]
            print(f"B={r0['fetch_ce_gbps']:.1f} GB/s C={r0['roofline']['C_tflops']:.0f} TFLOP/s T*={r0['roofline']['T_star']:.0f}")
            for s in r0["slowdown"]:
                print(f"T={s['tokens']}: GEMM {s['gemm_ms']:.2f} ms; +CE {s['slowdown_ce']:+.1%}; +NVSHMEM16 {s['slowdown_nvshmem16']:+.1%}")
            for x in r0["exposed"]:
                worst = max(max(p["exposed"][i]["steady_exposed_frac"] for i in range(len(p["exposed"])) if p["exposed"][i]["tokens"] == x["tokens"]) for p in per_rank)
                print(f"T={x['tokens']:6d}: layer {x['layer_ms']:.2f} ms, GEMM {x['gemm_layer_ms']:.2f} ms ({x['gemm_tflops']:.0f} TF/s), "
                      f"waits {[f'{w:.2f}' for w in x['wait_ms_per_layer']]}, steady exposed {x['steady_exposed_frac']:.1%} (worst rank {worst:.1%})")
        dwdp_ops.barrier()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
