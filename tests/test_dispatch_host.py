"""TokenDispatcher host-side logic on the CPU (no GPU): the row bound ``rows_for``, the heap-size formula of the
class docstring, and ``close()``'s release protocol (every free attempted, failures raised at the end, a retry frees
exactly what is left); and ``symmetric._shape``'s refusal of non-integer extents."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from dwdp_ops.dispatch import TokenDispatcher
from dwdp_ops.errors import DwdpError
from dwdp_ops.partition import ExpertPartition
from dwdp_ops.symmetric import _shape


class RT:
    device = 0

    def require(self, what):
        pass


def bare(align=1, max_pairs=64):
    """A dispatcher without device buffers: the attributes rows_for / close read."""
    d = TokenDispatcher.__new__(TokenDispatcher)
    d.partition, d.top_k, d.align, d.max_pairs = ExpertPartition.disjoint(8, 2), 2, align, max_pairs
    d.rt, d._closed, d._pending = RT(), False, None
    return d


@pytest.fixture
def no_device(monkeypatch):
    cp = pytest.importorskip("cupy")

    class Dev:
        def __init__(self, i):
            pass

        def synchronize(self):
            pass

    monkeypatch.setattr(cp.cuda, "Device", Dev)


def test_rows_for_is_at_least_one_so_dispatch_accepts_it():
    d = bare(align=1)
    assert d.rows_for([0, 0]) == 1  # was 0, which dispatch(max_rows=0) refuses
    assert d.rows_for([3, 1]) == 8  # 4 tokens x min(k=2, L=4)
    assert bare(align=16).rows_for([0, 0]) == 4 * 15
    assert bare(align=1, max_pairs=5).rows_for([100, 100]) == 5


def test_docstring_heap_formula_matches_heap_bytes():
    doc = inspect.getdoc(TokenDispatcher)
    assert "+ 20 * N" in doc and "+ 16 * N" not in doc
    N, T, H, k = 2, 4, 8, 2
    assert TokenDispatcher.heap_bytes(N, T, H, k) == N * T * (6 * H + 8 * k) + 20 * N


def test_close_stops_at_a_failed_free_and_a_retry_resumes_there(no_device):
    """The frees are collective, so the first failure stops them (newest first; a rank that went on would free the
    next buffer while its peers wait in the failed one); the buffer stays held, the dispatcher is unusable, and
    close() again resumes at that buffer (before, a failure left every later buffer allocated and a second close()
    returned at once)."""
    d = bare()
    freed, failing = [], {"comb"}

    def free(a):
        if a in failing:
            raise DwdpError(f"symmetric free of {a} failed")
        freed.append(a)

    d._free = free
    d._sym = ["recv_x", "recv_meta", "recv_w", "recv_count", "comb", "flags"]
    with pytest.raises(DwdpError, match=r"symmetric free failed.*free of comb failed.*5 buffer\(s\) still held"):
        d.close()
    assert freed == ["flags"] and d._sym == ["recv_x", "recv_meta", "recv_w", "recv_count", "comb"] and d._closed
    with pytest.raises(DwdpError, match="closed"):
        d._require("dispatch")
    failing.clear()
    d.close()
    assert freed == ["flags", "comb", "recv_count", "recv_w", "recv_meta", "recv_x"] and d._sym == []
    d.close()  # idempotent once everything is freed
    assert len(freed) == 6


@pytest.mark.parametrize("bad, err, match", [
    ("12", TypeError, r"^shape must be an int or a sequence of ints, got the string '12'$"),
    ((2.9, 3), TypeError, r"^shape \(2.9, 3\) must hold ints, got 2.9 \(float\)$"),
    (True, TypeError, r"^shape \(True,\) must hold ints, got True \(bool\)$"),
    ((2, True), TypeError, r"^shape \(2, True\) must hold ints, got True \(bool\)$"),
    ((), ValueError, r"^shape \(\) must be non-empty with positive extents$"),
    ((0, 4), ValueError, r"^shape \(0, 4\) must be non-empty with positive extents$"),
], ids=["str", "float", "bool", "bool-extent", "empty", "zero-extent"])
def test_symmetric_shape_refuses_non_integer_extents(bad, err, match):
    """The match had been 'shape', a word of every message: each case now names its own refusal and extent."""
    with pytest.raises(err, match=match):
        _shape(bad)


def test_symmetric_shape_accepts_ints():
    np = pytest.importorskip("numpy")
    assert _shape(5) == (5,)
    assert _shape((np.int64(2), 3)) == (2, 3)
    assert _shape([4, np.uint8(1)]) == (4, 1)


@pytest.mark.parametrize("bad", [2.5, True, "64"])
def test_max_pairs_must_be_an_int(bad):
    """max_pairs went through int(): 2.5 became 2 rows and True 1, silently; a string raised int()'s own error."""
    pytest.importorskip("cupy")
    from types import SimpleNamespace

    from dwdp_ops.dispatch import TokenDispatcher

    rt = SimpleNamespace(require=lambda what: None, world_size=lambda: 2, device=0)
    with pytest.raises(ValueError, match=r"max_pairs must be an int in \[1, 2\^31\), got"):
        TokenDispatcher(ExpertPartition.disjoint(8, 2), 64, 2, 16, max_pairs=bad, num_sms=4, runtime=rt)


