"""``_C.register_unit``: NVSHMEM's registration unit, read from NVSHMEM_CUMEM_GRANULARITY without a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest


def unit(value: str | None) -> subprocess.CompletedProcess:
    env = None
    if value is not None:
        import os

        env = dict(os.environ, NVSHMEM_CUMEM_GRANULARITY=value)
    code = "import dwdp_ops._C as C; print(C.register_unit())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("value, want", [("2097152", 2 << 20), ("2M", 2 << 20), ("2m", 2 << 20), ("1.5m", 3 << 19),
                                         ("64k", 64 << 10), ("1G", 1 << 30), ("", 512 << 20)])
def test_a_size_is_read_in_bytes(value, want):
    r = unit(value)
    assert r.returncode == 0 and int(r.stdout) == want, r.stderr


@pytest.mark.parametrize("value", ["0.5", "0", "-2M", "abc", "2Mx", "1e30", "3.3"])
def test_a_value_that_is_no_whole_size_is_refused_by_name(value):
    """0.5 had given a unit of 0 bytes (register_symmetric's bytes % unit then ended the process), 'abc' and '2Mx'
    had been taken as the 512 MiB default or 2 MiB without a word, 1e30 overflowed the conversion."""
    r = unit(value)
    assert r.returncode != 0 and "ValueError: NVSHMEM_CUMEM_GRANULARITY=" in r.stderr, (r.stdout, r.stderr)
