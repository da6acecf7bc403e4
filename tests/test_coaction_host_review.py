"""Host-side review of the co-action ops (``dwdp_ops.coaction``): defects reachable without a GPU. DeviceBuffers at
made-up addresses stand in for device arrays; nothing here launches a kernel."""

from __future__ import annotations

import numpy as np
import pytest
from dwdp_ops.coaction import CoActionSpec


@pytest.mark.parametrize("num_rows, world", [(5, 4), (3, 8), (9, 4), (10, 4), (1, 2), (16, 8)])
def test_a_sharded_tables_local_rows_are_an_empty_range_on_a_rank_past_the_rows(num_rows, world):
    """``local_rows`` capped ``hi`` at ``num_rows`` but not ``lo``: 5 rows over 4 ranks (2 a shard) gave rank 3
    (6, 5), so the documented use ``table.shard[: hi - lo] = full[lo:hi]`` (tests/multiproc/sharded_table_check.py)
    assigned 0 rows to ``shard[:-1]`` and failed. Every rank's range is now ``lo <= hi``, and the ranges tile
    ``[0, num_rows)``. (A ShardedTable made without its collective constructor: only the property is read.)"""
    from dwdp_ops.coaction import ShardedTable

    ranges = []
    for rank in range(world):
        t = ShardedTable.__new__(ShardedTable)
        t.rank, t.world, t.num_rows = rank, world, num_rows
        t.rows_per_shard = -(-num_rows // world)
        lo, hi = t.local_rows
        assert 0 <= lo <= hi <= num_rows and hi - lo <= t.rows_per_shard, (rank, lo, hi)
        ranges.append((lo, hi))
    assert [r for lo, hi in ranges for r in range(lo, hi)] == list(range(num_rows))


def _zero_batch(spec: CoActionSpec, T: int = 5):
    """Table-form arguments of a batch of B = 0 samples (DeviceBuffers at made-up addresses)."""
    from dwdp_ops.interop import DeviceBuffer

    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)

    def buf(shape, dtype=f32, at=0x1000):
        return DeviceBuffer(at, shape, dtype, None)

    rows = 4
    return dict(induction=buf((rows, spec.induction_dim)), feed=buf((rows, spec.feed_dim), at=0x2000),
                mask=buf((0, T), at=0x3000), ind_ids=buf((0,), i64, 0x4000), feed_ids=buf((0, T), i64, 0x5000),
                out=buf((0, spec.out_dim), at=0x6000), grad_out=buf((0, spec.out_dim), at=0x7000),
                grads=(buf((rows, spec.induction_dim), at=0x8000), buf((rows, spec.feed_dim), at=0x9000)))


@pytest.mark.parametrize("spec, match", [
    (CoActionSpec(orders=9), r"orders must be in \[1, 8\]"),
    (CoActionSpec(layer_dims=((300, 8),)), r"layer dims must be in \[1, 256\]"),
    (CoActionSpec(layer_dims=((4, 4),) * 9), "1 to 8 layers"),
    (CoActionSpec(layer_dims=((256, 256),) * 8), "227 KiB"),
], ids=["orders", "width", "layers", "shared-memory"])
def test_an_empty_batch_refuses_a_spec_beyond_the_kernels_limits(monkeypatch, spec, match):
    """The docs promise a ValueError naming the limit for a spec the kernels cannot run; a batch of B = 0 samples
    returned early, before the native call that checks it, so such a spec 'worked' on an empty batch (an empty
    output, unchanged gradients) and failed only once a batch had samples. The device lookup of ``out`` and of the
    gradient pair is stubbed (no GPU here); the check comes before any device work."""
    from dwdp_ops.coaction import fused

    monkeypatch.setattr(fused, "_check_device_of", lambda *a: None)
    a = _zero_batch(spec)
    with pytest.raises(ValueError, match=match):
        fused.coaction_forward_gpu(a["induction"], a["feed"], a["mask"], spec, ind_ids=a["ind_ids"],
                                   feed_ids=a["feed_ids"], stream=0, check_ids=False, out=a["out"])
    with pytest.raises(ValueError, match=match):
        fused.coaction_backward_gpu(a["induction"], a["feed"], a["mask"], a["grad_out"], spec, ind_ids=a["ind_ids"],
                                    feed_ids=a["feed_ids"], stream=0, check_ids=False, grads=a["grads"])


def test_an_empty_batch_of_a_runnable_spec_still_returns_its_arrays(monkeypatch):
    from dwdp_ops.coaction import fused

    monkeypatch.setattr(fused, "_check_device_of", lambda *a: None)
    spec = CoActionSpec()
    a = _zero_batch(spec)
    assert fused.coaction_forward_gpu(a["induction"], a["feed"], a["mask"], spec, ind_ids=a["ind_ids"],
                                      feed_ids=a["feed_ids"], stream=0, check_ids=False, out=a["out"]) is a["out"]
    got = fused.coaction_backward_gpu(a["induction"], a["feed"], a["mask"], a["grad_out"], spec, ind_ids=a["ind_ids"],
                                      feed_ids=a["feed_ids"], stream=0, check_ids=False, grads=a["grads"])
    assert got[0] is a["grads"][0] and got[1] is a["grads"][1]


@pytest.mark.parametrize("which, at", [("induction", 0x1002), ("feed", 0x2006), ("mask", 0x3002),
                                       ("ind_ids", 0x4004), ("feed_ids", 0x5001)])
def test_an_address_off_its_element_size_is_refused_before_any_launch(which, at):
    """An array whose address is not a multiple of its element size (an __cuda_array_interface__ at 0x1002 for
    float32) passed every check and reached the kernels, whose misaligned access ends the CUDA context; each is
    now a ValueError naming it. The argument check runs without a GPU (DeviceBuffers at made-up addresses)."""
    from dwdp_ops.coaction import fused
    from dwdp_ops.interop import DeviceBuffer

    spec = CoActionSpec()
    a = _zero_batch(spec)
    B, T = 2, 5
    a["mask"] = DeviceBuffer(0x3000, (B, T), np.dtype(np.float32), None)
    a["ind_ids"] = DeviceBuffer(0x4000, (B,), np.dtype(np.int64), None)
    a["feed_ids"] = DeviceBuffer(0x5000, (B, T), np.dtype(np.int64), None)
    fused._args(spec, a["induction"], a["feed"], a["mask"], a["ind_ids"], a["feed_ids"], "float32")  # aligned: ok
    b = a[which]
    a[which] = DeviceBuffer(at, b.shape, b.dtype, None)
    with pytest.raises(ValueError, match=rf"^{which}: its address {at:#x} is not a multiple of its element size"):
        fused._args(spec, a["induction"], a["feed"], a["mask"], a["ind_ids"], a["feed_ids"], "float32")
