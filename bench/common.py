"""Benchmark helpers shared by bench/*.py: CUDA-event timing with medians, machine facts, JSON output."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from statistics import median

RESULTS = Path(__file__).resolve().parent / "results"
NVIDIA_SMI_TIMEOUT_S = 30  # the longest a machine-facts query of nvidia-smi may take (a hung driver must not hang it)


def time_op(op, stream, repeats=10, warmup=2, before=None):
    """Median and all times (ms) of ``op()`` enqueued on ``stream``, timed with CUDA events. ``before`` runs
    before each repeat (outside the timed region), e.g. a barrier so all ranks start together. For one op alone;
    to compare ops (or an op with its baseline) use ``time_interleaved``."""
    times = time_interleaved({"op": op}, stream, repeats, warmup, before)["op"]
    return median(times), times


def _order(names: list[str], r: int) -> list[str]:
    """The order of repeat ``r``: a permutation of ``names`` drawn from a generator seeded by ``r`` alone (every rank
    draws the same). Not a rotation: with a rotation by one place per repeat every op always follows the same op, and
    an op's time depends on its predecessor: eager ops are host-bound, and a host-heavy op (``torch.compile``'s 10
    pipelined calls, ~5 ms of Python) leaves the host's caches cold for the next one. Measured on one H200
    (bench/results/logs/coaction_bench_order_probe_2026-12-01.txt): the same fused call took 197 us behind that op
    and 85 us behind another."""
    return random.Random(r).sample(names, len(names))


def time_interleaved(ops: dict, stream, repeats: int = 10, warmup: int = 2, before=None, after=None) -> dict:
    """Times several ops against each other, interleaved: one repeat runs every op once, in an order drawn afresh
    per repeat (``_order``), so that drifts of clock, temperature or neighbours, and the op that ran just before,
    reach every op alike; never "all A, then all B". Each op is timed with CUDA events on ``stream`` around ``op()``.

    ``ops``: name -> ``op`` or ``(pre, op)``: ``pre()`` is enqueued before the start event and is not timed (e.g.
    a fetch started on another stream that ``op`` runs beside); ``None`` means this rank does not run the op (it
    still joins ``before``, so ranks stay in step). ``before`` runs before each op (e.g. a device sync and a
    barrier, so that all ranks start together), ``after`` after each op's end event has completed (e.g. waiting
    for a side stream). The order depends only on the repeat index, so every rank runs the same order.
    Returns name -> list of ``repeats`` times in ms (warm-up repeats dropped; ``None`` entries for ops not run)."""
    import cupy as cp

    names = list(ops)
    times: dict = {n: [] for n in names}
    for r in range(warmup + repeats):
        for name in _order(names, r):
            if before is not None:
                before()
            op = ops[name]
            if op is None:
                if r >= warmup:
                    times[name].append(None)
                continue
            pre, op = op if isinstance(op, tuple) else (None, op)
            if pre is not None:
                pre()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            op()
            end.record(stream)
            end.synchronize()
            if after is not None:
                after()
            if r >= warmup:
                times[name].append(cp.cuda.get_elapsed_time(start, end))
    return times


@contextlib.contextmanager
def env(name: str, value: str):
    """``name=value`` in the environment inside the block (the kernels read their switches at every launch)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def graphed(fn, k: int, stream):
    """``k`` back-to-back calls of ``fn`` captured once in a CUDA graph on ``stream`` and replayed as one op. ``fn``
    must return every array it allocates (a tuple for several): they stay referenced by the op (``op.keep``), so the
    memory pool never hands their blocks to anyone else while the graph writes them (a block freed during capture
    goes back to the pool and would be overwritten by every replay); k warm-up calls first leave k calls' blocks
    cached in the pool, so the capture allocates nothing anew."""
    with stream:
        warm = [fn() for _ in range(k)]
        del warm
        stream.synchronize()
        stream.begin_capture()
        try:
            keep = [fn() for _ in range(k)]
        finally:
            graph = stream.end_capture()

    def run():
        graph.launch(stream)
    run.keep = keep
    return run


def median_ratio(num: list, den: list):
    """Median over repeats of ``num[i] / den[i]`` (the per-repeat ratio of two interleaved series); None when
    either series was not run on this rank."""
    pairs = [(a, b) for a, b in zip(num, den, strict=True) if a is not None and b is not None]
    return median(a / b for a, b in pairs) if pairs else None


