"""Run through dwdp_ops.launch by tests/test_gpu_engine.py: the library called the way an engine calls it.

hostlist   a host id list fetched on a non-blocking stream with 20 ms of work queued ahead, the memory pool reused
           right after the call returns (20 trials): every fetched byte must equal the owner's;
streams    two layers fetched at once on two streams with repeated ids (per-stream scratch);
chunks     the peer-pointer kernel with a chunk that does not divide the tensors (partial last chunks), byte-exact;
graph      on-demand steps captured in a CUDA graph (a slow read of slot 0 inside), replayed, then an eager
           prefetch_all step at once: the replay must read what it fetched, not the eager prefetch's bytes;
fail:P     rank 1 fails in construction phase P of an ExpertStore: every rank must raise naming rank 1.
"""

import sys

import cupy as cp
import dwdp_ops
import numpy as np
from dwdp_ops import DwdpError, ExpertLayout, ExpertPartition, ExpertStore, PrefetchScheduler, Rates
from dwdp_ops.runtime import get_runtime

SPIN = cp.RawKernel(r"""
extern "C" __global__ void spin(long long cycles) {
  long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
}""", "spin")

CHECKSUM = cp.RawKernel(r"""
extern "C" __global__ void checksum(const unsigned long long* base, long long stride8, long long n8, int E,
                                    unsigned long long* out) {
  int e = blockIdx.x;
  unsigned long long s = 0;
  for (long long i = threadIdx.x; i < n8; i += blockDim.x) s += base[e * stride8 + i] * (unsigned long long)(i + 1);
  atomicAdd(out + e, s);
}""", "checksum")


def spin(stream, ms):
    SPIN((1,), (1,), (np.int64(int(ms * 2.0e6)),), stream=stream)


def setup(seed, layers=3, H=256, I=128, dtype="bfloat16"):
    world = dwdp_ops.world_size()
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 6))
    stride = int(rng.integers(1, L + 1))
    part = ExpertPartition(L + (world - 1) * stride, world, L, stride)
    layout = ExpertLayout.moe(H, I, dtype)
    store = ExpertStore(part, layout, layers)
    full = []
    for layer in range(layers):
        d = {}
        for ti, t in enumerate(layout.tensors):
            rs = cp.random.RandomState(seed * 1000 + layer * 10 + ti)
            d[t.name] = rs.randint(1, 255, size=(part.num_experts, t.nbytes), dtype=cp.int32).astype(cp.uint8)
            store.load(layer, t.name, d[t.name].view(t.storage).reshape(part.num_experts, *t.shape))
        full.append(d)
    dwdp_ops.barrier()
    return store, full


def poison(store, layer, stream):
    for t in store.layout.tensors:
        comp = store.composite(layer, t.name).view(cp.uint8)
        with stream:
            comp[: store.lo] = 0
            comp[store.hi :] = 0


def check(store, layer, full, ids, what):
    bad = []
    for t in store.layout.tensors:
        comp = store.composite(layer, t.name).view(cp.uint8).reshape(store.E, -1)
        for e in sorted(set(int(i) for i in ids)):
            if not bool((comp[e, : t.nbytes] == full[layer][t.name][e]).all()):
                bad.append((t.name, e))
    if bad:
        print(f"rank {dwdp_ops.rank()} {what}: layer {layer} experts differ: {bad[:6]}")
    return not bad


def hostlist(seed):
    store, full = setup(seed)
    rng = np.random.default_rng(seed + dwdp_ops.rank())
    remote = [e for e in range(store.E) if not store.lo <= e < store.hi]
    ok = True
    for trial in range(20):
        s = cp.cuda.Stream(non_blocking=True)
        layer = trial % store.num_layers
        ids = list(rng.choice(remote, size=min(len(remote), 3), replace=False)) if remote else []
        poison(store, layer, s)
        spin(s, 20)
        store.nvshmem.fetch(layer, ids, stream=s, num_blocks=8)
        junk = cp.full(64, store.lo if store.lo < store.hi else 0, cp.int32)  # reuses the pool right away
        junk += 0
        s.synchronize()
        ok &= check(store, layer, full, ids, f"hostlist trial {trial}")
    store.nvshmem.check_errors()
    store.close()
    return ok


def streams(seed):
    store, full = setup(seed)
    remote = [e for e in range(store.E) if not store.lo <= e < store.hi]
    s1, s2 = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    ok = True
    for trial in range(10):
        ids = cp.asarray(np.array((remote * 3)[: 3 * len(remote)], np.int32))  # every id three times
        for s, layer in ((s1, 0), (s2, 1)):
            poison(store, layer, s)
            spin(s, 5)
        store.nvshmem.fetch(0, ids, stream=s1, num_blocks=4)
        store.nvshmem.fetch(1, ids, stream=s2, num_blocks=4)
        s1.synchronize()
        s2.synchronize()
        ok &= check(store, 0, full, remote, f"stream 1 trial {trial}") and check(store, 1, full, remote, f"stream 2 trial {trial}")
    store.nvshmem.check_errors()
    store.close()
    return ok


