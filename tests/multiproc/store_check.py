"""Run through dwdp_ops.launch by tests/test_gpu_store.py: random valid partitions and random expert lists; every
fetched byte must equal the owner's, the composite and table views must equal the full single-GPU tensor, merge
must equal both; bad input raises. Prints one OK line per rank."""

import sys

import cupy as cp
import dwdp_ops
import numpy as np
from dwdp_ops import DwdpError, ExpertLayout, ExpertPartition, ExpertStore

SHAPES = [(256, 128, "float16"), (384, 256, "bfloat16"), (512, 256, "float8_e4m3fn")]


def full_weights(layout, E, layer, seed):
    """The whole layer, identical on every rank (same seed), random non-zero bytes."""
    out = {}
    for ti, t in enumerate(layout.tensors):
        rs = cp.random.RandomState(seed * 1000 + layer * 10 + ti)
        raw = rs.randint(1, 255, size=(E, t.nbytes), dtype=cp.int32).astype(cp.uint8)
        out[t.name] = raw.view(t.storage).reshape(E, *t.shape)
    return out


def B(x):
    """Bytes of an array (compare bytes, never floats: random bits include NaNs)."""
    return x.view(cp.uint8)


def table_expert(ptr, t):
    mem = cp.cuda.UnownedMemory(int(ptr), t.nbytes, None)
    return cp.ndarray(t.shape, t.storage, cp.cuda.MemoryPointer(mem, 0))


def check_layer(store, layer, full, which, check_remote):
    lo, hi = store.lo, store.hi
    for t in store.layout.tensors:
        comp = store.composite(layer, t.name)
        want = full[t.name]
        for e in range(store.E):
            local = lo <= e < hi
            if local or check_remote(e):
                assert bool((B(comp[e]) == B(want[e])).all()), f"{which}: composite layer {layer} {t.name} expert {e} differs"
        if all(check_remote(e) for e in range(store.E) if not lo <= e < hi):
            ptrs = store.table(layer, t.name).get()
            for e in range(store.E):
                assert bool((B(table_expert(ptrs[e], t)) == B(want[e])).all()), f"{which}: table expert {e} differs"
            merged = store.merge(layer, t.name)
            assert bool((B(merged) == B(want)).all()), f"{which}: merge differs"


def poison(store, layer):
    for t in store.layout.tensors:
        comp = B(store.composite(layer, t.name))
        comp[: store.lo] = 0xFF  # never in the weights (random bytes in [1, 254])
        comp[store.hi :] = 0xFF
    cp.cuda.Device().synchronize()


