"""Fused co-action op against framework versions (one GPU).

    python bench/coaction_bench.py

One co-action pair of the CAN reference configuration (D=16, 16->8->4, 3 orders, no bias) reading its rows from
tables of 100 000 ids (induction 160 floats, feed 16 floats) by random ids, for B in {1024, 8192} and T in {50, 100}
(80 % of the positions valid). Forward, and forward + backward with the table gradients, each timed as the median
of 20 repeats with CUDA events:
  fused     dwdp_ops.coaction.coaction_{forward,backward}_gpu with table + ids (no gather, no intermediates)
  cupy      the same math as gathers, reshaped weights and batched matmuls in CuPy (dwdp_ops.coaction.reference
            on CuPy arrays), table gradients by scatter-add
  torch     the same in PyTorch with autograd, where PyTorch is installed
Peak memory is the allocator's high-water mark of the step; "of HBM" divides the fused kernel's unavoidable bytes
by its time and by the device-to-device copy rate measured in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_facts, result_name, time_op, write_json  # noqa: E402
from dwdp_ops.coaction import (  # noqa: E402
    CoActionSpec,
    coaction_backward,
    coaction_backward_gpu,
    coaction_forward,
    coaction_forward_gpu,
)

ROWS = 100_000


def pool_peak(fn, stream):
    pool = cp.get_default_memory_pool()
    stream.synchronize()
    pool.free_all_blocks()
    base = pool.total_bytes()
    with stream:
        fn()
    stream.synchronize()
    return pool.total_bytes() - base


def main() -> int:
    spec = CoActionSpec()
    s = cp.cuda.Stream(non_blocking=True)
    rs = np.random.default_rng(0)
    table = cp.asarray(rs.normal(0, 0.3, (ROWS, spec.induction_dim)).astype(np.float32))
    ftable = cp.asarray(rs.normal(0, 0.6, (ROWS, spec.feed_dim)).astype(np.float32))
    big = cp.empty(1 << 28, cp.float32)
    dst = cp.empty_like(big)
    with s:
        copy_ms, _ = time_op(lambda: dst.__setitem__(Ellipsis, big), s, 10, 2)
    hbm = 2 * big.nbytes / (copy_ms * 1e6)  # GB/s, read + write
    big = dst = None  # release the 2 GiB before the cases
    try:
        import torch
    except ImportError:
        torch = None
    rows = []
    for B in (1024, 8192):
        for T in (50, 100):
            ids = cp.asarray(rs.integers(0, ROWS, B))
            fids = cp.asarray(rs.integers(0, ROWS, (B, T)))
            mask = cp.asarray((rs.random((B, T)) < 0.8).astype(np.float32))
            g = cp.asarray(rs.normal(size=(B, spec.out_dim)).astype(np.float32))

            def fused_fwd():
                return coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids, stream=s, check_ids=False)

            def fused_step():
                fused_fwd()
                return coaction_backward_gpu(table, ftable, mask, g, spec, ind_ids=ids, feed_ids=fids, stream=s, check_ids=False)

            def cupy_fwd():
                return coaction_forward(table[ids], ftable[fids], mask)

            def cupy_step():
                ind, feed = table[ids], ftable[fids]
                coaction_forward(ind, feed, mask)
                gi, gf = coaction_backward(ind, feed, mask, g)
                ti, tf = cp.zeros_like(table), cp.zeros_like(ftable)
                cp.add.at(ti, ids, gi)
                cp.add.at(tf, fids, gf)
                return ti, tf

            # correctness on this data before timing
            with s:
                assert float(cp.abs(fused_fwd() - cupy_fwd()).max()) < 1e-3
            rec = {"B": B, "T": T}
            for name, fwd, step in (("fused", fused_fwd, fused_step), ("cupy", cupy_fwd, cupy_step)):
                with s:
                    rec[f"{name}_fwd_ms"], _ = time_op(fwd, s, 20, 3)
                    rec[f"{name}_step_ms"], _ = time_op(step, s, 20, 3)
                rec[f"{name}_peak_MiB"] = pool_peak(step, s) / 2**20
            if torch is not None:
                tt = torch.from_dlpack(table).clone().requires_grad_(True)
                tf = torch.from_dlpack(ftable).clone().requires_grad_(True)
                tids, tfids, tmask, tg = (torch.from_dlpack(a) for a in (ids, fids, mask, g))

                def torch_fwd():
                    ind, x0 = tt[tids], tf[tfids]
                    outs = []
                    for c in (1, 2, 3):
                        w0 = ind[:, :128].reshape(-1, 16, 8)
                        w1 = ind[:, 128:160].reshape(-1, 8, 4)
                        h1 = torch.tanh(torch.bmm(x0**c, w0))
                        h2 = torch.bmm(h1, w1)
                        outs.append((torch.cat([h1, h2], -1) * tmask[:, :, None]).sum(1))
                    return torch.cat(outs, -1)

                def torch_step():
                    tt.grad = tf.grad = None
                    torch_fwd().backward(tg)

                ts = torch.cuda.ExternalStream(s.ptr)
                with torch.cuda.stream(ts):
                    rec["torch_fwd_ms"], _ = time_op(lambda: torch_fwd().detach(), s, 20, 3)
                    rec["torch_step_ms"], _ = time_op(torch_step, s, 20, 3)
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    torch_step()
                    torch.cuda.synchronize()
                    rec["torch_peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            fwd_bytes = 4 * (B * spec.induction_dim + B * T * spec.feed_dim + B * T + B * spec.out_dim) + 8 * (B + B * T)
            rec["fused_fwd_bytes"] = fwd_bytes
            rec["fused_fwd_of_hbm"] = fwd_bytes / (rec["fused_fwd_ms"] * 1e6) / hbm
            rec["speedup_fwd_vs_cupy"] = rec["cupy_fwd_ms"] / rec["fused_fwd_ms"]
            rec["speedup_step_vs_cupy"] = rec["cupy_step_ms"] / rec["fused_step_ms"]
            if torch is not None:
                rec["speedup_step_vs_torch"] = rec["torch_step_ms"] / rec["fused_step_ms"]
            rows.append(rec)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
    facts = machine_facts()
    write_json(result_name("coaction_bench", facts["card"]), dict(benchmark="coaction", hbm_copy_gbps=hbm, **facts, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
