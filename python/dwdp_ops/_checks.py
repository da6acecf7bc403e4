"""The one "is an integer" test behind the package's argument checks.

``is_int`` is the predicate only: each caller keeps its own message, exception type and range check, so that an
error still names the argument and what it expects. Python and numpy integers pass (a count read from an array
or a JSON file is as good as a literal); bools do not, though ``bool`` subclasses ``int``: ``True`` is almost
always a mistake where a count or an index is asked for.
"""

from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    """True for an integer: Python or numpy (any ``numbers.Integral``), bools refused."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