@pytest.mark.parametrize("bad", [[-100, 5], [2.9, 0], [True, True], ["7", "1"], [3], [1, 2, 3], 5, None],
                         ids=["negative", "float", "bool", "str", "short", "long", "int", "none"])
def test_rows_for_refuses_what_is_not_every_ranks_count(bad):
    """rows_for took int() of each entry and any length: [-100, 5] gave 1 row, [2.9, 0] a bound of 2 tokens and
    ["7", "1"] one of 8, all silently (too small a max_rows makes the kernels drop the overflowing pairs); a bare int
    raised Python's "'int' object is not iterable". ValueError naming tokens_per_rank now."""
    with pytest.raises(ValueError, match=r"^rows_for: tokens_per_rank must hold every rank's tokens \(2 ints >= 0\)"):
        bare(align=1).rows_for(bad)


def test_rows_for_takes_numpy_counts():
    np = pytest.importorskip("numpy")
    assert bare(align=1).rows_for([np.int64(3), np.uint8(1)]) == 8
    assert bare(align=1).rows_for(np.array([3, 1])) == 8


@pytest.mark.parametrize("bad", [float("inf"), 1e300, True, "10", None, 0, float("nan")])
def test_timeout_must_be_finite_seconds(bad):
    """timeout was only checked '> 0': inf passed and raised int()'s OverflowError after the symmetric allocations,
    1e300 passed and would fail the first dispatch in the binding's long long cast, True was a silent 1 s, and "10" or
    None raised Python's bare '>' TypeError. ValueError naming timeout, before anything is allocated."""
    pytest.importorskip("cupy")
    from types import SimpleNamespace

    rt = SimpleNamespace(require=lambda what: None, world_size=lambda: 2, device=0)
    with pytest.raises(ValueError, match=r"^TokenDispatcher: timeout must be a number of seconds in \(0, "):
        TokenDispatcher(ExpertPartition.disjoint(8, 2), 64, 2, 16, num_sms=4, timeout=bad, runtime=rt)


@pytest.mark.parametrize("bad", [{0: 5, 1: 3}, {4, 9}, "53"], ids=["dict", "set", "str"])
def test_rows_for_refuses_a_mapping_set_or_string(bad):
    """rows_for's check (shared with the scheduler's step counts: _checks.rank_counts) took a dict's keys, a set's
    members or a string's characters as the counts ({0: 5, 1: 3} gave a bound for 1 token); ValueError now."""
    with pytest.raises(ValueError, match=r"^rows_for: tokens_per_rank must hold every rank's tokens \(2 ints >= 0\)"):
        bare(align=1).rows_for(bad)
    assert bare(align=1).rows_for(np.array([3, 4])) == bare(align=1).rows_for([3, 4])
