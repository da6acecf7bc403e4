"""The "is an integer" and "is a real number" tests behind the package's argument checks.

``is_int``, ``is_real`` and ``is_bool`` are the predicates: a caller with its own message, exception type or range check builds
on them, so that an error still names the argument and what it expects; ``int_at_least`` is the common whole check
("``name`` must be an int >= lo"). Python and numpy integers pass (a count read from an array
or a JSON file is as good as a literal); bools do not, though ``bool`` subclasses ``int``: ``True`` is almost
always a mistake where a count or an index is asked for.
"""

from __future__ import annotations

import numbers


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


def int_at_least(name: str, value: object, lo: int, noun: str = "an int") -> int:
    """``value`` as an int: TypeError unless an integer (``is_int``), ValueError unless >= ``lo``; both say
    "``name`` must be ``noun`` >= ``lo``" and the value given."""
    if not is_int(value):
        raise TypeError(f"{name} must be {noun} >= {lo}, got {value!r} ({type(value).__name__})")
    if value < lo:
        raise ValueError(f"{name} must be {noun} >= {lo}, got {value!r}")
    return int(value)


def rank_counts(where: str, tokens_per_rank: object, world: int) -> list[int]:
    """``tokens_per_rank`` as a list of ``world`` Python ints >= 0 (numpy integers and arrays taken), or a ValueError
    that starts with ``where`` and names ``tokens_per_rank``: a negative or truncated count would give a bound too
    small for the step (the dispatchers' ``rows_for``)."""
    try:
        counts = list(tokens_per_rank)
    except TypeError:
        counts = None
    if counts is None or len(counts) != world or not all(is_int(t) and t >= 0 for t in counts):
        raise ValueError(f"{where}: tokens_per_rank must hold every rank's tokens ({world} ints >= 0), "
                         f"got {tokens_per_rank!r}")
    return [int(t) for t in counts]
