"""Copy-engine fetch schedules (pure host logic): which byte ranges to copy, and in what order.

A layer's fetch is a list of ``Copy(peer, dst, src, nbytes)``, one per (tensor kind, run of the partition's fetch
plan). Three schedules:
  * ``per_peer``: the runs in peer order, one copy each: every rank starts with the lowest peer, so at any moment
    several ranks pull from the same owner and share its egress (an all-to-one phase).
  * ``staggered``: the same whole runs, but each rank starts at the peer after itself and goes round, so that at
    any moment the ranks read from different owners (when the runs are of equal size).
  * ``interleaved``: every run cut into slices of ``slice_bytes`` (default 2 MiB), issued round-robin across the
    peers, starting at the peer after this rank (staggered), so that owners are loaded evenly at every moment.
Invariant: the three schedules move exactly the same bytes (same multiset of (dst, src) bytes), only in another
order.

Bad input (checked up front, naming the argument): ``rank`` / ``world_size`` / ``slice_bytes`` / a copy's ``nbytes``
that are not integers (bools included) raise TypeError; ``world_size < 1``, a rank outside ``[0, world_size)``,
``slice_bytes < 1``, a copy of negative ``nbytes`` and an unknown schedule raise ValueError; a copy that is not a
``Copy``, or one whose ``peer`` / ``dst`` / ``src`` is not an integer, raises TypeError and a negative ``dst`` /
``src`` ValueError (``order_copies`` and ``slice_copy`` alike). ``slice_bytes`` is used by
``interleaved`` only: the other two schedules also accept ``None`` there (nothing is sliced); ``interleaved`` needs a
positive int.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ._checks import is_int

Schedule = Literal["per_peer", "staggered", "interleaved"]
DEFAULT_SLICE = 2 << 20


@dataclass(frozen=True)
class Copy:
    peer: int
    dst: int
    src: int
    nbytes: int


def _check_slice(slice_bytes) -> int:
    """``slice_bytes`` as an int, or TypeError (not an integer; bools are refused) / ValueError (not >= 1)."""
    if not is_int(slice_bytes):
        raise TypeError(f"slice_bytes must be a positive int (bytes), got {slice_bytes!r} ({type(slice_bytes).__name__})")
    if slice_bytes < 1:
        raise ValueError(f"slice_bytes must be a positive int (bytes), got {slice_bytes}")
    return int(slice_bytes)


def _check_copy(c) -> None:
    """TypeError unless ``c`` is a ``Copy`` of integers (bools refused); ValueError if ``nbytes``, ``dst`` or ``src``
    is negative."""
    if not isinstance(c, Copy):
        raise TypeError(f"every copy must be a Copy(peer, dst, src, nbytes), got {c!r} ({type(c).__name__})")
    # (a str peer was ordered as a non-peer, a None one crashed in sorted(), a float dst was sliced into floats)
    for field in ("peer", "dst", "src"):
        if not is_int(getattr(c, field)):
            raise TypeError(f"every copy's {field} must be an int, got {c}")
    if c.dst < 0 or c.src < 0:
        raise ValueError(f"every copy's dst and src must be addresses >= 0, got {c}")
    if not is_int(c.nbytes):
        raise TypeError(f"every copy must move an int >= 0 of bytes, got {c}")
    if c.nbytes < 0:
        raise ValueError(f"every copy must move an int >= 0 of bytes, got {c}")


def _check_world(rank, world_size) -> tuple[int, int]:
    """``(rank, world_size)`` as ints: TypeError unless both are integers (bools refused), ValueError unless
    ``world_size >= 1`` and ``0 <= rank < world_size``."""
    if not is_int(world_size):
        raise TypeError(f"world_size must be an int >= 1, got {world_size!r} ({type(world_size).__name__})")
    if world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size}")
    if not is_int(rank):
        raise TypeError(f"rank must be an int in [0, world_size={world_size}), got {rank!r} ({type(rank).__name__})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return int(rank), int(world_size)


def slice_copy(c: Copy, slice_bytes: int) -> list[Copy]:
    """``c`` cut into consecutive copies of ``slice_bytes`` (a positive int; the last one may be shorter); a copy of
    0 bytes gives []. ``c`` must be a ``Copy`` of an int >= 0 of bytes (TypeError / ValueError naming it otherwise)."""
    _check_copy(c)
    return _slices(c, _check_slice(slice_bytes))


def _slices(c: Copy, slice_bytes: int) -> list[Copy]:
    """``slice_copy`` of arguments checked already (``order_copies`` checks every copy once, up front)."""
    return [
        Copy(c.peer, c.dst + off, c.src + off, min(slice_bytes, c.nbytes - off)) for off in range(0, c.nbytes, slice_bytes)
    ]


def peer_order(rank: int, world_size: int) -> list[int]:
    """The other ranks, starting at ``rank + 1`` and wrapping: each rank starts at a different owner."""
    rank, world_size = _check_world(rank, world_size)
    return [(rank + k) % world_size for k in range(1, world_size)]


def order_copies(
    copies: Sequence[Copy], rank: int, world_size: int, schedule: Schedule = "interleaved",
    slice_bytes: int | None = DEFAULT_SLICE,
) -> list[Copy]:
    """``copies`` (any iterable of ``Copy``: a generator is read once) in ``schedule``'s order (module docstring) for
    ``rank`` of ``world_size``, as a new list; every argument is checked before anything is ordered (bad input: module
    docstring)."""
    rank, world_size = _check_world(rank, world_size)
    copies = list(copies)  # read once: the checks below iterate it before it is ordered
    if schedule not in ("per_peer", "staggered", "interleaved"):
        raise ValueError(f"schedule must be 'per_peer', 'staggered' or 'interleaved', got {schedule!r}")
    if schedule == "interleaved" and slice_bytes is None:
        raise TypeError("slice_bytes must be a positive int (bytes) for the 'interleaved' schedule, got None "
                        "(None is accepted only by 'per_peer' and 'staggered', which do not slice)")
    if slice_bytes is not None:
        slice_bytes = _check_slice(slice_bytes)
    for c in copies:  # (interleaved's slicing drops a negative copy, the others kept it: not the same bytes)
        _check_copy(c)
    if schedule == "per_peer":
        return sorted(copies, key=lambda c: (c.peer, c.dst))
    rank_of = {p: i for i, p in enumerate(peer_order(rank, world_size))}
    if schedule == "staggered":
        return sorted(copies, key=lambda c: (rank_of.get(c.peer, world_size), c.dst))
    queues: dict[int, list[Copy]] = {}
    for c in sorted(copies, key=lambda c: c.dst):
        queues.setdefault(c.peer, []).extend(_slices(c, slice_bytes))
    staggered = peer_order(rank, world_size)
    order = [p for p in staggered if p in queues] + sorted(set(queues) - set(staggered))
    rounds = itertools.zip_longest(*(queues[p] for p in order))  # one slice per peer per round
    return [c for rnd in rounds for c in rnd if c is not None]

