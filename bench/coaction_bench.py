"""Fused co-action op against framework versions (one GPU).

    python bench/coaction_bench.py [--repeats 20] [--compile-mode max-autotune-no-cudagraphs]

One co-action pair of the CAN reference configuration (D=16, 16->8->4, 3 orders, no bias) reading its rows from
tables of 100 000 ids (induction 160 floats, feed 16 floats) by random ids, for (B, T) in (1024, 50), (1024, 100),
(8192, 50), (8192, 100), (2048, 1000), (16384, 200) (80 % of the positions valid; --sizes picks some). Forward,
and a step (forward + backward with the table gradients). Per case the variants below are timed interleaved
(bench/common.py ``time_interleaved``: one repeat runs every variant once, in an order shuffled per repeat),
--repeats repeats after 3 warm-up repeats, CUDA events on one stream; figures are medians, speed-ups the median of
the per-repeat ratios:
  fused          dwdp_ops.coaction.coaction_{forward,backward}_gpu with table + ids, the default path
                 (``check_ids=True``: the ids are range-checked on the device in front of the forward's kernel and
                 the host waits for the check after launching that kernel; a step checks them once, in its forward,
                 as the autograd op ``coaction`` does)
  fused_nocheck  the same with ``check_ids=False`` (the kernels alone); the reference shape runs on the specialised
                 kernels (compile-time widths, ``fused.uses_specialized_kernels``)
  fused_general  ``fused_nocheck`` on the general fast kernels (``DWDP_COACTION_SPECIALIZED=0``): the kernels before
                 the specialisation, as a same-run baseline
  cupy           the same math as gathers, reshaped weights and batched matmuls in CuPy (dwdp_ops.coaction.reference
                 on CuPy arrays), table gradients by scatter-add
  torch          the same in PyTorch with autograd (eager), where PyTorch is installed
  fused_torch    the fused op as PyTorch users call it: ``dwdp_ops.coaction.coaction`` (the autograd op, default
                 ``check_ids=True``) on the same tensors, its step ``.backward()`` into the tables' ``.grad``;
                 ``fused_torch_graph``: that step (``check_ids=False``) captured with ``torch.cuda.graph`` and
                 replayed --pipeline times, per call (``graph_step_torch_over_fused_torch``: pipelined PyTorch eager
                 over it, per repeat)
  torch_compile  that PyTorch function through ``torch.compile(mode=--compile-mode, dynamic=False)``, one compiled
                 function per (B, T), compiled and warmed up (forward and backward) before any timing
Pipelined (``*_pipelined_ms``): ``fused_nocheck``, ``fused_torch``, ``torch`` and ``torch_compile`` also run as
--pipeline (default 10) back-to-back calls inside one timed op, reported per call: what a training loop whose host
runs ahead of the GPU pays (a call's host work overlaps the previous call's kernels, so the figure is the larger of
the two per call).
Graphed (``*_graph_ms``): ``fused_nocheck`` as --pipeline calls captured once in a CUDA graph (CuPy stream capture)
and replayed, per call: the kernels' own time, without the host's (what an engine that captures its step pays).
Every fused step zeroes its table gradients as the autograd op does: ``TableGrads`` made before the forward, zeroed
by the forward's kernel (a share per sample, alongside its work), the backward adding into them. Step-only baseline
``fused_zeroed`` (isolated and ``_graph``): ``fused_nocheck``'s step with the gradients zeroed by the backward's
memsets on the stream in front of its kernel instead (the way before ``TableGrads``).
Host time (``*_host_us``): wall-clock time per call of 50 back-to-back ``check_ids=False`` calls on the host, the
stream synchronised only after them (the host work of a call: argument checks, allocations, launches).
Peak memory is the allocator's high-water mark of the step.

Roofline, per case, at rates measured in the same run: the HBM rate of a 1 GiB device-to-device copy (read + write
bytes over time) and the fp32 FMA rate of a small CuPy RawKernel (every thread runs 8 independent chains of
dependent FMAs; 2 FLOP per FMA). Bytes the op must move (``*_bytes``): forward = induction rows and ids, the mask,
the feed ids and feed rows of the unmasked positions only (a masked position's row and id need not be read, and the
kernels do not read them), output; step = the forward's, then the backward's reads of the same plus grad_out, the
dense table-shaped gradients it returns zeroed (written once) and the row gradients added into them (read + write
per sample and per unmasked position). Until 2026-12-01 the count took the feed rows and ids of every position,
masked ones included: ~20 % more bytes at 80 % valid, so the fractions of roofline reported before then are ~1.2x
what this count gives. FLOPs it must do (``*_flops``): 2 per multiply-add of the micro-MLP at the unmasked
positions, every order (forward F); the step 3 F (the backward's weight gradients and input gradients are 2 F; recomputing the
forward, which the kernels do instead of storing activations, is not counted). ``*_roofline_ms`` is the larger of
bytes / HBM rate and FLOPs / FMA rate, ``*_bound`` names which, ``*_of_roofline`` divides it by the
``check_ids=False`` kernel time (1.0 = at the hardware's limit), ``*_of_roofline_default`` by the default path's,
``*_of_roofline_pipelined`` by the pipelined kernels' time per call and ``*_of_roofline_graph`` by the graphed ones'.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env, graphed, machine_facts, median_ratio, result_name, time_interleaved, time_op, write_json  # noqa: E402
from dwdp_ops._cli import positive_int  # noqa: E402


def _gpu_imports() -> None:
    """cupy and the kernels, imported by ``main`` only after the arguments are checked (a bad value fails at once)."""
    global cp, CoActionSpec, TableGrads, coaction_backward, coaction_backward_gpu, coaction_forward
    global coaction_forward_gpu, uses_specialized_kernels
    import cupy as cp
    from dwdp_ops.coaction import (
        CoActionSpec,
        TableGrads,
        coaction_backward,
        coaction_backward_gpu,
        coaction_forward,
        coaction_forward_gpu,
    )
    from dwdp_ops.coaction.fused import uses_specialized_kernels

ROWS = 100_000


def compile_mode_error(mode: str) -> str | None:
    """Why ``mode`` is not one of this PyTorch's ``torch.compile`` modes (its own message), or None (a mode it knows,
    or no PyTorch: no compiled variant runs). Checked with the arguments: ``torch.compile`` names a wrong mode only in
    the first case, after the rates were measured and that case's variants built and checked."""
    try:
        from torch._inductor import list_mode_options
    except ImportError:
        return None
    try:
        list_mode_options(mode)
    except RuntimeError as e:
        return str(e)
    return None


