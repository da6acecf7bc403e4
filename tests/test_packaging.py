"""Packaging: one NVSHMEM release for build and run (pinned in pyproject, checked at import), the CUDA 12 route's
CMake check, the README's set-up commands, the licence, and messages when _C, the driver or the GPU is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
from conftest import ROOT
from dwdp_ops import _native
from dwdp_ops.errors import DwdpError
from dwdp_ops.versions import NVSHMEM_VERSION, install_command, wheel_cuda_major

README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# -- pins -------------------------------------------------------------------------------------------------------------
def _pins(reqs: list[str], dist: str) -> list[str]:
    return [r for r in reqs if re.match(rf"{re.escape(dist)}\b", r)]


def test_build_and_cuda13_extra_pin_one_nvshmem(pyproject):
    want = f"nvidia-nvshmem-cu13=={NVSHMEM_VERSION}"
    assert _pins(pyproject["build-system"]["requires"], "nvidia-nvshmem-cu13") == [want]
    assert _pins(pyproject["project"]["optional-dependencies"]["cu13"], "nvidia-nvshmem-cu13") == [want]


def test_cuda12_extra_pins_the_same_release(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    assert _pins(extras["cu12"], "nvidia-nvshmem-cu12") == [f"nvidia-nvshmem-cu12=={NVSHMEM_VERSION}"]
    assert not _pins(extras["cu12"], "nvidia-nvshmem-cu13") and not _pins(extras["cu13"], "nvidia-nvshmem-cu12")


def test_no_nvshmem_in_base_dependencies(pyproject):
    # the cu12 and cu13 wheels share site-packages/nvidia/nvshmem: a base cu13 pin would break CUDA 12 installs
    assert not [d for d in pyproject["project"]["dependencies"] if d.startswith("nvidia-nvshmem")]


@pytest.mark.parametrize("dep, where", [("safetensors", "model"), ("torch", "model"), ("cupy-cuda13x", "cu13"),
                                        ("cupy-cuda12x", "cu12"), ("cmake", "test"), ("pytest", "test")])
def test_dependencies_sit_in_their_extra(pyproject, dep, where):
    assert _pins(pyproject["project"]["optional-dependencies"][where], dep), f"{dep} is not in the {where} extra"


def test_cuda_python_is_not_declared(pyproject):
    every = list(pyproject["project"]["dependencies"])
    for reqs in pyproject["project"]["optional-dependencies"].values():
        every += reqs
    assert not [r for r in every if r.startswith(("cuda-python", "cuda-bindings"))]
    used = subprocess.run(["grep", "-rlE", r"^\s*(from|import) cuda(\.| )", str(ROOT / "python")],
                          capture_output=True, text=True).stdout
    assert used == "", f"library code imports cuda-python but it is not declared: {used}"


def test_model_extra_torch_floor_pins_the_same_nvshmem(pyproject):
    # torch 2.10 (CUDA 12) and 2.11/2.12 (CUDA 13) pin NVSHMEM 3.4.5; older ones pin 3.3.x
    (torch,) = _pins(pyproject["project"]["optional-dependencies"]["model"], "torch")
    assert torch == "torch>=2.10" and NVSHMEM_VERSION == "3.4.5"


def test_licence(pyproject):
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert pyproject["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert len(text) > 10000  # the full text, not a notice


# -- README and CI ----------------------------------------------------------------------------------------------------
def _setup_section() -> str:
    return README[README.index("## Set up"): README.index("\n## ", README.index("## Set up") + 1)]


def test_ci_runs_the_readme_commands_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    first = re.search(r"```bash\n(.*?)```", _setup_section(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands[0] == 'pip install -e ".[cu13,test]"' and commands[1] == "pytest"
    ci_lines = [line.strip() for line in ci.splitlines()]
    assert commands[0] in ci_lines
    assert any(line == "pytest" or line.startswith("pytest ") for line in ci_lines)


@pytest.mark.parametrize("command", [
    "pip install --no-build-isolation --no-deps -e .",
    f'pip install nvidia-nvshmem-cu12=={NVSHMEM_VERSION} "scikit-build-core>=0.11" pybind11 cmake ninja && '
    'pip install --no-build-isolation -e ".[cu12,test]"',
])
def test_readme_documents_each_route_as_one_command(command):
    assert command in _setup_section()


def test_readme_names_the_pinned_release():
    assert f"nvidia-nvshmem-cu13=={NVSHMEM_VERSION}" in _setup_section()


# -- the import-time version check ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "built, loaded, wheel, installed",
    [
        ("3.4.5", "3.4.5", "nvidia-nvshmem-cu13", {"nvidia-nvshmem-cu13": "3.4.5"}),
        ("3.4.5", None, "nvidia-nvshmem-cu13", {"nvidia-nvshmem-cu13": "3.4.5"}),  # loaded version unknown
        ("3.8.0", "3.8.0", "", {"nvidia-nvshmem-cu13": "3.8.0"}),  # built before _build_info.json existed
        ("3.4.5", "3.4.5", "", {}),  # NVSHMEM_HOME build, library found through RUNPATH
        ("3.4.5", "3.4.5", "nvidia-nvshmem-cu12", {"nvidia-nvshmem-cu12": "3.4.5"}),
    ],
)
def test_matching_versions_pass(built, loaded, wheel, installed):
    _native.check_nvshmem_versions(built, loaded, "/x/libnvshmem_host.so.3", wheel, installed)


@pytest.mark.parametrize("built, loaded", [("3.4.5", "3.8.0"), ("3.8.0", "3.4.5"), ("3.4.5", "3.4.6")])
def test_version_skew_names_both_versions_and_the_fix(built, loaded):
    with pytest.raises(DwdpError) as e:
        _native.check_nvshmem_versions(built, loaded, "/site/nvidia/nvshmem/lib/libnvshmem_host.so.3",
                                       "nvidia-nvshmem-cu13", {"nvidia-nvshmem-cu13": loaded})
    msg = str(e.value)
    assert f"built against NVSHMEM {built}" in msg and f"loaded is NVSHMEM {loaded}" in msg
    assert f"pip install 'nvidia-nvshmem-cu13=={built}'" in msg and "rebuild" in msg
    assert "/site/nvidia/nvshmem/lib/libnvshmem_host.so.3" in msg and "\n" not in msg


def test_wheel_of_the_other_cuda_major_is_refused():
    with pytest.raises(DwdpError, match=r"built for CUDA 13 .* nvidia-nvshmem-cu12 \(CUDA 12\) is installed.*"
                                        r"pip uninstall -y nvidia-nvshmem-cu12 && pip install 'nvidia-nvshmem-cu13==3\.4\.5'"):
        _native.check_nvshmem_versions("3.4.5", "3.4.5", "", "nvidia-nvshmem-cu13", {"nvidia-nvshmem-cu12": "3.4.5"})


def test_both_wheels_installed_is_refused():
    both = {"nvidia-nvshmem-cu12": "3.4.5", "nvidia-nvshmem-cu13": "3.4.5"}
    with pytest.raises(DwdpError, match="both nvidia-nvshmem-cu12==3.4.5, nvidia-nvshmem-cu13==3.4.5 are installed"):
        _native.check_nvshmem_versions("3.4.5", "3.4.5", "", "nvidia-nvshmem-cu13", both)


@pytest.fixture
def fake_native(monkeypatch):
    """native() with its inputs replaced: returns a setter for (headers, loaded, build info, installed wheels,
    import error)."""
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_preload_nvshmem", lambda: None)

    def configure(headers="3.4.5", loaded=("3.4.5", "/lib/libnvshmem_host.so.3"), info=None, installed=None,
                  import_error=None):
        fake = types.SimpleNamespace(nvshmem_version=lambda: headers, cuda_device_count=lambda: (0, "x"))

        def import_c():
            if import_error:
                raise ImportError(import_error)
            return fake

        monkeypatch.setattr(_native, "_import_C", import_c)
        monkeypatch.setattr(_native, "loaded_nvshmem", lambda: loaded)
        monkeypatch.setattr(_native, "build_info", lambda: info)
        monkeypatch.setattr(_native, "installed_nvshmem_wheels",
                            lambda: {"nvidia-nvshmem-cu13": loaded[0]} if installed is None and loaded else installed or {})
        return fake

    return configure


def test_native_refuses_a_skewed_host_library(fake_native):
    fake_native(headers="3.4.5", loaded=("3.8.0", "/venv/nvidia/nvshmem/lib/libnvshmem_host.so.3"),
                info={"nvshmem_version": "3.4.5", "nvshmem_wheel": "nvidia-nvshmem-cu13"})
    with pytest.raises(DwdpError, match=r"built against NVSHMEM 3\.4\.5 but the host library loaded is NVSHMEM 3\.8\.0"):
        _native.native()
    assert _native._module is None  # not cached: the next call checks again


def test_native_returns_the_module_when_versions_match(fake_native):
    fake = fake_native(headers="3.4.5", loaded=("3.4.5", "/x"), info={"nvshmem_wheel": "nvidia-nvshmem-cu13"})
    assert _native.native() is fake and _native.native() is fake


def test_native_reports_skew_even_when_import_fails(fake_native):
    fake_native(loaded=("3.8.0", "/x"), info={"nvshmem_version": "3.4.5", "nvshmem_wheel": "nvidia-nvshmem-cu13"},
                import_error="undefined symbol: nvshmemi_foo")
    with pytest.raises(DwdpError, match=r"NVSHMEM 3\.4\.5 .* NVSHMEM 3\.8\.0"):
        _native.native()


def test_native_without_nvshmem_says_what_to_install(fake_native):
    fake_native(loaded=None, installed={}, import_error="libnvshmem_host.so.3: cannot open shared object file")
    with pytest.raises(DwdpError, match=r"no NVSHMEM host library is installed.*pip install 'dwdp_ops\[cu13\]'"):
        _native.native()
    assert _native.device_count()[0] == 0


def test_this_install_runs_with_the_nvshmem_it_was_built_against():
    c, why = _native.native_or_reason()
    if c is None:
        pytest.skip(f"dwdp_ops._C is not usable here: {why}")
    loaded = _native.loaded_nvshmem()
    assert loaded is not None and loaded[0] == c.nvshmem_version()
    info = _native.build_info()
    if info is not None:  # builds from before the file existed have none
        assert info["nvshmem_version"] == c.nvshmem_version()
        assert info["cuda_version"].split(".")[0] == str(wheel_cuda_major(info["nvshmem_wheel"]) or "")


def test_build_info_template_has_every_key_read():
    text = (ROOT / "cmake" / "build_info.json.in").read_text()
    data = json.loads(re.sub(r"@\w+@", "x", text))
    assert {"nvshmem_version", "nvshmem_wheel", "nvshmem_wheel_version", "cuda_version"} <= set(data)
    assert "configure_file(cmake/build_info.json.in" in (ROOT / "CMakeLists.txt").read_text()


def test_install_command():
    assert install_command(13) == f"pip install 'nvidia-nvshmem-cu13=={NVSHMEM_VERSION}'"
    assert install_command(12, "3.4.5") == "pip install 'nvidia-nvshmem-cu12==3.4.5'"


# -- messages without driver, GPU or _C -------------------------------------------------------------------------------
INSUFFICIENT = "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"


@pytest.mark.parametrize(
    "reason, driver, expected",
    [
        (INSUFFICIENT, False, "no NVIDIA driver found"),
        (INSUFFICIENT, True, "the NVIDIA driver is older than the CUDA runtime"),
        ("cudaErrorNoDevice: no CUDA-capable device is detected", True, "no NVIDIA GPU found"),
        ("no CUDA device found", True, "no NVIDIA GPU found"),
        ("cudaErrorUnknown: unknown error", True, "cudaErrorUnknown: unknown error"),
    ],
)
def test_describe_cuda_error(reason, driver, expected):
    out = _native.describe_cuda_error(reason, driver_present=driver)
    assert out.startswith(expected), out
    if not driver:
        assert "insufficient" not in out


def test_info_without_native_module_is_one_line_and_no_traceback():
    code = ("import sys; sys.modules['dwdp_ops._C'] = None\n"  # makes `from . import _C` raise ImportError
            "from dwdp_ops.__main__ import main; sys.exit(main(['info']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("native")]
    assert len(lines) == 1 and "unavailable: " in lines[0] and "dwdp_ops._C" in lines[0], out.stdout
    assert re.search(r"cuda_devices\s+0", out.stdout)


def test_info_prints_built_and_loaded_nvshmem():
    out = subprocess.run([sys.executable, "-m", "dwdp_ops", "info", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    if data["native"] != "ok":
        pytest.skip(f"dwdp_ops._C is not usable here: {data['native']}")
    assert data["nvshmem_loaded"].split()[0] == data["nvshmem_headers"]


# -- the CMake checks of the CUDA 12 route (cmake -P, no nvcc needed) -------------------------------------------------
def _cmake_check(tmp_path, call: str) -> subprocess.CompletedProcess:
    if not shutil.which("cmake"):
        pytest.skip("cmake not on PATH (pip install cmake, part of the test extra)")
    script = tmp_path / "check.cmake"
    script.write_text(f'include("{ROOT / "cmake" / "dwdp_checks.cmake"}")\n{call}\nmessage(STATUS "check passed")\n')
    return subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "wheel, nvcc, ok",
    [
        ("nvidia-nvshmem-cu13", "13.0.88", True),
        ("nvidia-nvshmem-cu12", "12.8.93", True),
        ("", "12.4.131", True),  # NVSHMEM_HOME: no wheel to compare
        ("nvidia-nvshmem-cu13", "12.4.131", False),  # pip install ".[cu12]" with isolation on a CUDA 12 machine
        ("nvidia-nvshmem-cu12", "13.0.88", False),  # cu12 wheel, CUDA 13 nvcc
    ],
)
def test_cmake_cuda_major_check(tmp_path, wheel, nvcc, ok):
    proc = _cmake_check(tmp_path, f'dwdp_check_cuda_major("{wheel}" "{nvcc}" "{NVSHMEM_VERSION}")')
    text = proc.stdout + proc.stderr
    if ok:
        assert proc.returncode == 0 and "check passed" in text, text
        return
    assert proc.returncode != 0 and "check passed" not in text
    flat = " ".join(text.split())
    major = nvcc.split(".")[0]
    assert f"the NVSHMEM wheel {wheel} is built for CUDA {wheel[-2:]} but nvcc is CUDA {nvcc}" in flat, flat
    assert (f'pip install nvidia-nvshmem-cu{major}=={NVSHMEM_VERSION} "scikit-build-core>=0.11" pybind11 cmake ninja '
            f'&& pip install --no-build-isolation -e ".[cu{major},test]"') in flat, flat


@pytest.mark.parametrize("dists, ok", [("nvidia-nvshmem-cu13 3.4.5", True), ("", True),
                                       ("nvidia-nvshmem-cu13 3.4.5;nvidia-nvshmem-cu12 3.4.5", False)])
def test_cmake_refuses_two_nvshmem_wheels(tmp_path, dists, ok):
    proc = _cmake_check(tmp_path, f'dwdp_check_one_wheel("{dists}")')
    text = " ".join((proc.stdout + proc.stderr).split())
    assert (proc.returncode == 0) is ok, text
    if not ok:
        assert "several NVSHMEM wheels are installed" in text


def test_a_host_library_that_cannot_load_is_named_not_a_traceback(monkeypatch):
    """A damaged or foreign libnvshmem_host.so.3 in the wheel's folder: ctypes.CDLL's OSError had escaped from every
    command (``info`` included) as a traceback; native() now raises a DwdpError naming the file and the reinstall, so
    native_or_reason gives the one-line reason."""
    wheel = pytest.importorskip("nvidia.nvshmem", reason="the NVSHMEM wheel is not installed")
    lib = next(p for p in (f"{r}/lib/libnvshmem_host.so.3" for r in wheel.__path__) if os.path.exists(p))

    def cdll(path, *args, **kw):
        raise OSError(f"{path}: invalid ELF header")

    monkeypatch.setattr(_native.ctypes, "CDLL", cdll)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "installed_nvshmem_wheels", lambda: {"nvidia-nvshmem-cu13": "3.4.5"})
    c, why = _native.native_or_reason()
    assert c is None
    assert why.startswith(f"the NVSHMEM host library {lib} cannot be loaded ({lib}: invalid ELF header)"), why
    assert "installed: nvidia-nvshmem-cu13==3.4.5" in why, why
    assert "pip install 'nvidia-nvshmem-cu13==3.4.5' --force-reinstall" in why, why
