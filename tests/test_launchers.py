"""The same script (tests/multiproc/launcher_check.py: init, a symmetric buffer, a peer's value through peer_view
and getmem, finalize) runs unchanged on 2 GPUs under dwdp_ops.launch, torchrun and mpirun. torchrun is skipped
without torch, mpirun without an ``mpirun`` on PATH, each with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import MULTIPROC, ROOT, launcher_free_env
from dwdp_ops.launch import free_port

SCRIPT = str(MULTIPROC / "launcher_check.py")
SAFE_ENV = {"NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
pytestmark = [pytest.mark.multigpu(n=2), pytest.mark.timeout(300)]


def _check(out: subprocess.CompletedProcess, launcher: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    for r in range(2):
        assert f"launcher_check ok rank={r} world=2 launcher={launcher} gpu" in out.stdout, text


def test_dwdp_launch(run_ranks):
    _check(run_ranks(2, "launcher_check.py", "--expect", "dwdp_ops.launch", timeout=200, extra_env=SAFE_ENV),
           "dwdp_ops.launch")


def test_torchrun():
    pytest.importorskip("torch.distributed", reason="torch is not installed; torchrun comes with it")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT,
           "--expect", "torchrun"]
    _check(subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=launcher_free_env(**SAFE_ENV), cwd=ROOT), "torchrun")


def test_mpirun():
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun is not on PATH (Open MPI)")
    env = dict(launcher_free_env(**SAFE_ENV), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # one node: no remote shell is needed, but Open MPI checks that its rsh agent exists (machines without ssh)
    cmd = [mpirun, "-np", "2", "--oversubscribe", "--mca", "plm_rsh_agent", "sh"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for name in (*SAFE_ENV, "MASTER_ADDR", "MASTER_PORT", "PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV"):
        if name in env:
            cmd += ["-x", name]
    cmd += [sys.executable, SCRIPT, "--expect", "mpirun"]
    _check(subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT), "mpirun")
