"""Run through dwdp_ops.launch by tests/test_gpu_scheduler.py.

stress: many steps with a random number of layers, random policy (auto on a random token count) and random
routing; at the moment of use, a kernel checksums every expert the layer may read (all of them after a prefetch,
the local and routed ones on demand) into a per-(step, layer) record; the records are compared with the owners'
checksums at the end. Random busy-waits on the compute stream vary the overlap. Stale (previous parity) or torn
data changes a checksum.
graph: an on_demand decode step (router kernel, fetch, checksum of the routed experts) captured in a CUDA graph and
replayed after the slots are poisoned must give the eager run's results.
"""

import sys

import cupy as cp
import dwdp_ops
import numpy as np
from dwdp_ops import ExpertLayout, ExpertPartition, ExpertStore, PrefetchScheduler

_SRC = r"""
extern "C" __global__ void checksum(const unsigned int* base, unsigned long long stride_words,
                                    unsigned long long words, const int* mask, unsigned long long* out) {
  int e = blockIdx.y;
  if (mask != nullptr && mask[e] == 0) return;
  const unsigned int* p = base + e * stride_words;
  unsigned long long acc = 0;
  for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x)
    acc += (unsigned long long)p[i] * (i % 7 + 1);
  atomicAdd(out + e, acc);
}
extern "C" __global__ void spin(long long cycles) {
  long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
}
extern "C" __global__ void route(const int* counter, int layer, int E, int n, int* ids) {
  int i = threadIdx.x;
  if (i < n) ids[i] = (int)(((unsigned)(counter[0] * 2654435761u + layer * 40503u + i * 97u)) % (unsigned)E);
}
extern "C" __global__ void mark(const int* ids, int n, int lo, int hi, int* mask) {
  int i = threadIdx.x;
  if (i < n) mask[ids[i]] = 1;
  for (int e = lo + i; e < hi; e += blockDim.x) mask[e] = 1;
}
"""
MOD = cp.RawModule(code=_SRC)
CHECKSUM, SPIN, ROUTE, MARK = (MOD.get_function(n) for n in ("checksum", "spin", "route", "mark"))


def setup(seed, layers):
    world = dwdp_ops.world_size()
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 7))
    stride = int(rng.integers(1, L + 1))
    E = L + (world - 1) * stride
    part = ExpertPartition(E, world, L, stride)
    layout = ExpertLayout.moe(256, 128, "float16")
    store = ExpertStore(part, layout, layers)
    expected = []
    for layer in range(layers):
        sums = cp.zeros((len(layout.tensors), E), cp.uint64)
        for ti, t in enumerate(layout.tensors):
            rs = cp.random.RandomState(seed * 100 + layer * 10 + ti)
            full = rs.randint(1, 255, size=(E, t.nbytes), dtype=cp.int32).astype(cp.uint8)
            store.load(layer, t.name, full.view(t.storage).reshape(E, *t.shape))
            words = t.nbytes // 4
            CHECKSUM((64, E), (256,), (full.view(cp.uint32), cp.uint64(words), cp.uint64(words), 0, sums[ti]))
        expected.append(sums)
    cp.cuda.Device().synchronize()
    dwdp_ops.barrier()
    return store, expected, rng


