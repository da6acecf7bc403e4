"""Run by tests/test_gpu_runtime.py through dwdp_ops.launch: every rank fills a symmetric buffer with a rank-specific
pattern and reads every peer's copy through peer_view and through the NVSHMEM get kernel, byte-exact."""

import sys

import cupy as cp
import dwdp_ops
import numpy as np


def pattern(rank: int, n: int) -> cp.ndarray:
    # A different non-zero pseudo-random byte stream per rank (never zeros).
    rng = np.random.default_rng(1000 + rank)
    return cp.asarray(rng.integers(1, 256, size=n, dtype=np.uint8))


def main() -> int:
    nbytes = int(sys.argv[1]) if len(sys.argv) > 1 else (24 << 20) + 4096 + 16
    with dwdp_ops.init(heap_size="2g", timeout=120):
        me, world = dwdp_ops.rank(), dwdp_ops.world_size()
        assert cp.cuda.runtime.getDevice() == dwdp_ops.local_rank()
        buf = dwdp_ops.symmetric_empty(nbytes, cp.uint8)
        buf[...] = pattern(me, nbytes)
        fp8 = dwdp_ops.symmetric_empty((4, 128), "float8_e4m3fn")
        assert fp8.dtype == cp.uint8 and dwdp_ops.logical_dtype(fp8) == "float8_e4m3fn"
        cp.cuda.Device().synchronize()
        dwdp_ops.barrier()
        stream = cp.cuda.Stream(non_blocking=True)
        for pe in range(world):
            want = pattern(pe, nbytes)
            view = dwdp_ops.peer_view(buf, pe)
            assert view.shape == buf.shape
            assert bool((view == want).all()), f"peer_view of PE {pe} differs"
            # a strided slice keeps its offset on the peer
            assert bool((dwdp_ops.peer_view(buf[4096::3], pe) == want[4096::3]).all())
            for blocks in (1, 8, 132):
                dst = cp.zeros(nbytes, cp.uint8)
                dwdp_ops.getmem(dst, buf, pe, stream=stream, num_blocks=blocks)
                stream.synchronize()
                bad = int((dst != want).sum())
                assert bad == 0, f"NVSHMEM get of PE {pe} with {blocks} blocks: {bad} bytes differ"
        print(f"rank {me}: read {world} PEs x {nbytes} bytes byte-exact (peer_view, getmem 1/8/132 blocks)")
        dwdp_ops.barrier()
        dwdp_ops.free_symmetric(buf)
        # fp8 is left alive on purpose: finalize frees it collectively
    print(f"rank {me}: finalized")
    return 0


if __name__ == "__main__":
    sys.exit(main())
