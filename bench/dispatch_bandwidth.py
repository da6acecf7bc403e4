"""DEP token dispatch + combine: our NVLink kernels (``dwdp_ops.dispatch.TokenDispatcher``) against NCCL
``all_to_all_single`` (``dwdp_ops.dispatch_nccl.NcclDispatcher``), same run, next to the raw peer-copy rate.

Run on N GPUs:  python -m dwdp_ops.launch -n 2 bench/dispatch_bandwidth.py [--tokens 1,8,...] [--repeats 20]
Plan only (no GPU needed):  python bench/dispatch_bandwidth.py --dry-run [--world 2]

Setting (issue 12): hidden 7168, top-8, 256 experts split disjointly over the N ranks (DEP placement), bf16 hidden
states, float32 weights; routing: every token picks 8 distinct experts uniformly at random (an approximation of
DeepSeek-R1's grouped gate), a fresh routing per size, the same for both modes. Tokens per rank: 1, 8, 32, 128, 256,
1K, 4K, 16K, 32K (``--tokens``). Experts are the identity (y = x_grouped): the time is dispatch + combine alone.

Before timing, per size: both modes' combined outputs are checked against the pure ``reference_moe`` (every rank
rebuilds every rank's inputs from the seeds) at sizes <= ``--check-max`` tokens (bit-exact expected; any rel. err
> 1e-2 fails the run), and against ``x * sum_j w_j`` at every size (max rel. err reported).

Timing: per repeat, the modes run one after the other, in an order drawn afresh per repeat as ``time_interleaved``
draws it (``common._order``: the same on every rank), each started after a device sync and a barrier, timed with
CUDA events on the current stream (the NCCL path includes its one host sync, the counts). One timed op is
``--chain`` dispatch + combine pairs back to back (default 8; the figure is the time per pair), as a model's MoE
layers follow each other: with ``--chain 1`` the ranks' skew at leaving the host barrier (tens to
hundreds of microseconds) is counted as latency, which a model pays once per step, not once per layer.
Per size and mode: each rank's median; ``time_ms`` = the slowest rank's median (a collective is as slow as its
slowest rank); ``ratio`` = median over repeats of ours / NCCL, each repeat's time taken as the slowest rank's.
Bytes (exact, from the routing): payload each rank sends to OTHER ranks: dispatch ``rows_sent * H * 2`` (bf16) plus
combine ``rows_received * H * 4`` (the contract's float32 partials); GB/s = the largest payload of any rank /
time_ms (the collective's time: the rate its busiest rank needed; that rank need not be the slowest one).
Metadata (8k bytes per row) is not counted. Raw peer copy: a CuPy copy of 1 GiB from the next rank's symmetric
buffer through ``dwdp_ops.peer_view`` (an NVLink read by SM loads), the rate the links allow one reader.

Output: bench/results/dispatch_bandwidth_<card>_N<n>.json and .png (time vs tokens, both modes), a table on rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    _order,
    disjoint_world,
    dry_run_world,
    file_tag,
    launcher_ranks,
    machine_facts,
    nvlink_facts,
    result_name,
    write_json,
)

HIDDEN, TOP_K, EXPERTS = 7168, 8, 256
DEFAULT_TOKENS = [1, 8, 32, 128, 256, 1024, 4096, 16384, 32768]
GiB = 1 << 30


def expected_rows(tokens: int, world: int) -> float:
    """Expected rows one rank sends to the other ranks under uniform routing (disjoint split, each token once per
    dest): T * sum_{d != r} (1 - C(E - L, k) / C(E, k))."""
    L = EXPERTS // world
    miss = 1.0
    for i in range(TOP_K):
        miss *= max(0.0, (EXPERTS - L - i) / (EXPERTS - i))
    return tokens * (world - 1) * (1.0 - miss)


def dry_run(tokens: list[int], world: int, have_ours: bool) -> int:
    print(f"dispatch_bandwidth plan: N={world} ranks, hidden {HIDDEN}, top-{TOP_K}, {EXPERTS} experts "
          f"({EXPERTS // world} per rank), bf16 hidden, float32 partials")
    print(f"modes: nccl{' + ours (dwdp_ops.dispatch.TokenDispatcher)' if have_ours else ' only (dwdp_ops.dispatch missing)'}"
          f"; raw peer copy 1 GiB")
    print(f"{'tokens/rank':>11s} {'rows sent (exp.)':>17s} {'dispatch MiB':>13s} {'combine MiB':>12s}")
    for t in tokens:
        rows = expected_rows(t, world)
        print(f"{t:11d} {rows:17.1f} {rows * HIDDEN * 2 / 2**20:13.2f} {rows * HIDDEN * 4 / 2**20:12.2f}")
    return 0


# -- GPU part ----------------------------------------------------------------------------------------------------------
def make_inputs(T: int, rank: int, seed: int):
    """(x bf16 [T, H], ids int32 [T, k] distinct uniform experts, w float32 [T, k]) on the CPU, deterministic in
    (seed, T, rank) so that every rank can rebuild every rank's inputs."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + T * 131 + rank)
    x = torch.randn(T, HIDDEN, generator=g).to(torch.bfloat16)
    ids = torch.rand(T, EXPERTS, generator=g).topk(TOP_K, dim=1).indices.to(torch.int32)
    w = torch.rand(T, TOP_K, generator=g).softmax(dim=1).to(torch.float32)
    return x, ids, w