def nvlink_facts(device: int = 0) -> dict:
    """Link count and per-link rate from ``nvidia-smi nvlink -s``."""
    try:
        out = subprocess.run(["nvidia-smi", "nvlink", "-s", "-i", str(device)], capture_output=True, text=True,
                             timeout=NVIDIA_SMI_TIMEOUT_S).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {"links": 0, "gbps_per_link": None, "raw": ""}
    rates = [float(x) for x in re.findall(r"Link \d+: ([\d.]+) GB/s", out)]
    return {"links": len(rates), "gbps_per_link": rates[0] if rates else None, "total_gbps_per_direction": sum(rates), "raw": out.strip()}


def machine_facts() -> dict:
    """The card, SMs, driver, CUDA runtime, date and command of this run. ``driver`` is None when ``nvidia-smi`` is
    missing, prints nothing, or does not answer within ``NVIDIA_SMI_TIMEOUT_S`` (as ``nvlink_facts``)."""
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=NVIDIA_SMI_TIMEOUT_S).stdout.split()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        drv = None
    return {
        "card": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "sms": props["multiProcessorCount"],
        "driver": drv,
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def result_name(benchmark: str, card: str, suffix: str = "") -> str:
    """``<benchmark>_<card without "NVIDIA ", spaces as _><suffix>.json``, e.g. ``fetch_bandwidth_H200_N4.json``."""
    return f"{benchmark}_{card.replace('NVIDIA ', '').replace(' ', '_')}{suffix}.json"


def file_tag(text: str) -> str:
    """argparse ``type`` of ``--tag``, the result file name's suffix: letters, digits, ``.``, ``_`` and ``-`` only
    (a ``/`` had put the file in a directory that does not exist, failing at the write after the whole run)."""
    import argparse

    if not re.fullmatch(r"[A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r} may hold only letters, digits, '.', '_' and '-' (it ends the "
                                         "result file's name)")
    return text


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=1))
    out = os.environ.get("OUT")
    if out:
        Path(out, name).write_text(json.dumps(data, indent=1))
    return path


def int_list(ap, option: str, text: str, minimum: int = 1) -> list[int]:
    """The comma-separated integers of ``text`` (at least one, each >= ``minimum``), or ``ap.error`` (one ``error:``
    line, exit 2) naming ``option``. For checking a list option right after ``parse_args``, before any GPU work."""
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        ap.error(f"{option} must be comma-separated integers, got {text!r}")
    if min(vals) < minimum:
        ap.error(f"{option}: every value must be >= {minimum}, got {text!r}")
    return vals


def launcher_ranks(ap, minimum: int, why: str) -> int | None:
    """The world size the launcher's variables give (1 without a launcher; any launcher ``dwdp_ops.env`` reads), read
    before any GPU work; below ``minimum`` it is ``ap.error`` (one ``error:`` line, exit 2) saying ``why`` the script
    needs more ranks. None when the variables are malformed (``dwdp_ops.init`` reports that)."""
    from dwdp_ops.env import DistEnv

    try:
        world = DistEnv.from_environ().world_size
    except ValueError:
        return None
    if world < minimum:
        ap.error(f"needs at least {minimum} ranks ({why}), got {world}: run it under a launcher, e.g. "
                 f"python -m dwdp_ops.launch -n {minimum} bench/{ap.prog}")
    return world


def dry_run_world(ap, given: int | None, default: int = 2) -> int:
    """The world size a ``--dry-run`` plans for: ``given`` (``--world``), else ``WORLD_SIZE``, else ``default``. A
    ``WORLD_SIZE`` that is not an integer >= 1 is ``ap.error`` (one ``error:`` line, exit 2) naming it."""
    if given is not None:
        return given
    text = os.environ.get("WORLD_SIZE")
    if text is None:
        return default
    try:
        world = int(text)
    except ValueError:
        world = 0
    if world < 1:
        ap.error(f"--dry-run without --world plans for WORLD_SIZE, which must be an integer >= 1, got {text!r}")
    return world


def disjoint_world(ap, world: int | None, experts: int, case: str) -> None:
    """``ap.error`` (one ``error:`` line, exit 2) unless ``world`` ranks divide ``experts``: for a script whose
    ``case`` splits the experts disjointly over the ranks (``ExpertPartition.disjoint`` refuses any other world).
    ``world`` from ``launcher_ranks`` (None: not known, left to ``dwdp_ops.init``); checked before any GPU work."""
    if world and experts % world:
        ap.error(f"{case} splits the {experts} experts disjointly over the ranks (ExpertPartition.disjoint): the "
                 f"number of ranks must divide {experts}, got {world}")
