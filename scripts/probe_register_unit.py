"""Probe: which VMM allocations nvshmemx_buffer_register_symmetric accepts, in order, in one process, with
each registered buffer unregistered before the next (run through dwdp_ops.launch -n 2; a failure may end the
process). Usage: probe_register_unit.py MiB [MiB ...]"""
import os
import sys

import dwdp_ops
from dwdp_ops.runtime import get_runtime

gran = os.environ.get("NVSHMEM_CUMEM_GRANULARITY", "dwdp default")
with dwdp_ops.init(timeout=60):
    be, dev = get_runtime().backend, get_runtime().device
    for i, mib in enumerate(int(x) for x in sys.argv[1:]):
        size = mib << 20
        h = be.vmm_create(size, dev)
        va = be.vmm_reserve(size, 0)
        be.vmm_map(va, size, h, 0, dev)
        try:
            sym = be.register_symmetric(va, size)
            print(f"granularity {gran}: #{i} {mib} MiB registered OK", flush=True)
            be.unregister_symmetric(sym, size)
            print(f"granularity {gran}: #{i} {mib} MiB unregistered OK", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"granularity {gran}: #{i} {mib} MiB refused: {e}", flush=True)
        be.vmm_unmap(va, size)
        be.vmm_free(va, size)
        be.vmm_release(h)
