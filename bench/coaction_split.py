"""The co-action forward (or backward) at small batches: one warp a sample against K warps a sample, one GPU.

    python bench/coaction_split.py [--op forward|backward] [--shape can|o4oi|o4|o1|narrow|paper|deep|wide]
                                   [--dtype float32|bfloat16] [--T 100,1000,2000] [--B 1,16,64,256,1024,2048,4096]
                                   [--ks 1,2,4,8,16] [--repeats 15] [--calls 10]

One warp a sample leaves the GPU mostly idle when a batch has fewer samples than resident warps (3696 on an H200),
and a long sample's time is one warp's. The split forward runs a sample on a block of K warps, each a segment of its
positions (``dwdp_ops.coaction.fused.split_warps``; ``DWDP_COACTION_SPLIT`` forces K). For every (B, T) with
B x T at most 4096 x 1000: the forward of the CAN reference shape (table + ids, 100 000-row tables, 80 % of the
positions unmasked, ``check_ids=False``) with each K forced, each captured in its own CUDA graph of ``--calls``
forwards and replayed, the K variants interleaved per repeat (``common.time_interleaved``); a figure is the median
over repeats of a forward's microseconds, ``over_k1`` the median of the per-repeat ratios to K = 1 (one warp a
sample: the baseline, measured in the same run), and ``pick`` the K the launch takes by itself. ``--shape`` takes
another specialised shape (``o4oi`` 4 orders, order-independent, with bias; ``o4`` 4 orders; ``o1`` one order with
bias) or a shape of the general register-path kernels (``narrow`` 8 -> 8 -> 4 with bias; ``paper`` the paper variant
with bias; ``deep`` three layers; ``wide`` 32-wide layers); ``--dtype bfloat16`` bf16 tables. ``--op backward``
times the backward the same way, into caller-allocated table gradients it adds to (no zeroing or allocation in the
timed op). Before timing, every K is checked against the float64 reference on small cases with masked segments
(relative error at most 1e-5; the backward's two gradients), on three specialised shapes and the run's own.

Writes ``bench/results/coaction_split[_backward][_<shape>][_bf16]_<card>.json`` and the plot of the same name under
``docs/img/`` (the CAN shape in fp32 has no suffix).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    env,
    graphed,
    int_list,
    machine_facts,
    median_ratio,
    result_name,
    time_interleaved,
    write_json,
)
from dwdp_ops._cli import positive_int  # noqa: E402

ROWS = 100_000
SHAPES = {"can": {}, "o4oi": dict(orders=4, order_independent=True, bias=True), "o4": dict(orders=4),
          "o1": dict(orders=1, bias=True),
          # the general register-path kernels (8-, 16- and 32-wide registers)
          "narrow": dict(layer_dims=((8, 8), (8, 4)), bias=True), "paper": dict(variant="paper", bias=True),
          "deep": dict(layer_dims=((24, 16), (16, 16), (16, 4)), orders=2, bias=True),
          "wide": dict(layer_dims=((32, 32), (32, 4)), orders=2)}
MAX_POSITIONS = 4096 * 1000


def rel(a, b) -> float:
    import numpy as np

    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(ks, backward: bool = False, extra: dict | None = None) -> list[dict]:
    """Every K against the float64 reference (three specialised shapes and ``extra``, an all-masked sample, a
    half-masked one); ``backward``: the backward's gradients (the larger of their relative errors)."""
    import cupy as cp
    import numpy as np
    from dwdp_ops.coaction import (
        CoActionSpec,
        coaction_backward,
        coaction_backward_gpu,
        coaction_forward,
        coaction_forward_gpu,
    )

    rng = np.random.default_rng(0)
    rows = []
    cfgs = [dict(), dict(orders=4, order_independent=True, bias=True), dict(orders=1, bias=True)]
    for cfg in cfgs + ([extra] if extra is not None and extra not in cfgs else []):
        spec = CoActionSpec(**cfg)
        for B, T in ((1, 1), (3, 33), (5, 100), (2, 2000), (7, 257)):
            ind = rng.normal(0, 0.3, (B, spec.induction_dim)).astype(np.float32)
            feed = rng.normal(0, 0.6, (B, T, spec.feed_dim)).astype(np.float32)
            mask = (rng.random((B, T)) < 0.8).astype(np.float32)
            if B > 2:
                mask[1] = 0
                mask[2, : T // 2] = 0
            f64 = (ind.astype(np.float64), feed.astype(np.float64), mask)
            dev = (cp.asarray(ind), cp.asarray(feed), cp.asarray(mask))
            if backward:
                g = rng.normal(size=(B, spec.out_dim)).astype(np.float32)
                want = coaction_backward(*f64, g.astype(np.float64), spec)
            else:
                want = coaction_forward(*f64, spec)
            for k in ks:
                with env("DWDP_COACTION_SPLIT", str(k)):
                    if backward:
                        got = coaction_backward_gpu(*dev, cp.asarray(g), spec)
                        err = max(rel(a.get(), w) for a, w in zip(got, want, strict=True))
                    else:
                        err = rel(coaction_forward_gpu(*dev, spec).get(), want)
                rows.append(dict(spec=str(cfg), B=B, T=T, K=k, rel=err))
    return rows


def plot(cases: list[dict], ts: list[int], path: Path, op: str = "forward", what: str = "CAN shape") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, len(ts), figsize=(4.2 * len(ts), 3.6), squeeze=False)
    for ax, T in zip(axes[0], ts, strict=True):
        cs = [c for c in cases if c["T"] == T]
        if not cs:
            continue
        xs = [c["B"] for c in cs]
        ax.plot(xs, [c["us"]["K1"] for c in cs], "o-", color="tab:gray", label="one warp a sample (K = 1)")
        picked = [c for c in cs if f"K{c['pick']}" in c["us"]]  # (a pick outside --ks was not timed)
        ax.plot([c["B"] for c in picked], [c["us"][f"K{c['pick']}"] for c in picked], "s-", color="tab:blue",
                label="the launch's pick")
        ax.plot(xs, [min(c["us"].values()) for c in cs], ":", color="tab:green", label="best K forced")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("B (samples)")
        ax.set_title(f"T = {T}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{op}, us (graphed, median)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Co-action {op} at small batches: K warps a sample ({what}, one GPU)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=("forward", "backward"), default="forward", help="the op to time")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="can",
                    help="the shape: specialised can (3 orders, the CAN default), o4oi (4 orders, order-independent, "
                         "bias), o4 (4 orders), o1 (1 order, bias); general narrow (8 -> 8 -> 4, bias), paper (the "
                         "paper variant, bias), deep (24 -> 16 -> 16 -> 4, 2 orders, bias), wide (32 -> 32 -> 4, "
                         "2 orders)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the tables' dtype")
    ap.add_argument("--T", default="100,1000,2000", help="comma-separated sequence lengths")
    ap.add_argument("--B", default="1,16,64,256,1024,2048,4096", help="comma-separated batch sizes")
    ap.add_argument("--ks", default="1,2,4,8,16", help="warps a sample to force (1 must be among them: the baseline)")
    ap.add_argument("--repeats", type=positive_int, default=15)
    ap.add_argument("--calls", type=positive_int, default=10, help="forwards a CUDA graph")
    ns = ap.parse_args()
    ts, bs, ks = int_list(ap, "--T", ns.T), int_list(ap, "--B", ns.B), int_list(ap, "--ks", ns.ks)
    if 1 not in ks or any(k & (k - 1) or k > 16 for k in ks):
        ap.error(f"--ks must be powers of two up to 16 and include 1 (the baseline), got {ns.ks!r}")

    import cupy as cp
    import numpy as np
    from dwdp_ops.coaction import CoActionSpec, coaction_backward_gpu, coaction_forward_gpu
    from dwdp_ops.coaction.fused import split_warps

    t0 = time.time()
    backward = ns.op == "backward"
    checks = check(ks, backward, SHAPES[ns.shape])
    bad = [r for r in checks if r["rel"] > 1e-5]
    print(f"checked {len(checks)} {ns.op}s against the float64 reference: largest relative error "
          f"{max(r['rel'] for r in checks):.2e}, {len(bad)} above 1e-5", flush=True)
    spec = CoActionSpec(**SHAPES[ns.shape])
    rs = np.random.default_rng(0)
    s = cp.cuda.Stream(non_blocking=True)
    table, ftable = (rs.normal(0, sd, (ROWS, d)).astype(np.float32)
                     for sd, d in ((0.3, spec.induction_dim), (0.6, spec.feed_dim)))
    if ns.dtype == "bfloat16":  # bf16 tables as uint16 bits (the package's rounding); gradients stay float32
        from dwdp_ops.dispatch_plan import round_to_bfloat16

        table, ftable = ((round_to_bfloat16(t).view(np.uint32) >> 16).astype(np.uint16) for t in (table, ftable))
    table, ftable = cp.asarray(table), cp.asarray(ftable)
    facts = machine_facts()
    cases = []
    for T in ts:
        for B in bs:
            if B * T > MAX_POSITIONS:
                continue
            ids = cp.asarray(rs.integers(0, ROWS, B))
            fids = cp.asarray(rs.integers(0, ROWS, (B, T)))
            mask = cp.asarray((rs.random((B, T)) < 0.8).astype(np.float32))

            if backward:
                g = cp.asarray(rs.normal(size=(B, spec.out_dim)).astype(np.float32))
                grads = tuple(cp.zeros(t.shape, cp.float32) for t in (table, ftable))  # added to: nothing zeroed

                def fn():
                    return coaction_backward_gpu(table, ftable, mask, g, spec, ind_ids=ids, feed_ids=fids, stream=s,
                                                 check_ids=False, grads=grads, dtype=ns.dtype)
            else:
                def fn():
                    return coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids, stream=s,
                                                check_ids=False, dtype=ns.dtype)

            ops = {}
            for k in ks:
                with env("DWDP_COACTION_SPLIT", str(k)):
                    ops[f"K{k}"] = graphed(fn, ns.calls, s)
            pick = split_warps(spec, B, T, facts["sms"], ns.dtype, backward=backward)
            t = time_interleaved(ops, s, ns.repeats, 2)
            us = {n: median(v) * 1000 / ns.calls for n, v in t.items()}
            over = {n: median_ratio(v, t["K1"]) for n, v in t.items()}
            cases.append(dict(B=B, T=T, us=us, over_k1=over, pick=pick, best=min(us, key=us.get)))
            print(f"B={B:5d} T={T:5d} " + " ".join(f"{n} {us[n]:7.2f} us ({over[n]:.3f})" for n in us)
                  + f"  pick K{pick}", flush=True)
    res = dict(benchmark="coaction_split", op=ns.op, shape=ns.shape, spec=SHAPES[ns.shape], dtype=ns.dtype, **facts,
               repeats=ns.repeats, calls_per_graph=ns.calls, rows=ROWS,
               method=f"each K forced through DWDP_COACTION_SPLIT, captured in its own CUDA graph, replays "
                      f"interleaved per repeat; us = median {ns.op} time; over_k1 = median of per-repeat ratios to K=1",
               checks=checks, check_failures=len(bad), cases=cases, seconds=round(time.time() - t0, 1))
    suffix = ("_backward" if backward else "") + ("" if ns.shape == "can" else f"_{ns.shape}") + (
        "_bf16" if ns.dtype == "bfloat16" else "")
    name = result_name("coaction_split" + suffix, facts["card"])
    path = write_json(name, res)
    print(f"wrote {path}")
    png = Path(__file__).resolve().parents[1] / "docs" / "img" / name.replace(".json", ".png")
    plot(cases, ts, png, ns.op, f"{ns.shape} shape, {ns.dtype}")
    out = os.environ.get("OUT")
    if out and png.exists():
        Path(out, png.name).write_bytes(png.read_bytes())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