def checksum_layer(store, layer, out, mask, stream):
    for ti, t in enumerate(store.layout.tensors):
        base = store.composite(layer, t.name)
        words = t.nbytes // 4
        CHECKSUM((16, store.E), (256,), (base, cp.uint64(store.layout.strides[ti] // 4), cp.uint64(words),
                                         mask if mask is not None else 0, out[ti]), stream=stream)


def stress(seed, steps):
    layers = 5
    store, expected, rng = setup(seed, layers)
    sched = PrefetchScheduler(store, policy="auto", top_k=min(4, store.E), nvshmem_blocks=8)
    stream = cp.cuda.Stream(non_blocking=True)
    records = []
    for step in range(steps):
        n_layers = int(rng.integers(1, layers + 1))
        tokens = int(rng.choice([1, 2, 8, 512, 4096]))
        policy = sched.begin_step(tokens=tokens, num_layers=n_layers)
        for p in range(n_layers):
            SPIN((1,), (1,), (np.int64(rng.integers(0, 2_000_000)),), stream=stream)  # a random compute window
            out = cp.zeros((len(store.layout.tensors), store.E), cp.uint64)
            mask = None
            if policy == "on_demand":
                n = int(rng.integers(0, 3 * store.E))
                ids = cp.asarray(rng.integers(0, store.E, size=max(n, 1)).astype(np.int32))
                sched.wait(p, stream, ids=ids, count=n)
                mask = cp.zeros(store.E, cp.int32)
                MARK((1,), (256,), (ids, np.int32(n), np.int32(store.lo), np.int32(store.hi), mask), stream=stream)
            else:
                sched.wait(p, stream)
            checksum_layer(store, p, out, mask, stream)
            sched.release(p, stream)
            records.append((step, p, policy, out, mask))
    stream.synchronize()
    bad = 0
    for step, p, policy, out, mask in records:
        want = expected[p]
        if mask is not None:
            want = want * mask.astype(cp.uint64)[None, :]
        diff = int((out != want).sum())
        if diff:
            print(f"step {step} layer {p} ({policy}): {diff} expert checksums differ")
            bad += diff
    policies = {r[2] for r in records}
    print(f"rank {dwdp_ops.rank()}: stress {steps} steps, {len(records)} layer uses, policies {sorted(policies)}, "
          f"{bad} bad checksums")
    store.close()
    return bad


def graph(seed):
    layers = 3
    store, expected, _ = setup(seed, layers)
    sched = PrefetchScheduler(store, policy="on_demand", top_k=min(4, store.E), nvshmem_blocks=8)
    stream = cp.cuda.Stream(non_blocking=True)
    n = 16  # routed (token, expert) pairs of a small decode batch
    counter = cp.asarray(np.array([seed + 1], np.int32))
    ids = [cp.zeros(n, cp.int32) for _ in range(layers)]
    masks = [cp.zeros(store.E, cp.int32) for _ in range(layers)]
    outs = [cp.zeros((len(store.layout.tensors), store.E), cp.uint64) for _ in range(layers)]

    def step():
        sched.begin_step()
        for p in range(layers):
            ROUTE((1,), (32,), (counter, np.int32(p), np.int32(store.E), np.int32(n), ids[p]), stream=stream)
            sched.wait(p, stream, ids=ids[p], count=n)
            masks[p].fill(0)
            outs[p].fill(0)
            MARK((1,), (256,), (ids[p], np.int32(n), np.int32(store.lo), np.int32(store.hi), masks[p]), stream=stream)
            checksum_layer(store, p, outs[p], masks[p], stream)
            sched.release(p, stream)

    def poison():
        for p in range(layers):
            for t in store.layout.tensors:
                comp = store.composite(p, t.name).view(cp.uint8)
                comp[: store.lo] = 0
                comp[store.hi :] = 0
        cp.cuda.Device().synchronize()

    with stream:
        poison()
        step()
        stream.synchronize()
        eager = [o.copy() for o in outs]
        poison()
        stream.begin_capture()
        step()
        g = stream.end_capture()
        for o in outs:
            o.fill(7)
        g.launch(stream)
        stream.synchronize()
    same = all(bool((a == b).all()) for a, b in zip(eager, outs))
    correct = all(bool((eager[p] == expected[p] * masks[p].astype(cp.uint64)[None, :]).all()) for p in range(layers))
    print(f"rank {dwdp_ops.rank()}: graph replay equals eager: {same}; eager equals owners' checksums: {correct}")
    store.close()
    return same and correct


def main() -> int:
    mode, seed = sys.argv[1], int(sys.argv[2])
    with dwdp_ops.init(timeout=120):
        if mode == "stress":
            ok = stress(seed, int(sys.argv[3]) if len(sys.argv) > 3 else 30) == 0
        else:
            ok = graph(seed)
        dwdp_ops.barrier()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