def pool_peak(fn, stream):
    pool = cp.get_default_memory_pool()
    stream.synchronize()
    pool.free_all_blocks()
    base = pool.total_bytes()
    with stream:
        fn()
    stream.synchronize()
    return pool.total_bytes() - base


def torch_coaction(tt, tf, tids, tfids, tmask):
    """The co-action forward in PyTorch (gathers, reshaped weights, batched matmuls), for eager and compiled runs."""
    import torch

    ind, x0 = tt[tids], tf[tfids]
    w0 = ind[:, :128].reshape(-1, 16, 8)
    w1 = ind[:, 128:160].reshape(-1, 8, 4)
    outs = []
    for c in (1, 2, 3):
        h1 = torch.tanh(torch.bmm(x0**c, w0))
        h2 = torch.bmm(h1, w1)
        outs.append((torch.cat([h1, h2], -1) * tmask[:, :, None]).sum(1))
    return torch.cat(outs, -1)


def repeated(fn, k: int):
    """``fn`` run ``k`` times back to back (no synchronisation between): one pipelined op."""
    def run():
        for _ in range(k):
            fn()
    return run


def host_us(fn, stream, calls: int = 50) -> float:
    """Host wall-clock microseconds per call of ``calls`` back-to-back calls, the stream synchronised after them."""
    fn()
    stream.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    t = time.perf_counter() - t
    stream.synchronize()
    return t / calls * 1e6


