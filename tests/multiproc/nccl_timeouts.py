"""One rank of a gloo job with a fault, started by tests/test_dispatch_nccl_timeouts.py with RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT and DWDP_TIMEOUT set (no launcher: the test decides which ranks start, and when).

    nccl_timeouts.py SCENARIO
      init     set up and report (the test leaves some ranks out);
      silent   set up; the last rank then sleeps instead of dispatching (alive, but never in the collective);
      dead     set up; the last rank then exits (its sockets close);
      combine  set up, one dispatch; the last rank then skips the combine and dispatches again (a second dispatch
               meets the others' combine: torch.distributed cannot tell, the wait runs into the timeout);
      reinit   set up, destroy the group, set up again on the same port (rank 0's store, kept alive by the module,
               still holds the first set-up's keys); the last rank leaves instead, rank 0 starts 1 s after the others.
Prints ``RESULT rank R after S s: <type>: <message>`` (or ``RESULT rank R after S s: ok``)."""

import os
import sys
import time

import torch
import torch.distributed as dist
from dwdp_ops import ExpertPartition
from dwdp_ops.dispatch_nccl import NcclDispatcher, init_process_group_from_env


def main() -> int:
    scen, me, n = sys.argv[1], int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    t0 = time.monotonic()
    last = me == n - 1
    try:
        init_process_group_from_env("gloo")
        if scen == "reinit":
            dist.barrier()
            dist.destroy_process_group()
            if not last:
                time.sleep(1.0 if me == 0 else 0.0)
                t0 = time.monotonic()
                init_process_group_from_env("gloo")
        elif scen != "init":
            d = NcclDispatcher(ExpertPartition.disjoint(4 * n, n), 16, 2)
            x, ids, w = torch.ones(2, 16), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.ones(2, 2)
            if scen == "silent" and last:
                time.sleep(float(os.environ["DWDP_TIMEOUT"]) + 8)
                return 0
            if scen == "dead" and last:
                os._exit(0)
            h = d.dispatch(x, ids, w)
            if scen == "combine":
                if last:
                    d.dispatch(x, ids, w)
                else:
                    d.combine(h.x_grouped, h)
    except Exception as e:  # noqa: BLE001 - the test reads the message
        print(f"RESULT rank {me} after {time.monotonic() - t0:.1f} s: {type(e).__name__}: {e}", flush=True)
        os._exit(3)  # no teardown: a peer is gone
    print(f"RESULT rank {me} after {time.monotonic() - t0:.1f} s: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
