"""The NCCL (or gloo) DEP dispatch/combine against the pure reference, on every rank.

    python -m dwdp_ops.launch -n N tests/multiproc/dispatch_nccl_check.py [--backend nccl|gloo] [--dtype D] [--seeds S]

Every rank builds every rank's inputs from the same seeds (so each can run ``reference_moe`` for all), runs its own
through ``NcclDispatcher``, and checks: the send positions and counts equal ``plan_send``'s, the grouped layout
(``x_grouped``, ``offs``, ``pair_pos``) equals ``plan_recv``'s exactly, and ``combine`` of ``y = x * (le + 1)`` per
local expert equals ``reference_moe`` bit for bit (same float32 orders; bf16 rounding emulated in numpy). Scenarios:
random routing (disjoint and replicated partitions), T = 0 on one rank and on all, all tokens to one expert, all k
experts on one rank, skipped slots; bad ids on one rank, and a step past one rank's ``max_rows``, must raise on
every rank. Prints one line per scenario and ``rank r: dispatch_nccl <n> scenarios OK`` at the end; exit code 1 on
any mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import numpy as np
import torch
import torch.distributed as dist
from dwdp_ops import ExpertPartition
from dwdp_ops.dispatch_nccl import NcclDispatcher, init_process_group_from_env
from dwdp_ops.dispatch_plan import plan_recv, plan_send, reference_moe, round_to_bfloat16

H, K = 64, 3


def partitions(n: int) -> dict[str, ExpertPartition]:
    out = {"disjoint": ExpertPartition.disjoint(4 * n, n)}
    if n > 1:
        out["replicated"] = ExpertPartition(3 * n + 3, n, 6, 3)  # stride 3 < L = 6: two owners for most experts
    return out


def inputs(case: str, part: ExpertPartition, seed: int):
    """Every rank's (x float32 [T, H], ids int32 [T, K], w float32 [T, K]) for one scenario."""
    rng = np.random.default_rng(seed)
    n, E = part.world_size, part.num_experts
    Ts = [int(rng.integers(1, 40)) for _ in range(n)]
    if case == "empty_rank":
        Ts[-1] = 0
    if case == "all_empty":
        Ts = [0] * n
    out = []
    for T in Ts:
        ids = np.array([rng.choice(E, size=K, replace=False) for _ in range(T)], np.int32).reshape(T, K)
        if case == "one_expert":
            ids[:, 0] = E - 1
            ids[:, 1:] = -1
        elif case == "all_k_on_one_rank":
            lo, hi = part.local_range(n - 1)
            ids = np.array([rng.choice(np.arange(lo, hi), size=K, replace=False) for _ in range(T)],
                           np.int32).reshape(T, K)
        elif case == "skipped":
            ids[rng.random((T, K)) < 0.3] = -1
        x = rng.standard_normal((T, H)).astype(np.float32)
        out.append((x, ids, rng.random((T, K)).astype(np.float32)))
    return out


