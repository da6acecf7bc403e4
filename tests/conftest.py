"""Shared fixtures. GPU tests carry the markers ``gpu`` / ``multigpu`` and skip with a reason where the GPUs are
missing; everything host-side runs everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MULTIPROC = Path(__file__).resolve().parent / "multiproc"


def _gpu_count() -> tuple[int, str]:
    try:
        from dwdp_ops._native import device_count

        return device_count()  # the reason in words ("no NVIDIA driver found", a version skew, ...)
    except Exception as e:  # noqa: BLE001 - report any reason as the skip reason
        return 0, str(e)


GPU_COUNT, NO_GPU_REASON = _gpu_count()
# DWDP_REQUIRE_GPU=1 (set by scripts/gpu_session.sh on GPU machines): a missing GPU, driver or native module is a
# failure there, not a reason to skip every GPU test.
REQUIRE_GPU = os.environ.get("DWDP_REQUIRE_GPU", "") == "1"


def pytest_sessionstart(session):
    if REQUIRE_GPU and GPU_COUNT == 0:
        raise pytest.UsageError(f"DWDP_REQUIRE_GPU=1 but no GPU is usable: {NO_GPU_REASON}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        need = 0
        if item.get_closest_marker("gpu"):
            need = 1
        m = item.get_closest_marker("multigpu")
        if m:
            need = max(need, m.kwargs.get("n", 2))
        if need and GPU_COUNT < need:
            why = NO_GPU_REASON or f"{GPU_COUNT} visible"
            item.add_marker(pytest.mark.skip(reason=f"needs {need} NVIDIA GPU(s); found {GPU_COUNT} ({why})"))


def launcher_free_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables (torchrun, mpirun, ours), for tests that start a
    launcher themselves; ``extra`` is added on top."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "OMPI_", "DWDP_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def launch(n: int, script: str, *args: str, timeout: float = 240, keep_going: bool = False, extra_env=None,
           prefix: str = ""):
    """Runs tests/multiproc/<script> as n ranks through dwdp_ops.launch; returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "dwdp_ops.launch", "-n", str(n), "--timeout", str(timeout)]
    if keep_going:
        cmd.append("--keep-going")
    if prefix:
        cmd += ["--prefix", prefix]
    cmd += [str(MULTIPROC / script), *args]
    env = dict(os.environ, **(extra_env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60, env=env, cwd=ROOT)


@pytest.fixture
def run_ranks():
    return launch
