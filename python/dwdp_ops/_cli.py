"""Argument checking shared by every dwdp_ops command line (``demo``, ``can-train``, ``launch``, ``info``).

Each ``type=`` validator takes the option's string and returns the converted value, or raises
``argparse.ArgumentTypeError`` with a message that says what was given and what is expected; argparse then prints
the usage and one ``PROG: error: argument --OPTION: MESSAGE`` line and exits with code 2 (no traceback). Checks that
involve several options run after parsing and report through ``parser.error`` in the same form.

``HelpFormatter`` appends ``(default: X)`` to every option's help unless the default is ``None`` or ``False`` (such
options say in words what happens when they are left out) or the help already mentions its default.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
from collections.abc import Callable


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows each option's default where it is a real value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def plain(doc: str | None) -> str:
    """A docstring as help text: reStructuredText literals (````x````) become plain ``x``."""
    return re.sub(r"``(.+?)``", r"\1", doc or "").strip()


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    v = _number(text, int, "an integer >= 1")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    v = _number(text, int, "an integer >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def seed_int(text: str) -> int:
    """A seed: an integer in [0, 2^32) (numpy's generators split a larger one into words, so that two seeds would draw
    the same numbers; ``init_weights`` refuses it)."""
    v = nonnegative_int(text)
    if v >= 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^32), got {v}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0."""
    v = _number(text, float, "a number > 0")
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def divisor_of(n: int, what: str) -> Callable[[str], int]:
    """A validator for an integer >= 1 that divides ``n``; ``what`` says where ``n`` comes from in the message."""

    def check(text: str) -> int:
        v = positive_int(text)
        if n % v:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise argparse.ArgumentTypeError(f"{v} does not divide {what} ({n}); use one of {divisors}")
        return v

    check.__name__ = f"divisor_of_{n}"
    return check


def existing_file(text: str) -> str:
    """The path of an existing, readable regular file."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not readable")
    return text


def writable_path(text: str) -> str:
    """A file path that can be written: its directory exists and is writable, and the path is not a directory.
    Checked when the arguments are parsed, so a long run does not fail only at its end."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    if "\0" in text:  # (os.path answers False for it, so it passed and open() refused it at the run's end)
        raise argparse.ArgumentTypeError(f"{text!r} contains a NUL byte; give a file path")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file path")
    if os.path.basename(text) in ("", ".", ".."):  # 'out.json/', 'dir/.': names a directory, open() would refuse it
        raise argparse.ArgumentTypeError(f"{text!r} names a directory (it ends with a path separator, '.' or '..'); "
                                         "give a file path")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"the directory {parent!r} of {text!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    return text


def _have_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def usable_gpus() -> tuple[int, str]:
    """(number of CUDA GPUs this process can use, why there are none) and never raises: a missing native module or
    driver counts as no GPU, with its reason ("no NVIDIA driver found" where ``libcuda.so.1`` cannot be loaded)."""
    try:
        from ._native import native

        count, why = native().cuda_device_count()
    except Exception as e:  # noqa: BLE001 - any failure to reach a GPU means "no GPU" here, with its reason
        count, why = 0, str(e)
    if count == 0 and not _have_driver():
        why = "no NVIDIA driver found: libcuda.so.1 cannot be loaded"
    return count, why
