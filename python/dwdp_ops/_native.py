"""Loads the native module ``dwdp_ops._C``.

``_C`` needs ``libnvshmem_host.so.3`` from the ``nvidia-nvshmem-cu13`` (or ``-cu12``) wheel. Its RUNPATH points into
the wheel; as a second line of defence the library is preloaded with RTLD_GLOBAL from the installed wheel, which also
covers editable installs whose RUNPATH names a build-time location. Importing ``_C`` needs no GPU and no driver.
"""

from __future__ import annotations

import ctypes
import os
from types import ModuleType

from .errors import DwdpError

_module: ModuleType | None = None


def _preload_nvshmem() -> None:
    try:
        import nvidia.nvshmem as wheel
    except ImportError:
        return
    for root in getattr(wheel, "__path__", []):
        lib = os.path.join(root, "lib", "libnvshmem_host.so.3")
        if os.path.exists(lib):
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            return


def native() -> ModuleType:
    """The ``_C`` module, imported on first use; a DwdpError says how to install it when that fails."""
    global _module
    if _module is None:
        _preload_nvshmem()
        try:
            from . import _C
        except ImportError as e:
            raise DwdpError(
                f"dwdp_ops._C could not be imported ({e}). Install the package with its CUDA extra, "
                "for example `pip install -e '.[cu13]'`, so that nvidia-nvshmem-cu13 is present."
            ) from e
        _module = _C
    return _module
