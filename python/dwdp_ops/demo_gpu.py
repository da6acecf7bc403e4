"""The rank worker of ``python -m dwdp_ops demo`` on GPUs (started by ``dwdp_ops.launch``, one rank per GPU).

Each rank: builds the real-dimension DeepSeek-R1 cut to the MoE layers that fit this GPU (the same count on every
rank) and to ``--vocab``, with deterministic random weights generated on the GPU; loads its expert slice into an
``ExpertStore``; serves its own prompts (different lengths per rank) with prefill and greedy decode under a
``PrefetchScheduler`` whose policy moves weights (``prefetch_all``, ``on_demand``), tokens (``dispatch``: DEP through a
``TokenDispatcher`` sized for the largest step of any rank) or picks per step (``auto``, the default); then, unless ``--no-check``, frees the store and runs the first ``--check-steps`` steps of the
same requests with every expert local (regenerated layer by layer into one ``[E, ...]`` buffer: all of them would not
fit) and compares logits and tokens. Rank 0 writes the
gathered report (JSON) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys

GiB = 1 << 30


def dispatch_capacity(world: int, prompts: int, min_len: int, max_len: int, vocab: int, seed: int) -> int:
    """The largest step of any rank (its prefill: the sum of its prompt lengths), known before ``init`` because
    every rank's prompts are a function of its rank and the seed."""
    from dwdp_ops.models.deepseek_r1.serve import prompts_for

    return max(sum(map(len, prompts_for(r, prompts, min_len, max_len, vocab, seed))) for r in range(world))


def plan_layers(cfg, world: int, requested: int | None, free_bytes: int, reserve: int, expert_itemsize: int = 2) -> int:
    """MoE layers that fit beside ``reserve`` bytes (activations, caches, buffers): ``memory.plan_memory``'s weight and
    slot items for ``cfg``'s vocabulary (as many as fit, at most ``requested``; 0 when ``reserve`` alone exceeds
    ``free_bytes``)."""
    from dwdp_ops.models.deepseek_r1.memory import moe_layers_that_fit

    fit = moe_layers_that_fit(world, max(0, free_bytes - reserve), vocab_size=cfg.vocab_size,
                              expert_itemsize=expert_itemsize, requests=0, cache_len=0, step_tokens=0)
    return int(fit if requested is None else min(fit, requested))


def moe_layers_arg(text: str) -> int | None:
    """``--moe-layers``: a count in ``[1, R1's MoE layers]`` (58), or ``all`` (that count). Checked at parse time:
    a larger count would otherwise fail only after the ranks started."""
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig

    most = DeepSeekConfig.r1().n_moe_layers
    if text == "all":
        return most
    expected = f"expected a count in [1, {most}] (DeepSeek-R1's MoE layers) or 'all'"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    if not 1 <= v <= most:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
    return v


def max_steps(max_len: int) -> int:
    """The most ``--steps`` with prompts of up to ``max_len`` tokens: the model holds ``max_len + steps`` positions
    (``GpuModel``'s ``max_seq``), at most R1's ``max_seq_len``; < 1 when ``max_len`` alone leaves no room."""
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig

    return DeepSeekConfig.r1().max_seq_len - max_len


def check_max_len(ap: argparse.ArgumentParser, max_len: int) -> None:
    """``--max-len`` against R1's ``max_seq_len`` (room for one step at least): exits with code 2 and one ``error:``
    line naming the limit (``demo`` checks it on every path, the GPU worker again in ``check_steps``)."""
    if max_steps(max_len) < 1:
        ap.error(f"argument --max-len: expected at most {max_steps(0) - 1} (DeepSeek-R1's max_seq_len "
                 f"{max_steps(0)} minus one step), got {max_len}")


def check_steps(ap: argparse.ArgumentParser, steps: int, max_len: int) -> None:
    """``--steps`` against ``max_steps(--max-len)``: exits with code 2 and one ``error:`` line naming the limit, before
    any rank initialises (the model would refuse it only after the store is built)."""
    check_max_len(ap, max_len)
    most = max_steps(max_len)
    if steps > most:
        ap.error(f"argument --steps: expected at most {most} on GPUs (DeepSeek-R1's max_seq_len {max_steps(0)} "
                 f"minus --max-len {max_len}), got {steps}")


