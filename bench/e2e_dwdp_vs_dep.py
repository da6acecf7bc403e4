"""DWDP against DEP on a context (prefill-only) server: the paper's experiment on our machines (issue 14).

    python -m dwdp_ops.launch -n 2 bench/e2e_dwdp_vs_dep.py [--budgets 16384,32768] [--dists ratio0.8,cv0,cv0.1,...]
    python bench/e2e_dwdp_vs_dep.py --dry-run [--world 2]     # the workload plan; needs no GPU

Every rank drains its own queue of prefill requests (``dwdp_ops.sim.workload``: the simulator's generator and
batching, so that measured points and predictions describe the same workload): lengths uniform in
[R * ISL, ISL] (``ratioR``, the paper's setting R = 0.8) or gamma with mean ISL and coefficient of variation C
(``cvC``); an iteration takes whole requests up to the token budget. A request longer than the budget would be
chunked by the simulator; the model has no chunked prefill yet, so such a request is cut to the budget here (its
length is reported; at ISL 8K it happens only in the gamma tails).

Model: real-dimension DeepSeek-R1 (3 dense layers, then as many MoE layers as fit beside the DWDP slots and the
dispatcher, the same count in every mode; ``--moe-only``: MoE layers only), random weights generated on the GPUs,
vocabulary ``--vocab``. One ``GpuModel`` (same attention, dense and expert kernels); only its expert source changes
between modes: ``dwdp`` (``prefetch_all``: the copy engine fetches every remote expert of layer l+1 while layer l
computes), ``dep`` (``dispatch`` through our NVLink ``TokenDispatcher``), ``dep_nccl`` (``dispatch`` through
``NcclDispatcher``, torch.distributed ``all_to_all_single``). Modes are interleaved per iteration (the order
rotates so that each mode leads as many timed iterations: ``--iterations`` is a multiple of the modes), each
(iteration, mode) started after a device sync and a host barrier; the first ``--warmup`` iterations are not timed.

Per iteration: the routed token-expert pairs per DEP owner rank (``owner_load``, measured after the iteration's first
mode, outside the timing; max over mean per iteration: how unevenly the router loads DEP's expert owners, see
``--router``). Per (iteration, mode, rank): the step's CUDA-event time and its categories: attention blocks
(``attn``: the whole MLA block incl. its projections), expert GEMMs (``experts``), exposed fetch (``wait``: the compute stream waiting
for a prefetch), communication (``comm``: dispatch + combine spans) and the rest (``other``: dense MLPs, shared
experts, router, norms, head). DEP's synchronisation wait is estimated per iteration as a rank's comm time minus the
fastest rank's (the fastest rank waited least; what it spent is the transfer itself). The overlapped copy (the
copy-stream spans of the prefetches) is reported beside the sum, not in it.
TPS/GPU = the tokens every rank processed over every rank's busy time (sum over ranks / sum of step times, i.e.
tokens per second per GPU); iteration latency = the mean over iterations of the slowest rank's step. DWDP against
another mode (``dwdp_over_<mode>``, the table's "DWDP / this"): the median over iterations of the per-iteration
ratio of their TPS/GPU (each iteration is one interleaved pair on the same requests); the ratio of the whole run's
TPS/GPU is ``dwdp_over_<mode>_of_totals``.

Before each iteration's modes: the attention of the iteration's request lengths once, untimed for the modes (cuDNN
builds a plan per new length; the mode that ran first paid it, 1.4-2x its attention time in the first run), its time
recorded as ``attention_warm_ms_mean``.

Before timing: a short check (2 prompts of 32 tokens per rank) of every mode against an all-local run of the same
requests (every expert regenerated on this GPU before the store exists): DWDP equal to the last bit, DEP within
1e-2 with identical argmax tokens.

Output: bench/results/e2e_dwdp_vs_dep_<card>_N<n>.json (records per budget and distribution, the measured points
in ``dwdp_ops.sim.validate``'s form) and a table on rank 0. Runs of 2 x H200: docs/benchmarks.md (issue 14).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from statistics import mean, median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    disjoint_world,
    dry_run_world,
    file_tag,
    launcher_ranks,
    machine_facts,
    result_name,
    write_json,
)
from dwdp_ops._cli import seed_int  # noqa: E402

GiB = 1 << 30
MODES = ("dwdp", "dep", "dep_nccl")


def parse_dist(text: str) -> dict:
    """``ratio0.8`` -> {"ratio": 0.8}; ``cv0.2`` -> {"cv": 0.2}. R in (0, 1] and C finite and >= 0, the workload's
    ranges (``sim.workload``), else ValueError (main's one error line, before any GPU work)."""
    for key in ("ratio", "cv"):
        if text.startswith(key):
            try:
                v = float(text[len(key):])
            except ValueError:
                break
            if (0 < v <= 1) if key == "ratio" else (math.isfinite(v) and v >= 0):
                return {key: v}
            break
    raise ValueError(f"a distribution is ratioR or cvC with R in (0, 1] and C >= 0 finite (e.g. ratio0.8, cv0.2), "
                     f"got {text!r}")


def plan(world: int, iterations: int, isl: int, budget: int, dist: dict, seed: int) -> list[list[list[int]]]:
    """``[rank][iteration]`` -> request lengths: the simulator's draws (``sim.workload``: the same generator, seeds
    and lazy batching as ``rank_iterations``) with every length cut to the budget before batching, so that no
    request is chunked (module docstring). Time and memory grow with the iterations kept, not with the budget."""
    import itertools

    import numpy as np
    from dwdp_ops.sim.workload import draw_block, drawn_lengths, iter_batches

    out = []
    for rank in range(world):
        rng = np.random.default_rng([seed, rank])
        lengths = (min(n, budget) for n in drawn_lengths(rng, draw_block(iterations, isl, budget), isl, **dist))
        its = itertools.islice(iter_batches(lengths, budget), iterations)
        out.append([[c.length for c in it.chunks] for it in its])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="16384,32768", help="max tokens per iteration, comma-separated")
    ap.add_argument("--dists", default="ratio0.8,cv0,cv0.1,cv0.2,cv0.3")
    ap.add_argument("--isl", type=int, default=8192)
    ap.add_argument("--iterations", type=int, default=6,
                    help="timed iterations per rank and mode, a multiple of the number of modes (each leads equally)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--moe-layers", type=int, default=None, help="default: as many as fit")
    ap.add_argument("--moe-only", action="store_true", help="no dense layers (the 'MoE layers only' variant)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float8_e4m3fn"])
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--router", choices=("balanced", "skewed"), default="balanced",
                    help="the random model's router (models.deepseek_r1.gpu_weights.ROUTERS): balanced gives DEP even "
                         "expert loads, skewed (the runs before 2026-12-01) overloads one rank's experts")
    ap.add_argument("--tag", type=file_tag, default="")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--world", type=int, default=None, help="ranks assumed by --dry-run (default WORLD_SIZE or 2)")
    ns = ap.parse_args()
    try:
        budgets = [int(b) for b in ns.budgets.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--budgets must be comma-separated integers, got {ns.budgets!r}")
    try:
        dists = [(d, parse_dist(d)) for d in ns.dists.split(",") if d.strip()]
    except ValueError as e:
        ap.error(f"--dists: {e}")
    modes = [m for m in ns.modes.split(",") if m]
    if len(set(modes)) != len(modes):  # one mode's rows of an iteration would be two runs (summarise pairs them)
        ap.error(f"--modes: each mode once, got {ns.modes!r}")
    if not budgets or min(budgets) < 1 or not dists or any(m not in MODES for m in modes) or not modes:
        ap.error(f"--budgets >= 1, at least one --dists, --modes a subset of {MODES}")
    if ns.isl < 1 or ns.iterations < 1 or ns.warmup < 0:
        ap.error("--isl and --iterations must be >= 1, --warmup >= 0")
    if ns.vocab < 1 or (ns.moe_layers is not None and ns.moe_layers < 1) or (ns.world is not None and ns.world < 1):
        ap.error(f"--vocab, --moe-layers and --world must be >= 1, got {ns.vocab}, {ns.moe_layers}, {ns.world}")
    if ns.iterations % len(modes):
        ap.error(f"--iterations must be a multiple of the {len(modes)} modes, so that each leads as many iterations "
                 f"(the leading mode pays what is new to the iteration), got {ns.iterations}")
    if ns.dry_run:
        world = dry_run_world(ap, ns.world)
        for b in budgets:
            for name, d in dists:
                p = plan(world, ns.warmup + ns.iterations, ns.isl, b, d, ns.seed)
                toks = [[sum(it) for it in rank] for rank in p]
                print(f"budget {b} {name}: tokens per iteration per rank {toks}")
        return 0
    disjoint_world(ap, launcher_ranks(ap, 1, ""), 256, "the store (DWDP) and DEP's placement")
    return run(ns, budgets, dists, modes)


def run(ns, budgets, dists, modes) -> int:  # pragma: no cover - GPU only
    # no PYTORCH_CUDA_ALLOC_CONF=expandable_segments here: with it the first torch.cuda.empty_cache() after the
    # all-local check failed on both ranks with "CUDA error: context is destroyed" (2 x H200, torch 2.11, NVSHMEM and
    # NCCL initialised in the process)
    import cupy as cp
    import dwdp_ops
    import numpy as np
    import torch
    from dwdp_ops import TokenDispatcher
    from dwdp_ops.demo_gpu import plan_layers
    from dwdp_ops.dispatch_nccl import NcclDispatcher, init_process_group_from_env
    from dwdp_ops.env import DistEnv
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig
    from dwdp_ops.models.deepseek_r1.gpu import DwdpExperts, GpuModel, LocalExperts, dense_gemm_tflops
    from dwdp_ops.models.deepseek_r1.gpu_weights import DeviceWeights
    from dwdp_ops.models.deepseek_r1.serve import build_store, expert_scales
    from dwdp_ops.scheduler import PrefetchScheduler

    world = DistEnv.from_environ().world_size
    cap = max(budgets)
    probe = DeepSeekConfig.r1(n_layers=61, vocab_size=ns.vocab)
    H, k = probe.dim, probe.n_activated_experts
    heap = TokenDispatcher.heap_bytes(world, cap, H, k) + 256 * (1 << 20)
    fp8 = ns.dtype == "float8_e4m3fn"
    with dwdp_ops.init(timeout=1200, heap_size=heap) as rt:
        me = rt.rank()
        torch.cuda.set_device(rt.device)
        init_process_group_from_env()
        rdv = rt.rendezvous
        free = cp.cuda.runtime.memGetInfo()[0]
        local_b = TokenDispatcher.local_bytes(world, cap, H, k, probe.n_routed_experts // world)
        # a budget-sized prefill's activations (bf16 peaked near 35 GiB at 20K tokens: ~1.8 GiB per 1K tokens), the
        # NCCL path's per-step buffers (grouped rows in, out, gathered: ~4 x cap x k x H x 2 bytes), fp8's quantised
        # copies, and the dispatcher's grouped rows with the outputs over them
        reserve = (int(1.8 * GiB * cap / 1024) + 4 * cap * k * H * 2 + (cap * k * (H + probe.moe_inter_dim) if fp8 else 0)
                   + 2 * local_b)
        fit = plan_layers(probe, world, ns.moe_layers, free, reserve, 1 if fp8 else 2)
        moe = min(int(v) for v in rdv.allgather("e2e:layers", str(fit).encode()))
        if moe < 1:
            raise SystemExit(f"rank {me}: no MoE layer fits ({free / GiB:.0f} GiB free)")
        dense = 0 if ns.moe_only else 3
        cfg = DeepSeekConfig.r1(n_layers=dense + moe, vocab_size=ns.vocab).replace(n_dense_layers=dense)
        weights = DeviceWeights(cfg, ns.seed, torch.bfloat16, expert_dtype=torch.float8_e4m3fn if fp8 else None,
                                router=ns.router)
        dense_rate = dense_gemm_tflops()
        plans = [plan(world, ns.warmup + ns.iterations, ns.isl, b, d, ns.seed)[me] for b in budgets for _, d in dists]
        max_req = max(len(it) for p in plans for it in p)
        max_seq = max(64, max(n for p in plans for it in p for n in it))

        # the check's all-local run, before the store exists (every expert of a layer on this GPU at once)
        rng = np.random.default_rng([ns.seed, me, 99])
        check_prompts = [rng.integers(0, cfg.vocab_size, 32).tolist() for _ in range(2)]
        local = GpuModel(cfg, weights, LocalExperts(weights, cfg, regenerate=True), max_requests=2, max_seq=64)
        want = local.forward([0, 1], check_prompts).cpu().numpy()
        del local
        torch.cuda.empty_cache()

        store = build_store(cfg, weights)
        scales = expert_scales(cfg, weights)
        disp = nccl = None
        try:
            disp = TokenDispatcher(store.partition, cfg.dim, k, cap)
            nccl = NcclDispatcher(store.partition, cfg.dim, k)
            scheds = {"dwdp": PrefetchScheduler(store, policy="prefetch_all", top_k=k),
                      "dep": PrefetchScheduler(store, policy="dispatch", top_k=k, dispatcher=disp),
                      "dep_nccl": PrefetchScheduler(store, policy="dispatch", top_k=k, dispatcher=nccl)}
            sources = {m: DwdpExperts(store, scheds[m], weights.expert_dtype, scales) for m in modes}
            model = GpuModel(cfg, weights, sources[modes[0]], max_requests=max(max_req, 2), max_seq=max_seq)
            check = {}
            for m in modes:
                model.experts = sources[m]
                got = model.forward([0, 1], check_prompts).cpu().numpy()
                err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                check[m] = {"rel_err": err, "tokens_equal": bool((got.argmax(-1) == want.argmax(-1)).all())}
            ok = all((c["rel_err"] == 0.0 if m == "dwdp" else c["rel_err"] <= 1e-2) and c["tokens_equal"]
                     for m, c in check.items())
            oks = [json.loads(v) for v in rdv.allgather("e2e:check", json.dumps(ok).encode())]
            if not all(oks):
                raise SystemExit(f"rank {me}: the check against the all-local run failed on ranks "
                                 f"{[r for r, v in enumerate(oks) if not v]}: {check}")
            records = []
            for b in budgets:
                for name, d in dists:
                    records.append(measure(model, sources, scheds, modes, ns, b, name, d, me, world, rdv, cfg))
                    if me == 0:  # kept as it comes: a later failure (memory, timeout) loses nothing measured
                        write_json(result_name("e2e_dwdp_vs_dep", "partial", f"_N{world}"),
                                   {"records": records, "dtype": ns.dtype, "layers": cfg.n_layers})
            store.nvshmem.check_errors()
            disp.check_errors()
        finally:
            dwdp_ops.barrier()
            if disp is not None:
                disp.close()
            store.close()
            torch.distributed.destroy_process_group()
        if me == 0:
            facts = machine_facts()
            # the simulator's points (sim.validate): our DEP only (dep_nccl is the other implementation, kept in
            # the records), with the model actually measured (its layer count, not R1's 61)
            points = [{"mode": m, "gpus": world, "max_tokens": r["budget"], **r["dist"], "isl": ns.isl,
                       "layers": cfg.n_layers, "dense_layers": cfg.n_dense_layers, "seed": ns.seed,
                       "iterations": ns.iterations, "iteration_ms": r["modes"][m]["iteration_ms"],
                       "tps_per_gpu": r["modes"][m]["tps_per_gpu"], **owner_load_point(r)}
                      for r in records for m in ("dwdp", "dep") if m in r["modes"]]
            data = dict(benchmark="e2e_dwdp_vs_dep", world_size=world, dtype=ns.dtype, router=ns.router, isl=ns.isl,
                        layers=cfg.n_layers, dense_layers=cfg.n_dense_layers, moe_layers=cfg.n_moe_layers,
                        vocab=cfg.vocab_size, iterations=ns.iterations, warmup=ns.warmup, seed=ns.seed,
                        dense_gemm_tflops=dense_rate, check=check, records=records, points=points, **facts,
                        method=__doc__)
            tag = f"_{ns.tag}" if ns.tag else ""
            path = write_json(result_name("e2e_dwdp_vs_dep", facts["card"], f"_N{world}{tag}"), data)
            print(table(records))
            print(f"wrote {path}")
        dwdp_ops.barrier()
    return 0


def owner_load_point(record: dict) -> dict:
    """``{"owner_load": [...]}``: a record's mean per-owner pair shares (each iteration's pairs per owner over its
    mean, averaged over the iterations; the simulator's ``SimConfig.owner_load``), or {} without measured loads."""
    loads = [x["pairs_per_owner"] for x in record.get("owner_load") or [] if sum(x["pairs_per_owner"])]
    if not loads:
        return {}
    n = len(loads[0])
    return {"owner_load": [sum(x[r] / (sum(x) / n) for x in loads) / len(loads) for r in range(n)]}


def routed_pairs_per_owner(ids_per_layer, num_experts: int, world: int) -> list[int]:
    """Token-expert pairs of a step per owner rank of the disjoint partition (rank r owns experts
    ``[r E / n, (r + 1) E / n)``), summed over the MoE layers: ``ids_per_layer`` a list of ``[T, k]`` expert ids
    (tensors or arrays)."""
    import numpy as np

    per = num_experts // world
    tot = np.zeros(world, np.int64)
    for ids in ids_per_layer:
        a = ids.cpu().numpy() if hasattr(ids, "cpu") else np.asarray(ids)
        tot += np.bincount(a.reshape(-1) // per, minlength=world)[:world]
    return tot.tolist()


def measure(model, sources, scheds, modes, ns, budget, name, dist, me, world, rdv, cfg):  # pragma: no cover - GPU
    """One (budget, distribution): every iteration under every mode (interleaved), gathered over the ranks."""
    import cupy as cp
    import dwdp_ops
    import numpy as np
    import torch

    its = plan(world, ns.warmup + ns.iterations, ns.isl, budget, dist, ns.seed)[me]
    rows, warm_ms = [], []
    for i, lengths in enumerate(its):
        rng = np.random.default_rng([ns.seed, me, budget, i])
        prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
        lead = (i - ns.warmup) % len(modes)  # every mode leads as many timed iterations (--iterations checked)
        order = modes[lead:] + modes[:lead]
        # cuDNN builds (and caches) an attention plan the first time it sees a request length: paid here, once per
        # iteration, outside every mode's timed step (else the mode that runs first pays it; timed for the record)
        ms = model.warm_prefill_attention(lengths)
        if i >= ns.warmup:
            warm_ms.append(ms)
        for m in order:
            model.experts = sources[m]
            sched = scheds[m]
            sched.trace = [] if m == "dwdp" else None
            torch.cuda.synchronize()
            dwdp_ops.barrier()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(model.tstream)
            model.forward(list(range(len(prompts))), prompts, timing=True)
            b.record(model.tstream)
            b.synchronize()
            sched.copy_stream.synchronize()
            tm = model.timing.resolve()
            copy = 0.0
            if sched.trace:
                starts = {lay: ev for kind, lay, ev in sched.trace if kind == "fetch"}
                copy = sum(cp.cuda.get_elapsed_time(starts[lay], ev) for kind, lay, ev in sched.trace
                           if kind == "fetch_end")
            sched.trace = None
            step = a.elapsed_time(b)
            owner_pairs = None
            if m == order[0] and i >= ns.warmup:  # this iteration's routing (the modes agree up to DEP's rounding)
                owner_pairs = routed_pairs_per_owner(model.last_ids, cfg.n_routed_experts, world)
            if i >= ns.warmup:
                rows.append({"owner_pairs": owner_pairs, "iteration": i, "mode": m, "lead": m == order[0],
                             "tokens": sum(lengths), "requests": len(lengths),
                             "step_ms": step, "attn_ms": tm["attn_ms"], "experts_ms": tm["experts_ms"],
                             "wait_ms": tm["wait_ms"], "comm_ms": tm["comm_ms"], "copy_ms": copy,
                             "attn_flops": tm["attn_flops"]})
    per_rank = [json.loads(v) for v in rdv.allgather(f"e2e:{budget}:{name}", json.dumps(rows).encode())]
    return summarise(per_rank, modes, budget, name, dist, warm_ms)


def summarise(per_rank: list[list[dict]], modes, budget: int, name: str, dist: dict, warm_ms: list[float]) -> dict:
    """One (budget, distribution)'s record from every rank's rows (``per_rank[rank]``: that rank's timed rows, in the
    same (iteration, mode) order on every rank). ``dwdp_over_<m>``: the median over the timed iterations of the
    per-iteration ratio of DWDP's TPS/GPU to mode m's (the iteration's tokens over the ranks' summed step times; the
    two modes ran the same requests interleaved, so each iteration is one pair); ``dwdp_over_<m>_of_totals`` the
    ratio of the modes' TPS/GPU over all iterations, beside it."""
    out = {"budget": budget, "dist_name": name, "dist": dist, "modes": {},
           "attention_warm_ms_mean": mean(warm_ms) if warm_ms else 0.0}
    for m in modes:
        rs = [[x for x in rk if x["mode"] == m] for rk in per_rank]  # [rank][iteration]
        tokens = sum(x["tokens"] for rk in rs for x in rk)
        busy = sum(x["step_ms"] for rk in rs for x in rk)
        n_it = len(rs[0])
        sync = []
        for j in range(n_it):
            fastest = min(rk[j]["comm_ms"] for rk in rs)
            sync += [rk[j]["comm_ms"] - fastest for rk in rs]
        cats = {}
        for key in ("attn_ms", "experts_ms", "wait_ms", "comm_ms", "copy_ms"):
            cats[key] = mean(x[key] for rk in rs for x in rk)
        cats["sync_wait_ms"] = mean(sync) if sync else 0.0
        cats["comm_ms"] -= cats["sync_wait_ms"]
        cats["step_ms"] = mean(x["step_ms"] for rk in rs for x in rk)
        cats["other_ms"] = cats["step_ms"] - sum(cats[c] for c in ("attn_ms", "experts_ms", "wait_ms", "comm_ms",
                                                                   "sync_wait_ms"))
        attn_s = sum(x["attn_ms"] for rk in rs for x in rk) * 1e-3
        out["modes"][m] = {
            "tps_per_gpu": tokens / (busy * 1e-3) if busy else None,
            "iteration_ms": mean(max(rk[j]["step_ms"] for rk in rs) for j in range(n_it)),
            "categories_ms": cats,
            "attn_tflops": sum(x["attn_flops"] for rk in rs for x in rk) / attn_s / 1e12 if attn_s else None,
            "rows": rs,
        }
    # DEP's expert owners' loads: every rank's routed pairs per owner (disjoint partition), summed over the ranks,
    # max over mean per iteration (1.0: even; the slowest owner's expert GEMMs set DEP's pace)
    loads = []
    for j in range(len(per_rank[0])):
        per_owner = [rk[j]["owner_pairs"] for rk in per_rank if rk[j]["owner_pairs"] is not None]
        if per_owner:
            tot = [sum(col) for col in zip(*per_owner)]
            loads.append({"iteration": per_rank[0][j]["iteration"], "pairs_per_owner": tot,
                          "max_over_mean": max(tot) / (sum(tot) / len(tot)) if sum(tot) else 1.0})
    out["owner_load"] = loads
    out["owner_load_max_over_mean"] = mean(x["max_over_mean"] for x in loads) if loads else None
    for m in modes:
        if m != "dwdp" and "dwdp" in out["modes"]:
            out[f"dwdp_over_{m}_of_totals"] = out["modes"]["dwdp"]["tps_per_gpu"] / out["modes"][m]["tps_per_gpu"]
            a, b = out["modes"]["dwdp"]["rows"], out["modes"][m]["rows"]  # [rank][iteration]
            pairs = []
            for j in range(len(a[0])):
                if any(ra[j]["iteration"] != rb[j]["iteration"] for ra, rb in zip(a, b, strict=True)):
                    raise ValueError(f"{name}: the rows of dwdp and {m} are not the same iterations")
                # the same tokens in both: TPS(dwdp) / TPS(m) = the summed steps of m over those of dwdp
                pairs.append(sum(rb[j]["step_ms"] for rb in b) / sum(ra[j]["step_ms"] for ra in a))
            out[f"dwdp_over_{m}_per_iteration"] = pairs
            out[f"dwdp_over_{m}"] = median(pairs)
    return out


def table(records) -> str:
    lines = ["| budget | lengths | mode | TPS/GPU | iteration ms | attention | experts | exposed fetch | comm | sync wait "
             "| other | overlapped copy | DWDP / this | DEP owner load max/mean |", "|" + " --- |" * 14]
    for r in records:
        load = r.get("owner_load_max_over_mean")
        for m, v in r["modes"].items():
            c = v["categories_ms"]
            ratio = r.get(f"dwdp_over_{m}")
            lines.append(f"| {r['budget']} | {r['dist_name']} | {m} | {v['tps_per_gpu']:.0f} | {v['iteration_ms']:.1f} "
                         f"| {c['attn_ms']:.1f} | {c['experts_ms']:.1f} | {c['wait_ms']:.1f} | {c['comm_ms']:.1f} "
                         f"| {c['sync_wait_ms']:.1f} | {c['other_ms']:.1f} | {c['copy_ms']:.1f} | "
                         f"{'' if ratio is None else f'{ratio:.3f}'} | {'' if load is None else f'{load:.2f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
