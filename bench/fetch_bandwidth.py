"""Fetch bandwidth: raw peer copies (baseline) against the copy-engine and NVSHMEM engines of dwdp_ops.

Run on N GPUs:  python -m dwdp_ops.launch -n 2 bench/fetch_bandwidth.py [--layer-only] [--repeats 10]

Every figure is a median of --repeats, timed with CUDA events, all ranks starting each op together after a barrier.
The modes of one group (one size of the sweep, one pattern, one DWDP layer) are timed interleaved with the baseline
(bench/common.py ``time_interleaved``: per repeat each op once, in an order shuffled per repeat). The
baseline is a raw ``cudaMemcpyPeerAsync`` of 1 GiB from a buffer this process allocated on the next rank's GPU
(one peer per reader), measured inside every group, so every result (every mode, dtype and job, ``--layer-only``
too) carries its own same-run baseline: ``baseline`` in each JSON record, and ``of_baseline_per_rank`` = the median
over repeats of (the mode's GB/s / the baseline's GB/s in the same repeat); ``of_baseline_min`` its lowest rank.
Cases:
  size sweep, pattern ``ring`` (rank r reads from r+1: one peer per reader, no shared owner), 2 MiB .. 1 GiB:
    raw_peer           cudaMemcpyPeerAsync of that size from a buffer this process allocated on the peer GPU
    ce                 cudaMemcpyAsync from the peer's symmetric buffer through nvshmem_ptr (dwdp_ops copy engine)
    ce_batched         the same bytes as 2 MiB slices in one cudaMemcpyBatchAsync
    nvshmem_<k>sm      dwdp_ops.getmem: non-blocking block gets + quiet on k SMs (k = 8, 16, 32, all)
  patterns at 1 GiB per reader:
    every_peer         each rank reads 1/(N-1) of its bytes from every peer at once
    all_to_one         ranks 1..N-1 read from rank 0 at once (rank 0's egress is shared; rank 0 runs only the baseline)
  dwdp_layer_<dtype>   one real DeepSeek-R1 MoE layer (E=256, H=7168, I=2048) partitioned over the N ranks; each
                       rank fetches all its remote experts (fp8 ~44 MB, bf16 ~88 MB per expert) with:
                       ce serial per-peer (every rank starts at peer 0), ce staggered (each rank starts at
                       another peer, whole runs), ce interleaved batched (2/8/32 MiB
                       slices, staggered start), NVSHMEM block gets and peer-pointer copies at 8/16/32/all SMs;
                       afterwards the fetched bytes are checked against the owners' (checksums of sampled experts).
Output: bench/results/fetch_bandwidth_<card>_N<n>.json (and $OUT), printed table on rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dwdp_ops
from common import (
    disjoint_world,
    file_tag,
    int_list,
    launcher_ranks,
    machine_facts,
    median_ratio,
    nvlink_facts,
    result_name,
    time_interleaved,
    write_json,
)
from dwdp_ops import ExpertLayout, ExpertPartition, ExpertStore
from dwdp_ops._cli import positive_int
from dwdp_ops.layout import DTYPES
from dwdp_ops.runtime import get_runtime


def _gpu_imports() -> None:
    """cupy, imported by ``main`` only after the arguments are checked (a bad value fails at once)."""
    global cp
    import cupy as cp

MiB = 1 << 20
GiB = 1 << 30
BASELINE = "raw_peer_1GiB_ring"


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


def enable_peer(peer: int) -> None:
    try:
        cp.cuda.runtime.deviceEnablePeerAccess(peer)
    except cp.cuda.runtime.CUDARuntimeError as e:  # already enabled is fine
        if "PeerAccessAlreadyEnabled" not in str(e):
            raise


class Bench:
    def __init__(self, repeats: int):
        self.rt = get_runtime()
        self.be = self.rt.backend
        self.me, self.n = dwdp_ops.rank(), dwdp_ops.world_size()
        self.repeats = repeats
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.records: list[dict] = []
        self.groups = 0
        # the baseline: 1 GiB from a buffer this process owns on the next rank's GPU (random bytes, never zeros)
        ring = (self.me + 1) % self.n
        if ring != self.me:
            enable_peer(ring)
        with cp.cuda.Device(ring):
            src = cp.empty(GiB, cp.uint8)
            fill_random(src, 300 + self.me)
        cp.cuda.Device(self.me).use()
        dst = cp.empty(GiB, cp.uint8)
        fill_random(dst, 9)
        self._base = (dst, src, ring)
        self.barrier()

    def baseline_op(self) -> None:
        dst, src, ring = self._base
        cp.cuda.runtime.memcpyPeerAsync(dst.data.ptr, self.me, src.data.ptr, ring, GiB, self.stream.ptr)

    def barrier(self):
        cp.cuda.Device().synchronize()
        dwdp_ops.barrier()

    def group(self, case: str, modes: list[tuple]) -> None:
        """Times the baseline and ``modes`` interleaved, all ranks together; one record per mode.
        ``modes``: (mode, pattern, bytes per reader, op or None where this rank does not run it, extra fields)."""
        ops = {BASELINE: self.baseline_op, **{m[0]: m[3] for m in modes}}
        if len(ops) != len(modes) + 1:
            raise ValueError(f"{case}: mode names must be distinct and differ from {BASELINE}")
        times = time_interleaved(ops, self.stream, self.repeats, 2, before=self.barrier)
        base = times[BASELINE]
        mine = {"baseline_ms": median(base), "modes": {}}
        for mode, _pattern, nbytes, op, _extra in modes:
            t = times[mode]
            r = median_ratio(base, t) if op is not None else None  # baseline time / mode time, per repeat
            mine["modes"][mode] = {"ms": median(t) if op is not None else None,
                                   "of_baseline": r * nbytes / GiB if r is not None else None, "times_ms": t}
        self.groups += 1
        key = f"bench:{self.groups}:{case}"
        gathered = [json.loads(g) for g in self.rt.rendezvous.allgather(key, json.dumps(mine).encode())]
        base_ms = [g["baseline_ms"] for g in gathered]
        base_gbps = [GiB / (m * 1e6) for m in base_ms]
        baseline = dict(mode="raw_peer", pattern="ring", bytes=GiB, median_ms_per_rank=base_ms, gbps_per_rank=base_gbps,
                        gbps_min=min(base_gbps), gbps_mean=sum(base_gbps) / len(base_gbps),
                        method="cudaMemcpyPeerAsync 1 GiB from the next rank's GPU, interleaved with this group")
        for mode, pattern, nbytes, _op, extra in modes:
            per_rank = [g["modes"][mode]["ms"] for g in gathered]
            gbps = [nbytes / (m * 1e6) if m else None for m in per_rank]
            live = [g for g in gbps if g]
            of_base = [g["modes"][mode]["of_baseline"] for g in gathered]
            rec = dict(case=case, mode=mode, pattern=pattern, bytes=nbytes, median_ms_per_rank=per_rank,
                       gbps_per_rank=gbps, gbps_min=min(live), gbps_mean=sum(live) / len(live), baseline=baseline,
                       of_baseline_per_rank=of_base, of_baseline_min=min(x for x in of_base if x is not None),
                       interleaved_with=[BASELINE] + [m[0] for m in modes],
                       times_ms_per_rank=[g["modes"][mode]["times_ms"] for g in gathered], **extra)
            self.records.append(rec)
            if self.me == 0:
                print(f"{case:22s} {mode:26s} {pattern:10s} {nbytes / MiB:9.1f} MiB  min {rec['gbps_min']:7.1f}  "
                      f"mean {rec['gbps_mean']:7.1f} GB/s  baseline min {baseline['gbps_min']:7.1f}  "
                      f"of baseline (lowest rank) {rec['of_baseline_min']:6.1%}", flush=True)


def size_sweep_and_patterns(b: Bench, sizes: list[int]) -> None:
    me, n, s = b.me, b.n, b.stream
    big = max(sizes)
    sym = dwdp_ops.symmetric_empty(big, cp.uint8)
    fill_random(sym, 100 + me)
    dst = cp.empty(big, cp.uint8)
    fill_random(dst, 7)
    ring = (me + 1) % n
    # raw sources: buffers this process owns on every peer GPU
    raw_src = {}
    for p in range(n):
        if p == me:
            continue
        enable_peer(p)
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

    if n >= 2:
        for nb in sizes:
            modes = [("raw_peer", "ring", nb, lambda nb=nb: raw(ring, nb), {}),
                     ("ce", "ring", nb, lambda nb=nb: ce(ring, nb), {}),
                     ("ce_batched", "ring", nb, lambda nb=nb: ce(ring, nb, batched=True), {})]
            for k in (8, 16, 32, sms):
                modes.append((f"nvshmem_{k}sm", "ring", nb,
                              lambda nb=nb, k=k: dwdp_ops.getmem(dst[:nb], sym[:nb], ring, stream=s, num_blocks=k),
                              {"sms": k}))
            b.group("size_sweep", modes)
    if n < 2:
        dwdp_ops.free_symmetric(sym)
        return
    # every peer at once: 1/(N-1) of the bytes from each peer
    part = every_peer_part(big, n)
    peers = [(me + k) % n for k in range(1, n)]
    streams = [cp.cuda.Stream(non_blocking=True) for _ in peers]
    ev = cp.cuda.Event

    def raw_every():
        start = ev()
        start.record(s)
        for i, (p, st) in enumerate(zip(peers, streams, strict=True)):
            st.wait_event(start)
            raw(p, part, i * part, st)
            done = ev()
            done.record(st)
            s.wait_event(done)

    b.group("pattern", [("raw_peer", "every_peer", part * (n - 1), raw_every, {}),
                        ("ce_batched_interleaved", "every_peer", part * (n - 1),
                         lambda: every_ce(b, dst, peer_base, peers, part), {})])
    # all to one: every rank but 0 reads from rank 0 (rank 0 runs only the baseline)
    b.group("pattern", [("raw_peer", "all_to_one", big, (lambda: raw(0, big)) if me != 0 else None, {}),
                        ("ce", "all_to_one", big, (lambda: ce(0, big)) if me != 0 else None, {})])
    dwdp_ops.free_symmetric(sym)


def every_peer_part(big: int, n: int) -> int:
    """Bytes the every_peer pattern reads from each of the N - 1 peers: 1/(N-1) of the largest size, in whole 2 MiB
    slices; 0 when the largest size is under 2 MiB x (N - 1) (``main`` refuses such sizes)."""
    return (big // (n - 1)) // (2 * MiB) * (2 * MiB)


def every_ce(b, dst, peer_base, peers, part, slice_bytes=2 * MiB):
    d, src, sz = [], [], []
    for k in range(0, part, slice_bytes):
        for i, p in enumerate(peers):
            off = i * part + k
            d.append(dst.data.ptr + off)
            src.append(peer_base[p] + off)
            sz.append(min(slice_bytes, part - k))
    b.be.ce_copy(np.array(d, np.uint64), np.array(src, np.uint64), np.array(sz, np.uint64), b.stream.ptr, True)


def checksum(x: cp.ndarray) -> list[int]:
    """Byte sum, and the first and last 32 bytes, of one expert's tensor (compared across ranks)."""
    v = x.view(cp.uint8).reshape(-1)
    return [int(cp.sum(v, dtype=cp.uint64))] + [int(c) for c in cp.concatenate([v[:32], v[-32:]]).get()]


