"""The "is an integer" and "is a real number" tests behind the package's argument checks.

``is_int``, ``is_real``, ``is_bool`` and ``is_finite_real`` (a real within floats' range) are the predicates: a caller
with its own message, exception type or range check builds on them, so that an error still names the argument and what
it expects; ``int_at_least`` is the common whole check ("``name`` must be an int >= lo"). Python and numpy integers
pass (a count read from an array or a JSON file is as good as a literal); bools do not, though ``bool`` subclasses
``int``: ``True`` is almost always a mistake where a count or an index is asked for.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence, Set


def is_int(value: object) -> bool:
    """True for an integer: Python or numpy (any ``numbers.Integral``), bools refused."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_bool(value: object) -> bool:
    """True for a bool, Python's or numpy's (``numpy.bool``, ``numpy.bool_`` before numpy 2: no ``bool`` instance),
    without importing numpy: where a bool is refused with its own message (a bool handle, size or timeout)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def is_real(value: object) -> bool:
    """True for a real number, Python or numpy (any ``numbers.Real``: numpy floats and integers pass); bools refused,
    as ``is_int`` does (``True`` where a ratio, a rate or a timeout is asked for is a mistake, not 1.0)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_real(value: object) -> bool:
    """True for a real number (``is_real``: bools refused) that is a finite float: an integer beyond floats' range
    (10**400, a JSON file's 401-digit literal) is not one (``math.isfinite`` raises OverflowError for it, which named
    no argument)."""
    if not is_real(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def int_at_least(name: str, value: object, lo: int, noun: str = "an int") -> int:
    """``value`` as an int: TypeError unless an integer (``is_int``), ValueError unless >= ``lo``; both say
    "``name`` must be ``noun`` >= ``lo``" and the value given."""
    if not is_int(value):
        raise TypeError(f"{name} must be {noun} >= {lo}, got {value!r} ({type(value).__name__})")
    if value < lo:
        raise ValueError(f"{name} must be {noun} >= {lo}, got {value!r}")
    return int(value)


def as_count(value: object) -> int | None:
    """``value`` as a token count (an int >= 0: Python, numpy or a 0-d integer tensor), else None (bools too)."""
    if is_bool(value):
        return None
    # a tensor's __index__ takes a bool tensor as 0 / 1 and a [1] or [1, 1] tensor as its element: only a 0-d integer
    # one is a count (numpy's arrays refuse both already)
    dtype = getattr(value, "dtype", None)
    if dtype is not None and (getattr(value, "ndim", 0) != 0 or "bool" in str(dtype)):
        return None
    try:
        n = operator.index(value)
    except TypeError:
        return None
    return n if n >= 0 else None


def rank_counts(where: str, tokens_per_rank: object, world: int, *, rank: int | None = None,
                tokens: int | None = None) -> list[int]:
    """``tokens_per_rank`` as a list of ``world`` Python ints >= 0 (``as_count``: numpy integers and 0-d integer
    tensors taken; a string, mapping or set refused: a dict's keys are not counts), with ``rank``'s entry equal to
    ``tokens`` when ``rank`` is given; else a ValueError that starts with ``where: `` (when given) and names
    ``tokens_per_rank``: a negative or truncated count would give a bound too small for the step (the dispatchers'
    ``rows_for``, the scheduler's step counts)."""
    # a rank outside [0, world): -1 had compared the last rank's entry, world had raised IndexError
    if rank is not None and not (is_int(rank) and 0 <= rank < world):
        raise ValueError(f"{where + ': ' if where else ''}rank must be an int in [0, {world}), got {rank!r}")
    got = None
    if not isinstance(tokens_per_rank, (str, bytes, Mapping, Set)):
        try:
            got = [as_count(t) for t in tokens_per_rank]
        except TypeError:  # not iterable
            got = None
    if got is None or len(got) != world or None in got or (rank is not None and got[rank] != tokens):
        shown = list(tokens_per_rank) if isinstance(tokens_per_rank, Sequence) else tokens_per_rank
        mine = f", this rank's = {tokens}" if rank is not None else ""
        raise ValueError(f"{where + ': ' if where else ''}tokens_per_rank must hold every rank's tokens ({world} ints "
                         f">= 0{mine}), got {shown!r}")
    return got


# The copy kernels' launch arguments (getmem, NvshmemFetch.fetch): name -> (its range, what is expected).
_LAUNCH = {
    "num_blocks": (lambda n: 1 <= n <= 65535, "an int in [1, 65535]"),
    "threads": (lambda n: 32 <= n <= 1024 and n % 32 == 0, "a multiple of 32 in [32, 1024]"),
    "chunk": (lambda n: 16 <= n <= 1 << 62 and n % 16 == 0, "a multiple of 16 bytes in [16, 2**62]"),
}


def launch_args(where: str, **values: object) -> None:
    """Checks copy-kernel launch arguments by name (``num_blocks``, ``threads``, ``chunk``), in the order given:
    TypeError for a non-integer (bools included), ValueError outside its range, each message starting with
    ``where``."""
    for name, v in values.items():
        ok, want = _LAUNCH[name]
        if not is_int(v):
            raise TypeError(f"{where}: {name} must be {want}, got {v!r} ({type(v).__name__})")
        if not ok(v):
            raise ValueError(f"{where}: {name} must be {want}, got {v!r}")
