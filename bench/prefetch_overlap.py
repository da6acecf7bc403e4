"""Prefetch overlap: does the copy-engine prefetch hide behind the expert GEMMs, and what does it cost them?

Run on N GPUs:  python -m dwdp_ops.launch -n 2 bench/prefetch_overlap.py [--tokens 1024,...,65536] [--repeats 10]
    [--dtype float16|float8_e4m3fn] [--fp8-mlp gemms|full]

DeepSeek-R1 expert shapes (H=7168, I=2048, E=256, top-8), experts partitioned over the N ranks, weights in one of:
  float16 (default): the expert GEMMs are two ``torch.bmm`` per layer over the store's composite views (m = T * k / E
     rows per expert; the activation between them is left out, its cost is small next to the GEMMs);
  float8_e4m3fn (issue 13): the store holds fp8 e4m3 bytes (half the fetched bytes; the float32 rowwise scales of all
     experts are held whole by every rank, never fetched) and the layer runs the two rowwise-scaled grouped GEMMs of
     the model's fp8 path, ``torch._scaled_grouped_mm`` over the composite views in place (``--fp8-mlp gemms``,
     default: activations quantised once up front, so the layer is the two GEMMs as in float16), or the whole fp8
     expert MLP ``models.deepseek_r1.fp8.grouped_swiglu_fp8`` (``--fp8-mlp full``: per-token quantisation before each
     GEMM and the SwiGLU, as the model runs it). Rows per expert are rounded up to 16 (the grouped GEMM's alignment).
The fetch is the same copy-engine prefetch in both (the store moves its layout's bytes); T* below is recomputed
from this dtype's bytes per parameter, the GEMM rate C measured here in this dtype and B measured here. Every
comparison is interleaved (bench/common.py ``time_interleaved``): one repeat runs each variant once, in an order
shuffled per repeat (the same on every rank), all ranks starting each variant together after a barrier; figures are medians over
repeats and ratios are the median of the per-repeat ratios, never a ratio of medians from separate loops.
  0. fetch alone: one layer's copy-engine fetch and NVSHMEM fetch (16 SMs), interleaved; B = remote bytes / time.
  1. slowdown: one layer's expert GEMMs alone / with the copy-engine prefetch of another layer running / with the
     NVSHMEM fetch (16 SMs) of another layer running, interleaved per repeat; slowdown = median over repeats of
     (GEMMs with fetch / GEMMs alone in the same repeat) - 1.
  2. exposed fetch: per repeat, a step over the store's MoE layers with no fetch ("alone") and a step under
     PrefetchScheduler(prefetch_all), interleaved, for tokens per rank from 1K to 64K. Exposed fetch of a layer =
     the time the compute stream waits for its prefetch. One denominator everywhere: the layer time alone, i.e. the
     same layer's expert GEMMs in the alone step of the same repeat; exposed fraction = wait / layer time alone,
     median over repeats. Layers 0-1 are the warm-up, which a model hides behind its dense layers and first
     attention; the steady state is layer >= 2 and its figure is the worst steady layer of each repeat (None with
     --layers 2: no steady layer, ``exposed_stats``). Next to it
     the roofline T* = (E - L) * bytes_per_param * C / (2 * k * B) (``t_star``) from the GEMM rate C (alone) and B
     measured here.
  3. a stream timeline of one step (copy and compute streams), as a PNG.
Output: bench/results/prefetch_overlap_<card>_N<n>[_fp8]<tag>.json (and $OUT), PNG timeline by bench/render.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dwdp_ops
from common import (
    disjoint_world,
    file_tag,
    int_list,
    launcher_ranks,
    machine_facts,
    median_ratio,
    result_name,
    time_interleaved,
    write_json,
)
from dwdp_ops import ExpertLayout, ExpertPartition, ExpertStore, PrefetchScheduler


def _gpu_imports() -> None:
    """cupy, imported by ``main`` only after the arguments are checked (a bad value fails at once)."""
    global cp
    import cupy as cp

H, I, E, K = 7168, 2048, 256, 8
DTYPES = ("float16", "float8_e4m3fn")
BYTES_PER_PARAM = {"float16": 2, "float8_e4m3fn": 1}
ALIGN = 16  # rows per group of torch._scaled_grouped_mm: multiples of 16


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prefetch_overlap.py")
    ap.add_argument("--tokens", default="1024,2048,4096,8192,16384,32768,65536")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats of every interleaved comparison")
    ap.add_argument("--tag", type=file_tag, default="", help="suffix of the result file name")
    ap.add_argument("--skip-slowdown", action="store_true", help="only the exposed-fetch sweep")
    ap.add_argument("--dtype", default="float16", choices=DTYPES,
                    help="expert weights: fp16 (torch.bmm) or fp8 e4m3 with rowwise scales (torch._scaled_grouped_mm)")
    ap.add_argument("--fp8-mlp", default="gemms", choices=("gemms", "full"),
                    help="fp8 layer: the two scaled grouped GEMMs only, or the model's whole fp8 expert MLP")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = _parser()
    ns = ap.parse_args(argv)
    ns.parser = ap  # (main's launcher check reports through the same parser)
    ns.token_counts = int_list(ap, "--tokens", ns.tokens)
    if ns.repeats < 1:
        ap.error(f"--repeats must be positive, got {ns.repeats}")
    if ns.layers < 2:  # sections 0 and 1 fetch layer 1 while layer 0 computes
        ap.error(f"--layers must be at least 2 (one layer computes while another is fetched), got {ns.layers}")
    return ns


def result_suffix(n: int, dtype: str, tag: str = "") -> str:
    """``_N<n><tag>`` for fp16 (the name of the earlier runs), ``_N<n>_fp8<tag>`` for fp8."""
    return f"_N{n}" + ("_fp8" if dtype == "float8_e4m3fn" else "") + tag


def rows_per_expert(tokens: int, dtype: str) -> int:
    """m = T * k / E rows per expert (at least 1); fp8 rounds up to the grouped GEMM's 16-row alignment."""
    m = max(1, tokens * K // E)
    return -(-m // ALIGN) * ALIGN if dtype == "float8_e4m3fn" else m


def t_star(experts: int, local: int, bytes_per_param: float, gemm_flops: float, fetch_gbps: float, top_k: int) -> float:
    """Tokens per rank at which one layer's expert GEMMs take as long as its fetch: fetching the ``experts - local``
    remote experts of P parameters takes ``(E - L) * P * bytes_per_param / B``, and each token costs ``2 * k * P``
    FLOPs at rate C, so T* = (E - L) * bytes_per_param * C / (2 * k * B) (P cancels; C in FLOP/s, B in GB/s).
    fp8 halves the bytes and raises C; T* moves by C_fp8 / (2 C_fp16) at the same B. A fetch rate of 0 (or less)
    is refused: no token count hides a fetch that never ends."""
    if not fetch_gbps > 0:
        raise ValueError(f"t_star needs a positive fetch rate (GB/s), got {fetch_gbps!r}")
    return (experts - local) * bytes_per_param * gemm_flops / (2 * top_k * fetch_gbps * 1e9)


def roofline(exposed: list[dict], fetch_gbps: float, dtype: str, local: int) -> dict:
    """Section 2's roofline: C = the best expert-GEMM rate (alone) over the exposed sweep's token counts, B and
    ``t_star``; C and T* are None when the sweep ran no token count (every one skipped: its activations did not fit
    beside the store on some rank)."""
    bpp = BYTES_PER_PARAM[dtype]
    if not exposed:
        return {"C_tflops": None, "B_gbps": fetch_gbps, "bytes_per_param": bpp, "dtype": dtype, "T_star": None}
    C = max(x["gemm_tflops"] for x in exposed) * 1e12
    return {"C_tflops": C / 1e12, "B_gbps": fetch_gbps, "bytes_per_param": bpp, "dtype": dtype,
            "T_star": t_star(E, local, bpp, C, fetch_gbps, K)}


def summary(per_rank: list[dict]) -> list[str]:
    """Rank 0's lines on stdout: rank 0's figures, each with the worst rank's (``per_rank``: every rank's record)."""
    r0 = per_rank[0]
    rf = r0["roofline"]
    lines = [f"B={r0['fetch_ce_gbps']:.1f} GB/s (NVSHMEM 16 SMs takes {r0['nvshmem16_over_ce']:.2f}x the copy engine's "
             "time) " + (f"C={rf['C_tflops']:.0f} TFLOP/s T*={rf['T_star']:.0f}" if rf["T_star"] is not None
                         else f"C, T*: none (no token count fit: skipped {r0.get('skipped_tokens')})")]
    for i, s in enumerate(r0["slowdown"]):
        worst_ce = max(p["slowdown"][i]["slowdown_ce"] for p in per_rank)
        worst_nv = max(p["slowdown"][i]["slowdown_nvshmem16"] for p in per_rank)
        lines.append(f"T={s['tokens']}: GEMM alone {s['gemm_ms']:.2f} ms; +CE {s['slowdown_ce']:+.1%} (worst rank "
                     f"{worst_ce:+.1%}); +NVSHMEM16 {s['slowdown_nvshmem16']:+.1%} (worst rank {worst_nv:+.1%})")
    for i, x in enumerate(r0["exposed"]):
        if x["steady_exposed_frac"] is None:
            steady = "no steady layer (layers 0-1 are the warm-up: --layers 3 or more)"
        else:
            worst = max(p["exposed"][i]["steady_exposed_frac"] for p in per_rank)
            steady = (f"steady exposed {x['steady_exposed_ms']:.3f} ms = {x['steady_exposed_frac']:.2%} of the layer "
                      f"alone (worst rank {worst:.2%})")
        lines.append(f"T={x['tokens']:6d}: layer alone {x['gemm_layer_ms']:.2f} ms ({x['gemm_tflops']:.0f} TF/s), "
                     f"step {x['step_ms']:.1f} ms = {x['step_over_alone']:.3f}x alone, "
                     f"waits {[f'{w:.2f}' for w in x['wait_ms_per_layer']]} ms, {steady}")
    return lines


def exposed_stats(alone_ms: list[list[float]], wait_ms: list[list[float]], layer_ms: list[list[float]]) -> dict:
    """Section 2's figures of one token count from its per-repeat, per-layer times (``[repeat][layer]``, ms): the
    layers alone, the waits for a prefetch and the layers under the scheduler. One denominator: the layer time alone
    (same layer, alone step of the same repeat). The steady state is layer >= 2 (layers 0-1 are the warm-up); with
    fewer than 3 layers there is none and the steady figures are None."""
    L = len(alone_ms[0])
    steady = range(2, L)
    frac = [[w[p] / a[p] for p in range(L)] for w, a in zip(wait_ms, alone_ms, strict=True)]
    return {
        "gemm_layer_ms": median(sum(a) / L for a in alone_ms),
        "alone_ms_per_layer": [median(a[p] for a in alone_ms) for p in range(L)],
        "layer_ms_per_layer": [median(x[p] for x in layer_ms) for p in range(L)],
        "wait_ms_per_layer": [median(w[p] for w in wait_ms) for p in range(L)],
        "exposed_frac_per_layer": [median(f[p] for f in frac) for p in range(L)],
        "steady_exposed_ms": median(max(w[p] for p in steady) for w in wait_ms) if steady else None,
        "steady_exposed_frac": median(max(f[p] for p in steady) for f in frac) if steady else None,
    }


def activation_bytes(tokens: int, dtype: str, fp8_mlp: str = "gemms") -> int:
    """Device bytes of one token count's activations (the memory check before a sweep point)."""
    R = E * rows_per_expert(tokens, dtype)
    if dtype == "float16":
        return R * (2 * H + 2 * I) * 2  # x, h, y in fp16
    # xq, aq (fp8), their row scales, h [R, 2I] and y [R, H] in bf16
    need = R * (H + I + 8 + 2 * 2 * I + 2 * H)
    if fp8_mlp == "full":  # x in bf16, the SwiGLU output, quant_rows' float32 chunks
        need += R * (2 * H + 2 * I) + 3 * 16384 * H * 4
    return need


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


class Fp8Experts:
    """fp8 activations for T tokens per rank spread evenly over the E experts (m rows each, a multiple of 16),
    grouped by expert as the model groups them (``offs``), and the rowwise scales of every expert's weights."""

    def __init__(self, tokens: int, scales, mlp: str = "gemms"):
        import torch
        from dwdp_ops.models.deepseek_r1.fp8 import quant_rows

        self.m, self.mlp = rows_per_expert(tokens, "float8_e4m3fn"), mlp
        R = E * self.m
        g = torch.Generator(device="cuda").manual_seed(5)
        x = torch.randn((R, H), generator=g, device="cuda", dtype=torch.bfloat16).mul_(0.1)  # no float32 copies
        if mlp == "full":
            self.x = x  # quantised per layer inside grouped_swiglu_fp8, as the model does
        else:  # quantised once: the layer is the two GEMMs, as the float16 mode's
            self.xq, self.xs = quant_rows(x)
            del x
            self.aq, self.as_ = quant_rows((torch.randn((R, I), generator=g, device="cuda") * 0.1).to(torch.bfloat16))
        self.offs = torch.arange(1, E + 1, dtype=torch.int32, device="cuda") * self.m
        self.s13, self.s2 = scales
        self.flops = 2.0 * R * (2 * I * H + I * H)
        torch.cuda.synchronize()  # the inputs were made on PyTorch's stream; the GEMMs run on another

    def run(self, store: ExpertStore, layer: int, stream) -> None:
        """The layer's fp8 expert GEMMs on ``stream``, over the composite range in place (the transposed views are
        the column-major operands ``torch._scaled_grouped_mm`` takes; no copy)."""
        import torch
        from dwdp_ops.models.deepseek_r1.fp8 import grouped_swiglu_fp8

        fp8 = torch.float8_e4m3fn
        w13 = torch.from_dlpack(store.composite(layer, "w13")).view(fp8)  # [E, 2I, H], uint8 storage viewed as e4m3
        w2 = torch.from_dlpack(store.composite(layer, "w2")).view(fp8)  # [E, H, I]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr)):
            if self.mlp == "full":
                grouped_swiglu_fp8(self.x, self.offs, w13, w2, self.s13, self.s2, I)
            else:
                torch._scaled_grouped_mm(self.xq, w13.transpose(-2, -1), self.xs, self.s13, offs=self.offs,
                                         out_dtype=torch.bfloat16)
                torch._scaled_grouped_mm(self.aq, w2.transpose(-2, -1), self.as_, self.s2, offs=self.offs,
                                         out_dtype=torch.bfloat16)


def make_experts(ns, tokens: int, scales):
    return Fp8Experts(tokens, scales, ns.fp8_mlp) if ns.dtype == "float8_e4m3fn" else Experts(tokens)


def free_activations() -> None:
    import torch

    cp.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def exposed_sweep(ns, store: ExpertStore, sched: PrefetchScheduler, compute, side, bar, rec: dict, scales) -> None:
    """Section 2: per tokens count, the alone step and the scheduled step interleaved per repeat (module docstring)."""
    L = ns.layers
    for T in ns.token_counts:
        need = activation_bytes(T, ns.dtype, ns.fp8_mlp)
        fits = need < cp.cuda.runtime.memGetInfo()[0] - (3 << 30)
        votes = dwdp_ops.get_runtime().rendezvous.allgather(f"fits:{T}", json.dumps(fits).encode())
        if not all(json.loads(v) for v in votes):
            rec.setdefault("skipped_tokens", []).append(T)  # the activations do not fit beside the store
            continue
        ex = make_experts(ns, T, scales)
        runs: dict[str, list] = {"alone": [], "prefetch": []}  # per run (warm-up included): per-layer events
        total = 1 + ns.repeats  # one warm-up repeat
        timeline_events: dict = {}

        def alone(ex=ex):
            evs = []
            for p in range(L):
                a, c = cp.cuda.Event(), cp.cuda.Event()
                a.record(compute)
                ex.run(store, p, compute)
                c.record(compute)
                evs.append((a, c))
            runs["alone"].append(evs)

        def prefetch(ex=ex):
            last = len(runs["prefetch"]) == total - 1
            t0 = cp.cuda.Event()
            t0.record(compute)
            sched.trace = [] if last else None
            sched.begin_step()
            evs = []
            for p in range(L):
                a, b, c = cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Event()
                a.record(compute)
                sched.wait(p, compute)
                b.record(compute)
                ex.run(store, p, compute)
                c.record(compute)
                sched.release(p, compute)
                evs.append((a, b, c))
            runs["prefetch"].append(evs)
            if last:
                timeline_events.update(t0=t0, evs=evs, trace=sched.trace)
            sched.trace = None

        times = time_interleaved({"alone": alone, "prefetch": prefetch}, compute, ns.repeats, 1, before=bar,
                                 after=side.synchronize)
        el = cp.cuda.get_elapsed_time
        alone_ms = [[el(a, c) for a, c in evs] for evs in runs["alone"][1:]]  # [repeat][layer]
        wait_ms = [[el(a, b) for a, b, _ in evs] for evs in runs["prefetch"][1:]]
        layer_ms = [[el(a, c) for a, _, c in evs] for evs in runs["prefetch"][1:]]
        st = exposed_stats(alone_ms, wait_ms, layer_ms)
        rec["exposed"].append({
            "tokens": T,
            "gemm_layer_ms": st["gemm_layer_ms"],
            "gemm_tflops": ex.flops / (st["gemm_layer_ms"] * 1e-3) / 1e12,
            "alone_step_ms": median(times["alone"]), "step_ms": median(times["prefetch"]),
            "step_over_alone": median_ratio(times["prefetch"], times["alone"]),
            **{k: v for k, v in st.items() if k != "gemm_layer_ms"},
            "denominator": "layer time alone (the same layer's expert GEMMs with no fetch, same repeat)",
        })
        if T in (16384, 65536) and timeline_events:
            t0, evs = timeline_events["t0"], timeline_events["evs"]
            tl = {"tokens": T, "compute": [[p, el(t0, a), el(t0, b), el(t0, c)] for p, (a, b, c) in enumerate(evs)],
                  "copy": []}
            starts = {lay: ev for kind, lay, ev in timeline_events["trace"] if kind == "fetch"}
            for kind, lay, ev in timeline_events["trace"]:
                if kind == "fetch_end":
                    tl["copy"].append([lay, el(t0, starts[lay]), el(t0, ev)])
            rec.setdefault("timelines", []).append(tl)
        del ex, alone, prefetch  # the closures hold the activations
        runs.clear()
        free_activations()


def fill_fp8(store: ExpertStore, layout: ExpertLayout, layers: int, me: int):
    """This rank's experts as fp8 e4m3 (random normal weights requantised per row, finite, never all zeros) and the
    rowwise scales ``(s13 [E, 2I], s2 [E, H])`` every rank holds whole. The scales are one constant per tensor (the
    same on every rank and layer): their values do not change the timing, only the GEMMs' outputs."""
    import torch
    from dwdp_ops.models.deepseek_r1.fp8 import quant_rows

    for layer in range(layers):
        for ti, t in enumerate(layout.tensors):
            loc = torch.from_dlpack(store.local(layer, t.name)).view(torch.float8_e4m3fn)  # [L, ...] page-strided
            g = torch.Generator(device="cuda").manual_seed(100 * me + 10 * layer + ti)
            for e in range(store.L):
                loc[e] = quant_rows(torch.randn(t.shape, generator=g, device="cuda") * 0.02)[0]
    s13 = torch.full((E, 2 * I), 0.02 * 4 / 448, dtype=torch.float32, device="cuda")
    s2 = torch.full((E, H), 0.02 * 4 / 448, dtype=torch.float32, device="cuda")
    torch.cuda.synchronize()
    return s13, s2


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    world = launcher_ranks(ns.parser, 2, "every rank fetches the experts it lacks from its peers")
    disjoint_world(ns.parser, world, E, "the store")
    _gpu_imports()
    with dwdp_ops.init(timeout=600):
        me, n = dwdp_ops.rank(), dwdp_ops.world_size()
        part = ExpertPartition.disjoint(E, n)
        layout = ExpertLayout.moe(H, I, ns.dtype)
        store = ExpertStore(part, layout, ns.layers)
        scales = None
        if ns.dtype == "float8_e4m3fn":
            import torch

            torch.cuda.set_device(dwdp_ops.get_runtime().device)  # "cuda" below is this rank's GPU
            scales = fill_fp8(store, layout, ns.layers, me)
        else:
            for layer in range(ns.layers):
                for ti, t in enumerate(layout.tensors):
                    # small random fp16 values (no infs/NaNs in the GEMMs, never zeros)
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
            store.copy_engine.fetch(layer, side)
        side.synchronize()
        dwdp_ops.barrier()

        def bar():
            cp.cuda.Device().synchronize()
            dwdp_ops.barrier()

        # 0. fetch bandwidth B (copy engine, staggered) and the NVSHMEM kernel, one layer, all ranks at once
        ft = time_interleaved({"ce": lambda: store.copy_engine.fetch(1, compute),
                               "nvshmem16": lambda: store.nvshmem.fetch(1, None, None, compute, num_blocks=16)},
                              compute, ns.repeats, 2, before=bar)
        fetch_ms = median(ft["ce"])
        B = store.remote_bytes() / (fetch_ms * 1e6)
        rec = {"fetch_ce_ms": fetch_ms, "fetch_ce_gbps": B, "fetch_nvshmem16_ms": median(ft["nvshmem16"]),
               "nvshmem16_over_ce": median_ratio(ft["nvshmem16"], ft["ce"]), "fetch_times_ms": ft,
               "remote_bytes": store.remote_bytes(), "slowdown": [], "exposed": []}

        # 1. GEMM slowdown under concurrent fetch of another layer (layer 1 fetched while layer 0 computes)
        for T in () if ns.skip_slowdown else (16384, 32768):
            ex = make_experts(ns, T, scales)

            def gemm(ex=ex):
                ex.run(store, 0, compute)

            t = time_interleaved({
                "alone": gemm,
                "ce": (lambda: store.copy_engine.fetch(1, side), gemm),
                "nvshmem16": (lambda: store.nvshmem.fetch(1, None, None, side, num_blocks=16), gemm),
            }, compute, ns.repeats, 2, before=bar, after=side.synchronize)
            alone = median(t["alone"])
            rec["slowdown"].append({
                "tokens": T, "gemm_ms": alone, "gemm_tflops": ex.flops / (alone * 1e-3) / 1e12,
                "with_ce_ms": median(t["ce"]), "with_nvshmem16_ms": median(t["nvshmem16"]),
                "slowdown_ce": median_ratio(t["ce"], t["alone"]) - 1,
                "slowdown_nvshmem16": median_ratio(t["nvshmem16"], t["alone"]) - 1,
                "fetch_longer_than_gemm": fetch_ms > alone, "times_ms": t})
            del ex, gemm, t
            free_activations()

        # 2. exposed fetch against tokens per rank
        sched = PrefetchScheduler(store, policy="prefetch_all", copy_stream=side)
        exposed_sweep(ns, store, sched, compute, side, bar, rec, scales)
        rec["roofline"] = roofline(rec["exposed"], B, ns.dtype, store.L)
        gathered = dwdp_ops.get_runtime().rendezvous.allgather("overlap", json.dumps(rec).encode())
        if me == 0:
            per_rank = [json.loads(g) for g in gathered]
            data = dict(benchmark="prefetch_overlap", world_size=n, repeats=ns.repeats, layers=ns.layers,
                        dtype=ns.dtype, fp8_mlp=ns.fp8_mlp if ns.dtype == "float8_e4m3fn" else None, method="interleaved per repeat, order shuffled; medians; ratios are medians "
                        "of per-repeat ratios; exposed fraction = wait / layer time alone (same repeat)",
                        **machine_facts(), ranks=per_rank)
            print(f"wrote {write_json(result_name('prefetch_overlap', data['card'], result_suffix(n, ns.dtype, ns.tag)), data)}")
            print("\n".join(summary(per_rank)))
        dwdp_ops.barrier()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
