"""Sharded induction table on N GPUs equals the single-GPU table: outputs and table gradients.

Every rank builds the same full table and feed table from one seed (float32), copies its row range into its
``ShardedTable`` shard, runs the fused forward and backward on its own batch (ids spread over all shards, so most rows
are a peer's), and compares with the fused op on the full local table: its own outputs and feed gradients, and, after
``sync()``, its gradient shard against the sum of every rank's batch gradients computed on the full table (each rank
can rebuild every batch from the seed). Prints one line per rank.
"""

from __future__ import annotations

import sys

import cupy as cp
import dwdp_ops
import numpy as np
from dwdp_ops.coaction import CoActionSpec, ShardedTable, coaction_backward_gpu, coaction_forward_gpu

ROWS, FROWS, B, T = 1003, 500, 96, 37


def batch(spec, r):
    rng = np.random.default_rng(1000 + r)
    ids = rng.integers(0, ROWS, B)
    ids[:4] = [0, ROWS - 1, ROWS // 2, ids[4]]  # shard edges and a repeat
    fids = rng.integers(0, FROWS, (B, T))
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    g = rng.normal(size=(B, spec.out_dim)).astype(np.float32)
    return ids, fids, mask, g


def rel(a, b):
    return float(cp.linalg.norm(a - b) / max(float(cp.linalg.norm(b)), 1e-30))


def main() -> int:
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    spec = CoActionSpec(order_independent=bool(seed % 2))
    with dwdp_ops.init(timeout=120):
        me, n = dwdp_ops.rank(), dwdp_ops.world_size()
        rng = np.random.default_rng(seed)
        full = cp.asarray(rng.normal(0, 0.3, (ROWS, spec.induction_dim)).astype(np.float32))
        ftable = cp.asarray(rng.normal(0, 0.6, (FROWS, spec.feed_dim)).astype(np.float32))
        with ShardedTable(ROWS, spec.induction_dim) as table:
            lo, hi = table.local_rows
            table.shard[: hi - lo] = full[lo:hi]
            table.sync()
            ids, fids, mask, g = (cp.asarray(a) for a in batch(spec, me))
            out = coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids)
            want = coaction_forward_gpu(full, ftable, mask, spec, ind_ids=ids, feed_ids=fids)
            gshard, gfeed = coaction_backward_gpu(table, ftable, mask, g, spec, ind_ids=ids, feed_ids=fids)
            table.sync()
            total = cp.zeros_like(full)
            for r in range(n):
                ids_r, fids_r, mask_r, g_r = (cp.asarray(a) for a in batch(spec, r))
                gi, gf = coaction_backward_gpu(full, ftable, mask_r, g_r, spec, ind_ids=ids_r, feed_ids=fids_r)
                total += gi
                if r == me:
                    want_gfeed = gf
            e_out, e_feed, e_grad = rel(out, want), rel(gfeed, want_gfeed), rel(gshard[: hi - lo], total[lo:hi])
            remote = int(((ids.get() < lo) | (ids.get() >= hi)).sum())
            ok = max(e_out, e_feed, e_grad) <= 1e-5
            print(f"rank {me}: sharded table over {n} GPUs, {remote}/{B} rows remote: out rel {e_out:.1e}, feed grad rel "
                  f"{e_feed:.1e}, shard grad rel {e_grad:.1e}: {'OK' if ok else 'MISMATCH'}", flush=True)
            table.sync()
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
