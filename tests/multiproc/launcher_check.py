"""One script that must run unchanged under ``dwdp_ops.launch``, ``torchrun`` and ``mpirun`` (tests/test_launchers.py
on GPUs, tests/test_torchrun.py on CPU).

``--control-plane``: no GPU; two rendezvous in a row (an all-gather of the ranks and a barrier each), so that a
second rendezvous in the same process also finds its port; ``--torch-pg`` then also starts a gloo process group at
``MASTER_ADDR:MASTER_PORT`` after ours, as a user script under torchrun would. Without it: ``dwdp_ops.init()``, a
symmetric buffer filled with ``rank + 1``, the next rank's value read through ``peer_view`` and ``getmem``,
``finalize``. ``--expect LAUNCHER`` checks ``DistEnv.launcher``. Prints ``launcher_check ok ...`` on success.
"""

from __future__ import annotations

import argparse
import sys

from dwdp_ops.env import DistEnv
from dwdp_ops.rendezvous import Rendezvous


def fail(msg: str) -> int:
    print(f"launcher_check FAILED: {msg}", flush=True)
    return 1


def control_plane(env: DistEnv, torch_pg: bool) -> int:
    via_store = []
    for round_ in range(2):
        with Rendezvous(env.rank, env.world_size, env.master_addr, env.master_port, 60.0) as rdv:
            got = rdv.allgather(f"check:{round_}", f"{env.rank}:{env.local_rank}".encode())
            want = [f"{r}:".encode() for r in range(env.world_size)]
            if [g[: len(w)] for g, w in zip(got, want)] != want:
                return fail(f"all-gather returned {got}, expected the ranks in order")
            rdv.barrier(f"check:{round_}:done")
            via_store.append(rdv.torchrun_store)
    if torch_pg:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        t = torch.tensor([env.rank + 1.0])
        dist.all_reduce(t)
        dist.destroy_process_group()
        if t.item() != env.world_size * (env.world_size + 1) / 2:
            return fail(f"gloo all_reduce gave {t.item()}")
    print(f"launcher_check ok rank={env.rank} world={env.world_size} launcher={env.launcher} "
          f"torchrun_store={via_store[0] and via_store[1]}", flush=True)
    return 0


def gpu(env: DistEnv) -> int:
    import cupy as cp
    import dwdp_ops

    with dwdp_ops.init(heap_size="1g", timeout=120):
        me, world = dwdp_ops.rank(), dwdp_ops.world_size()
        buf = dwdp_ops.symmetric_empty((4096,), cp.float32)
        buf[...] = me + 1
        cp.cuda.Device().synchronize()
        dwdp_ops.barrier()
        peer = (me + 1) % world
        seen = float(dwdp_ops.peer_view(buf, peer)[17].get())
        dst = cp.zeros_like(buf)
        stream = cp.cuda.Stream(non_blocking=True)
        dwdp_ops.getmem(dst, buf, peer, stream=stream, num_blocks=4)
        stream.synchronize()
        got = float(dst.sum().get())
        dwdp_ops.barrier()
        dwdp_ops.free_symmetric(buf)
        if seen != peer + 1 or got != 4096 * (peer + 1):
            return fail(f"rank {me} read {seen} / sum {got} from rank {peer}, expected {peer + 1}")
    print(f"launcher_check ok rank={env.rank} world={env.world_size} launcher={env.launcher} gpu", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--control-plane", action="store_true", help="no GPU: rendezvous only")
    ap.add_argument("--torch-pg", action="store_true", help="also run a gloo process group (needs torch)")
    ap.add_argument("--expect", default=None, help="the launcher DistEnv must report")
    ns = ap.parse_args()
    env = DistEnv.from_environ()
    if ns.expect and env.launcher != ns.expect:
        return fail(f"DistEnv.launcher is {env.launcher!r}, expected {ns.expect!r}")
    return control_plane(env, ns.torch_pg) if ns.control_plane else gpu(env)


if __name__ == "__main__":
    sys.exit(main())