def torch_peak(step) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


SIZES = ((1024, 50), (1024, 100), (8192, 50), (8192, 100), (2048, 1000), (16384, 200))

FMA_KERNEL = r"""
extern "C" __global__ void fma_rate(float* out, int iters, float a, float b) {
  float x0 = threadIdx.x, x1 = x0 + 1.f, x2 = x0 + 2.f, x3 = x0 + 3.f, x4 = x0 + 4.f, x5 = x0 + 5.f, x6 = x0 + 6.f,
        x7 = x0 + 7.f;
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      x0 = fmaf(x0, a, b); x1 = fmaf(x1, a, b); x2 = fmaf(x2, a, b); x3 = fmaf(x3, a, b);
      x4 = fmaf(x4, a, b); x5 = fmaf(x5, a, b); x6 = fmaf(x6, a, b); x7 = fmaf(x7, a, b);
    }
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
}
"""


def fma_tflops(stream) -> float:
    """fp32 FMA rate (TFLOP/s, 2 FLOP per FMA) of a CuPy RawKernel: 8 blocks of 256 threads per SM, each thread 8
    independent chains of 16 x iters dependent FMAs (the result is stored, so none is optimised away)."""
    k = cp.RawKernel(FMA_KERNEL, "fma_rate")
    sms = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"]
    blocks, threads, iters = sms * 8, 256, 4096
    out = cp.empty(blocks * threads, cp.float32)
    a, b = np.float32(0.999), np.float32(1e-3)
    with stream:
        ms, _ = time_op(lambda: k((blocks,), (threads,), (out, np.int32(iters), a, b)), stream, 10, 2)
    return 2.0 * blocks * threads * iters * 16 * 8 / (ms * 1e-3) / 1e12


