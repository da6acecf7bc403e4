"""The expert GEMMs of one DeepSeek-R1 MoE layer in fp8 (rowwise, ``torch._scaled_grouped_mm``) against bf16
(``torch._grouped_mm``), next to the dense fp8 (``torch._scaled_mm``, rowwise) and bf16 GEMM rates, same run.

    python bench/expert_gemm.py [--tokens 1024,...,65536] [--routing uniform,zipf] [--repeats 10]
    python bench/expert_gemm.py --dry-run      # the plan of cases; needs no GPU

One GPU. Shapes: H 7168, I 2048, 256 experts, top-8 (every expert of the layer on this GPU, as a DWDP rank computes
them after the fetch). Per case: the rank's T tokens pick 8 distinct experts each, uniformly or with Zipf(1.1)
popularity over a random expert order (skewed: a few experts take many rows, many take few or none); pairs are
grouped by expert in 16-row-aligned groups (padding rows read token 0), exactly as ``GpuModel`` does. Timed, each
from the rank's tokens ``x [T, H]`` bf16 to the grouped expert outputs, the way ``models.routed`` runs it: bf16 - the
gather of the tokens' rows into expert order, then the two projections with the SwiGLU between (``torch._grouped_mm``,
the bf16 ``GpuModel._grouped_swiglu``); fp8 - each token quantised once (``fp8.quant_rows``, fused kernel), its fp8
row and scale gathered (half the bytes of the bf16 gather), then ``fp8.grouped_swiglu_fp8`` (the SwiGLU fused with
the second quantisation), with and without fast accumulation (both GEMMs, or only the first or the second); also
fp8 with the quantisation after the gather (``fp8_quant_after_gather``: T x 8 rows
quantised instead of T, the arrangement before 2026-12-01). Weights: random block-scaled fp8 requantised per row
(fp8), and their dequantised bf16 values (bf16); inputs random normal, never zeros.
TFLOP/s counts 2 * pairs * 3 * H * I (real rows only, not padding). The dense rates are an 8192^3 bf16 GEMM and the
same in fp8 with rowwise scales. Every case is timed interleaved (bf16, fp8, dense bf16, dense fp8 shuffled per
repeat, ``bench/common.time_interleaved``), CUDA events, medians; the fp8/bf16 ratio is the median of per-repeat
ratios. Before timing, each case checks fp8 against bf16 on its real rows (relative Frobenius error reported).

Output: bench/results/expert_gemm_<card>.json and .png, a table on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_facts, median_ratio, result_name, time_interleaved, write_json  # noqa: E402

H, I, E, K = 7168, 2048, 256, 8
ALIGN = 16
DEFAULT_TOKENS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


def expert_ids(T: int, routing: str, seed: int):
    """``[T, K]`` distinct experts per token (numpy, host), uniform or Zipf(1.1) popularity."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if routing == "uniform":
        p = np.full(E, 1.0 / E)
    else:
        p = 1.0 / np.arange(1, E + 1) ** 1.1
        p = p[rng.permutation(E)] / p.sum()
    out = []
    for a in range(0, T, 4096):  # distinct experts per token, by Gumbel top-k on log p
        n = min(4096, T - a)
        keys = np.log(p)[None, :] + rng.gumbel(size=(n, E))
        out.append(np.argpartition(-keys, K, axis=1)[:, :K])
    return np.concatenate(out)


def expert_counts(T: int, routing: str, seed: int):
    """Pairs per expert for T tokens choosing K distinct experts (numpy, host)."""
    import numpy as np

    return np.bincount(expert_ids(T, routing, seed).ravel(), minlength=E)


