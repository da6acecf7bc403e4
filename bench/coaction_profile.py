"""One fused co-action forward and backward for a profiler (Nsight Compute), on the benchmark's data.

    ncu --kernel-name regex:spec_ --launch-skip 4 --launch-count 2 python bench/coaction_profile.py [--B 8192 --T 100]

Tables of 100 000 rows read by random ids, 80 % of the positions valid (as ``coaction_bench.py``); two warm-up steps,
then the profiled step (the launches ``--launch-skip 4`` leaves: its forward and its backward). ``--general`` runs the
general kernels instead of the specialised ones (``DWDP_COACTION_SPECIALIZED=0``).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def main() -> int:
    from dwdp_ops._cli import positive_int

    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=positive_int, default=8192)
    ap.add_argument("--T", type=positive_int, default=100)
    ap.add_argument("--rows", type=positive_int, default=100_000)
    ap.add_argument("--general", action="store_true", help="the general kernels (DWDP_COACTION_SPECIALIZED=0)")
    ns = ap.parse_args()
    import cupy as cp

    if ns.general:
        os.environ["DWDP_COACTION_SPECIALIZED"] = "0"
    from dwdp_ops.coaction import CoActionSpec, coaction_backward_gpu, coaction_forward_gpu

    spec = CoActionSpec()
    rs = np.random.default_rng(0)
    table = cp.asarray(rs.normal(0, 0.3, (ns.rows, spec.induction_dim)).astype(np.float32))
    ftable = cp.asarray(rs.normal(0, 0.6, (ns.rows, spec.feed_dim)).astype(np.float32))
    ids = cp.asarray(rs.integers(0, ns.rows, ns.B))
    fids = cp.asarray(rs.integers(0, ns.rows, (ns.B, ns.T)))
    mask = cp.asarray((rs.random((ns.B, ns.T)) < 0.8).astype(np.float32))
    g = cp.asarray(rs.normal(size=(ns.B, spec.out_dim)).astype(np.float32))
    for _ in range(3):
        coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids, check_ids=False)
        coaction_backward_gpu(table, ftable, mask, g, spec, ind_ids=ids, feed_ids=fids, check_ids=False)
    cp.cuda.Device().synchronize()
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
