"""Probe: the smallest VMM allocation nvshmemx_buffer_register_symmetric accepts for a given
NVSHMEM_CUMEM_GRANULARITY (run through dwdp_ops.launch -n 2; a failing size may end the process)."""
import os
import sys

import dwdp_ops
from dwdp_ops.runtime import get_runtime

mib = int(sys.argv[1])
with dwdp_ops.init(timeout=60):
    be, dev = get_runtime().backend, get_runtime().device
    size = mib << 20
    h = be.vmm_create(size, dev)
    va = be.vmm_reserve(size, 0)
    be.vmm_map(va, size, h, 0, dev)
    try:
        be.register_symmetric(va, size)
        print(f"granularity {os.environ.get('NVSHMEM_CUMEM_GRANULARITY', 'default')}: {mib} MiB registered OK")
    except Exception as e:  # noqa: BLE001
        print(f"granularity {os.environ.get('NVSHMEM_CUMEM_GRANULARITY', 'default')}: {mib} MiB refused: {e}")