def main(argv: list[str] | None = None) -> int:
    from dwdp_ops._cli import positive_int, seed_int, writable_path
    from dwdp_ops.models.deepseek_r1 import DeepSeekConfig

    ap = argparse.ArgumentParser(prog="dwdp_ops.demo_gpu")
    ap.add_argument("--moe-layers", type=moe_layers_arg, default=None,
                    help="MoE layers, 1 to R1's 58, or 'all' (58); default: as many as fit. A count that does not fit "
                         "is an error naming the memory plan, before anything is allocated")
    ap.add_argument("--vocab", type=positive_int, default=32768)
    ap.add_argument("--prompts", type=positive_int, default=4)
    ap.add_argument("--min-len", type=positive_int, default=64)
    ap.add_argument("--max-len", type=positive_int, default=1024)
    ap.add_argument("--steps", type=positive_int, default=16,
                    help=f"greedy steps per request; at most {max_steps(0)} (R1's max_seq_len) minus --max-len")
    ap.add_argument("--policy", default="auto", choices=["auto", "prefetch_all", "on_demand", "dispatch"])
    ap.add_argument("--dtype", default="float8_e4m3fn", choices=["bfloat16", "float8_e4m3fn"],
                    help="routed experts: bf16, or fp8 e4m3 with rowwise scales (requantised from 128x128 blocks)")
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--router", choices=("balanced", "skewed"), default="balanced",
                    help="the random router (models.deepseek_r1.gpu_weights.ROUTERS)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-graphs", action="store_true", help="run decode steps eagerly (default: CUDA graphs)")
    ap.add_argument("--check-steps", type=positive_int, default=4,
                    help="steps of the all-local check (it regenerates every layer's experts at every step)")
    ap.add_argument("--compare-policy", default=None, choices=["auto", "prefetch_all", "on_demand", "dispatch"],
                    help="after the main run, time --pairs pairs of whole runs (prefill + decode of the same prompts) "
                         "of --policy and this policy on the same store, interleaved with the leader alternating, "
                         "each checked against the all-local run (bench/demo_policies.py)")
    ap.add_argument("--pairs", type=int, default=3, help="pairs of the interleaved comparison")
    ap.add_argument("--out", required=True, type=writable_path,
                    help="the report's JSON file (rank 0 writes it at the end; checked before the run)")
    ns = ap.parse_args(argv)
    if ns.compare_policy == ns.policy:
        ap.error("--compare-policy must differ from --policy")
    if ns.pairs < 1:
        ap.error("--pairs must be >= 1")
    if ns.min_len > ns.max_len:
        ap.error(f"--min-len ({ns.min_len}) must be <= --max-len ({ns.max_len})")
    if ns.vocab > DeepSeekConfig.r1().vocab_size:
        ap.error(f"argument --vocab: expected at most {DeepSeekConfig.r1().vocab_size} (DeepSeek-R1's vocabulary), "
                 f"got {ns.vocab}")
    check_steps(ap, ns.steps, ns.max_len)

    import cupy as cp
    import torch
    from tqdm import tqdm

    import dwdp_ops
    from dwdp_ops import TokenDispatcher
    from dwdp_ops.env import DistEnv
    from dwdp_ops.models.deepseek_r1.gpu import CACHE_ALIGN, DwdpExperts, GpuModel, LocalExperts, dense_gemm_tflops
    from dwdp_ops.models.deepseek_r1.gpu_weights import DeviceWeights
    from dwdp_ops.models.deepseek_r1.memory import moe_layers_that_fit, plan_memory
    from dwdp_ops.models.deepseek_r1.serve import (
        RunResult,
        build_store,
        compare,
        expert_scales,
        prompts_for,
        run_requests,
        summarize,
    )
    from dwdp_ops.scheduler import PrefetchScheduler

    world = DistEnv.from_environ().world_size
    probe = DeepSeekConfig.r1(n_layers=61, vocab_size=ns.vocab)
    moves_tokens = bool({ns.policy, ns.compare_policy} & {"auto", "dispatch"})
    step = dispatch_capacity(world, ns.prompts, ns.min_len, ns.max_len, ns.vocab, ns.seed)  # the largest prefill
    cap = step if moves_tokens else 0
    H, k = probe.dim, probe.n_activated_experts
    heap = TokenDispatcher.heap_bytes(world, cap, H, k) + 256 * (1 << 20) if moves_tokens else None
    with dwdp_ops.init(timeout=900, heap_size=heap) as rt:
        me, n = rt.rank(), rt.world_size()
        torch.cuda.set_device(rt.device)
        lead = me == 0
        free = cp.cuda.runtime.memGetInfo()[0]
        fp8 = ns.dtype == "float8_e4m3fn"
        dispatcher = 2 * TokenDispatcher.local_bytes(n, cap, H, k, probe.n_routed_experts // n) if moves_tokens else 0
        # the memory plan (models.deepseek_r1.memory): weights, slots, KV cache, the largest step's activations
        mem = dict(expert_itemsize=1 if fp8 else 2, requests=ns.prompts, step_tokens=step, dispatcher_bytes=dispatcher,
                   cache_len=-(-(ns.max_len + ns.steps) // CACHE_ALIGN) * CACHE_ALIGN)
        why = ""
        try:
            fit = moe_layers_that_fit(n, free, vocab_size=ns.vocab, requested=ns.moe_layers, **mem)
        except ValueError as e:  # voted as -1: every rank learns it at the same collective, before any allocation
            fit, why = -1, str(e)
        votes = [int(v) for v in rt.rendezvous.allgather("demo:layers", str(fit).encode())]
        if min(votes) < 0:
            short = [r for r, v in enumerate(votes) if v < 0]
            raise SystemExit(f"rank {me}: " + (why or f"--moe-layers {ns.moe_layers} does not fit on rank(s) {short} "
                                                      "(their message names the memory plan)"))
        moe_layers = min(votes)
        if moe_layers < 1:
            raise SystemExit(f"rank {me}: not even one MoE layer of the real model fits ({free / GiB:.0f} GiB free):\n"
                             + plan_memory(DeepSeekConfig.r1(n_layers=4, vocab_size=ns.vocab), n, free=free,
                                           **mem).table())
        plan = plan_memory(DeepSeekConfig.r1(n_layers=3 + moe_layers, vocab_size=ns.vocab), n, free=free, **mem)
        if lead:
            print(f"memory plan per rank ({3 + moe_layers} layers, {n} ranks):\n{plan.table()}", flush=True)
        cfg = DeepSeekConfig.r1(n_layers=3 + moe_layers, vocab_size=ns.vocab)
        weights = DeviceWeights(cfg, ns.seed, torch.bfloat16, expert_dtype=torch.float8_e4m3fn if fp8 else None,
                                router=ns.router)
        scales = expert_scales(cfg, weights)
        dense_rate = dense_gemm_tflops()
        prompts = prompts_for(me, ns.prompts, ns.min_len, ns.max_len, cfg.vocab_size, ns.seed)
        max_seq = max(map(len, prompts)) + ns.steps
        store = build_store(cfg, weights, progress=lead)
        disp = None
        try:
            if moves_tokens:
                disp = TokenDispatcher(store.partition, cfg.dim, cfg.n_activated_experts, cap)
            sched = PrefetchScheduler(store, policy=ns.policy, top_k=cfg.n_activated_experts, dispatcher=disp)
            model = GpuModel(cfg, weights, DwdpExperts(store, sched, weights.expert_dtype, scales), max_requests=len(prompts),
                             max_seq=max_seq)
            used_after_setup = free - cp.cuda.runtime.memGetInfo()[0]
            # warm-up: the same prompts, prefill and one decode step (every kernel shape the run meets)
            graph = not ns.no_graphs
            run_requests(model, prompts, 2, scheduler=sched, store=store, graph=graph)  # captures the decode graph
            torch.cuda.empty_cache()  # the capture left the cache fragmented: a later prefill found no 2 GiB block
            dwdp_ops.barrier()
            bar = tqdm(total=ns.steps, desc=f"DWDP decode on {n} GPUs", disable=not lead, file=sys.stdout)
            run = run_requests(model, prompts, ns.steps, scheduler=sched, store=store, progress=bar, graph=graph)
            bar.close()
            interleaved = []
            if ns.compare_policy:
                # the other policy's warm-up (its graphs), then pairs of whole runs, the leading policy alternating
                sched.set_policy(ns.compare_policy)
                run_requests(model, prompts, 2, scheduler=sched, store=store, graph=graph)
                torch.cuda.empty_cache()
                for i in range(ns.pairs):
                    order = (ns.policy, ns.compare_policy) if i % 2 == 0 else (ns.compare_policy, ns.policy)
                    pair = {}
                    for pol in order:
                        sched.set_policy(pol)
                        dwdp_ops.barrier()
                        pair[pol] = run_requests(model, prompts, ns.steps, scheduler=sched, store=store, graph=graph)
                    interleaved.append((order[0], pair))
                sched.set_policy(ns.policy)
            store.nvshmem.check_errors()
            if disp is not None:
                disp.check_errors()
            del model
        finally:
            dwdp_ops.barrier()
            if disp is not None:
                disp.close()
            store.close()
        torch.cuda.empty_cache()
        # the plan against what the run used: device memory in use after the set-up (cudaMemGetInfo) and PyTorch's
        # peak (its caching allocator holds every activation; the store's memory is NVSHMEM's, outside it)
        mem_rec = {"plan_bytes": plan.items, "plan_total": plan.total, "free_before": free,
                   "used_after_setup": used_after_setup, "torch_max_reserved": torch.cuda.max_memory_reserved(),
                   "torch_max_allocated": torch.cuda.max_memory_allocated()}
        rec = {"rank": me, "memory": mem_rec, "prompt_lens": list(map(len, prompts)), "tokens": run.tokens, "wall_s": run.wall_s,
               "summary": summarize(run.steps), "steps": [vars(s) for s in run.steps], "dense_tflops": dense_rate,
               "dispatch_capacity": cap, "rates": vars(sched.rates)}
        checks = {}
        if not ns.no_check:
            local = GpuModel(cfg, weights, LocalExperts(weights, cfg, regenerate=True), max_requests=len(prompts),
                             max_seq=max_seq)
            k = max(1, min(ns.check_steps, ns.steps))
            base = run_requests(local, prompts, k)
            rec["check"] = compare(RunResult([t[:k] for t in run.tokens], run.logits[:k], [], 0.0), base)
            rec["check"]["steps"] = k
            for i, (_lead, pair) in enumerate(interleaved):
                for pol, r in pair.items():
                    checks[i, pol] = compare(RunResult([t[:k] for t in r.tokens], r.logits[:k], [], 0.0), base)
            del local
        if interleaved:  # every run's summary, its tokens against the main run's, its check against all-local
            rec["interleaved"] = [
                {"lead": lead_pol, "runs": {pol: {"summary": summarize(r.steps), "tokens_equal_main": r.tokens == run.tokens,
                                                  "check": checks.get((i, pol))} for pol, r in pair.items()}}
                for i, (lead_pol, pair) in enumerate(interleaved)]
        gathered = rt.rendezvous.allgather("demo:report", json.dumps(rec).encode())
        if lead:
            report = {"gpus": n, "card": torch.cuda.get_device_name(), "config": {
                "layers": cfg.n_layers, "dense_layers": cfg.n_dense_layers, "moe_layers": cfg.n_moe_layers,
                "dim": cfg.dim, "experts": cfg.n_routed_experts, "top_k": cfg.n_activated_experts,
                "moe_inter_dim": cfg.moe_inter_dim, "vocab": cfg.vocab_size, "dtype": ns.dtype,
                "router": ns.router},
                "policy": ns.policy, "compare_policy": ns.compare_policy, "pairs": ns.pairs if ns.compare_policy else 0,
                "steps": ns.steps, "graphs": not ns.no_graphs, "ranks": [json.loads(g) for g in gathered]}
            with open(ns.out, "w") as f:
                json.dump(report, f)
        dwdp_ops.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
