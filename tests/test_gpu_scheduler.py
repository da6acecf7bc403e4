"""GPU tests of the prefetch scheduler: checksum stress, CUDA-graph decode step, compute-sanitizer."""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import GPU_COUNT


@pytest.mark.multigpu(n=2)
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_stress_checksums_at_use(run_ranks, n, seed):
    if GPU_COUNT < n:
        pytest.skip(f"needs {n} GPUs; found {GPU_COUNT}")
    proc = run_ranks(n, "scheduler_check.py", "stress", str(seed), "40", timeout=200)
    assert proc.returncode == 0, proc.stdout[-6000:]
    for r in range(n):  # this rank's own summary line ("10 bad checksums" contains "0 bad checksums")
        assert re.search(rf"^\[rank {r}\] rank {r}: stress 40 steps, .*, 0 bad checksums$", proc.stdout, re.M), \
            proc.stdout[-6000:]
    assert "on_demand" in proc.stdout and "prefetch_all" in proc.stdout


@pytest.mark.multigpu(n=2)
@pytest.mark.parametrize("n", [2, 4])
def test_cuda_graph_decode_step_replays_equal(run_ranks, n):
    if GPU_COUNT < n:
        pytest.skip(f"needs {n} GPUs; found {GPU_COUNT}")
    proc = run_ranks(n, "scheduler_check.py", "graph", "3", timeout=200)
    assert proc.returncode == 0, proc.stdout[-6000:]
    for r in range(n):
        assert f"[rank {r}] rank {r}: graph replay equals eager: True; eager equals owners' checksums: True" in proc.stdout


@pytest.mark.multigpu(n=2)
@pytest.mark.parametrize("tool", ["racecheck", "synccheck"])
def test_compute_sanitizer_two_layers(run_ranks, tool):
    if not shutil.which("compute-sanitizer"):
        pytest.skip("compute-sanitizer not installed")
    proc = run_ranks(2, "scheduler_check.py", "stress", "5", "4", timeout=400,
                     prefix=f"compute-sanitizer --tool {tool} --error-exitcode 9")
    assert proc.returncode == 0, proc.stdout[-6000:]
    # racecheck prints "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)", synccheck "ERROR SUMMARY: 0 errors"
    summaries = [line for line in proc.stdout.splitlines() if "SUMMARY" in line]
    assert len(summaries) == 2, proc.stdout[-3000:]
    assert all("ERROR SUMMARY: 0 errors" in s or "(0 errors, 0 warnings)" in s for s in summaries), summaries
