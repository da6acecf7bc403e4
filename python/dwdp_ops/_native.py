"""Loads the native module ``dwdp_ops._C`` and checks that it runs with the NVSHMEM it was built against.

``_C`` links NVSHMEM's device library (``libnvshmem_device.a``) statically and needs ``libnvshmem_host.so.3`` from
the ``nvidia-nvshmem-cu13`` (or ``-cu12``) wheel at run time. Its RUNPATH points into the wheel; as a second line of
defence the library is preloaded with RTLD_GLOBAL from the installed wheel, which also covers editable installs whose
RUNPATH names a build-time location. Importing ``_C`` needs no GPU and no driver.

Invariants:
  * ``native()`` returns ``_C`` only when the host library loaded in this process has the same NVSHMEM version as
    the headers ``_C`` was compiled with (``_C.nvshmem_version()``), and, where the build recorded it
    (``_build_info.json`` beside ``_C``, written by CMake), the installed NVSHMEM wheel is the one for the CUDA major
    version ``_C`` was built with. Otherwise it raises ``DwdpError`` naming both versions and the command that fixes
    it. NVSHMEM requires its host and device libraries to be the same release; a skew fails in obscure ways later.
  * Every failure to provide ``_C`` is one ``DwdpError`` whose message is one line saying what to install.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
from types import ModuleType

from .errors import DwdpError
from .versions import NVSHMEM_VERSION, install_command, installed_nvshmem_wheels, wheel_cuda_major

_module: ModuleType | None = None
_HOST_LIB = "libnvshmem_host.so.3"


def _preload_nvshmem() -> None:
    try:
        import nvidia.nvshmem as wheel
    except ImportError:
        return
    for root in getattr(wheel, "__path__", []):
        lib = os.path.join(root, "lib", _HOST_LIB)
        if os.path.exists(lib):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:  # a damaged or foreign file: say so instead of a traceback from every command
                wheels = installed_nvshmem_wheels()
                major = next((wheel_cuda_major(d) for d in wheels), None) or 13
                raise DwdpError(
                    f"the NVSHMEM host library {lib} cannot be loaded ({e}); reinstall the wheel that holds it "
                    f"(installed: {', '.join(f'{d}=={v}' for d, v in wheels.items()) or 'none found'}), e.g. "
                    f"`{install_command(major)} --force-reinstall`"
                ) from e
            return


def build_info() -> dict | None:
    """What the build recorded beside ``_C`` (``_build_info.json``): ``nvshmem_version`` (headers),
    ``nvshmem_wheel`` / ``nvshmem_wheel_version`` (the distribution built against, empty for ``NVSHMEM_HOME``),
    ``nvshmem_home``, ``cuda_version`` (nvcc), ``cuda_architectures``. None for builds that predate the file."""
    try:
        spec = importlib.util.find_spec("dwdp_ops._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "_build_info.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def loaded_nvshmem() -> tuple[str, str] | None:
    """``(version, path)`` of the ``libnvshmem_host.so.3`` loaded in this process, read from the library itself
    (``nvshmemx_vendor_get_version_info``); None when it is not loaded."""
    try:
        lib = ctypes.CDLL(_HOST_LIB, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    try:
        lib.nvshmemx_vendor_get_version_info(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    except AttributeError:
        return None
    return f"{major.value}.{minor.value}.{patch.value}", _loaded_path(_HOST_LIB)


def _loaded_path(name: str) -> str:
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            for line in f:
                if line.rstrip().endswith(name):
                    return line.split(None, 5)[-1].strip()
    except OSError:
        pass
    return name


def check_nvshmem_versions(
    built: str, loaded: str | None, loaded_path: str = "", built_wheel: str = "", installed: dict[str, str] | None = None
) -> None:
    """Raises DwdpError when the NVSHMEM host library in use cannot serve a ``_C`` built against ``built``.

    ``built``: NVSHMEM version of the headers ``_C`` was compiled with. ``loaded``: version of the host library
    loaded in this process (None: unknown, not checked). ``built_wheel``: the wheel the build used ('' when built
    against ``NVSHMEM_HOME``). ``installed``: ``{dist: version}`` of the NVSHMEM wheels installed now."""
    installed = installed or {}
    if len(installed) > 1:
        both = ", ".join(f"{d}=={v}" for d, v in sorted(installed.items()))
        raise DwdpError(
            f"both {both} are installed; they overwrite each other's files in site-packages/nvidia/nvshmem. "
            f"Uninstall both and install the one for your CUDA: `pip uninstall -y {' '.join(sorted(installed))}` then "
            f"`{install_command(wheel_cuda_major(built_wheel) or 13, built)}`"
        )
    want_major = wheel_cuda_major(built_wheel)
    if want_major is not None and installed:
        (dist, _version), = installed.items()
        have_major = wheel_cuda_major(dist)
        if have_major != want_major:
            raise DwdpError(
                f"dwdp_ops._C was built for CUDA {want_major} against {built_wheel}=={built} but {dist} (CUDA "
                f"{have_major}) is installed; `pip uninstall -y {dist} && {install_command(want_major, built)}`, or "
                f"rebuild dwdp_ops with a CUDA {have_major} nvcc (see the README's CUDA 12 command)"
            )
    if loaded is not None and loaded != built:
        major = want_major or 13
        raise DwdpError(
            f"NVSHMEM version skew: dwdp_ops._C was built against NVSHMEM {built} but the host library loaded is "
            f"NVSHMEM {loaded} ({loaded_path or _HOST_LIB}); NVSHMEM needs both to be the same release. Fix: "
            f"`{install_command(major, built)}`, or rebuild dwdp_ops against NVSHMEM {loaded} "
            f"(dwdp_ops pins {NVSHMEM_VERSION}, the release PyTorch's CUDA 13 wheels use)"
        )


def _import_C() -> ModuleType:  # noqa: N802 - the module's name
    from . import _C

    return _C


def native() -> ModuleType:
    """The ``_C`` module, imported and version-checked on first use; a DwdpError says how to fix a failure."""
    global _module
    if _module is None:
        _preload_nvshmem()
        info = build_info() or {}
        installed = installed_nvshmem_wheels()
        try:
            c = _import_C()
        except ImportError as e:
            got = loaded_nvshmem()
            if info.get("nvshmem_version") and got is not None:
                check_nvshmem_versions(info["nvshmem_version"], got[0], got[1], info.get("nvshmem_wheel", ""),
                                       installed)
            if not installed and got is None:
                raise DwdpError(
                    f"dwdp_ops._C cannot load: no NVSHMEM host library is installed ({_HOST_LIB}). Install the "
                    f"package with its CUDA extra, e.g. `pip install 'dwdp_ops[cu13]'` (or "
                    f"`{install_command(13)}`)"
                ) from e
            raise DwdpError(
                f"dwdp_ops._C could not be imported ({e}). Reinstall with its CUDA extra, e.g. "
                "`pip install -e '.[cu13]'`; see the README's Set up section"
            ) from e
        got = loaded_nvshmem()
        check_nvshmem_versions(
            c.nvshmem_version(), got[0] if got else None, got[1] if got else "", info.get("nvshmem_wheel", ""),
            installed,
        )
        _module = c
    return _module


def native_or_reason() -> tuple[ModuleType | None, str]:
    """``(_C, "")``, or ``(None, the one-line reason)`` when it is unavailable; never raises for that."""
    try:
        return native(), ""
    except DwdpError as e:
        return None, str(e)


def device_count() -> tuple[int, str]:
    """``(number of usable CUDA GPUs, why none)`` with the reason in words (``describe_cuda_error``); ``(0, reason)``
    when ``_C`` itself is unavailable. Never raises for a missing driver, GPU or NVSHMEM."""
    c, why = native_or_reason()
    if c is None:
        return 0, why
    count, reason = c.cuda_device_count()
    return count, (describe_cuda_error(reason) if count == 0 else "")


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def describe_cuda_error(reason: str, driver_present: bool | None = None) -> str:
    """Turns the CUDA runtime's reason for seeing no GPU (``_C.cuda_device_count()[1]``) into what the user must
    know. The statically linked CUDA runtime says "CUDA driver version is insufficient" both for an old driver and
    for no driver at all; the latter is told apart by whether ``libcuda.so.1`` can be loaded (``driver_present``,
    probed when None)."""
    low = reason.lower()
    if "insufficientdriver" in low.replace(" ", "") or "driver version is insufficient" in low:
        if driver_present is None:
            driver_present = _driver_present()
        if not driver_present:
            return "no NVIDIA driver found (libcuda.so.1 cannot be loaded); the kernels need an NVIDIA GPU and its driver"
        return f"the NVIDIA driver is older than the CUDA runtime dwdp_ops was built with; update the driver ({reason})"
    if "nodevice" in low.replace(" ", "") or "no cuda-capable device" in low or "no cuda device" in low:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return f"no NVIDIA GPU found: the driver is installed but sees no GPU{where}"
    return reason
