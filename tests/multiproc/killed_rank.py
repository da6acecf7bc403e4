"""Run through dwdp_ops.launch --keep-going: after init, the last rank kills itself; the others' barrier must fail
within the timeout, naming it, instead of hanging."""

import os
import signal
import sys
import time

import dwdp_ops
from dwdp_ops.errors import RendezvousError


def main() -> int:
    dwdp_ops.init(timeout=10)
    me, world = dwdp_ops.rank(), dwdp_ops.world_size()
    dwdp_ops.barrier()
    if me == world - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    t0 = time.monotonic()
    try:
        dwdp_ops.barrier()
    except RendezvousError as e:
        print(f"SURVIVOR rank {me} failed after {time.monotonic() - t0:.1f} s: {e}")
        os._exit(3)  # skip NVSHMEM teardown: a peer is gone
    print("barrier passed with a dead rank")
    return 1


if __name__ == "__main__":
    sys.exit(main())