def chunks(seed):
    store, full = setup(seed, H=384, I=200)  # tensor sizes not multiples of the chunk
    remote = [e for e in range(store.E) if not store.lo <= e < store.hi]
    s = cp.cuda.Stream(non_blocking=True)
    ok = True
    for chunk in (4096 + 16, 65536 + 48, 1 << 20):
        poison(store, 2, s)
        store.nvshmem.fetch(2, cp.asarray(np.array(remote, np.int32)), stream=s, chunk=chunk, peer_ptr=True, num_blocks=8)
        s.synchronize()
        ok &= check(store, 2, full, remote, f"chunk {chunk}")
    store.close()
    return ok


def graph(seed):
    store, full = setup(seed)
    remote = [e for e in range(store.E) if not store.lo <= e < store.hi]
    sched = PrefetchScheduler(store, policy="auto", top_k=1, rates=Rates(ce_gbps=100.0, sm_gbps=100.0))  # T=1: on_demand; huge T: prefetch_all
    g_stream = cp.cuda.Stream(non_blocking=True)
    compute = cp.cuda.Stream(non_blocking=True)
    ids = cp.asarray(np.array(remote, np.int32))
    w13 = store.layout.tensors[0]
    out = cp.zeros(store.E, cp.uint64)

    def read_slot0():
        comp = store.composite(2, w13.name)
        out.fill(0)
        CHECKSUM((store.E,), (128,), (comp.data.ptr, np.int64(store.layout.strides[0] // 8), np.int64(w13.nbytes // 8),
                                      np.int32(store.E), out), stream=g_stream)

    def od_step():
        assert sched.begin_step(tokens=1) == "on_demand"
        for p in range(3):
            sched.wait(p, g_stream, ids=ids)
            if p == 2:
                spin(g_stream, 30)  # the replay is still reading slot 0 when the eager step starts
                read_slot0()
            sched.release(p, g_stream)

    store.nvshmem.prepare(streams=[g_stream])
    with g_stream:
        od_step()
        g_stream.synchronize()
        want = out.copy()
        g_stream.begin_capture()
        od_step()
        g = g_stream.end_capture()
    ok = True
    for trial in range(4):
        out.fill(0)
        g.launch(g_stream)
        assert sched.begin_step(tokens=10**9) == "prefetch_all"  # eager: layer 0 goes into slot 0 at once
        for p in range(3):
            sched.wait(p, compute)
            sched.release(p, compute)
        g_stream.synchronize()
        compute.synchronize()
        sched.copy_stream.synchronize()
        same = bool((out == want).all())
        if not same:
            print(f"rank {dwdp_ops.rank()}: replay {trial} read overwritten slots")
        ok &= same
    ok &= check(store, 2, full, remote, "after the eager step")
    store.close()
    return ok


class Faulty:
    """The native backend with one function failing at its n-th call (this rank only)."""

    def __init__(self, be, name, nth):
        self.be, self.name, self.nth, self.calls = be, name, nth, 0

    def __getattr__(self, attr):
        fn = getattr(self.be, attr)
        if attr != self.name:
            return fn

        def wrapped(*a, **k):
            self.calls += 1
            if self.calls == self.nth:
                raise RuntimeError(f"injected failure in {attr}")
            return fn(*a, **k)

        return wrapped


def fail(phase):
    fn, nth = {"local": ("vmm_create", 2), "views": ("vmm_map", 9)}[phase]
    rt = get_runtime()
    if dwdp_ops.rank() == 1:
        rt._backend = Faulty(rt._backend, fn, nth)
    try:
        ExpertStore(ExpertPartition.disjoint(4 * dwdp_ops.world_size(), dwdp_ops.world_size()),
                    ExpertLayout.moe(256, 128, "bfloat16"), 3)
    except DwdpError as e:
        ok = "rank(s) [1]" in str(e)
        print(f"rank {dwdp_ops.rank()}: construction failed as expected: {e}")
        return ok
    finally:
        if isinstance(rt._backend, Faulty):
            rt._backend = rt._backend.be
    print(f"rank {dwdp_ops.rank()}: construction did not fail")
    return False


def main() -> int:
    mode, seed = sys.argv[1], int(sys.argv[2])
    with dwdp_ops.init(timeout=120):
        if mode.startswith("fail:"):
            ok = fail(mode[5:])
        else:
            ok = {"hostlist": hostlist, "streams": streams, "chunks": chunks, "graph": graph}[mode](seed)
        print(f"rank {dwdp_ops.rank()}: engine {mode} {'passed' if ok else 'FAILED'}", flush=True)
        dwdp_ops.barrier()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