def grouped_rows(ids):
    """The aligned grouped layout of ``ids [T, K]`` as ``models.routed`` builds it: ``(src [R] token of each row,
    padding rows 0; real [R] bool; counts [E]; padded [E])``."""
    import numpy as np

    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=E)
    padded = -(-counts // ALIGN) * ALIGN
    pstart, start = np.cumsum(padded) - padded, np.cumsum(counts) - counts
    e_sorted = flat[order]
    dst = pstart[e_sorted] + np.arange(flat.size) - start[e_sorted]
    src = np.zeros(int(padded.sum()), np.int64)
    src[dst] = order // K
    real = np.zeros(src.size, bool)
    real[dst] = True
    return src, real, counts, padded


def plan(tokens, routings):
    return [(T, r) for r in routings for T in tokens]


def main() -> int:
    from dwdp_ops._cli import seed_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    ap.add_argument("--routing", default="uniform,zipf")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--dry-run", action="store_true")
    ns = ap.parse_args()
    try:
        tokens = [int(t) for t in ns.tokens.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--tokens must be comma-separated integers, got {ns.tokens!r}")
    routings = [r for r in ns.routing.split(",") if r]
    if not tokens or min(tokens) < 1 or any(r not in ("uniform", "zipf") for r in routings) or not routings:
        ap.error("--tokens needs sizes >= 1 and --routing a subset of uniform,zipf")
    if ns.repeats < 1 or ns.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    cases = plan(tokens, routings)
    if ns.dry_run:
        for T, r in cases:
            c = expert_counts(T, r, ns.seed)
            rows = int(sum(-(-x // ALIGN) * ALIGN for x in c))
            print(f"T={T:6d} {r:7s}: {T * K} pairs, {int((c > 0).sum())} experts used, largest group {int(c.max())}, "
                  f"{rows} aligned rows, {2 * T * K * 3 * H * I / 1e12:.2f} TFLOP")
        return 0

    import cupy as cp
    import numpy as np
    import torch
    from dwdp_ops.models.deepseek_r1.fp8 import grouped_swiglu_fp8, quant_rows, requant_block
    from dwdp_ops.models.routed import gather_rows

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(ns.seed)
    w13_8 = torch.empty((E, 2 * I, H), dtype=torch.float8_e4m3fn, device=dev)
    w2_8 = torch.empty((E, H, I), dtype=torch.float8_e4m3fn, device=dev)
    s13 = torch.empty((E, 2 * I), dtype=torch.float32, device=dev)
    s2 = torch.empty((E, H), dtype=torch.float32, device=dev)
    w13_b = torch.empty((E, 2 * I, H), dtype=torch.bfloat16, device=dev)
    w2_b = torch.empty((E, H, I), dtype=torch.bfloat16, device=dev)
    for e in range(E):  # block-scaled random weights, requantised per row; bf16 = the same values dequantised
        for q_out, s_out, b_out, shape in ((w13_8, s13, w13_b, (2 * I, H)), (w2_8, s2, w2_b, (H, I))):
            w = torch.randn(shape, generator=g, device=dev) * 0.02
            codes, scale_inv = _block_quant_torch(w)
            q, s = requant_block(codes, scale_inv)
            q_out[e], s_out[e] = q, s
            b_out[e] = (q.float() * s[:, None]).to(torch.bfloat16)
    stream = cp.cuda.Stream(non_blocking=True)
    ts = torch.cuda.ExternalStream(stream.ptr)
    n = 8192
    da = torch.randn((n, n), generator=g, device=dev).to(torch.bfloat16)
    db = torch.randn((n, n), generator=g, device=dev).to(torch.bfloat16)
    qa, sa = quant_rows(da)
    qb, sb = quant_rows(db)

    def bf16_mlp(xg, offs):
        h = torch._grouped_mm(xg, w13_b.transpose(-2, -1), offs=offs)
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        return torch._grouped_mm(a, w2_b.transpose(-2, -1), offs=offs)

    records = []
    for T, routing in cases:
        src_np, real_np, counts, padded = grouped_rows(expert_ids(T, routing, ns.seed))
        offs = torch.tensor(np.cumsum(padded), dtype=torch.int32, device=dev)
        src = torch.from_numpy(src_np).to(dev)
        real = torch.from_numpy(real_np).to(dev)
        x = torch.randn((T, H), generator=g, device=dev).to(torch.bfloat16)

        def run_bf16(x=x, src=src, offs=offs):
            return bf16_mlp(x[src], offs)

        def run_fp8(fast=False, x=x, src=src, offs=offs):
            return grouped_swiglu_fp8(gather_rows(*quant_rows(x), src), offs, w13_8, w2_8, s13, s2, I,
                                      fast_accum=fast)

        def run_fp8_after(x=x, src=src, offs=offs):
            return grouped_swiglu_fp8(x[src], offs, w13_8, w2_8, s13, s2, I)

        ts.wait_stream(torch.cuda.current_stream())  # the inputs were filled on the default stream
        with torch.cuda.stream(ts):
            yb = run_bf16()
            errs = []
            for fn in (run_fp8, lambda: run_fp8(True), run_fp8_after):
                y8 = fn()
                num = den = 0.0
                for a in range(0, yb.shape[0], 16384):  # real rows only, in chunks (no full float32 copies)
                    r = real[a : a + 16384]
                    b, f = yb[a : a + 16384][r].float(), y8[a : a + 16384][r].float()
                    num += float((f - b).pow(2).sum())
                    den += float(b.pow(2).sum())
                errs.append((num / den) ** 0.5)
                del y8
            del yb
        err, err_fast, err_after = errs
        assert abs(err_after - err) <= 1e-6 * err, "quantising before or after the gather must give the same bits"
        ops = {
            "bf16_grouped": run_bf16,
            "fp8_grouped": run_fp8,
            "fp8_grouped_fast_accum": lambda: run_fp8(True),
            "fp8_quant_after_gather": run_fp8_after,
            "fp8_fast_accum_first_gemm": lambda: run_fp8((True, False)),
            "fp8_fast_accum_second_gemm": lambda: run_fp8((False, True)),
            "bf16_dense": lambda: da @ db.T,
            "fp8_dense": lambda: torch._scaled_mm(qa, qb.T, sa[:, None], sb[None, :], out_dtype=torch.bfloat16),
        }
        with torch.cuda.stream(ts):
            times = time_interleaved(ops, stream, ns.repeats, ns.warmup)
        flops = 2.0 * T * K * 3 * H * I
        rec = {"tokens": T, "routing": routing, "experts_used": int((counts > 0).sum()), "largest_group": int(counts.max()),
               "aligned_rows": int(sum(padded)), "rel_err_fp8_vs_bf16": err,
               "rel_err_fp8_fast_accum_vs_bf16": err_fast,
               "median_ms": {k: median(v) for k, v in times.items()},
               "ratio_fp8_over_bf16_time": median_ratio(times["fp8_grouped"], times["bf16_grouped"]),
               "ratio_fp8_fast_accum_over_bf16_time": median_ratio(times["fp8_grouped_fast_accum"], times["bf16_grouped"]),
               "ratio_fp8_quant_after_gather_over_bf16_time": median_ratio(times["fp8_quant_after_gather"],
                                                                           times["bf16_grouped"]),
               "includes": "the gather of the tokens into expert order (bf16 rows, or fp8 rows + scales)"}
        rec["tflops"] = {"bf16_grouped": flops / rec["median_ms"]["bf16_grouped"] / 1e9,
                         "fp8_grouped": flops / rec["median_ms"]["fp8_grouped"] / 1e9,
                         "fp8_grouped_fast_accum": flops / rec["median_ms"]["fp8_grouped_fast_accum"] / 1e9,
                         "fp8_quant_after_gather": flops / rec["median_ms"]["fp8_quant_after_gather"] / 1e9,
                         "fp8_fast_accum_first_gemm": flops / rec["median_ms"]["fp8_fast_accum_first_gemm"] / 1e9,
                         "fp8_fast_accum_second_gemm": flops / rec["median_ms"]["fp8_fast_accum_second_gemm"] / 1e9,
                         "bf16_dense": 2.0 * n**3 / rec["median_ms"]["bf16_dense"] / 1e9,
                         "fp8_dense": 2.0 * n**3 / rec["median_ms"]["fp8_dense"] / 1e9}
        rec["fp8_speedup"] = 1.0 / rec["ratio_fp8_over_bf16_time"]
        records.append(rec)
        t = rec["tflops"]
        print(f"T={T:6d} {routing:7s}: bf16 {t['bf16_grouped']:6.0f} fp8 {t['fp8_grouped']:6.0f} TFLOP/s "
              f"(x{rec['fp8_speedup']:.2f}; dense bf16 {t['bf16_dense']:.0f}, fp8 {t['fp8_dense']:.0f}); "
              f"fp8 vs bf16 rel err {err:.2e}; fast accum {t['fp8_grouped_fast_accum']:.0f} TFLOP/s, "
              f"rel err {err_fast:.2e}; quant after gather {t['fp8_quant_after_gather']:.0f}; fast first / second GEMM "
              f"{t['fp8_fast_accum_first_gemm']:.0f} / {t['fp8_fast_accum_second_gemm']:.0f}", flush=True)
    facts = machine_facts()
    data = dict(benchmark="expert_gemm", hidden=H, inter=I, experts=E, top_k=K, align=ALIGN, repeats=ns.repeats,
                seed=ns.seed, **facts, records=records, method=__doc__)
    path = write_json(result_name("expert_gemm", facts["card"]), data)
    _plot(records, RESULTS / path.name.replace(".json", ".png"))
    print(f"wrote {path}")
    return 0


def _block_quant_torch(w, block: int = 128):
    """128x128 block-scaled e4m3 codes of ``w [N, K]`` (amax / 448 per block), as a checkpoint stores them."""
    import torch

    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    pad = torch.nn.functional.pad(w, (0, kb * block - K, 0, nb * block - N))
    amax = pad.view(nb, block, kb, block).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:N, :K]
    codes = (w / full).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, scale


def _plot(records, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for routing, style in (("uniform", "-"), ("zipf", "--")):
        rs = [r for r in records if r["routing"] == routing]
        if not rs:
            continue
        xs = [r["tokens"] for r in rs]
        for k, c in (("bf16_grouped", "tab:blue"), ("fp8_grouped", "tab:red")):
            ax.plot(xs, [r["tflops"][k] for r in rs], style, color=c, marker="o", label=f"{k} ({routing})")
    d = records[0]["tflops"]
    ax.axhline(d["bf16_dense"], color="tab:blue", lw=0.8, ls=":", label="dense bf16")
    ax.axhline(d["fp8_dense"], color="tab:red", lw=0.8, ls=":", label="dense fp8")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank (top-8 of 256 experts)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("DeepSeek-R1 expert GEMMs: fp8 rowwise vs bf16 grouped")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