class Runner:
    def __init__(self, ns):
        import dwdp_ops
        import torch
        from dwdp_ops import ExpertPartition
        from dwdp_ops.dispatch_nccl import NcclDispatcher

        self.torch, self.ns = torch, ns
        self.me, self.n = dwdp_ops.rank(), dwdp_ops.world_size()
        self.part = ExpertPartition.disjoint(EXPERTS, self.n)
        self.modes = {"nccl": NcclDispatcher(self.part, HIDDEN, TOP_K, align=16)}
        self.ours_error = None
        try:
            from dwdp_ops.dispatch import TokenDispatcher
        except ImportError as e:
            self.ours_error = f"dwdp_ops.dispatch not importable ({e}): NCCL only"
        else:
            kw = {} if ns.num_sms is None else {"num_sms": ns.num_sms}
            self.modes["ours"] = TokenDispatcher(self.part, HIDDEN, TOP_K, max(ns.tokens), align=16, **kw)
        self.dev = torch.device("cuda", torch.cuda.current_device())

    def sync_barrier(self):
        import dwdp_ops

        self.torch.cuda.synchronize()
        dwdp_ops.barrier()

    def allgather(self, key: str, value):
        from dwdp_ops.runtime import get_runtime

        got = get_runtime().rendezvous.allgather(f"dispatch_bw:{key}", json.dumps(value).encode())
        return [json.loads(g) for g in got]

    def run_once(self, mode: str, x, ids, w):
        """One dispatch + combine with identity experts on the current stream; returns (out, handle). Ours returns
        CuPy bf16 bits (uint16), left as they are inside the timed loop."""
        d = self.modes[mode]
        if mode == "nccl":
            h = d.dispatch(x, ids, w)
            return d.combine(h.x_grouped, h), h
        s = self.torch.cuda.current_stream()
        h = d.dispatch(x, ids, w, stream=s)
        return d.combine(h.x_grouped, h, stream=s), h

    def as_torch_bf16(self, out):
        """A combine output as a torch bf16 tensor (ours: CuPy uint16 bits, zero-copy through DLPack)."""
        torch = self.torch
        if isinstance(out, torch.Tensor):
            return out
        import cupy as cp

        return torch.from_dlpack(out.view(cp.int16)).view(torch.bfloat16)

    def check(self, T: int, x, ids, w) -> dict:
        """Both modes against reference_moe (small T) and against x * sum_j w_j (every T)."""
        import numpy as np
        from dwdp_ops.dispatch_plan import reference_moe, round_to_bfloat16

        torch = self.torch
        want_simple = (x.float() * (w * (ids >= 0)).sum(1, keepdim=True)).to(torch.bfloat16).float()
        ref = None
        if T <= self.ns.check_max:
            all_in = [make_inputs(T, r, self.ns.seed) for r in range(self.n)]
            ref = reference_moe([a[0].float().numpy() for a in all_in], [a[1].numpy() for a in all_in],
                                [a[2].numpy() for a in all_in], self.part, lambda d, le, v: v, align=16,
                                storage=round_to_bfloat16)[self.me]
        out = {}
        for mode in self.modes:
            got, _ = self.run_once(mode, x, ids, w)
            if mode == "ours":
                self.modes[mode].check_errors()
            g = self.as_torch_bf16(got).float()
            den = want_simple.abs().max().clamp(min=1e-30)
            rec = {"rel_err_vs_x_times_wsum": float((g - want_simple).abs().max() / den) if T else 0.0}
            if ref is not None:
                gn = g.cpu().numpy()
                rec["exact_vs_reference"] = bool(np.array_equal(gn, ref))
                rec["rel_err_vs_reference"] = float(np.abs(gn - ref).max() / max(np.abs(ref).max(), 1e-30)) if T else 0.0
            out[mode] = rec
        return out

    def time_size(self, T: int) -> dict:
        torch = self.torch
        cpu = make_inputs(T, self.me, self.ns.seed)
        x, ids, w = (a.to(self.dev) for a in cpu)
        checks = self.check(T, x, ids, w)
        _, h = self.run_once("nccl", x, ids, w)
        sent = sum(c for d, c in enumerate(h.send_counts) if d != self.me)
        got = sum(c for d, c in enumerate(h.recv_counts) if d != self.me)
        payload = sent * HIDDEN * 2 + got * HIDDEN * 4
        times = {m: [] for m in self.modes}
        names = list(self.modes)
        for i in range(self.ns.warmup + self.ns.repeats):
            for m in _order(names, i):  # interleaved, an order drawn per repeat (time_interleaved's)
                self.sync_barrier()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(self.ns.chain):  # layers back to back, as a model runs them
                    self.run_once(m, x, ids, w)
                b.record()
                b.synchronize()
                if i >= self.ns.warmup:
                    times[m].append(a.elapsed_time(b) / self.ns.chain)
        per_rank = self.allgather(f"t{T}", {"times": times, "payload": payload, "sent": sent, "got": got,
                                            "checks": checks})
        rec = {"tokens_per_rank": T, "modes": {}}
        for m in names:
            med = [median(p["times"][m]) for p in per_rank]
            slow = max(med)
            pay = max(p["payload"] for p in per_rank)
            rec["modes"][m] = {"median_ms_per_rank": med, "time_ms": slow, "payload_bytes_per_rank":
                               [p["payload"] for p in per_rank], "gbps": pay / (slow * 1e6) if slow else None,
                               "checks_per_rank": [p["checks"][m] for p in per_rank]}
        if "ours" in names:
            coll = {m: [max(p["times"][m][i] for p in per_rank) for i in range(self.ns.repeats)] for m in names}
            rec["ratio_ours_over_nccl"] = median(o / c for o, c in zip(coll["ours"], coll["nccl"]))
        rec["rows_sent_per_rank"] = [p["sent"] for p in per_rank]
        rec["rows_received_per_rank"] = [p["got"] for p in per_rank]
        return rec

    def raw_peer_copy(self) -> dict:
        import cupy as cp
        import dwdp_ops
        from common import time_op

        buf = dwdp_ops.symmetric_empty((GiB,), cp.uint8)
        buf[...] = self.me + 1
        dst = cp.empty(GiB, cp.uint8)
        self.sync_barrier()
        peer = (self.me + 1) % self.n
        view = dwdp_ops.peer_view(buf, peer)
        stream = cp.cuda.Stream(non_blocking=True)

        def op():
            with stream:
                dst[...] = view

        ms, _ = time_op(op, stream, self.ns.repeats, 2, before=self.sync_barrier)
        ok = bool((dst[:: 1 << 20] == peer + 1).all())
        self.sync_barrier()
        dwdp_ops.free_symmetric(buf)
        rates = self.allgather("raw", {"ms": ms, "ok": ok})
        return {"bytes": GiB, "median_ms_per_rank": [r["ms"] for r in rates],
                "gbps_per_rank": [GiB / (r["ms"] * 1e6) for r in rates], "data_ok": [r["ok"] for r in rates],
                "method": "cupy copy of 1 GiB from the next rank's symmetric buffer via dwdp_ops.peer_view"}

    def close(self):
        if "ours" in self.modes:
            self.modes["ours"].close()