def check_case(name: str, disp: NcclDispatcher, part: ExpertPartition, data, dtype, me: int) -> list[str]:
    dev = disp.device
    storage = round_to_bfloat16 if dtype == torch.bfloat16 else None
    if storage is not None:
        data = [(round_to_bfloat16(x), i, w) for x, i, w in data]
    x, ids, w = data[me]
    h = disp.dispatch(torch.from_numpy(x).to(dev, dtype), torch.from_numpy(ids).to(dev),
                      torch.from_numpy(w).to(dev))
    bad = []
    sends = [plan_send(i, ww, part, r) for r, (_, i, ww) in enumerate(data)]
    rp = plan_recv(sends, part, me, disp.align)
    if list(h.send_counts) != sends[me].send_counts.tolist() or list(h.recv_counts) != rp.recv_counts.tolist():
        bad.append("counts")
    if not np.array_equal(h.send_pos.cpu().numpy(), sends[me].send_pos):
        bad.append("send_pos")
    if h.num_rows != rp.num_rows or not np.array_equal(h.offs.cpu().numpy(), rp.offs):
        bad.append(f"offs {h.offs.tolist()} vs {rp.offs.tolist()}")
    if not np.array_equal(h.pair_pos.cpu().numpy(), rp.pair_pos):
        bad.append("pair_pos")
    x_recv = np.concatenate([data[s][0][sends[s].send_token[sends[s].rows_for(me)]] for s in range(part.world_size)])
    want_xg = np.zeros((rp.num_rows, H), np.float32)
    ok = rp.grouped_row >= 0
    want_xg[ok] = x_recv.reshape(-1, H)[rp.grouped_row[ok]]
    if not np.array_equal(h.x_grouped.float().cpu().numpy(), want_xg):
        bad.append("x_grouped")
    # experts: y = x * (le + 1), le from the group boundaries
    le_of_row = torch.searchsorted(h.offs.to(torch.int64), torch.arange(h.num_rows, device=dev), right=True)
    y = (h.x_grouped.float() * (le_of_row + 1).unsqueeze(1).float()).to(dtype)
    out = disp.combine(y, h)
    ref = reference_moe([d[0] for d in data], [d[1] for d in data], [d[2] for d in data], part,
                        lambda d, le, v: v * np.float32(le + 1), align=disp.align, storage=storage)[me]
    got = out.float().cpu().numpy()
    if out.dtype != dtype or got.shape != ref.shape or not np.array_equal(got, ref):
        err = float(np.abs(got - ref).max()) if got.shape == ref.shape and got.size else "shape"
        bad.append(f"combine (max abs err {err})")
    print(f"rank {me}: {name}: T={x.shape[0]} sent {h.num_sent} recv {h.num_recv} grouped rows {h.num_rows}: "
          f"{'OK' if not bad else 'MISMATCH ' + ', '.join(bad)}", flush=True)
    return bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["nccl", "gloo"], default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--seeds", type=int, default=2)
    a = ap.parse_args()
    env = init_process_group_from_env(a.backend)
    me, n = env.rank, env.world_size
    dtype = getattr(torch, a.dtype)
    failures, count = [], 0
    try:
        for pname, part in partitions(n).items():
            for align in (1, 16):
                disp = NcclDispatcher(part, H, K, align=align)
                for case in ("random", "empty_rank", "all_empty", "one_expert", "all_k_on_one_rank", "skipped"):
                    for seed in range(a.seeds):
                        name = f"{pname} align {align} {case} seed {seed}"
                        failures += [f"{name}: {b}" for b in check_case(name, disp, part, inputs(case, part, seed),
                                                                          dtype, me)]
                        count += 1
        # bad ids on the last rank: every rank raises, and the group stays usable
        part = partitions(n)["disjoint"]
        disp = NcclDispatcher(part, H, K)
        data = inputs("random", part, 99)
        x, ids, w = data[me]
        if me == n - 1 and ids.size:
            ids[0, 0] = part.num_experts
        try:
            disp.dispatch(torch.from_numpy(x).to(disp.device, dtype), torch.from_numpy(ids).to(disp.device),
                          torch.from_numpy(w).to(disp.device))
            failures.append("bad ids: no error")
        except ValueError as e:
            if f"rank(s) [{n - 1}]" not in str(e):
                failures.append(f"bad ids: wrong message {e}")
            print(f"rank {me}: bad ids on rank {n - 1}: raised: {e}", flush=True)
        failures += check_case("after the error", disp, part, inputs("random", part, 5), dtype, me)
        # a step past the last rank's max_rows: every rank raises, naming it; a bound that holds changes nothing
        data = inputs("random", part, 7)
        x, ids, w = (torch.from_numpy(a).to(disp.device) for a in data[me])
        need = plan_recv([plan_send(i, ww, part, r) for r, (_, i, ww) in enumerate(data)], part, n - 1,
                         disp.align).num_rows
        try:
            disp.dispatch(x.to(dtype), ids, w, max_rows=need - 1 if me == n - 1 else None)
            failures.append("max_rows: no error")
        except ValueError as e:
            if f"rank(s) {n - 1} ({need} > {need - 1})" not in str(e):
                failures.append(f"max_rows: wrong message {e}")
            print(f"rank {me}: max_rows below the step's rows on rank {n - 1}: raised: {e}", flush=True)
        h = disp.dispatch(x.to(dtype), ids, w, max_rows=disp.rows_for([len(d[0]) for d in data]))
        disp.combine(h.x_grouped, h)
        failures += check_case("after the max_rows error", disp, part, inputs("random", part, 6), dtype, me)
        count += 4
    except Exception:  # noqa: BLE001 - a rank that fails must not wait in the barrier: the launcher ends the others
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()
    for f in failures:
        print(f"rank {me}: FAILED {f}", flush=True)
    if not failures:
        print(f"rank {me}: dispatch_nccl {count} scenarios OK ({dist.Backend.NCCL if a.backend == 'nccl' else a.backend}"
              f", {a.dtype})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
