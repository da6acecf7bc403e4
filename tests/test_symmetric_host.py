"""Host-side checks of ``dwdp_ops.symmetric`` (symmetric_empty, free_symmetric, peer_view, getmem) with a fake
runtime: every bad argument is refused, naming it, before anything is allocated or launched. CuPy builds the arrays
over fake addresses (no GPU needed to make one, only to touch it)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cupy")

import dwdp_ops.symmetric as sym  # noqa: E402
from dwdp_ops.runtime import SymmetricBuffer  # noqa: E402


class FakeBackend:
    def __init__(self):
        self.calls = []

    def getmem(self, *args):
        self.calls.append(("getmem", *args))

    def symmetric_peer_ptr(self, ptr, pe):
        return ptr + (pe + 1) * (1 << 36)


class FakeRuntime:
    state, device = "initialized", 0

    def __init__(self):
        self.backend = FakeBackend()
        self.buffers, self.allocs, self.frees, self.next = {}, [], [], 1 << 40

    def require(self, what):
        pass

    def world_size(self):
        return 2

    def rank(self):
        return 0

    def symmetric_alloc(self, nbytes, label):
        self.allocs.append((nbytes, label))
        buf = SymmetricBuffer(self.next, nbytes, len(self.allocs), label)
        self.buffers[buf.ptr], self.next = buf, self.next + (1 << 34)
        return buf

    def symmetric_free(self, buf):
        self.frees.append(buf)
        del self.buffers[buf.ptr]

    def find_buffer(self, ptr, nbytes):
        return next((b for b in self.buffers.values() if b.ptr <= ptr and ptr + nbytes <= b.ptr + b.nbytes), None)


@pytest.fixture
def rt(monkeypatch):
    fake = FakeRuntime()
    monkeypatch.setattr(sym, "get_runtime", lambda: fake)
    return fake


@pytest.mark.parametrize("shape", [(2**33, 2**31 + 1), (2**62, 4), (2**70,), (2**61, 2)])
def test_a_shape_past_an_array_s_byte_range_is_refused_before_allocating(rt, shape):
    """The byte size was an int64 product: (2**33, 2**31 + 1) float32 wrapped to 32 GiB and was allocated for an
    array CuPy then described as 2**64 + 2**33 elements (every access past 32 GiB out of bounds); (2**62, 4) wrapped
    to 0 bytes and (2**70,) raised a bare OverflowError from NumPy. Refused by name, nothing allocated."""
    with pytest.raises(ValueError, match=r"symmetric_empty: shape .* of float32 is \d+ bytes, more than an array"):
        sym.symmetric_empty(shape, np.float32)
    assert rt.allocs == []
    a = sym.symmetric_empty((4, 8), np.float32)
    assert a.shape == (4, 8) and rt.allocs == [(128, "float32[4, 8]")]


@pytest.mark.parametrize("dtype", [">f4", "U3", "M8[s]"])
def test_a_dtype_a_device_cannot_compute_on_is_refused_before_allocating(rt, dtype):
    """``'>f4'``, strings and datetimes were allocated on the symmetric heap (collectively) as CuPy arrays of that
    dtype; ``normalize_dtype`` refuses them now, before any collective."""
    with pytest.raises(TypeError, match="is not supported"):
        sym.symmetric_empty(4, dtype)
    assert rt.allocs == []


def test_free_symmetric_refuses_a_slice_that_starts_at_the_allocation(rt):
    """Only the start address was compared: ``free_symmetric(a[:2])`` freed all of ``a`` (the caller still holding
    ``a``, now dangling), although a slice is refused. A view of the whole array still frees it."""
    from dwdp_ops.errors import DwdpError

    a = sym.symmetric_empty((4, 8), np.float32)
    for part in (a[:2], a[:, :4], a[::2], a[0]):
        with pytest.raises(DwdpError, match="free_symmetric: pass the array returned by symmetric_empty, not a slice"):
            sym.free_symmetric(part)
    assert rt.frees == []
    sym.free_symmetric(a.reshape(32).view(np.uint8))
    assert [b.nbytes for b in rt.frees] == [128]


@pytest.mark.parametrize("pe, err", [(True, TypeError), (1.7, TypeError), ("1", TypeError), (2, ValueError),
                                     (-1, ValueError), (2**70, ValueError)])
def test_peer_view_and_getmem_take_only_an_integer_pe(rt, pe, err):
    """``int(pe)`` took ``True`` as PE 1, ``1.7`` as PE 1 and ``'1'`` as PE 1: a view of, or a get from, a peer
    nobody named. TypeError for a non-integer, ValueError outside the world, before any native call."""
    a, d = sym.symmetric_empty(16, np.float32), sym.symmetric_empty(16, np.float32)
    with pytest.raises(err, match=r"peer_view: pe .*(must be an int in|is outside) \[0, 2\)"):
        sym.peer_view(a, pe)
    with pytest.raises(err, match=r"getmem: pe .*(must be an int in|is outside) \[0, 2\)"):
        sym.getmem(d, a, pe, stream=0)
    assert rt.backend.calls == []
    assert sym.peer_view(a, np.int64(1)).data.ptr == a.data.ptr + 2 * (1 << 36)


@pytest.mark.parametrize("kw, err, match", [
    ({"num_blocks": 2.5}, TypeError, r"num_blocks must be an int in \[1, 65535\], got 2.5 \(float\)"),
    ({"num_blocks": True}, TypeError, "num_blocks must be an int in"),
    ({"num_blocks": 0}, ValueError, "num_blocks must be an int in"),
    ({"num_blocks": 2**40}, ValueError, "num_blocks must be an int in"),
    ({"threads": 256.0}, TypeError, r"threads must be a multiple of 32 in \[32, 1024\], got 256.0 \(float\)"),
    ({"threads": 100}, ValueError, "threads must be a multiple of 32"),
    ({"threads": 2048}, ValueError, "threads must be a multiple of 32"),
])
def test_getmem_checks_its_launch_shape_by_name(rt, kw, err, match):
    """``num_blocks=2.5`` launched 2 blocks and ``True`` one (``int()``), ``2**40`` met pybind's unnamed "incompatible
    function arguments"; ``threads`` went unchecked to the native call (which refuses only after checking that
    NVSHMEM runs). Each is refused by name first."""
    a, d = sym.symmetric_empty(16, np.float32), sym.symmetric_empty(16, np.float32)
    with pytest.raises(err, match=match):
        sym.getmem(d, a, 1, stream=0, **kw)
    assert rt.backend.calls == []
    sym.getmem(d, a, np.int64(1), stream=0, num_blocks=np.int32(4), threads=256)
    assert rt.backend.calls == [("getmem", d.data.ptr, a.data.ptr, 64, 1, 0, 4, 256)]
