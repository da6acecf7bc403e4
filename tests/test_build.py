"""The extension imports without a GPU driver, reports why there is no GPU, and the build fails clearly when its
prerequisites are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import GPU_COUNT, ROOT


def test_native_module_imports_and_reports():
    from dwdp_ops._native import native

    c = native()
    count, why = c.cuda_device_count()
    assert count >= 0 and (count > 0 or why)
    major, minor, _patch = (int(x) for x in c.nvshmem_version().split("."))
    assert major == 3 and minor >= 4
    assert c.unique_id_size() > 0


def test_native_errors_are_exceptions():
    from dwdp_ops._native import native

    c = native()
    with pytest.raises(RuntimeError, match="not initialized"):
        c.my_pe()
    with pytest.raises(RuntimeError, match="not initialized"):
        c.symmetric_malloc(1024)


def test_native_module_links_no_driver():
    from dwdp_ops import _C

    if not shutil.which("readelf"):
        pytest.skip("readelf not available")
    dyn = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True).stdout
    assert "libcuda.so" not in dyn and "libnvshmem_host.so.3" in dyn


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "dwdp_ops", "info", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '"nvshmem_headers"' in out.stdout


@pytest.mark.skipif(not shutil.which("cmake"), reason="cmake not on PATH")
@pytest.mark.timeout(300)
def test_cmake_names_missing_nvshmem(tmp_path):
    import pybind11

    env = dict(os.environ, NVSHMEM_HOME=str(tmp_path / "no-nvshmem"))
    proc = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "b"), f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    if "CMake 3.26 or higher is required" in text:
        pytest.skip("the cmake on PATH is older than the build needs")
    assert "NVSHMEM at" in text and "is incomplete" in text


@pytest.mark.skipif(not shutil.which("cmake"), reason="cmake not on PATH")
@pytest.mark.timeout(120)
def test_cmake_names_missing_nvcc(tmp_path):
    import pybind11

    env = dict(os.environ, PATH="/usr/bin:/bin", CUDACXX="")
    env.pop("CUDACXX")
    cmake = shutil.which("cmake")
    proc = subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(tmp_path / "b"), f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
        capture_output=True, text=True, env=env,
    )
    text = proc.stdout + proc.stderr
    if "CMake 3.26 or higher is required" in text:
        pytest.skip("the cmake on PATH is older than the build needs")
    assert proc.returncode != 0
    assert "dwdp_ops needs the CUDA compiler" in text, text


@pytest.mark.skipif(GPU_COUNT > 0, reason="the CPU path of the demo runs only where no GPU is usable")
def test_demo_runs_without_gpus_and_says_so():
    out = subprocess.run([sys.executable, "-m", "dwdp_ops", "demo", "--ranks", "4", "--prompts", "1", "--steps", "3", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import json

    rep = json.loads(out.stdout)
    assert [p["local_experts"] for p in rep["plans"]] == [[0, 64], [64, 128], [128, 192], [192, 256]]
    # fp8 experts by default: 42 MiB an expert (bf16: 84)
    assert rep["dtype"] == "float8_e4m3fn"
    assert all(abs(p["fetch_GiB_per_layer"] - 192 * 42 / 1024) < 1e-9 for p in rep["plans"])
    assert len(rep["cpu_reference"]["requests"]) == 4 and all(len(r["tokens"]) == 3 for r in rep["cpu_reference"]["requests"])
    assert "need NVIDIA GPUs" in rep["note"]


@pytest.mark.skipif(GPU_COUNT > 0, reason="checks the CPU (numpy) path, which --device auto leaves where a GPU is usable")
def test_can_train_cli_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dwdp_ops", "can-train", "--samples", "600", "--epochs", "1", "--quiet",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "can (cpu): epoch 1" in out.stdout and "dnn (cpu): epoch 1" in out.stdout
    import json

    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert 0.0 <= res["can"]["test_auc"] <= 1.0
    for r in res.values():  # the measured step time per batch: one figure a step, inside the run's wall time
        steps = r["curve"][0]["step_ms"]
        assert r["steps"] == len(steps) == -(-480 // 128) and all(t > 0 for t in steps)
        assert min(steps) <= r["step_ms_median"] <= max(steps) and sum(steps) < 1e3 * r["seconds"]


def test_console_scripts_are_installed():
    from importlib.metadata import entry_points

    names = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("dwdp-")}
    assert names.get("dwdp-demo") == "dwdp_ops.demo:main"
    assert names.get("dwdp-can-train") == "dwdp_ops.models.train_can:main"
    assert names.get("dwdp-launch") == "dwdp_ops.launch:main"
