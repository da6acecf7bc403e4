"""Host cost of the fused co-action op, piece by piece (one GPU).

    python bench/coaction_host.py [--repeats 15] [--calls 200]

An eager call of the fused op is host work (argument checks, allocations, launches) followed by GPU work; an
isolated call pays both, a training loop whose host runs ahead pays the larger. This benchmark times the host side
alone: each case is ``--calls`` back-to-back calls timed with ``time.perf_counter`` and the device synchronised only
after them, ``--repeats`` repeats with the cases in an order shuffled per repeat (as ``time_interleaved``); figures
are medians of the per-call microseconds. Two sizes: a small one (B = 256, T = 20, tables of 1000 rows: the GPU
keeps up with the host, so nothing queues) and the benchmark's reference size (B = 8192, T = 100, tables of
100 000 rows, as ``bench/coaction_bench.py``).

Cases (CuPy arrays on one non-blocking stream, PyTorch tensors on PyTorch's current stream, the CAN reference shape,
table + ids):
  py_call          an empty Python function call (the host's speed, for scale)
  torch_add        ``x + 1`` on a small PyTorch CUDA tensor (one eager PyTorch op's host cost, for scale)
  cupy_add         the same in CuPy
  with_stream      entering and leaving ``with stream:`` (CuPy)
  cupy_empty       ``cp.empty`` of the output's size inside ``with stream:``
  device_buffer    ``interop.device_buffer`` of one CuPy array
  args             ``fused._args``: the forward's argument checks
  native_fwd       ``_C.coaction_forward`` with prepared arguments (the C++ side: checks and the launch)
  native_bwd       ``_C.coaction_backward`` with prepared arguments
  table_grads      ``TableGrads`` of the tables' shapes (one pool block), closed
  fwd              ``coaction_forward_gpu(check_ids=False)``
  fwd_check        ``coaction_forward_gpu`` (the id check: its kernel, and the host waiting for it)
  fwd_table_grads  ``TableGrads`` + ``coaction_forward_gpu(check_ids=False, zero_grads=...)``
  bwd              ``coaction_backward_gpu(check_ids=False)`` (gradients allocated and zeroed by memsets)
  step             ``fwd_table_grads`` + ``coaction_backward_gpu(check_ids=False, grads=...)`` (bench's step)
  torch_checked    the autograd op's argument checks (``autograd._checked``)
  torch_fwd_nograd ``dwdp_ops.coaction.coaction`` (the autograd op) under ``torch.no_grad()``
  torch_fwd        the autograd op's forward on tables that require grad (the gradient tensors made and zeroed)
  torch_step       the autograd op's forward + ``.backward()`` into the tables' ``.grad`` (PyTorch's stream)
  autograd_noop    a ``torch.autograd.Function`` that returns its input and its gradient, forward + ``.backward()``
                   on a small tensor: the autograd machinery's own host cost, for scale

Writes ``bench/results/coaction_host_<card>.json``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_facts, result_name, write_json  # noqa: E402
from dwdp_ops._cli import positive_int  # noqa: E402


def _gpu_imports() -> None:
    """cupy and the kernels, imported by ``main`` only after the arguments are checked (a bad value fails at once)."""
    global cp, native, device_buffer, CoActionSpec, TableGrads, coaction_backward_gpu, coaction_forward_gpu, fused
    import cupy as cp
    from dwdp_ops._native import native
    from dwdp_ops.coaction import (
        CoActionSpec,
        TableGrads,
        coaction_backward_gpu,
        coaction_forward_gpu,
        fused,
    )
    from dwdp_ops.interop import device_buffer


SIZES = ((256, 20, 1000), (8192, 100, 100_000))


def cases(B: int, T: int, rows: int, s, rs) -> dict:
    spec = CoActionSpec()
    table = cp.asarray(rs.normal(0, 0.3, (rows, spec.induction_dim)).astype(np.float32))
    ftable = cp.asarray(rs.normal(0, 0.6, (rows, spec.feed_dim)).astype(np.float32))
    ids = cp.asarray(rs.integers(0, rows, B))
    fids = cp.asarray(rs.integers(0, rows, (B, T)))
    mask = cp.asarray((rs.random((B, T)) < 0.8).astype(np.float32))
    g = cp.asarray(rs.normal(size=(B, spec.out_dim)).astype(np.float32))
    kw = dict(ind_ids=ids, feed_ids=fids, stream=s, check_ids=False)
    geo, (bases, rps, nrows), fd, mk, ip, fp, _, _ = fused._args(spec, table, ftable, mask, ids, fids, "float32")
    out = cp.empty((B, spec.out_dim), cp.float32)
    gi, gf = cp.zeros(table.shape, cp.float32), cp.zeros(ftable.shape, cp.float32)
    nat, h = native(), s.ptr
    small = cp.zeros(16, cp.float32)

    def empty_fn():
        pass

    def with_stream():
        with s:
            pass

    def cupy_empty():
        with s:
            return cp.empty((B, spec.out_dim), cp.float32)

    def table_grads():
        TableGrads(table.shape, ftable.shape, stream=s).close()

    def fwd_tg():
        tg = TableGrads(table.shape, ftable.shape, stream=s)
        return coaction_forward_gpu(table, ftable, mask, spec, zero_grads=tg, **kw), tg

    def step():
        out, tg = fwd_tg()
        return out, coaction_backward_gpu(table, ftable, mask, g, spec, grads=tg, **kw)

    ops = {
        "py_call": empty_fn,
        "cupy_add": lambda: small + 1,
        "with_stream": with_stream,
        "cupy_empty": cupy_empty,
        "device_buffer": lambda: device_buffer(table, "induction"),
        "args": lambda: fused._args(spec, table, ftable, mask, ids, fids, "float32"),
        "native_fwd": lambda: nat.coaction_forward(*geo, bases, rps, nrows, ip, fd.ptr, fp, fd.shape[0], mk.ptr,
                                                   out.data.ptr, h, False, [], []),
        "native_bwd": lambda: nat.coaction_backward(*geo, bases, [gi.data.ptr], rps, nrows, ip, fd.ptr, fp,
                                                    fd.shape[0], mk.ptr, g.data.ptr, gf.data.ptr, h),
        "table_grads": table_grads,
        "fwd": lambda: coaction_forward_gpu(table, ftable, mask, spec, **kw),
        "fwd_check": lambda: coaction_forward_gpu(table, ftable, mask, spec, **{**kw, "check_ids": True}),
        "fwd_table_grads": fwd_tg,
        "bwd": lambda: coaction_backward_gpu(table, ftable, mask, g, spec, **kw),
        "step": step,
    }
    try:
        import torch
        from dwdp_ops.coaction import coaction

        tt = torch.from_dlpack(table).clone().requires_grad_(True)
        tf = torch.from_dlpack(ftable).clone().requires_grad_(True)
        targs = [torch.from_dlpack(a) for a in (mask, ids, fids)]
        tg_ = torch.from_dlpack(g)
        tsmall = torch.zeros(16, device="cuda")

        from dwdp_ops.coaction import autograd

        class Noop(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                return g

        xs = torch.zeros(16, device="cuda", requires_grad=True)
        gs = torch.ones(16, device="cuda")

        def torch_step():
            tt.grad = tf.grad = None
            coaction(tt, tf, targs[0], spec, ind_ids=targs[1], feed_ids=targs[2], check_ids=False).backward(tg_)

        def torch_fwd_nograd():
            with torch.no_grad():
                return coaction(tt, tf, targs[0], spec, ind_ids=targs[1], feed_ids=targs[2], check_ids=False)

        def noop():
            xs.grad = None
            Noop.apply(xs).backward(gs)

        # on PyTorch's current stream, as a training loop calls them (no stream context per call)
        ops["torch_add"] = lambda: tsmall + 1
        ops["torch_checked"] = lambda: autograd._checked(tt, tf, targs[0], spec, targs[1], targs[2])
        ops["torch_fwd_nograd"] = torch_fwd_nograd
        ops["torch_fwd"] = lambda: coaction(tt, tf, targs[0], spec, ind_ids=targs[1], feed_ids=targs[2],
                                            check_ids=False)
        ops["torch_step"] = torch_step
        ops["autograd_noop"] = noop
    except ImportError:
        pass
    return ops


def run(ops: dict, s, repeats: int, calls: int) -> dict:
    names = list(ops)
    times = {n: [] for n in names}
    for r in range(repeats + 1):  # repeat 0 warms up
        for name in random.Random(r).sample(names, len(names)):
            fn = ops[name]
            cp.cuda.Device().synchronize()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            t = time.perf_counter() - t
            cp.cuda.Device().synchronize()  # (the PyTorch cases run on PyTorch's current stream)
            if r:
                times[name].append(t / calls * 1e6)
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=positive_int, default=15)
    ap.add_argument("--calls", type=positive_int, default=200, help="back-to-back calls per timed batch (the large size: a "
                    "tenth, at least 10)")
    ns = ap.parse_args()
    _gpu_imports()
    s = cp.cuda.Stream(non_blocking=True)
    rs = np.random.default_rng(0)
    rows = []
    for B, T, nrows in SIZES:
        calls = ns.calls if B * T <= 10_000 else max(10, ns.calls // 10)
        ops = cases(B, T, nrows, s, rs)
        t = run(ops, s, ns.repeats, calls)
        rec = {"B": B, "T": T, "rows": nrows, "calls": calls,
               "host_us": {n: median(v) for n, v in t.items()}, "times_us": t}
        rows.append(rec)
        print(f"B={B} T={T}: " + ", ".join(f"{n} {v:.1f}" for n, v in rec["host_us"].items()), flush=True)
    facts = machine_facts()
    write_json(result_name("coaction_host", facts["card"]),
               dict(benchmark="coaction_host", repeats=ns.repeats, method="host wall-clock per call of back-to-back "
                    "calls (perf_counter), stream synchronised after each batch; cases shuffled per repeat; medians",
                    **facts, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
