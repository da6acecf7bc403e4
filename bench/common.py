"""Benchmark helpers shared by bench/*.py: CUDA-event timing with medians, machine facts, JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from statistics import median

RESULTS = Path(__file__).resolve().parent / "results"


def time_op(op, stream, repeats=10, warmup=2, before=None):
    """Median and all times (ms) of ``op()`` enqueued on ``stream``, timed with CUDA events. ``before`` runs
    before each repeat (outside the timed region), e.g. a barrier so all ranks start together."""
    import cupy as cp

    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        op()
        end.record(stream)
        end.synchronize()
        if i >= warmup:
            times.append(cp.cuda.get_elapsed_time(start, end))
    return median(times), times


def nvlink_facts(device: int = 0) -> dict:
    """Link count and per-link rate from ``nvidia-smi nvlink -s``."""
    try:
        out = subprocess.run(["nvidia-smi", "nvlink", "-s", "-i", str(device)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {"links": 0, "gbps_per_link": None, "raw": ""}
    rates = [float(x) for x in re.findall(r"Link \d+: ([\d.]+) GB/s", out)]
    return {"links": len(rates), "gbps_per_link": rates[0] if rates else None, "total_gbps_per_direction": sum(rates), "raw": out.strip()}


def machine_facts() -> dict:
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.split()[0]
    except (OSError, IndexError):
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


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=1))
    out = os.environ.get("OUT")
    if out:
        Path(out, name).write_text(json.dumps(data, indent=1))
    return path