def run_case(seed, world, rank):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 9))
    stride = int(rng.integers(1, L + 1))
    E = L + (world - 1) * stride
    H, I, dtype = SHAPES[seed % len(SHAPES)]
    part = ExpertPartition(E, world, L, stride, ["balanced", "lowest"][seed % 2])
    layout = ExpertLayout.moe(H, I, dtype)
    layers = 3
    stream = cp.cuda.Stream(non_blocking=True)
    with ExpertStore(part, layout, layers) as store:
        fulls = [full_weights(layout, E, layer, seed) for layer in range(layers)]
        for layer in range(layers):
            for t in layout.tensors:
                src = fulls[layer][t.name]
                # stacked [E, ...] for even seeds, list of L per-expert tensors for odd ones
                store.load(layer, t.name, src if seed % 2 == 0 else [src[e] for e in range(store.lo, store.hi)])
            assert bool((B(store.local(layer, "w13")) == B(fulls[layer]["w13"][store.lo : store.hi])).all())
        dwdp_ops.barrier()
        # copy engine, every schedule; layer l and l+2 share slots (parity), so check right after each fetch
        for layer, (schedule, batched) in enumerate([("per_peer", False), ("interleaved", True), ("staggered", True)]):
            poison(store, layer)
            store.copy_engine.fetch(layer, stream, schedule=schedule, batched=batched, slice_bytes=(1 << 20) * (1 + seed % 3))
            stream.synchronize()
            check_layer(store, layer, fulls[layer], f"ce {schedule} batched={batched}", lambda e: True)
        # NVSHMEM: random id lists (repeats, local ids, empty), both copy paths, host and device counts
        for trial in range(4):
            layer = trial % layers
            poison(store, layer)
            n = int(rng.integers(0, 2 * E))
            ids = rng.integers(0, E, size=n).astype(np.int32)
            chosen = set(ids.tolist())
            dev_ids = cp.asarray(ids) if n else cp.zeros(1, cp.int32)
            count = cp.asarray(np.array([n], np.int32)) if trial % 2 else n
            store.nvshmem.fetch(layer, dev_ids, count, stream, num_blocks=int(rng.choice([1, 8, 32])),
                                peer_ptr=bool(trial % 2), chunk=(256 << 10) * (1 + trial))
            stream.synchronize()
            store.nvshmem.check_errors()
            check_layer(store, layer, fulls[layer], f"nvshmem trial {trial}", lambda e, chosen=chosen: e in chosen)
            # the experts not asked for are untouched (still poisoned)
            comp = store.composite(layer, "w2")
            for e in set(range(E)) - chosen - set(range(store.lo, store.hi)):
                assert bool((B(comp[e]) == 0xFF).all()), f"expert {e} was fetched unasked"
        store.nvshmem.fetch(0, None, None, stream, num_blocks=16)
        stream.synchronize()
        check_layer(store, 0, fulls[0], "nvshmem all", lambda e: True)
        bad_input(store, stream, E)
        dwdp_ops.barrier()
    return E, L, stride, dtype


def bad_input(store, stream, E):
    def expect(exc, fn, text):
        try:
            fn()
        except exc as e:
            assert text in str(e), f"message {e!r} lacks {text!r}"
            return
        raise AssertionError(f"{text}: no {exc.__name__} raised")

    expect(ValueError, lambda: store.nvshmem.fetch(0, np.array([0, E], np.int32)), f"expert id {E} is outside")
    store.nvshmem.fetch(0, cp.asarray(np.array([E + 5, E + 5], np.int32)), None, stream)
    stream.synchronize()
    expect(DwdpError, store.nvshmem.check_errors, f"expert id {E + 5}")
    t = store.layout.tensors[0]
    expect(TypeError, lambda: store.load(0, "w13", cp.zeros((E, *t.shape), cp.float32)), "expected storage dtype")
    raw = cp.zeros(E * t.nbytes + 16, cp.uint8)
    mis = raw[8 : 8 + E * t.nbytes].view(t.storage).reshape(E, *t.shape)
    expect(ValueError, lambda: store.load(0, "w13", mis), "16-byte boundaries")
    expect(ValueError, lambda: store.load(0, "w13", cp.zeros((E + 1, *t.shape), t.storage)), "expected shape")
    expect(ValueError, lambda: store.composite(7, "w13"), "layer 7 is outside")
    expect(KeyError, lambda: store.composite(0, "w3"), "no tensor 'w3'")
    store.release(2)
    expect(DwdpError, lambda: store.composite(2, "w13"), "layer 2 was released")
    expect(DwdpError, lambda: store.copy_engine.fetch(2, stream), "layer 2 was released")
    expect(DwdpError, lambda: store.nvshmem.fetch(2), "layer 2 was released")


def main() -> int:
    # One store per process: NVSHMEM 3.4.5 fails to register buffers again after unregistering others
    # (docs/benchmarks.md), so every case runs in a fresh job.
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    with dwdp_ops.init(timeout=120):
        me, world = dwdp_ops.rank(), dwdp_ops.world_size()
        E, L, stride, dtype = run_case(seed, world, me)
        print(f"rank {me}: case {seed} E={E} L={L} stride={stride} {dtype} OK")
        try:
            ExpertPartition.disjoint(8 * world, world).fetch_plan(world)
            raise AssertionError("a plan for a rank outside the world was accepted")
        except ValueError as e:
            assert "outside the world" in str(e)
        print(f"rank {me}: store checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
