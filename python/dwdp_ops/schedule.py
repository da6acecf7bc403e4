"""Copy-engine fetch schedules (pure host logic): which byte ranges to copy, and in what order.

A layer's fetch is a list of ``Copy(peer, dst, src, nbytes)``, one per (tensor kind, run of the partition's fetch
plan). Two schedules:
  * ``per_peer``: the runs in peer order, one copy each: every rank starts with the lowest peer, so at any moment
    several ranks pull from the same owner and share its egress (an all-to-one phase).
  * ``staggered``: the same whole runs, but each rank starts at the peer after itself and goes round, so that at
    any moment the ranks read from different owners (when the runs are of equal size).
  * ``interleaved``: every run cut into slices of ``slice_bytes`` (default 2 MiB), issued round-robin across the
    peers, starting at the peer after this rank (staggered), so that owners are loaded evenly at every moment.
Invariant: both schedules move exactly the same bytes (same multiset of (dst, src) bytes), only in another order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Schedule = Literal["per_peer", "staggered", "interleaved"]
DEFAULT_SLICE = 2 << 20


@dataclass(frozen=True)
class Copy:
    peer: int
    dst: int
    src: int
    nbytes: int


def slice_copy(c: Copy, slice_bytes: int) -> list[Copy]:
    if slice_bytes <= 0:
        raise ValueError(f"slice_bytes must be positive, got {slice_bytes}")
    return [
        Copy(c.peer, c.dst + off, c.src + off, min(slice_bytes, c.nbytes - off)) for off in range(0, c.nbytes, slice_bytes)
    ]


def peer_order(rank: int, world_size: int) -> list[int]:
    """The other ranks, starting at ``rank + 1`` and wrapping: each rank starts at a different owner."""
    return [(rank + k) % world_size for k in range(1, world_size)]


def order_copies(
    copies: Sequence[Copy], rank: int, world_size: int, schedule: Schedule = "interleaved", slice_bytes: int = DEFAULT_SLICE
) -> list[Copy]:
    if schedule == "per_peer":
        return sorted(copies, key=lambda c: (c.peer, c.dst))
    rank_of = {p: i for i, p in enumerate(peer_order(rank, world_size))}
    if schedule == "staggered":
        return sorted(copies, key=lambda c: (rank_of.get(c.peer, world_size), c.dst))
    if schedule != "interleaved":
        raise ValueError(f"schedule must be 'per_peer', 'staggered' or 'interleaved', got {schedule!r}")
    queues: dict[int, list[Copy]] = {}
    for c in sorted(copies, key=lambda c: c.dst):
        queues.setdefault(c.peer, []).extend(slice_copy(c, slice_bytes))
    staggered = peer_order(rank, world_size)
    order = [p for p in staggered if p in queues] + sorted(set(queues) - set(staggered))
    rounds = itertools.zip_longest(*(queues[p] for p in order))  # one slice per peer per round
    return [c for rnd in rounds for c in rnd if c is not None]

