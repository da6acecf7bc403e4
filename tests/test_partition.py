"""ExpertPartition: property tests over many random valid configurations, and rejection tests."""

from __future__ import annotations

import random

import numpy as np
import pytest
from dwdp_ops.partition import ExpertPartition


def random_partitions(n=300, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        world = rng.randint(1, 9)
        L = rng.randint(1, 70)
        stride = rng.randint(1, L)
        yield ExpertPartition(L + (world - 1) * stride, world, L, stride, rng.choice(["balanced", "lowest"]))


@pytest.mark.parametrize("part", list(random_partitions()), ids=lambda p: f"E{p.num_experts}N{p.world_size}L{p.experts_per_rank}s{p.stride}{p.owner_policy[0]}")
def test_plan_covers_every_expert_exactly_once(part):
    for rank in range(part.world_size):
        lo, hi = part.local_range(rank)
        assert hi - lo == part.experts_per_rank and 0 <= lo and hi <= part.num_experts
        seen = list(range(lo, hi))
        for peer, a, b in part.fetch_plan(rank):
            assert peer != rank and a < b
            plo, phi = part.local_range(peer)
            assert plo <= a and b <= phi, "a run must be stored by the peer it is fetched from"
            seen += range(a, b)
        assert sorted(seen) == list(range(part.num_experts))
        assert sum(b - a for _, a, b in part.fetch_plan(rank)) == part.num_remote
        table = part.owner_table(rank)
        assert all(rank in part.owners(e) or table[e] != rank for e in range(part.num_experts))


@pytest.mark.parametrize("part", list(dict.fromkeys(p for p in random_partitions(200, 1)  # each case once
                                                   if p.owner_policy == "balanced" and p.world_size > 1)),
                         ids=lambda p: f"E{p.num_experts}N{p.world_size}L{p.experts_per_rank}s{p.stride}")
def test_balanced_peers_each_serve_stride_experts(part):
    for rank in range(part.world_size):
        served = {}
        for peer, a, b in part.fetch_plan(rank):
            served[peer] = served.get(peer, 0) + b - a
        assert served == {p: part.stride for p in range(part.world_size) if p != rank}


def test_lowest_takes_lowest_owner():
    part = ExpertPartition(10, 3, 6, 2, "lowest")
    for rank in range(3):
        for peer, a, b in part.fetch_plan(rank):
            for e in range(a, b):
                assert peer == part.owners(e)[0]


def test_deepseek_r1_four_ranks():
    part = ExpertPartition.disjoint(256, 4)
    assert part.local_range(1) == (64, 128)
    assert part.fetch_plan(1) == [(0, 0, 64), (2, 128, 192), (3, 192, 256)]
    assert part.num_remote == 192


@pytest.mark.parametrize(
    "args, match",
    [
        ((256, 4, 64, 60), r"256 != 64 \+ 3 \* 60 = 244.*experts_per_rank=64, stride=64"),
        ((10, 3, 2, 4), r"1 <= stride <= experts_per_rank fails: stride=4, experts_per_rank=2"),
        ((10, 3, 4, 0), r"1 <= stride <= experts_per_rank fails"),
        ((2, 4, 1, 1), r"no valid partition exists"),
        ((8, 0, 8, 8), r"world_size must be >= 1, got 8 and 0"),
    ],
)
def test_invalid_partitions_are_explained(args, match):
    with pytest.raises(ValueError, match=match):
        ExpertPartition(*args)


def test_bad_policy_types_and_ranks():
    with pytest.raises(ValueError, match=r"^owner_policy must be 'balanced' or 'lowest', got 'nearest'$"):
        ExpertPartition(8, 2, 4, 4, "nearest")
    with pytest.raises(TypeError, match="num_experts must be an int"):
        ExpertPartition(8.0, 2, 4, 4)
    part = ExpertPartition.disjoint(8, 2)
    for bad in (-1, 2, 7):
        for call in (part.fetch_plan, part.local_range, part.owner_table):  # the rank given, not another
            with pytest.raises(ValueError, match=rf"^rank {bad} is outside the world \[0, 2\)$"):
                call(bad)
    with pytest.raises(ValueError, match=r"expert id 8 is outside \[0, 8\)"):
        part.owners(8)
    with pytest.raises(ValueError, match="not divisible"):
        ExpertPartition.disjoint(10, 4)


NOT_INTS = [1.0, "1", True, None, [1]]


@pytest.mark.parametrize("bad", NOT_INTS, ids=repr)
def test_ranks_and_expert_ids_must_be_integers(bad):
    part = ExpertPartition.disjoint(8, 2)
    for call in (part.local_range, part.fetch_plan, part.owner_table):
        with pytest.raises(TypeError, match=rf"rank must be an int, got {type(bad).__name__}"):
            call(bad)
    with pytest.raises(TypeError, match=rf"expert must be an int, got {type(bad).__name__}"):
        part.owners(bad)


@pytest.mark.parametrize("field", range(4))
@pytest.mark.parametrize("bad", NOT_INTS, ids=repr)
def test_every_size_must_be_an_integer(field, bad):
    args = [8, 2, 4, 4]
    args[field] = bad
    name = ("num_experts", "world_size", "experts_per_rank", "stride")[field]
    with pytest.raises(TypeError, match=rf"{name} must be an int, got {type(bad).__name__}"):
        ExpertPartition(*args)


@pytest.mark.parametrize("args, exc, match", [
    ((256, 0), ValueError, r"num_experts and world_size must be >= 1, got 256 and 0"),
    ((256, -4), ValueError, r"must be >= 1, got 256 and -4"),
    ((0, 4), ValueError, r"must be >= 1, got 0 and 4"),
    ((256, 3), ValueError, r"num_experts=256 is not divisible by world_size=3"),
    ((256.0, 4), TypeError, r"num_experts must be an int, got float"),
    ((256, "4"), TypeError, r"world_size must be an int, got str"),
    ((256, True), TypeError, r"world_size must be an int, got bool"),
])
def test_disjoint_rejects_bad_sizes(args, exc, match):
    with pytest.raises(exc, match=match):
        ExpertPartition.disjoint(*args)


def test_numpy_integers_are_accepted():
    part = ExpertPartition.disjoint(np.int64(256), np.int32(4))
    assert part == ExpertPartition.disjoint(256, 4)
    assert part.local_range(np.int64(1)) == (64, 128) and part.owners(np.int16(200)) == [3]


def test_numpy_integer_sizes_are_accepted_and_become_ints():
    """The module docstring (and ``disjoint``) accept numpy integers; the constructor did not (review issue 2)."""
    part = ExpertPartition(np.int64(8), np.int32(2), np.int64(4), np.int16(4))
    assert part == ExpertPartition(8, 2, 4, 4) and hash(part) == hash(ExpertPartition(8, 2, 4, 4))
    assert all(type(getattr(part, f)) is int for f in ("num_experts", "world_size", "experts_per_rank", "stride"))
    assert repr(part) == repr(ExpertPartition(8, 2, 4, 4))
    with pytest.raises(ValueError, match=r"1 <= stride <= experts_per_rank fails"):
        ExpertPartition(np.int64(8), 2, np.int64(4), np.int64(0))


@pytest.mark.parametrize("policy", ["balanced", "lowest"])
@pytest.mark.parametrize("rank", [np.uint8(3), np.int8(3), np.int16(3), np.int64(3)], ids=lambda r: type(r).__name__)
def test_a_small_numpy_rank_gives_the_same_plan_as_an_int(rank, policy):
    """The rank was used unconverted: ``np.uint8(3) * 128`` wrapped, so local_range gave (128, 0) (and the 'lowest'
    fetch plan was built from it), ``np.int8`` raised OverflowError. It is converted to an int once checked."""
    part = ExpertPartition(1024, 8, 128, 128, policy)
    assert part.local_range(rank) == part.local_range(3) == (384, 512)
    assert all(type(v) is int for v in part.local_range(rank))
    assert part.fetch_plan(rank) == part.fetch_plan(3)
    table = part.owner_table(rank)
    assert table == part.owner_table(3) and all(type(v) is int for v in table)
