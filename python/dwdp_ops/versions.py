"""The versions dwdp_ops is built and run with: one place that ``pyproject.toml`` (checked by
``tests/test_packaging.py``), the README and the import-time check agree with.

Invariants:
  * ``NVSHMEM_VERSION`` is the one NVSHMEM release this package is built against and runs with: the build requirement
    (``nvidia-nvshmem-cu13==NVSHMEM_VERSION``) and both CUDA extras pin it exactly, and it is the release PyTorch's
    CUDA 13 wheels pin (torch 2.11+cu130 requires ``nvidia-nvshmem-cu13==3.4.5``), so installing torch next to
    dwdp_ops cannot move the host library away from the device library linked into ``_C``.
  * ``_C`` links NVSHMEM's device library statically and loads ``libnvshmem_host.so.3`` at run time; NVSHMEM needs
    both to be the same release, so ``_native.native()`` refuses a loaded host library whose version differs from
    the headers ``_C`` was compiled with.
  * The two wheels ``nvidia-nvshmem-cu12`` and ``nvidia-nvshmem-cu13`` install into the same folder
    (``site-packages/nvidia/nvshmem``); exactly one of them may be installed.
"""

from __future__ import annotations

import importlib.metadata as md

NVSHMEM_VERSION = "3.4.5"
NVSHMEM_WHEELS = {13: "nvidia-nvshmem-cu13", 12: "nvidia-nvshmem-cu12"}


def installed_nvshmem_wheels() -> dict[str, str]:
    """``{distribution name: version}`` of the NVSHMEM wheels installed in this environment (normally one)."""
    out = {}
    for dist in NVSHMEM_WHEELS.values():
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def wheel_cuda_major(dist: str) -> int | None:
    """12 for ``nvidia-nvshmem-cu12``, 13 for ``-cu13``; None for anything else."""
    for major, name in NVSHMEM_WHEELS.items():
        if dist == name:
            return major
    return None


def install_command(cuda_major: int, version: str = NVSHMEM_VERSION) -> str:
    """The pip command that puts the NVSHMEM host library of ``version`` for CUDA ``cuda_major`` in place."""
    return f"pip install '{NVSHMEM_WHEELS.get(cuda_major, f'nvidia-nvshmem-cu{cuda_major}')}=={version}'"