def check_fetched(b: Bench, store: ExpertStore, part: ExpertPartition, name: str) -> None:
    """The fetched bytes of sampled remote experts equal their owners' (checksums exchanged, public views only)."""
    b.barrier()
    lo = part.local_range(b.me)[0]
    local = store.local(0, name)
    mine = {int(e): checksum(local[e - lo]) for e in range(lo, lo + store.L)}
    owners: dict[int, list[int]] = {}
    for g in b.rt.rendezvous.allgather(f"checksums:{name}", json.dumps(mine).encode()):
        owners.update({int(k): v for k, v in json.loads(g).items()})
    comp = store.composite(0, name)
    ids = store.nvshmem.remote_ids()
    for e in ids[:: max(1, ids.size // 8)]:
        if checksum(comp[int(e)]) != owners[int(e)]:
            raise RuntimeError(f"fetch_bandwidth: expert {int(e)} ({name}) differs from its owner's copy")


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
        fetched = store.nvshmem.remote_ids().size * layout.expert_bytes
        extra = dict(num_experts=256, remote_experts=part.num_remote, expert_bytes=layout.expert_bytes)
        modes = [
            ("ce_serial_per_peer", "dwdp", nb, lambda: store.copy_engine.fetch(0, s, schedule="per_peer", batched=False), extra),
            ("ce_per_peer_batched", "dwdp", nb, lambda: store.copy_engine.fetch(0, s, schedule="per_peer", batched=True), extra),
            ("ce_staggered", "dwdp", nb, lambda: store.copy_engine.fetch(0, s, schedule="staggered", batched=False), extra),
        ]
        for sl in (2, 8, 32):
            modes.append((f"ce_interleaved_{sl}MiB", "dwdp", nb,
                          lambda sl=sl: store.copy_engine.fetch(0, s, schedule="interleaved", slice_bytes=sl * MiB),
                          dict(slice_mib=sl, **extra)))
        for k in (8, 16, 32, sms):
            modes.append((f"nvshmem_get_{k}sm", "dwdp", fetched,
                          lambda k=k: store.nvshmem.fetch(0, None, None, s, num_blocks=k, peer_ptr=False),
                          dict(sms=k, **extra)))
            modes.append((f"nvshmem_ptr_{k}sm", "dwdp", fetched,
                          lambda k=k: store.nvshmem.fetch(0, None, None, s, num_blocks=k, threads=1024, peer_ptr=True),
                          dict(sms=k, **extra)))
        b.group(f"dwdp_layer_{dtype}", modes)
        store.nvshmem.check_errors()
        # correctness of what was just fetched, against the owners' bytes (sampled experts, both tensors)
        for t in layout.tensors:
            check_fetched(b, store, part, t.name)
        b.barrier()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=positive_int, default=10)
    ap.add_argument("--layer-only", action="store_true", help="only the DWDP layer (each group has its baseline)")
    ap.add_argument("--sizes-mib", default="2,8,32,128,512,1024")
    ap.add_argument("--dtypes", default="float8_e4m3fn,bfloat16")
    ap.add_argument("--tag", type=file_tag, default="", help="suffix of the JSON file name")
    ns = ap.parse_args()
    sizes = int_list(ap, "--sizes-mib", ns.sizes_mib)
    dtypes = ns.dtypes.split(",")
    bad = [dt for dt in dtypes if dt not in DTYPES]
    if bad:
        ap.error(f"--dtypes: {', '.join(map(repr, bad))} not among {', '.join(sorted(DTYPES))}")
    if len(set(dtypes)) != len(dtypes):  # two layer cases of one name: their rows merged in render's table and plot
        ap.error(f"--dtypes: each dtype once, got {ns.dtypes!r}")
    world = launcher_ranks(ap, 2, "every case reads from peers")
    disjoint_world(ap, world, 256, "the DWDP layer case (dwdp_layer_<dtype>, every --dtypes, --layer-only too)")
    if world and not ns.layer_only and every_peer_part(max(sizes) * MiB, world) == 0:
        ap.error(f"--sizes-mib: the every_peer pattern reads 1/(N-1) of the largest size from each peer in 2 MiB "
                 f"slices, so on {world} ranks the largest size must be at least {2 * (world - 1)} MiB, got "
                 f"{max(sizes)}")
    _gpu_imports()
    with dwdp_ops.init(heap_size="2g", timeout=600):
        b = Bench(ns.repeats)
        if not ns.layer_only:
            size_sweep_and_patterns(b, [x * MiB for x in sizes])
        for dt in dtypes:
            dwdp_layer(b, dt)
        if b.me == 0:
            facts = machine_facts()
            link = nvlink_facts(0)
            data = dict(benchmark="fetch_bandwidth", world_size=b.n, repeats=ns.repeats, **facts, nvlink=link,
                        baseline_method="per group: raw cudaMemcpyPeerAsync, 1 GiB, one peer per reader (ring), "
                        "interleaved with the group's modes (order shuffled per repeat); of_baseline = median of "
                        "per-repeat GB/s ratios", records=b.records)
            tag = f"_{ns.tag}" if ns.tag else ""
            path = write_json(result_name("fetch_bandwidth", facts["card"], f"_N{b.n}{tag}"), data)
            print(f"wrote {path}")
        b.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
