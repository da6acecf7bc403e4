"""Which PyTorch attention backend reaches the GPU's rate on DeepSeek-R1's prefill shapes? One GPU.

    python bench/attention_probe.py [--lengths 1024,2048,4096,8192] [--batch-tokens 32768] [--repeats 10]

Shapes: 128 heads, query/key head dim 192 (128 nope + 64 rope), value head dim 128, causal, bf16, the softmax scale
of R1 (YaRN mscale folded in, as ``DeepSeekConfig.softmax_scale``). Per length S, a batch of ``batch_tokens / S``
requests of S tokens. Cases (each timed, or its error recorded):
  * ``<backend>``           ``scaled_dot_product_attention`` restricted to one backend (cudnn, flash, efficient,
                            math) with V of head dim 128 as it is;
  * ``<backend>+padV``      the same with V zero-padded to 192 (what ``GpuModel`` does today so that one kernel
                            takes q, k and v of equal head dims);
  * ``<backend>+loop``      one call per request (``GpuModel``'s per-request loop) instead of one batched call;
  * ``default``             no restriction (PyTorch's own choice), V as it is;
  * ``packed:<backend>``    ``dwdp_ops.models.attention.prefill_attention`` with that backend on the same requests
                            packed back to back ``[B * S, 128, d]`` (what ``GpuModel``'s prefill calls).
A second record per S (``mix``) draws the requests' lengths uniformly in [0.8 S, S] (the paper's input ratio) up to
the same token budget and times the packed backends only (varlen kernels against the zero-padded dense batch and the
per-request loop); FLOPs count each request's own causal square.
FLOPs (causal, useful only): 2 * B * H * S^2 / 2 * (192 + 128). The dense bf16 GEMM rate (8192^3) of the same run
is the yardstick. All cases interleaved per repeat (``bench/common.time_interleaved``), CUDA events, medians; where
the math backend ran (S <= ``--math-max``), every case's output is compared with it (max relative error).

Output: bench/results/attention_probe_<card>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_facts, result_name, time_interleaved, write_json  # noqa: E402

HEADS, QK, V = 128, 192, 128
BACKENDS = ("cudnn", "flash", "efficient", "math")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--math-max", type=int, default=1024, help="longest S the math backend is run at (memory)")
    ns = ap.parse_args()
    try:
        lengths = [int(x) for x in ns.lengths.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--lengths must be comma-separated integers, got {ns.lengths!r}")
    if not lengths or min(lengths) < 16 or ns.batch_tokens < max(lengths) or ns.repeats < 1:
        ap.error("--lengths >= 16, --batch-tokens >= the longest length, --repeats >= 1")
    if ns.warmup < 0 or ns.math_max < 0:
        ap.error(f"--warmup and --math-max must be >= 0, got {ns.warmup}, {ns.math_max}")

    import cupy as cp
    import torch
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig
    from torch.nn.attention import SDPBackend, sdpa_kernel

    scale = DeepSeekConfig.r1().softmax_scale
    kinds = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    stream = cp.cuda.Stream(non_blocking=True)
    ts = torch.cuda.ExternalStream(stream.ptr)
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 8192
    da = torch.randn((n, n), generator=g, device="cuda").to(torch.bfloat16)
    from dwdp_ops.models.attention import BACKENDS as PACKED
    from dwdp_ops.models.attention import prefill_attention

    def packed_case(records, S, lens):
        """The packed backends on requests of ``lens`` tokens; one record."""
        T = sum(lens)
        qp = torch.randn((T, HEADS, QK), generator=g, device="cuda").to(torch.bfloat16)
        kp = torch.randn((T, HEADS, QK), generator=g, device="cuda").to(torch.bfloat16)
        vp_ = torch.randn((T, HEADS, V), generator=g, device="cuda").to(torch.bfloat16)
        ok, errors, outs = {}, {}, {}
        with torch.cuda.stream(ts):
            for b in PACKED:
                def op(b=b):
                    return prefill_attention(qp, kp, vp_, lens, scale, backend=b)
                try:
                    outs[b] = op().float()
                    ok["packed:" + b] = op
                except Exception as e:  # noqa: BLE001 - a backend that refuses these shapes is a result
                    errors["packed:" + b] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            ok["dense_gemm"] = lambda: da @ da
            times = time_interleaved(ok, stream, ns.repeats, ns.warmup)
        flops = sum(2.0 * HEADS * m * m / 2 * (QK + V) for m in lens)
        rec = {"S": S, "kind": "mix", "lengths": lens, "requests": len(lens), "errors": errors, "cases": {}}
        for name, t in times.items():
            ms = median(t)
            c = {"median_ms": ms, "tflops": (2.0 * n**3 if name == "dense_gemm" else flops) / (ms * 1e-3) / 1e12}
            b = name.split(":", 1)[-1]
            if b in outs and "loop" in outs and b != "loop":
                c["max_rel_err_vs_loop"] = float((outs[b] - outs["loop"]).abs().max() / outs["loop"].abs().max())
            rec["cases"][name] = c
        records.append(rec)
        print(f"S={S:5d} mix x{len(lens):3d} ({min(lens)}-{max(lens)}): " + ", ".join(
            f"{k} {v['tflops']:.0f}" for k, v in sorted(rec["cases"].items()))
            + (f"; refused: {errors}" if errors else ""), flush=True)

    rng = __import__("numpy").random.default_rng(0)
    records = []
    for S in lengths:
        B = ns.batch_tokens // S
        q = torch.randn((B, HEADS, S, QK), generator=g, device="cuda").to(torch.bfloat16)
        k = torch.randn((B, HEADS, S, QK), generator=g, device="cuda").to(torch.bfloat16)
        v = torch.randn((B, HEADS, S, V), generator=g, device="cuda").to(torch.bfloat16)
        vp = torch.nn.functional.pad(v, (0, QK - V))

        def call(backend, vv, loop, q=q, k=k, B=B):
            def op():
                with sdpa_kernel([kinds[backend]] if backend else list(kinds.values())):
                    if loop:
                        return [torch.nn.functional.scaled_dot_product_attention(
                            q[b:b + 1], k[b:b + 1], vv[b:b + 1], is_causal=True, scale=scale) for b in range(B)]
                    return torch.nn.functional.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=scale)
            return op

        cases = {"default": call(None, v, False)}
        packed = [t.transpose(1, 2).contiguous().view(B * S, HEADS, t.shape[-1]) for t in (q, k, v)]
        for b in PACKED:
            def pk(b=b, packed=packed, B=B, S=S):
                return prefill_attention(*packed, [S] * B, scale, backend=b).view(B, S, HEADS, V).transpose(1, 2)
            cases["packed:" + b] = pk
        for b in BACKENDS:
            if b == "math" and S > ns.math_max:
                continue
            cases[b] = call(b, v, False)
            cases[b + "+padV"] = call(b, vp, False)
            cases[b + "+loop"] = call(b, v, True)
        ok, errors, outs = {}, {}, {}
        with torch.cuda.stream(ts):
            for name, op in cases.items():
                try:
                    out = op()
                    out = torch.cat(out) if isinstance(out, list) else out
                    outs[name] = out[..., :V].float()
                    ok[name] = op
                except Exception as e:  # noqa: BLE001 - a backend that refuses these shapes is a result
                    errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            ok["dense_gemm"] = lambda: da @ da
            times = time_interleaved(ok, stream, ns.repeats, ns.warmup)
        flops = 2.0 * B * HEADS * S * S / 2 * (QK + V)
        rec = {"S": S, "kind": "equal", "requests": B, "errors": errors, "cases": {}}
        for name, t in times.items():
            ms = median(t)
            tf = (2.0 * n**3 if name == "dense_gemm" else flops) / (ms * 1e-3) / 1e12
            c = {"median_ms": ms, "tflops": tf}
            if name in outs and "math" in outs and name != "math":
                c["max_rel_err_vs_math"] = float((outs[name] - outs["math"]).abs().max() / outs["math"].abs().max())
            rec["cases"][name] = c
        records.append(rec)
        best = max((v["tflops"], k) for k, v in rec["cases"].items() if k != "dense_gemm")
        print(f"S={S:5d} x{B:3d}: best {best[1]} {best[0]:.0f} TFLOP/s (dense GEMM "
              f"{rec['cases']['dense_gemm']['tflops']:.0f}); " + ", ".join(
                  f"{k} {v['tflops']:.0f}" for k, v in sorted(rec["cases"].items()) if k != "dense_gemm")
              + (f"; refused: {sorted(errors)}" if errors else ""), flush=True)
        del q, k, v, vp, outs, packed
        lens = []
        while True:
            m = int(rng.integers(int(0.8 * S), S + 1))
            if sum(lens) + m > ns.batch_tokens:
                break
            lens.append(m)
        packed_case(records, S, lens)
    facts = machine_facts()
    data = dict(benchmark="attention_probe", heads=HEADS, qk_head_dim=QK, v_head_dim=V, scale=scale,
                batch_tokens=ns.batch_tokens, repeats=ns.repeats, torch=torch.__version__,
                cudnn=torch.backends.cudnn.version(), **facts, records=records, method=__doc__)
    print(f"wrote {write_json(result_name('attention_probe', facts['card']), data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