def plot(records: list[dict], raw: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in records[0]["modes"]:
        ts = [r["tokens_per_rank"] for r in records]
        ax.plot(ts, [r["modes"][m]["time_ms"] * 1e3 for r in records], "o-", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("dispatch + combine, us (slowest rank's median)")
    raw_gbps = min(raw["gbps_per_rank"])
    ax.set_title(f"DEP dispatch + combine, hidden {HIDDEN}, top-{TOP_K}, {EXPERTS} experts "
                 f"(raw peer read {raw_gbps:.0f} GB/s)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(records: list[dict], raw: dict) -> str:
    modes = list(records[0]["modes"])
    head = f"{'tokens':>7s} " + " ".join(f"{m + ' us':>11s} {m + ' GB/s':>10s}" for m in modes)
    head += f" {'ours/nccl':>9s}" if "ours" in modes else ""
    lines = [head]
    for r in records:
        row = f"{r['tokens_per_rank']:7d} "
        row += " ".join(f"{r['modes'][m]['time_ms'] * 1e3:11.1f} {r['modes'][m]['gbps'] or 0:10.1f}" for m in modes)
        if "ours" in modes:
            row += f" {r['ratio_ours_over_nccl']:9.3f}"
        lines.append(row)
    lines.append(f"raw peer read (1 GiB): {', '.join(f'{g:.1f}' for g in raw['gbps_per_rank'])} GB/s per rank")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)), help="tokens per rank, comma-separated")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-max", type=int, default=256, help="largest size checked against reference_moe")
    ap.add_argument("--chain", type=int, default=8, help="dispatch + combine pairs per timed op (time per pair)")
    ap.add_argument("--num-sms", type=int, default=None, help="SMs of our kernels (TokenDispatcher's default)")
    ap.add_argument("--heap", default="16g", help="NVSHMEM symmetric heap per rank")
    ap.add_argument("--tag", type=file_tag, default="", help="suffix of the result file names")
    ap.add_argument("--dry-run", action="store_true", help="print the plan of sizes; needs no GPU")
    ap.add_argument("--world", type=int, default=None, help="ranks assumed by --dry-run (default WORLD_SIZE or 2)")
    ns = ap.parse_args()
    try:
        ns.tokens = [int(t) for t in ns.tokens.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--tokens must be comma-separated integers, got {ns.tokens!r}")
    if not ns.tokens or min(ns.tokens) < 1:
        ap.error("--tokens needs at least one size, each >= 1")
    if ns.chain < 1 or ns.repeats < 1 or ns.warmup < 0:
        ap.error(f"--chain and --repeats must be >= 1 and --warmup >= 0, got {ns.chain}, {ns.repeats}, {ns.warmup}")
    if ns.check_max < 0:
        ap.error(f"--check-max must be >= 0, got {ns.check_max}")
    if (ns.num_sms is not None and ns.num_sms < 1) or (ns.world is not None and ns.world < 1):
        ap.error(f"--num-sms and --world must be >= 1, got {ns.num_sms}, {ns.world}")
    from dwdp_ops.runtime import _parse_size

    try:
        _parse_size(ns.heap)  # (dwdp_ops.init reads it only after the imports of torch and NCCL, on every rank)
    except ValueError as e:
        ap.error(f"--heap: {e}")
    if ns.dry_run:
        import importlib.util

        world = dry_run_world(ap, ns.world)
        if EXPERTS % world:
            ap.error(f"--world must divide {EXPERTS}, got {world}")
        have = importlib.util.find_spec("dwdp_ops.dispatch") is not None
        return dry_run(ns.tokens, world, have)
    disjoint_world(ap, launcher_ranks(ap, 1, ""), EXPERTS, "DEP's placement")

    import dwdp_ops
    import torch
    from dwdp_ops.dispatch_nccl import init_process_group_from_env

    with dwdp_ops.init(heap_size=ns.heap, timeout=600):
        init_process_group_from_env()
        r = Runner(ns)
        try:
            if r.me == 0 and r.ours_error:
                print(r.ours_error, flush=True)
            raw = r.raw_peer_copy()
            records = []
            for T in ns.tokens:
                rec = r.time_size(T)
                records.append(rec)
                if r.me == 0:
                    print(" ".join(f"T={T} {m}: {v['time_ms'] * 1e3:.1f} us" for m, v in rec["modes"].items()),
                          flush=True)
            bad = [(rec["tokens_per_rank"], m) for rec in records for m, v in rec["modes"].items()
                   for c in v["checks_per_rank"]
                   if c.get("rel_err_vs_reference", 0) > 1e-2 or c["rel_err_vs_x_times_wsum"] > 1e-2]
        finally:
            r.close()
            torch.distributed.destroy_process_group()
        if r.me == 0:
            facts = machine_facts()
            data = dict(benchmark="dispatch_bandwidth", world_size=r.n, hidden=HIDDEN, top_k=TOP_K,
                        num_experts=EXPERTS, repeats=ns.repeats, warmup=ns.warmup, seed=ns.seed, chain=ns.chain,
                        num_sms=getattr(r.modes.get("ours"), "num_sms", ns.num_sms), ours=r.ours_error or "dwdp_ops.dispatch.TokenDispatcher",
                        **facts, nvlink=nvlink_facts(0), raw_peer_copy=raw, records=records,
                        latency_us={m: {rec["tokens_per_rank"]: rec["modes"][m]["time_ms"] * 1e3 for rec in records
                                        if rec["tokens_per_rank"] <= 256} for m in r.modes},
                        failed_checks=bad, method=__doc__)
            tag = f"_{ns.tag}" if ns.tag else ""
            name = result_name("dispatch_bandwidth", facts["card"], f"_N{r.n}{tag}")
            path = write_json(name, data)
            png = RESULTS / name.replace(".json", ".png")
            plot(records, raw, png)
            import os
            import shutil

            if os.environ.get("OUT"):
                shutil.copy(png, Path(os.environ["OUT"], png.name))
            print(table(records, raw))
            print(f"wrote {path} and {png}")
            if bad:
                print(f"CHECK FAILED (rel. err > 1e-2): {bad}")
        dwdp_ops.barrier()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