def roofline(spec: CoActionSpec, B: int, T: int, valid: int, elem: int = 4) -> dict:
    """Bytes and FLOPs the forward and the step must move / do (see the module docstring)."""
    D, Di, O = spec.feed_dim, spec.induction_dim, spec.out_dim
    # induction rows and ids, feed rows and ids of the unmasked positions, the whole mask, the output
    fwd_bytes = elem * (B * Di + valid * D + B * O) + 8 * (B + valid) + 4 * B * T
    bwd_bytes = (fwd_bytes - elem * B * O + 4 * B * O  # the forward's inputs again, grad_out instead of the output
                 + 4 * (ROWS * Di + ROWS * D)  # the dense table gradients, zeroed
                 + 2 * 4 * (B * Di + valid * D))  # row gradients added in (read + write)
    macs = sum(i * o for i, o in spec.layer_dims)
    fwd_flops = 2.0 * valid * spec.orders * macs
    return dict(fwd_bytes=fwd_bytes, step_bytes=fwd_bytes + bwd_bytes, fwd_flops=fwd_flops, step_flops=3 * fwd_flops)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=positive_int, default=20)
    ap.add_argument("--sizes", default=",".join(f"{b}x{t}" for b, t in SIZES),
                    help="comma-separated BxT cases (default: all six)")
    ap.add_argument("--pipeline", type=positive_int, default=10,
                    help="calls per timed op of the pipelined variants (fused kernels, PyTorch eager and compiled)")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode of the compiled baseline ('default' compiles faster)")
    ns = ap.parse_args()
    sizes = []
    for case in ns.sizes.split(","):
        try:
            B, T = (int(v) for v in case.split("x"))
        except ValueError:
            ap.error(f"--sizes: each case must be BxT with integers B, T >= 1 (e.g. 1024x50), got {case!r}")
        if B < 1 or T < 1:
            ap.error(f"--sizes: B and T must be >= 1, got {case!r}")
        sizes.append((B, T))
    why = compile_mode_error(ns.compile_mode)
    if why:
        ap.error(f"--compile-mode: {why}")
    _gpu_imports()
    spec = CoActionSpec()
    s = cp.cuda.Stream(non_blocking=True)
    rs = np.random.default_rng(0)
    table = cp.asarray(rs.normal(0, 0.3, (ROWS, spec.induction_dim)).astype(np.float32))
    ftable = cp.asarray(rs.normal(0, 0.6, (ROWS, spec.feed_dim)).astype(np.float32))
    big = cp.asarray(rs.random(1 << 28, dtype=np.float32))  # random, never zeros
    dst = cp.empty_like(big)
    with s:
        copy_ms, _ = time_op(lambda: dst.__setitem__(Ellipsis, big), s, 10, 2)
    hbm = 2 * big.nbytes / (copy_ms * 1e6)  # GB/s, read + write
    big = dst = None  # release the 2 GiB before the cases
    fma = fma_tflops(s)
    print(f"HBM device-to-device copy {hbm:.0f} GB/s, fp32 FMA (RawKernel) {fma:.1f} TFLOP/s", flush=True)
    try:
        import torch
    except ImportError:
        torch = None
    rows = []
    for B, T in sizes:
        ids = cp.asarray(rs.integers(0, ROWS, B))
        fids = cp.asarray(rs.integers(0, ROWS, (B, T)))
        mask = cp.asarray((rs.random((B, T)) < 0.8).astype(np.float32))
        g = cp.asarray(rs.normal(size=(B, spec.out_dim)).astype(np.float32))

        def fused_fwd(check=True, zero_grads=None):
            return coaction_forward_gpu(table, ftable, mask, spec, ind_ids=ids, feed_ids=fids, stream=s,
                                        check_ids=check, zero_grads=zero_grads)

        def fused_step(check=True, ahead=True):
            # as the autograd op runs it: the ids checked once a step, by the forward (its backward reuses them), and
            # the table gradients zeroed by the forward's kernel (TableGrads); ahead=False: zeroed by the backward
            # on the stream in front of its kernel instead (the way before); returns every array the step allocates
            # (the graphed variant keeps them referenced)
            grads = TableGrads(table.shape, ftable.shape, stream=s) if ahead else None
            out = fused_fwd(check, grads)
            gi, gf = coaction_backward_gpu(table, ftable, mask, g, spec, ind_ids=ids, feed_ids=fids, stream=s,
                                           check_ids=False, grads=grads)
            return out, gi, gf

        def cupy_fwd():
            return coaction_forward(table[ids], ftable[fids], mask, spec)

        def cupy_step():
            ind, feed = table[ids], ftable[fids]
            coaction_forward(ind, feed, mask, spec)
            gi, gf = coaction_backward(ind, feed, mask, g, spec)
            ti, tf = cp.zeros_like(table), cp.zeros_like(ftable)
            cp.add.at(ti, ids, gi)
            cp.add.at(tf, fids, gf)
            return ti, tf

        def general(fn):  # the same call on the general fast kernels (the specialised ones turned off)
            with env("DWDP_COACTION_SPECIALIZED", "0"):
                return fn(False)

        fwd_ops = {"fused": fused_fwd, "fused_nocheck": lambda: fused_fwd(False), "cupy": cupy_fwd,
                   "fused_general": lambda: general(fused_fwd)}
        step_ops = {"fused": fused_step, "fused_nocheck": lambda: fused_step(False), "cupy": cupy_step,
                    "fused_general": lambda: general(fused_step)}
        fwd_ops["fused_nocheck_pipelined"] = repeated(fwd_ops["fused_nocheck"], ns.pipeline)
        step_ops["fused_nocheck_pipelined"] = repeated(step_ops["fused_nocheck"], ns.pipeline)
        fwd_ops["fused_nocheck_graph"] = graphed(fwd_ops["fused_nocheck"], ns.pipeline, s)
        step_ops["fused_nocheck_graph"] = graphed(step_ops["fused_nocheck"], ns.pipeline, s)
        # step-only baselines: the table gradients zeroed by the backward's memsets in front of its kernel (the way
        # before TableGrads), isolated and graphed
        step_only = {"fused_zeroed": lambda: fused_step(False, ahead=False)}
        step_only["fused_zeroed_graph"] = graphed(step_only["fused_zeroed"], ns.pipeline, s)
        rec = {"B": B, "T": T, "specialized": uses_specialized_kernels(spec), "pipeline": ns.pipeline}
        # correctness on this data before timing
        with s:
            ref = cupy_fwd()
            for name, fn in (("fused", fused_fwd), ("fused_nocheck", lambda: fused_fwd(False)),
                             ("fused_general", lambda: general(fused_fwd))):
                err = float(cp.linalg.norm(fn() - ref) / cp.linalg.norm(ref))
                if not err < 1e-4:
                    raise RuntimeError(f"{name} forward differs from the CuPy reference: rel. error {err:.3g}")
            # a replay writes what an eager call does: every captured output poisoned first, then compared
            want_step = fused_step(False)
            zeroed = fused_step(False, ahead=False)
            for a, w in zip(zeroed, want_step):
                err = float(cp.linalg.norm(a - w) / cp.linalg.norm(w))
                if not err < 1e-5:
                    raise RuntimeError(f"the step with its gradients zeroed by the backward differs: rel. error {err:.3g}")
            for name, op, want in (("forward", fwd_ops["fused_nocheck_graph"], (ref,)),
                                   ("step", step_ops["fused_nocheck_graph"], want_step),
                                   ("step, gradients zeroed by the backward", step_only["fused_zeroed_graph"],
                                    want_step)):
                outs = [a for kept in op.keep for a in (kept if isinstance(kept, tuple) else (kept,))]
                for a in outs:
                    a.fill(np.nan)
                op()
                for i, a in enumerate(outs):
                    w = want[i % len(want)]
                    err = float(cp.linalg.norm(a - w) / cp.linalg.norm(w))
                    if not err < 1e-4:
                        raise RuntimeError(f"the graphed {name} differs from the eager one: rel. error {err:.3g}")
        ts = None
        if torch is not None:
            ts = torch.cuda.ExternalStream(s.ptr)
            tt = torch.from_dlpack(table).clone().requires_grad_(True)
            tf = torch.from_dlpack(ftable).clone().requires_grad_(True)
            targs = (tt, tf, *(torch.from_dlpack(a) for a in (ids, fids, mask)))
            tg = torch.from_dlpack(g)
            compiled = torch.compile(torch_coaction, mode=ns.compile_mode, dynamic=False)

            def torch_step(fn):
                tt.grad = tf.grad = None
                fn(*targs).backward(tg)

            def torch_graphed(step, k):
                """``step()`` (a training step into tt.grad / tf.grad) captured once with torch.cuda.graph, replayed
                k times as one op; the static gradients stay referenced (``op.keep``) and the eager ops' steps,
                which start from .grad = None, never touch them."""
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
                    for _ in range(3):
                        tt.grad = tf.grad = None
                        step()
                torch.cuda.current_stream().wait_stream(side)
                tt.grad = tf.grad = None
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                keep = (tt.grad, tf.grad)
                tt.grad = tf.grad = None

                def run():
                    for _ in range(k):
                        graph.replay()
                run.keep = keep
                return run

            from dwdp_ops.coaction import coaction  # (imports torch)

            def fused_torch(tt_, tf_, tids, tfids, tmask, check=True):  # torch_coaction's signature
                return coaction(tt_, tf_, tmask, spec, ind_ids=tids, feed_ids=tfids, check_ids=check)

            fwd_ops["fused_torch"] = lambda: fused_torch(*targs).detach()
            step_ops["fused_torch"] = lambda: torch_step(fused_torch)
            fwd_ops["torch"] = lambda: torch_coaction(*targs).detach()
            fwd_ops["torch_compile"] = lambda: compiled(*targs).detach()
            step_ops["torch"] = lambda: torch_step(torch_coaction)
            step_ops["torch_compile"] = lambda: torch_step(compiled)
            for name in ("torch", "torch_compile", "fused_torch"):
                fwd_ops[f"{name}_pipelined"] = repeated(fwd_ops[name], ns.pipeline)
                step_ops[f"{name}_pipelined"] = repeated(step_ops[name], ns.pipeline)
            with torch.cuda.stream(ts):  # compile and warm up outside any timing; check it against eager
                for _ in range(3):
                    torch_step(compiled)
                got, want = compiled(*targs).detach(), torch_coaction(*targs).detach()
                mine = fused_torch(*targs).detach()
                torch.cuda.synchronize()
                err = float((got - want).norm() / want.norm())
                if not err < 1e-4:
                    raise RuntimeError(f"torch.compile forward differs from eager PyTorch: rel. error {err:.3g}")
                err = float((mine - want).norm() / want.norm())
                if not err < 1e-4:
                    raise RuntimeError(f"the fused autograd op differs from eager PyTorch: rel. error {err:.3g}")
                rec["torch_compile_mode"] = ns.compile_mode
                # the autograd op's training step captured with torch.cuda.graph (no id check in a capture); its
                # gradients checked against an eager step's
                step_ops["fused_torch_graph"] = torch_graphed(
                    lambda: fused_torch(*targs, check=False).backward(tg), ns.pipeline)
                torch_step(fused_torch)
                want_g = (tt.grad.clone(), tf.grad.clone())
                tt.grad = tf.grad = None
                for t_ in step_ops["fused_torch_graph"].keep:
                    t_.fill_(float("nan"))
                step_ops["fused_torch_graph"]()
                torch.cuda.synchronize()
                for a_, w_ in zip(step_ops["fused_torch_graph"].keep, want_g):
                    err = float((a_ - w_).norm() / w_.norm())
                    if not err < 1e-5:
                        raise RuntimeError(f"the graphed autograd op's gradients differ: rel. error {err:.3g}")
        with s, (torch.cuda.stream(ts) if ts is not None else contextlib.nullcontext()):
            fwd_t = time_interleaved(fwd_ops, s, ns.repeats, 3)
            step_t = time_interleaved({**step_ops, **step_only}, s, ns.repeats, 3)
        for name in [n for n in step_t if n.endswith(("_pipelined", "_graph"))]:  # per call
            if name in fwd_t:
                fwd_t[name] = [v / ns.pipeline for v in fwd_t[name]]
            step_t[name] = [v / ns.pipeline for v in step_t[name]]
        for name in step_only:
            rec[f"{name}_step_ms"] = median(step_t[name])
            rec[f"{name}_step_over_fused"] = median_ratio(step_t[name], step_t["fused"])
        # the same-run comparison TableGrads is judged by (median of per-repeat ratios)
        rec["ahead_over_zeroed_step_graph"] = median_ratio(step_t["fused_nocheck_graph"], step_t["fused_zeroed_graph"])
        rec["ahead_over_zeroed_step"] = median_ratio(step_t["fused_nocheck"], step_t["fused_zeroed"])
        for name in fwd_ops:
            rec[f"{name}_fwd_ms"] = median(fwd_t[name])
            rec[f"{name}_step_ms"] = median(step_t[name])
            if name != "fused":  # how many times the default fused path's time, per repeat
                rec[f"{name}_fwd_over_fused"] = median_ratio(fwd_t[name], fwd_t["fused"])
                rec[f"{name}_step_over_fused"] = median_ratio(step_t[name], step_t["fused"])
        if ts is not None:  # the pipelined kernels against pipelined PyTorch, per repeat
            for ph, tt_ in (("fwd", fwd_t), ("step", step_t)):
                for name in ("torch", "torch_compile"):
                    rec[f"pipelined_{ph}_{name}_over_fused"] = median_ratio(tt_[f"{name}_pipelined"],
                                                                            tt_["fused_nocheck_pipelined"])
                # the autograd op against PyTorch autograd: isolated and pipelined, per repeat
                rec[f"{ph}_torch_over_fused_torch"] = median_ratio(tt_["torch"], tt_["fused_torch"])
                rec[f"pipelined_{ph}_torch_over_fused_torch"] = median_ratio(tt_["torch_pipelined"],
                                                                             tt_["fused_torch_pipelined"])
            rec["fused_torch_graph_step_ms"] = median(step_t["fused_torch_graph"])
            rec["graph_step_torch_over_fused_torch"] = median_ratio(step_t["torch_pipelined"],
                                                                    step_t["fused_torch_graph"])
        rec["times_ms"] = {"fwd": fwd_t, "step": step_t}
        with s:
            rec["fused_nocheck_host_fwd_us"] = host_us(lambda: fused_fwd(False), s)
            rec["fused_nocheck_host_step_us"] = host_us(lambda: fused_step(False), s)
        rec["fused_peak_MiB"] = pool_peak(fused_step, s) / 2**20
        rec["cupy_peak_MiB"] = pool_peak(cupy_step, s) / 2**20
        if ts is not None:
            with torch.cuda.stream(ts):
                rec["torch_peak_MiB"] = torch_peak(step_ops["torch"])
                rec["torch_compile_peak_MiB"] = torch_peak(step_ops["torch_compile"])
        rl = roofline(spec, B, T, int(mask.sum()))
        for ph in ("fwd", "step"):
            t_bytes = rl[f"{ph}_bytes"] / (hbm * 1e6)  # ms
            t_flops = rl[f"{ph}_flops"] / (fma * 1e9)  # ms
            rec[f"{ph}_bytes"], rec[f"{ph}_flops"] = rl[f"{ph}_bytes"], rl[f"{ph}_flops"]
            rec[f"{ph}_bytes_ms"], rec[f"{ph}_flops_ms"] = t_bytes, t_flops
            rec[f"{ph}_roofline_ms"] = max(t_bytes, t_flops)
            rec[f"{ph}_bound"] = "bytes" if t_bytes >= t_flops else "flops"
            rec[f"{ph}_of_roofline"] = rec[f"{ph}_roofline_ms"] / rec[f"fused_nocheck_{ph}_ms"]
            rec[f"{ph}_of_roofline_default"] = rec[f"{ph}_roofline_ms"] / rec[f"fused_{ph}_ms"]
            rec[f"{ph}_of_roofline_pipelined"] = rec[f"{ph}_roofline_ms"] / rec[f"fused_nocheck_pipelined_{ph}_ms"]
            rec[f"{ph}_of_roofline_graph"] = rec[f"{ph}_roofline_ms"] / rec[f"fused_nocheck_graph_{ph}_ms"]
        rec["fused_fwd_of_hbm"] = rl["fwd_bytes"] / (rec["fused_nocheck_fwd_ms"] * 1e6) / hbm
        rec["speedup_fwd_vs_cupy"] = rec["cupy_fwd_over_fused"]
        rec["speedup_step_vs_cupy"] = rec["cupy_step_over_fused"]
        if ts is not None:
            rec["speedup_step_vs_torch"] = rec["torch_step_over_fused"]
            rec["speedup_step_vs_torch_compile"] = rec["torch_compile_step_over_fused"]
        rows.append(rec)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items() if k != "times_ms"},
              flush=True)
        if ts is not None:
            del compiled, fwd_ops, step_ops, targs, tt, tf
            torch.cuda.empty_cache()
    facts = machine_facts()
    write_json(result_name("coaction_bench", facts["card"]),
               dict(benchmark="coaction", hbm_copy_gbps=hbm, fma_tflops=fma,
                    fma_method="CuPy RawKernel, 8 independent fp32 FMA chains per thread, 8 x 256 threads per SM",
                    repeats=ns.repeats, method="variants interleaved per repeat (order shuffled per repeat); "
                    "medians; *_over_fused = median of per-repeat ratios to the default fused path (check_ids=True)", torch_compile_mode=ns.compile_mode if torch else None,
                    **facts, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
