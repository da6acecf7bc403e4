"""Fetch bandwidth: raw peer copies (baseline) against the copy-engine and NVSHMEM engines of dwdp_ops.

Run on N GPUs:  python -m dwdp_ops.launch -n 4 bench/fetch_bandwidth.py [--layer-only] [--repeats 10]

Cases (every figure a median of --repeats, CUDA events, all ranks starting together after a barrier):
  size sweep, pattern ``ring`` (rank r reads from r+1: one peer per reader, no shared owner), 2 MiB .. 1 GiB:
    raw_peer           cudaMemcpyPeerAsync from a buffer this process allocated on the peer GPU (the baseline)
    ce                 cudaMemcpyAsync from the peer's symmetric buffer through nvshmem_ptr (dwdp_ops copy engine)
    ce_batched         the same bytes as 2 MiB slices in one cudaMemcpyBatchAsync
    nvshmem_<k>sm      dwdp_ops.getmem: non-blocking block gets + quiet on k SMs (k = 8, 16, 32, all)
  patterns at 1 GiB per reader:
    every_peer         each rank reads 1/(N-1) of its bytes from every peer at once
    all_to_one         ranks 1..N-1 read from rank 0 at once (rank 0's egress is shared)
  dwdp_layer_<dtype>   one real DeepSeek-R1 MoE layer (E=256, H=7168, I=2048) partitioned over the N ranks; each
                       rank fetches all its remote experts (fp8 ~44 MB, bf16 ~88 MB per expert) with:
                       ce serial per-peer (every rank starts at peer 0), ce staggered (each rank starts at
                       another peer, whole runs), ce interleaved batched (2/8/32 MiB
                       slices, staggered start), NVSHMEM block gets and peer-pointer copies at 8/16/32/all SMs.
Output: bench/results/fetch_bandwidth_<card>_N<n>.json (and $OUT), printed table on rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dwdp_ops
from common import machine_facts, nvlink_facts, result_name, time_op, write_json
from dwdp_ops import ExpertLayout, ExpertPartition, ExpertStore
from dwdp_ops.runtime import get_runtime

MiB = 1 << 20
GiB = 1 << 30


def fill_random(arr: cp.ndarray, seed: int) -> None:
    """Random non-zero bytes, written in place (expert by expert when the view is strided)."""
    if not arr.flags.c_contiguous:
        for i in range(arr.shape[0]):
            fill_random(arr[i], seed * 7919 + i)
        return
    b = arr.view(cp.uint8).reshape(-1)
    rs = cp.random.RandomState(seed)
    step = 256 * MiB
    for off in range(0, b.size, step):
        n = min(step, b.size - off)
        b[off : off + n] = rs.randint(1, 255, size=n, dtype=cp.int32).astype(cp.uint8)


class Bench:
    def __init__(self, repeats: int):
        self.rt = get_runtime()
        self.be = self.rt.backend
        self.me, self.n = dwdp_ops.rank(), dwdp_ops.world_size()
        self.repeats = repeats
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.records: list[dict] = []

    def barrier(self):
        cp.cuda.Device().synchronize()
        dwdp_ops.barrier()

    def measure(self, case: str, mode: str, pattern: str, nbytes: int, op, active: bool = True, **extra):
        """Times op on every active rank (inactive ranks only join the barriers); gathers per-rank GB/s."""
        if active:
            ms, _ = time_op(op, self.stream, self.repeats, 2, before=self.barrier)
        else:
            for _ in range(self.repeats + 2):
                self.barrier()
            ms = None
        gathered = self.rt.rendezvous.allgather(f"bench:{case}:{mode}", json.dumps(ms).encode())
        per_rank = [json.loads(g) for g in gathered]
        gbps = [nbytes / (m * 1e6) if m else None for m in per_rank]
        live = [g for g in gbps if g]
        rec = dict(case=case, mode=mode, pattern=pattern, bytes=nbytes, median_ms_per_rank=per_rank,
                   gbps_per_rank=gbps, gbps_min=min(live), gbps_mean=sum(live) / len(live), **extra)
        self.records.append(rec)
        if self.me == 0:
            print(f"{case:22s} {mode:26s} {pattern:10s} {nbytes / MiB:9.1f} MiB  min {rec['gbps_min']:7.1f}  "
                  f"mean {rec['gbps_mean']:7.1f} GB/s", flush=True)
        return rec


def enable_peer(me: int, peer: int) -> None:
    try:
        cp.cuda.runtime.deviceEnablePeerAccess(peer)
    except cp.cuda.runtime.CUDARuntimeError as e:  # already enabled is fine
        if "PeerAccessAlreadyEnabled" not in str(e):
            raise


def size_sweep_and_patterns(b: Bench, sizes: list[int], baseline_only: bool = False) -> None:
    me, n, s = b.me, b.n, b.stream
    big = max(sizes)
    sym = dwdp_ops.symmetric_empty(big, cp.uint8)
    fill_random(sym, 100 + me)
    dst = cp.empty(big, cp.uint8)
    fill_random(dst, 7)
    ring = (me + 1) % n
    # raw baseline sources: buffers this process owns on every peer GPU
    raw_src = {}
    for p in range(n):
        if p == me:
            continue
        enable_peer(me, p)
        with cp.cuda.Device(p):
            raw_src[p] = cp.empty(big, cp.uint8)
            fill_random(raw_src[p], 200 + p)
    cp.cuda.Device(me).use()
    b.barrier()
    peer_base = {p: b.be.symmetric_peer_ptr(sym.data.ptr, p) for p in range(n)}
    sms = cp.cuda.runtime.getDeviceProperties(me)["multiProcessorCount"]

    def raw(p, nbytes, off=0, stream=None):
        cp.cuda.runtime.memcpyPeerAsync(dst.data.ptr + off, me, raw_src[p].data.ptr + off, p, nbytes, (stream or s).ptr)

    def ce(p, nbytes, off=0, batched=False, slice_bytes=2 * MiB):
        if batched:
            offs = np.arange(off, off + nbytes, slice_bytes, dtype=np.uint64)
            sz = np.minimum(slice_bytes, off + nbytes - offs).astype(np.uint64)
            b.be.ce_copy(dst.data.ptr + offs, peer_base[p] + offs, sz, s.ptr, True)
        else:
            b.be.ce_copy(np.array([dst.data.ptr + off], np.uint64), np.array([peer_base[p] + off], np.uint64),
                         np.array([nbytes], np.uint64), s.ptr, False)

    for nb in sizes:
        b.measure("size_sweep", "raw_peer", "ring", nb, lambda nb=nb: raw(ring, nb))
        if baseline_only:
            dwdp_ops.free_symmetric(sym)
            return
        b.measure("size_sweep", "ce", "ring", nb, lambda nb=nb: ce(ring, nb))
        b.measure("size_sweep", "ce_batched", "ring", nb, lambda nb=nb: ce(ring, nb, batched=True))
        for k in (8, 16, 32, sms):
            b.measure("size_sweep", f"nvshmem_{k}sm", "ring", nb,
                      lambda nb=nb, k=k: dwdp_ops.getmem(dst[:nb], sym[:nb], ring, stream=s, num_blocks=k), sms=k)
    if n < 2:
        return
    # every peer at once: 1/(N-1) of the bytes from each peer
    part = (big // (n - 1)) // (2 * MiB) * (2 * MiB)
    peers = [(me + k) % n for k in range(1, n)]
    streams = [cp.cuda.Stream(non_blocking=True) for _ in peers]
    ev = cp.cuda.Event

    def raw_every():
        start = ev()
        start.record(s)
        for i, (p, st) in enumerate(zip(peers, streams)):
            st.wait_event(start)
            raw(p, part, i * part, st)
            done = ev()
            done.record(st)
            s.wait_event(done)

    b.measure("pattern", "raw_peer", "every_peer", part * (n - 1), raw_every)
    b.measure("pattern", "ce_batched_interleaved", "every_peer", part * (n - 1), lambda: every_ce(b, dst, peer_base, peers, part))
    # all to one: every rank but 0 reads from rank 0
    b.measure("pattern", "raw_peer", "all_to_one", big, lambda: raw(0, big), active=me != 0)
    b.measure("pattern", "ce", "all_to_one", big, lambda: ce(0, big), active=me != 0)
    dwdp_ops.free_symmetric(sym)


def every_ce(b, dst, peer_base, peers, part, slice_bytes=2 * MiB):
    d, src, sz = [], [], []
    for k in range(0, part, slice_bytes):
        for i, p in enumerate(peers):
            off = i * part + k
            d.append(dst.data.ptr + off)
            src.append(peer_base[p] + off)
            sz.append(min(slice_bytes, part - k))
    b.be.ce_copy(np.array(d, np.uint64), np.array(src, np.uint64), np.array(sz, np.uint64), b.stream.ptr, True)


def dwdp_layer(b: Bench, dtype: str) -> None:
    n, me, s = b.n, b.me, b.stream
    part = ExpertPartition.disjoint(256, n)
    layout = ExpertLayout.moe(7168, 2048, dtype)
    sms = cp.cuda.runtime.getDeviceProperties(me)["multiProcessorCount"]
    with ExpertStore(part, layout, 1) as store:
        for ti, t in enumerate(layout.tensors):
            fill_random(store.local(0, t.name), 1000 * me + ti)
        b.barrier()
        nb = store.remote_bytes()
        case = f"dwdp_layer_{dtype}"
        extra = dict(num_experts=256, remote_experts=part.num_remote, expert_bytes=layout.expert_bytes)
        b.measure(case, "ce_serial_per_peer", "dwdp", nb, lambda: store.fetch_ce(0, s, schedule="per_peer", batched=False), **extra)
        b.measure(case, "ce_per_peer_batched", "dwdp", nb, lambda: store.fetch_ce(0, s, schedule="per_peer", batched=True), **extra)
        b.measure(case, "ce_staggered", "dwdp", nb, lambda: store.fetch_ce(0, s, schedule="staggered", batched=False), **extra)
        for sl in (2, 8, 32):
            b.measure(case, f"ce_interleaved_{sl}MiB", "dwdp", nb,
                      lambda sl=sl: store.fetch_ce(0, s, schedule="interleaved", slice_bytes=sl * MiB), slice_mib=sl, **extra)
        fetched = store.remote_ids().size * layout.expert_bytes
        for k in (8, 16, 32, sms):
            b.measure(case, f"nvshmem_get_{k}sm", "dwdp", fetched,
                      lambda k=k: store.fetch_nvshmem(0, None, None, s, num_blocks=k, peer_ptr=False), sms=k, **extra)
            b.measure(case, f"nvshmem_ptr_{k}sm", "dwdp", fetched,
                      lambda k=k: store.fetch_nvshmem(0, None, None, s, num_blocks=k, threads=1024, peer_ptr=True), sms=k, **extra)
        # correctness of what was just fetched, against the owners' bytes (sampled experts)
        for e in store.remote_ids()[:: max(1, part.num_remote // 8)]:
            owner = part.owner_table(me)[e]
            got = store.composite(0, "w2")[int(e)].view(cp.uint8)
            ref = store._owner_address(0, 1, int(e), owner, "peer")  # the owner's storage, through NVLink
            mem = cp.cuda.UnownedMemory(ref, layout.tensors[1].nbytes, None)
            want = cp.ndarray((layout.tensors[1].nbytes,), cp.uint8, cp.cuda.MemoryPointer(mem, 0))
            assert bool((got.reshape(-1) == want).all()), f"expert {e} differs from its owner's copy"
        b.barrier()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--layer-only", action="store_true")
    ap.add_argument("--sizes-mib", default="2,8,32,128,512,1024")
    ap.add_argument("--dtypes", default="float8_e4m3fn,bfloat16")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ns = ap.parse_args()
    with dwdp_ops.init(heap_size="2g", timeout=600):
        b = Bench(ns.repeats)
        if not ns.layer_only:
            size_sweep_and_patterns(b, [int(x) * MiB for x in ns.sizes_mib.split(",")])
        else:  # the baseline alone, so that every result file holds its own
            size_sweep_and_patterns(b, [GiB], baseline_only=True)
        for dt in ns.dtypes.split(","):
            dwdp_layer(b, dt)
        if b.me == 0:
            facts = machine_facts()
            link = nvlink_facts(0)
            data = dict(benchmark="fetch_bandwidth", world_size=b.n, repeats=ns.repeats, **facts, nvlink=link,
                        records=b.records)
            tag = f"_{ns.tag}" if ns.tag else ""
            path = write_json(result_name("fetch_bandwidth", facts["card"], f"_N{b.n}{tag}"), data)
            print(f"wrote {path}")
        b.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
