"""``is_finite_real``: the simulator's "finite number" test, safe for Python integers beyond floats' range."""

from __future__ import annotations

import math

from .._checks import is_real

__all__ = ["is_finite_real"]


def is_finite_real(value: object) -> bool:
    """True for a real number (``is_real``: bools refused) that is a finite float: an integer beyond floats' range
    (10**400, a JSON file's 401-digit literal) is not one. ``math.isfinite`` raises OverflowError for it, which named
    no argument."""
    if not is_real(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
