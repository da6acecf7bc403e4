"""GPU tests that call the library as an engine does: non-blocking streams with work queued ahead, pool reuse,
two streams at once, CUDA-graph replays followed by eager steps, partial chunks, and failures during construction."""

from __future__ import annotations

import pytest
from conftest import GPU_COUNT


@pytest.mark.multigpu(n=2)
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("mode", ["hostlist", "streams", "chunks", "graph"])
def test_engine_style(run_ranks, n, mode):
    if GPU_COUNT < n:
        pytest.skip(f"needs {n} GPUs; found {GPU_COUNT}")
    proc = run_ranks(n, "engine_check.py", mode, "3", timeout=200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    for r in range(n):
        assert f"[rank {r}] rank {r}: engine {mode} passed" in proc.stdout


@pytest.mark.multigpu(n=2)
@pytest.mark.parametrize("phase", ["local", "views"])
def test_failure_during_construction_raises_everywhere(run_ranks, phase):
    proc = run_ranks(2, "engine_check.py", f"fail:{phase}", "0", timeout=120)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    for r in range(2):
        assert f"[rank {r}] rank {r}: engine fail:{phase} passed" in proc.stdout
