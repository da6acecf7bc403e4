"""Packed layout and copy schedules: pure host logic."""

from __future__ import annotations

import pytest
from dwdp_ops.layout import (
    PAGE,
    REGISTER_UNIT,
    ExpertLayout,
    fp8_scale_shape,
    local_allocation_bytes,
    registration_overhead,
)
from dwdp_ops.schedule import Copy, order_copies, peer_order


@pytest.mark.parametrize("dtype, w13_mib, w2_mib", [("float8_e4m3fn", 28, 14), ("bfloat16", 56, 28), ("float16", 56, 28)])
def test_deepseek_r1_strides_are_whole_pages(dtype, w13_mib, w2_mib):
    lay = ExpertLayout.moe(7168, 2048, dtype)
    assert lay.stride("w13") == w13_mib << 20 and lay.stride("w2") == w2_mib << 20
    assert lay.inflation == 0.0
    assert lay.expert_bytes == 3 * 2048 * 7168 * (1 if dtype == "float8_e4m3fn" else 2)
    assert all(s % PAGE == 0 for s in lay.strides)
    assert fp8_scale_shape((4096, 7168)) == (32, 56) and fp8_scale_shape((7168, 2048)) == (56, 16)


def test_small_layout_reports_inflation_and_offsets():
    lay = ExpertLayout.moe(256, 128, "float16")
    assert lay.tensors[0].nbytes == 2 * 128 * 256 * 2 and lay.stride("w13") == PAGE
    assert lay.inflation > 1.0
    assert lay.tensor_offset("w13", 5) == 0 and lay.tensor_offset("w2", 5) == 5 * PAGE
    with pytest.raises(KeyError, match="no tensor 'w3'"):
        lay.stride("w3")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ExpertLayout.moe(256, 128, "int4")


@pytest.mark.parametrize("L", [1, 7, 32, 64, 128])
def test_local_allocations_are_registration_units(L):
    lay = ExpertLayout.moe(7168, 2048, "float8_e4m3fn")
    for t in lay.tensors:
        n = local_allocation_bytes(lay, t.name, L)
        assert n % REGISTER_UNIT == 0 and L * lay.stride(t.name) <= n < L * lay.stride(t.name) + REGISTER_UNIT
    assert registration_overhead(lay, 64) == pytest.approx((2048 + 1024) / (64 * 42) - 1)
    with pytest.raises(ValueError, match="must be positive"):
        local_allocation_bytes(lay, "w13", 0)


def _copies(world, rank, per_peer=3, size=5 << 20):
    out, dst = [], 0
    for p in range(world):
        if p == rank:
            continue
        for k in range(per_peer):
            out.append(Copy(p, dst, (p << 40) + k * size, size))
            dst += size
    return out


def _bytes(copies):
    return sorted((c.dst + i, c.src + i) for c in copies for i in range(0, c.nbytes, 1 << 20))


@pytest.mark.parametrize("world, rank", [(2, 0), (4, 1), (4, 3), (8, 5)])
def test_interleaved_moves_the_same_bytes_round_robin(world, rank):
    copies = _copies(world, rank)
    inter = order_copies(copies, rank, world, "interleaved", 2 << 20)
    serial = order_copies(copies, rank, world, "per_peer")
    stag = order_copies(copies, rank, world, "staggered")
    assert _bytes(inter) == _bytes(serial) == _bytes(stag) == _bytes(copies)
    assert [c.peer for c in stag][:: len(stag) // (world - 1)] == peer_order(rank, world)
    assert all(c.nbytes <= 2 << 20 for c in inter)
    first_round = [c.peer for c in inter[: world - 1]]
    assert first_round == peer_order(rank, world)  # staggered start, one slice per peer per round
    assert [c.peer for c in serial] == sorted(c.peer for c in serial)


def test_stagger_spreads_first_owners():
    firsts = [peer_order(r, 4)[0] for r in range(4)]
    assert sorted(firsts) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="schedule must be"):
        order_copies([], 0, 2, "random")
