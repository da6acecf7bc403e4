"""Which batched fp16 GEMM path reaches the card's rate for the expert GEMMs of one DeepSeek-R1 layer
(E=256 experts, [m, 7168] x [7168, 4096] per expert)? One GPU. Medians of 5, CUDA events; the paths of one m
interleaved (``common.time_interleaved``).

    python bench/gemm_probe.py [m ...]
"""

import argparse
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_facts, result_name, time_interleaved, time_op, write_json  # noqa: E402

E, H, N = 256, 7168, 4096


def main() -> int:
    from dwdp_ops._cli import positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("m", nargs="*", type=positive_int, help="rows per expert to probe (default: 64 512 2048)")
    ms = ap.parse_args().m or [64, 512, 2048]
    import cupy as cp

    s = cp.cuda.Stream(non_blocking=True)
    rs = cp.random.RandomState(0)
    with s:
        w = cp.empty((E, N, H), cp.float16)  # [E, 2I, H] like w13, filled in chunks (fp32 temporaries)
        for e in range(0, E, 16):
            w[e : e + 16] = (rs.standard_normal((16, N, H), dtype=cp.float32) * 0.02).astype(cp.float16)
        a = (rs.standard_normal((8192, 8192), dtype=cp.float32)).astype(cp.float16)
    rows = []
    with s:
        ms_dense, _ = time_op(lambda: cp.matmul(a, a), s, 5, 2)
    rows.append({"path": "dense 8192^3 cp.matmul", "tflops": 2 * 8192**3 / ms_dense / 1e9})
    try:
        import torch

        tw = torch.from_dlpack(w)
    except Exception as e:  # noqa: BLE001
        torch, tw = None, None
        print("torch unavailable:", e)
    for m in ms:
        with s:
            x = cp.empty((E, m, H), cp.float16)
            for e in range(0, E, 16):
                x[e : e + 16] = (rs.standard_normal((16, m, H), dtype=cp.float32) * 0.1).astype(cp.float16)
            out = cp.empty((E, m, N), cp.float16)
        cp.get_default_memory_pool().free_all_blocks()
        flops = 2.0 * E * m * N * H
        cases = {
            "cp.matmul(w, x.transpose(0,2,1)) (out^T)": lambda: cp.matmul(w, x.transpose(0, 2, 1)),
        }
        if torch is not None:
            tx, tout, ts = torch.from_dlpack(x), torch.from_dlpack(out), torch.cuda.ExternalStream(s.ptr)

            def bmm():
                with torch.cuda.stream(ts):
                    torch.bmm(tx, tw.transpose(1, 2), out=tout)

            cases["torch.bmm(x, w.transpose(1,2), out=)"] = bmm
        with s:  # the paths against each other, interleaved (one of each per repeat, the order drawn per repeat)
            times = time_interleaved(cases, s, 5, 2)
        for name, samples in times.items():
            t = median(samples)
            rows.append({"path": name, "m": m, "ms": t, "tflops": flops / t / 1e9})
        x = out = None  # noqa: F841 - release before the next size
    for r in rows:
        print(f"{r['path']:45s} m={r.get('m', '-')!s:5s} {r['tflops']:7.1f} TFLOP/s")
    facts = machine_facts()
    write_json(result_name("gemm_probe", facts["card"]), dict(benchmark="gemm_probe", **facts, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
