"""Which experts each rank stores, and from whom it fetches the rest (pure host logic).

Rank r stores the contiguous experts ``[r * stride, r * stride + experts_per_rank)``. The ranges cover the layer
exactly when ``num_experts == experts_per_rank + (world_size - 1) * stride`` and ``1 <= stride <= experts_per_rank``;
``stride == experts_per_rank`` is the disjoint split, a smaller stride replicates ``experts_per_rank - stride``
experts between neighbours (fewer bytes to fetch, more memory).

Invariants of ``fetch_plan(rank)``: its runs are contiguous, non-empty, disjoint from the local range and from each
other, each is owned by the peer named, and together with the local range they cover every expert exactly once.

Bad input: sizes, ranks and expert ids that are not integers (bools included) raise TypeError; values that break
the conditions above raise ValueError naming the condition and, for sizes, valid choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._checks import is_int

OwnerPolicy = Literal["balanced", "lowest"]


def _check_int(value, name: str) -> None:
    """TypeError unless ``value`` is an integer (Python or numpy; bools are refused)."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")


def _valid_examples(num_experts: int, world_size: int, limit: int = 3) -> list[tuple[int, int]]:
    """(experts_per_rank, stride) pairs valid for this E and N, disjoint split first."""
    out = []
    for stride in range(num_experts // max(world_size, 1), 0, -1):
        per_rank = num_experts - (world_size - 1) * stride
        if stride <= per_rank:
            out.append((per_rank, stride))
        if len(out) == limit:
            break
    return out


@dataclass(frozen=True)
class ExpertPartition:
    num_experts: int
    world_size: int
    experts_per_rank: int
    stride: int
    owner_policy: OwnerPolicy = "balanced"

    def __post_init__(self) -> None:
        for name in ("num_experts", "world_size", "experts_per_rank", "stride"):
            v = getattr(self, name)
            _check_int(v, name)
            object.__setattr__(self, name, int(v))  # numpy integers become Python ints (equality, hashing, repr)
        if self.world_size < 1 or self.num_experts < 1:
            raise ValueError(f"num_experts and world_size must be >= 1, got {self.num_experts} and {self.world_size}")
        if self.owner_policy not in ("balanced", "lowest"):
            raise ValueError(f"owner_policy must be 'balanced' or 'lowest', got {self.owner_policy!r}")
        E, N, L, s = self.num_experts, self.world_size, self.experts_per_rank, self.stride
        problems = []
        if not 1 <= s <= L:
            problems.append(f"1 <= stride <= experts_per_rank fails: stride={s}, experts_per_rank={L}")
        if E != L + (N - 1) * s:
            problems.append(
                f"num_experts == experts_per_rank + (world_size - 1) * stride fails: {E} != {L} + {N - 1} * {s} "
                f"= {L + (N - 1) * s}"
            )
        if problems:
            examples = _valid_examples(E, N)
            hint = (
                f"; valid choices for num_experts={E}, world_size={N} include "
                + ", ".join(f"experts_per_rank={a}, stride={b}" for a, b in examples)
                if examples
                else f"; no valid partition exists for num_experts={E} over world_size={N} (need E >= N)"
            )
            raise ValueError("invalid expert partition: " + "; ".join(problems) + hint)

    @classmethod
    def disjoint(cls, num_experts: int, world_size: int, owner_policy: OwnerPolicy = "balanced") -> ExpertPartition:
        """The split without replication (``stride == experts_per_rank``); needs ``num_experts % world_size == 0``."""
        _check_int(num_experts, "num_experts")
        _check_int(world_size, "world_size")
        if world_size < 1 or num_experts < 1:
            raise ValueError(f"num_experts and world_size must be >= 1, got {num_experts} and {world_size}")
        num_experts, world_size = int(num_experts), int(world_size)
        if num_experts % world_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by world_size={world_size}")
        per = num_experts // world_size
        return cls(num_experts, world_size, per, per, owner_policy)

    def _check_rank(self, rank: int) -> int:
        """``rank`` as a Python int (a numpy one is converted: ``np.uint8(3) * stride`` would wrap), or TypeError /
        ValueError."""
        _check_int(rank, "rank")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank!r} is outside the world [0, {self.world_size})")
        return int(rank)

    def local_range(self, rank: int) -> tuple[int, int]:
        """``(start, stop)``: the experts ``[rank * stride, rank * stride + experts_per_rank)`` that ``rank`` stores."""
        rank = self._check_rank(rank)
        start = rank * self.stride
        return start, start + self.experts_per_rank

    def owners(self, expert: int) -> list[int]:
        """Every rank that stores ``expert``, lowest first."""
        _check_int(expert, "expert")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert id {expert} is outside [0, {self.num_experts})")
        s, L = self.stride, self.experts_per_rank
        return [r for r in range(self.world_size) if r * s <= expert < r * s + L]

    @property
    def num_remote(self) -> int:
        return self.num_experts - self.experts_per_rank

    def fetch_plan(self, rank: int) -> list[tuple[int, int, int]]:
        """Contiguous runs ``(peer, start, stop)`` that this rank fetches, in expert order."""
        rank = self._check_rank(rank)
        s, L = self.stride, self.experts_per_rank
        lo, hi = self.local_range(rank)
        if self.owner_policy == "balanced":
            runs = [(p, p * s, (p + 1) * s) for p in range(rank)]
            runs += [(p, p * s + L - s, p * s + L) for p in range(rank + 1, self.world_size)]
            return runs
        runs: list[tuple[int, int, int]] = []
        for e in list(range(lo)) + list(range(hi, self.num_experts)):
            owner = self.owners(e)[0]
            if runs and runs[-1][0] == owner and runs[-1][2] == e:
                runs[-1] = (owner, runs[-1][1], e + 1)
            else:
                runs.append((owner, e, e + 1))
        return runs

    def owner_table(self, rank: int) -> list[int]:
        """For every expert, the rank this rank reads it from (itself for local experts): ``num_experts`` ints."""
        rank = self._check_rank(rank)
        table = [rank] * self.num_experts
        for peer, a, b in self.fetch_plan(rank):
            table[a:b] = [peer] * (b - a)
        return table
